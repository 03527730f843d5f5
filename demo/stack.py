"""The demo's processes: the reference gateway and an agent with a managed ComfyUI.

Each runs in a session of its own, so a Ctrl-C in the terminal reaches only the demo, which
then stops them in order: the agent (it stops its ComfyUI), then the gateway. Anything still
alive afterwards whose command line names the demo's data directory is killed too, so an
interrupted demo leaves no process behind. Their logs go to ``<data_dir>/logs/``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

READY = "cyberun-gateway listening on "
STOP_GRACE_S = 20.0
KILL_WAIT_S = 5.0


class StackError(RuntimeError):
    """A process of the demo did not start; the message says where its log is."""


@dataclass
class Stack:
    """The running processes, stopped by :meth:`stop` (idempotent)."""

    data_dir: Path
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        """Where the processes' logs are."""
        return self.data_dir / "logs"

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], *, pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start a process in its own session; stderr (and stdout unless piped) to its log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        self.logs.append(log)
        process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            argv,
            stdout=subprocess.PIPE if pipe else log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        self.processes.append((name, process))
        return process

    def start_gateway(self, port: int, timeout: float = 60.0) -> str:
        """``cyberun-gateway serve`` on ``port`` (0: any); return its URL once it listens."""
        data = str(self.data_dir / "gateway")
        argv = [*python(), "-m", "gateway.cli", "serve", "--port", str(port), "--data-dir", data]
        process = self.spawn("gateway", argv, dict(os.environ), pipe=True)
        if process.stdout is None:  # pragma: no cover - pipe=True always gives one
            raise StackError("the gateway's stdout is not a pipe")
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([process.stdout], [], [], remaining)
            line = process.stdout.readline().decode("utf-8", "replace") if readable else ""
            if line.startswith(READY):
                return line[len(READY) :].strip()
            if readable and not line:
                break  # end of file: the gateway exited
        raise StackError(f"the gateway did not start; see {self.log_dir / 'gateway.log'}")

    def gateway_cli(self, *args: str) -> str:
        """Run a ``cyberun-gateway`` command against the demo's data dir; return its stdout."""
        done = subprocess.run(  # noqa: S603 - our own argv, no shell
            [*python(), "-m", "gateway.cli", *args, "--data-dir", str(self.data_dir / "gateway")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode:
            raise StackError(f"cyberun-gateway {args[0]} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def start_agent(
        self, gateway_url: str, credential: str, comfyui_python: Path, comfyui_main: Path
    ) -> None:
        """``cyberun-agent run`` launching and supervising a CPU ComfyUI."""
        state = self.data_dir / "agent"
        launch = "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__"
        env = {
            **os.environ,
            "CYBERUN_AGENT_GATEWAY_URL": gateway_url,
            "CYBERUN_AGENT_CREDENTIAL": credential,
            "CYBERUN_AGENT_AGENT_ID": AGENT_ID,
            "CYBERUN_AGENT_STATE_DIR": str(state),
            "CYBERUN_AGENT_CACHE_DIR": str(state / "cache"),
            "CYBERUN_AGENT_LOG_FORMAT": "json",
            launch + "PYTHON": str(comfyui_python),
            launch + "MAIN": str(comfyui_main),
            launch + "PORT": str(free_port()),
            launch + "BASE_DIRECTORY": str(self.data_dir / "comfyui"),
            launch + "ARGS": '["--cpu", "--database-url", "sqlite:///:memory:"]',
            "CYBERUN_AGENT_TIMEOUTS__RUNTIME_READY_S": "300",
        }
        env.pop("CYBERUN_AGENT_CONFIG", None)
        self.spawn("agent", [*python(), "-m", "agent", "run"], env)

    def stop(self) -> None:
        """Stop every process, newest first (SIGTERM, then SIGKILL of its session)."""
        while self.processes:
            _, process = self.processes.pop()
            _stop(process)
        for log in self.logs:
            log.close()
        self.logs.clear()
        reap((str(self.data_dir / "comfyui"), str(self.data_dir / "gateway")))

    def alive(self) -> list[str]:
        """Names of the processes that have exited unexpectedly (empty: all running)."""
        return [name for name, p in self.processes if p.poll() is not None]


AGENT_ID = "demo-agent"


def python() -> list[str]:
    """This interpreter (the project venv's)."""
    return [sys.executable]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        # the agent drains on the first SIGTERM and cancels on the second; idle, both are quick
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S / 2)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_GRACE_S / 2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its session
    try:
        process.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
    if process.stdout is not None:
        process.stdout.close()


def reap(markers: tuple[str, ...]) -> list[int]:
    """Kill this user's processes whose command line names one of ``markers``; return pids.

    The demo itself and its ancestors (a shell or ``timeout`` that ran it with those paths
    on its command line) are spared.
    """
    killed = []
    spared = _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            )
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if any(marker in cmdline for marker in markers):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return killed


def _ancestors() -> set[int]:
    """This process and its ancestors."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: ppid
    return pids
