"""The model cache: content-addressed, verified, resumable, within a disk budget (issue 11).

Layout under ``root`` (``<cache_dir>/models``)::

    blobs/<sha256>          complete files, verified against their hash; mtime = last use
    partial/<sha256>.part   a download in progress (kept across restarts and resumed)
    partial/<sha256>.lock   held (flock) by the one process downloading that model
    links/<sha256>          where the blob was placed (one path a line), removed with it

- :meth:`ModelCache.fetch` streams a model's presigned URL into its ``.part`` file, resuming
  with ``Range: bytes=<have>-`` after an interruption or a restart (a server that ignores the
  range gets the file from the start); the whole file's SHA-256 and size are checked before
  it becomes a blob (atomic rename). A mismatch deletes the partial file and downloads once
  more from zero; a second mismatch is a :class:`SyncError`.
- :meth:`ModelCache.place` puts a blob where a runtime looks for it
  (``<models_dir>/<model_type>/<model_path>``) as a hard link (a symlink across
  filesystems), through a temporary name and ``os.replace``: a runtime never sees a partial
  file.
- :meth:`ModelCache.evict` removes least recently used blobs beyond the budget, never one in
  the sync set or in use by a running task.

Every ``model_path`` passes :func:`check_model_path` (the documented rule: relative, no
``..``, no backslash) before anything touches the disk.
:class:`Syncer` runs the team's set (``welcome.sync``, then each ``sync`` message) through
all of this for the daemon, reporting progress for the ``syncing`` status.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from agent.errors import AgentError
from agent.protocol.messages import SyncModel, SyncProgress

log = structlog.get_logger("agent.sync")
CHUNK = 1024 * 1024
ATTEMPTS = 3
_HEX = re.compile(r"[0-9a-f]{64}")
_TYPE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


class SyncError(AgentError):
    """A model could not be fetched or placed; the message says which and why."""


def check_model_path(path: str) -> str:
    """Return ``path`` if it is a safe relative model path, else raise ``ValueError``."""
    if not path or len(path) > 500:
        raise ValueError("model_path must be 1-500 characters")
    if "\\" in path:
        raise ValueError("model_path must not contain a backslash")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ValueError("model_path must be relative")
    parts = path.split("/")
    if any(part in {"", ".", ".."} for part in parts):
        raise ValueError("model_path must not contain '..', '.' or empty segments")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise ValueError("model_path must not contain control characters")
    return path


@dataclass(frozen=True)
class ModelSpec:
    """One model of the sync set, validated."""

    model_type: str
    model_path: str
    file_size: int
    sha256: str
    download_url: str

    @classmethod
    def of(cls, model: SyncModel) -> ModelSpec:
        """Validate a protocol ``SyncModel`` (``ValueError`` naming the field and rule)."""
        if not _TYPE.fullmatch(model.model_type):
            raise ValueError("model_type must be 1-64 of a-z 0-9 _ . - (a models/ subfolder)")
        return cls(
            model_type=model.model_type,
            model_path=check_model_path(model.model_path),
            file_size=model.file_size,
            sha256=model.file_hash.removeprefix("sha256:"),
            download_url=model.download_url,
        )


@dataclass(frozen=True)
class Fetched:
    """The outcome of one :meth:`ModelCache.fetch`."""

    path: Path
    transferred: int
    """Bytes received over the network by this call (0 for a cache hit)."""
    resumed_from: int = 0


@dataclass(frozen=True)
class CachedModel:
    """A blob in the cache."""

    sha256: str
    size: int
    last_used: float


class ModelCache:
    """See the module docstring. Methods that stream are async; the rest are quick file ops."""

    def __init__(self, root: Path, *, budget_bytes: int | None = None) -> None:
        """Use (and create) ``root``."""
        self.root = root
        self.budget_bytes = budget_bytes
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.links = root / "links"
        for directory in (self.blobs, self.partial, self.links):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def blob(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives (whether or not it is there)."""
        if not _HEX.fullmatch(sha256):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return self.blobs / sha256

    def has(self, sha256: str) -> bool:
        """Whether the blob is cached."""
        return self.blob(sha256).is_file()

    def models(self) -> list[CachedModel]:
        """Every cached blob, least recently used first."""
        found = []
        for path in self.blobs.iterdir():
            if _HEX.fullmatch(path.name):
                stat = path.stat()
                found.append(CachedModel(path.name, stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda m: m.last_used)

    def touch(self, sha256: str) -> None:
        """Record a use (the LRU clock is the blob's mtime)."""
        os.utime(self.blob(sha256))

    # ------------------------------------------------------------------ fetching

    async def fetch(
        self,
        http: httpx.AsyncClient,
        spec: ModelSpec,
        on_progress: Callable[[int, int], None] = lambda _done, _total: None,
    ) -> Fetched:
        """Make the blob of ``spec`` present and verified; resume what a past try left.

        One process at a time downloads a given model (a lock file beside its ``.part``):
        ``models sync`` run next to the daemon waits for it, then finds the blob.
        """
        target = self.blob(spec.sha256)
        if target.is_file():
            self.touch(spec.sha256)
            return Fetched(target, 0)
        lock = await _exclusive(self.partial / f"{spec.sha256}.lock")
        try:
            if target.is_file():  # another process fetched it meanwhile
                self.touch(spec.sha256)
                return Fetched(target, 0)
            return await self._fetch_unlocked(http, spec, target, on_progress)
        finally:
            os.close(lock)  # releases the lock

    async def _fetch_unlocked(
        self,
        http: httpx.AsyncClient,
        spec: ModelSpec,
        target: Path,
        on_progress: Callable[[int, int], None],
    ) -> Fetched:
        part = self.partial / f"{spec.sha256}.part"
        transferred, resumed_from, mismatches = 0, _size(part), 0
        for attempt in range(ATTEMPTS):
            try:
                transferred += await self._download(http, spec, part, on_progress)
            except (httpx.HTTPError, OSError) as exc:
                if attempt == ATTEMPTS - 1:
                    raise SyncError(f"{spec.model_path}: download failed: {exc}") from exc
                continue  # resume from what arrived
            if await asyncio.to_thread(_verify, part, spec):  # hashing GBs: off the loop
                part.replace(target)
                return Fetched(target, transferred, resumed_from)
            part.unlink(missing_ok=True)
            mismatches += 1
            if mismatches > 1:
                break
        raise SyncError(
            f"{spec.model_path}: content does not match {spec.file_size} bytes / sha256 "
            f"{spec.sha256[:12]}… (downloaded twice)"
        )

    async def _download(
        self,
        http: httpx.AsyncClient,
        spec: ModelSpec,
        part: Path,
        on_progress: Callable[[int, int], None],
    ) -> int:
        """Append the missing bytes of ``spec`` to ``part``; return how many arrived."""
        have = _resume_offset(part, spec.file_size)
        if have == spec.file_size:
            return 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        received = 0
        async with http.stream("GET", spec.download_url, headers=headers) as answer:
            if answer.status_code == 200 and have:  # the range was ignored: start over
                have = 0
            elif answer.status_code not in (200, 206):
                raise SyncError(f"{spec.model_path}: download answered HTTP {answer.status_code}")
            with part.open("r+b" if have else "wb") as out:
                out.seek(have)
                out.truncate()
                async for chunk in answer.aiter_bytes(CHUNK):
                    if have + received + len(chunk) > spec.file_size:
                        raise SyncError(f"{spec.model_path}: larger than {spec.file_size} bytes")
                    out.write(chunk)
                    received += len(chunk)
                    on_progress(have + received, spec.file_size)
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
        return received

    # ------------------------------------------------------------------ placing, evicting

    def place(self, spec: ModelSpec, models_dir: Path) -> Path:
        """Link the blob to ``<models_dir>/<model_type>/<model_path>`` atomically."""
        blob = self.blob(spec.sha256)
        if not blob.is_file():
            raise SyncError(f"{spec.model_path}: not in the cache")
        base = (models_dir / spec.model_type).resolve()
        target = base / check_model_path(spec.model_path)
        if not target.resolve().is_relative_to(base):  # a symlinked folder pointing outside
            raise SyncError(f"{spec.model_path}: leaves {base}")
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.link(blob, temp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            temp.symlink_to(blob)
        temp.replace(target)
        self.touch(spec.sha256)
        known = set(self.placements(spec.sha256))
        if target not in known:
            with (self.links / spec.sha256).open("a", encoding="utf-8") as out:
                out.write(f"{target}\n")
        return target

    def placements(self, sha256: str) -> list[Path]:
        """Where the blob was placed (paths that may since have been replaced by others)."""
        try:
            text = (self.links / sha256).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [Path(line) for line in text.splitlines() if line]

    def remove(self, sha256: str) -> None:
        """Delete a blob and every placement that still is it (so the disk space comes back)."""
        blob = self.blob(sha256)
        try:
            inode = blob.stat().st_ino
        except FileNotFoundError:
            inode = None
        for path in self.placements(sha256):
            with contextlib.suppress(OSError):
                if (path.is_symlink() and path.resolve() == blob.resolve()) or (
                    inode is not None and path.stat().st_ino == inode
                ):
                    path.unlink()
        (self.links / sha256).unlink(missing_ok=True)
        blob.unlink(missing_ok=True)

    def evict(self, keep: Iterable[str], in_use: Iterable[str] = ()) -> list[str]:
        """Remove LRU blobs outside ``keep`` and ``in_use`` until within the budget."""
        if self.budget_bytes is None:
            return []
        spared = set(keep) | set(in_use)
        cached = self.models()
        total = sum(m.size for m in cached)
        removed = []
        for model in cached:
            if total <= self.budget_bytes:
                break
            if model.sha256 in spared:
                continue
            self.remove(model.sha256)
            total -= model.size
            removed.append(model.sha256)
        return removed


LOCK_RETRY_S = 0.5


async def _exclusive(path: Path) -> int:
    """An open descriptor holding an exclusive ``flock`` on ``path`` (close it to release).

    Another process may hold it for a whole download: it is retried every ``LOCK_RETRY_S``
    (an inter-process lock has no event to await), and a cancelled wait holds nothing.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await asyncio.sleep(LOCK_RETRY_S)
                continue
            return fd
    except BaseException:
        os.close(fd)
        raise


def _resume_offset(part: Path, size: int) -> int:
    """How much of a download ``part`` already holds (a too-long part is discarded)."""
    have = _size(part)
    if have > size:
        part.unlink()
        return 0
    return have


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _verify(path: Path, spec: ModelSpec) -> bool:
    """Whether ``path`` has the size and SHA-256 ``spec`` declares."""
    if _size(path) != spec.file_size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == spec.sha256


@dataclass(frozen=True)
class SyncReport:
    """What one pass over the team's set did."""

    fetched: list[str]
    placed: list[Path]
    evicted: list[str]
    refused: list[str]
    """Entries of the set skipped: hostile path, bad type, or a failed download (why)."""


class Syncer:
    """Brings the cache and the models folder in line with the team's set, one set at a time.

    :meth:`offer` hands over a new set (the latest wins); :meth:`run` works through it:
    validate each entry, fetch what is missing (``parallel`` at once, progress reported
    through ``on_progress``; ``None`` when done), place every model, evict outside the set.
    """

    def __init__(
        self,
        cache: ModelCache,
        models_dir: Path,
        http: httpx.AsyncClient,
        *,
        parallel: int = 2,
        on_progress: Callable[[SyncProgress | None], None] = lambda _progress: None,
        in_use: Callable[[], set[str]] = set,
    ) -> None:
        """Nothing runs until :meth:`run`."""
        self.cache = cache
        self.models_dir = models_dir
        self.http = http
        self.parallel = parallel
        self.on_progress = on_progress
        self.in_use = in_use
        self.specs: dict[str, ModelSpec] = {}
        """The current set, by ``<model_type>/<model_path>`` (how workflows name them)."""
        self._offered: list[SyncModel] | None = None
        self._changed = asyncio.Event()

    def offer(self, models: list[SyncModel]) -> None:
        """A new set from the gateway (replaces any set not yet worked on)."""
        self._offered = models
        self._changed.set()

    async def run(self) -> None:
        """Work through each offered set until cancelled."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            report = await self.sync(self._offered or [])
            log.info(
                "models synced",
                fetched=len(report.fetched),
                placed=len(report.placed),
                evicted=len(report.evicted),
                refused=report.refused,
            )

    async def sync(self, models: list[SyncModel]) -> SyncReport:
        """One pass over ``models`` (see the class docstring)."""
        specs, refused = [], []
        for model in models:
            try:
                specs.append(ModelSpec.of(model))
            except ValueError as exc:
                refused.append(f"{model.model_type}/{model.model_path}: {exc}"[:300])
        missing = [s for s in specs if not self.cache.has(s.sha256)]
        fetched = await self._fetch_all(missing, refused)
        present = [spec for spec in specs if self.cache.has(spec.sha256)]
        placed = [await asyncio.to_thread(self.cache.place, s, self.models_dir) for s in present]
        self.specs = {f"{s.model_type}/{s.model_path}": s for s in specs}
        keep = {s.sha256 for s in specs}
        evicted = await asyncio.to_thread(self.cache.evict, keep, self.in_use())
        self.on_progress(None)
        return SyncReport(fetched, placed, evicted, refused)

    async def _fetch_all(self, missing: list[ModelSpec], refused: list[str]) -> list[str]:
        total = sum(s.file_size for s in missing) or 1
        done: dict[str, int] = {}
        gate = asyncio.Semaphore(self.parallel)
        fetched: list[str] = []

        async def one(spec: ModelSpec) -> None:
            def progress(have: int, _size: int) -> None:
                done[spec.sha256] = have
                self.on_progress(
                    SyncProgress(
                        sync_phase="downloading",
                        sync_detail=f"{spec.model_type}/{spec.model_path}"[:256],
                        sync_percent=min(100.0, 100.0 * sum(done.values()) / total),
                    )
                )

            async with gate:
                try:
                    await self.cache.fetch(self.http, spec, progress)
                except SyncError as exc:
                    refused.append(str(exc)[:300])
                    return
                fetched.append(spec.sha256)

        if missing:
            self.on_progress(SyncProgress(sync_phase="downloading", sync_percent=0.0))
            async with asyncio.TaskGroup() as group:
                for spec in missing:
                    group.create_task(one(spec))
        return fetched

    def missing(self, required: Iterable[str]) -> list[str]:
        """Which of a task's ``required_models`` (``type/path``) are not ready here."""
        return [
            name
            for name in required
            if name not in self.specs or not self.cache.has(self.specs[name].sha256)
        ]

    def held(self) -> tuple[str, ...]:
        """The content hashes this agent holds (``hello.models``)."""
        return tuple(m.sha256 for m in self.cache.models())
