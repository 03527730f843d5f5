"""The model cache against a real S3 server (SeaweedFS, signatures enforced): multi-MB files.

Models are uploaded with presigned PUTs and fetched through presigned GETs, as the gateway
will hand them out; interruptions are real (the fetching task is cancelled mid-stream, as a
killed agent would stop), and what a later fetch transfers is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from agent.protocol.messages import SyncModel, SyncProgress
from agent.sync import ModelCache, ModelSpec, Syncer, SyncError, check_model_path
from gateway.storage import S3Storage
from tests.agent_process import ROOT, agent_cli
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
async def test_two_caches_on_one_directory_download_a_model_once(
    tmp_path: Path, s3: S3Storage
) -> None:
    """The daemon and `models sync` at once: one downloads, the other waits and finds it."""
    data = os.urandom(4 * MIB)
    spec = stored_model(s3, data)
    async with httpx.AsyncClient(timeout=60) as http:
        one, two = await asyncio.gather(
            ModelCache(tmp_path / "cache").fetch(http, spec),
            ModelCache(tmp_path / "cache").fetch(http, spec),
        )
    assert sorted([one.transferred, two.transferred]) == [0, len(data)]
    assert one.path.read_bytes() == data


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
    assert [p.name for p in cache.partial.iterdir() if p.suffix != ".lock"] == []  # no data kept


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


def test_eviction_also_removes_the_placed_links(tmp_path: Path) -> None:
    """An evicted model leaves the models folder too, or its disk space would never return."""
    cache = ModelCache(tmp_path / "cache", budget_bytes=0)
    data = os.urandom(MIB)
    digest = hashlib.sha256(data).hexdigest()
    cache.blob(digest).write_bytes(data)
    spec = ModelSpec("checkpoints", "old.safetensors", len(data), digest, "http://unused")
    placed = cache.place(spec, tmp_path / "models")
    other = tmp_path / "models" / "checkpoints" / "mine.safetensors"
    other.write_bytes(b"the owner's own file")
    assert cache.evict(keep=()) == [digest]
    assert not placed.exists()
    assert other.read_bytes() == b"the owner's own file"
    assert cache.models() == []


def sync_model(spec: ModelSpec) -> SyncModel:
    """The protocol form of a spec (as welcome.sync carries it)."""
    return SyncModel(
        model_type=spec.model_type,
        model_path=spec.model_path,
        file_size=spec.file_size,
        file_hash=f"sha256:{spec.sha256}",
        download_url=spec.download_url,
    )


@pytest.mark.asyncio
async def test_the_syncer_pulls_a_set_places_it_and_skips_hostile_entries(
    tmp_path: Path, s3: S3Storage
) -> None:
    """A set of two good models and a hostile one: two placed, one refused, progress to 100."""
    first = stored_model(s3, os.urandom(3 * MIB), path="checkpoints/a.safetensors")
    second = stored_model(s3, os.urandom(2 * MIB), path="vae/b.safetensors")
    hostile = sync_model(first).model_copy(update={"model_path": "../../etc/evil"})
    progress: list[SyncProgress | None] = []
    async with httpx.AsyncClient(timeout=60) as http:
        syncer = Syncer(
            ModelCache(tmp_path / "cache"), tmp_path / "models", http, on_progress=progress.append
        )
        report = await syncer.sync([sync_model(first), sync_model(second), hostile])
    assert sorted(report.fetched) == sorted([first.sha256, second.sha256])
    assert {p.relative_to(tmp_path / "models").as_posix() for p in report.placed} == {
        "checkpoints/a.safetensors",
        "vae/b.safetensors",
    }
    assert len(report.refused) == 1
    assert "model_path" in report.refused[0]
    assert not (tmp_path / "etc").exists()
    percents = [p.sync_percent for p in progress if p is not None]
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    assert progress[-1] is None  # done: back to normal
    assert syncer.missing(["checkpoints/a.safetensors", "loras/c.safetensors"]) == [
        "loras/c.safetensors"
    ]
    assert sorted(syncer.held()) == sorted([first.sha256, second.sha256])


def test_models_list_and_prune_commands(tmp_path: Path) -> None:
    """`models list --json` shows blobs and placements; `models prune` evicts to the budget."""
    cache = ModelCache(tmp_path / "cache" / "models")
    digests = []
    for age in range(3):
        data = os.urandom(MIB)
        digest = hashlib.sha256(data).hexdigest()
        cache.blob(digest).write_bytes(data)
        os.utime(cache.blob(digest), (1_000_000 + age, 1_000_000 + age))
        digests.append(digest)
    spec = ModelSpec("checkpoints", "kept.bin", MIB, digests[2], "http://unused")
    cache.place(spec, tmp_path / "models")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_CACHE_DIR": str(tmp_path / "cache"),
        "CYBERUN_AGENT_STATE_DIR": str(tmp_path / "state"),
    }
    listed = json.loads(agent_cli("models", "list", "--json", env=env).stdout)
    assert [row["sha256"] for row in listed] == digests[::-1]  # most recently used first
    assert listed[0]["placed"] == [str(tmp_path / "models" / "checkpoints" / "kept.bin")]
    pruned = agent_cli("models", "prune", "--budget", str(MIB), env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert "evicted 2 model(s)" in pruned.stdout
    assert [m.sha256 for m in cache.models()] == [digests[2]]
    assert agent_cli("models", "prune", env=env).returncode == 3  # no budget configured
