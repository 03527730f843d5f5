"""sd_notify over a real AF_UNIX datagram socket, the watchdog gate, and the watchdog feed.

A Unix datagram ``sendto`` lands in the receiver's queue before it returns, so "nothing was
sent" is checked with a non-blocking ``recv`` right after the call — no sleeping. Receives
that wait use socket timeouts (or ``asyncio.timeout``) only as hang guards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.systemd import Notifier, WatchdogGate, feed_watchdog

HANG_GUARD = 5.0  # seconds; a receive that takes this long means the datagram never came
PID = os.getpid()
DK = "dk-Zq8vR2mXk4T9pLw7Ny3B_Hc6"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a file in tmp_path, standing in for systemd."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(HANG_GUARD)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in the abstract namespace; yields it and its ``@name`` address."""
    name = f"cyberun-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(HANG_GUARD)
    yield sock, "@" + name
    sock.close()


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def _assert_nothing_queued(sock: socket.socket) -> None:
    previous = sock.gettimeout()
    sock.settimeout(0.0)  # non-blocking
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(previous)


def _drain(sock: socket.socket) -> None:
    previous = sock.gettimeout()
    sock.settimeout(0.0)  # non-blocking
    try:
        while True:
            sock.recv(4096)
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(previous)


# ---------------------------------------------------------------- the notifier


def test_messages_arrive_exactly_and_in_order(receiver: tuple[socket.socket, str]) -> None:
    """READY, STATUS, STOPPING and WATCHDOG arrive as exact datagrams, in the order sent."""
    sock, path = receiver
    notifier = Notifier(path, watchdog_usec=10_000_000, own_pid=PID)
    assert notifier.enabled
    notifier.ready("connected; 1 GPU")
    notifier.status("running 2 tasks")
    notifier.watchdog()
    notifier.stopping("draining: SIGTERM")
    notifier.close()
    assert [_recv(sock) for _ in range(4)] == [
        b"READY=1\nSTATUS=connected; 1 GPU",
        b"STATUS=running 2 tasks",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=draining: SIGTERM",
    ]
    _assert_nothing_queued(sock)


def test_ready_is_sent_once_then_only_status(receiver: tuple[socket.socket, str]) -> None:
    """A second ready() sends only the new STATUS, not READY=1 again."""
    sock, path = receiver
    notifier = Notifier(path, own_pid=PID)
    notifier.ready("connected")
    notifier.ready("reconnected")
    assert _recv(sock) == b"READY=1\nSTATUS=connected"
    assert _recv(sock) == b"STATUS=reconnected"
    notifier.close()


def test_abstract_namespace_address(abstract_receiver: tuple[socket.socket, str]) -> None:
    """An address starting with '@' reaches a socket bound in the abstract namespace."""
    sock, address = abstract_receiver
    notifier = Notifier(address, watchdog_usec=2_000_000, own_pid=PID)
    notifier.ready("connected")
    notifier.watchdog()
    notifier.stopping("draining")
    assert [_recv(sock) for _ in range(3)] == [
        b"READY=1\nSTATUS=connected",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=draining",
    ]
    notifier.close()


def test_status_is_one_line_and_redacted(receiver: tuple[socket.socket, str]) -> None:
    """STATUS never spans lines (which would inject keys) and never shows a credential."""
    sock, path = receiver
    notifier = Notifier(path, own_pid=PID)
    notifier.status(f"error\nREADY=1 with key {DK}")
    assert _recv(sock) == b"STATUS=error READY=1 with key dk-***"
    notifier.close()


def test_inert_without_a_socket() -> None:
    """Without NOTIFY_SOCKET every call is a no-op: no error, no log, no watchdog."""
    with capture_logs() as logs:
        for value in (None, ""):
            notifier = Notifier(value, watchdog_usec=1_000_000, own_pid=PID)
            assert not notifier.enabled
            assert notifier.watchdog_interval is None
            notifier.ready("connected")
            notifier.status("idle")
            notifier.watchdog()
            notifier.stopping("draining")
            notifier.close()
    assert logs == []


def test_missing_socket_path_is_logged_once(tmp_path: Path) -> None:
    """Sending to a path that does not exist raises nothing and logs one warning."""
    notifier = Notifier(str(tmp_path / "absent.sock"), watchdog_usec=1_000_000, own_pid=PID)
    with capture_logs() as logs:
        notifier.ready("connected")
        notifier.status("idle")
        notifier.watchdog()
        notifier.stopping("draining")
    notifier.close()
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("sd_notify_failed", "warning")
    ]
    assert "absent.sock" in logs[0]["notify_socket"]


