"""Managed process groups: streamed lines, exit statuses, the stop escalation, no orphans."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from agent.runtimes import process
from agent.runtimes.process import (
    GroupIdentity,
    ManagedProcess,
    ProcessStartError,
    Stream,
    group_alive,
    kill_orphan_group,
)

HANG_GUARD = 20.0  # seconds; only a broken implementation waits this long

# Prints "ready", then waits; the default SIGINT handling (KeyboardInterrupt) ends it.
SLEEPER = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(1)"

# Appends the name of each SIGINT/SIGTERM it gets to argv[1]; exits 0 on SIGINT.
POLITE = """
import signal, sys
def on(sig, frame):
    with open(sys.argv[1], "a") as out:
        out.write(signal.Signals(sig).name + "\\n")
    if sig == signal.SIGINT:
        sys.exit(0)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGTERM, on)
print("ready", flush=True)
while True:
    signal.pause()
"""

# Ignores SIGINT and SIGTERM (says so on stdout); only SIGKILL ends it.
STUBBORN = """
import signal, time
def on(sig, frame):
    print("got", signal.Signals(sig).name, flush=True)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGTERM, on)
print("ready", flush=True)
while True:
    time.sleep(1)
"""

# A leader that dies of SIGINT/SIGTERM, and a stubborn grandchild in the same group.
WITH_GRANDCHILD = f"""
import signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {STUBBORN!r}])
print("grandchild", child.pid, flush=True)
signal.pause()
"""


class Lines:
    """An output sink that records lines and lets a test await one (with a hang guard)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Stream, str]] = []
        self._arrived = asyncio.Event()

    def __call__(self, stream: Stream, line: str) -> None:
        self.seen.append((stream, line))
        self._arrived.set()

    def of(self, stream: Stream) -> list[str]:
        """Return the lines of one stream, in order."""
        return [line for name, line in self.seen if name == stream]

    async def first(self, prefix: str) -> str:
        """Return the first line starting with ``prefix``, waiting for it if need be."""
        async with asyncio.timeout(HANG_GUARD):
            while True:
                found = [line for _, line in self.seen if line.startswith(prefix)]
                if found:
                    return found[0]
                self._arrived.clear()
                await self._arrived.wait()


async def start(
    script: str, sink: Lines, *args: str, cwd: Path | None = None, max_line: int = 4096
) -> ManagedProcess:
    """Start ``python -c script args`` as a managed process."""
    return await ManagedProcess.start(
        [sys.executable, "-c", script, *args],
        cwd=cwd or Path.cwd(),
        env=dict(os.environ),
        on_line=sink,
        max_line=max_line,
    )


def running(pid: int) -> bool:
    """Return whether ``pid`` exists and is not a zombie (an unreaped corpse is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def start_time(pid: int) -> int:
    """Return field 22 of ``/proc/<pid>/stat``, parsed independently of the module."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def read_lines(pipe: IO[bytes], count: int) -> list[str]:
    """Read ``count`` lines from a child's pipe, failing instead of hanging."""
    data = b""
    deadline = time.monotonic() + HANG_GUARD
    while data.count(b"\n") < count:
        ready, _, _ = select.select([pipe], [], [], max(0, deadline - time.monotonic()))
        assert ready, f"fewer than {count} lines from the child: {data!r}"
        data += os.read(pipe.fileno(), 4096)
    return data.decode().splitlines()


@pytest.mark.asyncio
async def test_lines_arrive_in_order_per_stream() -> None:
    """Every stdout and stderr line reaches the sink, in order, named by its stream."""
    script = (
        "import sys\n"
        "for i in range(200):\n"
        "    print('out', i, flush=True)\n"
        "    print('err', i, file=sys.stderr, flush=True)\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    sink = Lines()
    proc = await start(script, sink)
    assert await asyncio.wait_for(proc.wait(), HANG_GUARD) == 0
    assert sink.of("stdout") == [f"out {i}" for i in range(200)] + ["no newline at the end"]
    assert sink.of("stderr") == [f"err {i}" for i in range(200)]


@pytest.mark.asyncio
async def test_huge_line_is_truncated() -> None:
    """A line longer than max_line arrives cut to max_line characters plus an ellipsis."""
    script = "import sys\nsys.stdout.write('x' * 1_000_000 + '\\r\\nshort\\n' + 'y' * 1000)"
    sink = Lines()
    proc = await start(script, sink, max_line=1000)
    assert await asyncio.wait_for(proc.wait(), HANG_GUARD) == 0
    assert sink.of("stdout") == ["x" * 1000 + "…", "short", "y" * 1000]


@pytest.mark.asyncio
async def test_invalid_utf8_is_replaced() -> None:
    """Bytes that are not UTF-8 become replacement characters instead of an error."""
    script = "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end\\n\\xe2\\x82\\xac\\n')"
    sink = Lines()
    proc = await start(script, sink)
    assert await asyncio.wait_for(proc.wait(), HANG_GUARD) == 0
    assert sink.of("stdout") == ["ok \ufffd\ufffd end", "€"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("pass", 0),
        ("raise SystemExit(3)", 3),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
    ],
)
async def test_exit_status(script: str, status: int) -> None:
    """wait() returns the exit code, negative when a signal killed the leader."""
    proc = await start(script, Lines())
    assert await asyncio.wait_for(proc.wait(), HANG_GUARD) == status
    assert proc.returncode == status


