"""Agent overhead: one ComfyUI workflow run directly against ComfyUI, and through the agent.

Run from the repository root (see bench/README.md)::

    .venv/bin/python -m bench.overhead [--runs 7] [--warmup 1] [--steps 20] [--step-s 0.1] \
        [--size 1024] [--write] [--check]

One real CPU ComfyUI 0.3.75 (``tests.comfyui``, with the test nodes), one real gateway
(``cyberun-gateway serve``, production timeouts, its embedded object storage) and the real agent
daemon (``cyberun-agent run``) attached to that ComfyUI by URL. The workflow, model-free::

    LoadImage (a --size² RGB noise PNG, uploaded once) → CyberunSlowPassthrough (--steps steps
    of --step-s seconds, a progress update each) → SaveImage

so every run re-encodes and serves a --size² noise PNG (about 3 MiB at 1024). Each run, both
paths, side by side (the order alternating from run to run), timed here from the first request
to the last output byte:

- ``direct``: ``POST /prompt`` (with a WebSocket ``/ws?clientId=`` opened once beforehand, as a
  long-lived client keeps it), wait for ``executing`` with ``node: null`` for the prompt, ``GET
  /history/{id}``, download every output with ``GET /view``;
- ``agent``: ``POST /r/workflows/{id}/run``, follow ``GET /r/tasks/{id}/events`` to
  ``completed``, ``GET /r/tasks/{id}/result``, download every ``download_urls`` entry from the
  gateway's storage. In between, the agent receives the assign, opens its own ComfyUI
  WebSocket, posts the prompt, follows it, fetches the output from ComfyUI, uploads it to the
  gateway's storage through a presigned URL and reports completion.

Every downloaded output is checked: a PNG of --size by --size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from websockets.asyncio.client import ClientConnection, connect

from bench._common import (
    MIB,
    BenchError,
    bench_parser,
    load_average,
    ms,
    package_versions,
    percentile,
    progress,
    run_benchmark,
    targets,
)
from bench._harness import create_workflow, follow, rest_client, submit

SECTION = "Agent overhead"
TARGET_RATIO = 1.05
TARGET_ADDED_S = 0.100
MIN_WORKFLOW_S = 2.0
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 60.0
INPUT_PREFIX = "cyberun-bench-noise"
Path_ = Literal["direct", "agent"]
PATHS: tuple[Path_, ...] = ("direct", "agent")
PRODUCTION_ENV = {
    "CYBERUN_AGENT_LOG_LEVEL": "info",
    "CYBERUN_AGENT_TIMEOUTS__HEARTBEAT_S": "15",
    "CYBERUN_AGENT_TIMEOUTS__RETRANSMIT_S": "5",
    "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "15",
}


# ------------------------------------------------------------------------------ the workflow


def noise_png(size: int) -> bytes:
    """Return a ``size`` by ``size`` RGB PNG of random pixels (incompressible: a real upload)."""
    row = 3 * size
    raw = b"".join(b"\x00" + os.urandom(row) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(raw, 1)),
            chunk(b"IEND", b""),
        ]
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Return a PNG's width and height; raise ``BenchError`` when it is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        raise BenchError("an output is not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def input_name(index: int) -> str:
    """The name of the ``index``-th noise PNG in ComfyUI's input/."""
    return f"{INPUT_PREFIX}-{index:04d}.png"


def graph(steps: int, step_s: float, image: str) -> dict[str, Any]:
    """LoadImage → CyberunSlowPassthrough → SaveImage (ComfyUI API format)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {
            "class_type": "CyberunSlowPassthrough",
            "inputs": {"image": ["1", 0], "steps": steps, "step_s": step_s},
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "cyberun-bench"},
        },
    }


# ------------------------------------------------------------------------------ the paths


@dataclass(frozen=True)
class Run:
    """One end-to-end run: total seconds, its stages, and the bytes downloaded."""

    path: Path_
    seconds: float
    stages: dict[str, float]
    downloaded: int


async def _wait_done(ws: ClientConnection, prompt_id: str) -> None:
    """Read ComfyUI's messages until ``executing`` ``node: null`` for ``prompt_id``."""
    while True:
        frame = await ws.recv()
        if not isinstance(frame, str):
            continue  # binary previews
        message = json.loads(frame)
        data = message.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if message.get("type") in {"execution_error", "execution_interrupted"}:
            raise BenchError(f"ComfyUI: {message.get('type')}: {str(data)[:300]}")
        if message.get("type") == "executing" and data.get("node") is None:
            return


