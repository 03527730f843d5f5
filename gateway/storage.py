"""Object storage for the gateway: one interface, two backends.

``ObjectStorage`` is what the rest of the gateway uses: presigned upload/download URLs (pure
computation, safe to call from async code), multipart uploads, ``head`` and ``delete`` (blocking
I/O: call them through ``asyncio.to_thread``).

- ``S3Storage``: any S3-compatible service (AWS S3, SeaweedFS, MinIO...) through botocore SigV4
  presigning. The server enforces the signatures.
- ``LocalStorage``: the zero-setup default. Objects are files under a directory; URLs point at the
  gateway's own ``/storage/`` routes (``gateway.storage_routes``), signed with HMAC-SHA256 and
  refused by the same rules as S3.

Errors::

    ValueError           a key, size, content type, part number or lifetime the API refuses
    StorageError         the backend failed (``code`` is the S3-style error code)
    └── AccessDeniedError    a LocalStorage URL that is expired or not signed by us (HTTP 403)

The URL scheme and refusal rules are documented in ``docs/storage.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

MAX_KEY_LENGTH = 1024
MAX_EXPIRES_S = 7 * 24 * 3600  # SigV4's limit, applied to both backends
MAX_PART_NUMBER = 10_000
MIN_PART_SIZE = 5 * 1024 * 1024  # every part but the last, as S3 (EntityTooSmall)
MAX_PART_SIZE = 5 * 1024**3
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_SEGMENT = r"[A-Za-z0-9._=-]+"
_KEY_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_CONTENT_TYPE_RE = re.compile(r"[!-~](?:[ -~]{0,253}[!-~])?")  # printable ASCII, no edge spaces
_UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
_SIGNATURE_VERSION = "cyberun-local-v1"
# Headers a presigned S3 PUT may sign, by their lower-case name: (name to send, what it carries).
_PUT_HEADER_NAMES = {
    "content-length": "Content-Length",
    "content-type": "Content-Type",
    "if-none-match": "If-None-Match",
}


@dataclass(frozen=True)
class PresignedPut:
    """A URL that accepts exactly one PUT, and the headers that PUT must send verbatim."""

    url: str
    headers: dict[str, str]
    expires_at: datetime  # aware, UTC


@dataclass(frozen=True)
class ObjectInfo:
    """What ``head`` knows about a stored object."""

    key: str
    size: int
    content_type: str


class StorageError(Exception):
    """The storage backend failed or refused an operation; ``code`` is an S3-style error code."""

    def __init__(self, message: str, *, code: str = "InternalError") -> None:
        """Record the message and the error code (e.g. ``NoSuchUpload``, ``InvalidPart``)."""
        super().__init__(message)
        self.code = code


class AccessDeniedError(StorageError):
    """A LocalStorage URL is expired or its signature does not match (answered with 403)."""


class ObjectStorage(Protocol):
    """Object storage as the gateway uses it. Presigning is pure; the rest is blocking I/O."""

    def presign_put(
        self, key: str, *, size: int, content_type: str, expires_s: int
    ) -> PresignedPut:
        """Return a single-PUT URL for exactly ``size`` bytes of ``content_type``; no overwrite."""
        ...

    def presign_get(self, key: str, *, expires_s: int) -> tuple[str, datetime]:
        """Return a download URL and when it expires."""
        ...

    def create_multipart(self, key: str, *, content_type: str) -> str:
        """Start a multipart upload and return its upload id (blocking)."""
        ...

    def presign_part(self, key: str, *, upload_id: str, part_number: int, expires_s: int) -> str:
        """Return a PUT URL for one part (1..10000); its response carries the part's ETag."""
        ...

    def complete_multipart(self, key: str, *, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Assemble the object from ``(part_number, etag)`` in ascending order (blocking)."""
        ...

    def abort_multipart(self, key: str, *, upload_id: str) -> None:
        """Discard an upload and its parts; unknown uploads are ignored (blocking)."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Return the object's size and type, or None when it does not exist (blocking)."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; deleting an absent object succeeds (blocking)."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise ValueError.

    A key is relative, at most 1024 characters, made of ``/``-separated non-empty segments of
    ``[A-Za-z0-9._=-]``, none of which is ``.`` or ``..``.
    """
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"object key longer than {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"invalid object key {key!r}: use /-separated segments of [A-Za-z0-9._=-], "
            "no leading or doubled /"
        )
    if any(segment in {".", ".."} for segment in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: '.' and '..' segments are not allowed")
    return key


def validate_content_type(content_type: str) -> str:
    """Return ``content_type`` if it can travel verbatim in a header, else raise ValueError."""
    if not _CONTENT_TYPE_RE.fullmatch(content_type):
        raise ValueError(f"invalid content type {content_type!r}: printable ASCII, ≤ 255 chars")
    return content_type


def _check_expires(expires_s: int) -> None:
    if not 1 <= expires_s <= MAX_EXPIRES_S:
        raise ValueError(f"expires_s must be between 1 and {MAX_EXPIRES_S}")


def _check_part_number(part_number: int) -> None:
    if not 1 <= part_number <= MAX_PART_NUMBER:
        raise ValueError(f"part_number must be between 1 and {MAX_PART_NUMBER}")


def _check_parts_order(parts: list[tuple[int, str]]) -> None:
    numbers = [number for number, _ in parts]
    if not numbers or numbers != sorted(set(numbers)):
        raise StorageError(
            "parts must be non-empty, in ascending order, without duplicates",
            code="InvalidPartOrder",
        )


# ---------------------------------------------------------------------------------------- S3


class S3Storage:
    """An S3-compatible bucket through botocore; presigned URLs are SigV4, path-style.

    ``endpoint_url`` must be the address clients use: the host is part of the signature.
    botocore errors are translated to ``StorageError`` with the S3 error code.
    """

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
    ) -> None:
        """Create the client (no network I/O)."""
        self.bucket = bucket
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )

    def presign_put(
        self, key: str, *, size: int, content_type: str, expires_s: int
    ) -> PresignedPut:
        """Sign Content-Length, Content-Type and ``If-None-Match: *`` into a PUT URL.

        ``headers`` holds exactly the headers named in ``X-Amz-SignedHeaders`` (except Host).
        """
        validate_key(key)
        validate_content_type(content_type)
        if size < 0:
            raise ValueError("size must be >= 0")
        _check_expires(expires_s)
        values = {"content-length": str(size), "content-type": content_type, "if-none-match": "*"}
        url = self._presign(
            "put_object",
            expires_s,
            Key=key,
            ContentLength=size,
            ContentType=content_type,
            IfNoneMatch="*",
        )
        return PresignedPut(url, _signed_put_headers(url, values), _sigv4_expiry(url))

    def presign_get(self, key: str, *, expires_s: int) -> tuple[str, datetime]:
        """Return a presigned GET URL and its expiry."""
        validate_key(key)
        _check_expires(expires_s)
        url = self._presign("get_object", expires_s, Key=key)
        return url, _sigv4_expiry(url)

    def create_multipart(self, key: str, *, content_type: str) -> str:
        """Start a multipart upload (network I/O) and return its upload id."""
        validate_key(key)
        validate_content_type(content_type)
        response = self._call(
            "create_multipart_upload", Bucket=self.bucket, Key=key, ContentType=content_type
        )
        return str(response["UploadId"])

    def presign_part(self, key: str, *, upload_id: str, part_number: int, expires_s: int) -> str:
        """Return a presigned UploadPart URL (only Host is signed; send Content-Length)."""
        validate_key(key)
        _check_part_number(part_number)
        _check_expires(expires_s)
        return self._presign(
            "upload_part", expires_s, Key=key, UploadId=upload_id, PartNumber=part_number
        )

    def complete_multipart(self, key: str, *, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Complete the upload (network I/O); bad ETags raise StorageError ``InvalidPart``."""
        validate_key(key)
        _check_parts_order(parts)
        self._call(
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]},
        )

    def abort_multipart(self, key: str, *, upload_id: str) -> None:
        """Abort the upload (network I/O); an unknown upload id is not an error."""
        validate_key(key)
        try:
            self._call("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
        except StorageError as error:
            if error.code != "NoSuchUpload":
                raise

    def head(self, key: str) -> ObjectInfo | None:
        """Return size and content type (network I/O), or None when the object is absent."""
        validate_key(key)
        try:
            response = self._call("head_object", Bucket=self.bucket, Key=key)
        except StorageError as error:
            if error.code in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            content_type=str(response.get("ContentType") or DEFAULT_CONTENT_TYPE),
        )

    def delete(self, key: str) -> None:
        """Delete the object (network I/O); an absent object is not an error."""
        validate_key(key)
        self._call("delete_object", Bucket=self.bucket, Key=key)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (network I/O)."""
        try:
            self._call("head_bucket", Bucket=self.bucket)
        except StorageError as error:
            if error.code not in {"404", "NoSuchBucket", "NotFound"}:
                raise
        else:
            return
        try:
            self._call("create_bucket", Bucket=self.bucket)
        except StorageError as error:
            if error.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    def _presign(self, operation: str, expires_s: int, **params: Any) -> str:
        try:
            url = self._client.generate_presigned_url(
                operation, Params={"Bucket": self.bucket, **params}, ExpiresIn=expires_s
            )
        except (BotoCoreError, ClientError) as error:
            raise StorageError(f"cannot presign {operation}: {error}") from error
        return str(url)

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], getattr(self._client, operation)(**params))
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "Unknown"))
            raise StorageError(f"S3 {operation} failed: {error}", code=code) from error
        except BotoCoreError as error:
            raise StorageError(f"S3 {operation} failed: {error}", code="Unavailable") from error


def _signed_put_headers(url: str, values: Mapping[str, str]) -> dict[str, str]:
    """Return the headers ``X-Amz-SignedHeaders`` names (minus Host), with their values."""
    signed = _query_value(url, "X-Amz-SignedHeaders").split(";")
    headers: dict[str, str] = {}
    for name in signed:
        if name == "host":
            continue
        if name not in values:
            raise StorageError(f"botocore signed an unexpected header {name!r}")
        headers[_PUT_HEADER_NAMES[name]] = values[name]
    return headers


def _sigv4_expiry(url: str) -> datetime:
    """Return ``X-Amz-Date + X-Amz-Expires`` of a presigned URL as an aware UTC datetime."""
    signed_at = datetime.strptime(_query_value(url, "X-Amz-Date"), "%Y%m%dT%H%M%S%z")
    expires = int(_query_value(url, "X-Amz-Expires"))
    return signed_at.astimezone(UTC) + timedelta(seconds=expires)


def _query_value(url: str, name: str) -> str:
    values = parse_qs(urlsplit(url).query).get(name)
    if not values:
        raise StorageError(f"presigned URL lacks {name}")
    return values[0]


# ------------------------------------------------------------------------------------- local

Action = Literal["get", "put", "part"]


@dataclass(frozen=True)
class Grant:
    """What one LocalStorage URL allows: ``action`` on ``key`` until ``expires`` (unix seconds).

    PUT grants fix the exact size and content type; part grants fix the upload and part number.
    The signature is HMAC-SHA256 over ``message()``; the URL's query carries ``query()``.
    """

    action: Action
    key: str
    expires: int
    size: int | None = None
    content_type: str | None = None
    upload_id: str | None = None
    part_number: int | None = None

    def message(self) -> bytes:
        """Return the signed bytes: every field, newline-separated (no field holds a newline)."""
        fields = [
            _SIGNATURE_VERSION,
            self.action,
            self.key,
            str(self.expires),
            "" if self.size is None else str(self.size),
            self.content_type or "",
            self.upload_id or "",
            "" if self.part_number is None else str(self.part_number),
        ]
        return "\n".join(fields).encode()

    def query(self) -> dict[str, str]:
        """Return the query parameters (without ``sig``) that let the server rebuild this grant."""
        query: dict[str, str] = {}
        if self.action == "part":
            query["upload"] = str(self.upload_id)
            query["part"] = str(self.part_number)
        query["expires"] = str(self.expires)
        if self.action == "put":
            query["size"] = str(self.size)
            query["type"] = str(self.content_type)
        return query

    @classmethod
    def from_query(cls, action: Action, key: str, query: Mapping[str, str]) -> Grant:
        """Rebuild a grant from a request's query; ValueError when a parameter is missing/bad."""
        expires = _int_param(query, "expires")
        if action == "put":
            content_type = validate_content_type(_param(query, "type"))
            return cls(
                action, key, expires, size=_int_param(query, "size"), content_type=content_type
            )
        if action == "part":
            upload_id = _upload_id(_param(query, "upload"))
            return cls(
                action, key, expires, upload_id=upload_id, part_number=_int_param(query, "part")
            )
        return cls(action, key, expires)


