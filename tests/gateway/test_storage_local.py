"""LocalStorage through its real routes on uvicorn: the same acceptance and refusals as S3."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette

from gateway.storage import (
    MIN_PART_SIZE,
    LocalStorage,
    ObjectInfo,
    ObjectStorage,
    StorageError,
    validate_key,
)
from gateway.storage_routes import storage_routes

SECRET = b"test-secret-0123456789abcdef"
STARTUP_DEADLINE_S = 10.0
MIB = 1024 * 1024


@dataclass
class Served:
    """A LocalStorage whose routes run on uvicorn at ``base_url``."""

    storage: LocalStorage
    base_url: str
    port: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Serve a LocalStorage's routes with uvicorn on a free loopback port (in a thread)."""
    root = tmp_path_factory.mktemp("local-storage")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        base_url = f"http://127.0.0.1:{port}"
        storage = LocalStorage(root / "store", base_url, SECRET)
        app = Starlette(routes=storage_routes(storage))
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", ws="websockets-sansio", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during start-up"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        try:
            yield Served(storage, base_url, port)
        finally:
            server.should_exit = True
            thread.join(timeout=10)


@pytest.fixture
def storage(served: Served) -> LocalStorage:
    """The served LocalStorage."""
    return served.storage


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain HTTP client, as the agent or a browser would use for presigned URLs."""
    with httpx.Client(timeout=30.0) as client:
        yield client


def new_key(name: str = "file.bin") -> str:
    """Return a key no other test uses."""
    return f"inputs/team-1/{uuid.uuid4()}/{name}"


def past_signer(storage: LocalStorage, seconds: float) -> LocalStorage:
    """Return a LocalStorage on the same root and secret whose clock is ``seconds`` behind."""
    return LocalStorage(storage.root, storage.base_url, SECRET, clock=lambda: time.time() - seconds)


def raw_request(port: int, head: str, body: bytes = b"", *, half_close: bool = False) -> bytes:
    """Send bytes exactly as given (no client-side normalisation) and return the raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """Return the status code of a raw HTTP/1.1 response."""
    return int(response.split(b" ", 2)[1])


def error_code(response: httpx.Response) -> str:
    """Return the ``error.code`` of a JSON error body."""
    return str(response.json()["error"]["code"])


def temp_files(storage: LocalStorage) -> list[Path]:
    """Return the partial writes currently in the storage's tmp directory."""
    return list((storage.root / "tmp").iterdir())


def test_local_storage_satisfies_the_protocol(storage: LocalStorage) -> None:
    """LocalStorage is an ObjectStorage (checked by mypy) whose head of an absent key is None."""
    as_protocol: ObjectStorage = storage
    assert as_protocol.head(new_key()) is None


def test_presigned_put_with_headers_verbatim_stores_the_object(
    storage: LocalStorage, http: httpx.Client
) -> None:
    """A PUT sending exactly the returned headers stores the object; GET streams it back."""
    key, body = new_key("image.png"), os.urandom(3 * MIB + 17)
    before = datetime.now(UTC)
    put = storage.presign_put(key, size=len(body), content_type="image/png", expires_s=300)
    assert put.headers == {
        "Content-Length": str(len(body)),
        "Content-Type": "image/png",
        "If-None-Match": "*",
    }
    assert before + timedelta(seconds=298) < put.expires_at <= before + timedelta(seconds=301)
    response = http.put(put.url, content=body, headers=put.headers)
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'
    assert storage.head(key) == ObjectInfo(key=key, size=len(body), content_type="image/png")
    url, _ = storage.presign_get(key, expires_s=60)
    got = http.get(url)
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/png"
    assert got.content == body
    assert storage.data_path(key).is_relative_to(storage.root / "objects")


def test_url_scheme_is_documented_shape(storage: LocalStorage) -> None:
    """PUT URLs carry expires, size, type and sig; GET URLs carry expires and sig."""
    put = storage.presign_put("a/b.txt", size=3, content_type="text/plain", expires_s=60)
    parts = urlsplit(put.url)
    assert parts.path == "/storage/a/b.txt"
    assert [item.split("=")[0] for item in parts.query.split("&")] == [
        "expires",
        "size",
        "type",
        "sig",
    ]
    url, _ = storage.presign_get("a/b.txt", expires_s=60)
    assert [item.split("=")[0] for item in urlsplit(url).query.split("&")] == ["expires", "sig"]


