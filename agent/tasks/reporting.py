"""Rate limits between a runtime and the wire: progress coalescing and bounded log batches.

Both are pure and clock-driven (``now`` is an argument), so the runner decides *when* to
flush and tests check the policy without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.runtimes.base import Progress, Stream

MAX_LINE = 4096


@dataclass
class ProgressCoalescer:
    """Keep only the newest progress; release it at most ``per_second`` times a second."""

    per_second: float
    _pending: Progress | None = None
    _last_sent: float | None = None

    def offer(self, progress: Progress) -> None:
        """Record the newest progress (older unsent values are dropped)."""
        self._pending = progress

    def due(self, now: float) -> float | None:
        """When the pending value may be sent (``None``: nothing pending)."""
        if self._pending is None:
            return None
        if self._last_sent is None:
            return now
        return max(now, self._last_sent + 1.0 / self.per_second)

    def take(self, now: float) -> Progress | None:
        """The value to send now, if the rate allows."""
        when = self.due(now)
        if when is None or when > now:
            return None
        sent, self._pending, self._last_sent = self._pending, None, now
        return sent


@dataclass
class LogBatcher:
    """Collect log lines into batches; beyond the per-task byte budget, only count them."""

    max_lines: int
    budget_bytes: int
    _lines: list[tuple[Stream, str]] = field(default_factory=list)
    _dropped: int = 0
    _used: int = 0

    def add(self, stream: Stream, line: str) -> None:
        """Queue a line (truncated to 4 KiB) or count it as dropped."""
        text = line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"
        cost = len(text.encode("utf-8", "replace"))
        if self._used + cost > self.budget_bytes or len(self._lines) >= self.max_lines * 4:
            self._dropped += 1
            return
        self._used += cost
        self._lines.append((stream, text))

    @property
    def full(self) -> bool:
        """A batch is ready without waiting for the timer."""
        return len(self._lines) >= self.max_lines

    def take(self) -> tuple[list[tuple[Stream, str]], int]:
        """The next batch (≤ ``max_lines``) and the count of lines dropped since the last."""
        batch, self._lines = self._lines[: self.max_lines], self._lines[self.max_lines :]
        dropped, self._dropped = self._dropped, 0
        return batch, dropped
