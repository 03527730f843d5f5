"""The ComfyUI runtime end to end: gateway + agent process + a REAL ComfyUI server (CPU).

Workflows are submitted through the gateway's public REST API exactly as a platform user
would; the agent drives the real ComfyUI started by the ``comfyui`` fixture.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_process import AgentProcess, start_agent
from tests.comfyui import ComfyUIServer, _install_test_nodes
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway

pytestmark = pytest.mark.timeout(180)

INVERT: dict[str, Any] = {
    "3": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0},
    },
    "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "cyberun"}},
}
WIDTH = {"key": "width", "type": "number", "min": 8, "max": 4096, "node_id": "3", "field": "width"}


def slow(steps: int, step_s: float, prefix: str = "slow") -> dict[str, Any]:
    """EmptyImage → slow pass-through (progress per step, interruptible) → SaveImage."""
    return {
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "4": {
            "class_type": "CyberunSlowPassthrough",
            "inputs": {"image": ["3", 0], "steps": steps, "step_s": step_s},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A fresh gateway."""
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as proc:
        yield proc


@pytest.fixture
def agent(
    tmp_path: Path, gw: GatewayProcess, comfyui: ComfyUIServer
) -> Iterator[tuple[AgentProcess, str]]:
    """An agent attached to the real ComfyUI, and its team's credential."""
    dk = gw.credential("comfy")
    env = {"CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": comfyui.url, "CYBERUN_AGENT_RUNTIMES__EXTRA": ""}
    process = start_agent(tmp_path / "agent", gw.url, dk, "comfy-agent", extra_env=env)
    try:
        process.wait_log("connected to the gateway", timeout=60)
        yield process, dk
    finally:
        process.stop()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def run(gw: GatewayProcess, dk: str, body: dict[str, Any], **request: Any) -> str:
    """Create a workflow and run it; return the task id."""
    workflow = gw.create_workflow(dk, body)
    with gw.client(dk) as http:
        answer = http.post(f"/r/workflows/{workflow}/run", json=request)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["task_id"])


def wait_progress(gw: GatewayProcess, dk: str, task_id: str) -> None:
    """Follow the task's SSE stream until its first progress event."""
    with (
        httpx.Client(
            base_url=gw.api, headers={"Authorization": f"Bearer {dk}"}, timeout=60
        ) as http,
        http.stream("GET", f"/r/tasks/{task_id}/events") as stream,
    ):
        for line in stream.iter_lines():
            if line == "event: progress":
                return
    raise AssertionError(f"{task_id} ended without progress")


def finished(gw: GatewayProcess, dk: str, agent: AgentProcess, task_id: str) -> dict[str, Any]:
    """Wait for the agent's report to be acknowledged; return the task's result."""
    agent.wait_log("report acknowledged", task_id=task_id, timeout=120)
    with gw.client(dk) as http:
        result: dict[str, Any] = http.get(f"/r/tasks/{task_id}/result").json()
    return result


def test_invert_workflow_uploads_a_png_under_its_node_key(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """EmptyImage → ImageInvert → SaveImage completes; the PNG is uploaded as 9.images.0."""
    process, dk = agent
    task_id = run(gw, dk, {"name": "invert", "workflow_json": INVERT})
    result = finished(gw, dk, process, task_id)
    assert result["task_status"] == "completed", result
    assert list(result["download_urls"]) == ["9.images.0"]
    image = httpx.get(result["download_urls"]["9.images.0"]).content
    assert png_size(image) == (64, 48)


def test_a_parameter_override_changes_the_output(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """The width parameter is injected into node 3 and changes the image."""
    process, dk = agent
    task_id = run(
        gw,
        dk,
        {"name": "w", "workflow_json": INVERT, "parameters": [WIDTH]},
        parameters={"width": 96},
    )
    result = finished(gw, dk, process, task_id)
    assert result["task_status"] == "completed", result
    assert png_size(httpx.get(result["download_urls"]["9.images.0"]).content) == (96, 48)


def test_load_image_of_an_uploaded_input(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """A file parameter is downloaded, uploaded to ComfyUI and read by LoadImage."""
    process, dk = agent
    source = _png(40, 30)
    with gw.client(dk) as http:
        slot = http.post(
            "/r/files/presign",
            json={"file_name": "in.png", "file_size": len(source), "content_type": "image/png"},
        ).json()
    assert (
        httpx.put(slot["upload_url"], content=source, headers=slot["upload_headers"]).status_code
        < 300
    )
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["5", 0], "filename_prefix": "loaded"},
        },
    }
    param = {"key": "image", "type": "file", "accept": "image/*", "node_id": "1", "field": "image"}
    task_id = run(
        gw,
        dk,
        {"name": "load", "workflow_json": graph, "parameters": [param]},
        parameters={"image": slot["file_key"]},
    )
    result = finished(gw, dk, process, task_id)
    assert result["task_status"] == "completed", result
    assert png_size(httpx.get(result["download_urls"]["9.images.0"]).content) == (40, 30)


