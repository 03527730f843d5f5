"""Progress coalescing and log batching policy (pure, clock passed in)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from agent.runtimes.base import Progress
from agent.tasks.reporting import MAX_LINE, LogBatcher, ProgressCoalescer


def test_first_progress_goes_out_at_once_then_at_most_the_rate() -> None:
    """The first value is sent immediately; later ones wait for the rate limit."""
    coalescer = ProgressCoalescer(per_second=4)
    coalescer.offer(Progress(0.1))
    assert coalescer.take(10.0) == Progress(0.1)
    coalescer.offer(Progress(0.2))
    assert coalescer.take(10.1) is None
    assert coalescer.due(10.1) == 10.25


def test_only_the_newest_pending_progress_is_sent() -> None:
    """Values offered between sends are coalesced into the newest one."""
    coalescer = ProgressCoalescer(per_second=2)
    coalescer.offer(Progress(0.1))
    coalescer.take(0.0)
    for value in (0.2, 0.3, 0.4):
        coalescer.offer(Progress(value))
    assert coalescer.take(0.5) == Progress(0.4)
    assert coalescer.take(10.0) is None
    assert coalescer.due(10.0) is None


@given(st.lists(st.floats(min_value=0, max_value=0.2), min_size=1, max_size=300))
def test_sends_never_exceed_the_rate(gaps: list[float]) -> None:
    """Whatever the arrival pattern, sends are at least 1/rate apart."""
    coalescer = ProgressCoalescer(per_second=5)
    now, sent = 0.0, []
    for gap in gaps:
        now += gap
        coalescer.offer(Progress(now))
        if coalescer.take(now) is not None:
            sent.append(now)
    assert all(b - a >= 0.2 - 1e-9 for a, b in itertools.pairwise(sent))


def test_log_batches_are_bounded_and_overflow_is_counted() -> None:
    """Lines beyond the byte budget are dropped and counted; batches respect the size."""
    batcher = LogBatcher(max_lines=2, budget_bytes=10)
    for text in ("aaaa", "bbbb", "cccc", "dddd"):
        batcher.add("stdout", text)
    assert batcher.full
    assert batcher.take() == ([("stdout", "aaaa"), ("stdout", "bbbb")], 2)
    assert batcher.take() == ([], 0)


def test_long_lines_are_truncated() -> None:
    """A line over 4 KiB is cut and marked."""
    batcher = LogBatcher(max_lines=10, budget_bytes=1_000_000)
    batcher.add("stderr", "x" * 10_000)
    ((stream, text),) = batcher.take()[0]
    assert (stream, len(text), text[-1]) == ("stderr", MAX_LINE, "…")
