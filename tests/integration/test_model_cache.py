"""The model cache against a real S3 server (SeaweedFS, signatures enforced): multi-MB files.

Models are uploaded with presigned PUTs and fetched through presigned GETs, as the gateway
will hand them out; interruptions are real (the fetching task is cancelled mid-stream, as a
killed agent would stop), and what a later fetch transfers is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import httpx
import pytest

from agent.protocol.messages import SyncModel
from agent.sync import ModelCache, ModelSpec, SyncError, check_model_path
from gateway.storage import S3Storage
from tests.seaweedfs import SeaweedFS

MIB = 1024 * 1024


@pytest.fixture
def s3(seaweedfs: SeaweedFS) -> S3Storage:
    """The gateway's S3 presigner on the real server."""
    storage = S3Storage(
        seaweedfs.endpoint_url, seaweedfs.bucket, seaweedfs.access_key, seaweedfs.secret_key
    )
    storage.ensure_bucket()
    return storage


def stored_model(
    s3: S3Storage, data: bytes, *, path: str = "checkpoints/tiny.safetensors", claim: bytes = b""
) -> ModelSpec:
    """Upload ``data`` and describe it (its hash, or the hash of ``claim`` when given)."""
    key = f"models/test/{uuid.uuid4().hex}"
    put = s3.presign_put(
        key, size=len(data), content_type="application/octet-stream", expires_s=300
    )
    assert httpx.put(put.url, content=data, headers=put.headers, timeout=60).status_code == 200
    url, _ = s3.presign_get(key, expires_s=300)
    digest = hashlib.sha256(claim or data).hexdigest()
    model_type, model_path = path.split("/", 1)
    return ModelSpec.of(
        SyncModel(
            model_type=model_type,
            model_path=model_path,
            file_size=len(data),
            file_hash=f"sha256:{digest}",
            download_url=url,
        )
    )


@pytest.mark.asyncio
async def test_sync_from_empty_verifies_and_places_atomically(
    tmp_path: Path, s3: S3Storage
) -> None:
    """A 6 MiB model lands as a verified blob and a hard link under models/<type>/<path>."""
    data = os.urandom(6 * MIB)
    spec = stored_model(s3, data, path="loras/style/anime.safetensors")
    cache = ModelCache(tmp_path / "cache")
    async with httpx.AsyncClient(timeout=60) as http:
        fetched = await cache.fetch(http, spec)
        again = await cache.fetch(http, spec)
    assert fetched.transferred == len(data)
    assert again.transferred == 0  # a cache hit
    placed = cache.place(spec, tmp_path / "comfyui" / "models")
    assert placed == tmp_path / "comfyui" / "models" / "loras" / "style" / "anime.safetensors"
    assert placed.read_bytes() == data
    assert placed.stat().st_ino == cache.blob(spec.sha256).stat().st_ino
    assert not [p for p in placed.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.asyncio
async def test_an_interrupted_download_resumes_without_fetching_bytes_twice(
    tmp_path: Path, s3: S3Storage
) -> None:
    """Cut after ≥ 3 MiB; a new cache (a restarted agent) fetches only the rest (Range)."""
    data = os.urandom(8 * MIB)
    spec = stored_model(s3, data)
    halfway = asyncio.Event()

    def progress(done: int, _total: int) -> None:
        if done >= 3 * MIB:
            halfway.set()

    async with httpx.AsyncClient(timeout=60) as http:
        first = asyncio.create_task(ModelCache(tmp_path / "cache").fetch(http, spec, progress))
        await asyncio.wait_for(halfway.wait(), 60)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        part = tmp_path / "cache" / "partial" / f"{spec.sha256}.part"
        kept = part.stat().st_size
        assert 3 * MIB <= kept < len(data)
        resumed = await ModelCache(tmp_path / "cache").fetch(http, spec)
    assert resumed.resumed_from == kept
    assert resumed.transferred == len(data) - kept
    assert resumed.path.read_bytes() == data


@pytest.mark.asyncio
async def test_a_corrupted_partial_file_is_detected_and_replaced(
    tmp_path: Path, s3: S3Storage
) -> None:
    """A partial file with wrong bytes fails verification; the model is fetched again whole."""
    data = os.urandom(2 * MIB)
    spec = stored_model(s3, data)
    cache = ModelCache(tmp_path / "cache")
    (cache.partial / f"{spec.sha256}.part").write_bytes(b"\0" * MIB)  # same length, wrong bytes
    async with httpx.AsyncClient(timeout=60) as http:
        fetched = await cache.fetch(http, spec)
    assert fetched.path.read_bytes() == data
    assert fetched.transferred == len(data) + MIB  # the rest of the bad one, then all of it


@pytest.mark.asyncio
async def test_content_that_never_matches_its_hash_is_refused(
    tmp_path: Path, s3: S3Storage
) -> None:
    """A model whose bytes are not what its file_hash says ends in SyncError, nothing kept."""
    spec = stored_model(s3, os.urandom(MIB), claim=b"something else")
    cache = ModelCache(tmp_path / "cache")
    async with httpx.AsyncClient(timeout=60) as http:
        with pytest.raises(SyncError, match="does not match"):
            await cache.fetch(http, spec)
    assert not cache.has(spec.sha256)
    assert list(cache.partial.iterdir()) == []


@pytest.mark.parametrize(
    "path",
    ["../escape.bin", "/etc/passwd", "a\\b.bin", "a//b", "./a", "a/../../b", "C:/x", "", "a\x00b"],
)
def test_hostile_model_paths_are_refused(path: str) -> None:
    """Absolute, parent-escaping, backslash, empty-segment and control-character paths fail."""
    with pytest.raises(ValueError, match="model_path"):
        check_model_path(path)


def test_placement_refuses_a_symlinked_folder_that_leads_outside(tmp_path: Path) -> None:
    """models/<type>/link -> /elsewhere cannot be used to write outside the models dir."""
    cache = ModelCache(tmp_path / "cache")
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    cache.blob(digest).write_bytes(data)
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (models / "checkpoints" / "link").symlink_to(outside)
    spec = ModelSpec("checkpoints", "link/x.bin", len(data), digest, "http://unused")
    with pytest.raises(SyncError, match="leaves"):
        cache.place(spec, models)
    assert list(outside.iterdir()) == []


def test_eviction_keeps_the_budget_the_sync_set_and_models_in_use(tmp_path: Path) -> None:
    """Least recently used blobs go first; wanted and in-use ones are never evicted."""
    cache = ModelCache(tmp_path / "cache", budget_bytes=3 * MIB)
    digests = []
    for age in range(5):  # five 1 MiB blobs, oldest first
        data = os.urandom(MIB)
        digest = hashlib.sha256(data).hexdigest()
        cache.blob(digest).write_bytes(data)
        os.utime(cache.blob(digest), (1_000_000 + age, 1_000_000 + age))
        digests.append(digest)
    removed = cache.evict(keep=[digests[0]], in_use=[digests[1]])
    assert removed == digests[2:4]
    assert sorted(m.sha256 for m in cache.models()) == sorted([*digests[:2], digests[4]])
    assert sum(m.size for m in cache.models()) <= 3 * MIB
    assert cache.evict(keep=digests, in_use=()) == []  # over budget, but all wanted: kept
