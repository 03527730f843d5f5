"""Run a command as a managed process group: streamed output lines, and a stop that leaves nothing.

`ManagedProcess.start` runs ``argv`` (never through a shell) in a new session, so the child
leads its own process group, and so does every descendant that does not start a session of its
own. Output reaches a sink line by line as it arrives; only one capped partial line per pipe is
held, so the child never blocks on a full pipe.

Stopping is architecture.md habit 6: SIGINT to the group → up to the interrupt grace → SIGTERM
→ up to the term grace → SIGKILL; then SIGKILL again until no live member is left (zombies are
dead already; reaping them is their parent's or init's job). Waits are events (the leader's
exit), except that bounded probe. `GroupIdentity` (pgid + the leader's start time) survives an
agent restart, so `kill_orphan_group` ends a crashed agent's group and never a recycled pid.
Linux only (``/proc``).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self, cast

from agent.errors import AgentError
from agent.logs import get_logger

__all__ = [
    "GroupIdentity",
    "LineSink",
    "ManagedProcess",
    "ProcessStartError",
    "ProcessStopError",
    "Stream",
    "group_alive",
    "kill_orphan_group",
]

Stream = Literal["stdout", "stderr"]
LineSink = Callable[[Stream, str], None]

CONTEXT_GRACE = 2.0  # seconds per stage (SIGINT, SIGTERM) when leaving `async with` stops it
KILL_TIMEOUT = 10.0  # the leader must have exited this long after SIGKILL
REAP_TIMEOUT = 5.0  # bound of the "is the group empty yet" probe after SIGKILL
DRAIN_TIMEOUT = 5.0  # pipes still open this long after the group ended are closed by force
PROBE_STEP = 0.01  # seconds between two probes of the group

_log = get_logger(__name__)


class ProcessStartError(AgentError):
    """The command could not be started (missing, not executable, unusable cwd)."""


class ProcessStopError(AgentError):
    """The leader did not exit within `KILL_TIMEOUT` of SIGKILL (uninterruptible sleep)."""


@dataclass(frozen=True)
class GroupIdentity:
    """Finds a process group again after an agent restart, and tells a recycled pid apart.

    ``pgid`` is the leader's pid; ``start_time`` its start in clock ticks since boot
    (``/proc/<pid>/stat`` field 22), or -1 if it was gone before it was read (matches nothing).
    """

    pgid: int
    start_time: int


class _Stat(NamedTuple):
    state: str
    pgrp: int
    start_time: int


def _read_stat(pid: int) -> _Stat | None:
    """Return state, process group and start time of ``pid``; None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # comm (field 2) may hold spaces and ")"
    return _Stat(state=fields[0], pgrp=int(fields[2]), start_time=int(fields[19]))


def _leader(identity: GroupIdentity) -> _Stat | None:
    """Return the identified leader's stat (zombie or not); None if gone or pid recycled."""
    stat = _read_stat(identity.pgid)
    return stat if stat is not None and stat.start_time == identity.start_time else None


def group_alive(identity: GroupIdentity) -> bool:
    """Return whether the identified leader still runs (same pid and start time, no zombie)."""
    stat = _leader(identity)
    return stat is not None and stat.state != "Z"


def _has_live_member(pgid: int) -> bool:
    """Return whether a process of group ``pgid`` is not (yet) a zombie; scans ``/proc``."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            stat = _read_stat(int(entry.name)) if entry.name.isdigit() else None
            if stat is not None and stat.pgrp == pgid and stat.state not in {"Z", "X"}:
                return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to group ``pgid``; return False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _group_gone(pgid: int) -> bool:
    """SIGKILL what is left of group ``pgid``; return whether no live member remains."""
    return not _signal_group(pgid, signal.SIGKILL) or not _has_live_member(pgid)


def kill_orphan_group(identity: GroupIdentity, *, term_grace: float) -> bool:
    """End a crashed agent's group if it still runs; return whether something was killed.

    Only a group whose leader still exists with the recorded start time is touched. SIGTERM to
    the group, up to ``term_grace`` for the leader to exit (a pidfd event), then SIGKILL until
    no live member is left (bounded by `REAP_TIMEOUT`). Blocking: run it before the event loop
    or through `asyncio.to_thread`.
    """
    try:
        pidfd: int | None = os.pidfd_open(identity.pgid)  # pins the process checked next
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd (old kernel, seccomp): probe instead
        pidfd = None
    try:
        if _leader(identity) is None or not _has_live_member(identity.pgid):
            return False
        if not _signal_group(identity.pgid, signal.SIGTERM):
            return False
        if pidfd is None:
            _poll(lambda: not group_alive(identity), term_grace)
        else:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)  # readable once the leader exited
            poller.poll(max(0, round(term_grace * 1000)))
        _poll(lambda: _group_gone(identity.pgid), REAP_TIMEOUT)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _poll(done: Callable[[], bool], timeout: float) -> None:
    """Probe ``done`` every `PROBE_STEP` until it holds or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(PROBE_STEP)


