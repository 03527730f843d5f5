"""The community pool end to end: real gateway, real agent processes, a REAL ComfyUI (CPU).

Team ``owner`` runs the agent with ``pools.community`` enabled; team ``stranger`` submits
``target_pool: community`` tasks through the public REST API. The policy engine checks each
one before ``task.accept``; a refused task is re-dispatched by the gateway (a simulated
agent of a third team takes it); allowed ones run on ComfyUI and leave no file behind.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.runtimes.comfyui.workflow import prompt_id_for
from tests.agent_process import AgentProcess, start_agent
from tests.comfyui import COMFYUI_TEST_TIMEOUT_S, ComfyUIServer
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway, run_workflow
from tests.integration.test_comfyui_runtime import _png as png
from tests.simagent import SimAgent

pytest_plugins = ["tests.comfyui"]
pytestmark = pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)
_names = itertools.count()


def invert(prefix: str, width: int = 32) -> dict[str, Any]:
    """Built-in nodes only: EmptyImage → ImageInvert → SaveImage."""
    return {
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": 16, "batch_size": 1, "color": 0},
        },
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def slow(prefix: str, steps: int, step_s: float) -> dict[str, Any]:
    """EmptyImage → the test-only slow node (interruptible) → SaveImage."""
    graph = invert(prefix)
    graph["5"] = {
        "class_type": "CyberunSlowPassthrough",
        "inputs": {"image": ["3", 0], "steps": steps, "step_s": step_s},
    }
    return graph


def free_port() -> int:
    """A free loopback TCP port (for the agent's observe endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A fresh gateway with fast protocol timers."""
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as proc:
        yield proc


class Owner:
    """Starts community-enabled agents of team ``owner`` against the real ComfyUI."""

    def __init__(self, tmp_path: Path, gw: GatewayProcess, comfyui: ComfyUIServer) -> None:
        """Nothing starts until :meth:`start`."""
        self.tmp_path, self.gw, self.comfyui = tmp_path, gw, comfyui
        self.dk = gw.credential("owner")
        self.started: list[AgentProcess] = []

    def start(self, **settings: str) -> tuple[AgentProcess, str]:
        """Start an agent (``settings``: extra CYBERUN_AGENT_* variables); return it and /status."""
        port = free_port()
        env = {
            "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": self.comfyui.url,
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__DIRECTORY": str(self.comfyui.base_directory),
            "CYBERUN_AGENT_POOLS__COMMUNITY__ENABLED": "true",
            "CYBERUN_AGENT_OBSERVE__LISTEN": f"127.0.0.1:{port}",
            **{f"CYBERUN_AGENT_{key.upper()}": value for key, value in settings.items()},
        }
        name = f"owner-{next(_names)}"
        agent = start_agent(self.tmp_path / name, self.gw.url, self.dk, name, extra_env=env)
        self.started.append(agent)
        agent.wait_log("connected to the gateway", timeout=60)
        return agent, f"http://127.0.0.1:{port}/status"


@pytest.fixture
def owner(tmp_path: Path, gw: GatewayProcess, comfyui: ComfyUIServer) -> Iterator[Owner]:
    """The owner's team; every agent it started is stopped afterwards."""
    team = Owner(tmp_path, gw, comfyui)
    try:
        yield team
    finally:
        for agent in team.started:
            agent.stop()


def submit(gw: GatewayProcess, dk: str, graph: dict[str, Any], **request: Any) -> str:
    """Create a workflow of ``graph`` and run it; return the task id."""
    workflow = gw.create_workflow(dk, {"name": "w", "workflow_json": graph})
    return run_workflow(gw, dk, workflow, **request)


def result(gw: GatewayProcess, dk: str, task_id: str) -> dict[str, Any]:
    """The task's result record."""
    with gw.client(dk) as http:
        found: dict[str, Any] = http.get(f"/r/tasks/{task_id}/result").json()
    return found


def files_of(base: Path, prefix: str) -> list[Path]:
    """Files under ComfyUI's input/, output/ and temp/ whose name starts with ``prefix``."""
    return [
        path
        for folder in ("input", "output", "temp")
        if (base / folder).exists()
        for path in (base / folder).rglob(f"{prefix}*")
    ]


def history(comfyui: ComfyUIServer, task_id: str, attempt: int = 0) -> dict[str, Any]:
    """ComfyUI's history entry of a task attempt's prompt (``{}`` when it has none)."""
    prompt_id = prompt_id_for(task_id, attempt)
    found: dict[str, Any] = httpx.get(f"{comfyui.url}/history/{prompt_id}").json()
    return found


def test_allowlisted_community_graph_runs_and_leaves_no_file(
    owner: Owner, gw: GatewayProcess, comfyui: ComfyUIServer
) -> None:
    """A built-in-node community task runs; its inputs, outputs and history are gone after."""
    agent, status_url = owner.start()
    stranger = gw.credential("stranger")
    source = png(24, 16)
    with gw.client(stranger) as http:
        slot = http.post(
            "/r/files/presign",
            json={"file_name": "in.png", "file_size": len(source), "content_type": "image/png"},
        ).json()
    assert httpx.put(slot["upload_url"], content=source, headers=slot["upload_headers"]).is_success
    prefix = f"community-{next(_names)}"
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }
    param = {"key": "image", "type": "file", "accept": "image/*", "node_id": "1", "field": "image"}
    workflow = gw.create_workflow(
        stranger, {"name": "load", "workflow_json": graph, "parameters": [param]}
    )
    with gw.client(stranger) as http:
        answer = http.post(
            f"/r/workflows/{workflow}/run",
            json={"target_pool": "community", "parameters": {"image": slot["file_key"]}},
        )
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["task_id"]
    agent.wait_log("task accepted", task_id=task_id, pool="community", timeout=60)
    agent.wait_log("report acknowledged", task_id=task_id, timeout=120)
    done = result(gw, stranger, task_id)
    assert done["task_status"] == "completed", done
    assert httpx.get(done["download_urls"]["9.images.0"]).content[:4] == b"\x89PNG"
    assert files_of(comfyui.base_directory, prefix) == []
    uploaded = prompt_id_for(task_id, 0)[:8]  # the runtime names its inputs <prompt[:8]>-<name>
    assert files_of(comfyui.base_directory, uploaded) == []
    assert history(comfyui, task_id) == {}
    work = agent.home / "work"
    assert not work.exists() or list(work.iterdir()) == []
    text = agent.log_text()
    assert prefix not in text
    assert slot["file_key"] not in text
    state = httpx.get(status_url).json()
    assert state["contribution"]["community"]["completed"] == 1
    assert state["contribution"]["community"]["gpu_seconds"] > 0
    metrics = httpx.get(status_url.replace("/status", "/metrics")).text
    assert 'cyberun_agent_tasks_total{outcome="completed",pool="community"} 1.0' in metrics


