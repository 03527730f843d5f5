"""The fault-injection proxies (tests/faultproxy.py) against tiny local echo and HTTP servers."""

from __future__ import annotations

import http.server
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.faultproxy import (
    FaultProxy,
    HttpFaultProxy,
    ResetRequest,
    ResetResponse,
    Trickle,
    expired,
    status,
)

QUIET_S = 0.3  # how long "nothing arrives" is watched for


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Store(http.server.BaseHTTPRequestHandler):
    objects: dict[str, bytes] = {}  # noqa: RUF012 - shared by the handler instances on purpose
    truncated: list[str] = []  # noqa: RUF012

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        if len(body) < length:
            self.truncated.append(self.path)
            return
        self.objects[self.path] = body
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = self.objects.get(self.path, b"")
        self.send_response(200 if self.path in self.objects else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Silent."""


@pytest.fixture
def echo() -> Iterator[int]:
    """A threaded TCP echo server's port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def store() -> Iterator[int]:
    """A threaded HTTP server (PUT stores a body, GET returns it); its port."""
    _Store.objects, _Store.truncated = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _silent(sock: socket.socket) -> bool:
    """Whether nothing arrives for QUIET_S (an absence can only be watched for a while)."""
    sock.settimeout(QUIET_S)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def _broken(sock: socket.socket) -> bool:
    """Whether the connection was reset or closed by the proxy."""
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _refused(proxy: FaultProxy) -> bool:
    """Whether a new connection is reset (possibly before the connect call even returns)."""
    try:
        new = _connect(proxy)
    except ConnectionResetError:
        return True  # the reset raced the end of the handshake: refused all the same
    with new:
        return _broken(new)


def test_tcp_proxy_forwards_and_counts(echo: int) -> None:
    """Bytes flow both ways through the proxy and every connection is counted."""
    with FaultProxy("127.0.0.1", echo) as proxy, _connect(proxy) as a, _connect(proxy) as b:
        assert _roundtrip(a, b"hello") == b"hello"
        assert _roundtrip(b, b"x" * 200_000) == b"x" * 200_000
        stats = proxy.stats
        assert (stats.connections, stats.live) == (2, 2)
        assert stats.bytes_up == stats.bytes_down == 200_005


def test_cut_resets_live_connections_and_new_ones_work(echo: int) -> None:
    """cut() resets every live connection at once; the next connection is forwarded."""
    with FaultProxy("127.0.0.1", echo) as proxy, _connect(proxy) as sock:
        assert _roundtrip(sock, b"ping") == b"ping"
        assert proxy.cut() == 1
        assert _broken(sock)
        with _connect(proxy) as again:
            assert _roundtrip(again, b"pong") == b"pong"
        assert proxy.stats.faults == {"cut": 1}


def test_stall_holds_bytes_until_resume(echo: int) -> None:
    """While stalled nothing flows but the socket stays open; resume() delivers the bytes."""
    with FaultProxy("127.0.0.1", echo) as proxy, _connect(proxy) as sock:
        proxy.stall()
        sock.sendall(b"held")
        assert _silent(sock)
        proxy.resume()
        assert sock.recv(4) == b"held"


def test_delay_adds_latency_per_chunk(echo: int) -> None:
    """delay(s) slows each chunk in each direction by s."""
    with FaultProxy("127.0.0.1", echo) as proxy, _connect(proxy) as sock:
        proxy.delay(0.2)
        started = time.monotonic()
        assert _roundtrip(sock, b"slow") == b"slow"
        assert time.monotonic() - started >= 0.4
        proxy.heal()
        started = time.monotonic()
        assert _roundtrip(sock, b"fast") == b"fast"
        assert time.monotonic() - started < 0.2


def test_blackhole_swallows_everything_and_heal_resets_those_links(echo: int) -> None:
    """A black hole answers nothing on old and new links; heal() resets them, new ones work."""
    with FaultProxy("127.0.0.1", echo) as proxy, _connect(proxy) as old:
        proxy.blackhole()
        old.sendall(b"lost")
        with _connect(proxy) as new:
            new.sendall(b"lost too")
            assert _silent(old)
            assert _silent(new)
            proxy.heal()
            assert _broken(old)
            assert _broken(new)
        with _connect(proxy) as fresh:
            assert _roundtrip(fresh, b"back") == b"back"


def test_refuse_resets_new_connections_only(echo: int) -> None:
    """refuse() resets new connections at once; an existing one keeps working."""
    with FaultProxy("127.0.0.1", echo) as proxy, _connect(proxy) as old:
        assert _roundtrip(old, b"up") == b"up"  # proxied before the refusal
        proxy.refuse()
        assert _refused(proxy)
        assert _roundtrip(old, b"still") == b"still"
        proxy.heal()
        with _connect(proxy) as fresh:
            assert _roundtrip(fresh, b"ok") == b"ok"
        assert proxy.stats.faults == {"refused": 1}


def test_http_proxy_passes_requests_through(store: int) -> None:
    """Without rules, PUT and GET reach the server unchanged and are logged."""
    with HttpFaultProxy("127.0.0.1", store) as proxy:
        assert httpx.put(f"{proxy.url}/obj?sig=1", content=b"abc").status_code == 200
        assert httpx.get(f"{proxy.url}/obj?sig=1").content == b"abc"
        proxy.wait_requests(2, timeout=5)  # logged once the connection is done with
        stats = proxy.stats
        assert stats.methods == {"PUT": 1, "GET": 1}
        assert stats.log == [("PUT", "/obj", "200"), ("GET", "/obj", "200")]


def test_http_status_faults_hit_only_the_next_matching_requests(store: int) -> None:
    """503 with Retry-After, then 500, for matching PUTs only; later requests pass."""
    with HttpFaultProxy("127.0.0.1", store) as proxy:
        proxy.inject(status(503, retry_after=2), times=1, method="PUT", path=r"^/a")
        proxy.inject(status(500), times=1, method="PUT")
        assert httpx.get(f"{proxy.url}/a").status_code == 404  # not a PUT
        first = httpx.put(f"{proxy.url}/a", content=b"1")
        assert (first.status_code, first.headers["retry-after"]) == (503, "2")
        assert httpx.put(f"{proxy.url}/a", content=b"2").status_code == 500
        assert proxy.pending() == 0
        assert httpx.put(f"{proxy.url}/a", content=b"3").status_code == 200
        assert _Store.objects == {"/a": b"3"}
        assert proxy.stats.faults == {"503": 1, "500": 1}


def test_expired_answers_like_s3(store: int) -> None:
    """expired() is a 403 AccessDenied "Request has expired" S3 error; nothing is stored."""
    with HttpFaultProxy("127.0.0.1", store) as proxy:
        proxy.inject(expired(), times=None)
        answer = httpx.put(f"{proxy.url}/x", content=b"data")
        assert answer.status_code == 403
        assert "<Code>AccessDenied</Code>" in answer.text
        assert "Request has expired" in answer.text
        assert _Store.objects == {}


def test_reset_request_mid_body_stores_nothing(store: int) -> None:
    """A reset after part of the body: the client sees a network error, the server no object."""
    with HttpFaultProxy("127.0.0.1", store) as proxy:
        proxy.inject(ResetRequest(after=1000))
        with pytest.raises(httpx.TransportError):
            httpx.put(f"{proxy.url}/big", content=b"z" * 100_000)
        proxy.wait_requests(1, timeout=5)
        assert "/big" not in _Store.objects
        assert proxy.stats.faults == {"reset_request": 1}


def test_reset_response_loses_the_answer_after_the_work(store: int) -> None:
    """The PUT is stored but its answer never arrives; a GET body can be cut mid-way."""
    with HttpFaultProxy("127.0.0.1", store) as proxy:
        proxy.inject(ResetResponse(), method="PUT")
        with pytest.raises(httpx.TransportError):
            httpx.put(f"{proxy.url}/done", content=b"y" * 5000)
        assert _Store.objects["/done"] == b"y" * 5000
        proxy.inject(ResetResponse(body_bytes=100), method="GET")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{proxy.url}/done")


def test_trickle_delivers_slowly_but_intact(store: int) -> None:
    """A trickled body arrives whole, chunk by chunk, no faster than the interval allows."""
    with HttpFaultProxy("127.0.0.1", store) as proxy:
        assert httpx.put(f"{proxy.url}/t", content=b"q" * 4000).status_code == 200
        proxy.inject(Trickle(chunk=1000, interval_s=0.05), method="GET")
        started = time.monotonic()
        assert httpx.get(f"{proxy.url}/t").content == b"q" * 4000
        assert time.monotonic() - started >= 0.2  # 4 chunks, each after a 0.05 s pause
        proxy.wait_requests(2, timeout=5)
        assert proxy.stats.log[-1] == ("GET", "/t", "trickle")
