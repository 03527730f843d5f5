"""``POST /r/files/presign``: a slot for an input file, uploaded straight to storage."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

from fastapi import APIRouter

from gateway.api.deps import ApiError, CallerDep, ServicesDep
from gateway.models import PresignRequest, PresignResponse
from gateway.store import FileRecord, utcnow

router = APIRouter(tags=["files"])
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str) -> str:
    """The last path segment of ``name`` reduced to ``[A-Za-z0-9._-]`` (never empty or hidden)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).strip("._") or "file"
    return cleaned[:200]


@router.post("/r/files/presign")
def presign(body: PresignRequest, principal: CallerDep, svc: ServicesDep) -> PresignResponse:
    """Reserve a ``file_key`` and return a presigned PUT (send ``upload_headers`` verbatim)."""
    if body.file_size > svc.config.max_file_bytes:
        raise ApiError(
            400,
            "validation_error",
            f"file_size must be at most {svc.config.max_file_bytes} bytes",
            field="file_size",
            rule="max",
        )
    key = f"inputs/{principal.team_id}/{uuid.uuid4().hex}/{safe_file_name(body.file_name)}"
    put = svc.storage.presign_put(
        key, size=body.file_size, content_type=body.content_type, expires_s=svc.config.upload_ttl_s
    )
    now = utcnow()
    svc.store.add_file(
        FileRecord(
            file_key=key,
            team_id=principal.team_id,
            file_name=body.file_name,
            size=body.file_size,
            content_type=body.content_type,
            created_at=now,
            expires_at=now + timedelta(seconds=svc.config.input_ttl_s),
        )
    )
    return PresignResponse(
        file_key=key, upload_url=put.url, upload_headers=put.headers, expires_at=put.expires_at
    )
