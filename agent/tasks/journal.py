"""The durable local journal: what a restarted agent needs to resume or report its tasks.

One SQLite file (``state_dir/journal.sqlite3``) in WAL mode with ``synchronous=FULL``: each
writing call is one transaction, fsynced before the call returns, so a ``kill -9`` right
after it loses nothing. Protocol objects are stored as their JSON, so a terminal message
comes back equal to the one recorded, with its original ``id``, and re-encodes to the same
frame (``docs/protocol.md`` §7).

The journal owns its file and its one connection, used from one thread with plain blocking
calls (about a millisecond each). A file that is not a valid journal (corrupt, not SQLite,
or a newer schema) is moved aside to ``<name>.corrupt-<unix time>`` with a warning and a
fresh journal is started: the agent must always be able to start. Any other failure, and
any misuse (a task that was never accepted), raises :class:`JournalError`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import Field, TypeAdapter, ValidationError

from agent import logs
from agent.errors import AgentError
from agent.protocol.messages import (
    OutputFile,
    Pool,
    TaskAssign,
    TaskPhase,
    TaskRef,
    TerminalMessage,
)

__all__ = ["SCHEMA_VERSION", "Journal", "JournalEntry", "JournalError"]

SCHEMA_VERSION: Final = 1
_TERMINAL: Final = TypeAdapter[TerminalMessage](
    Annotated[TerminalMessage, Field(discriminator="type")]
)
_NOT_A_JOURNAL: Final = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_SCHEMA: Final = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY, task_id TEXT NOT NULL, attempt INTEGER NOT NULL,
    phase TEXT NOT NULL, assign TEXT NOT NULL, handle TEXT NOT NULL DEFAULT '{}',
    terminal TEXT, updated_at REAL NOT NULL, UNIQUE (task_id, attempt));
CREATE TABLE outputs (
    seq INTEGER PRIMARY KEY, task INTEGER NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
    key TEXT NOT NULL, output TEXT NOT NULL, UNIQUE (task, key));
"""


class JournalError(AgentError):
    """The journal cannot do what was asked: an unknown task, bad data, or a disk failure."""


class _NotAJournalError(Exception):
    """The file is SQLite but not a journal this code can read."""


@dataclass(frozen=True)
class JournalEntry:
    """One task attempt as the journal holds it."""

    task_id: str
    attempt: int
    pool: Pool
    phase: TaskPhase
    assign: TaskAssign
    handle: dict[str, Any]
    """The runtime handle, e.g. ``{"prompt_id": ...}`` or ``{"pgid": 123, ...}``."""
    outputs: list[OutputFile]
    """Outputs uploaded and confirmed so far, in the order their keys were first added."""
    terminal: TerminalMessage | None
    updated_at: float
    """Wall-clock seconds (``clock``) of the last change."""


