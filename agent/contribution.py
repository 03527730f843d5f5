"""What this machine has served, per pool, kept across restarts (``<state_dir>/contribution.json``).

The Prometheus counters of :mod:`agent.metrics` start at zero with each process, as counters
do; an owner asking "what did I contribute?" wants the machine's lifetime. This file holds
it: per pool, attempts by outcome and GPU-seconds, and when counting began::

    {"version": 1, "since": "2026-12-01T14:00:00Z",
     "pools": {"community": {"completed": 3, "failed": 0, "cancelled": 0,
                             "preempted": 1, "gpu_seconds": 812.5}, "team": {...}}}

It is written when counting starts and rewritten whole after each reported attempt (a
temporary file, fsync, ``os.replace``), so a crash leaves the old or the new totals, never
half of one. A file that cannot be read as such totals (hand-edited, truncated by a full
disk) is moved aside as ``contribution.json.broken`` and counting starts again; a write that
fails (a full disk) is logged and retried with the next attempt — accounting never stops a
task.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

log = structlog.get_logger(__name__)

VERSION: Final = 1
FILE_NAME: Final = "contribution.json"
MAX_BYTES: Final = 64 * 1024
"""A larger file is not one this module wrote."""
STAMP: Final = "%Y-%m-%dT%H:%M:%SZ"
"""How ``since`` is written (UTC, whole seconds)."""

Totals = dict[str, dict[str, float]]


class ContributionFile:
    """Lifetime per-pool totals in one small JSON file (blocking I/O, a few hundred bytes)."""

    def __init__(self, path: Path, *, now: datetime | None = None) -> None:
        """Read ``path`` (a missing or broken file starts the count now, and is written)."""
        self.path = path
        self._failing = False
        loaded = self._load()
        if loaded is None:
            self.since = (now or datetime.now(UTC)).replace(microsecond=0)
            self.totals: Totals = {}
            self.save({})  # the start of counting is kept even before the first attempt
        else:
            self.since, self.totals = loaded

    @property
    def since_text(self) -> str:
        """``since`` as the file (and ``/status``) writes it: ``2026-12-01T14:00:00Z``."""
        return self.since.strftime(STAMP)

    def save(self, totals: Mapping[str, Mapping[str, float]]) -> None:
        """Replace the stored totals with ``totals`` (atomically; failures are logged)."""
        self.totals = {pool: dict(values) for pool, values in totals.items()}
        document = {
            "version": VERSION,
            "since": self.since_text,
            "pools": self.totals,
        }
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with temporary.open("w", encoding="utf-8") as handle:
                json.dump(document, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            if not self._failing:
                log.warning("contribution totals not saved", path=str(self.path), error=str(exc))
            self._failing = True
            return
        if self._failing:
            log.info("contribution totals saved again", path=str(self.path))
        self._failing = False

    def _load(self) -> tuple[datetime, Totals] | None:
        try:
            with self.path.open("rb") as handle:
                raw = handle.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("contribution totals unreadable", path=str(self.path), error=str(exc))
            return None
        parsed = _parse(raw)
        if parsed is None:
            broken = self.path.with_name(self.path.name + ".broken")
            with contextlib.suppress(OSError):
                self.path.replace(broken)
            log.warning(
                "contribution totals were not valid; counting starts again",
                path=str(self.path),
                moved_to=str(broken),
            )
        return parsed


def _parse(raw: bytes) -> tuple[datetime, Totals] | None:
    """The ``(since, totals)`` a file this module wrote holds, or ``None``."""
    if len(raw) > MAX_BYTES:
        return None
    try:
        document: Any = json.loads(raw)
        since = datetime.strptime(document["since"], STAMP).replace(tzinfo=UTC)
        pools = document["pools"]
    except (ValueError, TypeError, KeyError):
        return None
    if document.get("version") != VERSION or not isinstance(pools, dict):
        return None
    totals: Totals = {}
    for pool, values in pools.items():
        if not isinstance(pool, str) or not isinstance(values, dict):
            return None
        counts: dict[str, float] = {}
        for key, value in values.items():
            if (
                not isinstance(key, str)
                or isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                return None
            counts[key] = float(value)
        totals[pool] = counts
    return since, totals
