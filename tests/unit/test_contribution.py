"""Lifetime contribution totals (agent/contribution.py) and how Metrics counts on from them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.contribution import MAX_BYTES, ContributionFile
from agent.metrics import Metrics
from agent.protocol.messages import Timings

NOW = datetime(2026, 12, 1, 14, 0, 0, 123456, tzinfo=UTC)


def test_a_missing_file_starts_counting_now_and_keeps_that_start(tmp_path: Path) -> None:
    """Without a file counting begins now; that start is written before any attempt."""
    path = tmp_path / "state" / "contribution.json"
    ledger = ContributionFile(path, now=NOW)
    assert ledger.totals == {}
    assert ledger.since == NOW.replace(microsecond=0)
    again = ContributionFile(path, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert again.since == ledger.since


def test_totals_survive_a_reload(tmp_path: Path) -> None:
    """What one process saved, the next reads back, with the original start."""
    path = tmp_path / "state" / "contribution.json"
    first = ContributionFile(path, now=NOW)
    first.save({"community": {"completed": 2, "gpu_seconds": 12.5}})
    again = ContributionFile(path, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert again.totals == {"community": {"completed": 2.0, "gpu_seconds": 12.5}}
    assert again.since == first.since
    assert not list(path.parent.glob(".*.tmp"))


def test_metrics_count_on_from_the_stored_totals(tmp_path: Path) -> None:
    """A restarted agent's Metrics adds to the lifetime totals and saves after each attempt."""
    path = tmp_path / "contribution.json"
    ledger = ContributionFile(path, now=NOW)
    ledger.save({"team": {"completed": 5, "gpu_seconds": 100.0}})
    ledger = ContributionFile(path)
    metrics = Metrics(contribution=ledger.totals, on_contribution=ledger.save)
    metrics.task_finished("completed", "team", Timings(run_s=3.0))
    metrics.task_finished("preempted", "community")
    stored = json.loads(path.read_text(encoding="utf-8"))["pools"]
    assert stored["team"]["completed"] == 6
    assert stored["team"]["gpu_seconds"] == 103.0
    assert stored["community"]["preempted"] == 1
    assert metrics.contribution() == stored
    assert b'cyberun_agent_tasks_total{outcome="completed",pool="team"} 1.0' in metrics.render()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"version": 1, "since": "yesterday", "pools": {}}',
        b'{"version": 2, "since": "2026-12-01T00:00:00Z", "pools": {}}',
        b'{"version": 1, "since": "2026-12-01T00:00:00Z", "pools": {"team": {"completed": -1}}}',
        b'{"version": 1, "since": "2026-12-01T00:00:00Z", "pools": {"team": {"x": true}}}',
        b'{"version": 1, "since": "2026-12-01T00:00:00Z", "pools": {"team": {"x": NaN}}}',
        b'{"version": 1, "since": "2026-12-01T00:00:00Z", "pools": {"team": []}}',
        b"\xff\xfe",
        b" " * (MAX_BYTES + 1),
    ],
)
def test_a_broken_file_is_moved_aside_and_counting_restarts(tmp_path: Path, content: bytes) -> None:
    """A file this module did not write is kept as .broken; the totals start over, no crash."""
    path = tmp_path / "contribution.json"
    path.write_bytes(content)
    ledger = ContributionFile(path, now=NOW)
    assert ledger.totals == {}
    assert ledger.since == NOW.replace(microsecond=0)
    assert (tmp_path / "contribution.json.broken").read_bytes() == content
    assert ContributionFile(path).since == ledger.since  # a fresh file in its place


def test_a_failing_save_keeps_the_old_totals(tmp_path: Path) -> None:
    """A save that cannot write its temporary file leaves the previous totals whole."""
    path = tmp_path / "contribution.json"
    ledger = ContributionFile(path, now=NOW)
    ledger.save({"team": {"completed": 1}})
    (tmp_path / ".contribution.json.tmp").mkdir()  # the write fails: IsADirectoryError
    ledger.save({"team": {"completed": 2}})
    assert ContributionFile(path).totals == {"team": {"completed": 1.0}}
    (tmp_path / ".contribution.json.tmp").rmdir()
    ledger.save({"team": {"completed": 3}})
    assert ContributionFile(path).totals == {"team": {"completed": 3.0}}