def test_failure_log_rearms_after_a_success(tmp_path: Path) -> None:
    """After a send succeeds again, the next failure is logged again; READY=1 is retried."""
    path = tmp_path / "notify.sock"
    notifier = Notifier(str(path), own_pid=PID)
    with capture_logs() as logs:
        notifier.ready("connected")  # no listener yet: fails, logged
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(HANG_GUARD)
            notifier.ready("connected")
            assert _recv(sock) == b"READY=1\nSTATUS=connected"
        path.unlink()
        notifier.status("idle")  # listener gone: fails again, logged again
        notifier.status("idle")
    notifier.close()
    assert [entry["event"] for entry in logs] == ["sd_notify_failed", "sd_notify_failed"]


def test_full_receive_queue_drops_instead_of_blocking(receiver: tuple[socket.socket, str]) -> None:
    """When systemd does not read, sends fail fast (non-blocking), are dropped and logged once."""
    sock, path = receiver
    notifier = Notifier(path, own_pid=PID)
    with capture_logs() as logs:
        for number in range(2000):  # far beyond a Unix datagram queue
            notifier.status(f"update {number}")
    notifier.close()
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]
    assert _recv(sock) == b"STATUS=update 0"


def test_unsupported_address_is_inert_and_logged() -> None:
    """A NOTIFY_SOCKET that is neither a path nor '@name' disables the notifier, with one log."""
    with capture_logs() as logs:
        notifier = Notifier("vsock:2:1234", watchdog_usec=1_000_000, own_pid=PID)
        notifier.ready("connected")
        notifier.watchdog()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert [entry["event"] for entry in logs] == ["sd_notify_unsupported_address"]


def test_calls_after_close_send_nothing(receiver: tuple[socket.socket, str]) -> None:
    """close() is idempotent and every later call is a no-op."""
    sock, path = receiver
    notifier = Notifier(path, watchdog_usec=1_000_000, own_pid=PID)
    notifier.status("before")
    notifier.close()
    notifier.close()
    notifier.ready("after")
    notifier.watchdog()
    assert _recv(sock) == b"STATUS=before"
    _assert_nothing_queued(sock)


# ---------------------------------------------------------------- watchdog enablement


def test_watchdog_interval_is_half_of_watchdog_sec(receiver: tuple[socket.socket, str]) -> None:
    """WATCHDOG_USEC=30s gives a 15 s interval, for WATCHDOG_PID unset or this process."""
    _, path = receiver
    for pid in (None, PID):
        notifier = Notifier(path, watchdog_usec=30_000_000, watchdog_pid=pid, own_pid=PID)
        assert notifier.watchdog_interval == 15.0
        notifier.close()


def test_watchdog_disabled_for_another_pid(receiver: tuple[socket.socket, str]) -> None:
    """WATCHDOG_PID naming another process disables the watchdog but not notifications."""
    sock, path = receiver
    notifier = Notifier(path, watchdog_usec=1_000_000, watchdog_pid=PID + 1, own_pid=PID)
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.watchdog()
    notifier.status("fence")
    assert _recv(sock) == b"STATUS=fence"
    _assert_nothing_queued(sock)
    notifier.close()


def test_watchdog_disabled_without_a_positive_usec(receiver: tuple[socket.socket, str]) -> None:
    """WATCHDOG_USEC unset or 0 disables the watchdog: watchdog() sends nothing."""
    sock, path = receiver
    for usec in (None, 0):
        notifier = Notifier(path, watchdog_usec=usec, own_pid=PID)
        assert notifier.watchdog_interval is None
        notifier.watchdog()
        notifier.close()
    _assert_nothing_queued(sock)


# ---------------------------------------------------------------- the gate (pure)


def test_gate_unhealthy_before_the_first_connect() -> None:
    """Before any connection the watchdog is not fed, even after a disconnect event."""
    gate = WatchdogGate(disconnect_grace=30.0)
    assert not gate.healthy(0.0)
    gate.disconnected(1.0)
    assert not gate.healthy(1.0)


def test_gate_healthy_while_connected() -> None:
    """While connected the gate is healthy at any time."""
    gate = WatchdogGate(disconnect_grace=0.0)
    gate.connected(5.0)
    assert gate.healthy(5.0)
    assert gate.healthy(1e9)


def test_gate_grace_after_a_disconnect() -> None:
    """After a disconnect the gate stays healthy for the grace, then turns unhealthy."""
    gate = WatchdogGate(disconnect_grace=30.0)
    gate.connected(0.0)
    gate.disconnected(100.0)
    assert gate.healthy(100.0)
    assert gate.healthy(129.9)
    assert not gate.healthy(130.0)


