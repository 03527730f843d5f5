"""An agent whose ``work_dir`` is a tiny private tmpfs, and a runtime that can fill it.

:func:`start_agent_on_tmpfs` starts ``python -m agent run`` like
:func:`tests.agent_process.start_agent`, but inside a private mount namespace
(``unshare --mount``, or ``unshare --user --map-root-user --mount`` where plain root cannot)
where a tmpfs of a few MiB is mounted on its ``work_dir`` first. The mount lives and dies
with the agent process; the test sees it through ``/proc/<pid>/root`` (:meth:`TmpfsAgent.work`).

:class:`WriterRuntime` (``runtimes.extra: ["tests.reliability.tmpfs:factory"]``) offers the
``comfyui`` tool and writes each task's output file *from inside the agent process*, into
the task's workspace, as the ComfyUI runtime does when it fetches an output over ``/view``:
a full disk there is the agent's own ``OSError(ENOSPC)``, which the runner reports as
``disk_full`` (a subprocess runtime only sees its child exit non-zero). Its one node is
``{"class_type": "Write", "inputs": {"output_bytes": N}}``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.runtimes.base import Output, RuntimeEvents, TaskFailure, TaskSpec
from tests.agent_process import ROOT, AgentProcess, _pump

log = structlog.get_logger("tests.writer")

WRITER = "tests.reliability.tmpfs:factory"
CHUNK = 64 * 1024
UNSHARE_VARIANTS: tuple[tuple[str, ...], ...] = (
    ("unshare", "--mount", "--propagation", "private"),
    ("unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"),
)
MOUNT = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"'


def writer_workflow(output_bytes: int) -> dict[str, Any]:
    """A workflow body for :class:`WriterRuntime` that writes one file of ``output_bytes``."""
    node = {"class_type": "Write", "inputs": {"output_bytes": output_bytes}}
    return {"name": f"write-{output_bytes}", "workflow_json": {"1": node}}


def private_mount_prefix() -> tuple[str, ...]:
    """The first ``unshare`` variant that can mount a private tmpfs here.

    Raises ``AssertionError`` naming what each variant answered (the tests never skip).
    """
    answers = []
    for variant in UNSHARE_VARIANTS:
        with tempfile.TemporaryDirectory(prefix="tmpfs-probe-") as target:
            argv = [*variant, "sh", "-c", MOUNT, "sh", "64k", target, "true"]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            except FileNotFoundError as error:
                answers.append(f"{' '.join(variant)}: {error}")
                continue
        if done.returncode == 0:
            return variant
        answers.append(f"{' '.join(variant)}: exit {done.returncode}: {done.stderr.strip()}")
    raise AssertionError(
        "cannot mount a private tmpfs for the disk-full test (it needs root, or unprivileged "
        "user namespaces, and util-linux's unshare):\n" + "\n".join(answers)
    )


@dataclass
class TmpfsAgent:
    """An agent process whose ``work_dir`` is a private tmpfs."""

    agent: AgentProcess
    work_dir: Path

    def work(self) -> Path:
        """The tmpfs as this (outer) mount namespace can reach it: via the agent's root."""
        return Path(f"/proc/{self.agent.process.pid}/root") / self.work_dir.relative_to("/")

    def free_bytes(self) -> int:
        """Free space on the tmpfs now."""
        stats = os.statvfs(self.work())
        return stats.f_bavail * stats.f_frsize


def start_agent_on_tmpfs(
    home: Path,
    gateway_url: str,
    credential: str,
    agent_id: str,
    *,
    size: str,
    extra_env: dict[str, str] | None = None,
) -> TmpfsAgent:
    """Start ``python -m agent run`` (the writer runtime) with ``work_dir`` on a ``size`` tmpfs."""
    work_dir = (home / "work").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_GATEWAY_URL": gateway_url,
        "CYBERUN_AGENT_CREDENTIAL": credential,
        "CYBERUN_AGENT_AGENT_ID": agent_id,
        "CYBERUN_AGENT_STATE_DIR": str(home / "state"),
        "CYBERUN_AGENT_WORK_DIR": str(work_dir),
        "CYBERUN_AGENT_CACHE_DIR": str(home / "cache"),
        "CYBERUN_AGENT_RUNTIMES__EXTRA": WRITER,
        "CYBERUN_AGENT_LOG_LEVEL": "debug",
        "CYBERUN_AGENT_LOG_FORMAT": "json",
        "CYBERUN_AGENT_TIMEOUTS__HEARTBEAT_S": "1",
        "CYBERUN_AGENT_TIMEOUTS__RETRANSMIT_S": "1",
        "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "3",
        "CYBERUN_AGENT_OBSERVE__LISTEN": "",
        **(extra_env or {}),
    }
    argv = [
        *private_mount_prefix(),
        "sh",
        "-c",
        MOUNT,
        "sh",
        size,
        str(work_dir),
        sys.executable,
        "-m",
        "agent",
        "run",
    ]
    # unshare and sh both exec: the Popen's pid is the agent itself (SIGKILL reaches it)
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    agent = AgentProcess(process=process, home=home)
    threading.Thread(target=_pump, args=(process.stderr, agent.lines), daemon=True).start()
    return TmpfsAgent(agent, work_dir)


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        left = size
        while left > 0:
            handle.write(os.urandom(min(CHUNK, left)))
            left -= CHUNK


class WriterRuntime:
    """See the module docstring."""

    tool = "comfyui"
    version = "writer-1"

    async def start(self) -> None:
        """Nothing to start."""

    async def healthy(self) -> bool:
        """Always ready."""
        return True

    async def prepare(self, spec: TaskSpec, workspace: Path) -> None:
        """Refuse a workflow without a Write node."""
        del workspace
        self._size(spec)

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Write the output file from this process (an ``OSError`` propagates as is)."""
        size = self._size(spec)
        log.info("writer started", task_id=spec.task_id, attempt=spec.attempt, size=size)
        path = workspace / "outputs" / "out.bin"
        await asyncio.to_thread(_write, path, size)
        output = Output("1.files.0", path, "application/octet-stream")
        events.output(output)
        return [output]

    async def interrupt(self, spec: TaskSpec) -> None:
        """A write of a few MiB ends on its own within milliseconds."""

    async def resume(
        self, spec: TaskSpec, workspace: Path, handle: Mapping[str, Any], events: RuntimeEvents
    ) -> list[Output] | None:
        """Nothing to re-attach to."""
        return None

    async def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    def _size(spec: TaskSpec) -> int:
        for node in spec.workflow.values():
            if isinstance(node, dict) and node.get("class_type") == "Write":
                return int(node.get("inputs", {}).get("output_bytes", 0))
        raise TaskFailure("invalid_workflow", "the writer runtime needs a Write node")


def factory(settings: object) -> WriterRuntime:
    """The plugin entry point (``runtimes.extra``)."""
    del settings
    return WriterRuntime()
