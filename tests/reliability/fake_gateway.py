"""A scriptable protocol-v1 gateway and a tiny presigned-URL file server, for hostile tests.

:class:`FakeGateway` is a real ``websockets`` server on loopback (subprotocol
``cyberun.agent.v1``) that a REAL agent process connects to. It reads each connection's
``hello``, answers a valid ``welcome`` (unless ``hold_welcome`` is set, so a test can speak
before it), and records every frame the agent sends and every close code the agent sends.
Everything else it says is up to the test: :meth:`FakeGateway.send` pushes any text or binary
frame, valid or not. It runs its own event loop in a thread, so tests stay synchronous and
can block on the agent's log at the same time.

:class:`FileServer` stands in for object storage: ``GET /files/<name>`` serves what the test
put there, ``PUT /uploads/<name>`` keeps the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

SUBPROTOCOL = "cyberun.agent.v1"
TS = "2030-01-01T00:00:00Z"
"""A valid RFC 3339 stamp (in the future, so it also serves as a lease expiry)."""


def welcome_for(agent_id: str, ident: str = "welcome", **extra: Any) -> dict[str, Any]:
    """A valid ``welcome`` for ``agent_id``."""
    return {
        "type": "welcome",
        "id": ident,
        "ts": TS,
        "agent_id": agent_id,
        "session_id": "fake-session",
        "heartbeat_interval_s": 1.0,
        "lease_ttl_s": 60.0,
        "server_time": TS,
        "resume": [],
        "pools": ["team"],
        **extra,
    }


@dataclass
class Received:
    """One frame the agent sent: which connection (1, 2, …) and the decoded message."""

    connection: int
    message: dict[str, Any]


@dataclass
class FakeGateway:
    """See the module docstring."""

    hold_welcome: bool = False
    """Do not answer the next ``hello`` with a ``welcome`` (the test sends one itself)."""
    port: int = 0
    connections: int = 0
    closes: queue.Queue[tuple[int, int | None]] = field(default_factory=queue.Queue)
    """(connection, close code the agent sent, or ``None`` when none arrived)."""
    seen: list[Received] = field(default_factory=list)
    matched_at: int = -1
    """Index in :attr:`seen` of the frame :meth:`wait_for` returned last."""
    _inbox: queue.Queue[Received] = field(default_factory=queue.Queue)
    _loop: asyncio.AbstractEventLoop | None = None
    _ws: ServerConnection | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The gateway URL to configure the agent with (it derives ``/agent/v1/ws``)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ thread

    @contextmanager
    def running(self) -> Iterator[FakeGateway]:
        """Serve in a background thread until the block ends."""
        thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the fake gateway did not start")
        try:
            yield self
        finally:
            assert self._loop is not None
            assert self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            thread.join(10)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            max_size=16 * 1024 * 1024,
            ping_interval=None,
        ) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        self._ws = ws
        try:
            async for frame in ws:
                message = json.loads(frame)
                self._inbox.put(Received(number, message))
                if message.get("type") == "hello" and not self.hold_welcome:
                    await ws.send(json.dumps(welcome_for(message["agent_id"])))
        except ConnectionClosed:
            pass
        finally:
            self.closes.put((number, _close_code(ws)))

    # ------------------------------------------------------------------ test side

    def send(self, frame: str | bytes) -> None:
        """Send one frame on the current connection (text for ``str``, binary for ``bytes``)."""
        ws, loop = self._ws, self._loop
        assert ws is not None, "no agent connected"
        assert loop is not None
        asyncio.run_coroutine_threadsafe(ws.send(frame), loop).result(10)

    def send_json(self, message: dict[str, Any]) -> None:
        """Send one JSON text frame."""
        self.send(json.dumps(message))

    def wait_for(
        self, match: Callable[[Received], bool], timeout: float = 20, since: int = 0
    ) -> Received:
        """The first frame from index ``since`` of :attr:`seen` that ``match`` accepts."""
        for index in range(since, len(self.seen)):
            if match(self.seen[index]):
                self.matched_at = index
                return self.seen[index]
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                received = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            self.seen.append(received)
            if match(received):
                self.matched_at = len(self.seen) - 1
                return received
        kinds = [r.message.get("type") for r in self.seen[since:]]
        raise AssertionError(f"no matching frame from the agent within {timeout}s: {kinds}")

    def wait_type(self, kind: str, timeout: float = 20, since: int = 0, **fields: Any) -> Received:
        """The first frame of type ``kind`` (with these field values) from index ``since``."""
        return self.wait_for(
            lambda r: (
                r.message.get("type") == kind
                and all(r.message.get(k) == v for k, v in fields.items())
            ),
            timeout,
            since,
        )

    def wait_close(self, timeout: float = 20) -> tuple[int, int | None]:
        """The next connection the agent closed, with the code it sent."""
        try:
            return self.closes.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the agent closed no connection within {timeout}s") from None


@dataclass
class FileServer:
    """See the module docstring."""

    files: dict[str, bytes] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        """The base URL."""
        return f"http://127.0.0.1:{self.port}"

    @contextmanager
    def running(self) -> Iterator[FileServer]:
        """Serve in a background thread until the block ends."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                del format, args

            def do_GET(self) -> None:
                owner.requests.append(f"GET {self.path}")
                body = owner.files.get(self.path.split("?", 1)[0].removeprefix("/files/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                owner.requests.append(f"PUT {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.uploads[self.path.split("?", 1)[0].removeprefix("/uploads/")] = body
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')  # noqa: S324
                self.send_header("Content-Length", "0")
                self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)


def _close_code(ws: ServerConnection) -> int | None:
    """The code of the close frame the agent sent (``None``: it sent none)."""
    received = ws.protocol.close_rcvd
    return received.code if received is not None else None
