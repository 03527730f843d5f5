"""Progress flood: a node emitting thousands of progress steps a second → ``task.progress``/s.

Run from the repository root (see bench/README.md)::

    .venv/bin/python -m bench.progress [--seconds 10] [--no-comfyui] [--write] [--check]

One real gateway (``cyberun-gateway serve``, production timeouts) and the real agent daemon
(``cyberun-agent run``, production settings: ``limits.progress_per_s`` at its default, 4), once
per progress source, each in its own team:

- ``scripted``: the scripted test runtime's child process prints a ``STEP i n`` line per step
  (``step_s=0``: as fast as it can), each of which the agent turns into a progress update;
- ``comfyui``: a real CPU ComfyUI 0.3.75 (``tests.comfyui``) running ``EmptyImage →
  CyberunSlowPassthrough (step_s=0) → SaveImage``, whose every step calls
  ``comfy.utils.ProgressBar.update`` and so sends a ``progress`` message on ComfyUI's
  WebSocket to the agent. Skipped with ``--no-comfyui``.

Each source runs one task (one at a time) sized to take about ``--seconds``: a short probe task
first measures how many steps a second the source emits on this machine, unmeasured. The
``task.progress`` messages the agent actually sent are counted at the gateway: every one it
accepts becomes one ``progress`` event on ``GET /r/tasks/{id}/events``, followed live from the
submit on and timestamped on arrival here. The rate is messages over the task's running time
(the ``running`` status event to the ``completed`` one); the node's own rate is the step count
advanced from the first progress message to the furthest one over the time between them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from bench._common import (
    BenchError,
    bench_parser,
    load_average,
    package_versions,
    progress,
    run_benchmark,
    targets,
)
from bench._harness import Followed, create_workflow, follow, rest_client, submit

SECTION = "Progress flood"
TARGET_PER_S = 5.0
START_TIMEOUT_S = 90.0
PROBE_STEPS = 10_000
MAX_STEPS = 100_000  # the test node's and the script parameter's limit
Source = Literal["scripted", "comfyui"]
PRODUCTION_ENV = {
    "CYBERUN_AGENT_LOG_LEVEL": "info",
    "CYBERUN_AGENT_TIMEOUTS__HEARTBEAT_S": "15",
    "CYBERUN_AGENT_TIMEOUTS__RETRANSMIT_S": "5",
    "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "15",
}


def script_body() -> dict[str, Any]:
    """The scripted runtime's workflow: one Script node, ``steps`` a parameter."""
    from tests.agent_process import script_workflow  # noqa: PLC0415

    body = script_workflow(steps=PROBE_STEPS, step_s=0, outputs=1, output_bytes=1000)
    body["parameters"][0]["max"] = MAX_STEPS
    return body


def comfyui_body() -> dict[str, Any]:
    """EmptyImage → CyberunSlowPassthrough (``steps`` a parameter, no sleep) → SaveImage."""
    graph = {
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "4": {
            "class_type": "CyberunSlowPassthrough",
            "inputs": {"image": ["3", 0], "steps": PROBE_STEPS, "step_s": 0.0},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["4", 0], "filename_prefix": "cyberun-flood"},
        },
    }
    steps = {
        "key": "steps",
        "type": "number",
        "min": 1,
        "max": MAX_STEPS,
        "node_id": "4",
        "field": "steps",
    }
    return {"name": "bench-progress", "workflow_json": graph, "parameters": [steps]}


@dataclass
class Flood:
    """One measured task: what its event stream showed."""

    source: Source
    steps: int
    followed: Followed

    @property
    def running_s(self) -> float:
        """The running status event to the completed event, seconds."""
        seen = self.followed.first_seen
        return seen["completed"] - seen["running"]

    @property
    def messages(self) -> int:
        """``task.progress`` messages the gateway accepted for the task."""
        return len(self.followed.progress)

    @property
    def per_s(self) -> float:
        """Messages per second of running time."""
        return self.messages / self.running_s

    @property
    def peak_window(self) -> int:
        """The most messages that arrived within any 1-second window ``[t, t + 1)``."""
        times = [t for t, _ in self.followed.progress]
        best, start = 0, 0
        for end, now in enumerate(times):
            while now - times[start] >= 1.0:
                start += 1
            best = max(best, end - start + 1)
        return best

    @property
    def node_steps_per_s(self) -> float:
        """Steps the node advanced from the first message to the furthest one, per second."""
        stepped = [
            (t, int(data["step_current"]))
            for t, data in self.followed.progress
            if data.get("step_current") is not None
        ]
        if len(stepped) < 2:
            return 0.0
        (t0, first), (t1, furthest) = stepped[0], max(stepped, key=lambda one: one[1])
        return (furthest - first) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class Results:
    """Every source's flood, and the load around the runs."""

    floods: list[Flood] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    def verdicts(self) -> dict[str, bool]:
        """Return each target and whether it was met."""
        return {
            f"`{flood.source}`: task.progress ≤ {TARGET_PER_S:g} msgs/s/task (mean over the "
            "run)": flood.per_s <= TARGET_PER_S
            for flood in self.floods
        }


async def run_task(
    http: httpx.AsyncClient, workflow: str, steps: int, timeout_s: float
) -> Followed:
    """Run one task with ``steps`` steps; return its event stream."""
    sent = await submit(http, workflow, parameters={"steps": steps})
    followed = await follow(http, sent.task_id, timeout_s)
    if followed.terminal != "completed" or "running" not in followed.first_seen:
        raise BenchError(f"{sent.task_id} ended {followed.terminal}")
    return followed


