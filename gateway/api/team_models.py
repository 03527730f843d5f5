"""The team model registry: presign an upload, register, list, enable/disable, delete.

Management routes (``dk-`` credentials and user tokens; ``sk-`` keys get 403). Every change
to the team's active set is pushed at once to the team's connected agents as a ``sync``
message (see ``gateway.model_set``). The handlers are ``async`` so that they run on the
event loop that owns the agent connections; storage I/O goes to a thread.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from gateway.api.deps import ApiError, ManagerDep, ServicesDep
from gateway.model_set import MAX_MODELS_PER_TEAM, check_model_path, model_key
from gateway.models import (
    ModelIn,
    ModelList,
    ModelPatch,
    ModelPresignResponse,
    ModelRecord,
    ModelStatus,
)
from gateway.store import ConflictError

router = APIRouter(tags=["models"])
CONTENT_TYPE = "application/octet-stream"


@router.post("/models/presign")
async def presign_model(
    body: ModelIn, principal: ManagerDep, svc: ServicesDep
) -> ModelPresignResponse:
    """A single-PUT URL for the model's bytes at ``models/<team>/<sha256 hex>``."""
    check_model_path(body.model_path)
    key = model_key(principal.team_id, body.file_hash)
    put = svc.storage.presign_put(
        key, size=body.file_size, content_type=CONTENT_TYPE, expires_s=svc.config.upload_ttl_s
    )
    held = await asyncio.to_thread(svc.storage.head, key)
    return ModelPresignResponse(
        upload_url=put.url,
        upload_headers=put.headers,
        storage_key=key,
        expires_at=put.expires_at,
        already_uploaded=held is not None and held.size == body.file_size,
    )


@router.post("/models", status_code=201)
async def register_model(body: ModelIn, principal: ManagerDep, svc: ServicesDep) -> ModelRecord:
    """Register an uploaded model as active (it joins the sync set at once)."""
    check_model_path(body.model_path)
    team = principal.team_id
    if any(
        m.model_type == body.model_type and m.model_path == body.model_path
        for m in svc.store.models(team)
    ):
        raise _duplicate(body)
    held = await asyncio.to_thread(svc.storage.head, model_key(team, body.file_hash))
    if held is None or held.size != body.file_size:
        raise ApiError(
            400,
            "validation_error",
            "no uploaded object of file_size bytes for this file_hash: PUT it to the URL "
            "of POST /models/presign first",
            field="file_hash",
            rule="not_uploaded",
        )
    try:
        record = svc.store.add_model(team, body, MAX_MODELS_PER_TEAM)
    except ConflictError:
        raise _duplicate(body) from None
    except OverflowError as exc:
        raise ApiError(
            409, "limit_exceeded", str(exc), field="model_path", rule="max_models"
        ) from None
    svc.hub.send_sync(team)
    return record


@router.get("/models")
async def list_models(principal: ManagerDep, svc: ServicesDep) -> ModelList:
    """The team's models (active and disabled), by model_type then model_path."""
    return ModelList(model_list=svc.store.models(principal.team_id))


@router.get("/models/{model_id}")
async def get_model(model_id: str, principal: ManagerDep, svc: ServicesDep) -> ModelRecord:
    """One model of the team."""
    return svc.store.model(principal.team_id, model_id)


@router.patch("/models/{model_id}")
async def update_model(
    model_id: str, body: ModelPatch, principal: ManagerDep, svc: ServicesDep
) -> ModelRecord:
    """Enable or disable a model; a change is sent to the team's agents as a ``sync``."""
    record, changed = svc.store.set_model_status(principal.team_id, model_id, body.model_status)
    if changed:
        svc.hub.send_sync(principal.team_id)
    return record


@router.delete("/models/{model_id}", status_code=204)
async def delete_model(model_id: str, principal: ManagerDep, svc: ServicesDep) -> Response:
    """Forget a model (the stored bytes stay); an active one leaves the sync set."""
    record = svc.store.delete_model(principal.team_id, model_id)
    if record.model_status is ModelStatus.ACTIVE:
        svc.hub.send_sync(principal.team_id)
    return Response(status_code=204)


def _duplicate(body: ModelIn) -> ApiError:
    return ApiError(
        409,
        "conflict",
        f"{body.model_type}/{body.model_path} is already registered in this team",
        field="model_path",
        rule="duplicate",
    )
