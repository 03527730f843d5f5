"""The durable task journal: round trips, idempotency, crash durability, corrupt files.

The crash test is real: a child process records a task and SIGKILLs itself the moment the
calls return; the parent reopens the file and finds everything. A hypothesis test checks
any sequence of operations (including close-and-reopen) against a plain in-memory model.
"""

from __future__ import annotations

import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.protocol import codec
from agent.protocol.messages import (
    ErrorInfo,
    OutputFile,
    OutputPart,
    Pool,
    TaskCancelled,
    TaskComplete,
    TaskFail,
    TaskPhase,
    TaskRef,
    TerminalMessage,
    Timings,
)
from agent.tasks.journal import SCHEMA_VERSION, Journal, JournalEntry, JournalError
from tests import factories as f

ROOT = Path(__file__).resolve().parents[2]
SHA = "ab" * 32


def output(key: str = "9.images.0", size: int = 10, *, multipart: bool = False) -> OutputFile:
    """Build a confirmed output (optionally a multipart one)."""
    parts = [OutputPart(part_number=1, etag='"e1"'), OutputPart(part_number=2, etag='"e2"')]
    return OutputFile(
        key=key,
        storage_key=f"tasks/t1/{key}.png",
        size=size,
        sha256=SHA,
        content_type="image/png",
        upload_id="up-1" if multipart else None,
        parts=parts if multipart else None,
    )


