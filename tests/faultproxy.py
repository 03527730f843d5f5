"""Network fault injection for tests: real loopback proxies that break links on command.

Two proxies, each an asyncio server in a background thread, driven from synchronous tests
(both are context managers; every control method returns once the change is in effect):

``FaultProxy`` — a TCP proxy to ``target_host:target_port``. Point a client at ``.url``
(``http://127.0.0.1:<port>``) and break its link:

- ``cut()`` resets every live connection now (RST both ways); returns how many.
- ``stall()`` / ``resume()`` stop / restart forwarding bytes, sockets left open (new
  connections are accepted and connected upstream, but nothing flows); bytes already read
  are delivered after ``resume()``.
- ``delay(seconds)`` adds that latency to every chunk, both directions.
- ``blackhole()`` accepts and reads everything, forwards and answers nothing, on new and
  existing connections. Those bytes are lost, so ``heal()`` resets every connection that
  lost bytes or was accepted meanwhile (a stream with a hole in it is useless).
- ``refuse()`` resets new connections at once (existing ones carry on).
- ``heal()`` ends every fault (resume, no delay, no black hole, no refusal).

``HttpFaultProxy`` — an HTTP/1.1 proxy (one request per connection, ``Content-Length``
bodies) for object storage: ``inject(fault, times=N, method=..., path=...)`` makes the
next ``N`` matching requests (``times=None``: all of them) suffer ``fault``:

- ``Respond`` — answer without forwarding (``status(500)``, ``status(503, retry_after=1)``,
  ``expired()``: 403 ``<Code>AccessDenied</Code>`` "Request has expired", like S3);
- ``ResetRequest(after)`` — forward the head and ``after`` body bytes, then reset both
  sides (the server sees a truncated body and stores nothing);
- ``ResetResponse(body_bytes)`` — forward the whole request, then reset the client after
  ``body_bytes`` bytes of the response body, or before any byte of the response when None
  (the server did the work; its answer is lost);
- ``Trickle(chunk, interval_s)`` — forward both bodies ``chunk`` bytes at a time with a
  pause between chunks (a slow link).

Counters (``stats``): connections and faults injected by kind (``FaultProxy``); requests,
requests per method, faults by kind and a log of ``(method, path, outcome)``
(``HttpFaultProxy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")
CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024
CONTROL_TIMEOUT_S = 10.0
EXPIRED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><Resource>/</Resource></Error>"
)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s socket with an RST (SO_LINGER 0), not a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Server:
    """An asyncio server on loopback, run in a daemon thread; the base of both proxies."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        """Remember the target; nothing listens until ``start()`` (or ``with``)."""
        self.target = (target_host, target_port)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: where clients connect."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Listen on loopback (a free port unless one was given) and return self."""
        self._thread.start()
        self._server = self._run(
            asyncio.start_server(self._accept, "127.0.0.1", self._port, reuse_address=True)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        """Stop listening, reset every connection and stop the thread."""
        if self._server is None:
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CONTROL_TIMEOUT_S)
        self._loop.close()
        self._server = None

    def __enter__(self) -> Self:
        """Start."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the proxy's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    def _call(self, func: Callable[[], T]) -> T:
        """Run ``func`` on the proxy's loop (where all state lives) and return its result."""

        async def call() -> T:
            return func()

        return self._run(call())

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` (run on the loop: it must not call the proxy) until true."""
        deadline = time.monotonic() + timeout
        while not self._call(predicate):
            if time.monotonic() > deadline:
                raise AssertionError(f"proxy: not {what} within {timeout}s")
            time.sleep(0.02)  # a poll interval with a deadline: counters raise no events

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            _reset(writer)
        except asyncio.CancelledError:  # closing: end quietly (3.11's callback chokes on it)
            _reset(writer)
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


# ----------------------------------------------------------------------------- TCP


@dataclass(frozen=True)
class ProxyStats:
    """What a ``FaultProxy`` saw: connections accepted, live now, and faults injected.

    ``faults`` counts ``cut`` (connections reset by ``cut()``), ``refused`` (connections
    reset by ``refuse()``), and one per ``stall``, ``blackhole`` and ``delay`` command.
    """

    connections: int
    live: int
    faults: dict[str, int]
    bytes_up: int
    bytes_down: int


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client side, the upstream side and its two pumps."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tainted: bool = False  # bytes were dropped (black hole): unusable after a heal
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        _reset(self.client)
        _reset(self.upstream)


class FaultProxy(_Server):
    """A TCP proxy that cuts, stalls, delays, black-holes or refuses (module docstring)."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        """Proxy to ``target_host:target_port``; listen on ``port`` (0: a free one)."""
        super().__init__(target_host, target_port, port=port)
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._delay_s = 0.0
        self._blackhole = False
        self._refuse = False
        self._connections = 0
        self._faults: Counter[str] = Counter()
        self._bytes = {"up": 0, "down": 0}

    # ------------------------------------------------------------------ control

    def cut(self) -> int:
        """Reset every live connection now; return how many were reset."""

        def cut() -> int:
            links = list(self._links)
            for link in links:
                link.reset()
            self._links.clear()
            self._faults["cut"] += len(links)
            return len(links)

        return self._call(cut)

    def stall(self) -> None:
        """Stop forwarding bytes (sockets stay open, new connections too) until ``resume()``."""

        def stall() -> None:
            self._flowing.clear()
            self._faults["stall"] += 1

        self._call(stall)

    def resume(self) -> None:
        """Forward bytes again after ``stall()``."""
        self._call(self._flowing.set)

    def delay(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds`` (0: no delay)."""

        def delay() -> None:
            self._delay_s = seconds
            if seconds:
                self._faults["delay"] += 1

        self._call(delay)

    def blackhole(self) -> None:
        """Swallow every byte, on new and existing connections, and answer nothing."""

        def blackhole() -> None:
            self._blackhole = True
            self._faults["blackhole"] += 1

        self._call(blackhole)

    def refuse(self) -> None:
        """Reset new connections as soon as they are accepted."""

        def refuse() -> None:
            self._refuse = True

        self._call(refuse)

    def heal(self) -> None:
        """End every fault; connections that lost bytes to a black hole are reset."""

        def heal() -> None:
            self._blackhole = self._refuse = False
            self._delay_s = 0.0
            self._flowing.set()
            for link in [link for link in self._links if link.tainted]:
                link.reset()
                self._links.discard(link)

        self._call(heal)

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""

        def snapshot() -> ProxyStats:
            return ProxyStats(
                connections=self._connections,
                live=len(self._links),
                faults=dict(self._faults),
                bytes_up=self._bytes["up"],
                bytes_down=self._bytes["down"],
            )

        return self._call(snapshot)

    def wait_connections(self, count: int, timeout: float = 20) -> None:
        """Wait until at least ``count`` connections were accepted in total."""
        self.wait_until(lambda: self._connections >= count, timeout, f"{count} connections")

    def wait_bytes(self, total: int, timeout: float = 20) -> None:
        """Wait until at least ``total`` bytes were forwarded, both directions together."""
        self.wait_until(lambda: sum(self._bytes.values()) >= total, timeout, f"{total} bytes")

    def wait_faults(self, kind: str, count: int, timeout: float = 20) -> None:
        """Wait until the ``kind`` fault counter reached ``count``."""
        self.wait_until(lambda: self._faults[kind] >= count, timeout, f"{count} {kind}")

    # ------------------------------------------------------------------ forwarding

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        if self._refuse:
            self._faults["refused"] += 1
            _reset(writer)
            return
        link = _Link(client=writer)
        self._links.add(link)
        try:
            if self._blackhole:
                link.tainted = True
                await self._swallow(reader)
                return
            up_reader, link.upstream = await asyncio.open_connection(*self.target)
            link.pumps = [
                asyncio.create_task(self._pump(reader, link.upstream, link, "up")),
                asyncio.create_task(self._pump(up_reader, writer, link, "down")),
            ]
            done, _ = await asyncio.wait(link.pumps, return_when=asyncio.FIRST_EXCEPTION)
            if any(not pump.cancelled() and pump.exception() for pump in done):
                raise ConnectionResetError("one side of the link broke")
            if link in self._links:  # both sides ended with EOF: close gracefully
                self._links.discard(link)
                link.upstream.close()
        finally:
            if link in self._links:  # broken, or the proxy is closing: reset both sides
                self._links.discard(link)
                link.reset()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK):
            pass

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, way: str
    ) -> None:
        while data := await src.read(CHUNK):
            await self._flowing.wait()
            if self._blackhole:
                link.tainted = True
                continue
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            dst.write(data)
            await dst.drain()
            self._bytes[way] += len(data)
        if dst.can_write_eof():
            dst.write_eof()


# ----------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class HttpRequest:
    """A request as the HTTP proxy saw it (the path excludes the query string)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names


@dataclass(frozen=True)
class Respond:
    """Answer ``status`` with ``headers`` and ``body``, forwarding nothing."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    kind: str = ""

    @property
    def name(self) -> str:
        """The counter this fault increments."""
        return self.kind or str(self.status)


@dataclass(frozen=True)
class ResetRequest:
    """Forward the head and ``after`` body bytes, then reset both sides."""

    after: int = 0
    name: str = "reset_request"


@dataclass(frozen=True)
class ResetResponse:
    """Forward the request; reset the client after ``body_bytes`` of the answer's body.

    ``None``: reset before any byte of the answer (the work was done, the answer is lost).
    """

    body_bytes: int | None = None
    name: str = "reset_response"


@dataclass(frozen=True)
class Trickle:
    """Forward both bodies ``chunk`` bytes at a time, ``interval_s`` apart."""

    chunk: int = 1024
    interval_s: float = 0.05
    name: str = "trickle"


Fault = Respond | ResetRequest | ResetResponse | Trickle


def status(code: int, *, retry_after: float | None = None) -> Respond:
    """An error answer (500, 503…), with ``Retry-After`` when given."""
    headers = (("Retry-After", f"{retry_after:g}"),) if retry_after is not None else ()
    body = f"<Error><Code>Injected{code}</Code><Message>injected</Message></Error>".encode()
    return Respond(code, (("Content-Type", "application/xml"), *headers), body)


def expired() -> Respond:
    """S3's answer to an expired presigned URL: 403 ``AccessDenied`` "Request has expired"."""
    return Respond(403, (("Content-Type", "application/xml"),), EXPIRED_BODY, kind="expired")


@dataclass
class _Rule:
    fault: Fault
    remaining: int | None
    method: str | None
    path: re.Pattern[str] | None
    when: Callable[[HttpRequest], bool] | None

    def matches(self, request: HttpRequest) -> bool:
        return (
            (self.remaining is None or self.remaining > 0)
            and (self.method is None or self.method == request.method)
            and (self.path is None or self.path.search(request.path) is not None)
            and (self.when is None or self.when(request))
        )


@dataclass(frozen=True)
class HttpStats:
    """What an ``HttpFaultProxy`` saw.

    ``log`` holds ``(method, path, outcome)`` per request, ``outcome`` being the status
    forwarded back or the fault's name.
    """

    requests: int
    methods: dict[str, int]
    faults: dict[str, int]
    log: list[tuple[str, str, str]]


class HttpFaultProxy(_Server):
    """An HTTP proxy that fails chosen requests (module docstring)."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        """Proxy to ``target_host:target_port``; listen on ``port`` (0: a free one)."""
        super().__init__(target_host, target_port, port=port)
        self._rules: list[_Rule] = []
        self._requests = 0
        self._methods: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._log: list[tuple[str, str, str]] = []

    def inject(
        self,
        fault: Fault,
        *,
        times: int | None = 1,
        method: str | None = None,
        path: str | None = None,
        when: Callable[[HttpRequest], bool] | None = None,
    ) -> None:
        """Apply ``fault`` to the next ``times`` requests (None: all) that match.

        ``method`` must equal the request's, ``path`` is a regular expression searched in
        its path, ``when`` any further predicate (run on the proxy's thread). The oldest
        matching rule applies; a request matching none is forwarded as is.
        """
        rule = _Rule(fault, times, method, re.compile(path) if path else None, when)
        self._call(lambda: self._rules.append(rule))

    def heal(self) -> None:
        """Drop every rule: forward everything."""
        self._call(self._rules.clear)

    def pending(self) -> int:
        """How many injected faults are still to happen (-1: a rule without a limit)."""

        def pending() -> int:
            if any(rule.remaining is None for rule in self._rules):
                return -1
            return sum(rule.remaining or 0 for rule in self._rules)

        return self._call(pending)

    def wait_requests(self, count: int, timeout: float = 20) -> None:
        """Wait until at least ``count`` requests were handled to the end (logged)."""
        self.wait_until(lambda: len(self._log) >= count, timeout, f"{count} requests handled")

    @property
    def stats(self) -> HttpStats:
        """A snapshot of the counters."""

        def snapshot() -> HttpStats:
            return HttpStats(
                self._requests, dict(self._methods), dict(self._faults), list(self._log)
            )

        return self._call(snapshot)

    # ------------------------------------------------------------------ serving

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            raise ValueError("request head too large")
        request, length = _parse(head)
        self._requests += 1
        self._methods[request.method] += 1
        rule = next((r for r in self._rules if r.matches(request)), None)
        fault = rule.fault if rule is not None else None
        if rule is not None and rule.remaining is not None:
            rule.remaining -= 1
        if fault is not None:
            self._faults[fault.name] += 1
        outcome = await self._serve(reader, writer, head, length, fault)
        self._log.append((request.method, request.path, outcome))

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: bytes,
        length: int,
        fault: Fault | None,
    ) -> str:
        if isinstance(fault, Respond):
            await reader.readexactly(length)
            writer.write(_response(fault))
            await writer.drain()
            return fault.name
        up_reader, upstream = await asyncio.open_connection(*self.target)
        try:
            upstream.write(_close_after(head))
            if isinstance(fault, ResetRequest):
                await _relay(reader, upstream, min(fault.after, length), None)
                _reset(upstream)
                _reset(writer)
                return fault.name
            await _relay(reader, upstream, length, fault if isinstance(fault, Trickle) else None)
            return await self._answer(up_reader, writer, fault)
        finally:
            upstream.close()

    async def _answer(
        self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: Fault | None
    ) -> str:
        answer_head = await up_reader.readuntil(b"\r\n\r\n")
        code = answer_head.split(b" ", 2)[1].decode("ascii", "replace")
        if isinstance(fault, ResetResponse):
            if fault.body_bytes is not None:
                writer.write(answer_head)
                writer.write(await up_reader.read(fault.body_bytes))
                await writer.drain()
            _reset(writer)
            return fault.name
        writer.write(answer_head)
        trickle = fault if isinstance(fault, Trickle) else None
        await _relay(up_reader, writer, None, trickle)
        return trickle.name if trickle else code


def _parse(head: bytes) -> tuple[HttpRequest, int]:
    """The request and its body length (``Content-Length``; chunked bodies are refused)."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ValueError("chunked request bodies are not supported")
    path, _, query = target.partition("?")
    return HttpRequest(method, path, query, headers), int(headers.get("content-length", "0"))


def _close_after(head: bytes) -> bytes:
    """The request head with ``Connection: close`` (so the answer ends at EOF)."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


def _response(fault: Respond) -> bytes:
    """An HTTP/1.1 answer for ``fault`` (the connection closes after it)."""
    reason = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}
    lines = [f"HTTP/1.1 {fault.status} {reason.get(fault.status, 'Injected')}"]
    lines += [f"{name}: {value}" for name, value in fault.headers]
    lines += [f"Content-Length: {len(fault.body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + fault.body


async def _relay(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    length: int | None,
    trickle: Trickle | None,
) -> None:
    """Copy ``length`` bytes (None: until EOF) from ``src`` to ``dst``, slowly if asked."""
    left = length
    chunk = trickle.chunk if trickle else CHUNK
    while left is None or left > 0:
        data = await src.read(chunk if left is None else min(chunk, left))
        if not data:
            if left:
                raise asyncio.IncompleteReadError(b"", left)
            return
        if trickle:
            await asyncio.sleep(trickle.interval_s)
        dst.write(data)
        await dst.drain()
        if left is not None:
            left -= len(data)
