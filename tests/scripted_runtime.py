"""A test runtime plugin that runs a REAL subprocess per task (``runtimes.extra``).

It offers the ``comfyui`` tool so the gateway schedules ordinary ComfyUI workflows to it,
but it runs one node of its own: ``{"class_type": "Script", "inputs": {...}}`` with
``steps``, ``step_s``, ``outputs`` (files to write), ``output_bytes``, ``exit_code`` and
``ignore_sigint``. The child prints ``STEP i n`` and ``OUTPUT path`` lines, which become
progress and uploaded outputs; SIGINT makes it exit 130 (an interrupt). Injections apply
to the Script node's inputs like ComfyUI's ``workflow[node].inputs[field]``.

Load it with ``runtimes.extra: ["tests.scripted_runtime:factory"]``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.runtimes.base import (
    Output,
    Progress,
    RuntimeEvents,
    TaskFailure,
    TaskInterrupted,
    TaskSpec,
)
from agent.runtimes.process import GroupIdentity, ManagedProcess, kill_orphan_group

log = structlog.get_logger("tests.scripted")

CHILD = r"""
import json, os, signal, sys, time
args = json.loads(sys.argv[1])
if args.get("ignore_sigint"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
def say(line, stream=sys.stdout):
    # A crashed (SIGKILLed) agent closes the pipe; keep running like a real orphan would.
    try:
        print(line, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
steps = int(args.get("steps", 3))
outputs = int(args.get("outputs", 1))
os.makedirs("outputs", exist_ok=True)
say(f"PID {os.getpid()}")
for i in range(1, steps + 1):
    time.sleep(float(args.get("step_s", 0.05)))
    say(f"STEP {i} {steps}")
for n in range(outputs):
    path = os.path.abspath(f"outputs/out_{n:05d}_.png")
    with open(path, "wb") as handle:
        handle.write(os.urandom(int(args.get("output_bytes", 1000))))
    say(f"OUTPUT {path}")
say("log line to stderr", sys.stderr)
sys.exit(int(args.get("exit_code", 0)))
"""


class ScriptedRuntime:
    """See the module docstring."""

    tool = "comfyui"
    version = "scripted-1"

    def __init__(self) -> None:
        """No process until a task runs."""
        self._running: dict[str, tuple[ManagedProcess, dict[str, bool]]] = {}

    async def start(self) -> None:
        """Nothing to start."""

    async def healthy(self) -> bool:
        """Always ready."""
        return True

    async def prepare(self, spec: TaskSpec, workspace: Path) -> None:
        """Refuse a workflow without exactly one Script node."""
        del workspace
        self._script_inputs(spec)

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Run the child; stream its progress, logs and outputs."""
        inputs = self._script_inputs(spec)
        outputs: list[Output] = []

        def on_line(stream: Any, line: str) -> None:
            parts = line.split(" ", 2)
            if stream == "stdout" and parts[0] == "STEP" and len(parts) == 3:
                step, total = int(parts[1]), int(parts[2])
                events.progress(
                    Progress(step / total, current_node="1", step_current=step, step_total=total)
                )
            elif stream == "stdout" and parts[0] == "OUTPUT" and len(parts) >= 2:
                output = Output(f"1.images.{len(outputs)}", Path(line[7:]), "image/png")
                outputs.append(output)
                events.output(output)
            else:
                events.log(stream, line)

        env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-c", CHILD, json.dumps(inputs)]
        flags = {"interrupted": False}
        async with await ManagedProcess.start(
            argv, cwd=workspace, env=env, on_line=on_line
        ) as process:
            identity = process.identity
            events.handle({"pgid": identity.pgid, "start_time": identity.start_time})
            log.info("script started", task_id=spec.task_id, pid=process.pid)
            self._running[spec.task_id] = (process, flags)
            try:
                code = await process.wait()
            finally:
                self._running.pop(spec.task_id, None)
        if flags["interrupted"]:
            raise TaskInterrupted
        if code != 0:
            raise TaskFailure("script_failed", f"the script exited with {code}", node_id="1")
        return outputs

    async def interrupt(self, spec: TaskSpec) -> None:
        """SIGINT the task's process group (escalating if it does not stop)."""
        entry = self._running.get(spec.task_id)
        if entry is not None:
            process, flags = entry
            flags["interrupted"] = True
            await process.stop(interrupt_grace=5, term_grace=2)

    async def resume(
        self, spec: TaskSpec, workspace: Path, handle: Mapping[str, Any], events: RuntimeEvents
    ) -> list[Output] | None:
        """A subprocess cannot be re-attached: kill what the crashed agent left, and give up."""
        del spec, workspace, events
        if "pgid" in handle:
            kill_orphan_group(GroupIdentity(handle["pgid"], handle["start_time"]), term_grace=2)
        return None

    async def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    def _script_inputs(spec: TaskSpec) -> dict[str, Any]:
        nodes = {
            k: v
            for k, v in spec.workflow.items()
            if isinstance(v, dict) and v.get("class_type") == "Script"
        }
        if len(nodes) != 1:
            raise TaskFailure(
                "invalid_workflow", "the scripted runtime needs exactly one Script node"
            )
        node_id, node = next(iter(nodes.items()))
        inputs = dict(node.get("inputs", {}))
        for injection in spec.injections:
            if injection.node_id == node_id and injection.field:
                inputs[injection.field] = injection.value
        return inputs


def factory(settings: object) -> ScriptedRuntime:
    """The plugin entry point (``runtimes.extra``)."""
    del settings
    return ScriptedRuntime()
