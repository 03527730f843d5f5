"""Dispatch latency: REST submit → the agent accepted, beside a bare WebSocket echo.

Run from the repository root (see bench/README.md)::

    .venv/bin/python -m bench.dispatch [--tasks 200] [--warmup 10] [--agents real,sim] \
        [--echo-per-task 5] [--write] [--check]

One real gateway (``cyberun-gateway serve``, production timeouts) serves two agents at once,
each in its own team so that each team's tasks go to its agent only:

- ``real``: the real agent daemon (``cyberun-agent run`` as a subprocess, ``tests.agent_process``)
  with the scripted test runtime (one real subprocess per task: ``steps=1, step_s=0``, no
  outputs), info-level logs and production timeouts. This is the product: its accept includes
  the durable journal write that precedes every ``task.accept``.
- ``sim``: a protocol-level simulated agent in this process (``tests.simagent``: the agent's own
  sans-I/O session over a real WebSocket), which accepts and completes at once. It shows the
  gateway's part alone, and timestamps the moment ``task.assign`` reaches an agent.

Tasks are submitted one at a time, alternating between the agents (the order rotating each
round), each only once its agent is idle again (``GET /r/agents``), so every figure is a latency
without queueing. After each task, ``--echo-per-task`` round trips of a ~200-byte JSON text
frame go through a bare echo server on the same stack (uvicorn with ``ws="websockets-sansio"``,
a Starlette WebSocket route, the ``websockets`` asyncio client, permessage-deflate on both
sides, as between agent and gateway), in its own process: the echo samples are taken under
the same load, interleaved with the dispatch samples.

Timestamps: the submit instant is taken here just before ``POST /r/workflows/{id}/run``
(``time.time()`` and ``perf_counter()``). "Accepted" is the gateway's own ``started_at`` (set
when it processed the agent's ``task.accept``; ``GET /r/tasks/{id}``), "assign sent" the
gateway's ``queued`` status event (``created_at`` in its event table, read after it stopped),
"agent decided" and "workload started" the real agent's JSON log records (``task accepted``,
``script started``), "running seen" the arrival here of the SSE ``status: running`` event
(``GET /r/tasks/{id}/events`` opened right after the 202). Wall-clock times from the gateway's
and the agent's processes are compared with this process's ``time.time()``: one machine, one
clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from websockets.asyncio.client import connect

from bench._common import (
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
from bench._echo import ECHO_TIMEOUT_S, echo_rounds, echo_server
from bench._harness import (
    AssignLog,
    Followed,
    Submitted,
    TimedSimAgent,
    create_workflow,
    follow,
    gateway_queued_times,
    rest_client,
    submit,
    task_record,
    wait_agent_idle,
    wall,
)

SECTION = "Dispatch latency"
LATE_ANSWER_S = 0.020  # a 202 this much later than the dispatch gets a note
START_TIMEOUT_S = 60.0
REAL_ID, SIM_ID = "bench-real", "bench-sim"
Kind = Literal["real", "sim"]
KINDS: tuple[Kind, ...] = ("real", "sim")
# The real agent at production settings (tests.agent_process speeds its timers up for tests).
PRODUCTION_ENV = {
    "CYBERUN_AGENT_LOG_LEVEL": "info",
    "CYBERUN_AGENT_TIMEOUTS__HEARTBEAT_S": "15",
    "CYBERUN_AGENT_TIMEOUTS__RETRANSMIT_S": "5",
    "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "15",
}


# ------------------------------------------------------------------------------ the bench


@dataclass
class Sample:
    """One measured task: client-side times, and the gateway's and agent's wall-clock times."""

    kind: Kind
    submitted: Submitted
    followed: Followed
    started_at: float  # gateway: task.accept processed (wall)
    assigned: float | None = None  # sim agent: task.assign decoded (perf_counter)
    queued_at: float | None = None  # gateway event log: status queued (wall)
    decided_at: float | None = None  # real agent log: "task accepted" (wall)
    workload_at: float | None = None  # real agent log: "script started" (wall)


@dataclass
class Results:
    """Every kept sample, the echo round trips, and the load around the run."""

    samples: list[Sample] = field(default_factory=list)
    echo: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def of(self, kind: Kind) -> list[Sample]:
        """Return the samples of one agent kind."""
        return [one for one in self.samples if one.kind == kind]

    def verdicts(self) -> dict[str, bool]:
        """Issue 9's targets, judged on the real agent daemon: p50 ≤ 10 ms, p99 ≤ 50 ms."""
        out: dict[str, bool] = {}
        for stage, values in (
            ("submit → accepted", _since_submit_wall(self.of("real"), "started_at")),
            ("submit → running (seen over SSE)", _since_submit(self.of("real"), "running")),
        ):
            if values:
                out[f"real agent, {stage}: p50 ≤ 10 ms"] = percentile(values, 50) <= 0.010
                out[f"real agent, {stage}: p99 ≤ 50 ms"] = percentile(values, 99) <= 0.050
        return out


