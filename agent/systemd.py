"""systemd service notification (``sd_notify``) and the watchdog feed, without libsystemd.

The protocol: each notification is one datagram of newline-separated ``KEY=VALUE`` lines,
sent with ``sendto`` on an ``AF_UNIX``/``SOCK_DGRAM`` socket to the address systemd puts in
``$NOTIFY_SOCKET``. An address starting with ``@`` is in the abstract namespace (the ``@``
stands for a leading NUL byte); any other address must be an absolute filesystem path.

What the agent sends, and when (the application decides *when*; this module says *how*):

- ``READY=1`` + ``STATUS=…`` once connected to the gateway with healthy runtimes;
- ``STATUS=…`` whenever the one-line summary changes;
- ``STOPPING=1`` + ``STATUS=…`` when draining starts;
- ``WATCHDOG=1`` every half ``WatchdogSec`` while `WatchdogGate` says the loop is healthy,
  so systemd restarts an agent that is wedged, or cut off from the gateway for too long.

`Notifier` is inert when there is no notify socket (not started by systemd, or
``NotifyAccess=none``): every call is a no-op. Its methods never raise into the agent: a
failed send is logged once (until a send succeeds again) and dropped; the socket is
non-blocking, so a full receive queue drops a notification rather than stalling the loop.

This module reads no environment: the settings module passes ``NOTIFY_SOCKET``,
``WATCHDOG_USEC`` and ``WATCHDOG_PID`` in. `WatchdogGate` is pure (the caller passes the
time); `feed_watchdog` is the one loop, owned by the application's task group.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from agent.logs import get_logger, redact

__all__ = ["Notifier", "WatchdogGate", "feed_watchdog"]

_USEC_PER_SEC = 1_000_000


def _address(notify_socket: str) -> str | None:
    """The ``sendto`` address for *notify_socket*, or None when it is not an AF_UNIX address."""
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    return None


def _one_line(text: str) -> str:
    """A STATUS value: one line, without credentials."""
    return " ".join(redact(text).splitlines())


class Notifier:
    """Sends ``sd_notify`` messages to systemd; owns one datagram socket, opened lazily.

    Enabled when *notify_socket* is a non-empty AF_UNIX address. The watchdog is enabled
    when, in addition, *watchdog_usec* > 0 and *watchdog_pid* is None or *own_pid* (systemd
    sets ``WATCHDOG_PID`` to the process it watches; a child that inherited the variables
    must not feed its parent's watchdog). Methods never raise; after `close` they do nothing.
    """

    def __init__(
        self,
        notify_socket: str | None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
        *,
        own_pid: int,
    ) -> None:
        self._log: Any = get_logger("agent.systemd")
        self._notify_socket = notify_socket
        self._address = _address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            self._log.warning("sd_notify_unsupported_address", notify_socket=notify_socket)
        self.enabled: bool = self._address is not None
        watched = watchdog_pid is None or watchdog_pid == own_pid
        self.watchdog_interval: float | None = (
            watchdog_usec / _USEC_PER_SEC / 2
            if self.enabled and watchdog_usec is not None and watchdog_usec > 0 and watched
            else None
        )
        self._sock: socket.socket | None = None
        self._ready_sent = False
        self._failing = False
        self._closed = False

    def ready(self, status: str) -> None:
        """Send ``READY=1`` with ``STATUS=`` the first time; later calls only update STATUS."""
        if self._ready_sent:
            self.status(status)
            return
        self._ready_sent = self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """Send ``STATUS=`` *text* (one line; shown by ``systemctl status``)."""
        self._send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str) -> None:
        """Send ``STOPPING=1`` with ``STATUS=``: the agent has started to drain."""
        self._send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def watchdog(self) -> None:
        """Send ``WATCHDOG=1`` when the watchdog is enabled; otherwise do nothing."""
        if self.watchdog_interval is not None:
            self._send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later calls are no-ops. Idempotent."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> bool:
        """Send one datagram; return whether it was sent. Logs the first of a run of failures."""
        if self._address is None or self._closed:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message.encode(), self._address)
        except OSError as error:
            if not self._failing:
                self._failing = True
                self._log.warning(
                    "sd_notify_failed",
                    notify_socket=self._notify_socket,
                    message=message,
                    error=error,
                )
            return False
        self._failing = False
        return True


class WatchdogGate:
    """Decides whether the watchdog may be fed: the agent's loop is healthy (pure).

    Healthy while connected to the gateway, and for *disconnect_grace* seconds after a
    disconnect (reconnecting is normal); unhealthy before the first connection. The grace
    runs from the first `disconnected` after a `connected`: repeated disconnects (failed
    reconnects) do not extend it.
    """

    def __init__(self, disconnect_grace: float) -> None:
        if disconnect_grace < 0:
            raise ValueError(f"disconnect_grace must be >= 0, got {disconnect_grace}")
        self._grace = disconnect_grace
        self._connected = False
        self._disconnected_at: float | None = None

    def connected(self, now: float) -> None:
        """The gateway connection is up (at time *now*)."""
        del now  # part of the contract: every event carries its time
        self._connected = True
        self._disconnected_at = None

    def disconnected(self, now: float) -> None:
        """The gateway connection dropped at time *now*."""
        if self._connected:
            self._connected = False
            self._disconnected_at = now

    def healthy(self, now: float) -> bool:
        """Whether the watchdog may be fed at time *now*."""
        if self._connected:
            return True
        if self._disconnected_at is None:
            return False
        return now < self._disconnected_at + self._grace


async def feed_watchdog(notifier: Notifier, gate: WatchdogGate, clock: Callable[[], float]) -> None:
    """Every ``notifier.watchdog_interval`` seconds, send ``WATCHDOG=1`` if the gate is healthy.

    Checks (and possibly feeds) at once, then once per interval, until cancelled; returns at
    once when the watchdog is disabled. Raises nothing of its own; cancellation propagates.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        if gate.healthy(clock()):
            notifier.watchdog()
        await asyncio.sleep(interval)
