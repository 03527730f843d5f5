"""The agent's local HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics``, ``/status``.

Served on ``observe.listen`` (default ``127.0.0.1:9464``) by a small asyncio HTTP/1.1 server
(one request per connection; bounded request size and time), so probes and scrapers need
nothing from the agent's event loop but a few microseconds:

- ``GET /healthz``: 200 while the process runs (liveness);
- ``GET /readyz``: 200 when the agent can take work — connected, a runtime healthy, not every
  GPU unusable, not draining — else 503 with the reasons (readiness);
- ``GET /metrics``: the Prometheus text exposition (:mod:`agent.metrics`);
- ``GET /status``: the agent's state as JSON (``cyberun-agent status`` prints it).

With ``observe.token_file`` set, ``/metrics`` and ``/status`` need ``Authorization: Bearer
<token>`` (401 otherwise); binding beyond loopback requires it. ``/healthz`` and ``/readyz``
say no more than ok / not ok and stay open for probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.metrics import CONTENT_TYPE, Metrics

log = structlog.get_logger("agent.observe")
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 16 * 1024
_REASONS = {
    200: "OK",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Answer:
    """One HTTP response."""

    status: int
    body: bytes
    content_type: str = "application/json"


def json_answer(status: int, data: Any) -> Answer:
    """A JSON response."""
    return Answer(status, (json.dumps(data, indent=1) + "\n").encode())


@dataclass
class ObserveServer:
    """See the module docstring; :meth:`serve` runs until cancelled."""

    host: str
    port: int
    metrics: Metrics
    readiness: Callable[[], list[str]]
    """Why the agent is not ready (empty: ready)."""
    status: Callable[[], dict[str, Any]]
    token: str | None = None

    async def serve(self, started: Callable[[int], None] = lambda _: None) -> None:
        """Listen and answer until cancelled; ``started`` gets the bound port."""
        server = await asyncio.start_server(
            self._connection, self.host, self.port, limit=MAX_REQUEST_BYTES
        )
        port = int(server.sockets[0].getsockname()[1])
        log.info("observe endpoint listening", url=f"http://{self.host}:{port}")
        started(port)
        async with server:
            await server.serve_forever()

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        """The response to one request (pure: the tests and the server share it)."""
        if method not in {"GET", "HEAD"}:
            return json_answer(405, {"error": "only GET"})
        route = path.split("?", 1)[0]
        open_routes = {"/healthz": self._healthz, "/readyz": self._readyz}
        guarded = {"/metrics": self._metrics, "/status": self._status}
        if route in open_routes:
            return open_routes[route]()
        if route not in guarded:
            return json_answer(
                404, {"error": "no such path; try /healthz /readyz /metrics /status"}
            )
        if not self._authorized(headers.get("authorization", "")):
            return json_answer(401, {"error": "Authorization: Bearer <token> required"})
        return guarded[route]()

    @staticmethod
    def _healthz() -> Answer:
        return json_answer(200, {"status": "ok"})

    def _readyz(self) -> Answer:
        reasons = self.readiness()
        return json_answer(503 if reasons else 200, {"ready": not reasons, "reasons": reasons})

    def _metrics(self) -> Answer:
        return Answer(200, self.metrics.render(), CONTENT_TYPE)

    def _status(self) -> Answer:
        return json_answer(200, self.status())

    def _authorized(self, header: str) -> bool:
        if self.token is None:
            return True
        scheme, _, presented = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self.token.encode()
        )

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                method, path, headers = await _read_request(reader)
                try:
                    answer = self.answer(method, path, headers)
                except Exception:  # a bug in a status callback must not kill the endpoint
                    log.exception("observe request failed", path=path)
                    answer = json_answer(503, {"error": "internal error"})
                await _write(writer, answer, head_only=method == "HEAD")
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a slow, malformed or vanished client: nothing to answer
        except asyncio.LimitOverrunError:
            with contextlib.suppress(ConnectionError):
                await _write(writer, json_answer(400, {"error": "request too large"}))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Request line and headers (names lower-cased); ``ValueError`` when malformed."""
    line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request line")
    headers: dict[str, str] = {}
    for _ in range(100):
        raw = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        if not raw:
            return parts[0], parts[1], headers
        name, sep, value = raw.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    raise ValueError("too many headers")


async def _write(writer: asyncio.StreamWriter, answer: Answer, *, head_only: bool = False) -> None:
    reason = _REASONS.get(answer.status, "")
    head = (
        f"HTTP/1.1 {answer.status} {reason}\r\nContent-Type: {answer.content_type}\r\n"
        f"Content-Length: {len(answer.body)}\r\nCache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + (b"" if head_only else answer.body))
    await writer.drain()