@dataclass(frozen=True)
class Setup:
    """What the measuring coroutine needs."""

    api: str
    ws_url: str
    echo_url: str
    credentials: dict[Kind, str]
    kinds: tuple[Kind, ...]
    tasks: int
    warmup: int
    echo_per_task: int


AGENT_IDS: dict[Kind, str] = {"real": REAL_ID, "sim": SIM_ID}


async def one_task(
    kind: Kind, http: httpx.AsyncClient, workflow: str, sim: TimedSimAgent | None
) -> Sample:
    """Submit one task, follow it to its end, read its record; return the sample."""
    submitted = await submit(http, workflow)
    followed = await follow(http, submitted.task_id)
    if followed.terminal != "completed":
        raise BenchError(f"{submitted.task_id} ended {followed.terminal}")
    record = await task_record(http, submitted.task_id)
    sample = Sample(kind, submitted, followed, started_at=wall(record["started_at"]))
    if sim is not None:
        sample.assigned = sim.log.times.get(submitted.task_id)
    return sample


async def measure(setup: Setup) -> Results:
    """Run every round: each agent gets one task, each task is followed by echo round trips."""
    results = Results()
    workflow_body = _script_workflow()
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            kind: await stack.enter_async_context(rest_client(setup.api, setup.credentials[kind]))
            for kind in setup.kinds
        }
        workflows = {kind: await create_workflow(clients[kind], workflow_body) for kind in clients}
        echo = await stack.enter_async_context(
            connect(setup.echo_url, proxy=None, open_timeout=ECHO_TIMEOUT_S)
        )
        sim: TimedSimAgent | None = None
        if "sim" in setup.kinds:
            sim = TimedSimAgent(setup.ws_url, setup.credentials["sim"], SIM_ID, AssignLog())
            await sim.connect()
            stack.push_async_callback(sim.close)
        await echo_rounds(echo, 50)  # warm-up
        started = time.perf_counter()
        for round_ in range(-setup.warmup, setup.tasks):
            shift = round_ % len(setup.kinds)
            for kind in setup.kinds[shift:] + setup.kinds[:shift]:
                http = clients[kind]
                await wait_agent_idle(http, AGENT_IDS[kind])
                if round_ == 0 and not results.load:
                    results.load.append(load_average())
                sample = await one_task(kind, http, workflows[kind], sim if kind == "sim" else None)
                rtts = await echo_rounds(echo, setup.echo_per_task)
                if round_ >= 0:
                    results.samples.append(sample)
                    results.echo += rtts
            if round_ >= 0 and (round_ + 1) % 50 == 0:
                progress(f"round {round_ + 1}/{setup.tasks}")
        results.wall_s = time.perf_counter() - started
        results.load.append(load_average())
    return results


def _script_workflow() -> dict[str, Any]:
    from tests.agent_process import script_workflow  # noqa: PLC0415

    return script_workflow(steps=1, step_s=0, outputs=0)


def agent_log_times(records: Sequence[dict[str, Any]], event: str) -> dict[str, float]:
    """Return task id → the wall-clock time of the agent's first ``event`` record for it."""
    found: dict[str, float] = {}
    for record in records:
        task_id = record.get("task_id")
        if record.get("event") == event and isinstance(task_id, str) and task_id not in found:
            found[task_id] = wall(str(record["timestamp"]))
    return found


