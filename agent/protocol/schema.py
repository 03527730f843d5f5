"""JSON Schema of every protocol v1 message, generated from the pydantic models.

``cyberun-agent protocol schema`` prints :func:`render_schema`; the checked-in
``docs/protocol.schema.json`` must equal it (a test fails otherwise).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from agent.protocol.messages import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    WS_PATH,
    AgentMessage,
    GatewayMessage,
)


def protocol_schema() -> dict[str, Any]:
    """Return one JSON Schema document covering both directions of protocol v1."""
    agent = TypeAdapter[AgentMessage](AgentMessage).json_schema(ref_template="#/$defs/{model}")
    gateway = TypeAdapter[GatewayMessage](GatewayMessage).json_schema(
        ref_template="#/$defs/{model}"
    )
    defs: dict[str, Any] = {**agent.pop("$defs", {}), **gateway.pop("$defs", {})}
    defs["AgentMessage"] = agent
    defs["GatewayMessage"] = gateway
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:cyberun:agent-protocol:v{PROTOCOL_VERSION}",
        "title": f"Cyberun agent protocol v{PROTOCOL_VERSION}",
        "description": (
            f"Frames exchanged on {WS_PATH} (subprotocol {SUBPROTOCOL}); "
            "see docs/protocol.md for the rules."
        ),
        "x-protocol-version": PROTOCOL_VERSION,
        "oneOf": [
            {"$ref": "#/$defs/AgentMessage"},
            {"$ref": "#/$defs/GatewayMessage"},
        ],
        "$defs": dict(sorted(defs.items())),
    }


def render_schema() -> str:
    """The schema as stable, pretty-printed JSON text ending in a newline."""
    return json.dumps(protocol_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
