"""A real ``cyberun-gateway serve`` subprocess on a free loopback port, for tests."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

READY = "cyberun-gateway listening on "
FAST_TIMEOUTS = ("--ack-timeout", "1.5", "--lease-ttl", "3", "--heartbeat", "0.5")


def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``cyberun-gateway`` with ``args`` and return its stdout (fails on non-zero exit)."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class GatewayProcess:
    """A running gateway and helpers to provision it."""

    url: str
    data_dir: Path
    process: subprocess.Popen[str]
    log_file: Path

    @property
    def api(self) -> str:
        """The REST base URL."""
        return f"{self.url}/api/v1"

    @property
    def ws_url(self) -> str:
        """The agent endpoint."""
        return self.url.replace("http://", "ws://") + "/agent/v1/ws"

    def credential(self, team: str, kind: str = "device") -> str:
        """Mint a credential through the real CLI."""
        return run_cli(
            "credentials",
            "create",
            "--data-dir",
            str(self.data_dir),
            "--team",
            team,
            "--kind",
            kind,
        ).strip()

    def client(self, credential: str) -> httpx.Client:
        """An HTTP client authenticated with ``credential``."""
        return httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {credential}"}, timeout=30
        )

    def create_workflow(self, credential: str, body: dict[str, Any]) -> str:
        """Create a workflow over REST and return its id."""
        with self.client(credential) as http:
            answer = http.post("/workflows", json=body)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def logs(self) -> str:
        """What the gateway wrote to stderr so far."""
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait, SIGKILL if needed; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def _pump(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@contextmanager
def gateway(
    data_dir: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 30
) -> Iterator[GatewayProcess]:
    """Start ``cyberun-gateway serve --port 0`` and yield once it printed its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "gateway.log"
    with log_file.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {})},
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    proc = GatewayProcess(url="", data_dir=data_dir, process=process, log_file=log_file)
    try:
        proc.url = _wait_ready(lines, process, timeout, log_file)
        yield proc
    finally:
        proc.stop()


def _wait_ready(
    lines: queue.Queue[str], process: subprocess.Popen[str], timeout: float, log: Path
) -> str:
    try:
        while True:
            line = lines.get(timeout=timeout)
            if line.startswith(READY):
                return line[len(READY) :].strip()
    except queue.Empty:
        process.kill()
        raise AssertionError(f"gateway did not start in {timeout}s:\n{log.read_text()}") from None


def run_workflow(gw: GatewayProcess, dk: str, workflow: str, **body: Any) -> str:
    """``POST /r/workflows/{workflow}/run`` with this body; assert 202, return the task id."""
    with gw.client(dk) as http:
        answer = http.post(f"/r/workflows/{workflow}/run", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["task_id"])


def submit_workflow(gw: GatewayProcess, dk: str, workflow: str, **parameters: Any) -> str:
    """Run the workflow with these parameters and return the task id."""
    return run_workflow(gw, dk, workflow, parameters=parameters)


def task_record(gw: GatewayProcess, dk: str, task_id: str) -> dict[str, Any]:
    """The task record at the gateway."""
    with gw.client(dk) as http:
        found: dict[str, Any] = http.get(f"/r/tasks/{task_id}").json()
    return found


def comfy_workflow(parameters: Sequence[dict[str, Any]] = (), **extra: Any) -> dict[str, Any]:
    """A small ComfyUI API workflow body (EmptyImage → ImageInvert → SaveImage)."""
    graph = {
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
        },
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "out"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    }
    return {"name": "invert", "workflow_json": graph, "parameters": list(parameters), **extra}


def dumps(value: Any) -> str:
    """Compact JSON."""
    return json.dumps(value, separators=(",", ":"))