def run(setup: Setup, workdir: Path) -> Results:
    """Start the servers and the agents, measure, stop everything; return the results."""
    from tests.agent_process import AgentProcess, start_agent  # noqa: PLC0415
    from tests.gateway_process import gateway  # noqa: PLC0415

    data_dir = workdir / "gateway"
    agent: AgentProcess | None = None
    with echo_server() as echo_url, gateway(data_dir, timeout=START_TIMEOUT_S) as gw:
        credentials: dict[Kind, str] = {
            kind: gw.credential(f"bench-{kind}") for kind in setup.kinds
        }
        setup = dataclasses.replace(
            setup, api=gw.api, ws_url=gw.ws_url, echo_url=echo_url, credentials=credentials
        )
        try:
            if "real" in setup.kinds:
                agent = start_agent(
                    workdir / "agent",
                    gw.url,
                    credentials["real"],
                    REAL_ID,
                    extra_env=PRODUCTION_ENV,
                )
                agent.wait_log("connected to the gateway", timeout=START_TIMEOUT_S)
            results = asyncio.run(measure(setup))
        finally:
            if agent is not None:
                agent.stop()
    _attach_server_times(results, data_dir / "gateway.sqlite3", agent)
    return results


def _attach_server_times(results: Results, database: Path, agent: Any) -> None:
    queued = gateway_queued_times(database)
    records: list[dict[str, Any]] = []
    if agent is not None:
        agent.log_text()  # drains what the agent wrote into agent.seen
        records = list(agent.seen)
    decided = agent_log_times(records, "task accepted")
    workload = agent_log_times(records, "script started")
    for sample in results.samples:
        task_id = sample.submitted.task_id
        sample.queued_at = queued.get(task_id)
        sample.decided_at = decided.get(task_id)
        sample.workload_at = workload.get(task_id)


# ------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Row:
    """One table row: a path, a stage and its latencies in seconds."""

    path: str
    stage: str
    values: list[float]


def _since_submit_wall(samples: Sequence[Sample], attr: str) -> list[float]:
    values = [(getattr(one, attr), one.submitted.sent_wall) for one in samples]
    return [value - sent for value, sent in values if value is not None]


def _since_submit(samples: Sequence[Sample], status: str) -> list[float]:
    return [
        one.followed.first_seen[status] - one.submitted.sent
        for one in samples
        if status in one.followed.first_seen
    ]


def rows(results: Results) -> list[Row]:
    """Return the table's rows: the echo reference, then each agent kind's stages."""
    table = [Row("WebSocket echo, ~200 B frame (reference)", "round trip", results.echo)]
    labels = {"real": "real agent daemon", "sim": "simulated agent"}
    for kind in KINDS:
        samples = results.of(kind)
        if not samples:
            continue
        label = labels[kind]
        answered = [one.submitted.answered - one.submitted.sent for one in samples]
        stages = [
            ("202 answer received by the submitter", answered),
            ("task.assign sent (gateway: status queued)", _since_submit_wall(samples, "queued_at")),
        ]
        if kind == "sim":
            assigned = [
                one.assigned - one.submitted.sent for one in samples if one.assigned is not None
            ]
            stages.append(("task.assign received by the agent", assigned))
        else:
            stages.append(
                ("agent decided to accept (agent log)", _since_submit_wall(samples, "decided_at"))
            )
        stages += [
            (
                "**accepted**: task.accept processed (started_at)",
                _since_submit_wall(samples, "started_at"),
            ),
            ("running seen by the submitter (SSE)", _since_submit(samples, "running")),
        ]
        if kind == "real":
            stages.append(
                ("workload process started (agent log)", _since_submit_wall(samples, "workload_at"))
            )
        table += [Row(label, stage, values) for stage, values in stages if values]
    return table


