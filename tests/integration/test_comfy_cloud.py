"""dispatch_target comfy_cloud: the gateway runs the task itself on a ComfyUI endpoint.

A local REAL ComfyUI stands in for the cloud endpoint; no agent is connected.
"""

from __future__ import annotations

import struct
from pathlib import Path

import httpx
import pytest

from tests.comfyui import ComfyUIServer
from tests.gateway_process import FAST_TIMEOUTS, gateway

pytestmark = pytest.mark.timeout(180)

GRAPH = {
    "3": {
        "class_type": "EmptyImage",
        "inputs": {"width": 40, "height": 24, "batch_size": 1, "color": 0},
    },
    "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "cloud"}},
}


def test_a_comfy_cloud_task_runs_on_the_endpoint_without_any_agent(
    tmp_path: Path, comfyui: ComfyUIServer
) -> None:
    """The gateway runs the graph on the endpoint, stores its PNG, and records comfy_cloud."""
    cloud = ("--comfy-cloud-url", comfyui.url)
    env = {"CYBERUN_GATEWAY_COMFY_CLOUD_API_KEY": "cloud-key-for-tests"}
    with gateway(tmp_path / "gw", *cloud, *FAST_TIMEOUTS, env=env) as gw:
        dk = gw.credential("cloud")
        workflow = gw.create_workflow(dk, {"name": "cloud", "workflow_json": GRAPH})
        with gw.client(dk) as http:
            task_id = http.post(
                f"/r/workflows/{workflow}/run", json={"dispatch_target": "comfy_cloud"}
            ).json()["task_id"]
            with http.stream("GET", f"/r/tasks/{task_id}/events", timeout=120) as stream:
                events = [line for line in stream.iter_lines() if line.startswith("event: ")]
            record = http.get(f"/r/tasks/{task_id}").json()
            result = http.get(f"/r/tasks/{task_id}/result").json()
            assert events[-1] == "event: completed", (events, record)
            assert (record["dispatch_target"], record["agent_id"]) == ("comfy_cloud", "comfy_cloud")
            image = httpx.get(result["download_urls"]["9.images.0"]).content
            assert struct.unpack(">II", image[16:24]) == (40, 24)
            assert result["task_output"]["storage_key"].startswith(f"tasks/{task_id}/")


def test_comfy_cloud_refuses_nerfstudio_workflows(tmp_path: Path, comfyui: ComfyUIServer) -> None:
    """Only ComfyUI workflows can go to comfy_cloud; others are a 400 naming dispatch_target."""
    with gateway(tmp_path / "gw", "--comfy-cloud-url", comfyui.url) as gw:
        dk = gw.credential("cloud-ns")
        body = {
            "name": "ns",
            "tool_type": "nerfstudio",
            "workflow_json": {"train": {"method": "nerfacto"}},
        }
        workflow = gw.create_workflow(dk, body)
        with gw.client(dk) as http:
            answer = http.post(
                f"/r/workflows/{workflow}/run", json={"dispatch_target": "comfy_cloud"}
            )
    assert answer.status_code == 400
    assert (answer.json()["error"]["field"], answer.json()["error"]["rule"]) == (
        "dispatch_target",
        "tool_type",
    )