@pytest.mark.parametrize("missing", ["Content-Type", "If-None-Match", "Content-Length"])
def test_put_without_a_signed_header_is_refused(
    storage: LocalStorage, http: httpx.Client, missing: str
) -> None:
    """Leaving out any signed header (chunked instead of Content-Length too) gives 403."""
    key, body = new_key(), b"0123456789"
    put = storage.presign_put(key, size=len(body), content_type="text/plain", expires_s=60)
    headers = {name: value for name, value in put.headers.items() if name != missing}
    content: bytes | Iterator[bytes] = iter([body]) if missing == "Content-Length" else body
    response = http.put(put.url, content=content, headers=headers)
    assert response.status_code == 403, response.text
    assert error_code(response) == "SignatureDoesNotMatch"
    assert storage.head(key) is None


@pytest.mark.parametrize(
    ("header", "value"),
    [("Content-Type", "text/html"), ("Content-Length", "9"), ("If-None-Match", '"abc"')],
)
def test_put_with_a_different_signed_value_is_refused(
    storage: LocalStorage, http: httpx.Client, header: str, value: str
) -> None:
    """A Content-Type, Content-Length or If-None-Match other than the signed one gives 403."""
    key = new_key()
    put = storage.presign_put(key, size=10, content_type="text/plain", expires_s=60)
    body = b"x" * int(value) if header == "Content-Length" else b"x" * 10
    response = http.put(put.url, content=body, headers={**put.headers, header: value})
    assert response.status_code == 403, response.text
    assert storage.head(key) is None


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("sig", lambda v: v[:-1] + ("0" if v[-1] != "0" else "1")),
        ("size", lambda v: str(int(v) + 1)),
        ("type", lambda _: "text/html"),
        ("expires", lambda v: str(int(v) + 3600)),
    ],
)
def test_tampered_url_is_refused(
    storage: LocalStorage, http: httpx.Client, name: str, change: Callable[[str], str]
) -> None:
    """Changing any signed query parameter gives 403, even with headers matching the change."""
    key, body = new_key(), b"0123456789"
    put = storage.presign_put(key, size=len(body), content_type="text/plain", expires_s=60)
    query = dict(httpx.URL(put.url).params)
    query[name] = change(query[name])
    url = httpx.URL(put.url).copy_with(params=query)
    headers = dict(put.headers)
    if name == "type":
        headers["Content-Type"] = query["type"]
    if name == "size":
        headers["Content-Length"] = query["size"]
        body += b"!"
    response = http.put(url, content=body, headers=headers)
    assert response.status_code == 403, response.text
    assert error_code(response) == "SignatureDoesNotMatch"
    assert storage.head(key) is None


def test_url_for_another_key_or_method_is_refused(
    storage: LocalStorage, http: httpx.Client
) -> None:
    """A signature is bound to its key and method: moving it to another key or GET gives 403."""
    key, body = new_key(), b"data"
    put = storage.presign_put(key, size=len(body), content_type="text/plain", expires_s=60)
    other = new_key()
    response = http.put(put.url.replace(key, other), content=body, headers=put.headers)
    assert response.status_code == 403
    assert storage.head(other) is None
    assert http.get(put.url).status_code == 403
    response = http.put(put.url.replace("&sig=", "&extra=1&sig="), content=body)
    assert response.status_code == 403


def test_unsigned_or_malformed_urls_are_refused(storage: LocalStorage, http: httpx.Client) -> None:
    """A URL without signature parameters, or with a repeated one, gives 403 AccessDenied."""
    key = new_key()
    response = http.put(f"{storage.base_url}/storage/{key}", content=b"x")
    assert response.status_code == 403
    assert error_code(response) == "AccessDenied"
    url, _ = storage.presign_get(key, expires_s=60)
    assert http.get(url + "&sig=00").status_code == 403
    assert http.get(url.replace("expires=", "expires=x")).status_code == 403
    assert http.get(url.replace("&sig=", "&sig=%C3%A9")).status_code == 403


