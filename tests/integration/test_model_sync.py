"""Model sync end to end: the real gateway on real S3 and the real agent daemon.

A model is registered through the REST API (presign, PUT to SeaweedFS, register); the agent
pulls it at connect from its presigned URL, places it under ``models.dir``, runs a task that
requires it, and drops it (within a zero budget) when it is disabled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_process import ROOT, AgentProcess, agent_cli, script_workflow, start_agent
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway
from tests.seaweedfs import SeaweedFS

MIB = 1024 * 1024


@pytest.fixture
def gw(tmp_path: Path, seaweedfs: SeaweedFS) -> Iterator[GatewayProcess]:
    """A gateway storing on the real S3 server."""
    env = {
        "CYBERUN_GATEWAY_S3_ACCESS_KEY": seaweedfs.access_key,
        "CYBERUN_GATEWAY_S3_SECRET_KEY": seaweedfs.secret_key,
    }
    s3 = ("--s3-endpoint", seaweedfs.endpoint_url, "--s3-bucket", "models-e2e")
    with gateway(tmp_path / "gw", *s3, *FAST_TIMEOUTS, env=env) as proc:
        yield proc


def register(gw: GatewayProcess, dk: str, content: bytes, path: str) -> dict[str, Any]:
    """Presign, upload and register a model; return its record."""
    kind, _, rest = path.partition("/")
    body = {
        "model_type": kind,
        "model_path": rest,
        "file_size": len(content),
        "file_hash": "sha256:" + hashlib.sha256(content).hexdigest(),
    }
    with gw.client(dk) as http:
        slot = http.post("/models/presign", json=body).json()
        put = httpx.put(slot["upload_url"], content=content, headers=slot["upload_headers"])
        assert put.status_code == 200, put.text
        answer = http.post("/models", json=body)
    assert answer.status_code == 201, answer.text
    record: dict[str, Any] = answer.json()
    return record


def test_an_agent_pulls_places_uses_and_drops_the_teams_model(
    tmp_path: Path, gw: GatewayProcess
) -> None:
    """Sync at connect, the placed file, a task that needs it, eviction on disable."""
    dk = gw.credential("models-team")
    content = os.urandom(5 * MIB)
    model = register(gw, dk, content, "checkpoints/tiny.safetensors")
    models_dir = tmp_path / "comfy-models"
    env = {
        "CYBERUN_AGENT_MODELS__DIR": str(models_dir),
        "CYBERUN_AGENT_MODELS__BUDGET_BYTES": "0",  # keep only the team's set
    }
    agent: AgentProcess = start_agent(tmp_path / "agent", gw.url, dk, "model-agent", extra_env=env)
    try:
        synced = agent.wait_log("models synced", timeout=60)
        assert synced["fetched"] == 1
        placed = models_dir / "checkpoints" / "tiny.safetensors"
        assert placed.read_bytes() == content
        workflow = gw.create_workflow(
            dk, {**script_workflow(), "required_models": ["checkpoints/tiny.safetensors"]}
        )
        with gw.client(dk) as http:
            task_id = http.post(f"/r/workflows/{workflow}/run", json={}).json()["task_id"]
        agent.wait_log("report acknowledged", task_id=task_id)
        with gw.client(dk) as http:
            assert http.get(f"/r/tasks/{task_id}").json()["task_status"] == "completed"
            seen = len(agent.seen)
            answer = http.patch(f"/models/{model['id']}", json={"model_status": "disabled"})
            assert answer.status_code == 200, answer.text
        dropped = agent.wait_log("models synced", since=seen, timeout=30)
        assert dropped["evicted"] == 1
        assert not placed.exists()
    finally:
        agent.stop()


def test_models_sync_command_pulls_the_set_once(tmp_path: Path, gw: GatewayProcess) -> None:
    """`models sync --json` fetches and places the team's set; a second run fetches nothing."""
    dk = gw.credential("models-cli")
    content = os.urandom(2 * MIB)
    register(gw, dk, content, "loras/style.safetensors")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_GATEWAY_URL": gw.url,
        "CYBERUN_AGENT_CREDENTIAL": dk,
        "CYBERUN_AGENT_STATE_DIR": str(tmp_path / "state"),
        "CYBERUN_AGENT_CACHE_DIR": str(tmp_path / "cache"),
        "CYBERUN_AGENT_MODELS__DIR": str(tmp_path / "models"),
    }
    first = agent_cli("models", "sync", "--json", env=env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["models"] == 1
    assert len(report["fetched"]) == 1
    assert (tmp_path / "models" / "loras" / "style.safetensors").read_bytes() == content
    again = json.loads(agent_cli("models", "sync", "--json", env=env).stdout)
    assert again["fetched"] == []
    assert dk not in first.stdout + first.stderr