@pytest.mark.asyncio
async def test_sink_that_raises_does_not_stop_the_output() -> None:
    """A sink exception drops that line only; later lines still arrive and wait() returns."""
    sink = Lines()

    def flaky(stream: Stream, line: str) -> None:
        if line == "bad":
            raise ValueError(line)
        sink(stream, line)

    proc = await ManagedProcess.start(
        [sys.executable, "-c", "print('bad')\nprint('good')"],
        cwd=Path.cwd(),
        env=dict(os.environ),
        on_line=flaky,
    )
    assert await asyncio.wait_for(proc.wait(), HANG_GUARD) == 0
    assert sink.of("stdout") == ["good"]


@pytest.mark.asyncio
async def test_identity_names_a_new_session_and_its_leader() -> None:
    """The child leads its own session and group; identity holds its pid and start time."""
    sink = Lines()
    async with await start(SLEEPER, sink) as proc:
        await sink.first("ready")
        assert os.getsid(proc.pid) == os.getpgid(proc.pid) == proc.pid
        assert proc.identity == GroupIdentity(pgid=proc.pid, start_time=start_time(proc.pid))
        assert group_alive(proc.identity)
    assert not group_alive(proc.identity)


@pytest.mark.asyncio
async def test_child_that_handles_sigint_stops_at_the_interrupt_stage(tmp_path: Path) -> None:
    """A child exiting on SIGINT is stopped by it and never receives SIGTERM."""
    received = tmp_path / "signals"
    sink = Lines()
    proc = await start(POLITE, sink, str(received))
    await sink.first("ready")
    began = time.monotonic()
    assert await proc.stop(interrupt_grace=10, term_grace=10) == 0
    assert time.monotonic() - began < 5
    assert received.read_text(encoding="utf-8").split() == ["SIGINT"]


@pytest.mark.asyncio
async def test_stop_is_idempotent_and_safe_after_exit() -> None:
    """stop() after the exit, twice or concurrently, returns the same status."""
    proc = await start("raise SystemExit(3)", Lines())
    assert await asyncio.wait_for(proc.wait(), HANG_GUARD) == 3
    assert await proc.stop(interrupt_grace=1, term_grace=1) == 3
    both = proc.stop(interrupt_grace=1, term_grace=1), proc.stop(interrupt_grace=1, term_grace=1)
    assert list(await asyncio.gather(*both)) == [3, 3]


@pytest.mark.asyncio
async def test_stubborn_child_is_killed_after_both_graces() -> None:
    """A child ignoring SIGINT and SIGTERM gets both, then SIGKILL once the graces are over."""
    sink = Lines()
    proc = await start(STUBBORN, sink)
    await sink.first("ready")
    began = time.monotonic()
    assert await proc.stop(interrupt_grace=0.5, term_grace=0.5) == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - began < 3.0
    assert [line for line in sink.of("stdout") if line.startswith("got")] == [
        "got SIGINT",
        "got SIGTERM",
    ]


@pytest.mark.asyncio
async def test_stop_kills_grandchildren() -> None:
    """After stop(), a grandchild that outlived the leader's exit no longer runs."""
    sink = Lines()
    proc = await start(WITH_GRANDCHILD, sink)
    grandchild = int((await sink.first("grandchild")).split()[1])
    await sink.first("ready")  # the grandchild ignores SIGINT and SIGTERM from now on
    began = time.monotonic()
    assert await proc.stop(interrupt_grace=10, term_grace=10) == -signal.SIGINT
    assert time.monotonic() - began < 5  # the leader left at once; its group was SIGKILLed
    assert not running(grandchild)
    assert not group_alive(proc.identity)


