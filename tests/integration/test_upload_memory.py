"""agent.transfer uploads 200 MB to a real SeaweedFS in bounded memory.

Each upload runs in a fresh child process (``python -m bench.upload --child``, the benchmark's
own harness) that reads its ``VmRSS`` after its imports, resets ``VmHWM`` to it, uploads and
reports ``VmHWM``: the growth is what the upload itself kept resident, whatever the test
process holds. The stored object is then checked by size (HEAD) and SHA-256 (a presigned GET).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.upload import (
    CONTENT_TYPE,
    MIB,
    Upload,
    parts_job,
    presigned_parts,
    run_agent,
    single_job,
    storage_for,
    stored_sha256,
    write_random_file,
)
from gateway.storage import S3Storage
from tests.seaweedfs import SeaweedFS

SIZE = 200 * MIB
PART_SIZE = 16 * MIB
GROWTH_LIMIT_KIB = 64 * 1024  # 64 MiB
CHILD_TIMEOUT_S = 45.0  # ~2-6 s on a 2-core machine; the suite's own timeout is 60 s


@dataclass(frozen=True)
class Payload:
    """A random file on disk and its SHA-256."""

    path: Path
    sha256: str


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Payload]:
    """One 200 MiB random file for the module, written 1 MiB at a time, deleted afterwards."""
    path = tmp_path_factory.mktemp("upload-memory") / "payload.bin"
    try:
        yield Payload(path, write_random_file(path, SIZE))
    finally:
        path.unlink(missing_ok=True)  # pytest keeps the last sessions' temp dirs


@pytest.fixture
def storage(seaweedfs: SeaweedFS) -> S3Storage:
    """The gateway's S3 storage on the session's SeaweedFS bucket."""
    return storage_for(seaweedfs)


@pytest.fixture
def key(storage: S3Storage) -> Iterator[str]:
    """A fresh object key, deleted after the test (the objects are large)."""
    name = f"memory/{uuid.uuid4().hex}.bin"
    yield name
    storage.delete(name)


def assert_bounded(result: Upload) -> None:
    """Fail unless the child's peak RSS grew by less than 64 MiB during the upload."""
    assert result.growth_kib is not None
    # Without a VmHWM reset the peak includes the imports' transient one: stricter, not looser.
    reset = "" if result.peak_reset else " (VmHWM not reset: includes the imports' peak)"
    assert result.growth_kib < GROWTH_LIMIT_KIB, f"peak RSS grew by {result.growth_kib} KiB{reset}"


def assert_stored(storage: S3Storage, key: str, payload: Payload) -> None:
    """Fail unless the stored object has the file's size and SHA-256."""
    info = storage.head(key)
    assert info is not None
    assert info.size == SIZE
    assert stored_sha256(storage, key) == payload.sha256


@pytest.mark.slow
def test_upload_of_200_mb_grows_peak_rss_by_under_64_mb(
    payload: Payload, storage: S3Storage, key: str, tmp_path: Path
) -> None:
    """A 200 MB presigned PUT by agent.transfer.upload keeps under 64 MB more resident."""
    put = storage.presign_put(key, size=SIZE, content_type=CONTENT_TYPE, expires_s=600)

    result = run_agent(
        single_job(payload.path, put.url, put.headers),
        workdir=tmp_path,
        timeout_s=CHILD_TIMEOUT_S,
    )

    assert_bounded(result)
    assert_stored(storage, key, payload)


@pytest.mark.slow
def test_multipart_upload_of_200_mb_grows_peak_rss_by_under_64_mb(
    payload: Payload, storage: S3Storage, key: str, tmp_path: Path
) -> None:
    """agent.transfer.upload_parts of 200 MB in 16 MiB parts keeps under 64 MB more resident."""
    upload_id, parts = presigned_parts(storage, key, SIZE, PART_SIZE)
    try:
        result = run_agent(
            parts_job(payload.path, parts), workdir=tmp_path, timeout_s=CHILD_TIMEOUT_S
        )
        storage.complete_multipart(key, upload_id=upload_id, parts=result.parts)
    except BaseException:
        storage.abort_multipart(key, upload_id=upload_id)
        raise

    assert [number for number, _ in result.parts] == list(range(1, 14))  # 12 x 16 MiB + 8 MiB
    assert_bounded(result)
    assert_stored(storage, key, payload)
