"""The agent WebSocket endpoint ``/agent/v1/ws``: handshake, then one reader and one writer.

Handshake refusals are real HTTP statuses (``send_denial_response`` before ``accept``):
426 without the ``cyberun.agent.v1`` subprotocol, 401 for an unknown or revoked
credential, 403 for a credential kind not allowed here or a team at its ``max_agents``.
After ``accept`` the agent has ``handshake_s`` to send ``hello``.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from agent.protocol.codec import DecodeError, decode_agent, encode
from agent.protocol.messages import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    CloseCode,
    ErrorCode,
    Hello,
)
from gateway.agent_messages import AgentMessages
from gateway.auth import AuthError, Principal, authenticate
from gateway.hub import AgentConn, Hub, protocol_error
from gateway.store import new_id

log = structlog.get_logger("gateway.agent_ws")


class AgentEndpoint:
    """Serves ``/agent/v1/ws`` for one hub."""

    def __init__(self, hub: Hub) -> None:
        """Serve agents into ``hub``."""
        self.hub = hub
        self.messages = AgentMessages(hub)

    async def __call__(self, websocket: WebSocket) -> None:
        """Run one agent connection from handshake to close."""
        principal = await self._admit(websocket)
        if principal is None:
            return
        await websocket.accept(subprotocol=SUBPROTOCOL)
        hello = await self._hello(websocket)
        if hello is None:
            return
        conn = AgentConn(
            team_id=principal.team_id,
            hello=hello,
            session_id=new_id("sess"),
            credential_kind=str(principal.kind),
        )
        self.hub.attach(conn)
        log.info("agent connected", agent=conn.key, credential_kind=conn.credential_kind)
        try:
            conn.send(self.hub.welcome(conn))
            await self._serve(websocket, conn)
        finally:
            self.hub.detach(conn)
            log.info("agent disconnected", agent=conn.key)

    async def _admit(self, websocket: WebSocket) -> Principal | None:
        """Check subprotocol, credential and quota; deny with an HTTP status if needed."""
        if SUBPROTOCOL not in websocket.scope.get("subprotocols", []):
            await _deny(websocket, 426, f"subprotocol {SUBPROTOCOL} required")
            return None
        store = self.hub.store
        try:
            principal = authenticate(
                websocket.headers.get("authorization"),
                None,
                surface="agent",
                lookup=store.credential_by_hash,
                jwt_key=self.hub.config.jwt_key,
            )
        except AuthError as exc:
            await _deny(websocket, exc.status, exc.message)
            return None
        team = store.team(principal.team_id)
        if self.hub.team_agent_count(team.id) >= team.max_agents:
            await _deny(websocket, 403, f"team reached max_agents ({team.max_agents})")
            return None
        return principal

    async def _hello(self, websocket: WebSocket) -> Hello | None:
        """Wait for a valid hello; close with the documented code otherwise."""
        timeout = self.hub.config.timeouts.handshake_s
        try:
            frame = await asyncio.wait_for(_receive(websocket), timeout)
        except TimeoutError:
            await websocket.close(CloseCode.HANDSHAKE_TIMEOUT, "no hello in time")
            return None
        except WebSocketDisconnect:
            return None
        try:
            message = decode_agent(frame, self.hub.config.max_frame_bytes)
        except DecodeError as exc:
            await _close_withprotocol_error(
                websocket, exc.code, exc.message, exc.re, CloseCode.PROTOCOL_ERROR
            )
            return None
        if not isinstance(message, Hello):
            await _close_withprotocol_error(
                websocket,
                ErrorCode.UNEXPECTED_MESSAGE,
                "hello first",
                message.id,
                CloseCode.PROTOCOL_ERROR,
            )
            return None
        if message.protocol != PROTOCOL_VERSION:
            await _close_withprotocol_error(
                websocket,
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol {message.protocol} not served here",
                message.id,
                CloseCode.UNSUPPORTED_VERSION,
            )
            return None
        return message

    async def _serve(self, websocket: WebSocket, conn: AgentConn) -> None:
        """Run the reader and the writer until either ends (each ending stops the other)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(_write(websocket, conn))
            try:
                await self._read(websocket, conn)
            finally:
                conn.close(CloseCode.NORMAL)  # lets the writer finish

    async def _read(self, websocket: WebSocket, conn: AgentConn) -> None:
        limit = self.hub.config.max_frame_bytes
        while True:
            try:
                frame = await _receive(websocket)
            except WebSocketDisconnect:
                return
            try:
                message = decode_agent(frame, limit)
            except DecodeError as exc:
                if exc.code is ErrorCode.TOO_LARGE:
                    conn.close(CloseCode.TOO_BIG)
                    return
                if exc.kind != "error" and '"error"' not in frame[:200]:
                    conn.send(protocol_error(exc.code, exc.message, exc.re))
                continue
            await self.messages.handle(conn, message)


async def _receive(websocket: WebSocket) -> str:
    """Receive one frame as text (binary frames are decoded; junk becomes a decode error)."""
    event = await websocket.receive()
    if event["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(event.get("code", 1000))
    text = event.get("text")
    if text is not None:
        return str(text)
    return bytes(event.get("bytes") or b"").decode("utf-8", "replace")


async def _write(websocket: WebSocket, conn: AgentConn) -> None:
    """Drain the connection's outbox; a close code in it ends the connection."""
    while True:
        item = await conn.outbox.get()
        try:
            if isinstance(item, CloseCode):
                await websocket.close(int(item))
                return
            await websocket.send_text(item)
        except (WebSocketDisconnect, RuntimeError):
            return  # the peer is gone; the reader sees the disconnect


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    body = {"error": {"code": "handshake_refused", "message": message}}
    await websocket.send_denial_response(JSONResponse(body, status_code=status))


async def _close_withprotocol_error(
    websocket: WebSocket, code: ErrorCode, message: str, re: str | None, close: CloseCode
) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_text(encode(protocol_error(code, message, re)))
        await websocket.close(int(close), message[:120])
