"""The agent daemon as a real process against the real gateway process.

Tasks run in the scripted test runtime (a real subprocess per task); every scenario is
checked at the gateway through its public REST API, including that each task ends with
exactly one terminal event.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agent_process import AgentProcess, script_workflow, start_agent
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway
from tests.gateway_process import submit_workflow as submit
from tests.gateway_process import task_record as record

TERMINAL = ("event: completed", "event: failed", "event: cancelled")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A fresh gateway on a fixed free port (so it can be restarted at the same URL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    with gateway(tmp_path / "gw", "--port", port, *FAST_TIMEOUTS) as proc:
        yield proc


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agent processes started by a test; all stopped at the end."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def terminal_events(gw: GatewayProcess, dk: str, task_id: str) -> list[str]:
    """The terminal SSE events of a finished task (exactly one is expected)."""
    with gw.client(dk) as http:
        text = http.get(f"/r/tasks/{task_id}/events").text
    return [line for line in text.splitlines() if line in TERMINAL]


def launch(
    agents: list[AgentProcess], tmp_path: Path, gw: GatewayProcess, dk: str, name: str, **env: str
) -> AgentProcess:
    """Start an agent and wait until it is connected."""
    agent = start_agent(tmp_path / name, gw.url, dk, name, extra_env=env)
    agents.append(agent)
    agent.wait_log("connected to the gateway")
    return agent


def test_a_task_runs_end_to_end(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """A submitted task runs in the runtime's subprocess, streams progress and uploads outputs."""
    dk = gw.credential("daemon")
    workflow = gw.create_workflow(dk, script_workflow(outputs=2, output_bytes=4096))
    agent = launch(agents, tmp_path, gw, dk, "worker-1")
    task_id = submit(gw, dk, workflow, steps=4)
    agent.wait_log("report acknowledged", task_id=task_id)
    with gw.client(dk) as http:
        result = http.get(f"/r/tasks/{task_id}/result").json()
        events = http.get(f"/r/tasks/{task_id}/events").text
    assert result["task_status"] == "completed"
    assert sorted(result["download_urls"]) == ["1.images.0", "1.images.1"]
    assert len(httpx.get(result["download_urls"]["1.images.1"]).content) == 4096
    assert "event: progress" in events
    assert terminal_events(gw, dk, task_id) == ["event: completed"]
    assert not any((tmp_path / "worker-1" / "work").iterdir())  # workspace removed


