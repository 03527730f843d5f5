"""The wire format: encoding, decoding, forward compatibility and the schema file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.codec import DecodeError, decode_agent, decode_gateway, encode
from agent.protocol.messages import (
    AGENT_MESSAGE_TYPES,
    GATEWAY_MESSAGE_TYPES,
    AgentStatus,
    ErrorCode,
    Hello,
    Pool,
    Status,
)
from agent.protocol.schema import protocol_schema, render_schema
from tests import factories as f

ROOT = Path(__file__).resolve().parents[2]


def test_gateway_messages_round_trip() -> None:
    """Every gateway message survives encode → decode unchanged."""
    for message in (f.welcome(), f.assign(), f.cancel(), f.ack(f.ref()), f.drain()):
        assert decode_gateway(encode(message)) == message


def test_agent_messages_round_trip() -> None:
    """An agent message survives encode → decode unchanged."""
    status = Status(
        id="s1",
        ts=f.T0,
        agent_status=AgentStatus.BUSY,
        free_slots={Pool.TEAM: 1},
        running=[f.ref()],
    )
    assert decode_agent(encode(status)) == status


def test_encode_omits_null_fields() -> None:
    """Optional fields left unset are not written to the wire."""
    frame = json.loads(encode(f.cancel(attempt=None)))
    assert "attempt" not in frame
    assert "re" not in frame


def test_unknown_fields_are_ignored() -> None:
    """A newer peer's extra fields do not break decoding (forward compatibility)."""
    frame = json.loads(encode(f.drain("x")))
    frame["future_field"] = {"nested": [1, 2]}
    assert decode_gateway(json.dumps(frame)).type == "drain"


def test_unknown_type_is_a_decode_error_naming_it() -> None:
    """An unknown message type is reported as unknown_type with the frame's id."""
    with pytest.raises(DecodeError) as info:
        decode_gateway('{"type": "task.teleport", "id": "m1"}')
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    assert info.value.re == "m1"
    assert "task.teleport" in info.value.message


def test_agent_message_is_not_accepted_from_a_gateway() -> None:
    """Direction matters: a hello is not something a gateway may send."""
    hello = Hello(id="h", ts=f.T0, agent_id="a1", agent_version="1")
    with pytest.raises(DecodeError) as info:
        decode_gateway(encode(hello))
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


def test_invalid_field_error_names_the_field() -> None:
    """A field of the wrong type is reported with its dotted path."""
    frame = json.loads(encode(f.assign()))
    frame["timeout_s"] = "soon"
    with pytest.raises(DecodeError) as info:
        decode_gateway(json.dumps(frame))
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.message.startswith("timeout_s:")


def test_deeply_nested_json_is_refused_cleanly() -> None:
    """Pathological nesting yields a DecodeError, not a RecursionError."""
    frame = '{"type":"drain","id":"d","ts":"2026-01-01T00:00:00Z","reason":' + "[" * 100_000
    frame += "]" * 100_000 + "}"
    with pytest.raises(DecodeError):
        decode_gateway(frame, max_bytes=10**7)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_arbitrary_frames_only_ever_raise_decode_error(frame: str | bytes) -> None:
    """Whatever arrives, decoding either succeeds or raises DecodeError."""
    for decode in (decode_gateway, decode_agent):
        with contextlib.suppress(DecodeError):
            decode(frame)


def test_every_message_type_is_in_the_schema() -> None:
    """The exported schema defines every message model of both directions."""
    defs = protocol_schema()["$defs"]
    for model in (*AGENT_MESSAGE_TYPES, *GATEWAY_MESSAGE_TYPES):
        assert model.__name__ in defs


def test_checked_in_schema_matches_the_models() -> None:
    """docs/protocol.schema.json equals what the models export (regenerate it if not)."""
    checked_in = (ROOT / "docs" / "protocol.schema.json").read_text(encoding="utf-8")
    assert checked_in == render_schema(), (
        "docs/protocol.schema.json is stale: run `cyberun-agent protocol schema "
        "--output docs/protocol.schema.json`"
    )


def test_protocol_doc_describes_every_message_type() -> None:
    """docs/protocol.md has a section for every message type of the models."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    for model in (*AGENT_MESSAGE_TYPES, *GATEWAY_MESSAGE_TYPES):
        kind = model.model_fields["type"].default
        assert f"### `{kind}`" in text, f"docs/protocol.md lacks a section for {kind}"
