"""Task events: stored for replay, fanned out live to SSE subscribers.

Owns the per-task subscriber queues. Publishing never blocks: a subscriber whose queue is
full is dropped (its SSE stream ends; the client reconnects with ``Last-Event-ID`` and
replays from the store, so nothing is lost).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from gateway.store import Store, TaskEvent

TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
QUEUE_SIZE = 1024


class Subscription:
    """A live view of one task's new events."""

    def __init__(self) -> None:
        """Create an empty subscription."""
        self.queue: asyncio.Queue[TaskEvent | None] = asyncio.Queue(QUEUE_SIZE)

    async def next(self) -> TaskEvent | None:
        """Wait for the next event; ``None`` means the subscription was dropped."""
        return await self.queue.get()


class EventBus:
    """Append task events to the store and notify live subscribers."""

    def __init__(self, store: Store) -> None:
        """Publish into ``store``."""
        self._store = store
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)

    def publish(self, task_id: str, event: str, data: dict[str, Any]) -> TaskEvent:
        """Store an event and hand it to every subscriber of the task."""
        stored = self._store.add_event(task_id, event, data)
        for sub in list(self._subscribers.get(task_id, ())):
            try:
                sub.queue.put_nowait(stored)
            except asyncio.QueueFull:
                self._drop(task_id, sub)
        return stored

    def subscribe(self, task_id: str) -> Subscription:
        """Start receiving a task's new events (call before replaying stored ones)."""
        sub = Subscription()
        self._subscribers[task_id].add(sub)
        return sub

    def unsubscribe(self, task_id: str, sub: Subscription) -> None:
        """Stop receiving events."""
        subs = self._subscribers.get(task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[task_id]

    def _drop(self, task_id: str, sub: Subscription) -> None:
        self.unsubscribe(task_id, sub)
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)
