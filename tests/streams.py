"""The lines of a child process's text stream, read by a thread, awaited with a timeout."""

from __future__ import annotations

import queue
import re
import threading
import time
from typing import IO


class Lines:
    """Everything a stream printed so far (``text``), and a wait for the line a test expects."""

    def __init__(self, stream: IO[str]) -> None:
        """Start reading ``stream`` in a daemon thread."""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)  # end of stream

    @property
    def text(self) -> str:
        """What was read so far."""
        return "".join(self.seen)

    def wait(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (seen before or to come) matching ``pattern``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for line in self.seen[checked:]:
                if found := re.search(pattern, line):
                    return found
            checked = len(self.seen)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line {pattern!r} within {timeout} s in:\n{self.text}")
            try:
                got = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if got is None:
                raise AssertionError(f"the stream ended without {pattern!r}:\n{self.text}")
            self.seen.append(got)

    def rest(self, timeout: float = 10) -> str:
        """Read to the end of the stream (the process has exited); return all text."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        return self.text
