"""The agent's one outbound WebSocket: connect, feed the session, reconnect.

Owns the socket. Per connection there is exactly one reader (frames → ``Session.receive``),
one writer (the outbox → the socket) and one ticker (``Session.tick`` at
``Session.next_deadline``); the session's actions go to the task manager, which hands
frames back through :meth:`Connection.send`.

Retry policy, decided here and nowhere else:

- 401/403 at the handshake → :class:`~agent.errors.CredentialError` (fatal, no retry);
  426 → :class:`~agent.errors.ProtocolError` (fatal);
- refused connections, timeouts, 5xx, 429 and dropped sessions are retried with jittered
  exponential backoff (``stamina``); a session that stayed up for at least one heartbeat
  interval resets the backoff.

Cancelling :meth:`Connection.run` closes the socket with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import stamina
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agent import __version__
from agent.errors import ConnectionLostError, CredentialError, ProtocolError
from agent.protocol.actions import Action
from agent.protocol.codec import encode
from agent.protocol.messages import SUBPROTOCOL, CloseCode, Envelope
from agent.protocol.session import Session
from agent.settings import Settings

log = structlog.get_logger("agent.connection")
OUTBOX_SIZE = 10_000
CLOSE_TIMEOUT_S = 5.0
"""The longest the closing handshake may take (less when ``timeouts.ping_timeout_s`` is)."""
FATAL_STATUS = {401: CredentialError, 403: CredentialError, 426: ProtocolError}


class SessionEnded(Exception):  # noqa: N818 - control flow between attempts
    """A session that was healthy ended; reconnect with a fresh backoff."""


@dataclass
class Connection:
    """See the module docstring."""

    settings: Settings
    session: Session
    credential: str
    perform: Callable[[list[Action]], None]
    on_connected: Callable[[], None] = lambda: None
    on_disconnected: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.monotonic
    _outbox: asyncio.Queue[str | tuple[int, str]] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_SIZE)
    )
    _ws: ClientConnection | None = None
    connected: bool = False

    # ------------------------------------------------------------------ transport

    def send(self, message: Envelope) -> None:
        """Queue a frame; dropped when not connected (the session re-sends what matters)."""
        if self._ws is None:
            return
        try:
            self._outbox.put_nowait(encode(message))
        except asyncio.QueueFull:
            log.warning("outbox full; closing the connection to resynchronise")
            self.close(CloseCode.INTERNAL, "outbox full")

    def close(self, code: CloseCode, reason: str) -> None:
        """Close the current connection (the run loop reconnects)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait((int(code), reason))

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Stay connected until cancelled; raises only fatal errors."""
        timeouts = self.settings.timeouts
        while True:
            try:
                async for attempt in stamina.retry_context(
                    on=ConnectionLostError,
                    attempts=None,
                    timeout=None,
                    wait_initial=0.5,
                    wait_max=max(1.0, timeouts.heartbeat_s * 2),
                    wait_jitter=1.0,
                ):
                    with attempt:
                        await self._session_once()
            except SessionEnded:
                continue  # a healthy session ended: reconnect with the backoff reset

    async def _session_once(self) -> None:
        ws = await self._connect()
        started = self.clock()
        self._ws = ws
        self._outbox = asyncio.Queue(OUTBOX_SIZE)
        self.connected = True
        log.info("connected to the gateway", url=self.settings.agent_ws_url)
        try:
            self.perform(self.session.connected(self.clock()))
            self.on_connected()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._writer(ws))
                group.create_task(self._ticker())
                await self._reader(ws)
        except* _Dropped:
            pass
        finally:
            self._ws = None
            self.connected = False
            self.perform(self.session.disconnected(self.clock()))
            self.on_disconnected()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(CloseCode.GOING_AWAY), 2)
        healthy = self.clock() - started >= self.session.config.default_heartbeat_s
        log.info("disconnected from the gateway", healthy=healthy)
        if healthy:
            raise SessionEnded
        raise ConnectionLostError("the gateway connection dropped")

    async def _connect(self) -> ClientConnection:
        timeouts = self.settings.timeouts
        try:
            return await connect(
                self.settings.agent_ws_url,
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Bearer {self.credential}"},
                user_agent_header=f"cyberun-agent/{__version__}",
                open_timeout=timeouts.connect_s,
                ping_interval=timeouts.ping_interval_s,
                ping_timeout=timeouts.ping_timeout_s,
                # a peer silent past a ping timeout is not waited for again while closing
                close_timeout=min(CLOSE_TIMEOUT_S, timeouts.ping_timeout_s),
                max_size=self.settings.limits.max_frame_bytes,
                max_queue=64,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            fatal = FATAL_STATUS.get(status)
            if fatal is not None:
                body = (
                    exc.response.body.decode("utf-8", "replace")[:300] if exc.response.body else ""
                )
                raise fatal(
                    f"the gateway refused the connection with HTTP {status}: {body}"
                ) from None
            raise ConnectionLostError(f"handshake refused with HTTP {status}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLostError(f"cannot reach the gateway: {type(exc).__name__}") from exc

    async def _reader(self, ws: ClientConnection) -> None:
        """Feed every frame to the session; ends the connection when the peer closes."""
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                self.perform(self.session.receive(frame, self.clock()))
        raise _Dropped

    async def _writer(self, ws: ClientConnection) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, tuple):
                await ws.close(item[0], item[1][:120])
                raise _Dropped
            try:
                await ws.send(item)
            except ConnectionClosed:
                raise _Dropped from None

    async def _ticker(self) -> None:
        while True:
            deadline = self.session.next_deadline()
            delay = 1.0 if deadline is None else max(0.0, deadline - self.clock())
            await asyncio.sleep(min(delay, 1.0))  # a timer, re-armed from the session's deadline
            self.perform(self.session.tick(self.clock()))


class _Dropped(Exception):  # noqa: N818 - internal: ends a connection's task group
    pass
