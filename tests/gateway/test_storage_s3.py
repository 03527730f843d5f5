"""S3Storage against a real SeaweedFS server: presigned URLs are honoured and refused as S3 does."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.storage import ObjectInfo, ObjectStorage, S3Storage, StorageError
from tests.seaweedfs import (
    SeaweedFS,
    SeaweedFSError,
    _assert_signatures_enforced,
    _launch,
    _wait_until_ready,
)

pytest_plugins = ["tests.seaweedfs"]

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def storage(seaweedfs: SeaweedFS) -> S3Storage:
    """An S3Storage on the session's SeaweedFS bucket."""
    s3 = S3Storage(
        seaweedfs.endpoint_url, seaweedfs.bucket, seaweedfs.access_key, seaweedfs.secret_key
    )
    s3.ensure_bucket()
    return s3


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain HTTP client, as the agent or a browser would use for presigned URLs."""
    with httpx.Client(timeout=30.0) as client:
        yield client


def new_key(name: str = "file.bin") -> str:
    """Return a key no other test uses."""
    return f"inputs/team-1/{uuid.uuid4()}/{name}"


def test_s3_storage_satisfies_the_protocol(storage: S3Storage) -> None:
    """S3Storage is an ObjectStorage (checked by mypy) whose head of an absent key is None."""
    as_protocol: ObjectStorage = storage
    assert as_protocol.head(new_key()) is None


def test_presigned_put_with_headers_verbatim_stores_the_object(
    storage: S3Storage, http: httpx.Client
) -> None:
    """A PUT sending exactly the returned headers succeeds and head reports size and type."""
    key, body = new_key("image.png"), os.urandom(1000)
    before = datetime.now(UTC)
    put = storage.presign_put(key, size=len(body), content_type="image/png", expires_s=300)
    assert put.headers == {
        "Content-Length": "1000",
        "Content-Type": "image/png",
        "If-None-Match": "*",
    }
    assert before - timedelta(seconds=2) < put.expires_at - timedelta(seconds=300) <= before
    response = http.put(put.url, content=body, headers=put.headers)
    assert response.status_code == 200, response.text
    assert (
        response.headers["etag"].strip('"') == hashlib.md5(body, usedforsecurity=False).hexdigest()
    )
    assert storage.head(key) == ObjectInfo(key=key, size=1000, content_type="image/png")


def test_returned_headers_are_exactly_the_signed_ones(storage: S3Storage) -> None:
    """``headers`` names every header in X-Amz-SignedHeaders except Host, and nothing else."""
    put = storage.presign_put(new_key(), size=5, content_type="text/plain", expires_s=60)
    signed = parse_qs(urlsplit(put.url).query)["X-Amz-SignedHeaders"][0].split(";")
    assert sorted(signed) == sorted(["host", *(name.lower() for name in put.headers)])


@pytest.mark.parametrize("missing", ["Content-Type", "If-None-Match", "Content-Length"])
def test_put_without_a_signed_header_is_refused(
    storage: S3Storage, http: httpx.Client, missing: str
) -> None:
    """Leaving out any signed header (chunked instead of Content-Length too) gives 403."""
    key, body = new_key(), b"0123456789"
    put = storage.presign_put(key, size=len(body), content_type="text/plain", expires_s=60)
    headers = {name: value for name, value in put.headers.items() if name != missing}
    content: bytes | Iterator[bytes] = iter([body]) if missing == "Content-Length" else body
    response = http.put(put.url, content=content, headers=headers)
    assert response.status_code == 403, response.text
    assert storage.head(key) is None


@pytest.mark.parametrize(
    ("header", "value"), [("Content-Type", "text/html"), ("Content-Length", "9")]
)
def test_put_with_a_different_signed_value_is_refused(
    storage: S3Storage, http: httpx.Client, header: str, value: str
) -> None:
    """A Content-Type or Content-Length other than the signed one gives 403."""
    key = new_key()
    put = storage.presign_put(key, size=10, content_type="text/plain", expires_s=60)
    body = b"x" * int(value) if header == "Content-Length" else b"x" * 10
    response = http.put(put.url, content=body, headers={**put.headers, header: value})
    assert response.status_code == 403, response.text
    assert storage.head(key) is None


@pytest.mark.parametrize("part", ["signature", "key", "expires"])
def test_tampered_url_is_refused(storage: S3Storage, http: httpx.Client, part: str) -> None:
    """Changing the signature, the key or the lifetime of a presigned PUT gives 403."""
    key, body = new_key(), b"payload"
    put = storage.presign_put(key, size=len(body), content_type="text/plain", expires_s=60)
    url = {
        "signature": put.url[:-1] + ("0" if put.url[-1] != "0" else "1"),
        "key": put.url.replace(key, new_key(), 1),
        "expires": put.url.replace("X-Amz-Expires=60", "X-Amz-Expires=600", 1),
    }[part]
    assert url != put.url
    response = http.put(url, content=body, headers=put.headers)
    assert response.status_code == 403, response.text
    assert storage.head(key) is None


def test_expired_url_is_refused(storage: S3Storage, http: httpx.Client) -> None:
    """A presigned PUT used after its expiry gives 403 (the one test that waits, ≤ 2 s)."""
    key, body = new_key(), b"late"
    put = storage.presign_put(key, size=len(body), content_type="text/plain", expires_s=1)
    deadline = put.expires_at + timedelta(milliseconds=300)
    while datetime.now(UTC) < deadline:  # wait for the clock to pass the expiry, nothing else
        time.sleep(0.05)
    response = http.put(put.url, content=body, headers=put.headers)
    assert response.status_code == 403, response.text
    assert "expired" in response.text
    assert storage.head(key) is None


def test_existing_object_put_is_refused_with_412(storage: S3Storage, http: httpx.Client) -> None:
    """SeaweedFS enforces If-None-Match: * — a second PUT to an existing key gives 412."""
    key = new_key()
    first = storage.presign_put(key, size=5, content_type="text/plain", expires_s=60)
    assert http.put(first.url, content=b"first", headers=first.headers).status_code == 200
    second = storage.presign_put(key, size=6, content_type="text/plain", expires_s=60)
    response = http.put(second.url, content=b"second", headers=second.headers)
    assert response.status_code == 412, response.text
    url, _ = storage.presign_get(key, expires_s=60)
    assert http.get(url).content == b"first"


def test_presigned_get_returns_the_bytes(storage: S3Storage, http: httpx.Client) -> None:
    """A presigned GET returns the stored bytes and content type; a tampered one gives 403."""
    key, body = new_key("out.json"), b'{"ok": true}'
    put = storage.presign_put(key, size=len(body), content_type="application/json", expires_s=60)
    assert http.put(put.url, content=body, headers=put.headers).status_code == 200
    url, expires_at = storage.presign_get(key, expires_s=120)
    assert expires_at > datetime.now(UTC) + timedelta(seconds=100)
    response = http.get(url)
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["content-type"] == "application/json"
    assert http.get(url[:-1] + ("0" if url[-1] != "0" else "1")).status_code == 403


def test_multipart_upload_assembles_parts_in_order(storage: S3Storage, http: httpx.Client) -> None:
    """Two 5 MiB parts and a remainder, PUT through presigned part URLs, complete intact."""
    key = new_key("scene.ply")
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(12345)]
    upload_id = storage.create_multipart(key, content_type="application/octet-stream")
    etags = []
    for number, data in enumerate(parts, start=1):
        url = storage.presign_part(key, upload_id=upload_id, part_number=number, expires_s=60)
        response = http.put(url, content=data)
        assert response.status_code == 200, response.text
        etags.append((number, response.headers["etag"]))
    storage.complete_multipart(key, upload_id=upload_id, parts=etags)
    info = storage.head(key)
    assert info == ObjectInfo(key, 10 * MIB + 12345, "application/octet-stream")
    url, _ = storage.presign_get(key, expires_s=60)
    assert (
        hashlib.sha256(http.get(url).content).digest() == hashlib.sha256(b"".join(parts)).digest()
    )


def test_complete_with_a_wrong_etag_raises_invalid_part(
    storage: S3Storage, http: httpx.Client
) -> None:
    """Completing with an ETag that is not the part's raises StorageError InvalidPart."""
    key = new_key()
    upload_id = storage.create_multipart(key, content_type="text/plain")
    url = storage.presign_part(key, upload_id=upload_id, part_number=1, expires_s=60)
    assert http.put(url, content=b"abc").status_code == 200
    with pytest.raises(StorageError) as caught:
        storage.complete_multipart(key, upload_id=upload_id, parts=[(1, '"' + "0" * 32 + '"')])
    assert caught.value.code == "InvalidPart"
    storage.abort_multipart(key, upload_id=upload_id)
    assert storage.head(key) is None