class _LineSplitter:
    """Turns one pipe's bytes into lines; holds at most one partial line, capped in size."""

    def __init__(self, stream: Stream, emit: LineSink, max_line: int) -> None:
        self._stream, self._emit, self._max_line = stream, emit, max_line
        self._cap = 4 * max_line + 4  # enough bytes to decode to more than max_line characters
        self._partial = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> None:
        """Emit every line ``data`` completes; keep the rest for the next chunk."""
        *complete, rest = data.split(b"\n")
        for piece in complete:
            self._append(piece)
            self._flush()
        self._append(rest)

    def close(self) -> None:
        """Emit a last line that had no newline (end of the stream)."""
        if self._partial or self._overflow:
            self._flush()

    def _append(self, piece: bytes) -> None:
        room = self._cap - len(self._partial)
        self._overflow = self._overflow or len(piece) > room
        self._partial += piece[: max(room, 0)]

    def _flush(self) -> None:
        text = bytes(self._partial).removesuffix(b"\r").decode("utf-8", errors="replace")
        if self._overflow or len(text) > self._max_line:
            text = text[: self._max_line] + "…"
        self._partial.clear()
        self._overflow = False
        self._emit(self._stream, text)


class _GroupProtocol(asyncio.SubprocessProtocol):
    """Feeds both pipes to the sink; resolves ``exited`` (the status) and ``finished``.

    ``finished`` resolves once the leader exited and both pipes ended (or were closed), that is
    after the last line was delivered.
    """

    def __init__(self, on_line: LineSink, max_line: int) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._on_line = on_line
        self._transport: asyncio.SubprocessTransport | None = None
        self._pipes = {
            1: _LineSplitter("stdout", self._emit, max_line),
            2: _LineSplitter("stderr", self._emit, max_line),
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._pipes[fd].feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:  # noqa: ARG002
        self._pipes[fd].close()

    def process_exited(self) -> None:
        status = self._transport.get_returncode() if self._transport else None
        if status is not None and not self.exited.done():
            self.exited.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        if self._transport is not None:
            self._transport.close()  # exited and both pipes ended: only marks it closed
        if not self.finished.done():
            self.finished.set_result(None)

    def _emit(self, stream: Stream, line: str) -> None:
        try:
            self._on_line(stream, line)
        except Exception:  # noqa: BLE001 - a sink's bug must not stop draining; logged with trace
            _log.exception("output line sink raised; line dropped", stream=stream)


class ManagedProcess:
    """One running command and its process group (see the module docstring).

    Owns the group: `stop`, or leaving ``async with``, ends every member. Use it from the event
    loop that started it.
    """

    def __init__(self, transport: asyncio.SubprocessTransport, protocol: _GroupProtocol) -> None:
        """Wrap a started transport; use `start` instead."""
        self._transport, self._protocol = transport, protocol
        pid = transport.get_pid()
        stat = _read_stat(pid)
        self._identity = GroupIdentity(pgid=pid, start_time=stat.start_time if stat else -1)
        self._group_done = False
        self._stop_lock = asyncio.Lock()

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_line: LineSink,
        max_line: int = 4096,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session and process group, stdin from /dev/null.

        ``env`` is the child's whole environment. ``on_line`` runs on the event loop for every
        output line (UTF-8 with replacement, a trailing LF or CR LF stripped, cut to
        ``max_line`` characters plus "…"); it must not block; if it raises, that is logged and
        the line dropped. Raises `ProcessStartError` when the executable is missing or not
        executable, or ``cwd`` is unusable.
        """
        if not argv or max_line < 1:
            raise ProcessStartError(f"cannot start {list(argv)!r}: empty, or max_line < 1")
        try:
            transport, protocol = await asyncio.get_running_loop().subprocess_exec(
                lambda: _GroupProtocol(on_line, max_line),
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            culprit = f" ({exc.filename})" if exc.filename else ""
            raise ProcessStartError(
                f"cannot start {argv[0]!r} in {str(cwd)!r}: {exc.strerror or exc}{culprit}"
            ) from exc
        return cls(transport, protocol)

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group id."""
        return self._identity.pgid

    @property
    def identity(self) -> GroupIdentity:
        """What to persist to find (and end) the group after an agent restart."""
        return self._identity

    @property
    def returncode(self) -> int | None:
        """The leader's exit status once it exited (negative: killed by that signal)."""
        return self._protocol.exited.result() if self._protocol.exited.done() else None

    async def wait(self) -> int:
        """Wait for the leader's exit and the end of both pipes; return the exit status.

        Cancelling the wait leaves the process alone. A descendant holding the pipes open keeps
        this waiting until it exits or `stop` ends it.
        """
        await asyncio.shield(self._protocol.finished)
        return self._protocol.exited.result()

    async def stop(self, *, interrupt_grace: float, term_grace: float) -> int:
        """Stop the whole group (the escalation in the module docstring); return the status.

        Idempotent and safe after the leader exited (then only members left are SIGKILLed).
        Takes at most the graces plus `KILL_TIMEOUT`, `REAP_TIMEOUT` and `DRAIN_TIMEOUT`.
        Raises `ProcessStopError` if the leader survives SIGKILL. Cancelled, it stops where it
        was and a later call resumes (``async with`` shields it from cancellation).
        """
        async with self._stop_lock:
            if not self._protocol.exited.done():
                await self._escalate(interrupt_grace, term_grace)
            await self._kill_stragglers()
            await self._drain()
            return self._protocol.exited.result()

    async def __aenter__(self) -> Self:
        """Return the process; leaving the block stops it."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the group, `CONTEXT_GRACE` per stage; finish even if cancelled meanwhile."""
        await _finish_despite_cancellation(
            self.stop(interrupt_grace=CONTEXT_GRACE, term_grace=CONTEXT_GRACE)
        )

    async def _escalate(self, interrupt_grace: float, term_grace: float) -> None:
        for sig, grace in ((signal.SIGINT, interrupt_grace), (signal.SIGTERM, term_grace)):
            _signal_group(self.pid, sig)
            if await self._exits_within(grace):
                return
        _signal_group(self.pid, signal.SIGKILL)
        if not await self._exits_within(KILL_TIMEOUT):
            raise ProcessStopError(f"pid {self.pid} still runs {KILL_TIMEOUT} s after SIGKILL")

    async def _exits_within(self, seconds: float) -> bool:
        done, _ = await asyncio.wait({self._protocol.exited}, timeout=max(seconds, 0))
        return bool(done)

    async def _kill_stragglers(self) -> None:
        """SIGKILL the group until no live member is left, bounded by `REAP_TIMEOUT`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REAP_TIMEOUT
        while not self._group_done and not _group_gone(self.pid):
            if loop.time() >= deadline:
                _log.warning("process group survives SIGKILL", pgid=self.pid)
                return
            await asyncio.sleep(PROBE_STEP)
        self._group_done = True

    async def _drain(self) -> None:
        """Wait for both pipes to end; close them if a process outside the group holds them."""
        done, _ = await asyncio.wait({self._protocol.finished}, timeout=DRAIN_TIMEOUT)
        if not done:
            _log.warning("output pipes still open after the group ended", pgid=self.pid)
            self._transport.close()


async def _finish_despite_cancellation(work: Coroutine[Any, Any, object]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile, then re-raise that.

    The cancellation wins over an error of ``work``, which is then logged.
    """
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = exc
    error = task.exception()
    if cancelled is not None:
        if error is not None:
            _log.error("stopping the process failed during cancellation", exc_info=error)
        raise cancelled
    if error is not None:
        raise error
