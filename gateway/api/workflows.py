"""Workflows: create, import (upsert by slug), update, list and read.

Management (create/import/update) takes a ``dk-`` credential or a user token; reading
under ``/r/`` also takes ``sk-`` keys. Every change stores a new ``version``; runs can pin
one with ``slug@version``.
"""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.deps import ApiError, CallerDep, ManagerDep, ServicesDep
from gateway.models import Workflow, WorkflowIn
from gateway.store import NotFoundError, Store
from gateway.validation import check_workflow_targets

router = APIRouter(tags=["workflows"])


def parse_slug(ref: str) -> tuple[str, int | None]:
    """Split ``slug@version`` (the version is optional)."""
    slug, sep, version = ref.partition("@")
    if not sep:
        return slug, None
    if not version.isdigit() or int(version) < 1:
        raise ApiError(
            400,
            "validation_error",
            "version after @ must be a positive integer",
            field="slug",
            rule="version",
        )
    return slug, int(version)


def workflow_by_ref(store: Store, team_id: str, ref: str) -> Workflow:
    """A workflow by ``slug`` or ``slug@version``."""
    slug, version = parse_slug(ref)
    return store.workflow_by_slug(team_id, slug, version)


@router.post("/workflows", status_code=201)
def create_workflow(body: WorkflowIn, principal: ManagerDep, svc: ServicesDep) -> Workflow:
    """Create a workflow (version 1)."""
    check_workflow_targets(body)
    return svc.store.create_workflow(principal.team_id, body)


@router.post("/workflows/import", status_code=201)
def import_workflow(body: WorkflowIn, principal: ManagerDep, svc: ServicesDep) -> Workflow:
    """Import a workflow: a new version of the one with the same slug, else a new workflow."""
    check_workflow_targets(body)
    if body.workflow_slug is not None:
        try:
            current = svc.store.workflow_by_slug(principal.team_id, body.workflow_slug)
        except NotFoundError:
            pass
        else:
            return svc.store.update_workflow(principal.team_id, current.id, body)
    return svc.store.create_workflow(principal.team_id, body)


@router.put("/workflows/{workflow_id}")
def update_workflow(
    workflow_id: str, body: WorkflowIn, principal: ManagerDep, svc: ServicesDep
) -> Workflow:
    """Store a new version of a workflow."""
    check_workflow_targets(body)
    return svc.store.update_workflow(principal.team_id, workflow_id, body)


@router.get("/r/workflows")
def list_workflows(principal: CallerDep, svc: ServicesDep) -> dict[str, list[Workflow]]:
    """Every workflow of the caller's team (latest versions)."""
    return {"workflow_list": svc.store.workflows(principal.team_id)}


@router.get("/r/workflows/slug/{slug}")
def get_workflow_by_slug(slug: str, principal: CallerDep, svc: ServicesDep) -> Workflow:
    """A workflow by slug (``slug@version`` pins a version)."""
    return workflow_by_ref(svc.store, principal.team_id, slug)


@router.get("/r/workflows/{workflow_id}")
def get_workflow(workflow_id: str, principal: CallerDep, svc: ServicesDep) -> Workflow:
    """A workflow by id (latest version)."""
    return svc.store.workflow(principal.team_id, workflow_id)