def render_table(results: Results) -> str:
    """Return the results as a markdown table followed by notes."""
    echo_p50 = percentile(results.echo, 50)
    lines = [
        (
            "| Agent | Stage, from the REST submit | Samples | p50 ms | p99 ms | max ms "
            "| p50 / echo p50 |"
        ),
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows(results):
        p50, p99 = percentile(row.values, 50), percentile(row.values, 99)
        lines.append(
            f"| {row.path} | {row.stage} | {len(row.values)} | {ms(p50)} | {ms(p99)} "
            f"| {ms(max(row.values))} | {p50 / echo_p50:.1f} |"
        )
    lines += targets(results.verdicts(), "Targets (the echo round trip is the floor):")
    lines += [
        "",
        "Notes:",
        "",
        (
            f"- {len(results.samples)} tasks measured one at a time, alternating between the "
            f"agents, in {results.wall_s:.0f} s; p99 is nearest-rank"
        ),
    ]
    real = results.of("real")
    if real:
        accept = [one.started_at - one.decided_at for one in real if one.decided_at is not None]
        decide = [
            one.decided_at - one.queued_at
            for one in real
            if one.decided_at is not None and one.queued_at is not None
        ]
        lines.append(
            "- real agent, median: assign sent → agent decided "
            f"{ms(percentile(decide, 50))} ms (receive, decode, evaluate, journal write); "
            f"agent decided → accept processed at the gateway {ms(percentile(accept, 50))} ms"
        )
    lines += _late_answer_note(results)
    if len(results.load) == 2:
        lines.append(
            f"- 1-minute load average before / after the runs: {results.load[0]:.2f} / "
            f"{results.load[1]:.2f}"
        )
    return "\n".join(lines)


def _late_answer_note(results: Results) -> list[str]:
    """A note when the 202 reaches the submitter well after the gateway already dispatched."""
    gaps = [
        (one.submitted.answered - one.submitted.sent) - (one.queued_at - one.submitted.sent_wall)
        for one in results.samples
        if one.queued_at is not None
    ]
    if not gaps or percentile(gaps, 50) < LATE_ANSWER_S:
        return []
    seen = [
        one.followed.first_seen["running"] - one.submitted.answered
        for one in results.samples
        if "running" in one.followed.first_seen
    ]
    return [
        (
            f"- the 202 reached the submitter a median {ms(percentile(gaps, 50))} ms after the "
            "gateway had already sent the task.assign, and the SSE stream opened after it "
            f"showed `running` a median {ms(percentile(seen, 50))} ms after the 202: see "
            "bench/README.md (Dispatch latency) for the cause"
        )
    ]


def describe(args: argparse.Namespace) -> str:
    """Return the paragraph that introduces the results section."""
    return (
        f"{args.tasks} tasks per agent (after {args.warmup} unmeasured), submitted one at a time "
        "to one real gateway on loopback, alternating between the real agent daemon (scripted "
        "runtime, one subprocess per task) and a simulated agent, each task only once its agent "
        f"was idle; {args.echo_per_task} echo round trips after each task: `python -m "
        f"bench.dispatch --tasks {args.tasks} --warmup {args.warmup} --echo-per-task "
        f"{args.echo_per_task} --write`. Gateway and agent times are their own wall-clock "
        "timestamps on the same machine."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = bench_parser("dispatch", __doc__)
    parser.add_argument("--tasks", type=int, default=200, help="measured tasks per agent (200)")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured tasks first (10)")
    parser.add_argument(
        "--agents", default="real,sim", help="which agents: real, sim or both (real,sim)"
    )
    parser.add_argument(
        "--echo-per-task", type=int, default=5, help="echo round trips after each task (5)"
    )
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.agents.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error("--agents takes real, sim or real,sim")
    if args.tasks < 1 or args.warmup < 0 or args.echo_per_task < 1:
        parser.error("--tasks and --echo-per-task must be >= 1, --warmup >= 0")
    args.kinds = kinds
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code (1: error or, with --check, a missed target)."""
    args = parse_args(argv)
    setup = Setup("", "", "", {}, args.kinds, args.tasks, args.warmup, args.echo_per_task)
    stack = package_versions("uvicorn", "starlette", "fastapi", "websockets", "httpx")
    return run_benchmark(
        SECTION,
        lambda tmp: run(setup, tmp),
        render_table,
        intro=describe(args),
        write=args.write,
        check=args.check,
        verdicts=lambda results: results.verdicts(),
        extra=lambda: [f"- stack: {stack}"],
    )


if __name__ == "__main__":
    sys.exit(main())
