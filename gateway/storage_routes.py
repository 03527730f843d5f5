"""The HTTP side of ``LocalStorage``: the routes its presigned URLs point at.

``PUT /storage/{key}?expires&size&type&sig``            store a new object (If-None-Match: *)
``PUT /storage/{key}?upload&part&expires&sig``          store one part of a multipart upload
``GET /storage/{key}?expires&sig``                      stream an object with its content type

Refusals mirror S3 (measured against SeaweedFS, see ``docs/storage.md``) and are JSON
``{"error": {"code", "message"}}``: a bad key → 400; a missing or malformed signature, a tampered
or expired URL, or a signed header that is missing or differs → 403; an existing object → 412; a
body longer or shorter than the signed Content-Length → 400 (nothing is stored); an unknown object
→ 404; an unknown upload → 404; a part PUT without Content-Length → 411.

Bodies are streamed to a temporary file in ``LocalStorage.root`` in ≤ 1 MiB writes, off the event
loop; reading stops as soon as the body exceeds its declared size.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from gateway.storage import (
    MAX_PART_SIZE,
    AccessDeniedError,
    Action,
    Grant,
    LocalStorage,
    StorageError,
    validate_key,
)

FLUSH_BYTES = 1024 * 1024  # buffer this much of a body before one write to disk
_STATUS_BY_CODE = {"NoSuchUpload": 404, "KeyConflict": 409}


class _Refusal(Exception):  # noqa: N818 - a refusal is an answer, not an error of ours
    """A request the storage routes answer with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> JSONResponse:
        """Return the JSON error response."""
        body = {"error": {"code": self.code, "message": self.message}}
        return JSONResponse(body, status_code=self.status)


def storage_routes(storage: LocalStorage) -> list[Route]:
    """Return the routes serving ``storage``'s presigned URLs (mount them at the app root)."""

    async def put(request: Request) -> Response:
        try:
            key, query = _target(request)
            if "upload" in query or "part" in query:
                return await _put_part(storage, request, key, query)
            return await _put_object(storage, request, key, query)
        except _Refusal as refusal:
            return refusal.response()
        except StorageError as error:
            return _refusal_from(error).response()

    async def get(request: Request) -> Response:
        try:
            key, query = _target(request)
            return await _get_object(storage, key, query)
        except _Refusal as refusal:
            return refusal.response()
        except StorageError as error:
            return _refusal_from(error).response()

    return [
        Route("/storage/{key:path}", put, methods=["PUT"], name="storage_put"),
        Route("/storage/{key:path}", get, methods=["GET"], name="storage_get"),
    ]


def _target(request: Request) -> tuple[str, dict[str, str]]:
    """Return the validated key and the query (each parameter at most once)."""
    try:
        key = validate_key(str(request.path_params["key"]))
    except ValueError as error:
        raise _Refusal(400, "InvalidKey", str(error)) from error
    items = request.query_params.multi_items()
    query = dict(items)
    if len(query) != len(items):
        raise _Refusal(403, "AccessDenied", "a query parameter is repeated")
    return key, query


def _authorize(storage: LocalStorage, action: Action, key: str, query: Mapping[str, str]) -> Grant:
    """Return the grant the URL carries, or refuse with 403 (malformed, expired, not ours)."""
    try:
        grant = Grant.from_query(action, key, query)
    except ValueError as error:
        raise _Refusal(403, "AccessDenied", f"malformed presigned URL: {error}") from error
    signature = query.get("sig")
    if signature is None:
        raise _Refusal(403, "AccessDenied", "missing query parameter 'sig'")
    try:
        storage.verify(grant, signature)
    except AccessDeniedError as error:
        raise _Refusal(403, error.code, str(error)) from error
    return grant


def _require_header(request: Request, name: str, expected: str) -> None:
    """Refuse with 403 unless the signed header ``name`` is sent exactly once, as signed."""
    values = request.headers.getlist(name)
    if values != [expected]:
        raise _Refusal(
            403,
            "SignatureDoesNotMatch",
            f"signed header {name} must be sent exactly once with its signed value",
        )


def _refusal_from(error: StorageError) -> _Refusal:
    return _Refusal(_STATUS_BY_CODE.get(error.code, 500), error.code, str(error))