def test_a_failing_script_fails_the_task_with_its_node(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """A runtime failure is reported once with its code, message and node."""
    dk = gw.credential("daemon-fail")
    workflow = gw.create_workflow(dk, script_workflow(exit_code=3))
    agent = launch(agents, tmp_path, gw, dk, "worker-f")
    task_id = submit(gw, dk, workflow)
    agent.wait_log("report acknowledged", task_id=task_id)
    task = record(gw, dk, task_id)
    assert task["task_status"] == "failed"
    assert task["task_error"] == "script_failed: the script exited with 3 (node 1)"


def test_gateway_cancel_stops_the_process_quickly(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """A gateway cancel interrupts the running subprocess and is reported within seconds."""
    dk = gw.credential("daemon-cancel")
    workflow = gw.create_workflow(dk, script_workflow(steps=200, step_s=0.1))
    agent = launch(agents, tmp_path, gw, dk, "worker-c")
    task_id = submit(gw, dk, workflow)
    agent.wait_log("task accepted", task_id=task_id)
    started = time.monotonic()
    with gw.client(dk) as http:
        assert http.post(f"/r/tasks/{task_id}/cancel").json()["task_status"] == "cancelled"
    reported = agent.wait_log("task reported", task_id=task_id)
    assert reported["outcome"] == "task.cancelled"
    assert time.monotonic() - started < 5
    assert terminal_events(gw, dk, task_id) == ["event: cancelled"]


def test_gateway_restart_mid_task_still_completes_once(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """The gateway is stopped and restarted while a task runs; the task completes exactly once."""
    dk = gw.credential("daemon-restart")
    workflow = gw.create_workflow(dk, script_workflow(steps=30, step_s=0.1))
    agent = launch(agents, tmp_path, gw, dk, "worker-r")
    task_id = submit(gw, dk, workflow)
    agent.wait_log("task accepted", task_id=task_id)
    port = gw.url.rsplit(":", 1)[1]
    assert gw.stop() in (0, -signal.SIGTERM)
    with gateway(gw.data_dir, "--port", port, *FAST_TIMEOUTS) as again:
        agent.wait_log("report acknowledged", task_id=task_id, timeout=40)
        assert record(again, dk, task_id)["task_status"] == "completed"
        assert terminal_events(again, dk, task_id) == ["event: completed"]


def test_kill_9_mid_task_is_reported_exactly_once_after_restart(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """A SIGKILLed agent, restarted, reports its task once and kills the orphaned process."""
    dk = gw.credential("daemon-kill")
    workflow = gw.create_workflow(dk, script_workflow(steps=300, step_s=0.1))
    agent = launch(agents, tmp_path, gw, dk, "worker-k")
    task_id = submit(gw, dk, workflow)
    agent.wait_log("task accepted", task_id=task_id)
    child = int(agent.wait_log("script started", task_id=task_id)["pid"])
    agent.kill()
    assert _alive(child)  # the crash left the task's process group running
    restarted = start_agent(tmp_path / "worker-k", gw.url, dk, "worker-k")
    agents.append(restarted)
    restarted.wait_log("task restored from the journal", task_id=task_id)
    restarted.wait_log("report acknowledged", task_id=task_id, timeout=30)
    task = record(gw, dk, task_id)
    assert task["task_status"] == "failed"
    assert "agent_restarted" in task["task_error"]
    assert terminal_events(gw, dk, task_id) == ["event: failed"]
    assert not _alive(child)


def test_sigterm_drains_the_running_task_and_new_work_goes_elsewhere(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """SIGTERM finishes the running task and exits 0; a task submitted meanwhile goes elsewhere."""
    dk = gw.credential("daemon-drain")
    workflow = gw.create_workflow(dk, script_workflow(steps=20, step_s=0.1))
    first = launch(agents, tmp_path, gw, dk, "worker-d1")
    running = submit(gw, dk, workflow)
    first.wait_log("task accepted", task_id=running)
    launch(agents, tmp_path, gw, dk, "worker-d2")  # connects after the first took its task
    first.signal(signal.SIGTERM)
    first.wait_log("signal received", phase="draining")
    second = submit(gw, dk, workflow, steps=2)
    assert first.wait(60) == 0
    assert record(gw, dk, running)["task_status"] == "completed"
    assert record(gw, dk, running)["agent_id"] == "worker-d1"
    agents[1].wait_log("report acknowledged", task_id=second)
    assert record(gw, dk, second)["agent_id"] == "worker-d2"


def test_double_sigterm_cancels_and_reports(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """A second SIGTERM cancels the running task, which is reported cancelled before exit 0."""
    dk = gw.credential("daemon-double")
    workflow = gw.create_workflow(dk, script_workflow(steps=300, step_s=0.1))
    agent = launch(agents, tmp_path, gw, dk, "worker-2x")
    task_id = submit(gw, dk, workflow)
    agent.wait_log("task accepted", task_id=task_id)
    agent.signal(signal.SIGTERM)
    agent.wait_log("signal received", phase="draining")
    agent.signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    assert record(gw, dk, task_id)["task_status"] == "cancelled"
    assert terminal_events(gw, dk, task_id) == ["event: cancelled"]


def test_a_refused_credential_exits_4_at_once_without_retrying(
    tmp_path: Path, gw: GatewayProcess
) -> None:
    """A credential the gateway refuses (401) ends the agent with exit code 4 within a second."""
    agent = start_agent(tmp_path / "bad", gw.url, "dk-" + "z" * 43, "bad-agent")
    try:
        started = time.monotonic()
        code = agent.wait(10)
        elapsed = time.monotonic() - started
        assert code == 4
        assert elapsed < 5  # process start included; the refusal itself is immediate
        log = agent.log_text()
        assert log.count("HTTP 401") == 1  # one attempt, no reconnect loop
        assert "z" * 20 not in log  # the secret never reaches the log
    finally:
        agent.stop()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_systemd_hears_ready_watchdog_and_stopping(tmp_path: Path, gw: GatewayProcess) -> None:
    """Under a notify socket the agent sends READY=1 once connected, WATCHDOG=1, then STOPPING=1."""
    dk = gw.credential("daemon-systemd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = tmp_path / "notify.sock"
        sock.bind(str(path))
        sock.settimeout(20)
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        agent = start_agent(tmp_path / "sd", gw.url, dk, "sd-agent", extra_env=env)
        try:
            seen: list[str] = []
            while not any("READY=1" in m for m in seen) or "WATCHDOG=1" not in seen:
                seen.append(sock.recv(4096).decode())
            ready = next(m for m in seen if "READY=1" in m)
            assert "STATUS=connected to" in ready
            agent.signal(signal.SIGTERM)
            while not any("STOPPING=1" in m for m in seen):
                seen.append(sock.recv(4096).decode())
            assert agent.wait(30) == 0
        finally:
            agent.stop()


def test_a_progress_flood_is_coalesced(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """Hundreds of progress steps per second reach the gateway as at most a few per second."""
    dk = gw.credential("daemon-flood")
    workflow = gw.create_workflow(dk, script_workflow(steps=600, step_s=0.002))
    agent = launch(agents, tmp_path, gw, dk, "worker-flood")
    task_id = submit(gw, dk, workflow, steps=600)
    accepted = time.monotonic()
    agent.wait_log("task accepted", task_id=task_id)
    agent.wait_log("report acknowledged", task_id=task_id)
    elapsed = time.monotonic() - accepted
    with gw.client(dk) as http:
        events = http.get(f"/r/tasks/{task_id}/events").text
    progress = events.count("event: progress")
    assert 1 <= progress <= 4 * elapsed + 2  # limits.progress_per_s = 4
    assert '"step_current": 600' in events  # the last value is never lost


def test_a_runtime_that_fails_its_probe_is_not_offered(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """Nerfstudio without a working ns-train is left out; the healthy runtime still takes work."""
    dk = gw.credential("daemon-probe")
    env = {
        "CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__ENABLED": "true",
        "CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__BIN_DIR": str(tmp_path / "no-nerfstudio-here"),
    }
    agent = launch(agents, tmp_path, gw, dk, "worker-probe", **env)
    agent.wait_log("runtime health", healthy=["comfyui"], failing=["nerfstudio"])
    with gw.client(dk) as http:
        (record,) = http.get("/r/agents").json()["agent_list"]
    assert record["agent_status"] == "idle"
    assert "nerfstudio" not in record["agent_labels"]
    assert "comfyui" in record["agent_labels"]
    task_id = submit(gw, dk, gw.create_workflow(dk, script_workflow()))
    agent.wait_log("report acknowledged", task_id=task_id)


def test_a_work_dir_below_min_free_disk_refuses_new_tasks(
    tmp_path: Path, gw: GatewayProcess, agents: list[AgentProcess]
) -> None:
    """Below limits.min_free_disk_bytes a task is rejected (unhealthy) before it is accepted."""
    dk = gw.credential("daemon-disk")
    workflow = gw.create_workflow(dk, script_workflow())
    env = {"CYBERUN_AGENT_LIMITS__MIN_FREE_DISK_BYTES": str(2**60)}  # more than any disk
    agent = launch(agents, tmp_path, gw, dk, "worker-disk", **env)
    task_id = submit(gw, dk, workflow)
    refused = agent.wait_log("task refused", task_id=task_id)
    assert "limits.min_free_disk_bytes" in refused["reason"]
    assert not any(r.get("event") == "task accepted" for r in agent.seen)
    assert record(gw, dk, task_id)["task_status"] in {"pending", "waiting", "queued"}
