"""Tasks: read, list, follow (SSE), result, cancel — always within the caller's team."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from gateway.api.deps import ApiError, CallerDep, ServicesDep
from gateway.events import TERMINAL_EVENTS, EventBus
from gateway.models import PageMeta, TaskList, TaskOutput, TaskRecord, TaskResult, TaskStatus
from gateway.store import TaskEvent, TaskRow

router = APIRouter(tags=["tasks"])


def record(row: TaskRow, gateway_id: str) -> TaskRecord:
    """The documented task record of a stored task."""
    return TaskRecord(
        id=row.id,
        workflow_id=row.workflow_id,
        workflow_version=row.workflow_version,
        task_status=row.task_status,
        task_error=row.task_error,
        retry_count=row.retry_count,
        created_at=row.created_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        agent_id=row.agent_id,
        agent_labels=row.agent_labels,
        gateway_id=gateway_id,
        gpu_type=row.gpu_type,
        dispatch_target=row.dispatch_target,
        target_pool=row.target_pool,
        tool_type=row.tool_type,
        submitter_region=row.submitter_region,
        progress=row.progress,
    )


@router.get("/r/tasks")
def list_tasks(
    principal: CallerDep,
    svc: ServicesDep,
    status: TaskStatus | None = None,
    current_page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=100)] = 20,
) -> TaskList:
    """One page of the team's tasks, newest first, optionally filtered by status."""
    rows, total = svc.store.tasks(principal.team_id, status, current_page, per_page)
    return TaskList(
        task_list=[record(r, svc.config.gateway_id) for r in rows],
        page_meta=PageMeta(current_page=current_page, per_page=per_page, total_count=total),
    )


@router.get("/r/tasks/{task_id}")
def get_task(task_id: str, principal: CallerDep, svc: ServicesDep) -> TaskRecord:
    """One task."""
    return record(svc.store.task(task_id, principal.team_id), svc.config.gateway_id)


@router.post("/r/tasks/{task_id}/cancel")
def cancel_task(task_id: str, principal: CallerDep, svc: ServicesDep) -> TaskRecord:
    """Cancel a task; a no-op success when it already ended. A running task's agent is told."""
    task = svc.store.task(task_id, principal.team_id)
    cancelled = svc.hub.cancel(task, "cancelled by the submitter")
    return record(cancelled, svc.config.gateway_id)


@router.get("/r/tasks/{task_id}/result")
def get_result(task_id: str, principal: CallerDep, svc: ServicesDep) -> TaskResult:
    """The result of a finished task, with presigned download URLs."""
    task = svc.store.task(task_id, principal.team_id)
    if not task.task_status.terminal:
        raise ApiError(
            409, "not_finished", f"task is {task.task_status.value}; results exist once it ends"
        )
    ttl = svc.config.download_ttl_s
    urls = {
        o["key"]: svc.storage.presign_get(o["storage_key"], expires_s=ttl)[0] for o in task.outputs
    }
    first = task.outputs[0] if task.outputs else None
    images = sum(1 for o in task.outputs if str(o.get("content_type", "")).startswith("image/"))
    output = None
    if task.task_status is TaskStatus.COMPLETED:
        output = TaskOutput(
            storage_key=first["storage_key"] if first else None,
            image_count=images,
            outputs={o["key"]: o["storage_key"] for o in task.outputs},
        )
    return TaskResult(
        id=task.id,
        task_status=task.task_status,
        task_output=output,
        download_url=urls[first["key"]] if first else None,
        download_urls=urls,
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl) if urls else None,
        task_error=task.task_error,
        completed_at=task.completed_at,
    )


@router.get(
    "/r/tasks/{task_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def task_events(
    task_id: str,
    principal: CallerDep,
    svc: ServicesDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Follow a task as server-sent events (status, progress, completed, failed, cancelled)."""
    svc.store.task(task_id, principal.team_id)  # 404 for unknown / other teams
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    stream = _stream(svc.tasks.bus, svc.store.events, task_id, after)
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _stream(
    bus: EventBus, stored: Callable[[str, int], list[TaskEvent]], task_id: str, after: int
) -> AsyncIterator[str]:
    """Replay stored events after ``after``, then follow live ones, until a terminal event."""
    subscription = bus.subscribe(task_id)  # subscribe first: nothing falls between replay and live
    try:
        last = after
        for event in stored(task_id, after):
            last = event.seq
            yield _sse(event)
            if event.event in TERMINAL_EVENTS:
                return
        while (live := await subscription.next()) is not None:
            if live.seq <= last:
                continue
            last = live.seq
            yield _sse(live)
            if live.event in TERMINAL_EVENTS:
                return
    finally:
        bus.unsubscribe(task_id, subscription)


def _sse(event: TaskEvent) -> str:
    return f"id: {event.seq}\nevent: {event.event}\ndata: {json.dumps(event.data)}\n\n"
