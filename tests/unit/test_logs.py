"""Logging: JSON vs console rendering, stdlib routing, context, and secret redaction."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
import structlog
from hypothesis import assume, given
from hypothesis import strategies as st

from agent import logs
from agent.logs import redact

if TYPE_CHECKING:
    from collections.abc import Iterator

DK = "dk-Zq8vR2mXk4T9pLw7Ny3B_Hc6"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/tasks/t1/out.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
)
SIGNATURE = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
CREDENTIAL_SCOPE = "AKIAEXAMPLE%2F20260101"


class _Terminal(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Yield a log stream; undo the logging configuration and bound context afterwards."""
    out = io.StringIO()
    yield out
    logs.reset()
    structlog.contextvars.clear_contextvars()


def _fail_upload() -> None:
    raise RuntimeError(f"PUT {PRESIGNED} failed for {DK}")


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


# ---------------------------------------------------------------- rendering


def test_json_lines_when_the_stream_is_not_a_tty(stream: io.StringIO) -> None:
    """Format auto on a non-TTY writes one JSON object per line with an ISO UTC timestamp."""
    logs.configure("info", "auto", stream)
    logs.get_logger("agent.test").info("task_started", task_id="t-1", attempt=2)
    (line,) = _lines(stream)
    assert line["event"] == "task_started"
    assert (line["task_id"], line["attempt"], line["level"]) == ("t-1", 2, "info")
    assert line["logger"] == "agent.test"
    assert line["timestamp"].endswith("Z")
    assert datetime.fromisoformat(line["timestamp"]).utcoffset() is not None


def test_console_rendering_on_a_tty() -> None:
    """Format auto on a TTY renders a readable line, not JSON."""
    out = _Terminal()
    try:
        logs.configure("info", "auto", out)
        logs.get_logger("agent.test").warning("gpu_hot", temperature=91)
    finally:
        logs.reset()
    text = out.getvalue()
    assert "gpu_hot" in text
    assert "temperature" in text
    assert not text.lstrip().startswith("{")


def test_explicit_format_overrides_tty_detection() -> None:
    """Format json on a TTY still writes JSON."""
    out = _Terminal()
    try:
        logs.configure("info", "json", out)
        logs.get_logger().info("hello")
    finally:
        logs.reset()
    assert json.loads(out.getvalue())["event"] == "hello"


def test_level_filters_structlog_and_stdlib(stream: io.StringIO) -> None:
    """At warning, info events are dropped from structlog and stdlib loggers alike."""
    logs.configure("WARNING", "json", stream)
    logs.get_logger().info("dropped")
    logging.getLogger("websockets.client").info("dropped too")
    logs.get_logger().warning("kept")
    logging.getLogger("httpx").error("kept too")
    assert [line["event"] for line in _lines(stream)] == ["kept", "kept too"]


def test_configure_is_idempotent(stream: io.StringIO) -> None:
    """A second configure replaces the first: one line per event, on the newest stream."""
    first = io.StringIO()
    logs.configure("info", "json", first)
    logs.configure("info", "json", stream)
    logs.get_logger().info("once")
    logging.getLogger("httpx").info("once too")
    assert first.getvalue() == ""
    assert [line["event"] for line in _lines(stream)] == ["once", "once too"]


def test_bound_context_appears_on_every_line(stream: io.StringIO) -> None:
    """Values bound with logs.bind reach structlog and stdlib lines until unbound."""
    logs.configure("info", "json", stream)
    logs.bind(task_id="t-9", agent_id="gpu-01")
    logs.get_logger().info("inside")
    logging.getLogger("httpx").info("stdlib inside")
    logs.unbind("task_id")
    logs.get_logger().info("after")
    inside, stdlib_inside, after = _lines(stream)
    assert inside["task_id"] == stdlib_inside["task_id"] == "t-9"
    assert "task_id" not in after
    assert after["agent_id"] == "gpu-01"


# ---------------------------------------------------------------- redaction in logs


def test_secrets_never_reach_the_log(stream: io.StringIO) -> None:
    """Credentials and presigned signatures are redacted in events, nested values and kwargs."""
    logs.configure("debug", "json", stream)
    log = logs.get_logger("agent.transfer")
    log.info(
        "uploading with %s",
        DK,
        url=PRESIGNED,
        headers={"Authorization": f"Bearer {DK}", "Content-Type": "image/png"},
        attempts=[{"url": PRESIGNED}, "Authorization: Bearer abcdefghijkl"],
        credential=DK,
    )
    text = stream.getvalue()
    assert DK not in text
    assert SIGNATURE not in text
    assert CREDENTIAL_SCOPE not in text
    assert "abcdefghijkl" not in text
    (line,) = _lines(stream)
    assert line["event"] == "uploading with dk-***"
    assert line["headers"] == {"Authorization": "***", "Content-Type": "image/png"}
    assert "X-Amz-Signature=***" in line["url"]
    assert "X-Amz-Expires=3600" in line["url"]
    assert line["credential"] == "***"


def test_exception_text_is_redacted(stream: io.StringIO) -> None:
    """A traceback whose message carries a token or a signature is logged redacted."""
    logs.configure("info", "json", stream)
    try:
        _fail_upload()
    except RuntimeError:
        logs.get_logger().exception("upload_failed")
    (line,) = _lines(stream)
    assert "RuntimeError" in line["exception"]
    assert DK not in stream.getvalue()
    assert SIGNATURE not in stream.getvalue()


