"""A bare WebSocket echo on the gateway's stack: the floor ``bench.dispatch`` is read against.

``python -m bench._echo`` serves ``/echo`` on a free loopback port with uvicorn
(``ws="websockets-sansio"``) and a Starlette WebSocket route, prints
``bench echo listening on ws://127.0.0.1:PORT/echo`` and runs until SIGTERM. Its listening socket
is created with ``IPPROTO_TCP``, so asyncio sets ``TCP_NODELAY`` on its connections.
:func:`echo_server` runs it as a child process; :func:`echo_rounds` measures round trips with
the ``websockets`` asyncio client (permessage-deflate on both sides, as agent and gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import IO

from websockets.asyncio.client import ClientConnection

from bench._common import ROOT, BenchError

ECHO_READY = "bench echo listening on "
ECHO_BYTES = 200
START_TIMEOUT_S = 60.0
ECHO_TIMEOUT_S = 10.0


def echo_server_main() -> None:
    """Serve a WebSocket echo on a free loopback port; print its URL; run until SIGTERM."""
    import socket  # noqa: PLC0415 - the child alone needs these

    import uvicorn  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.routing import WebSocketRoute  # noqa: PLC0415
    from starlette.websockets import WebSocket, WebSocketDisconnect  # noqa: PLC0415

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.send_text(await websocket.receive_text())

    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    app = Starlette(routes=[WebSocketRoute("/echo", echo)])
    config = uvicorn.Config(
        app, ws="websockets-sansio", log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    print(f"{ECHO_READY}ws://127.0.0.1:{port}/echo", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@contextlib.contextmanager
def echo_server() -> Iterator[str]:
    """Start the echo server process; yield its URL; stop it (SIGTERM, then SIGKILL)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench._echo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None  # noqa: S101 - stdout=PIPE
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"the echo server did not start in {START_TIMEOUT_S} s") from None
            if line.startswith(ECHO_READY):
                yield line[len(ECHO_READY) :].strip()
                return
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _echo_frame() -> str:
    """A ~200-byte JSON text frame, different each time (deflate cannot just repeat it)."""
    body = {"type": "echo", "id": uuid.uuid4().hex, "ts": time.time(), "pad": uuid.uuid4().hex}
    text = json.dumps(body)
    return text + " " * max(0, ECHO_BYTES - len(text))


async def echo_rounds(ws: ClientConnection, count: int) -> list[float]:
    """Send ``count`` frames one after another; return each round trip in seconds."""
    rtts: list[float] = []
    for _ in range(count):
        frame = _echo_frame()
        started = time.perf_counter()
        await ws.send(frame)
        answer = await asyncio.wait_for(ws.recv(), ECHO_TIMEOUT_S)
        rtts.append(time.perf_counter() - started)
        if answer != frame:
            raise BenchError("the echo server answered a different frame")
    return rtts


if __name__ == "__main__":
    echo_server_main()
