"""Presigned-URL transfers: streamed downloads and uploads, checksums, retries, multipart.

What it owns: moving bytes between a local file and a presigned URL (S3 SigV4 or the gateway's
LocalStorage), in bounded memory (``CHUNK_SIZE`` reads and writes; no file is ever held whole).
It does not choose URLs or keys: the caller gets them from ``task.assign`` /
``task.upload_urls`` and, on ``TransferError.refresh_urls``, asks the gateway for fresh ones.

Errors: everything this module raises on purpose is a ``TransferError`` (``code``, ``retryable``,
``refresh_urls``, ``status``); httpx exceptions are translated here and never escape. Local disk
failures (``OSError``: disk full, missing ``dest_dir``) propagate unchanged and are not retried.
A malformed ``parts`` list raises ``ValueError``.

Retries (one place: ``_retrying``): connection errors, timeouts, malformed responses, 408, 429
and 5xx are retried with stamina's jittered exponential backoff, bounded by ``RetryPolicy``
attempts and total time (``Retry-After`` is honoured up to ``wait_max_s``). Everything else is
fatal at once, in particular an expired URL or a refused signature (403), which are never retried
blindly. Each attempt starts from scratch: a download writes a new temporary file, an upload
reopens the file and re-reads its byte range.

Cancellation: cancelling a call closes the connection and the file and deletes a partial
download; nothing is left behind and ``CancelledError`` propagates. Blocking file work runs in
worker threads (``_in_thread``); a cancellation waits for the running one (at most one chunk
of I/O or an fsync) so that cleanup never races it.

Requests go out exactly as signed: PUTs always carry ``Content-Length`` (never chunked transfer
encoding, which S3 refuses with 411 and SeaweedFS silently accepts), send the given headers
verbatim and add no ``x-amz-*`` header; the client's own auth is not applied (``auth=None``).
Pass an ``httpx.AsyncClient`` dedicated to storage (timeouts set, no default credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar

import httpx
import stamina

from agent.errors import AgentError
from agent.logs import redact
from agent.protocol.messages import OutputPart, UploadPart

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_RETRY",
    "RetryPolicy",
    "TransferError",
    "TransferErrorCode",
    "content_type_matches",
    "download",
    "safe_name",
    "sha256_file",
    "upload",
    "upload_part",
    "upload_parts",
]

CHUNK_SIZE = 1024 * 1024  # one disk read / write and one network chunk
MAX_NAME_BYTES = 200
ERROR_BODY_LIMIT = 8 * 1024  # bytes of an error response read to find its code
MAX_ETAG_LENGTH = 256  # OutputPart.etag is ShortText
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789¹²³"}
)
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_EXPIRED_CODES = frozenset({"ExpiredToken", "RequestExpired", "TokenRefreshRequired"})
_S3_TAG_RE = {tag: re.compile(rf"<{tag}>([^<]{{0,512}})</{tag}>") for tag in ("Code", "Message")}

TransferErrorCode = Literal[
    "unsafe_name",
    "too_large",
    "size_mismatch",
    "checksum",
    "content_type",
    "expired",
    "refused",
    "http",
    "network",
]
T = TypeVar("T")


class TransferError(AgentError):
    """A transfer failed; ``code`` says why and the flags say what the caller should do.

    - ``retryable``: a later try may succeed (network, 5xx, 429 after the retries ran out).
    - ``refresh_urls``: the URL expired or its signature was refused; ask the gateway for fresh
      URLs (``task.upload_request``) instead of retrying this one.
    - ``status``: the HTTP status when the server answered, else None.
    - ``retry_after_s``: the server's ``Retry-After`` (429/503), honoured by the retries.

    The message is redacted with ``agent.logs.redact``: URL signatures never appear in it.
    """

    def __init__(
        self,
        code: TransferErrorCode,
        message: str,
        *,
        retryable: bool = False,
        refresh_urls: bool = False,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """Record the code and flags; ``message`` is redacted before it is stored."""
        super().__init__(redact(message))
        self.code: TransferErrorCode = code
        self.retryable = retryable
        self.refresh_urls = refresh_urls
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried (stamina: exponential backoff with jitter).

    ``attempts`` counts the first try; ``timeout_s`` bounds the total time after which no new
    attempt starts (a running attempt is bounded by the client's own timeouts).
    """

    attempts: int = 5
    timeout_s: float = 1800.0
    wait_initial_s: float = 0.5
    wait_max_s: float = 30.0
    wait_jitter_s: float = 1.0
    on_retry: Callable[[], None] | None = field(default=None, compare=False)
    """Called each time a failed attempt is to be retried (the agent counts them)."""