def complete(task: TaskRef, msg_id: str = "m-1", *outputs: OutputFile) -> TaskComplete:
    """Build a ``task.complete`` for ``task``."""
    return TaskComplete(
        id=msg_id,
        ts=f.T0,
        task_id=task.task_id,
        attempt=task.attempt,
        outputs=list(outputs),
        timings=Timings(queued_s=0.5, run_s=12.25),
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the journal lives: ``state_dir/journal.sqlite3``."""
    return tmp_path / "state" / "journal.sqlite3"


def test_every_field_round_trips(path: Path) -> None:
    """Accept, phase, handle, outputs and terminal come back equal, stamped by the clock."""
    clock = iter([100.0, 101.0, 102.0, 103.0, 104.0, 105.0])
    assign, out1, out2 = f.assign("t1", 2, Pool.COMMUNITY), output(), output("9.images.1", 7)
    ref = f.ref("t1", 2)
    terminal = complete(ref, "m-1", out1, out2)
    with Journal(path, clock=lambda: next(clock)) as journal:
        journal.record_accept(assign)
        journal.set_phase(ref, TaskPhase.RUNNING)
        journal.set_handle(ref, {"prompt_id": "p-1", "pgid": 123, "start_time": 1.5})
        journal.add_output(ref, out1)
        journal.add_output(ref, out2)
        journal.set_terminal(terminal)
        expected = JournalEntry(
            task_id="t1",
            attempt=2,
            pool=Pool.COMMUNITY,
            phase=TaskPhase.REPORTING,
            assign=assign,
            handle={"prompt_id": "p-1", "pgid": 123, "start_time": 1.5},
            outputs=[out1, out2],
            terminal=terminal,
            updated_at=105.0,
        )
        assert journal.get(ref) == expected
        assert journal.entries() == [expected]


def test_every_terminal_kind_round_trips(path: Path) -> None:
    """``task.fail`` and ``task.cancelled`` come back as their own types, not as another."""
    fail = TaskFail(
        id="m-f", ts=f.T0, task_id="a", attempt=0, error=ErrorInfo(code="x", message="y")
    )
    cancelled = TaskCancelled(id="m-c", ts=f.T0, task_id="b", attempt=0, reason="user")
    with Journal(path) as journal:
        for message in (fail, cancelled):
            journal.record_accept(f.assign(message.task_id))
            journal.set_terminal(message)
        assert [e.terminal for e in journal.entries()] == [fail, cancelled]


def test_record_accept_is_idempotent(path: Path) -> None:
    """A repeated accept of the same attempt keeps the first assign and the current phase."""
    first, again = f.assign("t1"), f.assign("t1")
    with Journal(path) as journal:
        journal.record_accept(first)
        journal.set_phase(f.ref("t1"), TaskPhase.RUNNING)
        journal.record_accept(again)
        [entry] = journal.entries()
    assert entry.assign == first
    assert entry.phase is TaskPhase.RUNNING


def test_add_output_replaces_by_key_in_place(path: Path) -> None:
    """Re-adding an output key replaces it where it was; new keys append in order."""
    a, b, a2 = output("a"), output("b"), output("a", 99, multipart=True)
    with Journal(path) as journal:
        journal.record_accept(f.assign("t1"))
        for out in (a, b, a2, b):
            journal.add_output(f.ref("t1"), out)
        entry = journal.get(f.ref("t1"))
    assert entry is not None
    assert entry.outputs == [a2, b]


def test_set_terminal_is_idempotent_and_one_per_attempt(path: Path) -> None:
    """The same terminal twice is a no-op; a different one raises and changes nothing."""
    ref = f.ref("t1")
    first = complete(ref, "m-1")
    with Journal(path) as journal:
        journal.record_accept(f.assign("t1"))
        journal.set_terminal(first)
        journal.set_terminal(first)
        with pytest.raises(JournalError, match="already has a terminal"):
            journal.set_terminal(complete(ref, "m-2"))
        entry = journal.get(ref)
    assert entry is not None
    assert entry.terminal == first


@pytest.mark.parametrize("operation", ["set_phase", "set_handle", "add_output", "set_terminal"])
def test_unknown_task_raises(path: Path, operation: str) -> None:
    """Updating a task that was never accepted (or was removed) raises JournalError."""
    ref = f.ref("ghost")
    calls: dict[str, Any] = {
        "set_phase": lambda j: j.set_phase(ref, TaskPhase.RUNNING),
        "set_handle": lambda j: j.set_handle(ref, {"pgid": 1}),
        "add_output": lambda j: j.add_output(ref, output()),
        "set_terminal": lambda j: j.set_terminal(complete(ref)),
    }
    with Journal(path) as journal:
        journal.record_accept(f.assign("other"))
        with pytest.raises(JournalError, match="not in the journal"):
            calls[operation](journal)
        assert [e.task_id for e in journal.entries()] == ["other"]


def test_handle_must_be_json(path: Path) -> None:
    """A handle that JSON cannot carry raises JournalError and leaves the old one."""
    with Journal(path) as journal:
        journal.record_accept(f.assign("t1"))
        journal.set_handle(f.ref("t1"), {"pgid": 1})
        with pytest.raises(JournalError, match="not JSON"):
            journal.set_handle(f.ref("t1"), {"pgid": object()})
        entry = journal.get(f.ref("t1"))
    assert entry is not None
    assert entry.handle == {"pgid": 1}


def test_terminal_survives_reopen_byte_identical(path: Path) -> None:
    """After reopening, the terminal message has its id and re-encodes to the same frame."""
    ref = f.ref("t1", 3)
    terminal = complete(ref, "0190a8b2-7c1e-7000-8000-00000000abcd", output(multipart=True))
    with Journal(path) as journal:
        journal.record_accept(f.assign("t1", 3))
        journal.set_terminal(terminal)
    with Journal(path) as journal:
        entry = journal.get(ref)
    assert entry is not None
    assert entry.terminal is not None
    assert entry.terminal.id == terminal.id
    assert entry.terminal.model_dump_json() == terminal.model_dump_json()
    assert codec.encode(entry.terminal) == codec.encode(terminal)
    assert entry.phase is TaskPhase.REPORTING


CHILD = """
import os, signal, sys
from pathlib import Path
from agent.protocol.messages import OutputFile, TaskAssign, TaskComplete, TaskPhase
from agent.tasks.journal import Journal

path, assign, out, terminal = sys.argv[1:]
journal = Journal(Path(path))
assign = TaskAssign.model_validate_json(assign)
journal.record_accept(assign)
journal.set_phase(assign, TaskPhase.UPLOADING)
journal.set_handle(assign, {"pgid": 4242})
journal.add_output(assign, OutputFile.model_validate_json(out))
journal.set_terminal(TaskComplete.model_validate_json(terminal))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_right_after_the_calls_loses_nothing(path: Path) -> None:
    """A process SIGKILLed the moment its calls return leaves all of them in the journal."""
    assign, out = f.assign("t1", 1), output()
    terminal = complete(f.ref("t1", 1), "m-crash", out)
    args = [str(path), assign.model_dump_json(), out.model_dump_json(), terminal.model_dump_json()]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, timeout=30, check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert path.with_name(path.name + "-wal").stat().st_size > 0  # recovered from the WAL
    with Journal(path) as journal:
        [entry] = journal.entries()
    assert (entry.assign, entry.phase, entry.handle) == (
        assign,
        TaskPhase.REPORTING,
        {"pgid": 4242},
    )
    assert entry.outputs == [out]
    assert entry.terminal == terminal
    assert entry.terminal is not None
    assert codec.encode(entry.terminal) == codec.encode(terminal)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a journal\n" * 64)


def _damaged_page(path: Path) -> None:
    with Journal(path) as journal:
        for i in range(20):
            journal.record_accept(f.assign(f"t{i}"))
    with path.open("r+b") as file:  # page 2 is the root of the tasks table
        file.seek(4096)
        file.write(b"\xff" * 4096)


def _newer_schema(path: Path) -> None:
    with Journal(path):
        pass
    db = sqlite3.connect(path)
    try:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    finally:
        db.close()


def _foreign_database(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TABLE something_else (x)")
        db.commit()
    finally:
        db.close()


@pytest.mark.parametrize("spoil", [_garbage, _damaged_page, _newer_schema, _foreign_database])
def test_invalid_file_is_moved_aside_and_kept(path: Path, spoil: Any) -> None:
    """A corrupt, foreign or newer file is renamed .corrupt-<time>, kept, and a fresh one works."""
    path.parent.mkdir(mode=0o700)
    spoil(path)
    before = path.read_bytes()
    with capture_logs() as logged, Journal(path) as journal:
        assert journal.entries() == []
        journal.record_accept(f.assign("t1"))
        assert [e.task_id for e in journal.entries()] == ["t1"]
    [aside] = path.parent.glob("journal.sqlite3.corrupt-*")
    assert aside.name.removeprefix("journal.sqlite3.corrupt-").isdigit()
    assert aside.read_bytes() == before
    assert [e["event"] for e in logged if e["log_level"] == "warning"] == ["journal_moved_aside"]


def test_unreadable_row_is_skipped_by_entries(path: Path) -> None:
    """A row whose JSON no longer validates is skipped with a warning; get() raises for it."""
    with Journal(path) as journal:
        journal.record_accept(f.assign("bad"))
        journal.record_accept(f.assign("good"))
    db = sqlite3.connect(path)
    try:
        db.execute("UPDATE tasks SET assign = '{\"type\": \"nope\"}' WHERE task_id = 'bad'")
        db.commit()
    finally:
        db.close()
    with capture_logs() as logged, Journal(path) as journal:
        assert [e.task_id for e in journal.entries()] == ["good"]
        with pytest.raises(JournalError, match="unreadable"):
            journal.get(f.ref("bad"))
    assert [e["event"] for e in logged] == ["journal_entry_unreadable"]


def test_remove_forgets_the_task_and_its_outputs(path: Path) -> None:
    """remove() drops the entry and its outputs; removing an unknown task is a no-op."""
    with Journal(path) as journal:
        journal.record_accept(f.assign("t1"))
        journal.add_output(f.ref("t1"), output())
        journal.remove(f.ref("t1"))
        journal.remove(f.ref("never"))
        assert journal.get(f.ref("t1")) is None
        assert journal.entries() == []
        journal.record_accept(f.assign("t1"))
        entry = journal.get(f.ref("t1"))
    assert entry is not None
    assert (entry.outputs, entry.phase) == ([], TaskPhase.ACCEPTED)


def test_entries_are_oldest_accept_first(path: Path) -> None:
    """entries() lists tasks in the order they were accepted, whatever was updated since."""
    with Journal(path) as journal:
        for task_id in ("c", "a", "b"):
            journal.record_accept(f.assign(task_id))
        journal.set_phase(f.ref("c"), TaskPhase.RUNNING)
        journal.remove(f.ref("b"))
        journal.record_accept(f.assign("b"))
        assert [e.task_id for e in journal.entries()] == ["c", "a", "b"]


def test_files_are_private_and_wal_is_on(tmp_path: Path) -> None:
    """Created directories are 0700, the journal and its WAL 0600, in WAL with FULL sync."""
    path = tmp_path / "a" / "b" / "journal.sqlite3"
    with Journal(path) as journal:
        journal.record_accept(f.assign("t1"))
        sync = journal._db.execute("PRAGMA synchronous").fetchone()[0]
        wal = path.with_name(path.name + "-wal")
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert sync == 2  # FULL
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_closed_journal_raises_journal_error(path: Path) -> None:
    """Any call after close() raises JournalError; close() itself is idempotent."""
    journal = Journal(path)
    journal.close()
    journal.close()
    with pytest.raises(JournalError):
        journal.record_accept(f.assign("t1"))
    with pytest.raises(JournalError):
        journal.entries()


def test_unopenable_path_raises_journal_error(tmp_path: Path) -> None:
    """A path that cannot hold a file (a directory is there) raises JournalError."""
    (tmp_path / "journal.sqlite3").mkdir()
    with pytest.raises(JournalError, match="cannot open"):
        Journal(tmp_path / "journal.sqlite3")


# ------------------------------------------------------------------ model-based property

REFS = [f.ref(task_id, attempt) for task_id in ("a", "b") for attempt in (0, 1)]


@dataclass
class _Model:
    """What the journal should hold for one task attempt."""

    phase: TaskPhase = TaskPhase.ACCEPTED
    handle: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, OutputFile] = field(default_factory=dict)
    terminal: TerminalMessage | None = None


ref_index = st.integers(0, len(REFS) - 1)
operations = st.one_of(
    st.tuples(st.just("accept"), ref_index),
    st.tuples(st.just("phase"), ref_index, st.sampled_from(TaskPhase)),
    st.tuples(st.just("handle"), ref_index, st.dictionaries(st.sampled_from("xyz"), st.integers())),
    st.tuples(st.just("output"), ref_index, st.sampled_from("klm"), st.integers(0, 9)),
    st.tuples(st.just("terminal"), ref_index, st.integers(0, 1)),
    st.tuples(st.just("remove"), ref_index),
    st.tuples(st.just("reopen")),
)


def _apply(journal: Journal, model: dict[TaskRef, _Model], op: tuple[Any, ...]) -> None:
    """Apply one operation to the journal and the model; unknown refs must raise."""
    kind, ref = op[0], REFS[op[1]]
    if kind == "accept":
        journal.record_accept(f.assign(ref.task_id, ref.attempt))
        model.setdefault(ref, _Model())
        return
    if kind == "remove":
        journal.remove(ref)
        model.pop(ref, None)
        return
    entry = model.get(ref)
    if kind == "terminal":
        message = complete(ref, f"m-{op[2]}")
        if entry is not None and entry.terminal not in (None, message):
            with pytest.raises(JournalError):
                journal.set_terminal(message)
            return
    calls = {
        "phase": lambda: journal.set_phase(ref, op[2]),
        "handle": lambda: journal.set_handle(ref, op[2]),
        "output": lambda: journal.add_output(ref, output(op[2], op[3])),
        "terminal": lambda: journal.set_terminal(complete(ref, f"m-{op[2]}")),
    }
    if entry is None:
        with pytest.raises(JournalError, match="not in the journal"):
            calls[kind]()
        return
    calls[kind]()
    if kind == "phase":
        entry.phase = op[2]
    elif kind == "handle":
        entry.handle = op[2]
    elif kind == "output":
        entry.outputs[op[2]] = output(op[2], op[3])
    else:
        entry.terminal, entry.phase = complete(ref, f"m-{op[2]}"), TaskPhase.REPORTING


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, max_size=20))
def test_any_operation_sequence_matches_a_simple_model(ops: list[tuple[Any, ...]]) -> None:
    """Any sequence of operations (with reopens) leaves entries() equal to an in-memory model."""
    model: dict[TaskRef, _Model] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal.sqlite3"
        journal = Journal(path)
        try:
            for op in ops:
                if op[0] == "reopen":
                    journal.close()
                    journal = Journal(path)
                else:
                    _apply(journal, model, op)
            got = [
                (TaskRef(task_id=e.task_id, attempt=e.attempt), e.phase, e.handle, e.terminal)
                for e in journal.entries()
            ]
            outputs = [e.outputs for e in journal.entries()]
        finally:
            journal.close()
    want = [(ref, m.phase, m.handle, m.terminal) for ref, m in model.items()]
    assert got == want
    assert outputs == [list(m.outputs.values()) for m in model.values()]