def _param(query: Mapping[str, str], name: str) -> str:
    value = query.get(name)
    if value is None:
        raise ValueError(f"missing query parameter {name!r}")
    return value


def _int_param(query: Mapping[str, str], name: str) -> int:
    value = _param(query, name)
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise ValueError(f"query parameter {name!r} is not a non-negative integer")
    return int(value)


def _upload_id(value: str) -> str:
    if not _UPLOAD_ID_RE.fullmatch(value):
        raise ValueError("malformed upload id")
    return value


class LocalStorage:
    """Objects as files under ``root``, served by ``gateway.storage_routes`` at ``base_url``.

    Layout (all inside ``root``; keys are validated, so no path leaves it)::

        objects/<key>              the bytes
        meta/<key>.json            {"content_type": ...}
        uploads/<upload_id>/       upload.json + one file per part (multipart in progress)
        tmp/                       partial writes; renamed or hard-linked into place

    Writes are atomic: a new object appears whole or not at all, and a PUT never replaces an
    existing object (``os.link`` fails if the name exists). Requires a POSIX filesystem with
    hard links. ``clock`` (unix seconds) is used for expiry, both when signing and checking.
    """

    def __init__(
        self,
        root: Path,
        base_url: str,
        secret: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the directory layout under ``root``; ``secret`` must be ≥ 16 bytes."""
        if len(secret) < 16:
            raise ValueError("LocalStorage secret must be at least 16 bytes")
        self.root = root.resolve()
        self.base_url = base_url.rstrip("/")
        self._secret = secret
        self._clock = clock
        for sub in ("objects", "meta", "uploads", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- signing (pure) --

    def sign(self, grant: Grant) -> str:
        """Return the hex HMAC-SHA256 of ``grant``."""
        return hmac.new(self._secret, grant.message(), hashlib.sha256).hexdigest()

    def verify(self, grant: Grant, signature: str) -> None:
        """Raise AccessDeniedError when the grant is expired or ``signature`` is not ours."""
        if self._clock() > grant.expires:
            raise AccessDeniedError("Request has expired", code="AccessDenied")
        if not signature.isascii() or not hmac.compare_digest(self.sign(grant), signature):
            raise AccessDeniedError(
                "The request signature does not match", code="SignatureDoesNotMatch"
            )

    def url_for(self, grant: Grant) -> str:
        """Return the signed URL of ``grant``."""
        query = urlencode({**grant.query(), "sig": self.sign(grant)})
        return f"{self.base_url}/storage/{grant.key}?{query}"

    def _expiry(self, expires_s: int) -> int:
        _check_expires(expires_s)
        return int(self._clock()) + expires_s

    def presign_put(
        self, key: str, *, size: int, content_type: str, expires_s: int
    ) -> PresignedPut:
        """Return a PUT URL signed over key, expiry, exact Content-Length and Content-Type."""
        validate_key(key)
        validate_content_type(content_type)
        if size < 0:
            raise ValueError("size must be >= 0")
        expires = self._expiry(expires_s)
        grant = Grant("put", key, expires, size=size, content_type=content_type)
        headers = {"Content-Length": str(size), "Content-Type": content_type, "If-None-Match": "*"}
        return PresignedPut(self.url_for(grant), headers, datetime.fromtimestamp(expires, UTC))

    def presign_get(self, key: str, *, expires_s: int) -> tuple[str, datetime]:
        """Return a GET URL signed over key and expiry."""
        validate_key(key)
        expires = self._expiry(expires_s)
        return self.url_for(Grant("get", key, expires)), datetime.fromtimestamp(expires, UTC)

    def presign_part(self, key: str, *, upload_id: str, part_number: int, expires_s: int) -> str:
        """Return a part PUT URL signed over key, upload id, part number and expiry."""
        validate_key(key)
        _upload_id(upload_id)
        _check_part_number(part_number)
        expires = self._expiry(expires_s)
        return self.url_for(
            Grant("part", key, expires, upload_id=upload_id, part_number=part_number)
        )

    # -- objects (blocking file I/O) --

    def data_path(self, key: str) -> Path:
        """Return where the object's bytes live (whether or not it exists)."""
        return self._inside(self.root / "objects" / validate_key(key))

    def _meta_path(self, key: str) -> Path:
        return self._inside(self.root / "meta" / f"{validate_key(key)}.json")

    def _inside(self, path: Path) -> Path:
        if not path.resolve().is_relative_to(self.root):
            raise StorageError(f"{path} resolves outside the storage root", code="InvalidKey")
        return path

    def head(self, key: str) -> ObjectInfo | None:
        """Return size and content type, or None when the object does not exist."""
        try:
            status = self.data_path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            raise StorageError(f"cannot stat {key}: {error}") from error
        if not stat.S_ISREG(status.st_mode):
            return None  # a prefix of other keys, not an object
        return ObjectInfo(key=key, size=status.st_size, content_type=self._content_type(key))

    def _content_type(self, key: str) -> str:
        try:
            meta = json.loads(self._meta_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return DEFAULT_CONTENT_TYPE  # a commit in progress, or a hand-placed file
        return str(meta.get("content_type") or DEFAULT_CONTENT_TYPE)

    def delete(self, key: str) -> None:
        """Delete the object and its metadata; an absent object is not an error."""
        try:
            self.data_path(key).unlink(missing_ok=True)
            self._meta_path(key).unlink(missing_ok=True)
        except NotADirectoryError:
            return
        except OSError as error:
            raise StorageError(f"cannot delete {key}: {error}") from error

    def temp_path(self) -> Path:
        """Return a fresh path in ``tmp/`` for a partial write (same filesystem as objects)."""
        return self.root / "tmp" / secrets.token_hex(16)

    def commit_new(self, key: str, temp: Path, content_type: str) -> bool:
        """Move the finished ``temp`` file to ``key`` unless the key exists (then False).

        ``temp`` is consumed either way. Raises StorageError ``KeyConflict`` when a prefix of the
        key is an object (``a`` exists, ``a/b`` is written).
        """
        meta_temp = self.temp_path()
        try:
            dest = self._prepare(key)
            meta_temp.write_text(json.dumps({"content_type": content_type}), encoding="utf-8")
            os.link(temp, dest)  # atomic create-if-absent: never replaces an object
            meta_temp.replace(self._meta_path(key))
        except FileExistsError:
            return False
        except OSError as error:
            raise StorageError(f"cannot store {key}: {error}") from error
        finally:
            temp.unlink(missing_ok=True)
            meta_temp.unlink(missing_ok=True)
        return True

    def _commit_replace(self, key: str, temp: Path, content_type: str) -> None:
        """Move ``temp`` to ``key``, replacing any object there (multipart completion)."""
        dest = self._prepare(key)
        meta_temp = self.temp_path()
        try:
            meta_temp.write_text(json.dumps({"content_type": content_type}), encoding="utf-8")
            temp.replace(dest)
            meta_temp.replace(self._meta_path(key))
        except IsADirectoryError as error:
            raise StorageError(f"{key} is a prefix of other objects", code="KeyConflict") from error
        except OSError as error:
            raise StorageError(f"cannot store {key}: {error}") from error
        finally:
            meta_temp.unlink(missing_ok=True)

    def _prepare(self, key: str) -> Path:
        dest = self.data_path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._meta_path(key).parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            raise StorageError(f"a prefix of {key} is an object", code="KeyConflict") from error
        return dest

    # -- multipart (blocking file I/O) --

    def _upload_dir(self, upload_id: str) -> Path:
        return self.root / "uploads" / _upload_id(upload_id)

    def create_multipart(self, key: str, *, content_type: str) -> str:
        """Start an upload: a directory holding its key, content type and, later, its parts."""
        validate_key(key)
        validate_content_type(content_type)
        upload_id = secrets.token_hex(16)
        directory = self._upload_dir(upload_id)
        info = {"key": key, "content_type": content_type}
        try:
            directory.mkdir()
            (directory / "upload.json").write_text(json.dumps(info), encoding="utf-8")
        except OSError as error:
            raise StorageError(f"cannot start an upload: {error}") from error
        return upload_id

    def upload_content_type(self, key: str, upload_id: str) -> str:
        """Return the upload's content type; StorageError ``NoSuchUpload`` if not ``key``'s."""
        try:
            info = json.loads(
                (self._upload_dir(upload_id) / "upload.json").read_text(encoding="utf-8")
            )
        except (OSError, ValueError) as error:
            raise StorageError("no such upload", code="NoSuchUpload") from error
        if info.get("key") != key:
            raise StorageError("no such upload for this key", code="NoSuchUpload")
        return str(info["content_type"])

    def commit_part(self, key: str, upload_id: str, part_number: int, temp: Path) -> None:
        """Move a received part into its upload (replacing an earlier try); consumes ``temp``."""
        try:
            self.upload_content_type(key, upload_id)
            _check_part_number(part_number)
            temp.replace(self._part_path(upload_id, part_number))
        except FileNotFoundError as error:  # aborted or completed meanwhile
            raise StorageError("no such upload", code="NoSuchUpload") from error
        except OSError as error:
            raise StorageError(f"cannot store part {part_number}: {error}") from error
        finally:
            temp.unlink(missing_ok=True)

    def _part_path(self, upload_id: str, part_number: int) -> Path:
        return self._upload_dir(upload_id) / f"part-{part_number:05d}"

    def complete_multipart(self, key: str, *, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Concatenate the parts in order after checking each ETag (MD5 hex, quotes optional).

        Raises StorageError ``NoSuchUpload``, ``InvalidPartOrder``, ``InvalidPart`` (missing
        part, ETag mismatch) or ``EntityTooSmall`` (a part but the last under 5 MiB).
        """
        validate_key(key)
        content_type = self.upload_content_type(key, upload_id)
        _check_parts_order(parts)
        temp = self.temp_path()
        try:
            with temp.open("xb") as out:
                for index, (number, etag) in enumerate(parts):
                    last = index == len(parts) - 1
                    self._append_part(out, self._part_path(upload_id, number), etag, last=last)
            self._commit_replace(key, temp, content_type)
        except OSError as error:
            raise StorageError(f"cannot assemble {key}: {error}") from error
        finally:
            temp.unlink(missing_ok=True)
        shutil.rmtree(self._upload_dir(upload_id), ignore_errors=True)

    @staticmethod
    def _append_part(out: BinaryIO, part: Path, etag: str, *, last: bool) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with part.open("rb") as source:
                while chunk := source.read(1024 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
                size = source.tell()
        except FileNotFoundError as error:
            raise StorageError(f"{part.name} was not uploaded", code="InvalidPart") from error
        if digest.hexdigest() != etag.strip('"'):
            raise StorageError(f"ETag of {part.name} does not match", code="InvalidPart")
        if size < MIN_PART_SIZE and not last:
            raise StorageError(f"{part.name} is smaller than 5 MiB", code="EntityTooSmall")

    def abort_multipart(self, key: str, *, upload_id: str) -> None:
        """Delete the upload and its parts; an unknown upload (or another key's) is ignored."""
        validate_key(key)
        try:
            self.upload_content_type(key, upload_id)
        except StorageError:
            return
        shutil.rmtree(self._upload_dir(upload_id), ignore_errors=True)