async def run_direct(
    comfy: httpx.AsyncClient, ws: ClientConnection, client_id: str, prompt: dict[str, Any]
) -> Run:
    """POST /prompt, wait on the WebSocket, read /history, download via /view."""
    started = time.perf_counter()
    answer = await comfy.post("/prompt", json={"prompt": prompt, "client_id": client_id})
    if answer.status_code != 200:
        raise BenchError(f"ComfyUI /prompt answered {answer.status_code}: {answer.text[:300]}")
    prompt_id = str(answer.json()["prompt_id"])
    await asyncio.wait_for(_wait_done(ws, prompt_id), RUN_TIMEOUT_S)
    done = time.perf_counter()
    history = (await comfy.get(f"/history/{prompt_id}")).json()[prompt_id]
    files = [image for output in history["outputs"].values() for image in output.get("images", [])]
    got = time.perf_counter()
    downloaded = 0
    for image in files:
        params = {k: image[k] for k in ("filename", "subfolder", "type")}
        body = (await comfy.get("/view", params=params)).content
        png_size(body)
        downloaded += len(body)
    end = time.perf_counter()
    if not files:
        raise BenchError("the direct run produced no output")
    stages = {"ran": done - started, "history": got - done, "download": end - got}
    return Run("direct", end - started, stages, downloaded)


async def run_agent(
    http: httpx.AsyncClient, storage: httpx.AsyncClient, workflow: str, image: str
) -> Run:
    """Submit through the gateway, follow to completion, read the result, download it."""
    sent = await submit(http, workflow, parameters={"image": image})
    followed = await follow(http, sent.task_id, RUN_TIMEOUT_S)
    if followed.terminal != "completed":
        record = (await http.get(f"/r/tasks/{sent.task_id}")).json()
        raise BenchError(f"the agent's task ended {followed.terminal}: {record.get('task_error')}")
    done = time.perf_counter()
    result = (await http.get(f"/r/tasks/{sent.task_id}/result")).json()
    got = time.perf_counter()
    downloaded = 0
    for url in result["download_urls"].values():
        body = (await storage.get(url)).content
        png_size(body)
        downloaded += len(body)
    end = time.perf_counter()
    if not result["download_urls"]:
        raise BenchError("the agent's run produced no output")
    running = followed.first_seen.get("running", done)
    stages = {
        "accepted": running - sent.sent,
        "ran": done - sent.sent,
        "history": got - done,
        "download": end - got,
    }
    return Run("agent", end - sent.sent, stages, downloaded)


# ------------------------------------------------------------------------------ the bench


@dataclass
class Results:
    """Every kept run by path, and what else the report needs."""

    runs: dict[Path_, list[Run]] = field(default_factory=lambda: {p: [] for p in PATHS})
    load: list[float] = field(default_factory=list)
    input_bytes: int = 0

    def median(self, path: Path_) -> float:
        """Median end-to-end seconds of ``path``."""
        return statistics.median(run.seconds for run in self.runs[path])

    @property
    def added(self) -> float:
        """Median agent seconds minus median direct seconds."""
        return self.median("agent") - self.median("direct")

    @property
    def ratio(self) -> float:
        """Median agent seconds over median direct seconds."""
        return self.median("agent") / self.median("direct")

    def paired(self) -> list[float]:
        """Agent minus direct seconds, run by run."""
        pairs = zip(self.runs["agent"], self.runs["direct"], strict=True)
        return [agent.seconds - direct.seconds for agent, direct in pairs]

    def verdicts(self) -> dict[str, bool]:
        """Return each target and whether it was met."""
        long_enough = self.median("direct") >= MIN_WORKFLOW_S
        within = self.ratio <= TARGET_RATIO or self.added <= TARGET_ADDED_S
        return {
            f"direct run ≥ {MIN_WORKFLOW_S:g} s (the target's premise)": long_enough,
            (
                f"through the agent ≤ {(TARGET_RATIO - 1) * 100:.0f} % slower or ≤ "
                f"{TARGET_ADDED_S * 1000:.0f} ms added (medians)"
            ): within,
        }


