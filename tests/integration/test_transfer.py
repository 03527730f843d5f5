"""agent.transfer against real storage on loopback: SeaweedFS S3 and the gateway's LocalStorage.

Every transfer goes over real sockets to a real server that checks signatures. Faults are
injected at the transport seam (a wrapper around httpx's own transport) or served by real
hostile routes next to LocalStorage's; requests are observed with httpx event hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from agent.protocol.messages import UploadPart
from agent.transfer import (
    CHUNK_SIZE,
    RetryPolicy,
    TransferError,
    content_type_matches,
    download,
    safe_name,
    sha256_file,
    upload,
    upload_parts,
)
from gateway.storage import MIN_PART_SIZE, LocalStorage, ObjectStorage, S3Storage
from gateway.storage_routes import storage_routes
from tests.seaweedfs import SeaweedFS

MIB = 1024 * 1024
SECRET = b"transfer-test-secret-0123456789"
STARTUP_DEADLINE_S = 10.0
EVENT_DEADLINE_S = 10.0
ENDLESS_CAP = 512 * MIB  # the hostile endless body stops here even if nobody hangs up
FAST = RetryPolicy(
    attempts=3, timeout_s=20.0, wait_initial_s=0.01, wait_max_s=0.05, wait_jitter_s=0.01
)
SIGNATURE_RE = re.compile(r"(?:X-Amz-Signature|sig)=([0-9a-f]{16,})")

# ------------------------------------------------------------------------------ servers


@dataclass
class Endless:
    """What the hostile streaming route sent, and whether its generator has finished."""

    sent: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass
class Served:
    """A LocalStorage (and hostile routes) served by uvicorn at ``base_url``."""

    storage: LocalStorage
    base_url: str
    streams: dict[str, Endless]


def hostile_routes(streams: dict[str, Endless]) -> list[Route]:
    """Routes that stream bodies without Content-Length: ``?n=`` bytes, or endlessly."""

    async def stream(request: Request) -> Response:
        tag = request.query_params["tag"]
        total = int(request.query_params.get("n", ENDLESS_CAP))
        state = streams.setdefault(tag, Endless())

        async def body() -> AsyncIterator[bytes]:
            try:
                while state.sent < total and not await request.is_disconnected():
                    chunk = b"x" * min(64 * 1024, total - state.sent)
                    state.sent += len(chunk)
                    yield chunk
                    state.started.set()
            finally:
                state.finished.set()

        return StreamingResponse(body(), media_type="application/octet-stream")

    return [Route("/hostile/stream", stream, methods=["GET"])]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Serve a LocalStorage's routes and the hostile routes with uvicorn on loopback."""
    root = tmp_path_factory.mktemp("transfer-local")
    streams: dict[str, Endless] = {}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        storage = LocalStorage(root / "store", base_url, SECRET)
        app = Starlette(routes=[*storage_routes(storage), *hostile_routes(streams)])
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", ws="websockets-sansio", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not server.started:  # a poll with a deadline, on the server's own flag
            assert thread.is_alive(), "uvicorn exited during start-up"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        try:
            yield Served(storage, base_url, streams)
        finally:
            server.should_exit = True
            thread.join(timeout=10)


@dataclass(frozen=True)
class Limits:
    """The keyword arguments of one ``download`` call under test."""

    max_bytes: int
    declared_size: int | None = None
    expected_sha256: str | None = None
    accept: str | None = None


@dataclass
class Backend:
    """One storage backend under test and a way to read back what it stored."""

    name: str
    storage: ObjectStorage
    stored_sha256: Callable[[str], str]  # blocking