def test_a_slow_node_streams_progress(gw: GatewayProcess, agent: tuple[AgentProcess, str]) -> None:
    """The slow node's ProgressBar updates reach the gateway as progress events."""
    process, dk = agent
    task_id = run(gw, dk, {"name": "slow", "workflow_json": slow(8, 0.25)})
    finished(gw, dk, process, task_id)
    with gw.client(dk) as http:
        events = http.get(f"/r/tasks/{task_id}/events").text
    assert events.count("event: progress") >= 2
    assert '"current_node": "4"' in events
    assert '"step_total": 8' in events


def test_step_less_nodes_still_report_node_level_progress(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """Built-in nodes without steps give progress per node, rising, with the node running."""
    process, dk = agent
    empty = {"width": 32, "height": 32, "batch_size": 1, "color": 0}
    blur = {"image": ["2", 0], "blur_radius": 2, "sigma": 1.0}
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageBlur", "inputs": blur},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "np"}},
    }
    task_id = run(gw, dk, {"name": "nodes", "workflow_json": graph})
    finished(gw, dk, process, task_id)
    with gw.client(dk) as http:
        events = http.get(f"/r/tasks/{task_id}/events").text
    progress = [
        json.loads(line.removeprefix("data: "))
        for block in events.split("\n\n")
        if "event: progress" in block
        for line in block.splitlines()
        if line.startswith("data: ")
    ]
    assert progress, events
    values = [p["progress"] for p in progress]
    assert values == sorted(values)
    assert all(0 <= v < 1 for v in values)
    assert {p["current_node"] for p in progress} <= {"1", "2", "3", "4"}
    assert "step_total" not in progress[0] or progress[0]["step_total"] is None


