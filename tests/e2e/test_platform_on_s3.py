"""The platform end to end on real S3: gateway + real agent + real ComfyUI / Nerfstudio.

The gateway presigns against a real SeaweedFS (signatures enforced); an agent process runs
the real runtime. The test is a platform user and nothing else: it imports workflows, uploads
inputs through ``/r/files/presign``, runs them, follows the SSE events and downloads the
results from their presigned URLs, all through the public REST API (``demo.client``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.client import ApiError, Event, PlatformClient
from demo.png import size_of, write_sample
from tests.agent_process import AgentProcess, start_agent
from tests.comfyui import ComfyUIServer
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway
from tests.nerfstudio import NerfstudioInstall
from tests.nerfstudio_scene import make_scene_zip
from tests.seaweedfs import SeaweedFS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
DEMO_WORKFLOW = Path(__file__).parents[2] / "demo" / "workflow.json"


@pytest.fixture
def gw(tmp_path: Path, seaweedfs: SeaweedFS) -> Iterator[GatewayProcess]:
    """A gateway whose object storage is the real S3 server."""
    env = {
        "CYBERUN_GATEWAY_S3_ACCESS_KEY": seaweedfs.access_key,
        "CYBERUN_GATEWAY_S3_SECRET_KEY": seaweedfs.secret_key,
    }
    s3 = ("--s3-endpoint", seaweedfs.endpoint_url, "--s3-bucket", "e2e")
    with gateway(tmp_path / "gw", *s3, *FAST_TIMEOUTS, env=env) as proc:
        yield proc


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agent processes a test starts; stopped at the end."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def connect(
    agents: list[AgentProcess], tmp_path: Path, gw: GatewayProcess, dk: str, **env: str
) -> None:
    """Start a real agent with ``env`` and wait until the gateway lists it as ready."""
    agent = start_agent(tmp_path / "agent", gw.url, dk, "e2e-agent", extra_env=env)
    agents.append(agent)
    label = "nerfstudio" if env.get("CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__ENABLED") else "comfyui"
    with PlatformClient(gw.url, dk) as client:
        client.wait_for_agent("e2e-agent", label, timeout=180)


def run_to_end(
    client: PlatformClient, workflow: str, parameters: dict[str, Any]
) -> tuple[str, list[Event]]:
    """Run the workflow and follow its events to the end; the task id and every event."""
    seen: list[Event] = []
    task_id = client.run(workflow, parameters)
    client.follow(task_id, seen.append)
    return task_id, seen


def test_comfyui_workflow_through_rest_and_s3(
    tmp_path: Path,
    gw: GatewayProcess,
    agents: list[AgentProcess],
    comfyui: ComfyUIServer,
    seaweedfs: SeaweedFS,
) -> None:
    """Import, upload to S3, run with overrides, follow SSE, download the PNG from S3."""
    dk = gw.credential("e2e")
    connect(
        agents,
        tmp_path,
        gw,
        dk,
        CYBERUN_AGENT_RUNTIMES__EXTRA="",
        CYBERUN_AGENT_RUNTIMES__COMFYUI__URL=comfyui.url,
    )
    with PlatformClient(gw.url, dk) as client:
        workflow = client.import_workflow(json.loads(DEMO_WORKFLOW.read_text(encoding="utf-8")))
        file_key = client.upload_input(write_sample(tmp_path / "in.png", 200, 100), "image/png")
        task_id, events = run_to_end(
            client, workflow["id"], {"image": file_key, "width": 100, "blur_radius": 3}
        )
        assert [e.event for e in events if e.event != "progress"][-2:] == ["status", "completed"]
        progress = [e.data["progress"] for e in events if e.event == "progress"]
        assert progress == sorted(progress)
        result = client.result(task_id)
        url = result["download_urls"]["9.images.0"]
        assert url.startswith(seaweedfs.endpoint_url)
        assert size_of(httpx.get(url).content) == (100, 50)
        assert result["task_output"]["image_count"] == 1
        with pytest.raises(ApiError) as refused:
            client.run(workflow["id"], {"image": file_key, "blur_radius": 99})
        assert refused.value.status == 400
        assert refused.value.field == "parameters.blur_radius"


def test_nerfstudio_task_through_rest_and_s3(
    tmp_path: Path,
    gw: GatewayProcess,
    agents: list[AgentProcess],
    nerfstudio: NerfstudioInstall,
    seaweedfs: SeaweedFS,
) -> None:
    """A scene zip uploaded to S3 trains nerfacto on the CPU; the point cloud comes from S3."""
    dk = gw.credential("e2e-nerf")
    connect(
        agents,
        tmp_path,
        gw,
        dk,
        CYBERUN_AGENT_RUNTIMES__EXTRA="",
        CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__ENABLED="true",
        CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__BIN_DIR=str(nerfstudio.bin),
        CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__TORCH_HOME=str(nerfstudio.torch_home),
        MPLCONFIGDIR=str(tmp_path / "mpl"),
    )
    body = {
        "name": "tiny nerf",
        "workflow_slug": "tiny-nerf",
        "tool_type": "nerfstudio",
        "parameters": [
            {
                "key": "scene",
                "type": "file",
                "accept": "application/zip",
                "required": True,
                "target_path": "input",
            },
            {
                "key": "iterations",
                "type": "number",
                "min": 1,
                "max": 50,
                "default": 3,
                "target_path": "train.max_num_iterations",
            },
        ],
        "workflow_json": {
            "input": {"param": "scene", "kind": "dataset"},
            "train": {"method": "nerfacto", "max_num_iterations": 3, "device": "cpu"},
            "export": [{"kind": "pointcloud", "num_points": 1000, "normal_method": "open3d"}],
        },
    }
    with PlatformClient(gw.url, dk) as client:
        workflow = client.import_workflow(body)
        scene = client.upload_input(make_scene_zip(tmp_path / "scene.zip"), "application/zip")
        task_id, events = run_to_end(client, workflow["id"], {"scene": scene, "iterations": 4})
        assert events[-1].event == "completed", events[-1]
        nodes = {e.data.get("current_node") for e in events if e.event == "progress"}
        assert {"ns-train", "ns-export"} <= nodes
        assert any(e.data.get("step_total") == 4 for e in events if e.event == "progress")
        result = client.result(task_id)
        cloud = result["download_urls"]["export.pointcloud.0"]
        assert cloud.startswith(seaweedfs.endpoint_url)
        assert httpx.get(cloud).content.startswith(b"ply\n")
