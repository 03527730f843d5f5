"""A real ``cyberun-agent run`` subprocess, configured through its environment, for tests."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTED = "tests.scripted_runtime:factory"
NOISY = ("websockets", "httpcore", "httpx")


def script_workflow(**inputs: Any) -> dict[str, Any]:
    """A workflow body for the scripted test runtime (see tests/scripted_runtime.py)."""
    node = {"class_type": "Script", "inputs": {"steps": 3, "step_s": 0.05, "outputs": 1, **inputs}}
    params = [
        {"key": "steps", "type": "number", "min": 1, "max": 1000, "node_id": "1", "field": "steps"}
    ]
    return {"name": "script", "workflow_json": {"1": node}, "parameters": params}


@dataclass
class AgentProcess:
    """A running agent; its JSON log lines are collected for tests to await."""

    process: subprocess.Popen[str]
    home: Path
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def wait_log(
        self, event: str, timeout: float = 20, since: int = 0, **match: Any
    ) -> dict[str, Any]:
        """Wait for a log record with this ``event`` (and fields); fail after ``timeout``.

        ``since`` skips the first records already seen (``len(agent.seen)`` before an action
        waits for a record that action causes).
        """
        for record in self.seen[since:]:
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                return record
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no log {event!r} {match} within {timeout}s:\n{self.log_text()}"
                )
            try:
                record = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(record)
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                return record

    def log_text(self) -> str:
        """The agent's own recent log records (for failure messages; library chatter left out)."""
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        own = [r for r in self.seen if not str(r.get("logger", "")).startswith(NOISY)]
        return "\n".join(json.dumps(r) for r in own[-60:])

    def signal(self, signum: int) -> None:
        """Send a signal to the agent process."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the agent to exit; return its exit code."""
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the agent (its tasks' process groups survive, as on a real crash)."""
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Make sure the agent is gone (SIGKILL after a short grace)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stderr is not None:
            self.process.stderr.close()


def _pump(stream: Any, lines: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        try:
            record = json.loads(line)
        except ValueError:
            record = {"event": "raw", "text": line.rstrip()}
        lines.put(record if isinstance(record, dict) else {"event": "raw", "text": line})


def agent_cli(
    *args: str, env: dict[str, str], timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``python -m agent ARGS`` (doctor, status…) from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env=env,
    )


def start_agent(
    home: Path,
    gateway_url: str,
    credential: str,
    agent_id: str,
    *,
    extra_env: dict[str, str] | None = None,
) -> AgentProcess:
    """Start ``python -m agent run`` with the scripted runtime and fast protocol timers."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_GATEWAY_URL": gateway_url,
        "CYBERUN_AGENT_CREDENTIAL": credential,
        "CYBERUN_AGENT_AGENT_ID": agent_id,
        "CYBERUN_AGENT_STATE_DIR": str(home / "state"),
        "CYBERUN_AGENT_WORK_DIR": str(home / "work"),
        "CYBERUN_AGENT_CACHE_DIR": str(home / "cache"),
        "CYBERUN_AGENT_RUNTIMES__EXTRA": SCRIPTED,
        "CYBERUN_AGENT_LOG_LEVEL": "debug",
        "CYBERUN_AGENT_LOG_FORMAT": "json",
        "CYBERUN_AGENT_TIMEOUTS__HEARTBEAT_S": "1",
        "CYBERUN_AGENT_TIMEOUTS__RETRANSMIT_S": "1",
        "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "3",
        "CYBERUN_AGENT_OBSERVE__LISTEN": "",  # tests that scrape it pick a free port
        **(extra_env or {}),
    }
    home.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    agent = AgentProcess(process=process, home=home)
    threading.Thread(target=_pump, args=(process.stderr, agent.lines), daemon=True).start()
    return agent