def test_exception_objects_as_values_are_redacted(stream: io.StringIO) -> None:
    """An exception passed as a value is rendered as text and redacted."""
    logs.configure("info", "json", stream)
    logs.get_logger().warning("retrying", error=ConnectionError(f"refused for {DK}"))
    (line,) = _lines(stream)
    assert line["error"] == "ConnectionError: refused for dk-***"


def test_stdlib_loggers_are_routed_and_redacted(stream: io.StringIO) -> None:
    """Stdlib records (httpx, websockets) pass through the same pipeline and redaction."""
    logs.configure("info", "json", stream)
    logging.getLogger("httpx").info('HTTP Request: PUT %s "HTTP/1.1 200 OK"', PRESIGNED)
    (line,) = _lines(stream)
    assert line["logger"] == "httpx"
    assert line["level"] == "info"
    assert SIGNATURE not in line["event"]
    assert line["event"].startswith("HTTP Request: PUT https://bucket.s3.amazonaws.com/")


def test_other_handlers_never_see_secrets_from_structlog(stream: io.StringIO) -> None:
    """A foreign root handler receives structlog events already redacted."""
    seen = io.StringIO()
    foreign = logging.StreamHandler(seen)
    logging.getLogger().addHandler(foreign)
    try:
        logs.configure("info", "json", stream)
        logs.get_logger().info("uploading", credential=DK, url=PRESIGNED, note=f"key {DK}")
    finally:
        logging.getLogger().removeHandler(foreign)
    assert "uploading" in seen.getvalue()
    assert DK not in seen.getvalue()
    assert SIGNATURE not in seen.getvalue()


def test_console_output_is_redacted_too() -> None:
    """The console renderer receives already-redacted values."""
    out = _Terminal()
    try:
        logs.configure("info", "console", out)
        logs.get_logger().info("connect", token=DK, url=PRESIGNED)
    finally:
        logs.reset()
    assert DK not in out.getvalue()
    assert SIGNATURE not in out.getvalue()


# ---------------------------------------------------------------- redact()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key {DK} end", "key dk-*** end"),
        ("ak-0123456789abcdef", "ak-***"),
        ("sk-live_0123456789", "sk-***"),
        ("Authorization: Bearer abc.def.ghi", "Authorization: Bearer ***"),
        ("'Authorization': 'Basic dXNlcjpwYXNz'", "'Authorization': 'Basic ***'"),
        ("authorization=opaque-value", "authorization=***"),
        ("sent bearer eyJhbGciOiJIUzI1NiJ9x", "sent bearer ***"),
        ("https://x/y?a=1&Signature=abc&b=2", "https://x/y?a=1&Signature=***&b=2"),
        ("https://x/y?sig=abc%2Fdef&sv=2024", "https://x/y?sig=***&sv=2024"),
        ("https://x/y?signature=abc", "https://x/y?signature=***"),
        ("https://x/y?X-Amz-Security-Token=FwoG+/=", "https://x/y?X-Amz-Security-Token=***"),
        ("wss://gw/agent/v1/ws?token=abc", "wss://gw/agent/v1/ws?token=***"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.SflKxwRJSMeKKF2QT4fw", "jwt eyJ***"),
    ],
)
def test_redact_examples(text: str, expected: str) -> None:
    """Each kind of secret is replaced by *** and the text around it is kept."""
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "task-0123456789abcdef finished",
        "a bearer token is required",
        "https://gw.example.com/agent/v1/ws",
        "X-Amz-Expires=3600&X-Amz-Date=20260101T000000Z",
        "desk-chair-1234567890",
        "dk-short",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    """Task ids, prose, plain URLs and short dk- words are not mangled."""
    assert redact(text) == text


_BODY = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
    min_size=8,
    max_size=300,
)
_SEPARATOR = st.sampled_from([" ", "\n", "=", ":", "/", '"', "'", "(", ",", "[", "\t", ""])


@given(
    prefix=st.text(max_size=60),
    kind=st.sampled_from(["dk", "ak", "sk"]),
    body=_BODY,
    separators=st.tuples(_SEPARATOR, _SEPARATOR),
    suffix=st.text(max_size=60),
)
def test_embedded_credentials_never_survive(
    prefix: str, kind: str, body: str, separators: tuple[str, str], suffix: str
) -> None:
    """Any text with an embedded dk-/ak-/sk- key, after a non-alphanumeric, loses the key."""
    before, after = separators
    if not before:  # glued to the prefix: only a non-alphanumeric end keeps it a token
        assume(not prefix or not prefix[-1].isalnum())
    token = f"{kind}-{body}"
    assume(token not in prefix and token not in suffix)
    redacted = redact(f"{prefix}{before}{token}{after}{suffix}")
    assert token not in redacted


@given(
    name=st.sampled_from(
        ["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature", "sig", "token"]
    ),
    value=st.text(
        alphabet=st.characters(min_codepoint=0x21, exclude_characters="&#\"'<>\x7f"),
        min_size=6,
        max_size=200,
    ),
    host=st.sampled_from(["https://s3.example.com/b/k", "http://127.0.0.1:9000/x/y"]),
)
def test_presigned_signatures_never_survive(name: str, value: str, host: str) -> None:
    """A presigned URL's signature, credential or token query value never survives."""
    url = f"{host}?X-Amz-Date=20260101T000000Z&{name}={value}&X-Amz-Expires=60"
    redacted = redact(url)
    assert f"{name}={value}" not in redacted
    assert f"{name}=***&X-Amz-Expires=60" in redacted


@given(st.text(max_size=300))
def test_redact_is_idempotent(text: str) -> None:
    """Redacting twice changes nothing more than redacting once."""
    once = redact(text)
    assert redact(once) == once