def test_expired_urls_are_refused(storage: LocalStorage, http: httpx.Client) -> None:
    """URLs signed with a clock an hour behind (so already expired) give 403 for PUT and GET."""
    key, body = new_key(), b"late"
    signer = past_signer(storage, 3600)
    put = signer.presign_put(key, size=len(body), content_type="text/plain", expires_s=60)
    response = http.put(put.url, content=body, headers=put.headers)
    assert response.status_code == 403
    assert response.json()["error"] == {"code": "AccessDenied", "message": "Request has expired"}
    assert storage.head(key) is None
    url, expires_at = signer.presign_get(key, expires_s=60)
    assert expires_at < datetime.now(UTC)
    assert http.get(url).status_code == 403


def test_existing_object_put_is_refused_with_412(storage: LocalStorage, http: httpx.Client) -> None:
    """A second PUT to an existing key gives 412 and leaves the first object intact."""
    key = new_key()
    first = storage.presign_put(key, size=5, content_type="text/plain", expires_s=60)
    assert http.put(first.url, content=b"first", headers=first.headers).status_code == 200
    second = storage.presign_put(key, size=6, content_type="text/csv", expires_s=60)
    response = http.put(second.url, content=b"second", headers=second.headers)
    assert response.status_code == 412
    assert error_code(response) == "PreconditionFailed"
    assert storage.head(key) == ObjectInfo(key, 5, "text/plain")
    assert temp_files(storage) == []


def test_get_returns_the_stored_content_type_verbatim_and_ranges(
    storage: LocalStorage, http: httpx.Client
) -> None:
    """GET answers with the exact stored Content-Type (no charset added) and honours Range."""
    key = new_key("notes.txt")
    put = storage.presign_put(key, size=10, content_type="text/plain", expires_s=60)
    assert http.put(put.url, content=b"0123456789", headers=put.headers).status_code == 200
    url, _ = storage.presign_get(key, expires_s=60)
    response = http.get(url, headers={"Range": "bytes=2-4"})
    assert response.status_code == 206
    assert response.content == b"234"
    assert response.headers["content-type"] == "text/plain"


def test_get_of_an_unknown_object_is_404(storage: LocalStorage, http: httpx.Client) -> None:
    """A correctly signed GET of a key that holds no object gives 404 NoSuchKey."""
    url, _ = storage.presign_get(new_key(), expires_s=60)
    response = http.get(url)
    assert response.status_code == 404
    assert error_code(response) == "NoSuchKey"


def test_body_longer_than_declared_is_refused_without_writing(
    served: Served, storage: LocalStorage
) -> None:
    """A chunked body running past the signed Content-Length gives 400 and stores nothing."""
    key = new_key()
    put = storage.presign_put(key, size=5, content_type="text/plain", expires_s=60)
    target = put.url.removeprefix(served.base_url)
    head = (
        f"PUT {target} HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 5\nContent-Type: text/plain\n"
        "If-None-Match: *\nTransfer-Encoding: chunked\nConnection: close\n"
    )
    response = raw_request(served.port, head, b"14\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n")
    assert status_of(response) == 400
    assert b"BodyExceedsContentLength" in response
    assert storage.head(key) is None
    assert temp_files(storage) == []


def test_body_shorter_than_declared_is_never_stored(served: Served, storage: LocalStorage) -> None:
    """A client that stops before the signed Content-Length leaves no object and no temp file."""
    key = new_key()
    put = storage.presign_put(key, size=100, content_type="text/plain", expires_s=60)
    target = put.url.removeprefix(served.base_url)
    head = (
        f"PUT {target} HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 100\n"
        "Content-Type: text/plain\nIf-None-Match: *\nConnection: close\n"
    )
    response = raw_request(served.port, head, b"y" * 10, half_close=True)
    assert response == b"" or status_of(response) == 400
    deadline = time.monotonic() + 5
    while temp_files(storage) and time.monotonic() < deadline:  # the handler cleans up async
        time.sleep(0.01)
    assert temp_files(storage) == []
    assert storage.head(key) is None


