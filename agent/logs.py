"""Logging: structlog for the agent, stdlib logging routed through it, secrets redacted.

One pipeline serves both structlog loggers and stdlib loggers (websockets, httpx, uvicorn):
the root logging handler formats every record with structlog's `ProcessorFormatter`::

    contextvars → level/logger name → ISO UTC timestamp → exception text → redact → render

Rendering is JSON lines when the stream is not a TTY (journald, Docker) and a readable
console format on a TTY. `redact` removes credentials (``dk-``/``ak-``/``sk-`` keys, bearer
tokens) and presigned-URL signatures from every string in the event, nested values and
exception text included; it is a pure function that other modules reuse.

Bind task or agent context with `bind` (``structlog.contextvars``); it appears on every line
logged in the same context.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, unbind_contextvars

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["bind", "configure", "get_logger", "redact", "redact_event", "reset", "unbind"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_MASK = "***"

# Credentials of the platform: dk- device, ak- agent, sk- integration keys. Not preceded by a
# letter or digit, so "task-0123456789" stays readable.
_KEY_RE = re.compile(r"(?<![A-Za-z0-9])(dk|ak|sk)-[A-Za-z0-9_-]{8,}")
# Query parameters that authorise a presigned URL (S3, GCS, Azure SAS) or carry a token.
_QUERY_RE = re.compile(
    r"(?<![A-Za-z0-9_-])("
    r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|"
    r"X-Goog-Signature|X-Goog-Credential|Signature|sig|token|access_token|refresh_token|"
    r"password|secret|api_key|apikey"
    r")=([^&#\"'<>\x00-\x20\x7f]+)",
    re.IGNORECASE,
)
# "Authorization: Bearer x", "authorization=Basic x", "'Authorization': 'x'".
_AUTH_HEADER_RE = re.compile(
    r"(\bauthorization[\"']?\s*[:=]\s*[\"']?)((?:bearer|basic|digest|token)\s+)?[^\s\"',;]+",
    re.IGNORECASE,
)
_BEARER_RE = re.compile(r"\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
_JWT_RE = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")

# Mapping keys whose whole value is a secret (compared lower-case).
_SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "credential",
        "password",
        "secret",
        "token",
        "access_token",
        "refresh_token",
        "api_key",
        "x-amz-security-token",
        "x-amz-signature",
        "x-amz-credential",
    }
)


def _mask_auth_header(match: re.Match[str]) -> str:
    return f"{match.group(1)}{match.group(2) or ''}{_MASK}"


def redact(text: str) -> str:
    """Return *text* with credentials, bearer tokens and URL signatures replaced by ``***``.

    Idempotent: ``redact(redact(t)) == redact(t)``.
    """
    text = _AUTH_HEADER_RE.sub(_mask_auth_header, text)
    text = _BEARER_RE.sub(rf"\1 {_MASK}", text)
    text = _KEY_RE.sub(rf"\1-{_MASK}", text)
    text = _QUERY_RE.sub(rf"\1={_MASK}", text)
    return _JWT_RE.sub(f"eyJ{_MASK}", text)


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return _redact_mapping(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return redact(repr(value))


def _redact_mapping(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    return {
        key: _MASK if str(key).lower() in _SECRET_KEYS else _redact_value(item)
        for key, item in mapping.items()
    }


def redact_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Structlog processor: redact every value of the event, recursively."""
    return _redact_mapping(event_dict)


class _AgentHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler `configure` installs; its class marks it for replacement."""


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def _renderer(fmt: str, stream: TextIO) -> Processor:
    if fmt == "json" or (fmt == "auto" and not _is_tty(stream)):
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(
        colors=_is_tty(stream), exception_formatter=structlog.dev.plain_traceback
    )


def configure(level: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the root stdlib logger to write to *stream* (default stderr).

    *level* is ``debug``, ``info``, ``warning`` or ``error``; *fmt* is ``json``,
    ``console`` or ``auto`` (console on a TTY, else JSON). Calling it again replaces the
    previous configuration.
    """
    level_no = LEVELS[level.lower()]
    out = sys.stderr if stream is None else stream
    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Redacted before a record leaves structlog (other root handlers see no secret) and
    # again in the formatter, for records from stdlib loggers.
    redaction: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_event,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *redaction,
            _renderer(fmt, out),
        ],
    )
    handler = _AgentHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    _remove_agent_handlers(root)
    root.addHandler(handler)
    root.setLevel(level_no)
    structlog.configure(
        processors=[
            *pre_chain,
            *redaction,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        cache_logger_on_first_use=False,
    )


def _remove_agent_handlers(root: logging.Logger) -> None:
    for old in [h for h in root.handlers if isinstance(h, _AgentHandler)]:
        root.removeHandler(old)


def reset() -> None:
    """Undo `configure`: remove its handler, restore the root level and structlog's defaults."""
    root = logging.getLogger()
    _remove_agent_handlers(root)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """Return a structlog logger, optionally with initial bound values."""
    return structlog.get_logger(name, **initial)


def bind(**values: Any) -> None:
    """Bind context (``task_id=…``, ``agent_id=…``) to every later log line of this context."""
    bind_contextvars(**values)


def unbind(*keys: str) -> None:
    """Remove context bound with `bind`."""
    unbind_contextvars(*keys)