def _s3_backend(seaweedfs: SeaweedFS) -> Backend:
    storage = S3Storage(
        seaweedfs.endpoint_url, seaweedfs.bucket, seaweedfs.access_key, seaweedfs.secret_key
    )
    client = seaweedfs.client()

    def stored_sha256(key: str) -> str:
        digest = hashlib.sha256()
        body = client.get_object(Bucket=seaweedfs.bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(CHUNK_SIZE):
            digest.update(chunk)
        return digest.hexdigest()

    return Backend("s3", storage, stored_sha256)


def _local_backend(served: Served) -> Backend:
    def stored_sha256(key: str) -> str:
        digest = hashlib.sha256()
        with served.storage.data_path(key).open("rb") as file:
            while chunk := file.read(CHUNK_SIZE):
                digest.update(chunk)
        return digest.hexdigest()

    return Backend("local", served.storage, stored_sha256)


@pytest.fixture
def s3(seaweedfs: SeaweedFS) -> Backend:
    """The real SeaweedFS S3 server, presigned through gateway.storage.S3Storage."""
    return _s3_backend(seaweedfs)


@pytest.fixture(params=["s3", "local"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend in turn: SeaweedFS S3, then LocalStorage on uvicorn."""
    if request.param == "s3":
        return _s3_backend(request.getfixturevalue("seaweedfs"))
    return _local_backend(request.getfixturevalue("served"))


# ------------------------------------------------------------------------------ helpers

Fault = Callable[[httpx.Request], "httpx.Response | Exception | None"]


class CountingStream(httpx.AsyncByteStream):
    """A response body that counts the bytes the client actually pulled from the socket."""

    def __init__(self, inner: httpx.AsyncByteStream, seam: Seam) -> None:
        """Wrap ``inner``; add to ``seam.received``."""
        self._inner = inner
        self._seam = seam

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Yield the inner chunks, counting them."""
        async for chunk in self._inner:
            self._seam.received += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        """Close the inner stream (and with it the connection when unread)."""
        await self._inner.aclose()


class Seam(httpx.AsyncBaseTransport):
    """httpx's real transport, except where ``fault`` answers or raises for a request.

    ``received`` counts response body bytes the client read through it.
    """

    def __init__(self, fault: Fault | None = None) -> None:
        """Wrap a fresh ``AsyncHTTPTransport``."""
        self._fault = fault
        self._inner = httpx.AsyncHTTPTransport()
        self.received = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Raise or answer the injected fault, else send the request for real."""
        injected = self._fault(request) if self._fault is not None else None
        if isinstance(injected, Exception):
            raise injected
        if injected is not None:
            return injected
        response = await self._inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=CountingStream(response.stream, self),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close the real transport."""
        await self._inner.aclose()


@contextlib.asynccontextmanager
async def recording_client(
    fault: Fault | None = None, seam: Seam | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, list[httpx.Request]]]:
    """Yield a storage client and the list of requests it sends (an event hook fills it)."""
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    transport = seam if seam is not None else Seam(fault)
    async with httpx.AsyncClient(
        timeout=30.0, event_hooks={"request": [record]}, transport=transport
    ) as client:
        yield client, sent


def new_key(name: str = "out.bin") -> str:
    """Return an object key no other test uses."""
    return f"tasks/{uuid.uuid4().hex}/{name}"


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` in 1 MiB pieces and return their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as file:
        remaining = size
        while remaining:
            chunk = os.urandom(min(MIB, remaining))
            digest.update(chunk)
            file.write(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


async def stored(backend: Backend, path: Path, content_type: str = "image/png") -> str:
    """Upload ``path`` with the agent's ``upload`` and return its key."""
    key = new_key(path.name)
    size = (await asyncio.to_thread(path.stat)).st_size
    put = backend.storage.presign_put(key, size=size, content_type=content_type, expires_s=300)
    async with recording_client() as (client, _):
        await upload(client, put.url, put.headers, path, retry=FAST)
    return key


async def wait_until_past(moment: datetime) -> None:
    """Wait (bounded: the URL lives 1 s) until the wall clock is past ``moment``."""
    remaining = (moment - datetime.now(UTC)).total_seconds() + 0.1
    assert remaining < 3.0, "the URL lives longer than this test waits"
    if remaining > 0:
        await asyncio.sleep(remaining)
    assert datetime.now(UTC) > moment


def tamper(url: str) -> tuple[str, str, str]:
    """Return ``url`` with one hex digit of its signature changed, and both signatures."""
    match = SIGNATURE_RE.search(url)
    assert match is not None, "no signature in the URL"
    genuine = match.group(1)
    forged = genuine[:-1] + ("0" if genuine[-1] != "0" else "1")
    return url[: match.start(1)] + forged + url[match.end(1) :], genuine, forged


def names(directory: Path) -> list[str]:
    """Return the names in ``directory``, sorted."""
    return sorted(path.name for path in directory.iterdir())


def tree(root: Path) -> list[tuple[str, int]]:
    """Return every path under ``root`` with its size (a snapshot to compare)."""
    return sorted((str(path), path.lstat().st_size) for path in root.rglob("*"))


# ------------------------------------------------------------------------------ pure checks


@pytest.mark.parametrize(
    "name",
    ["image.png", "ComfyUI_00001_.png", "été 2026.mp4", "...", "a..b", "COM10.txt", "console"],
)
def test_safe_name_returns_plain_names_unchanged(name: str) -> None:
    """A single plain file name passes through unchanged."""
    assert safe_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../../etc/passwd",
        "/etc/passwd",
        "a/b",
        "a\\b",
        "C:evil.png",
        "x\x00y",
        "tab\there",
        "del\x7f",
        "CON",
        "nul.txt",
        "Com1.tar.gz",
        "lpt9",
        "aux .png",
        "x" * 201,
        "é" * 101,
        "\udcff.png",
    ],
)
def test_safe_name_refuses_hostile_names(name: str) -> None:
    """Separators, dot names, control characters, device names and long names are refused."""
    with pytest.raises(TransferError) as caught:
        safe_name(name)
    assert caught.value.code == "unsafe_name"
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("accept", "content_type", "expected"),
    [
        (None, "anything/at-all", True),
        ("", "image/png", True),
        ("image/*,video/mp4", "image/png", True),
        ("image/*,video/mp4", "IMAGE/PNG; charset=binary", True),
        ("image/*, video/mp4", "video/mp4", True),
        ("image/*,video/mp4", "video/webm", False),
        ("image/*", "imagex/png", False),
        ("image/png;q=0.9", "image/png", True),
        ("*/*", "text/plain", True),
        ("image/*", "", False),
        ("image/*", "png", False),
    ],
)
def test_content_type_matches(accept: str | None, content_type: str, expected: bool) -> None:
    """Wildcards, lists, case and parameters follow the documented rule."""
    assert content_type_matches(accept, content_type) is expected


@pytest.mark.asyncio
async def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    """sha256_file streams the file and agrees with hashlib on the whole content."""
    path = tmp_path / "data.bin"
    expected = await asyncio.to_thread(write_random, path, 3 * MIB + 7)
    assert await sha256_file(path) == expected


# ------------------------------------------------------------------------------ uploads


@pytest.mark.asyncio
async def test_upload_20mb_keeps_sha256_and_sends_content_length(
    backend: Backend, tmp_path: Path
) -> None:
    """A 20 MB PUT carries Content-Length, no chunked encoding, only the signed headers."""
    path = tmp_path / "video.mp4"
    size = 20 * 1000 * 1000
    expected = await asyncio.to_thread(write_random, path, size)
    key = new_key("video.mp4")
    put = backend.storage.presign_put(key, size=size, content_type="video/mp4", expires_s=300)
    async with recording_client() as (client, sent):
        await upload(client, put.url, put.headers, path, retry=FAST)
    assert len(sent) == 1
    headers = sent[0].headers
    assert headers["content-length"] == str(size)
    assert "transfer-encoding" not in headers
    for name, value in put.headers.items():
        assert headers.get_list(name) == [value]
    signed = {name.lower() for name in put.headers}
    assert {name for name in headers if name.startswith("x-amz-")} <= signed
    info = await asyncio.to_thread(backend.storage.head, key)
    assert info is not None
    assert (info.size, info.content_type) == (size, "video/mp4")
    assert await asyncio.to_thread(backend.stored_sha256, key) == expected


@pytest.mark.asyncio
async def test_memory_stays_bounded_for_20mb(s3: Backend, tmp_path: Path) -> None:
    """Uploading and downloading 20 MB allocates a few chunks at most, never the file."""
    path = tmp_path / "big.bin"
    size = 20 * MIB
    expected = await asyncio.to_thread(write_random, path, size)
    key = new_key("big.bin")
    put = s3.storage.presign_put(key, size=size, content_type="image/png", expires_s=300)
    get, _ = s3.storage.presign_get(key, expires_s=300)
    dest = tmp_path / "dest"
    dest.mkdir()
    async with recording_client() as (client, _):
        tracemalloc.start()
        try:
            await upload(client, put.url, put.headers, path, retry=FAST)
            _, upload_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            got = await download(
                client, get, dest, "big.bin", max_bytes=size, expected_sha256=expected
            )
            _, download_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert got.stat().st_size == size
    assert upload_peak < 6 * MIB, upload_peak
    assert download_peak < 6 * MIB, download_peak


@pytest.mark.asyncio
async def test_upload_refuses_headers_signed_for_another_size(
    backend: Backend, tmp_path: Path
) -> None:
    """A signed Content-Length that is not the file's size fails before any request."""
    path = tmp_path / "a.png"
    await asyncio.to_thread(write_random, path, 1000)
    put = backend.storage.presign_put(new_key(), size=999, content_type="image/png", expires_s=60)
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await upload(client, put.url, put.headers, path, retry=FAST)
    assert caught.value.code == "size_mismatch"
    assert sent == []


@pytest.mark.asyncio
async def test_a_file_that_shrinks_mid_upload_is_never_sent_short(
    backend: Backend, tmp_path: Path
) -> None:
    """The file is truncated after the size was taken: size_mismatch, nothing stored."""
    path = tmp_path / "a.png"
    await asyncio.to_thread(write_random, path, 3 * MIB)
    key = new_key()
    put = backend.storage.presign_put(key, size=3 * MIB, content_type="image/png", expires_s=60)

    def shrink(_request: httpx.Request) -> None:
        os.truncate(path, MIB)  # between opening the request and streaming its body

    async with recording_client(shrink) as (client, sent):
        with pytest.raises(TransferError) as caught:
            await upload(client, put.url, put.headers, path, retry=FAST)
    assert caught.value.code == "size_mismatch"
    assert not caught.value.retryable
    assert len(sent) == 1
    assert await asyncio.to_thread(backend.storage.head, key) is None


@pytest.mark.asyncio
async def test_upload_over_an_existing_object_is_fatal(backend: Backend, tmp_path: Path) -> None:
    """A second PUT to the same key gets 412 once, not retried."""
    path = tmp_path / "a.png"
    await asyncio.to_thread(write_random, path, 1000)
    key = await stored(backend, path)
    put = backend.storage.presign_put(key, size=1000, content_type="image/png", expires_s=60)
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await upload(client, put.url, put.headers, path, retry=FAST)
    assert (caught.value.code, caught.value.status) == ("http", 412)
    assert not caught.value.retryable
    assert not caught.value.refresh_urls
    assert len(sent) == 1


@pytest.mark.asyncio
async def test_expired_url_asks_for_fresh_urls_then_a_fresh_one_works(
    backend: Backend, tmp_path: Path
) -> None:
    """An expired URL is refused once (no blind retry) with refresh_urls; a fresh one succeeds."""
    path = tmp_path / "a.png"
    expected = await asyncio.to_thread(write_random, path, 2 * MIB)
    key = new_key()
    put = backend.storage.presign_put(key, size=2 * MIB, content_type="image/png", expires_s=1)
    await wait_until_past(put.expires_at)
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await upload(client, put.url, put.headers, path, retry=FAST)
        assert (caught.value.code, caught.value.status) == ("expired", 403)
        assert caught.value.refresh_urls
        assert not caught.value.retryable
        assert len(sent) == 1
        fresh = backend.storage.presign_put(
            key, size=2 * MIB, content_type="image/png", expires_s=60
        )
        await upload(client, fresh.url, fresh.headers, path, retry=FAST)
    assert await asyncio.to_thread(backend.stored_sha256, key) == expected


@pytest.mark.asyncio
async def test_tampered_url_is_refused_and_its_signature_stays_secret(
    backend: Backend, tmp_path: Path
) -> None:
    """A forged signature → refused with refresh_urls; neither signature is in the error."""
    path = tmp_path / "a.png"
    await asyncio.to_thread(write_random, path, 3 * MIB)
    key = new_key()
    put = backend.storage.presign_put(key, size=3 * MIB, content_type="image/png", expires_s=60)
    forged_url, genuine, forged = tamper(put.url)
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await upload(client, forged_url, put.headers, path, retry=FAST)
    error = caught.value
    assert (error.code, error.status, error.refresh_urls) == ("refused", 403, True)
    assert len(sent) == 1
    for text in (str(error), repr(error)):
        assert genuine not in text
        assert forged not in text
    assert "=***" in str(error)
    assert await asyncio.to_thread(backend.storage.head, key) is None


# ------------------------------------------------------------------------------ multipart


def part_sizes() -> list[int]:
    """Three parts: two of exactly 5 MiB and a short last one."""
    return [MIN_PART_SIZE, MIN_PART_SIZE, MIB + 123]


def presign_parts(backend: Backend, key: str, upload_id: str) -> list[UploadPart]:
    """Return presigned UploadParts for ``part_sizes()``."""
    return [
        UploadPart(
            part_number=number,
            upload_url=backend.storage.presign_part(
                key, upload_id=upload_id, part_number=number, expires_s=300
            ),
            size=size,
        )
        for number, size in enumerate(part_sizes(), start=1)
    ]


def part_number_of(request: httpx.Request) -> int | None:
    """Return the part number a part URL carries (S3 ``partNumber``, local ``part``)."""
    value = request.url.params.get("partNumber") or request.url.params.get("part")
    return int(value) if value else None


@pytest.mark.asyncio
async def test_multipart_upload_with_one_injected_failure_completes(
    backend: Backend, tmp_path: Path
) -> None:
    """Three parts; part 2's first attempt fails to connect, is retried; completion matches."""
    path = tmp_path / "scene.ply"
    total = sum(part_sizes())
    expected = await asyncio.to_thread(write_random, path, total)
    key = new_key("scene.ply")
    upload_id = await asyncio.to_thread(
        backend.storage.create_multipart, key, content_type="application/octet-stream"
    )
    parts = presign_parts(backend, key, upload_id)
    failed: list[httpx.Request] = []

    def fault(request: httpx.Request) -> Exception | None:
        if part_number_of(request) == 2 and not failed:
            failed.append(request)
            return httpx.ConnectError("injected: connection refused", request=request)
        return None

    async with recording_client(fault) as (client, sent):
        done = await upload_parts(client, parts, path, retry=FAST)
    assert [part_number_of(request) for request in sent] == [1, 2, 2, 3]
    assert [request.headers["content-length"] for request in sent] == [
        str(size) for size in (MIN_PART_SIZE, MIN_PART_SIZE, MIN_PART_SIZE, MIB + 123)
    ]
    assert all("transfer-encoding" not in request.headers for request in sent)
    assert [part.part_number for part in done] == [1, 2, 3]
    assert all(re.fullmatch(r'"[0-9a-f]{32}"', part.etag) for part in done)
    await asyncio.to_thread(
        backend.storage.complete_multipart,
        key,
        upload_id=upload_id,
        parts=[(part.part_number, part.etag) for part in done],
    )
    info = await asyncio.to_thread(backend.storage.head, key)
    assert info is not None
    assert info.size == total
    assert await asyncio.to_thread(backend.stored_sha256, key) == expected


@pytest.mark.asyncio
async def test_multipart_refuses_parts_that_do_not_cover_the_file(
    backend: Backend, tmp_path: Path
) -> None:
    """Part sizes that do not add up to the file size fail before any request."""
    path = tmp_path / "short.bin"
    await asyncio.to_thread(write_random, path, sum(part_sizes()) - 1)
    key = new_key()
    upload_id = await asyncio.to_thread(
        backend.storage.create_multipart, key, content_type="application/octet-stream"
    )
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await upload_parts(client, presign_parts(backend, key, upload_id), path, retry=FAST)
    assert caught.value.code == "size_mismatch"
    assert sent == []
    await asyncio.to_thread(backend.storage.abort_multipart, key, upload_id=upload_id)


# ------------------------------------------------------------------------------ downloads


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """An empty download directory inside the test's temp dir."""
    path = tmp_path / "inputs"
    path.mkdir()
    return path


@pytest.mark.asyncio
async def test_download_checks_sha256_and_content_type(
    backend: Backend, tmp_path: Path, dest: Path
) -> None:
    """A good download lands whole under its name with the expected sha256; no temp file."""
    source = tmp_path / "in.png"
    expected = await asyncio.to_thread(write_random, source, 3 * MIB + 5)
    key = await stored(backend, source)
    url, _ = backend.storage.presign_get(key, expires_s=60)
    async with recording_client() as (client, sent):
        got = await download(
            client,
            url,
            dest,
            "in.png",
            max_bytes=4 * MIB,
            declared_size=3 * MIB + 5,
            expected_sha256=expected.upper(),
            accept="image/*,video/mp4",
        )
    assert got == await asyncio.to_thread(dest.resolve) / "in.png"
    assert names(dest) == ["in.png"]
    assert await sha256_file(got) == expected
    assert sent[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        (Limits(10 * MIB, declared_size=1000), "size_mismatch"),  # larger than declared
        (Limits(1000), "too_large"),  # larger than allowed
        (Limits(10 * MIB, declared_size=5000), "size_mismatch"),  # shorter than declared
        (Limits(10 * MIB, expected_sha256="0" * 64), "checksum"),
        (Limits(10 * MIB, accept="video/*"), "content_type"),
    ],
)
@pytest.mark.asyncio
async def test_bad_downloads_are_refused_and_leave_no_file(
    backend: Backend, tmp_path: Path, dest: Path, limits: Limits, code: str
) -> None:
    """Too large, wrong size, wrong sha256, wrong type: refused at once, nothing left."""
    source = tmp_path / "in.png"
    await asyncio.to_thread(write_random, source, 4000)
    key = await stored(backend, source)
    url, _ = backend.storage.presign_get(key, expires_s=60)
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await download(client, url, dest, "in.png", retry=FAST, **asdict(limits))
    assert caught.value.code == code
    assert not caught.value.retryable
    assert len(sent) == 1
    assert names(dest) == []


@pytest.mark.parametrize(
    ("n", "limits", "code"),
    [
        (None, Limits(3 * MIB), "too_large"),  # endless
        (2 * MIB, Limits(10 * MIB, declared_size=MIB), "size_mismatch"),  # longer than declared
        (MIB, Limits(10 * MIB, declared_size=2 * MIB), "size_mismatch"),  # shorter than declared
    ],
)
@pytest.mark.asyncio
async def test_streamed_bodies_are_cut_at_their_limit(
    served: Served, dest: Path, n: int | None, limits: Limits, code: str
) -> None:
    """Bodies without Content-Length: reading stops one network read past the limit."""
    tag = uuid.uuid4().hex
    url = f"{served.base_url}/hostile/stream?tag={tag}" + (f"&n={n}" if n else "")
    seam = Seam()
    async with recording_client(seam=seam) as (client, _):
        with pytest.raises(TransferError) as caught:
            await download(client, url, dest, "in.bin", retry=FAST, **asdict(limits))
    assert caught.value.code == code
    assert names(dest) == []
    limit = min(limits.max_bytes, limits.declared_size or limits.max_bytes)
    if n is None or n > limit:
        assert limit < seam.received <= limit + 64 * 1024
    state = served.streams[tag]
    assert await asyncio.to_thread(state.finished.wait, EVENT_DEADLINE_S), "server still sending"
    assert state.sent < ENDLESS_CAP


async def wait_for(condition: Callable[[], bool], task: asyncio.Task[object]) -> None:
    """Poll ``condition`` every 10 ms with a deadline, failing if ``task`` ends first."""
    deadline = time.monotonic() + EVENT_DEADLINE_S
    while not condition():
        assert not task.done(), task
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("moment", ["partial_appears", "mid_body"])
@pytest.mark.asyncio
async def test_cancelled_download_deletes_its_partial_file(
    served: Served, dest: Path, moment: str
) -> None:
    """Cancelling a download (as its temp file appears, or mid-body) leaves nothing behind."""
    url = f"{served.base_url}/hostile/stream?tag={uuid.uuid4().hex}"
    seam = Seam()
    async with recording_client(seam=seam) as (client, _):
        task: asyncio.Task[object] = asyncio.create_task(
            download(client, url, dest, "in.bin", max_bytes=ENDLESS_CAP, retry=FAST)
        )
        if moment == "partial_appears":  # races the thread that creates the temp file
            await wait_for(lambda: bool(names(dest)), task)
        else:
            await wait_for(lambda: seam.received > 3 * CHUNK_SIZE, task)
            assert [Path(name).suffix for name in names(dest)] == [".partial"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert names(dest) == []


@pytest.mark.asyncio
async def test_cancelled_upload_stores_nothing(served: Served, tmp_path: Path) -> None:
    """Cancelling an upload mid-request closes it; the object is never stored."""
    backend = _local_backend(served)
    path = tmp_path / "big.bin"
    await asyncio.to_thread(write_random, path, 20 * MIB)
    key = new_key()
    put = backend.storage.presign_put(key, size=20 * MIB, content_type="image/png", expires_s=60)
    async with recording_client() as (client, sent):
        task: asyncio.Task[object] = asyncio.create_task(
            upload(client, put.url, put.headers, path, retry=FAST)
        )
        await wait_for(lambda: bool(sent), task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await asyncio.to_thread(backend.storage.head, key) is None


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "a/b", "..", "CON", "nul.txt", "x\x00y"]
)
@pytest.mark.asyncio
async def test_hostile_names_are_refused_before_anything_is_written(
    served: Served, tmp_path: Path, dest: Path, name: str
) -> None:
    """A hostile name fails before any request; dest_dir and its parent are untouched."""
    source = tmp_path / "in.png"
    await asyncio.to_thread(write_random, source, 1000)
    key = await stored(_local_backend(served), source)
    url, _ = served.storage.presign_get(key, expires_s=60)
    before = tree(tmp_path)
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await download(client, url, dest, name, max_bytes=MIB, retry=FAST)
    assert caught.value.code == "unsafe_name"
    assert sent == []
    assert tree(tmp_path) == before
    assert names(dest) == []


@pytest.mark.asyncio
async def test_expired_and_tampered_download_urls_ask_for_fresh_urls(
    backend: Backend, tmp_path: Path, dest: Path
) -> None:
    """GET with an expired or forged URL → refresh_urls, one request each, no file."""
    source = tmp_path / "in.png"
    await asyncio.to_thread(write_random, source, 1000)
    key = await stored(backend, source)
    expiring, expires_at = backend.storage.presign_get(key, expires_s=1)
    forged, _, _ = tamper(backend.storage.presign_get(key, expires_s=60)[0])
    await wait_until_past(expires_at)
    async with recording_client() as (client, sent):
        for url, code in ((expiring, "expired"), (forged, "refused")):
            with pytest.raises(TransferError) as caught:
                await download(client, url, dest, "in.png", max_bytes=MIB, retry=FAST)
            assert (caught.value.code, caught.value.refresh_urls) == (code, True)
    assert len(sent) == 2
    assert names(dest) == []


@pytest.mark.asyncio
async def test_missing_object_is_fatal_without_retries(backend: Backend, dest: Path) -> None:
    """404 is not retried and not a refresh case."""
    url, _ = backend.storage.presign_get(new_key(), expires_s=60)
    async with recording_client() as (client, sent):
        with pytest.raises(TransferError) as caught:
            await download(client, url, dest, "in.png", max_bytes=MIB, retry=FAST)
    error = caught.value
    assert (error.code, error.status, error.retryable, error.refresh_urls) == (
        "http",
        404,
        False,
        False,
    )
    assert len(sent) == 1


@pytest.mark.asyncio
async def test_server_errors_are_retried_then_give_up_retryable(
    served: Served, tmp_path: Path, dest: Path
) -> None:
    """503 then success downloads; 503 every time stops after the policy's attempts."""
    source = tmp_path / "in.png"
    expected = await asyncio.to_thread(write_random, source, 1000)
    key = await stored(_local_backend(served), source)
    url, _ = served.storage.presign_get(key, expires_s=60)
    answers: list[int] = [503]

    def fault(request: httpx.Request) -> httpx.Response | None:
        if answers:
            return httpx.Response(answers.pop(0), headers={"Retry-After": "0"}, request=request)
        return None

    async with recording_client(fault) as (client, sent):
        got = await download(client, url, dest, "in.png", max_bytes=MIB, retry=FAST)
        assert len(sent) == 2
        assert await sha256_file(got) == expected
        answers.extend([503, 502, 500])
        with pytest.raises(TransferError) as caught:
            await download(client, url, dest, "again.png", max_bytes=MIB, retry=FAST)
    assert (caught.value.code, caught.value.status, caught.value.retryable) == ("http", 500, True)
    assert len(sent) == 2 + FAST.attempts
