"""``POST /r/workflows/{id}/run`` and its slug form: validate, resolve, enqueue.

Every rule of the seed document answers **400** naming the field and the rule (see
``gateway.validation``); the task is created only when everything holds.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body

from gateway.api.deps import ApiError, CallerDep, Services, ServicesDep
from gateway.api.workflows import workflow_by_ref
from gateway.auth import Principal
from gateway.model_set import required_hashes
from gateway.models import (
    DispatchTarget,
    RunAccepted,
    RunRequest,
    TaskStatus,
    ToolType,
    Workflow,
    WorkflowStatus,
)
from gateway.store import TaskRow, new_id, utcnow
from gateway.validation import FileMeta, resolve_parameters
from gateway.validation import file_keys_to_lookup as keys_to_lookup

router = APIRouter(tags=["runs"])
RunBody = Annotated[RunRequest | None, Body()]


@router.post("/r/workflows/slug/{slug}/run", status_code=202)
async def run_by_slug(
    slug: str, principal: CallerDep, svc: ServicesDep, body: RunBody = None
) -> RunAccepted:
    """Run a workflow by slug (``slug@version`` pins a version)."""
    workflow = workflow_by_ref(svc.store, principal.team_id, slug)
    return await submit(svc, principal, workflow, body or RunRequest())


@router.post("/r/workflows/{workflow_id}/run", status_code=202)
async def run_by_id(
    workflow_id: str, principal: CallerDep, svc: ServicesDep, body: RunBody = None
) -> RunAccepted:
    """Run a workflow by id (its latest version)."""
    workflow = svc.store.workflow(principal.team_id, workflow_id)
    return await submit(svc, principal, workflow, body or RunRequest())


async def submit(
    svc: Services, principal: Principal, workflow: Workflow, request: RunRequest
) -> RunAccepted:
    """Validate a run request against ``workflow`` and enqueue the task."""
    if workflow.workflow_status is WorkflowStatus.DISABLED:
        raise ApiError(
            409, "workflow_disabled", "the workflow is disabled", field="workflow_status"
        )
    if request.tool_type is not None and request.tool_type is not workflow.tool_type:
        raise ApiError(
            400,
            "validation_error",
            f"tool_type {request.tool_type.value} does not match the workflow's "
            f"{workflow.tool_type.value}",
            field="tool_type",
            rule="mismatch",
        )
    target = request.dispatch_target or workflow.default_dispatch_target
    if target is DispatchTarget.COMFY_CLOUD:
        _check_cloud(svc, workflow)
    model_hashes = (
        required_hashes(svc.store, principal.team_id, workflow.required_models)
        if target is DispatchTarget.AGENT
        else []
    )
    files = await _file_metas(svc, keys_to_lookup(workflow, request.parameters))
    resolved = resolve_parameters(
        workflow, request.parameters, team_id=principal.team_id, files=files
    )
    payload: dict[str, Any] = {
        "workflow": workflow.workflow_json,
        "injections": [i.model_dump(mode="json", exclude_none=True) for i in resolved.injections],
        "inputs": [
            {"key": key, "file_key": f.file_key, "size": f.size, "content_type": f.content_type}
            | ({"sha256": f.sha256} if f.sha256 else {})
            for key, f in resolved.files
        ],
        "required_labels": workflow.required_labels,
        "min_vram_gb": workflow.min_vram_gb,
        "required_models": workflow.required_models,
        "required_model_hashes": model_hashes,
        "preferred_gpu": workflow.preferred_gpu,
    }
    row = TaskRow(
        id=new_id("task"),
        team_id=principal.team_id,
        workflow_id=workflow.id,
        workflow_version=workflow.version,
        task_status=TaskStatus.PENDING,
        dispatch_target=target,
        target_pool=request.target_pool,
        tool_type=workflow.tool_type,
        submitter_region=request.submitter_region or "",
        payload=payload,
        max_retries=workflow.max_retries,
        task_timeout=workflow.task_timeout,
        created_at=utcnow(),
    )
    svc.tasks.create(row)
    svc.hub.wake()
    return RunAccepted(task_id=row.id)


def _check_cloud(svc: Services, workflow: Workflow) -> None:
    """comfy_cloud needs a configured endpoint and a ComfyUI workflow."""
    if not svc.config.comfy_cloud_url:
        raise ApiError(
            400,
            "validation_error",
            "dispatch_target comfy_cloud is not configured on this gateway",
            field="dispatch_target",
            rule="not_configured",
        )
    if workflow.tool_type is not ToolType.COMFYUI:
        raise ApiError(
            400,
            "validation_error",
            "dispatch_target comfy_cloud runs ComfyUI workflows only",
            field="dispatch_target",
            rule="tool_type",
        )


async def _file_metas(svc: Services, keys: list[str]) -> dict[str, FileMeta]:
    """Look up every referenced input: recorded by presign AND actually uploaded."""
    found: dict[str, FileMeta] = {}
    for key in keys:
        record = svc.store.file(key)
        if record is None or record.expires_at < utcnow():
            continue
        info = await asyncio.to_thread(svc.storage.head, key)
        if info is None:
            continue
        found[key] = FileMeta(
            file_key=key, team_id=record.team_id, size=info.size, content_type=record.content_type
        )
    return found
