"""The REAL ComfyUI server (CPU, stock 0.3.75) speaks the protocol the agent's driver relies on.

No agent code here: plain httpx and websockets against the server that ``tests.comfyui``
starts, so these tests pin down ComfyUI's own behaviour (shared/design/real-components.md):
the WebSocket events of a prompt and their order, history, ``/view``, progress, interrupts,
run-time errors and validation errors. The test-only nodes are in ``tests/comfyui_nodes``.

Each test opens its WebSocket before posting (progress goes only to the posting client) and
reads events until ComfyUI's last message for the prompt, ``executing {node: null}``, under a
deadline (a hang guard, never a sleep).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from tests.comfyui import COMFYUI_TEST_TIMEOUT_S, ComfyUIServer

pytestmark = [pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S), pytest.mark.slow]

EVENT_DEADLINE_S = 30.0  # a whole prompt of these tiny nodes takes well under a second
HTTP_TIMEOUT_S = 10.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Event = dict[str, Any]


# ------------------------------------------------------------------------------ helpers


def empty_image(width: int = 8, height: int = 8) -> dict[str, Any]:
    """An EmptyImage node of a random colour (so ComfyUI's cache never answers for it)."""
    color = secrets.randbelow(0xFFFFFF + 1)
    inputs = {"width": width, "height": height, "batch_size": 1, "color": color}
    return {"class_type": "EmptyImage", "inputs": inputs}


def invert_workflow(prefix: str, width: int = 8, height: int = 6) -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage, as API-format JSON."""
    return {
        "1": empty_image(width, height),
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def slow_workflow(steps: int, step_s: float, text: str) -> dict[str, Any]:
    """EmptyImage → CyberunSlowPassthrough → CyberunEmitText."""
    return {
        "1": empty_image(),
        "2": {
            "class_type": "CyberunSlowPassthrough",
            "inputs": {"image": ["1", 0], "steps": steps, "step_s": step_s},
        },
        "3": {"class_type": "CyberunEmitText", "inputs": {"image": ["2", 0], "text": text}},
    }


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


class Session:
    """One ComfyUI client: an HTTP client and the WebSocket of the same ``client_id``."""

    def __init__(
        self,
        server: ComfyUIServer,
        client_id: str,
        http: httpx.AsyncClient,
        ws: ClientConnection,
    ) -> None:
        """Wrap an HTTP client and the WebSocket opened for ``client_id``."""
        self.server = server
        self.client_id = client_id
        self.http = http
        self.ws = ws
        self.seen: list[Event] = []  # every JSON event received, in order

    async def post_prompt(self, prompt: dict[str, Any]) -> httpx.Response:
        """POST /prompt for this client."""
        return await self.http.post("/prompt", json={"prompt": prompt, "client_id": self.client_id})

    async def submit(self, prompt: dict[str, Any]) -> str:
        """POST /prompt, assert it was accepted, and return the prompt id."""
        response = await self.post_prompt(prompt)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["node_errors"] == {}
        assert isinstance(body["number"], int)
        return str(body["prompt_id"])

    async def wait_for(self, predicate: Callable[[Event], bool]) -> Event:
        """Return the next JSON event that satisfies ``predicate`` (binary frames skipped)."""
        async with asyncio.timeout(EVENT_DEADLINE_S):
            while True:
                raw = await self.ws.recv()
                if isinstance(raw, bytes):
                    continue  # preview images; none of these workflows sends any
                event: Event = json.loads(raw)
                self.seen.append(event)
                if predicate(event):
                    return event

    async def until_done(self, prompt_id: str) -> list[Event]:
        """Read events up to ``executing {node: null}`` for ``prompt_id``; return its events."""
        await self.wait_for(lambda e: is_event(e, "executing", prompt_id, node=None))
        return [e for e in self.seen if e["data"].get("prompt_id") == prompt_id]

    async def history(self, prompt_id: str) -> dict[str, Any]:
        """GET /history/<id> and return that prompt's entry."""
        response = await self.http.get(f"/history/{prompt_id}")
        assert response.status_code == 200
        entry: dict[str, Any] = response.json()[prompt_id]
        return entry


def is_event(event: Event, kind: str, prompt_id: str, **fields: Any) -> bool:
    """Whether ``event`` is a ``kind`` message of ``prompt_id`` with these data fields."""
    data = event.get("data", {})
    return (
        event.get("type") == kind
        and data.get("prompt_id") == prompt_id
        and all(data.get(key, ...) == value for key, value in fields.items())
    )


def kinds(events: list[Event]) -> list[str]:
    """The message types of ``events``, in order."""
    return [str(e["type"]) for e in events]


@pytest_asyncio.fixture
async def session(comfyui: ComfyUIServer) -> AsyncIterator[Session]:
    """A fresh client of the shared server, its WebSocket open before anything is posted."""
    client_id = uuid.uuid4().hex
    async with (
        httpx.AsyncClient(base_url=comfyui.url, timeout=HTTP_TIMEOUT_S) as http,
        connect(comfyui.ws_url(client_id), proxy=None, open_timeout=HTTP_TIMEOUT_S) as ws,
    ):
        yield Session(comfyui, client_id, http, ws)


# ------------------------------------------------------------------------------ tests


@pytest.mark.asyncio
async def test_server_is_stock_comfyui_on_cpu(session: Session) -> None:
    """/system_stats reports ComfyUI 0.3.75 running on the cpu device."""
    stats = (await session.http.get("/system_stats")).json()
    assert stats["system"]["comfyui_version"] == "0.3.75"
    assert [device["type"] for device in stats["devices"]] == ["cpu"]


@pytest.mark.asyncio
async def test_prompt_runs_to_success_with_events_history_and_view(session: Session) -> None:
    """A prompt streams executing, executed, execution_success, executing null; /view serves it."""
    prefix = f"invert-{uuid.uuid4().hex[:8]}"
    prompt_id = await session.submit(invert_workflow(prefix, width=8, height=6))

    events = await session.until_done(prompt_id)

    order = kinds(events)
    assert order[0] == "execution_start"
    assert order[-2:] == ["execution_success", "executing"]
    ran = [e["data"]["node"] for e in events if e["type"] == "executing"]
    assert ran == ["1", "2", "3", None]
    (executed,) = [e for e in events if e["type"] == "executed"]
    assert executed["data"]["node"] == "3"
    (image,) = executed["data"]["output"]["images"]
    assert image["type"] == "output"
    assert image["filename"].startswith(prefix)

    entry = await session.history(prompt_id)  # written before `executing null` was sent
    assert entry["status"]["status_str"] == "success"
    assert entry["status"]["completed"] is True
    assert entry["outputs"]["3"]["images"] == [image]

    view = await session.http.get("/view", params=image)
    assert view.status_code == 200
    assert view.headers["content-type"] == "image/png"
    assert png_size(view.content) == (8, 6)
    saved = session.server.output_directory / image["subfolder"] / image["filename"]
    assert saved.read_bytes() == view.content


@pytest.mark.asyncio
async def test_slow_node_sends_progress_per_step(session: Session) -> None:
    """Each ProgressBar.update of the slow node reaches the posting client as `progress`."""
    text = f"done-{uuid.uuid4().hex[:8]}"
    prompt_id = await session.submit(slow_workflow(steps=3, step_s=0.02, text=text))

    events = await session.until_done(prompt_id)

    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert [(p["node"], p["value"], p["max"]) for p in progress] == [
        ("2", 1, 3),
        ("2", 2, 3),
        ("2", 3, 3),
    ]
    executed = {e["data"]["node"]: e["data"]["output"] for e in events if e["type"] == "executed"}
    assert executed == {"3": {"text": [text]}}
    assert "execution_success" in kinds(events)


@pytest.mark.asyncio
async def test_interrupt_during_slow_node_ends_prompt_as_interrupted(session: Session) -> None:
    """POST /interrupt {prompt_id} mid-node stops it at the next step: execution_interrupted."""
    steps = 1000  # 50 s if the interrupt did not land
    prompt_id = await session.submit(slow_workflow(steps=steps, step_s=0.05, text="never"))
    await session.wait_for(lambda e: is_event(e, "progress", prompt_id, node="2"))

    response = await session.http.post("/interrupt", json={"prompt_id": prompt_id})
    assert response.status_code == 200

    events = await session.until_done(prompt_id)
    (interrupted,) = [e["data"] for e in events if e["type"] == "execution_interrupted"]
    assert interrupted["node_id"] == "2"
    assert interrupted["node_type"] == "CyberunSlowPassthrough"
    assert interrupted["executed"] == ["1"]
    assert "execution_success" not in kinds(events)
    assert not any(e["type"] == "executed" for e in events)
    assert max(e["data"]["value"] for e in events if e["type"] == "progress") < steps
    entry = await session.history(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert entry["outputs"] == {}


@pytest.mark.asyncio
async def test_failing_node_reports_execution_error(session: Session) -> None:
    """A node that raises yields execution_error with its node id, type and message."""
    message = f"boom {uuid.uuid4().hex[:8]}"
    prompt = {
        "1": empty_image(),
        "7": {"class_type": "CyberunFail", "inputs": {"image": ["1", 0], "message": message}},
    }
    prompt_id = await session.submit(prompt)

    events = await session.until_done(prompt_id)
    (error,) = [e["data"] for e in events if e["type"] == "execution_error"]
    assert error["node_id"] == "7"
    assert error["node_type"] == "CyberunFail"
    assert error["exception_type"] == "RuntimeError"
    assert error["exception_message"] == f"{message}\n"  # formatted by traceback: one newline
    assert "raise RuntimeError(message)" in error["traceback"][-1]  # frames, innermost last
    assert error["current_inputs"]["message"] == [message]
    assert error["executed"] == ["1"]
    assert "execution_success" not in kinds(events)
    entry = await session.history(prompt_id)
    assert entry["status"]["status_str"] == "error"


@pytest.mark.asyncio
async def test_unknown_class_type_is_rejected_with_400(session: Session) -> None:
    """An unknown class_type gets 400 invalid_prompt naming the node (node_errors stays empty)."""
    response = await session.post_prompt({"5": {"class_type": "NoSuchNode", "inputs": {}}})

    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in body["error"]["message"]
    assert body["error"]["details"] == "Node ID '#5'"
    assert body["node_errors"] == {}


@pytest.mark.asyncio
async def test_invalid_input_is_rejected_with_400_and_node_errors(session: Session) -> None:
    """A bad input value gets 400 prompt_outputs_failed_validation with per-node errors."""
    prompt = invert_workflow("never")
    prompt["1"]["inputs"]["width"] = 0  # EmptyImage's minimum is 1

    response = await session.post_prompt(prompt)

    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    node = body["node_errors"]["1"]
    assert node["class_type"] == "EmptyImage"
    assert node["dependent_outputs"] == ["3"]
    (reason,) = node["errors"]
    assert reason["type"] == "value_smaller_than_min"
    assert reason["extra_info"]["input_name"] == "width"


@pytest.mark.asyncio
async def test_partly_invalid_prompt_runs_its_valid_outputs_with_200(session: Session) -> None:
    """With one valid output left, /prompt answers 200, lists node_errors and runs the rest."""
    prefix = f"partial-{uuid.uuid4().hex[:8]}"
    prompt = invert_workflow(prefix)
    prompt["4"] = {"class_type": "CyberunEmitText", "inputs": {}}  # required `text` missing

    response = await session.post_prompt(prompt)

    assert response.status_code == 200
    body = response.json()
    assert body["node_errors"]["4"]["errors"][0]["type"] == "required_input_missing"
    events = await session.until_done(str(body["prompt_id"]))
    assert [e["data"]["node"] for e in events if e["type"] == "executed"] == ["3"]
    assert "execution_success" in kinds(events)