@pytest.mark.parametrize("path", ["%2e%2e/escaped.txt", "/etc/passwd", "a//b", "a/./b", "a%5cb"])
def test_hostile_keys_are_refused_by_the_routes(served: Served, path: str) -> None:
    """Traversal, absolute, empty-segment and odd-character keys give 400 InvalidKey."""
    head = f"PUT /storage/{path}?expires=1&sig=0 HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n"
    response = raw_request(served.port, head + "Content-Length: 1\n", b"x")
    assert status_of(response) == 400, response
    assert b"InvalidKey" in response
    get = f"GET /storage/{path}?expires=1&sig=0 HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n"
    assert status_of(raw_request(served.port, get)) == 400
    assert not (served.storage.root / "escaped.txt").exists()
    assert not (served.storage.root / "objects" / "escaped.txt").exists()


@pytest.mark.parametrize(
    "key", ["../x", "/etc/passwd", "a//b", "a/", "", ".", "a/../b", "a\\b", "a b", "é", "x" * 1025]
)
def test_hostile_keys_are_refused_by_presigning(storage: LocalStorage, key: str) -> None:
    """validate_key and every presign method raise ValueError for an unsafe key."""
    with pytest.raises(ValueError, match="key"):
        validate_key(key)
    with pytest.raises(ValueError, match="key"):
        storage.presign_put(key, size=1, content_type="text/plain", expires_s=60)
    with pytest.raises(ValueError, match="key"):
        storage.presign_get(key, expires_s=60)
    with pytest.raises(ValueError, match="key"):
        storage.create_multipart(key, content_type="text/plain")


_SEGMENT = st.text(alphabet="abcXYZ019._=-", min_size=1, max_size=12).filter(
    lambda s: s not in {".", ".."}
)


@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_keys_of_safe_segments_are_accepted(segments: list[str]) -> None:
    """Any /-joined list of non-dot segments of the allowed alphabet is a valid key."""
    key = "/".join(segments)
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("size", -1, "size"),
        ("expires_s", 0, "expires_s"),
        ("expires_s", 8 * 24 * 3600, "expires_s"),
        ("content_type", "a\nb", "content type"),
    ],
)
def test_presign_put_rejects_bad_arguments(
    storage: LocalStorage, field: str, value: object, match: str
) -> None:
    """Negative sizes, lifetimes outside 1 s..7 days and unsafe content types raise ValueError."""
    arguments: dict[str, object] = {"size": 1, "content_type": "text/plain", "expires_s": 60}
    arguments[field] = value
    with pytest.raises(ValueError, match=match):
        storage.presign_put("a/b", **arguments)  # type: ignore[arg-type]


def upload_parts(
    storage: LocalStorage, http: httpx.Client, key: str, upload_id: str, parts: list[bytes]
) -> list[tuple[int, str]]:
    """PUT each part through its presigned URL and return (part_number, ETag) pairs."""
    etags = []
    for number, data in enumerate(parts, start=1):
        url = storage.presign_part(key, upload_id=upload_id, part_number=number, expires_s=60)
        response = http.put(url, content=data)
        assert response.status_code == 200, response.text
        etags.append((number, response.headers["etag"]))
    return etags


def test_multipart_upload_assembles_parts_in_order(
    storage: LocalStorage, http: httpx.Client
) -> None:
    """Two 5 MiB parts and a remainder complete into one intact object with the upload's type."""
    key = new_key("scene.ply")
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(12345)]
    upload_id = storage.create_multipart(key, content_type="application/x-ply")
    etags = upload_parts(storage, http, key, upload_id, parts)
    assert [etag for _, etag in etags] == [
        f'"{hashlib.md5(p, usedforsecurity=False).hexdigest()}"' for p in parts
    ]
    storage.complete_multipart(key, upload_id=upload_id, parts=etags)
    assert storage.head(key) == ObjectInfo(key, 10 * MIB + 12345, "application/x-ply")
    url, _ = storage.presign_get(key, expires_s=60)
    got = http.get(url).content
    assert hashlib.sha256(got).digest() == hashlib.sha256(b"".join(parts)).digest()
    assert not (storage.root / "uploads" / upload_id).exists()