class Journal:
    """The task journal at ``path``; opening creates it, or replaces an invalid file.

    ``clock`` stamps ``updated_at``. Raises :class:`JournalError` when the file cannot be
    opened even afresh (permissions, disk, or another process holding it locked).
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        try:
            _make_dirs(path.parent)
            self._db = _open_or_replace(path)
        except (_NotAJournalError, sqlite3.Error, OSError) as exc:
            raise JournalError(f"cannot open the journal {path}: {exc}") from exc

    def record_accept(self, assign: TaskAssign) -> None:
        """Record an accepted task in phase ACCEPTED; a repeat for the same attempt is a no-op."""
        row = (assign.task_id, assign.attempt, assign.model_dump_json(), self._clock())
        with self._tx() as db:
            db.execute(
                "INSERT INTO tasks (task_id, attempt, phase, assign, updated_at)"
                " VALUES (?, ?, 'accepted', ?, ?) ON CONFLICT DO NOTHING",
                row,
            )

    def set_phase(self, task: TaskRef, phase: TaskPhase) -> None:
        """Set the phase of an accepted task; raises :class:`JournalError` if it is unknown."""
        with self._tx() as db:
            self._touch(db, task, phase=phase.value)

    def set_handle(self, task: TaskRef, handle: Mapping[str, Any]) -> None:
        """Replace the runtime handle of an accepted task; it must be JSON-serialisable."""
        try:
            text = json.dumps(dict(handle), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise JournalError(f"handle of {task.task_id} is not JSON: {exc}") from exc
        with self._tx() as db:
            self._touch(db, task, handle=text)

    def add_output(self, task: TaskRef, output: OutputFile) -> None:
        """Record a confirmed output; one with the same key replaces it, keeping its place."""
        with self._tx() as db:
            seq = self._touch(db, task)
            db.execute(
                "INSERT INTO outputs (task, key, output) VALUES (?, ?, ?)"
                " ON CONFLICT (task, key) DO UPDATE SET output = excluded.output",
                (seq, output.key, output.model_dump_json()),
            )

    def set_terminal(self, message: TerminalMessage) -> None:
        """Record the attempt's terminal message and set phase REPORTING.

        Repeating the same message is a no-op; a different one for an attempt that already
        has one raises :class:`JournalError` (one terminal message per attempt).
        """
        text = message.model_dump_json()
        with self._tx() as db:
            seq = self._touch(db, message, phase=TaskPhase.REPORTING.value)
            old = db.execute("SELECT terminal FROM tasks WHERE seq = ?", (seq,)).fetchone()[0]
            if old not in (None, text):  # raising rolls the transaction back
                raise JournalError(f"{message.task_id}/{message.attempt} already has a terminal")
            db.execute("UPDATE tasks SET terminal = ? WHERE seq = ?", (text, seq))

    def remove(self, task: TaskRef) -> None:
        """Forget a task (after the gateway's ack, or an abandon); an unknown task is ignored."""
        with self._tx() as db:
            db.execute("DELETE FROM tasks WHERE task_id = ? AND attempt = ?", _key(task))

    def entries(self) -> list[JournalEntry]:
        """Every task, oldest accept first; an undecodable row is logged and skipped."""
        found = []
        for row in self._query("SELECT * FROM tasks ORDER BY seq"):
            try:
                found.append(self._entry(row))
            except JournalError as exc:
                log = logs.get_logger("agent.journal")
                log.warning("journal_entry_unreadable", task_id=row["task_id"], error=str(exc))
        return found

    def get(self, task: TaskRef) -> JournalEntry | None:
        """The entry of one attempt, or None; raises :class:`JournalError` if undecodable."""
        rows = self._query("SELECT * FROM tasks WHERE task_id = ? AND attempt = ?", *_key(task))
        return self._entry(rows[0]) if rows else None

    def close(self) -> None:
        """Close the file (idempotent); any later call raises :class:`JournalError`."""
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction, committed (fsynced) on exit, rolled back on error."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc

    def _touch(self, db: sqlite3.Connection, task: TaskRef, **columns: str) -> int:
        """Set ``columns`` and ``updated_at`` of a task; return its seq, or raise if unknown."""
        row = db.execute("SELECT seq FROM tasks WHERE task_id = ? AND attempt = ?", _key(task))
        found = row.fetchone()
        if found is None:
            raise JournalError(f"task {task.task_id}/{task.attempt} is not in the journal")
        sets = "".join(f"{name} = ?, " for name in columns)  # names are ours, values bound
        sql = f"UPDATE tasks SET {sets}updated_at = ? WHERE seq = ?"  # noqa: S608
        db.execute(sql, (*columns.values(), self._clock(), found[0]))
        return int(found[0])

    def _query(self, sql: str, *params: object) -> list[sqlite3.Row]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc

    def _entry(self, row: sqlite3.Row) -> JournalEntry:
        """Decode one row; raises :class:`JournalError` when its JSON no longer validates."""
        outputs = self._query("SELECT output FROM outputs WHERE task = ? ORDER BY seq", row["seq"])
        try:
            assign = TaskAssign.model_validate_json(row["assign"])
            text = row["terminal"]
            return JournalEntry(
                task_id=row["task_id"],
                attempt=row["attempt"],
                pool=assign.pool,
                phase=TaskPhase(row["phase"]),
                assign=assign,
                handle=json.loads(row["handle"]),
                outputs=[OutputFile.model_validate_json(o["output"]) for o in outputs],
                terminal=None if text is None else _TERMINAL.validate_json(text),
                updated_at=row["updated_at"],
            )
        except (ValidationError, ValueError) as exc:
            raise JournalError(f"unreadable entry {row['task_id']}: {exc}") from exc


def _key(task: TaskRef) -> tuple[str, int]:
    return (task.task_id, task.attempt)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each private to the owner (0700)."""
    for d in reversed([d for d in (directory, *directory.parents) if not d.exists()]):
        d.mkdir(mode=0o700, exist_ok=True)
        d.chmod(0o700)  # mkdir's mode is filtered by the umask; be exact


def _open_or_replace(path: Path) -> sqlite3.Connection:
    """Open the journal; if the file is not one, move it aside and start a fresh one."""
    try:
        return _open(path)
    except _NotAJournalError as exc:
        reason: Exception = exc
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode not in _NOT_A_JOURNAL:
            raise  # busy, locked, I/O: the file may be fine, so keep it
        reason = exc
    _move_aside(path, reason)
    return _open(path)


def _open(path: Path) -> sqlite3.Connection:
    """Open (creating it 0600) and check the journal; the connection is closed on failure."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path.chmod(0o600)
    db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    try:
        _prepare(db)
    except BaseException:
        db.close()
        raise
    db.row_factory = sqlite3.Row
    return db


def _prepare(db: sqlite3.Connection) -> None:
    """Check the file is a journal of this schema (creating it in an empty file); tune it."""
    if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
        raise _NotAJournalError("quick_check failed")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version == 0 and not tables:
        db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    elif version != SCHEMA_VERSION or not {"tasks", "outputs"} <= tables:
        raise _NotAJournalError(f"schema version {version}, tables {sorted(tables)}")
    if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
        raise sqlite3.OperationalError("cannot switch the journal to WAL mode")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")


def _move_aside(path: Path, reason: Exception) -> None:
    """Rename an invalid journal and its WAL files to ``<name>.corrupt-<unix time>``."""
    suffix = f".corrupt-{int(time.time())}"
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if part.exists():
            part.rename(part.with_name(part.name + suffix))
    log = logs.get_logger("agent.journal")
    log.warning("journal_moved_aside", path=str(path), suffix=suffix, error=str(reason))