def test_abort_and_unknown_uploads(storage: S3Storage, http: httpx.Client) -> None:
    """Abort discards an upload (its part URLs then 404) and aborting an unknown one is a no-op."""
    key = new_key()
    upload_id = storage.create_multipart(key, content_type="text/plain")
    storage.abort_multipart(key, upload_id=upload_id)
    url = storage.presign_part(key, upload_id=upload_id, part_number=1, expires_s=60)
    assert http.put(url, content=b"abc").status_code == 404
    storage.abort_multipart(key, upload_id="no-such-upload")
    with pytest.raises(StorageError) as caught:
        storage.complete_multipart(key, upload_id="no-such-upload", parts=[(1, '"x"')])
    assert caught.value.code == "NoSuchUpload"


def test_delete_removes_the_object_and_absent_delete_succeeds(
    storage: S3Storage, http: httpx.Client
) -> None:
    """Deleting removes an object; deleting it again is not an error."""
    key = new_key()
    put = storage.presign_put(key, size=2, content_type="text/plain", expires_s=60)
    assert http.put(put.url, content=b"hi", headers=put.headers).status_code == 200
    storage.delete(key)
    assert storage.head(key) is None
    storage.delete(key)


def test_unreachable_endpoint_raises_storage_error() -> None:
    """Network failures surface as StorageError, not botocore exceptions; presigning needs none."""
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s3 = S3Storage(f"http://127.0.0.1:{port}", "bucket", "ak", "sk")
    url, _ = s3.presign_get("a/b", expires_s=60)
    assert url.startswith(f"http://127.0.0.1:{port}/bucket/a/b?")
    with pytest.raises(StorageError) as caught:
        s3.head("a/b")
    assert caught.value.code == "Unavailable"


def test_fixture_rejects_a_server_that_accepts_any_signature(tmp_path: Path) -> None:
    """Without -s3.config weed accepts tampered URLs, and the fixture's start-up check says so."""
    server = _launch(tmp_path, "permissive", identities=False)
    try:
        _wait_until_ready(server)
        with pytest.raises(SeaweedFSError, match="does not enforce signatures"):
            _assert_signatures_enforced(server)
    finally:
        server.stop()