def test_multipart_completion_checks_etags_sizes_and_order(
    storage: LocalStorage, http: httpx.Client
) -> None:
    """Wrong ETags, small non-last parts, bad order and unknown uploads raise StorageError."""
    key = new_key()
    upload_id = storage.create_multipart(key, content_type="text/plain")
    etags = upload_parts(storage, http, key, upload_id, [b"a" * 100, b"b" * 100])
    cases = {
        "InvalidPart": [(1, '"' + "0" * 32 + '"'), etags[1]],
        "EntityTooSmall": etags,
        "InvalidPartOrder": [etags[1], etags[0]],
    }
    for code, parts in cases.items():
        with pytest.raises(StorageError) as caught:
            storage.complete_multipart(key, upload_id=upload_id, parts=parts)
        assert caught.value.code == code
    with pytest.raises(StorageError) as caught:
        storage.complete_multipart(key, upload_id="0" * 32, parts=etags)
    assert caught.value.code == "NoSuchUpload"
    storage.complete_multipart(key, upload_id=upload_id, parts=[etags[0]])
    assert storage.head(key) == ObjectInfo(key, 100, "text/plain")
    assert MIN_PART_SIZE == 5 * MIB


def test_part_urls_are_bound_to_their_upload(storage: LocalStorage, http: httpx.Client) -> None:
    """Part URLs: another key or part → 403, no Content-Length → 411, after abort → 404."""
    key = new_key()
    upload_id = storage.create_multipart(key, content_type="text/plain")
    url = storage.presign_part(key, upload_id=upload_id, part_number=1, expires_s=60)
    assert http.put(url.replace("part=1", "part=2"), content=b"x").status_code == 403
    assert http.put(url.replace(key, new_key()), content=b"x").status_code == 403
    response = http.put(url, content=iter([b"chunked"]))
    assert response.status_code == 411
    assert error_code(response) == "MissingContentLength"
    storage.abort_multipart(key, upload_id=upload_id)
    response = http.put(url, content=b"x")
    assert response.status_code == 404
    assert error_code(response) == "NoSuchUpload"
    storage.abort_multipart(key, upload_id=upload_id)  # unknown now: a no-op
    other = storage.create_multipart(new_key(), content_type="text/plain")
    forged = storage.presign_part(key, upload_id=other, part_number=1, expires_s=60)
    assert http.put(forged, content=b"x").status_code == 404


def test_delete_removes_the_object_and_absent_delete_succeeds(
    storage: LocalStorage, http: httpx.Client
) -> None:
    """Deleting removes an object (GET then 404); deleting it again is not an error."""
    key = new_key()
    put = storage.presign_put(key, size=2, content_type="text/plain", expires_s=60)
    assert http.put(put.url, content=b"hi", headers=put.headers).status_code == 200
    storage.delete(key)
    assert storage.head(key) is None
    url, _ = storage.presign_get(key, expires_s=60)
    assert http.get(url).status_code == 404
    storage.delete(key)


def test_a_key_under_an_existing_object_is_a_conflict(
    storage: LocalStorage, http: httpx.Client
) -> None:
    """Storing ``a/b`` when ``a`` is an object gives 409; a prefix of objects is not an object."""
    parent = new_key("leaf")
    put = storage.presign_put(parent, size=1, content_type="text/plain", expires_s=60)
    assert http.put(put.url, content=b"1", headers=put.headers).status_code == 200
    child = storage.presign_put(parent + "/child", size=1, content_type="text/plain", expires_s=60)
    response = http.put(child.url, content=b"2", headers=child.headers)
    assert response.status_code == 409
    assert error_code(response) == "KeyConflict"
    assert storage.head(parent.rsplit("/", 1)[0]) is None
    assert temp_files(storage) == []


def test_short_secrets_are_rejected(tmp_path: Path) -> None:
    """A LocalStorage secret under 16 bytes is refused."""
    with pytest.raises(ValueError, match="secret"):
        LocalStorage(tmp_path, "http://127.0.0.1:1", b"short")
