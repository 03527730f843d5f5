"""Frames ⇄ messages: JSON text, one message per frame, size-capped.

``decode_gateway``/``decode_agent`` never raise anything but :class:`DecodeError`, which
carries the ``error`` code to answer with and, when the frame was JSON with a usable
``id``, the ``re`` to answer to. Unknown fields are ignored; an unknown ``type`` is
``unknown_type``; anything else malformed is ``invalid_message``.
"""

from __future__ import annotations

import json
from typing import Any, Final, TypeVar

from pydantic import TypeAdapter, ValidationError

from agent.protocol.messages import (
    DEFAULT_MAX_FRAME_BYTES,
    AgentMessage,
    Envelope,
    ErrorCode,
    GatewayMessage,
)

_GATEWAY: Final = TypeAdapter[GatewayMessage](GatewayMessage)
_AGENT: Final = TypeAdapter[AgentMessage](AgentMessage)
_MAX_ERROR_TEXT: Final = 512

M = TypeVar("M")


class DecodeError(Exception):
    """A frame that is not a valid message for this direction."""

    def __init__(
        self, code: ErrorCode, message: str, re: str | None = None, *, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.re = re
        self.kind = kind
        """The frame's ``type`` when it was a JSON object with a string ``type`` (else None)."""


def encode(message: Envelope) -> str:
    """Serialise ``message`` to the JSON text of one frame (``None`` fields omitted)."""
    return message.model_dump_json(exclude_none=True)


def decode_gateway(frame: str | bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> GatewayMessage:
    """Parse a frame sent by a gateway (what the agent receives)."""
    return _decode(_GATEWAY, frame, max_bytes)


def decode_agent(frame: str | bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> AgentMessage:
    """Parse a frame sent by an agent (what the gateway receives)."""
    return _decode(_AGENT, frame, max_bytes)


def _decode(adapter: TypeAdapter[M], frame: str | bytes, max_bytes: int) -> M:
    size = len(frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame)
    if size > max_bytes:
        raise DecodeError(ErrorCode.TOO_LARGE, f"frame of {size} bytes exceeds {max_bytes}")
    try:
        raw = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(ErrorCode.INVALID_MESSAGE, f"not JSON: {_short(exc)}") from None
    if not isinstance(raw, dict):
        raise DecodeError(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object")
    re = _usable_id(raw.get("id"))
    kind = raw.get("type") if isinstance(raw.get("type"), str) else None
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        error = _translate(exc, raw, re)
        error.kind = kind
        raise error from None
    except RecursionError:
        raise DecodeError(
            ErrorCode.INVALID_MESSAGE, "message nested too deeply", re, kind=kind
        ) from None


def _translate(exc: ValidationError, raw: dict[str, Any], re: str | None) -> DecodeError:
    first = exc.errors(include_url=False, include_input=False)[0]
    if first["type"] in {"union_tag_invalid", "union_tag_not_found"}:
        kind = raw.get("type")
        if not isinstance(kind, str):
            return DecodeError(ErrorCode.INVALID_MESSAGE, "missing or non-string 'type'", re)
        return DecodeError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {_short(kind)!r}", re)
    # loc[0] is the union tag; the rest is the path inside the message.
    where = ".".join(str(part) for part in first["loc"][1:]) or "message"
    return DecodeError(ErrorCode.INVALID_MESSAGE, f"{where}: {first['msg']}", re)


def _usable_id(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= 64:
        return value
    return None


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT] + "…"