@dataclass(frozen=True)
class Setup:
    """What the measuring coroutine needs."""

    comfy_url: str
    api: str
    credential: str
    steps: int
    step_s: float
    runs: int
    warmup: int


async def measure(setup: Setup) -> Results:
    """Run both paths ``warmup`` rounds unmeasured, then ``runs`` rounds, alternating."""
    results = Results()
    client_id = uuid.uuid4().hex
    ws_url = setup.comfy_url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with (
        httpx.AsyncClient(
            base_url=setup.comfy_url, timeout=HTTP_TIMEOUT_S, trust_env=False
        ) as comfy,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, trust_env=False) as storage,
        rest_client(setup.api, setup.credential) as http,
        connect(ws_url, proxy=None, max_size=None, open_timeout=START_TIMEOUT_S) as ws,
    ):
        workflow = await create_workflow(http, workflow_body(setup.steps, setup.step_s))
        images = iter(range(2 * (setup.warmup + setup.runs)))
        for round_ in range(-setup.warmup, setup.runs):
            order = PATHS if round_ % 2 == 0 else PATHS[::-1]
            if round_ == 0:
                results.load.append(load_average())
            for path in order:
                image = input_name(next(images))  # a fresh input: nothing comes from the cache
                if path == "direct":
                    prompt = graph(setup.steps, setup.step_s, image)
                    done = await run_direct(comfy, ws, client_id, prompt)
                else:
                    done = await run_agent(http, storage, workflow, image)
                name = "warm-up" if round_ < 0 else f"run {round_ + 1}/{setup.runs}"
                progress(f"{name:<9} {path:<6} {done.seconds * 1000:8.1f} ms")
                if round_ >= 0:
                    results.runs[path].append(done)
        results.load.append(load_average())
    return results


def workflow_body(steps: int, step_s: float) -> dict[str, Any]:
    """The gateway workflow: the graph, with LoadImage's file name as a parameter."""
    image = {"key": "image", "type": "string", "node_id": "1", "field": "image"}
    return {
        "name": "bench-overhead",
        "workflow_json": graph(steps, step_s, input_name(0)),
        "parameters": [image],
    }


async def upload_inputs(comfy_url: str, size: int, count: int) -> int:
    """Put ``count`` different noise PNGs into ComfyUI's input/; return one's size in bytes.

    One per run and path: ComfyUI serves a node from its cache when it has seen its inputs
    (the test node's ``IS_CHANGED`` does not prevent that), so every run reads its own input.
    """
    size_bytes = 0
    async with httpx.AsyncClient(
        base_url=comfy_url, timeout=HTTP_TIMEOUT_S, trust_env=False
    ) as comfy:
        for index in range(count):
            data = noise_png(size)
            size_bytes = len(data)
            answer = await comfy.post(
                "/upload/image",
                files={"image": (input_name(index), data, "image/png")},
                data={"overwrite": "true"},
            )
            if answer.status_code != 200:
                raise BenchError(f"ComfyUI /upload/image answered {answer.status_code}")
    return size_bytes


@contextlib.contextmanager
def comfyui(workdir: Path) -> Iterator[str]:
    """Install (cached) and start a real ComfyUI; yield its URL; stop it."""
    from tests.comfyui import ComfyUIError, install_comfyui, start_comfyui  # noqa: PLC0415

    try:
        server = start_comfyui(install_comfyui(), workdir / "comfyui")
    except ComfyUIError as error:
        raise BenchError(f"ComfyUI: {error}") from error
    with server:
        yield server.url


def run(args: argparse.Namespace, workdir: Path) -> Results:
    """Start ComfyUI, the gateway and the agent; measure; stop everything."""
    from tests.agent_process import AgentProcess, start_agent  # noqa: PLC0415
    from tests.gateway_process import gateway  # noqa: PLC0415

    agent: AgentProcess | None = None
    with comfyui(workdir) as comfy_url, gateway(workdir / "gateway", timeout=START_TIMEOUT_S) as gw:
        count = 2 * (args.warmup + args.runs)
        input_bytes = asyncio.run(upload_inputs(comfy_url, args.size, count))
        dk = gw.credential("bench-overhead")
        env = PRODUCTION_ENV | {
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": comfy_url,
            "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
        }
        try:
            agent = start_agent(workdir / "agent", gw.url, dk, "bench-overhead", extra_env=env)
            agent.wait_log("connected to the gateway", timeout=START_TIMEOUT_S)
            setup = Setup(comfy_url, gw.api, dk, args.steps, args.step_s, args.runs, args.warmup)
            results = asyncio.run(measure(setup))
        finally:
            if agent is not None:
                agent.stop()
    results.input_bytes = input_bytes
    return results