def test_cancel_mid_run_lands_within_two_seconds(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """Cancelling a running prompt interrupts ComfyUI and is reported in under 2 s."""
    process, dk = agent
    task_id = run(gw, dk, {"name": "long", "workflow_json": slow(200, 0.1)})
    wait_progress(gw, dk, task_id)  # the prompt is inside the slow node
    started = time.monotonic()
    with gw.client(dk) as http:
        http.post(f"/r/tasks/{task_id}/cancel")
    reported = process.wait_log("task reported", task_id=task_id, timeout=10)
    assert reported["outcome"] == "task.cancelled"
    assert time.monotonic() - started < 2.0


def test_a_failing_node_reports_its_id_and_message(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """An execution_error fails the task with the node id and the exception message."""
    process, dk = agent
    graph = {
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "6": {
            "class_type": "CyberunFail",
            "inputs": {"image": ["3", 0], "message": "deliberate failure"},
        },
    }
    task_id = run(gw, dk, {"name": "fail", "workflow_json": graph})
    result = finished(gw, dk, process, task_id)
    assert result["task_status"] == "failed"
    assert "node 6 (CyberunFail): deliberate failure" in result["task_error"]


def test_bad_class_and_out_of_range_value_fail_before_execution(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """An unknown class_type and a value ComfyUI refuses are reported before anything runs."""
    process, dk = agent
    bad_class = {**INVERT, "5": {"class_type": "NoSuchNode", "inputs": {"image": ["3", 0]}}}
    first = run(gw, dk, {"name": "bad", "workflow_json": bad_class})
    assert (
        "class_type 'NoSuchNode' is not installed" in finished(gw, dk, process, first)["task_error"]
    )
    too_wide = {**INVERT, "3": {**INVERT["3"], "inputs": {**INVERT["3"]["inputs"], "width": 10**6}}}
    second = run(gw, dk, {"name": "wide", "workflow_json": too_wide})
    error = finished(gw, dk, process, second)["task_error"]
    assert error.startswith("invalid_workflow: node 3 (EmptyImage)")


def test_agent_restarted_mid_task_reattaches_to_the_same_prompt(
    tmp_path: Path, gw: GatewayProcess, agent: tuple[AgentProcess, str], comfyui: ComfyUIServer
) -> None:
    """A SIGKILLed agent, restarted, completes its ComfyUI prompt without running it twice."""
    process, dk = agent
    task_id = run(gw, dk, {"name": "reattach", "workflow_json": slow(30, 0.1, "reattach")})
    wait_progress(gw, dk, task_id)  # the prompt is running in ComfyUI
    process.kill()
    env = {"CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": comfyui.url, "CYBERUN_AGENT_RUNTIMES__EXTRA": ""}
    again = start_agent(tmp_path / "agent", gw.url, dk, "comfy-agent", extra_env=env)
    try:
        again.wait_log("re-attached to a ComfyUI prompt", timeout=60)
        result = finished(gw, dk, again, task_id)
        assert result["task_status"] == "completed", result
        history = httpx.get(f"{comfyui.url}/history").json()
        runs = [entry for entry in history.values() if "reattach" in str(entry.get("outputs"))]
        assert len(runs) == 1  # the prompt ran once, though two agents saw it
    finally:
        again.stop()


def _png(width: int, height: int) -> bytes:
    """A tiny valid PNG (Pillow is not a dependency of the agent; use zlib by hand)."""
    import zlib  # noqa: PLC0415

    raw = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (
            struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    out = io.BytesIO()
    out.write(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return out.getvalue()


def test_launched_comfyui_killed_mid_task_fails_it_and_comes_back(
    tmp_path: Path, gw: GatewayProcess, comfyui: ComfyUIServer
) -> None:
    """In launch mode, ComfyUI dying mid-task fails that task quickly and is restarted."""
    base = tmp_path / "comfy-base"
    (base / "custom_nodes").mkdir(parents=True)
    _install_test_nodes(base / "custom_nodes")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    dk = gw.credential("launch")
    env = {
        "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON": str(comfyui.python),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN": str(comfyui.main),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PORT": port,
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__BASE_DIRECTORY": str(base),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__ARGS": '["--cpu", "--database-url", "sqlite:///:memory:"]',
    }
    process = start_agent(tmp_path / "agent", gw.url, dk, "launcher", extra_env=env)
    try:
        first_pid = process.wait_log("ComfyUI is ready", timeout=120)["pid"]
        process.wait_log("connected to the gateway")
        task_id = run(gw, dk, {"name": "doomed", "workflow_json": slow(200, 0.1, "doomed")})
        wait_progress(gw, dk, task_id)
        mark = len(process.seen)
        killed = time.monotonic()
        os.killpg(first_pid, signal.SIGKILL)
        reported = process.wait_log("task reported", task_id=task_id, timeout=30)
        assert reported["outcome"] == "task.fail"
        assert time.monotonic() - killed < 10
        process.wait_log("ComfyUI exited; restarting", since=mark)
        back = process.wait_log("ComfyUI is ready", timeout=120, since=mark)
        assert back["pid"] != first_pid
        after = run(gw, dk, {"name": "after", "workflow_json": INVERT})
        assert finished(gw, dk, process, after)["task_status"] == "completed"
    finally:
        process.stop()


def test_a_partly_invalid_graph_is_refused_whole(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """ComfyUI would run the valid half of a graph; the agent refuses the whole task instead."""
    process, dk = agent
    graph = {
        **INVERT,
        "13": {
            "class_type": "EmptyImage",
            "inputs": {"width": 10**6, "height": 8, "batch_size": 1, "color": 0},
        },
        "19": {
            "class_type": "SaveImage",
            "inputs": {"images": ["13", 0], "filename_prefix": "half"},
        },
    }
    task_id = run(gw, dk, {"name": "half", "workflow_json": graph})
    result = finished(gw, dk, process, task_id)
    assert result["task_status"] == "failed"
    assert result["task_error"].startswith("invalid_workflow: node 13 (EmptyImage)")
    assert result["download_urls"] == {}


def test_one_comfyui_per_gpu_slot_runs_tasks_side_by_side(
    tmp_path: Path, gw: GatewayProcess, comfyui: ComfyUIServer
) -> None:
    """With launch.gpus = [0, 1] and two slots, two tasks run at once, one per ComfyUI."""
    base = tmp_path / "comfy-base"
    (base / "custom_nodes").mkdir(parents=True)
    _install_test_nodes(base / "custom_nodes")
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", first.getsockname()[1] + 1))  # the pair of ports must be free
        port = first.getsockname()[1]
    dk = gw.credential("two-gpus")
    env = {
        "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
        "CYBERUN_AGENT_SLOTS": "2",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON": str(comfyui.python),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN": str(comfyui.main),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PORT": str(port),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__BASE_DIRECTORY": str(base),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__GPUS": "0,1",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__ARGS": '["--cpu", "--database-url", "sqlite:///:memory:"]',
    }
    process = start_agent(tmp_path / "agent", gw.url, dk, "two-gpus", extra_env=env)
    try:
        process.wait_log("connected to the gateway", timeout=180)
        tasks = [
            run(gw, dk, {"name": f"side{i}", "workflow_json": slow(20, 0.1, f"side{i}")})
            for i in (0, 1)
        ]
        for task_id in tasks:
            wait_progress(gw, dk, task_id)  # both are running before either ends
        for task_id in tasks:
            assert finished(gw, dk, process, task_id)["task_status"] == "completed"
        for offset in (0, 1):
            history = httpx.get(f"http://127.0.0.1:{port + offset}/history").json()
            assert len(history) == 1  # each ComfyUI ran exactly one of the two prompts
        assert (base / "output" / "gpu0").is_dir()
        assert (base / "output" / "gpu1").is_dir()
    finally:
        process.stop()


def test_hello_reports_comfyui_and_pytorch_versions(
    gw: GatewayProcess, agent: tuple[AgentProcess, str]
) -> None:
    """The agent advertises ComfyUI's and PyTorch's versions read from /system_stats."""
    _, dk = agent
    with gw.client(dk) as http:
        (record,) = http.get("/r/agents").json()["agent_list"]
    assert (record["tool"], record["comfyui_version"]) == ("comfyui", "0.3.75")
    assert record["tool_version"] == "0.3.75"
    assert record["system_stats"]["pytorch_version"].startswith("2.13")
    assert "comfyui" in record["agent_labels"]
