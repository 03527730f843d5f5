"""The agent's observe endpoint as a real process: /healthz, /readyz, /metrics, /status.

A real gateway and a real agent process (scripted runtime, fake NVML with one GPU); the
endpoint is scraped over real HTTP while tasks run and while the gateway goes away.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.metrics import Metrics
from agent.observe import ObserveServer
from tests.agent_process import ROOT, AgentProcess, agent_cli, script_workflow, start_agent
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway, run_workflow
from tests.nvml_fake import FakeGpu, nvml_env, write_scenario

GIB = 1024**3


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in an exposition (``None`` when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        found = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if found and found.group(1) == name:
            have = ",".join(sorted((found.group(2) or "").split(","))) if found.group(2) else ""
            if have == wanted:
                return float(found.group(3))
    return None


def wait_ready(url: str, ready: bool, timeout: float = 20) -> dict[str, object]:
    """Poll /readyz until it says ``ready`` (a hang guard around the agent's state change)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.get(f"{url}/readyz", timeout=2)
            body: dict[str, object] = answer.json()
            if (answer.status_code == 200) == ready:
                return body
        except httpx.HTTPError:
            body = {}
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz never became ready={ready}: {body}")
        time.sleep(0.1)  # readiness follows the agent's connection; nothing to subscribe to


@pytest.fixture
def port() -> int:
    """The gateway's port, fixed so it can come back at the same URL."""
    return free_port()


@pytest.fixture
def observed(
    tmp_path: Path, port: int, fake_nvml_lib: Path
) -> Iterator[tuple[AgentProcess, str, str, GatewayProcess]]:
    """A gateway and an observed agent: (agent, endpoint URL, device credential, gateway)."""
    observe = free_port()
    gpu = FakeGpu(
        name="NVIDIA GeForce RTX 4090",
        total=24 * GIB,
        used=3 * GIB,
        temp=51,
        power_mw=88_000,
        util_gpu=40,
    )
    env = {
        **nvml_env(fake_nvml_lib, write_scenario(tmp_path / "nvml.txt", [gpu])),
        "CYBERUN_AGENT_OBSERVE__LISTEN": f"127.0.0.1:{observe}",
    }
    with gateway(tmp_path / "gw", "--port", str(port), *FAST_TIMEOUTS) as gw:
        dk = gw.credential("observed")
        agent = start_agent(tmp_path / "agent", gw.url, dk, "observed-1", extra_env=env)
        try:
            agent.wait_log("observe endpoint listening")
            yield agent, f"http://127.0.0.1:{observe}", dk, gw
        finally:
            agent.stop()


def test_metrics_move_during_a_task(
    observed: tuple[AgentProcess, str, str, GatewayProcess],
) -> None:
    """A task moves the counters: outcome, bytes, stage times, slots and GPU gauges."""
    agent, url, dk, gw = observed
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    wait_ready(url, ready=True)
    before = httpx.get(f"{url}/metrics").text
    assert sample(before, "cyberun_agent_connected") == 1
    assert sample(before, "cyberun_agent_tasks_total", outcome="completed", pool="team") == 0
    assert sample(before, "cyberun_agent_gpu_seconds_total", pool="team") == 0
    workflow = gw.create_workflow(dk, script_workflow(outputs=2))
    with gw.client(dk) as http:
        task_id = http.post(f"/r/workflows/{workflow}/run", json={}).json()["task_id"]
    agent.wait_log("report acknowledged", task_id=task_id)
    after = httpx.get(f"{url}/metrics").text
    assert sample(after, "cyberun_agent_tasks_total", outcome="completed", pool="team") == 1
    assert (sample(after, "cyberun_agent_gpu_seconds_total", pool="team") or 0) > 0
    assert sample(after, "cyberun_agent_gpu_seconds_total", pool="community") == 0
    assert (sample(after, "cyberun_agent_uploaded_bytes_total") or 0) > 0
    assert sample(after, "cyberun_agent_stage_seconds_count", stage="run") == 1
    assert sample(after, "cyberun_agent_slots", pool="team") == 1
    assert sample(after, "cyberun_agent_gpu_temperature_celsius", gpu="0") == 51
    assert sample(after, "cyberun_agent_gpu_power_watts", gpu="0") == 88
    assert sample(after, "cyberun_agent_gpu_memory_used_bytes", gpu="0") == 3 * GIB
    assert sample(after, "cyberun_agent_gpu_usable", gpu="0") == 1
    assert sample(after, "cyberun_agent_status", status="idle") == 1
    assert dk not in after
    status = httpx.get(f"{url}/status").json()
    assert status["agent_id"] == "observed-1"
    assert status["connected"] is True
    assert status["gpus"][0]["temperature_c"] == 51


def test_lifetime_contribution_survives_a_restart(
    tmp_path: Path, fake_nvml_lib: Path, observed: tuple[AgentProcess, str, str, GatewayProcess]
) -> None:
    """/status contribution keeps the served tasks across a restart; the counters start at 0."""
    agent, url, dk, gw = observed
    task_id = run_workflow(gw, dk, gw.create_workflow(dk, script_workflow(steps=2)))
    agent.wait_log("report acknowledged", task_id=task_id)
    before = httpx.get(f"{url}/status").json()
    assert before["contribution"]["team"]["completed"] == 1
    agent.signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    env = {
        **nvml_env(fake_nvml_lib, tmp_path / "nvml.txt"),
        "CYBERUN_AGENT_OBSERVE__LISTEN": url.removeprefix("http://"),
    }
    again = start_agent(tmp_path / "agent", gw.url, dk, "observed-1", extra_env=env)
    try:
        again.wait_log("observe endpoint listening")
        after = httpx.get(f"{url}/status").json()
        assert after["contribution"]["team"] == before["contribution"]["team"]
        assert after["contribution_since"] == before["contribution_since"]
        metrics = httpx.get(f"{url}/metrics").text
        assert sample(metrics, "cyberun_agent_tasks_total", outcome="completed", pool="team") == 0
    finally:
        again.stop()


def test_readyz_flips_when_the_gateway_goes_away(
    tmp_path: Path, port: int, fake_nvml_lib: Path
) -> None:
    """Stopping the gateway makes /readyz 503 "not connected"; its return makes it 200 again."""
    observe = free_port()
    env = {
        **nvml_env(fake_nvml_lib, write_scenario(tmp_path / "nvml.txt", [FakeGpu()])),
        "CYBERUN_AGENT_OBSERVE__LISTEN": f"127.0.0.1:{observe}",
    }
    url = f"http://127.0.0.1:{observe}"
    with gateway(tmp_path / "gw", "--port", str(port), *FAST_TIMEOUTS) as gw:
        dk = gw.credential("flip")
        agent = start_agent(tmp_path / "agent", gw.url, dk, "flip-1", extra_env=env)
        try:
            wait_ready(url, ready=True)
            gw.stop()
            down = wait_ready(url, ready=False)
            assert "not connected to the gateway" in str(down["reasons"])
            assert sample(httpx.get(f"{url}/metrics").text, "cyberun_agent_connected") == 0
            with gateway(tmp_path / "gw", "--port", str(port), *FAST_TIMEOUTS):
                wait_ready(url, ready=True, timeout=30)
                metrics = httpx.get(f"{url}/metrics").text
                assert sample(metrics, "cyberun_agent_reconnects_total") == 1
        finally:
            agent.stop()


def test_status_command_prints_the_running_agent(
    observed: tuple[AgentProcess, str, str, GatewayProcess],
) -> None:
    """`cyberun-agent status` reads the running agent's state; --json gives it whole."""
    agent, url, _, _ = observed
    wait_ready(url, ready=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(agent.home),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_OBSERVE__LISTEN": url.removeprefix("http://"),
    }
    table = agent_cli("status", env=env, timeout=30)
    assert table.returncode == 0, table.stderr
    assert "observed-1" in table.stdout
    assert "team 0/1 busy" in table.stdout
    assert "gpu 0" in table.stdout
    assert "served     team: " in table.stdout  # per-pool contribution since start
    assert "served     community: 0 completed" in table.stdout
    raw = agent_cli("status", "--json", env=env, timeout=30)
    assert json.loads(raw.stdout)["agent_status"] == "idle"
    env["CYBERUN_AGENT_OBSERVE__LISTEN"] = f"127.0.0.1:{free_port()}"
    nobody = agent_cli("status", env=env, timeout=30)
    assert nobody.returncode == 1
    assert "no agent answers" in nobody.stderr


def test_a_token_guards_metrics_and_status_beyond_loopback(tmp_path: Path) -> None:
    """A wildcard bind needs a token file; then /metrics and /status want it, probes do not."""
    home = tmp_path / "home"
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_OBSERVE__LISTEN": "0.0.0.0:9464",
    }
    refused = agent_cli("config", "validate", env=base, timeout=30)
    assert refused.returncode == 3
    assert "observe" in refused.stderr
    assert "token_file" in refused.stderr
    token = tmp_path / "token"
    token.write_text("s3cr3t-token-0123456789\n", encoding="utf-8")
    observe = free_port()
    env = {
        "CYBERUN_AGENT_OBSERVE__LISTEN": f"0.0.0.0:{observe}",
        "CYBERUN_AGENT_OBSERVE__TOKEN_FILE": str(token),
        "LD_LIBRARY_PATH": str(tmp_path),
    }
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as gw:
        agent = start_agent(home, gw.url, gw.credential("tok"), "tok-1", extra_env=env)
        try:
            agent.wait_log("observe endpoint listening")
            url = f"http://127.0.0.1:{observe}"
            assert httpx.get(f"{url}/healthz").status_code == 200
            assert httpx.get(f"{url}/metrics").status_code == 401
            assert (
                httpx.get(f"{url}/status", headers={"Authorization": "Bearer nope"}).status_code
                == 401
            )
            good = {"Authorization": "Bearer s3cr3t-token-0123456789"}
            assert httpx.get(f"{url}/metrics", headers=good).status_code == 200
            assert httpx.get(f"{url}/status", headers=good).json()["agent_id"] == "tok-1"
        finally:
            agent.stop()


@pytest.mark.asyncio
async def test_the_endpoint_survives_hostile_requests() -> None:
    """Garbage, oversized and half-sent requests get closed; the next request is answered."""
    server = ObserveServer("127.0.0.1", 0, Metrics(), lambda: ["not connected"], dict)
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(bound.set_result))
    try:
        port = await asyncio.wait_for(bound, 10)
        for junk in (
            b"\x00\xff garbage\r\n\r\n",
            b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n",
            b"GET /healthz HTTP/1.1\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(junk)
            await writer.drain()
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"http://127.0.0.1:{port}/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"ready": False, "reasons": ["not connected"]}
            assert (await http.post(f"http://127.0.0.1:{port}/healthz")).status_code == 405
            assert (await http.get(f"http://127.0.0.1:{port}/nope")).status_code == 404
    finally:
        task.cancel()
