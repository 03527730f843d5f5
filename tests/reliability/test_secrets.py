"""No credential and no presigned signature leaks anywhere (issue 13, part 3).

The real gateway and the real agent (scripted runtime, DEBUG logging, observe endpoint on)
run one successful task with an input and two outputs and one failing task. Then every
place a secret could surface is searched for the device credential (and its secret part)
and for the signature of every presigned URL the gateway handed out (presign answer and
result download URLs): the agent's whole stderr log, the gateway's log, each task's record,
error and SSE history, the agent's ``/status`` and ``/metrics``, and ``cyberun-agent status``
(table and ``--json``). Signatures the test never saw (the input download URL and upload
URLs the gateway sent only to the agent) are caught by a second rule: any
``Signature=``/``sig=`` value that is not masked.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.agent_process import ROOT, AgentProcess, agent_cli, start_agent
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway

SIGNATURE_KEYS = ("X-Amz-Signature", "Signature", "sig", "X-Amz-Credential")
UNMASKED = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])(X-Amz-Signature|Signature|sig)=(?!\*\*\*)([^&\s\"'\\<>]+)"
)


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[GatewayProcess, str, AgentProcess, str]]:
    """Gateway, device credential, agent at DEBUG with its observe endpoint, endpoint URL."""
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as gw:
        dk = gw.credential("secrets")
        port = free_port()
        env = {
            "CYBERUN_AGENT_OBSERVE__LISTEN": f"127.0.0.1:{port}",
            "CYBERUN_AGENT_LOG_LEVEL": "debug",
        }
        agent = start_agent(tmp_path / "agent", gw.url, dk, "secret-agent", extra_env=env)
        try:
            agent.wait_log("connected to the gateway", timeout=60)
            agent.wait_log("observe endpoint listening")
            yield gw, dk, agent, f"http://127.0.0.1:{port}"
        finally:
            agent.stop()


def signatures(url: str) -> list[str]:
    """The signature-bearing query values of a presigned URL."""
    query = parse_qs(urlsplit(url).query)
    return [v for key in SIGNATURE_KEYS for v in query.get(key, []) if len(v) >= 8]


def run_task(http: httpx.Client, workflow: str, parameters: dict[str, Any]) -> str:
    """Submit a run; return the task id."""
    answer = http.post(f"/r/workflows/{workflow}/run", json={"parameters": parameters})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["task_id"])


def test_no_credential_or_signature_appears_in_any_log_answer_or_event(
    stack: tuple[GatewayProcess, str, AgentProcess, str],
) -> None:
    """After a full task and a failing one, no dk- secret or URL signature is visible anywhere."""
    gw, dk, agent, observe = stack
    body: dict[str, Any] = {
        "name": "secrets",
        "workflow_json": {
            "1": {
                "class_type": "Script",
                "inputs": {
                    "steps": 2,
                    "step_s": 0.01,
                    "outputs": 2,
                    "output_bytes": 512,
                    "image": "",
                    "exit_code": 0,
                },
            }
        },
        "parameters": [
            {"key": "image", "type": "file", "node_id": "1", "field": "image"},
            {
                "key": "exit_code",
                "type": "number",
                "node_id": "1",
                "field": "exit_code",
                "default": 0,
            },
        ],
    }
    workflow = gw.create_workflow(dk, body)
    secrets = {dk, dk.removeprefix("dk-")}
    payload = os.urandom(2048)
    with gw.client(dk) as http:
        slot = http.post(
            "/r/files/presign",
            json={"file_name": "in.png", "file_size": len(payload), "content_type": "image/png"},
        )
        assert slot.status_code == 200, slot.text
        presign = slot.json()
        assert signatures(presign["upload_url"]), presign["upload_url"]
        secrets.update(signatures(presign["upload_url"]))
        put = httpx.put(presign["upload_url"], content=payload, headers=presign["upload_headers"])
        assert put.status_code < 300, put.text
        good = run_task(http, workflow, {"image": presign["file_key"]})
        agent.wait_log("report acknowledged", task_id=good, timeout=60)
        bad = run_task(http, workflow, {"image": presign["file_key"], "exit_code": 3})
        agent.wait_log("report acknowledged", task_id=bad, timeout=60)
        result = http.get(f"/r/tasks/{good}/result").json()
        assert result["task_status"] == "completed", result
        assert len(result["download_urls"]) == 2
        for url in result["download_urls"].values():
            found = signatures(url)
            assert found, f"no signature in a download URL: {url}"  # the test sees what to seek
            secrets.update(found)
            assert httpx.get(url).status_code == 200
        failed = http.get(f"/r/tasks/{bad}").json()
        assert failed["task_status"] == "failed", failed
        assert "exited with 3" in failed["task_error"]
        texts = {
            "task records": json.dumps([http.get(f"/r/tasks/{t}").json() for t in (good, bad)]),
            "SSE history": "\n".join(http.get(f"/r/tasks/{t}/events").text for t in (good, bad)),
        }
    texts["agent /status"] = httpx.get(f"{observe}/status").text
    texts["agent /metrics"] = httpx.get(f"{observe}/metrics").text
    cli_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(agent.home),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_OBSERVE__LISTEN": observe.removeprefix("http://"),
    }
    for args in (("status",), ("status", "--json")):
        shown = agent_cli(*args, env=cli_env, timeout=30)
        assert shown.returncode == 0, shown.stderr
        texts[f"cyberun-agent {' '.join(args)}"] = shown.stdout + shown.stderr
    agent.wait_log("task reported", task_id=bad)  # logged before the ack: in the log by now
    while not agent.lines.empty():
        agent.seen.append(agent.lines.get_nowait())
    texts["agent log"] = "\n".join(json.dumps(r) for r in agent.seen)
    texts["gateway log"] = gw.logs()
    assert len(texts["agent log"]) > 10_000  # DEBUG really was on: plenty to search
    assert any(r.get("level") == "debug" for r in agent.seen)
    assert len(secrets) >= 5  # dk, its secret part, the presign's and two results' signatures
    assert UNMASKED.findall("GET http://h/o?a=1&X-Amz-Signature=0123abcd")  # the rule bites
    assert not UNMASKED.findall("GET http://h/o?a=1&X-Amz-Signature=***")
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}…) appears in the {where}"
        leaked = UNMASKED.findall(text)
        assert not leaked, f"an unmasked signature appears in the {where}: {leaked[:3]}"