async def _put_object(
    storage: LocalStorage, request: Request, key: str, query: Mapping[str, str]
) -> Response:
    grant = _authorize(storage, "put", key, query)
    size, content_type = grant.size, grant.content_type
    if size is None or content_type is None:  # from_query("put") sets both
        raise _Refusal(403, "AccessDenied", "malformed presigned URL")
    _require_header(request, "content-length", str(size))
    _require_header(request, "content-type", content_type)
    _require_header(request, "if-none-match", "*")
    if await asyncio.to_thread(storage.head, key) is not None:
        raise _Refusal(412, "PreconditionFailed", f"object {key} already exists")
    temp = storage.temp_path()
    etag = await _receive(request, temp, size)
    created = await asyncio.to_thread(storage.commit_new, key, temp, content_type)
    if not created:
        raise _Refusal(412, "PreconditionFailed", f"object {key} already exists")
    return Response(status_code=200, headers={"ETag": f'"{etag}"'})


async def _put_part(
    storage: LocalStorage, request: Request, key: str, query: Mapping[str, str]
) -> Response:
    grant = _authorize(storage, "part", key, query)
    upload_id, part_number = grant.upload_id, grant.part_number
    if upload_id is None or part_number is None:  # from_query("part") sets both
        raise _Refusal(403, "AccessDenied", "malformed presigned URL")
    await asyncio.to_thread(storage.upload_content_type, key, upload_id)  # or NoSuchUpload
    size = _content_length(request)
    temp = storage.temp_path()
    etag = await _receive(request, temp, size)
    await asyncio.to_thread(storage.commit_part, key, upload_id, part_number, temp)
    return Response(status_code=200, headers={"ETag": f'"{etag}"'})


def _content_length(request: Request) -> int:
    """Return a part's declared size: 411 without one, 400 when malformed or over 5 GiB."""
    values = request.headers.getlist("content-length")
    if not values:
        raise _Refusal(411, "MissingContentLength", "a part upload must send Content-Length")
    value = values[0]
    if len(values) != 1 or not value.isascii() or not value.isdigit():
        raise _Refusal(400, "InvalidArgument", "malformed Content-Length")
    if int(value) > MAX_PART_SIZE:
        raise _Refusal(400, "EntityTooLarge", "a part may not exceed 5 GiB")
    return int(value)


async def _receive(request: Request, temp: Path, size: int) -> str:
    """Stream the body into ``temp``; return its MD5 hex. Exactly ``size`` bytes or 400.

    On any failure ``temp`` is removed and the request refused; reading stops at the first byte
    past ``size``. Creating and removing ``temp`` are done without awaiting: a client that
    disconnects gets its handler cancelled, and a cancellation landing inside an awaited
    open or unlink would leave the temp file behind.
    """
    digest = hashlib.md5(usedforsecurity=False)
    out = temp.open("xb")  # a local create: quick, and not interruptible by a cancellation
    try:
        await _copy_body(request, out, digest, size)
    except BaseException:
        _discard(out, temp)
        raise
    await asyncio.to_thread(out.close)
    return digest.hexdigest()


async def _copy_body(request: Request, out: BinaryIO, digest: hashlib._Hash, size: int) -> None:
    received = 0
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > size:
                raise _Refusal(
                    400, "BodyExceedsContentLength", f"the body is longer than {size} bytes"
                )
            buffer += chunk
            if len(buffer) >= FLUSH_BYTES:
                await asyncio.to_thread(_write, out, digest, bytes(buffer))
                buffer.clear()
    except ClientDisconnect as error:
        raise _Refusal(400, "IncompleteBody", "the client disconnected mid-body") from error
    if received < size:
        raise _Refusal(400, "IncompleteBody", f"the body is shorter than {size} bytes")
    await asyncio.to_thread(_write, out, digest, bytes(buffer))


def _write(out: BinaryIO, digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)
    out.write(data)


def _discard(out: BinaryIO, temp: Path) -> None:
    out.close()
    temp.unlink(missing_ok=True)


async def _get_object(storage: LocalStorage, key: str, query: Mapping[str, str]) -> Response:
    _authorize(storage, "get", key, query)
    info = await asyncio.to_thread(storage.head, key)
    if info is None:
        raise _Refusal(404, "NoSuchKey", f"no object {key}")
    path = await asyncio.to_thread(storage.data_path, key)
    # The header, not media_type: Starlette would append "; charset=utf-8" to text/* types.
    return FileResponse(path, headers={"Content-Type": info.content_type})