# ------------------------------------------------------------------------------ report


def render_table(results: Results) -> str:
    """Return the results as a markdown table followed by the targets and notes."""
    labels = {"direct": "direct to ComfyUI (reference)", "agent": "gateway + agent + upload"}
    lines = [
        (
            "| Path | Median s | Each run, s | Added vs direct, ms (median) | Ratio to direct "
            "| Output MiB |"
        ),
        "|---|--:|---|--:|--:|--:|",
    ]
    for path in PATHS:
        runs = results.runs[path]
        each = ", ".join(f"{run.seconds:.3f}" for run in runs)
        added = results.median(path) - results.median("direct")
        ratio = results.median(path) / results.median("direct")
        size = statistics.median(run.downloaded for run in runs) / MIB
        lines.append(
            f"| {labels[path]} | {results.median(path):.3f} | {each} | {added * 1000:.0f} "
            f"| {ratio:.3f} | {size:.2f} |"
        )
    lines += targets(results.verdicts(), "Targets (medians of end-to-end seconds):")
    paired = results.paired()
    agent_stage = _stage_medians(results.runs["agent"])
    direct_stage = _stage_medians(results.runs["direct"])
    lines += [
        "",
        "Notes:",
        "",
        (
            "- agent minus direct, run by run (same minute, same load): "
            f"{', '.join(f'{d * 1000:.0f}' for d in paired)} ms (median "
            f"{statistics.median(paired) * 1000:.0f} ms, max {max(paired) * 1000:.0f} ms)"
        ),
        (
            f"- direct, median stages: prompt → done {ms(direct_stage['ran'])} ms, /history "
            f"{ms(direct_stage['history'])} ms, /view download {ms(direct_stage['download'])} ms"
        ),
        (
            f"- agent, median stages: submit → running {ms(agent_stage['accepted'])} ms, submit "
            f"→ completed event {ms(agent_stage['ran'])} ms, /result "
            f"{ms(agent_stage['history'])} ms, download {ms(agent_stage['download'])} ms"
        ),
        (
            f"- input: a {results.input_bytes / MIB:.2f} MiB noise PNG read by LoadImage, a "
            "different one each run and path (so ComfyUI runs every node every time)"
        ),
    ]
    if len(results.load) == 2:
        lines.append(
            f"- 1-minute load average before / after the runs: {results.load[0]:.2f} / "
            f"{results.load[1]:.2f}"
        )
    return "\n".join(lines)


def _stage_medians(runs: Sequence[Run]) -> dict[str, float]:
    names = runs[0].stages.keys()
    return {name: percentile([run.stages[name] for run in runs], 50) for name in names}


def describe(args: argparse.Namespace) -> str:
    """Return the paragraph that introduces the results section."""
    return (
        f"LoadImage ({args.size}² noise PNG) → CyberunSlowPassthrough ({args.steps} steps of "
        f"{args.step_s:g} s) → SaveImage on a real CPU ComfyUI 0.3.75, run {args.runs} times "
        f"each way (after {args.warmup} unmeasured round), side by side, alternating: "
        f"`python -m bench.overhead --runs {args.runs} --warmup {args.warmup} --steps "
        f"{args.steps} --step-s {args.step_s:g} --size {args.size} --write`. End to end, timed "
        "by the client from its first request to the last output byte."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = bench_parser("overhead", __doc__)
    parser.add_argument("--runs", type=int, default=7, help="measured runs of each path (7)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (1)")
    parser.add_argument("--steps", type=int, default=20, help="slow node steps (20)")
    parser.add_argument("--step-s", type=float, default=0.1, help="seconds per step (0.1)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.steps < 1 or args.step_s < 0 or args.size < 8:
        parser.error("--runs, --steps >= 1, --warmup, --step-s >= 0, --size >= 8")
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
        extra=lambda: [f"- ComfyUI 0.3.75 (CPU); {package_versions('httpx', 'websockets')}"],
    )


if __name__ == "__main__":
    sys.exit(main())
