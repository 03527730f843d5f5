"""``cyberun-agent models sync|list|prune``: the team's models now, the cache, a budget.

``sync`` pulls the set with a progress bar. The set comes the way the daemon gets it: a
``hello`` (no capacity, as ``doctor`` sends it) answered by ``welcome.sync``; then
:class:`agent.sync.Syncer` fetches, verifies, places and evicts exactly as the daemon would.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx
from websockets.exceptions import WebSocketException

from agent.doctor import handshake
from agent.protocol.codec import DecodeError
from agent.protocol.messages import SyncModel, SyncProgress
from agent.settings import Settings
from agent.sync import ModelCache, Syncer, SyncReport

BAR = 30


class _Bar:
    """Progress on one redrawn line (a TTY), or nothing (``--json``, pipes)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.drawn = False

    def __call__(self, progress: SyncProgress | None) -> None:
        if not self.enabled or progress is None:
            return
        filled = round(progress.sync_percent / 100 * BAR)
        elapsed = time.monotonic() - self.started
        percent = progress.sync_percent
        eta = elapsed * (100 - percent) / percent if percent else 0.0
        line = (
            f"[{'#' * filled}{'-' * (BAR - filled)}] {progress.sync_percent:5.1f}%  "
            f"ETA {eta:4.0f} s  {progress.sync_detail}"
        )
        print(f"\r\033[K{line[:120]}", end="", flush=True)
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            print(flush=True)


def sync(settings: Settings, *, as_json: bool) -> int:
    """Run one sync; return the exit code (1 when a model could not be had)."""
    credential = settings.credential_value() or ""
    try:
        shake = asyncio.run(handshake(settings, credential))
    except (OSError, TimeoutError, WebSocketException, DecodeError) as exc:  # 401: exit 4
        print(f"cyberun-agent models sync: cannot reach the gateway: {exc}", file=sys.stderr)
        return 1
    models = list(shake.welcome.sync or [])
    bar = _Bar(enabled=sys.stdout.isatty() and not as_json)
    report = asyncio.run(_sync(settings, models, bar))
    bar.close()
    if as_json:
        print(json.dumps(_as_dict(report, len(models)), indent=2))
    else:
        print(
            f"{len(models)} model(s) in the team's set: {len(report.fetched)} fetched, "
            f"{len(report.placed)} placed under {settings.models_dir()}, "
            f"{len(report.evicted)} evicted"
        )
        for problem in report.refused:
            print(f"refused: {problem}")
    return 1 if report.refused else 0


async def _sync(settings: Settings, models: list[SyncModel], bar: _Bar) -> SyncReport:
    cache = ModelCache(settings.cache_dir / "models", budget_bytes=settings.models.budget_bytes)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as http:
        syncer = Syncer(
            cache, settings.models_dir(), http, parallel=settings.models.parallel, on_progress=bar
        )
        return await syncer.sync(models)


def _as_dict(report: SyncReport, wanted: int) -> dict[str, object]:
    return {
        "models": wanted,
        "fetched": report.fetched,
        "placed": [str(path) for path in report.placed],
        "evicted": report.evicted,
        "refused": report.refused,
    }


def list_models(settings: Settings, *, as_json: bool) -> int:
    """``models list``: the cached models, newest use first, and where each is placed."""
    cache = ModelCache(settings.cache_dir / "models")
    rows: list[dict[str, Any]] = [
        {
            "sha256": m.sha256,
            "size": m.size,
            "last_used": m.last_used,
            "placed": [str(p) for p in cache.placements(m.sha256) if p.exists()],
        }
        for m in reversed(cache.models())
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    total = sum(r["size"] for r in rows)
    print(f"{len(rows)} model(s), {total / 2**30:.2f} GiB in {cache.root}")
    for row in rows:
        places = ", ".join(row["placed"]) or "(not placed)"
        print(f"{row['sha256'][:12]}  {row['size'] / 2**20:10.1f} MiB  {places}")
    return 0


def prune(settings: Settings, budget: int) -> int:
    """``models prune``: evict least recently used models until the cache fits ``budget``."""
    cache = ModelCache(settings.cache_dir / "models", budget_bytes=max(0, budget))
    removed = cache.evict(keep=())
    print(f"evicted {len(removed)} model(s); {sum(m.size for m in cache.models())} bytes left")
    return 0
