"""The gateway's command line, and a gateway restart with a task in flight."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent.protocol.messages import ResumeAction, TaskRef
from tests.gateway_process import FAST_TIMEOUTS, comfy_workflow, gateway, run_cli
from tests.simagent import SimAgent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_serve_with_zero_config_prints_a_working_url(tmp_path: Path) -> None:
    """`serve` needs no configuration: it prints its URL, which answers at once."""
    with gateway(tmp_path / "data") as proc:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proc.url)
        assert httpx.get(f"{proc.url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{proc.url}/openapi.json").json()["info"]["title"]
        assert (tmp_path / "data" / "gateway.sqlite3").exists()


def test_credentials_create_prints_only_the_secret_and_stores_a_hash(tmp_path: Path) -> None:
    """`credentials create` prints one secret of the asked kind; the database never holds it."""
    data = str(tmp_path)
    for kind, prefix in (("device", "dk-"), ("integration", "sk-"), ("agent", "ak-")):
        out = run_cli("credentials", "create", "--data-dir", data, "--team", "acme", "--kind", kind)
        secret = out.strip()
        assert out == secret + "\n"
        assert secret.startswith(prefix)
        assert len(secret) > 40
        assert secret.encode() not in (tmp_path / "gateway.sqlite3").read_bytes()


def test_workflows_import_from_a_file_then_over_rest(tmp_path: Path) -> None:
    """A workflow imported from a file is served over REST; re-importing its slug adds a version."""
    body = comfy_workflow(workflow_slug="from-file")
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    data = str(tmp_path / "data")
    first = run_cli("workflows", "import", str(path), "--data-dir", data, "--team", "acme").strip()
    again = json.loads(
        run_cli("workflows", "import", str(path), "--data-dir", data, "--team", "acme", "--json")
    )
    assert again == {"id": first, "version": 2}
    with gateway(tmp_path / "data") as proc:
        dk = proc.credential("acme")
        with proc.client(dk) as http:
            assert http.get(f"/r/workflows/{first}").json()["workflow_slug"] == "from-file"
            imported = http.post("/workflows/import", json={**body, "description": "v3"})
            assert (imported.status_code, imported.json()["version"]) == (201, 3)


def test_workflows_import_of_a_bad_file_names_the_key(tmp_path: Path) -> None:
    """A workflow file with a bad value fails with a message naming the key."""
    path = tmp_path / "wf.yaml"
    path.write_text("name: x\nworkflow_json: {}\ntask_timeout: -5\n", encoding="utf-8")
    command = [sys.executable, "-m", "gateway.cli", "workflows", "import", str(path)]
    done = subprocess.run(
        [*command, "--data-dir", str(tmp_path), "--team", "t"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    assert "task_timeout" in done.stderr


@pytest.mark.asyncio
async def test_restart_with_a_task_in_flight_resumes_and_completes_once(tmp_path: Path) -> None:
    """A gateway restarted mid-task lets the reconnecting agent continue and complete it once."""
    port = str(free_port())
    data = tmp_path / "data"
    with gateway(data, "--port", port, *FAST_TIMEOUTS) as proc:
        dk = proc.credential("restart")
        workflow = proc.create_workflow(dk, comfy_workflow())
        agent = SimAgent(proc.ws_url, dk, "survivor")
        await agent.connect()
        with proc.client(dk) as http:
            task_id = http.post(f"/r/workflows/{workflow}/run").json()["task_id"]
        assign = await agent.next_assign()
        ws_url = proc.ws_url
    await agent.close()  # the gateway is gone; the agent keeps its task
    with gateway(data, "--port", port, *FAST_TIMEOUTS) as proc:
        assert proc.ws_url == ws_url
        await agent.connect()
        assert agent.welcome is not None
        assert [(r.task_id, r.action) for r in agent.welcome.resume] == [
            (task_id, ResumeAction.CONTINUE)
        ]
        await agent.complete(TaskRef(task_id=assign.task_id, attempt=assign.attempt))
        await agent.wait_acknowledged()
        await agent.close()
        with proc.client(dk) as http:
            record = http.get(f"/r/tasks/{task_id}").json()
            events = http.get(f"/r/tasks/{task_id}/events").text
    assert (record["task_status"], record["retry_count"]) == ("completed", 0)
    assert events.count("event: completed") == 1