@pytest.mark.asyncio
async def test_context_exit_on_exception_stops_the_group() -> None:
    """An exception inside ``async with`` stops the whole group and propagates."""
    sink = Lines()
    procs: list[ManagedProcess] = []

    async def body() -> None:
        async with await start(WITH_GRANDCHILD, sink) as proc:
            procs.append(proc)
            await sink.first("ready")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await body()
    grandchild = int((await sink.first("grandchild")).split()[1])
    assert procs[0].returncode == -signal.SIGINT
    assert not running(procs[0].pid)
    assert not running(grandchild)


@pytest.mark.asyncio
async def test_context_exit_on_cancellation_stops_the_group() -> None:
    """Cancelling the task inside ``async with`` stops the group and re-raises CancelledError."""
    sink = Lines()
    inside = asyncio.Event()
    procs: list[ManagedProcess] = []

    async def body() -> None:
        async with await start(WITH_GRANDCHILD, sink) as proc:
            procs.append(proc)
            await sink.first("ready")
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.wait_for(inside.wait(), HANG_GUARD)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, HANG_GUARD)
    grandchild = int((await sink.first("grandchild")).split()[1])
    assert procs[0].returncode == -signal.SIGINT
    assert not running(grandchild)


@pytest.mark.asyncio
async def test_second_cancellation_does_not_cut_the_cleanup_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancellation during the context's stop lets the escalation finish, then re-raises."""
    monkeypatch.setattr(process, "CONTEXT_GRACE", 0.3)
    sink = Lines()
    procs: list[ManagedProcess] = []

    async def body() -> None:
        async with await start(STUBBORN, sink) as proc:
            procs.append(proc)
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await sink.first("ready")
    task.cancel()
    await sink.first("got SIGINT")  # the context's stop() is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, HANG_GUARD)
    assert procs[0].returncode == -signal.SIGKILL
    assert "got SIGTERM" in sink.of("stdout")


@pytest.mark.asyncio
@pytest.mark.parametrize("problem", ["missing", "not executable", "missing cwd", "empty argv"])
async def test_unstartable_command_raises_process_start_error(tmp_path: Path, problem: str) -> None:
    """A missing or non-executable program, a missing cwd or no argv raises ProcessStartError."""
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\n", encoding="utf-8")
    plain.chmod(0o644)
    argv = {"missing": [str(tmp_path / "nope")], "not executable": [str(plain)], "empty argv": []}
    cwd = tmp_path / "gone" if problem == "missing cwd" else tmp_path
    with pytest.raises(ProcessStartError, match="cannot start"):
        await ManagedProcess.start(
            argv.get(problem, [sys.executable, "-c", "pass"]),
            cwd=cwd,
            env=dict(os.environ),
            on_line=Lines(),
        )


def test_kill_orphan_group_ends_a_crashed_agents_group() -> None:
    """A surviving group of a crashed agent (leader and grandchild) is found and killed."""
    with subprocess.Popen(
        [sys.executable, "-c", WITH_GRANDCHILD], stdout=subprocess.PIPE, start_new_session=True
    ) as survivor:
        assert survivor.stdout is not None
        lines = sorted(read_lines(survivor.stdout, 2))  # "grandchild <pid>", "ready"
        assert lines[1] == "ready"
        grandchild = int(lines[0].split()[1])
        identity = GroupIdentity(pgid=survivor.pid, start_time=start_time(survivor.pid))
        assert group_alive(identity)
        assert kill_orphan_group(identity, term_grace=10) is True
        assert survivor.wait(timeout=HANG_GUARD) == -signal.SIGTERM
        assert not group_alive(identity)
        assert not running(grandchild)
        assert kill_orphan_group(identity, term_grace=1) is False


def test_kill_orphan_group_spares_a_recycled_pid() -> None:
    """An identity whose start time does not match the pid's process touches nothing."""
    with subprocess.Popen(
        [sys.executable, "-c", "import sys\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    ) as other:
        recycled = GroupIdentity(pgid=other.pid, start_time=start_time(other.pid) + 1)
        assert not group_alive(recycled)
        assert kill_orphan_group(recycled, term_grace=1) is False
        assert running(other.pid)
        assert other.poll() is None
        other.communicate(timeout=HANG_GUARD)  # closes stdin: it exits on its own
        assert other.returncode == 0


def test_kill_orphan_group_ignores_a_dead_group() -> None:
    """The identity of a group that has exited is not alive and nothing is killed."""
    with subprocess.Popen(
        [sys.executable, "-c", "import sys\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    ) as gone:
        identity = GroupIdentity(pgid=gone.pid, start_time=start_time(gone.pid))
        assert group_alive(identity)
        gone.communicate(timeout=HANG_GUARD)
    assert not group_alive(identity)
    assert kill_orphan_group(identity, term_grace=1) is False
