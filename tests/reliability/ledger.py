"""Scale and counts of the reliability scenarios.

Every scenario runs *sampled* in the README test command (a handful of tasks and faults,
to stay fast) and at full size in the long mode (``scripts/bench reliability``, which sets
``CYBERUN_RELIABILITY_SCALE=long``). :func:`size` picks the number for the current mode.

Each scenario reports what it did with :func:`record`: tasks run, faults injected, tasks
lost (no terminal state, or a completed output missing) and tasks executed twice. With
``CYBERUN_RELIABILITY_LEDGER`` set (the long mode sets it), each record is appended to that
file as one JSON line; ``bench/reliability.py`` turns them into the table of
``docs/reliability.md``. Without it, records are only checked, never written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SCALE_ENV = "CYBERUN_RELIABILITY_SCALE"
LEDGER_ENV = "CYBERUN_RELIABILITY_LEDGER"


def long_mode() -> bool:
    """Whether the long mode (bench) is running."""
    return os.environ.get(SCALE_ENV, "sampled") == "long"


def size(sampled: int, long: int) -> int:
    """``sampled`` in the test command, ``long`` in the long mode."""
    return long if long_mode() else sampled


@dataclass(frozen=True)
class Record:
    """What one scenario did."""

    scenario: str
    tasks: int
    faults: int
    lost: int
    duplicated: int
    detail: str = ""


def record(
    scenario: str, *, tasks: int, faults: int, lost: int, duplicated: int, detail: str = ""
) -> Record:
    """Note a scenario's counts (appended to the ledger file when one is set)."""
    entry = Record(scenario, tasks, faults, lost, duplicated, detail)
    path = os.environ.get(LEDGER_ENV)
    if path:
        with Path(path).open("a", encoding="utf-8") as ledger:
            ledger.write(json.dumps(asdict(entry)) + "\n")
    return entry
