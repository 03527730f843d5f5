"""Task state transitions, each stored and published as an event.

The only code that changes a task's ``task_status``. States (documented lifecycle)::

    pending → waiting → queued → running → completed | failed | cancelled
       ↑_________|_________|________|   (re-queued: reject, ACK timeout, lease lost with
                                          retries left)

Transitions from a terminal state are refused (``None`` is returned), which makes every
caller idempotent: a late or duplicated agent message cannot reopen a finished task.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from gateway.events import EventBus
from gateway.models import TaskStatus
from gateway.store import Store, TaskRow, utcnow

AGENT_DISCONNECTED = "agent disconnected"


class TaskService:
    """Applies transitions to tasks in the store and announces them."""

    def __init__(self, store: Store, bus: EventBus) -> None:
        """Work on ``store``, announcing through ``bus``."""
        self.store = store
        self.bus = bus

    def create(self, row: TaskRow) -> TaskRow:
        """Store a new pending task."""
        self.store.insert_task(row)
        self._event(row, "status")
        return row

    def waiting(self, task: TaskRow) -> TaskRow | None:
        """No eligible agent right now."""
        if task.task_status is not TaskStatus.PENDING:
            return None
        return self._save(replace(task, task_status=TaskStatus.WAITING), "status")

    def assign(
        self, task: TaskRow, agent_key: str, labels: list[str], gpu_type: str | None
    ) -> TaskRow | None:
        """An agent was chosen; the task waits for its ACK under a new attempt number."""
        if task.task_status not in {TaskStatus.PENDING, TaskStatus.WAITING}:
            return None
        queued = replace(
            task,
            task_status=TaskStatus.QUEUED,
            attempt=task.attempt + 1,
            agent_id=agent_key.split("/", 1)[1],
            agent_key=agent_key,
            agent_labels=labels,
            gpu_type=gpu_type,
            assigned_at=time.time(),
        )
        return self._save(queued, "status")

    def start(self, task: TaskRow, lease_ttl_s: float) -> TaskRow | None:
        """The agent ACKed: the task runs and its lease starts."""
        if task.task_status is not TaskStatus.QUEUED:
            return None
        running = replace(
            task,
            task_status=TaskStatus.RUNNING,
            started_at=task.started_at or utcnow(),
            lease_expires_at=time.time() + lease_ttl_s,
        )
        return self._save(running, "status")

    def renew(self, task: TaskRow, lease_ttl_s: float) -> None:
        """Extend a running task's lease (no event: leases are internal)."""
        if task.task_status is TaskStatus.RUNNING:
            self.store.update_task(replace(task, lease_expires_at=time.time() + lease_ttl_s))

    def requeue(self, task: TaskRow, reason: str, *, count_retry: bool) -> TaskRow | None:
        """Put a queued or running task back to pending for another dispatch."""
        if task.task_status.terminal or task.task_status is TaskStatus.PENDING:
            return None
        pending = replace(
            task,
            task_status=TaskStatus.PENDING,
            task_error=reason,
            retry_count=task.retry_count + (1 if count_retry else 0),
            agent_id=None,
            agent_key=None,
            assigned_at=None,
            lease_expires_at=None,
            progress=0.0,
        )
        return self._save(pending, "status")

    def lease_lost(self, task: TaskRow) -> TaskRow | None:
        """The agent went silent: retry while ``retry_count < max_retries``, else fail."""
        if task.retry_count < task.max_retries:
            return self.requeue(task, AGENT_DISCONNECTED, count_retry=True)
        return self.fail(task, AGENT_DISCONNECTED)

    def progress(self, task: TaskRow, data: dict[str, Any]) -> None:
        """Record and announce progress of a running task."""
        if task.task_status is not TaskStatus.RUNNING:
            return
        value = float(data.get("progress", 0.0))
        self.store.update_task(replace(task, progress=value))
        self.bus.publish(task.id, "progress", data)

    def complete(self, task: TaskRow, outputs: list[dict[str, Any]]) -> TaskRow | None:
        """The task succeeded with ``outputs``."""
        if task.task_status.terminal:
            return None
        done = replace(
            task,
            task_status=TaskStatus.COMPLETED,
            task_error=None,
            outputs=outputs,
            progress=1.0,
            completed_at=utcnow(),
            lease_expires_at=None,
        )
        return self._save(done, "completed")

    def fail(
        self, task: TaskRow, error: str, outputs: list[dict[str, Any]] | None = None
    ) -> TaskRow | None:
        """The task failed for good."""
        if task.task_status.terminal:
            return None
        failed = replace(
            task,
            task_status=TaskStatus.FAILED,
            task_error=error,
            outputs=outputs or [],
            completed_at=utcnow(),
            lease_expires_at=None,
        )
        return self._save(failed, "failed")

    def cancel(self, task: TaskRow, reason: str) -> TaskRow | None:
        """The task was cancelled (by its submitter, or because its agent reported so)."""
        if task.task_status.terminal:
            return None
        cancelled = replace(
            task,
            task_status=TaskStatus.CANCELLED,
            task_error=reason or None,
            completed_at=utcnow(),
            lease_expires_at=None,
        )
        return self._save(cancelled, "cancelled")

    def _save(self, task: TaskRow, event: str) -> TaskRow:
        self.store.update_task(task)
        self._event(task, event)
        return task

    def _event(self, task: TaskRow, event: str) -> None:
        data: dict[str, Any] = {"task_status": task.task_status.value}
        if task.attempt >= 0:
            data["attempt"] = task.attempt
        if task.task_error:
            data["task_error"] = task.task_error
        if task.agent_id:
            data["agent_id"] = task.agent_id
        if event == "completed":
            data["outputs"] = {o["key"]: o["storage_key"] for o in task.outputs}
        self.bus.publish(task.id, event, data)