DEFAULT_RETRY = RetryPolicy()


# ------------------------------------------------------------------------------ pure checks


def safe_name(name: str) -> str:
    r"""Return ``name`` unchanged if it is one plain file name, else raise ``unsafe_name``.

    Refused: empty, ``.``/``..``, any ``/`` or ``\\`` (so no absolute or nested path), ``:``
    (Windows drives and streams), NUL and other control characters, more than 200 UTF-8 bytes,
    text that is not encodable, and Windows device names with or without an extension
    (``CON``, ``nul.txt``, ``COM1``, …; case-insensitive).
    """
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        encoded = b""
    problem = _name_problem(name, encoded)
    if problem is not None:
        raise TransferError("unsafe_name", f"unsafe file name {name!r}: {problem}")
    return name


def _name_problem(name: str, encoded: bytes) -> str | None:
    """Return why ``name`` is not a safe file name, or None."""
    rules = (
        (not encoded, "empty or not encodable as UTF-8"),
        (len(encoded) > MAX_NAME_BYTES, f"longer than {MAX_NAME_BYTES} bytes"),
        (name in {".", ".."}, "a directory reference"),
        (any(sep in name for sep in "/\\:"), "contains a path separator or drive marker"),
        (
            any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in name),
            "contains a control character",
        ),
        (
            name.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_DEVICES,
            "a Windows device name",
        ),
    )
    return next((why for broken, why in rules if broken), None)


def content_type_matches(accept: str | None, content_type: str) -> bool:
    """Return whether ``content_type`` is allowed by ``accept`` (``"image/*,video/mp4"``).

    Case-insensitive; parameters after ``;`` are ignored on both sides; ``*`` and ``*/*`` allow
    anything; ``None``, ``""`` or a list of empty items allow anything.
    """
    patterns = [_media_type(item) for item in (accept or "").split(",")]
    patterns = [pattern for pattern in patterns if pattern]
    if not patterns:
        return True
    actual = _media_type(content_type)
    if "/" not in actual:
        return False
    for pattern in patterns:
        if pattern in {"*", "*/*"} or pattern == actual:
            return True
        if pattern.endswith("/*") and actual.startswith(pattern[:-1]):
            return True
    return False


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


# ------------------------------------------------------------------------------ checksums