def test_gate_repeated_disconnects_do_not_extend_the_grace() -> None:
    """Failed reconnects reported as disconnects do not restart the grace."""
    gate = WatchdogGate(disconnect_grace=30.0)
    gate.connected(0.0)
    gate.disconnected(100.0)
    gate.disconnected(120.0)
    assert not gate.healthy(135.0)


def test_gate_reconnect_restores_health() -> None:
    """A reconnect after the grace makes the gate healthy again, with a fresh grace later."""
    gate = WatchdogGate(disconnect_grace=10.0)
    gate.connected(0.0)
    gate.disconnected(1.0)
    assert not gate.healthy(50.0)
    gate.connected(50.0)
    assert gate.healthy(50.0)
    gate.disconnected(60.0)
    assert gate.healthy(65.0)


def test_gate_rejects_a_negative_grace() -> None:
    """A negative disconnect grace is a programming error, rejected at construction."""
    with pytest.raises(ValueError, match="disconnect_grace"):
        WatchdogGate(disconnect_grace=-1.0)


# ---------------------------------------------------------------- feed_watchdog


class FakeClock:
    """A clock the test sets; counts reads so the test can wait for the feeder's ticks."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self._read = asyncio.Event()

    def __call__(self) -> float:
        self.reads += 1
        self._read.set()
        return self.now

    async def ticks(self, count: int) -> None:
        """Wait until the clock has been read *count* more times (one read per tick)."""
        target = self.reads + count
        async with asyncio.timeout(HANG_GUARD):
            while self.reads < target:
                self._read.clear()
                await self._read.wait()


async def _next_datagram(sock: socket.socket) -> bytes:
    async with asyncio.timeout(HANG_GUARD):
        return await asyncio.get_running_loop().sock_recv(sock, 4096)


@pytest.mark.asyncio
async def test_feed_watchdog_feeds_while_healthy_only(receiver: tuple[socket.socket, str]) -> None:
    """WATCHDOG=1 comes every interval while healthy, stops when unhealthy, resumes in grace."""
    sock, path = receiver
    sock.settimeout(0.0)  # non-blocking
    notifier = Notifier(path, watchdog_usec=100_000, own_pid=PID)
    assert notifier.watchdog_interval == pytest.approx(0.05)
    gate, clock = WatchdogGate(disconnect_grace=30.0), FakeClock()
    gate.connected(0.0)
    async with asyncio.TaskGroup() as group:
        feeder = group.create_task(feed_watchdog(notifier, gate, clock))
        started = time.monotonic()
        assert [await _next_datagram(sock) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        assert time.monotonic() - started >= 0.08  # three feeds span two intervals (0.1 s)

        gate.disconnected(0.0)
        clock.now = 31.0  # past the grace: unhealthy from the next tick on
        _drain(sock)
        await clock.ticks(3)
        _assert_nothing_queued(sock)

        clock.now = 0.0  # back inside the grace
        assert await _next_datagram(sock) == b"WATCHDOG=1"
        feeder.cancel()
    assert feeder.cancelled()
    notifier.close()


@pytest.mark.asyncio
async def test_feed_watchdog_never_feeds_before_the_first_connect(
    receiver: tuple[socket.socket, str],
) -> None:
    """Before the gateway connection is up, ticks pass without a WATCHDOG=1."""
    sock, path = receiver
    notifier = Notifier(path, watchdog_usec=100_000, own_pid=PID)
    gate, clock = WatchdogGate(disconnect_grace=30.0), FakeClock()
    async with asyncio.TaskGroup() as group:
        feeder = group.create_task(feed_watchdog(notifier, gate, clock))
        await clock.ticks(3)
        _assert_nothing_queued(sock)
        feeder.cancel()
    notifier.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("watchdog_usec", "watchdog_pid", "socket_path"),
    [(100_000, PID + 1, True), (None, None, True), (100_000, None, False)],
    ids=["other-pid", "no-watchdog", "no-socket"],
)
async def test_feed_watchdog_returns_at_once_when_disabled(
    receiver: tuple[socket.socket, str],
    watchdog_usec: int | None,
    watchdog_pid: int | None,
    socket_path: bool,
) -> None:
    """With the watchdog disabled the feeder returns immediately without reading the clock."""
    sock, path = receiver
    notifier = Notifier(path if socket_path else None, watchdog_usec, watchdog_pid, own_pid=PID)
    gate, clock = WatchdogGate(disconnect_grace=30.0), FakeClock()
    gate.connected(0.0)
    async with asyncio.timeout(HANG_GUARD):
        await feed_watchdog(notifier, gate, clock)
    assert clock.reads == 0
    _assert_nothing_queued(sock)
    notifier.close()