async def flood(
    api: str, credential: str, source: Source, body: dict[str, Any], seconds: float
) -> Flood:
    """Probe the source's step rate, then run one task of about ``seconds``."""
    async with rest_client(api, credential) as http:
        workflow = await create_workflow(http, body)
        probe = Flood(source, PROBE_STEPS, await run_task(http, workflow, PROBE_STEPS, 120))
        rate = probe.node_steps_per_s or PROBE_STEPS / probe.running_s
        steps = max(PROBE_STEPS, min(MAX_STEPS, int(rate * seconds)))
        progress(f"{source}: ~{rate:.0f} steps/s in the probe; running {steps} steps")
        measured = await run_task(http, workflow, steps, max(120.0, 10 * seconds))
        return Flood(source, steps, measured)


@contextlib.contextmanager
def comfyui(workdir: Path, wanted: bool) -> Iterator[str | None]:
    """Yield a real ComfyUI's URL (installed and started here), or ``None`` when not wanted."""
    if not wanted:
        yield None
        return
    from tests.comfyui import ComfyUIError, install_comfyui, start_comfyui  # noqa: PLC0415

    try:
        server = start_comfyui(install_comfyui(), workdir / "comfyui")
    except ComfyUIError as error:
        raise BenchError(f"ComfyUI: {error}") from error
    with server:
        yield server.url


def run(args: argparse.Namespace, workdir: Path) -> Results:
    """Start the servers; per source start an agent, flood, stop it."""
    from tests.agent_process import start_agent  # noqa: PLC0415
    from tests.gateway_process import gateway  # noqa: PLC0415

    results = Results()
    with (
        comfyui(workdir, not args.no_comfyui) as comfy_url,
        gateway(workdir / "gateway", timeout=START_TIMEOUT_S) as gw,
    ):
        sources: list[tuple[Source, dict[str, str], dict[str, Any]]] = [
            ("scripted", {}, script_body())
        ]
        if comfy_url is not None:
            env = {
                "CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": comfy_url,
                "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
            }
            sources.append(("comfyui", env, comfyui_body()))
        results.load.append(load_average())
        for source, env, body in sources:
            dk = gw.credential(f"flood-{source}")
            agent = start_agent(
                workdir / source, gw.url, dk, f"flood-{source}", extra_env=PRODUCTION_ENV | env
            )
            try:
                agent.wait_log("connected to the gateway", timeout=START_TIMEOUT_S)
                results.floods.append(asyncio.run(flood(gw.api, dk, source, body, args.seconds)))
            finally:
                agent.stop()
        results.load.append(load_average())
    return results


def render_table(results: Results) -> str:
    """Return the results as a markdown table followed by the targets and notes."""
    labels = {
        "scripted": "scripted runtime (a `STEP` line per step)",
        "comfyui": "ComfyUI node (`ProgressBar.update` per step)",
    }
    lines = [
        (
            "| Progress source | Steps | Node steps/s | Running s | task.progress sent "
            "| Msgs/s (mean) | Most in any 1 s | Steps per message |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for one in results.floods:
        per_message = one.steps / one.messages if one.messages else 0.0
        lines.append(
            f"| {labels[one.source]} | {one.steps} | {one.node_steps_per_s:.0f} "
            f"| {one.running_s:.2f} | {one.messages} | {one.per_s:.2f} | {one.peak_window} "
            f"| {per_message:.0f} |"
        )
    lines += targets(results.verdicts())
    lines += [
        "",
        "Notes:",
        "",
        (
            "- counted at the gateway: one `progress` SSE event per `task.progress` it accepted, "
            "timestamped on arrival at the benchmark; the agent's limit is "
            "`limits.progress_per_s` = 4 (default), plus the final value flushed when a task ends"
        ),
        (
            '- "most in any 1 s" is the largest count within any window [t, t + 1 s) of '
            "arrival times at the benchmark (network delays can bunch arrivals a little)"
        ),
    ]
    if len(results.load) == 2:
        lines.append(
            f"- 1-minute load average before / after the runs: {results.load[0]:.2f} / "
            f"{results.load[1]:.2f}"
        )
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """Return the paragraph that introduces the results section."""
    return (
        f"One task per progress source, sized to run about {args.seconds:g} s with the source "
        "emitting steps as fast as it can, through the real agent daemon (production settings) "
        "to a real gateway on loopback: `python -m bench.progress --seconds "
        f"{args.seconds:g}{' --no-comfyui' if args.no_comfyui else ''} --write`."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = bench_parser("progress", __doc__)
    parser.add_argument(
        "--seconds", type=float, default=10, help="about how long each flood runs (10)"
    )
    parser.add_argument("--no-comfyui", action="store_true", help="skip the ComfyUI source")
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code (1: error or, with --check, a missed target)."""
    args = parse_args(argv)
    return run_benchmark(
        SECTION,
        lambda tmp: run(args, tmp),
        render_table,
        intro=describe(args),
        write=args.write,
        check=args.check,
        verdicts=lambda results: results.verdicts(),
        extra=lambda: [f"- ComfyUI 0.3.75 (CPU); {package_versions('websockets')}"],
    )


if __name__ == "__main__":
    sys.exit(main())