async def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of the file, read in ``CHUNK_SIZE`` pieces in a worker thread."""
    return await asyncio.to_thread(_sha256_blocking, path)


def _sha256_blocking(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ threads


async def _in_thread(func: Callable[[], T], cleanup: Callable[[T], None] | None = None) -> T:
    """Return ``func()`` run in a worker thread, and never leave that thread behind.

    A thread cannot be interrupted: when the caller is cancelled meanwhile, this waits for the
    thread to end, hands its result to ``cleanup`` (close the file it opened…), then re-raises
    the cancellation. So no cleanup races a thread still using a file, and nothing is orphaned.
    """
    future = asyncio.ensure_future(asyncio.to_thread(func))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):  # the first one is re-raised below
                await asyncio.wait([future])
        if not future.cancelled() and future.exception() is None and cleanup is not None:
            cleanup(future.result())
        raise


# ------------------------------------------------------------------------------ retries


async def _retrying(operation: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    """Run ``operation`` until it succeeds or fails with something not worth retrying."""

    def hook(error: Exception) -> bool | float:
        if not isinstance(error, TransferError) or not error.retryable:
            return False
        if policy.on_retry is not None:
            policy.on_retry()
        if error.retry_after_s is None:
            return True
        return min(error.retry_after_s, policy.wait_max_s)

    async for attempt in stamina.retry_context(
        on=hook,
        attempts=policy.attempts,
        timeout=policy.timeout_s,
        wait_initial=policy.wait_initial_s,
        wait_max=policy.wait_max_s,
        wait_jitter=policy.wait_jitter_s,
    ):
        with attempt:
            return await operation()
    raise AssertionError("stamina ended without a result")  # pragma: no cover


@contextlib.contextmanager
def _translated(method: str, url: str) -> Iterator[None]:
    """Translate httpx exceptions raised inside into ``TransferError`` (``network``)."""
    try:
        yield
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
        raise TransferError(
            "network", f"{method} {url}: {type(error).__name__}: {error}", retryable=True
        ) from error
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise TransferError(
            "network", f"{method} {url}: {type(error).__name__}: {error}"
        ) from error


async def _check_status(response: httpx.Response, method: str, url: str, ok: set[int]) -> None:
    """Return if the status is in ``ok``; else read a bounded error body and raise."""
    if response.status_code in ok:
        return
    body = bytearray()
    if response.is_stream_consumed:  # built from bytes (a mock transport): already in memory
        with contextlib.suppress(httpx.ResponseNotRead):
            body += response.content[:ERROR_BODY_LIMIT]
    else:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) >= ERROR_BODY_LIMIT:
                break
    raise _status_error(response, method, url, bytes(body[:ERROR_BODY_LIMIT]))


def _status_error(response: httpx.Response, method: str, url: str, body: bytes) -> TransferError:
    """Classify an error response (S3 XML or LocalStorage JSON body)."""
    status = response.status_code
    code, message = _error_fields(body.decode("utf-8", errors="replace"))
    text = f"{method} {url} answered {status} {code or ''}: {message[:300]}".rstrip(": ")
    expired = code in _EXPIRED_CODES or "expired" in message.lower()
    if status in {400, 403} and (expired or code == "SignatureDoesNotMatch"):
        kind: TransferErrorCode = "expired" if expired else "refused"
        return TransferError(kind, text, refresh_urls=True, status=status)
    if status in {401, 403}:
        return TransferError("refused", text, status=status)
    after = _retry_after(response.headers.get("retry-after")) if status in {429, 503} else None
    retryable = status in _RETRYABLE_STATUS
    return TransferError("http", text, retryable=retryable, status=status, retry_after_s=after)


def _error_fields(text: str) -> tuple[str, str]:
    """Return ``(code, message)`` from an S3 XML or ``{"error": {...}}`` JSON error body."""
    xml = [_S3_TAG_RE[tag].search(text) for tag in ("Code", "Message")]
    if xml[0] is not None:
        return xml[0].group(1), xml[1].group(1) if xml[1] is not None else ""
    json_code = re.search(r'"code"\s*:\s*"([^"]{0,128})"', text)
    json_message = re.search(r'"message"\s*:\s*"([^"]{0,512})"', text)
    return (
        json_code.group(1) if json_code else "",
        json_message.group(1) if json_message else text[:300],
    )


def _retry_after(value: str | None) -> float | None:
    """Return a ``Retry-After`` header (seconds or HTTP date) as seconds from now, or None."""
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# ------------------------------------------------------------------------------ download


@dataclass(frozen=True)
class _Limits:
    """What a download must satisfy; each check raises the matching ``TransferError``."""

    url: str
    max_bytes: int
    declared_size: int | None
    expected_sha256: str | None
    accept: str | None

    def check_response(self, response: httpx.Response) -> None:
        """Refuse on the headers alone: a content type ``accept`` excludes, a bad length."""
        content_type = response.headers.get("content-type", "")
        if not content_type_matches(self.accept, content_type):
            raise TransferError(
                "content_type",
                f"GET {self.url}: content type {content_type!r} is not one of {self.accept!r}",
            )
        length = response.headers.get("content-length", "")
        if length.isascii() and length.isdigit():
            self.check_running(int(length))
            self.check_complete(int(length))

    def check_running(self, received: int) -> None:
        """Refuse as soon as more than the allowed bytes have arrived."""
        if received > self.max_bytes:
            raise TransferError(
                "too_large", f"GET {self.url}: the body exceeds {self.max_bytes} bytes"
            )
        if self.declared_size is not None and received > self.declared_size:
            raise TransferError(
                "size_mismatch",
                f"GET {self.url}: the body exceeds its declared {self.declared_size} bytes",
            )

    def check_complete(self, received: int) -> None:
        """Refuse a body shorter than declared."""
        if self.declared_size is not None and received != self.declared_size:
            raise TransferError(
                "size_mismatch",
                f"GET {self.url}: {received} bytes, {self.declared_size} declared",
            )

    def check_digest(self, sha256: str) -> None:
        """Refuse a body whose SHA-256 is not the expected one."""
        if self.expected_sha256 is not None and sha256 != self.expected_sha256:
            raise TransferError(
                "checksum",
                f"GET {self.url}: sha256 {sha256}, expected {self.expected_sha256}",
            )


async def download(
    client: httpx.AsyncClient,
    url: str,
    dest_dir: Path,
    name: str,
    *,
    max_bytes: int,
    declared_size: int | None = None,
    expected_sha256: str | None = None,
    accept: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Path:
    """Download ``url`` to ``dest_dir / name`` atomically and return that path.

    ``name`` must pass ``safe_name``; ``dest_dir`` must exist. The body is streamed into a
    temporary file inside ``dest_dir`` (``CHUNK_SIZE`` writes in a worker thread, fsynced) and
    renamed over ``name`` only when every check passed: status 200, content type allowed by
    ``accept``, at most ``max_bytes`` (``too_large``) and exactly ``declared_size`` bytes
    (``size_mismatch``; reading stops at the first byte over), and ``expected_sha256``
    (``checksum``). On any failure or cancellation the temporary file is deleted and nothing
    else is written. The file is created with mode 0600. Asks for ``Accept-Encoding: identity``
    so the file holds the stored bytes.
    """
    safe_name(name)
    if expected_sha256 is not None and not _SHA256_RE.fullmatch(expected_sha256):
        raise ValueError("expected_sha256 must be 64 hex digits")
    limits = _Limits(
        redact(url),
        max_bytes,
        declared_size,
        expected_sha256.lower() if expected_sha256 else None,
        accept,
    )
    if declared_size is not None:
        limits.check_running(declared_size)  # declared over max_bytes: refuse without a request
    target = await asyncio.to_thread(_target_in, dest_dir, name)
    await _retrying(lambda: _download_once(client, url, target, limits), retry)
    return target


def _target_in(dest_dir: Path, name: str) -> Path:
    """Return ``dest_dir / name`` after checking it is a direct child of the resolved dir."""
    root = dest_dir.resolve(strict=True)
    if not root.is_dir():
        raise NotADirectoryError(f"{dest_dir} is not a directory")
    target = root / name
    if target.parent != root or target.name != name:
        raise TransferError("unsafe_name", f"{name!r} does not stay inside {dest_dir}")
    return target


async def _download_once(
    client: httpx.AsyncClient, url: str, target: Path, limits: _Limits
) -> None:
    headers = {"Accept-Encoding": "identity"}
    with _translated("GET", url):
        async with client.stream(
            "GET", url, headers=headers, auth=None, follow_redirects=False
        ) as response:
            await _check_status(response, "GET", url, {200})
            limits.check_response(response)
            await _save(response, target, limits)


async def _save(response: httpx.Response, target: Path, limits: _Limits) -> None:
    """Stream the body into a temporary file next to ``target``, check it, rename it."""
    file, temp = await _in_thread(partial(_open_temp, target.parent), lambda made: _discard(*made))
    try:
        digest = hashlib.sha256()
        received = 0
        buffer = bytearray()
        async for chunk in response.aiter_raw():
            received += len(chunk)
            limits.check_running(received)
            buffer += chunk
            if len(buffer) >= CHUNK_SIZE:  # not touched again until the write returned
                await _in_thread(partial(_write, file, digest, buffer))
                buffer.clear()
        await _in_thread(partial(_write, file, digest, buffer))
        limits.check_complete(received)
        limits.check_digest(digest.hexdigest())
        await _in_thread(partial(_commit, file, temp, target))
    except BaseException:
        _discard(file, temp)  # synchronous: must also run when cancelled
        raise


def _open_temp(directory: Path) -> tuple[BinaryIO, Path]:
    descriptor, name = tempfile.mkstemp(prefix=".download-", suffix=".partial", dir=directory)
    return os.fdopen(descriptor, "wb"), Path(name)


def _write(file: BinaryIO, digest: hashlib._Hash, data: bytearray) -> None:
    digest.update(data)
    file.write(data)


def _commit(file: BinaryIO, temp: Path, target: Path) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
    temp.replace(target)


def _discard(file: BinaryIO, temp: Path) -> None:
    file.close()
    temp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ upload


async def upload(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    path: Path,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> None:
    """PUT the file at ``path`` to a presigned ``url``, streamed from disk.

    ``headers`` (``upload_headers`` of ``task.upload_urls``) are sent verbatim; a
    ``Content-Length`` equal to the file size is always sent (added when ``headers`` has none;
    ``size_mismatch`` when theirs differs). Retried as described in the module docstring, each
    attempt re-reading the file; a file that shrinks meanwhile fails with ``size_mismatch``
    before the request is complete (never a short body). 403 for an expired URL or a refused
    signature → ``TransferError(refresh_urls=True)``; other 4xx are fatal. A 412 means the object
    exists: fatal on the first try, but after an attempt that failed on the network it counts
    as success (the key was free when that attempt started, so the object is most likely that
    attempt's, stored before its answer was lost; the gateway checks its size at completion).
    """
    size = await asyncio.to_thread(_file_size, path)
    request_headers = _with_length(headers, size, redact(url))
    sent = False  # an earlier attempt died on the network: it may have been stored

    async def once() -> None:
        nonlocal sent
        try:
            await _put_range(client, url, request_headers, path, offset=0, length=size)
        except TransferError as exc:
            if exc.status == 412 and sent:
                return  # our own earlier attempt created it; the gateway verifies its size
            sent = sent or exc.status is None
            raise

    await _retrying(once, retry)


async def upload_parts(
    client: httpx.AsyncClient,
    parts: Sequence[UploadPart],
    path: Path,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[OutputPart]:
    """Upload ``path`` as multipart parts and return their ``(part_number, etag)`` in order.

    Parts are taken in ascending ``part_number``; part *n* is the byte range that starts at the
    sum of the sizes of the parts before it. The sizes must add up to the file size
    (``size_mismatch``); duplicate numbers or no parts raise ``ValueError``. Each part is PUT
    and retried on its own (``upload_part``); the ETags are kept exactly as the server sent
    them (quoted), which S3, SeaweedFS and LocalStorage all accept in CompleteMultipartUpload.
    """
    ordered = sorted(parts, key=lambda part: part.part_number)
    numbers = [part.part_number for part in ordered]
    if not numbers or len(set(numbers)) != len(numbers):
        raise ValueError("parts must be non-empty with distinct part numbers")
    size = await asyncio.to_thread(_file_size, path)
    total = sum(part.size for part in ordered)
    if total != size:
        raise TransferError("size_mismatch", f"parts add up to {total} bytes, {path} has {size}")
    done: list[OutputPart] = []
    offset = 0
    for part in ordered:
        done.append(await upload_part(client, part, path, offset, retry=retry))
        offset += part.size
    return done


async def upload_part(
    client: httpx.AsyncClient,
    part: UploadPart,
    path: Path,
    offset: int,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> OutputPart:
    """PUT bytes ``[offset, offset + part.size)`` of ``path`` to ``part.upload_url``.

    Sends ``Content-Length`` only (part URLs sign nothing else) and returns the part's number
    and the response's ``ETag`` verbatim. Retried like ``upload``; a response without an ETag
    is a fatal ``http`` error.
    """
    url = redact(part.upload_url)
    size = await asyncio.to_thread(_file_size, path)
    if offset < 0 or offset + part.size > size:
        raise TransferError("size_mismatch", f"part {part.part_number} ends past {size} bytes")
    headers = {"Content-Length": str(part.size)}
    response_headers = await _retrying(
        lambda: _put_range(client, part.upload_url, headers, path, offset=offset, length=part.size),
        retry,
    )
    etag = response_headers.get("etag", "")
    if not etag or len(etag) > MAX_ETAG_LENGTH:
        raise TransferError("http", f"PUT {url}: the response carries no usable ETag")
    return OutputPart(part_number=part.part_number, etag=etag)


def _file_size(path: Path) -> int:
    with path.open("rb") as file:  # a regular file we can read (not a directory or FIFO)
        info = os.fstat(file.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    return info.st_size


def _with_length(headers: Mapping[str, str], size: int, url: str) -> dict[str, str]:
    """Return ``headers`` plus ``Content-Length`` when absent; refuse a different one."""
    lengths = [value for name, value in headers.items() if name.lower() == "content-length"]
    if lengths and lengths != [str(size)]:
        raise TransferError(
            "size_mismatch", f"PUT {url}: signed for {lengths[0]} bytes, the file has {size}"
        )
    return {**headers} if lengths else {**headers, "Content-Length": str(size)}


async def _put_range(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    path: Path,
    *,
    offset: int,
    length: int,
) -> httpx.Headers:
    """One PUT attempt of ``length`` bytes of ``path`` from ``offset``; returns its headers."""
    file = await _in_thread(partial(_open_for_reading, path), lambda opened: opened.close())
    try:
        async with contextlib.aclosing(_file_range(file, offset, length, path)) as body:
            with _translated("PUT", url):
                async with client.stream(
                    "PUT", url, content=body, headers=headers, auth=None, follow_redirects=False
                ) as response:
                    await _check_status(response, "PUT", url, {200, 201, 204})
                    return response.headers
    finally:
        file.close()


def _open_for_reading(path: Path) -> BinaryIO:
    return path.open("rb")


async def _file_range(
    file: BinaryIO, offset: int, length: int, path: Path
) -> AsyncGenerator[bytes, None]:
    """Yield ``length`` bytes of ``file`` from ``offset`` in ``CHUNK_SIZE`` reads (threaded)."""
    await _in_thread(partial(file.seek, offset))
    remaining = length
    while remaining > 0:
        chunk = await _in_thread(partial(file.read, min(CHUNK_SIZE, remaining)))
        if not chunk:
            raise TransferError("size_mismatch", f"{path} shrank during the upload")
        remaining -= len(chunk)
        yield chunk