@pytest.mark.parametrize(
    ("graph", "rule"),
    [
        (slow("p", 5, 0.01), "comfyui.nodes"),
        (invert("p", width=4096), "comfyui.limits.resolution"),
        (invert("../../outside"), "comfyui.paths"),
    ],
    ids=["custom-node", "oversized", "path-outside"],
)
def test_policy_violation_is_rejected_before_running_and_redispatched(
    owner: Owner, gw: GatewayProcess, comfyui: ComfyUIServer, graph: dict[str, Any], rule: str
) -> None:
    """A refused community task never reaches ComfyUI; the gateway gives it to another agent."""
    agent, _ = owner.start()
    stranger = gw.credential("stranger")
    task_id = submit(gw, stranger, graph, target_pool="community")
    refused = agent.wait_log("task refused by policy", task_id=task_id, timeout=60)
    assert refused["rule"] == rule
    assert history(comfyui, task_id) == {}

    async def other_agent_takes_it() -> int:
        third = gw.credential("third")
        async with SimAgent(gw.ws_url, third, "third-agent", community=1) as sim:
            assign = await sim.next_assign(timeout=30)
            assert assign.task_id == task_id
            return assign.attempt

    assert asyncio.run(other_agent_takes_it()) == 1  # the second dispatch of the task


def test_outside_hours_the_agent_offers_no_community_credit(
    owner: Owner, gw: GatewayProcess
) -> None:
    """Outside pools.community.hours the credit is 0: team work runs, community work waits."""
    now = datetime.now(UTC)
    start, end = now + timedelta(hours=2), now + timedelta(hours=3)
    window = f"{start:%H:%M}-{end:%H:%M}"
    agent, status_url = owner.start(
        POOLS__COMMUNITY__HOURS=json.dumps([window]), POOLS__COMMUNITY__TIMEZONE="UTC", SLOTS="2"
    )
    state = httpx.get(status_url).json()
    assert state["free_slots"] == {"team": 2, "community": 0}
    assert "outside pools.community.hours" in state["community"]["closed_reason"]
    stranger = gw.credential("stranger")
    waiting = submit(gw, stranger, invert("hours-c"), target_pool="community")
    team_task = submit(gw, owner.dk, invert("hours-t"))
    agent.wait_log("report acknowledged", task_id=team_task, timeout=120)
    with gw.client(stranger) as http:
        assert http.get(f"/r/tasks/{waiting}").json()["task_status"] in {"pending", "waiting"}
    assert not any(r.get("task_id") == waiting for r in agent.seen)


def test_team_task_preempts_a_running_community_task(
    owner: Owner, gw: GatewayProcess, comfyui: ComfyUIServer
) -> None:
    """With preempt on, a team task cancels the community task, which is re-queued, no retry."""
    agent, status_url = owner.start(
        SLOTS="1",
        POOLS__COMMUNITY__PREEMPT="true",
        POLICY__COMFYUI__ALLOW_NODES="CyberunSlowPassthrough",
    )
    stranger = gw.credential("stranger")
    community = submit(gw, stranger, slow("pre-c", 40, 0.25), target_pool="community")
    agent.wait_log("task accepted", task_id=community, timeout=60)
    agent.wait_log("ComfyUI prompt queued", task_id=community, timeout=60)
    team_task = submit(gw, owner.dk, invert("pre-t"))
    reported = agent.wait_log("task reported", task_id=community, timeout=30)
    assert reported["outcome"] == "task.cancelled"
    agent.wait_log("report acknowledged", task_id=team_task, timeout=120)
    assert result(gw, owner.dk, team_task)["task_status"] == "completed"
    agent.wait_log("task accepted", task_id=community, attempt=1, timeout=60)
    agent.wait_log("report acknowledged", task_id=community, attempt=1, timeout=120)
    with gw.client(stranger) as http:
        final = http.get(f"/r/tasks/{community}").json()
    assert final["task_status"] == "completed"
    assert final["retry_count"] == 0
    state = httpx.get(status_url).json()
    assert state["contribution"]["community"]["preempted"] == 1
    assert state["contribution"]["community"]["failed"] == 0
    assert files_of(comfyui.base_directory, "pre-c") == []
