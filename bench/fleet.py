"""Fleet: N simulated agents on one gateway; tasks/s dispatched and submit → assign latency.

Run from the repository root (see bench/README.md)::

    .venv/bin/python -m bench.fleet [--agents 1000] [--paced 300] [--burst 2000] \
        [--concurrency 32] [--write] [--check]

One real gateway (``cyberun-gateway serve``, production timeouts) and ``--agents`` simulated
agents in this process (``tests.simagent.SimAgent``: the agent's own sans-I/O session over a
real WebSocket each; one slot each; they accept every assign and complete it at once, with no
outputs). A team admits at most 100 connected agents (the gateway's ``max_agents`` default, with
no way to change it from outside), so the fleet is split into teams of 100, each with its own
device credential and workflow; tasks are submitted to the teams in turn, so every dispatch
pass of the gateway weighs the whole fleet and places the task in one team's hundred.

Two phases, both timed from just before ``POST /r/workflows/{id}/run`` to the moment the
receiving agent's session decoded the ``task.assign`` (``perf_counter`` in this process for
both ends):

- paced: ``--paced`` tasks one at a time, each submitted once the previous one's assign has
  arrived: the latency of one dispatch with the whole fleet connected (the target);
- burst: ``--burst`` tasks submitted as fast as ``--concurrency`` concurrent submitters can:
  dispatched tasks/s (burst size over first submit → last assign) and the latency under load.

This process raises its soft ``RLIMIT_NOFILE`` to the hard limit first; the gateway inherits it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench._common import (
    BenchError,
    bench_parser,
    load_average,
    ms,
    package_versions,
    percentile,
    progress,
    raise_nofile_limit,
    run_benchmark,
    targets,
)
from bench._harness import (
    AssignLog,
    Submitted,
    TimedSimAgent,
    close_all,
    connect_all,
    create_workflow,
    gateway_queued_times,
    rest_client,
    submit,
)

SECTION = "Fleet"
TEAM_SIZE = 100  # the gateway's default max_agents per team
TARGET_AGENTS = 1000
TARGET_P99_S = 0.100
CONNECT_CONCURRENCY = 25
ASSIGN_TIMEOUT_S = 60.0
START_TIMEOUT_S = 60.0
FDS_PER_AGENT = 3  # the WebSocket in this process, its peer in the gateway, slack


@dataclass
class Phase:
    """One phase's latencies (seconds) and span."""

    name: str
    latencies: list[float]
    span_s: float  # first submit → last assign
    submits: list[Submitted] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)  # submit → gateway's queued event, s

    @property
    def rate(self) -> float:
        """Tasks dispatched per second over the span."""
        return len(self.latencies) / self.span_s if self.span_s > 0 else 0.0


@dataclass
class Results:
    """Both phases, the fleet's connect time, the gateway's RSS and the load."""

    agents: int
    teams: int
    connect_s: float = 0.0
    phases: list[Phase] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    nofile: tuple[int, int] = (0, 0)
    gateway_rss_mib: float = 0.0

    def phase(self, name: str) -> Phase:
        """Return the named phase."""
        return next(one for one in self.phases if one.name == name)

    def verdicts(self) -> dict[str, bool]:
        """Return each target and whether it was met."""
        paced = self.phase("paced")
        return {
            f"≥ {TARGET_AGENTS} agents connected at once ({self.agents})": self.agents
            >= TARGET_AGENTS,
            f"p99 submit → task.assign ≤ {TARGET_P99_S * 1000:.0f} ms (paced)": percentile(
                paced.latencies, 99
            )
            <= TARGET_P99_S,
        }


@dataclass(frozen=True)
class Team:
    """One team of the fleet: its REST client and workflow."""

    http: httpx.AsyncClient
    workflow: str


async def paced(teams: Sequence[Team], log: AssignLog, count: int) -> Phase:
    """Submit ``count`` tasks one at a time, each after the previous one's assign arrived."""
    latencies: list[float] = []
    submits: list[Submitted] = []
    first = last = time.perf_counter()
    for index in range(count):
        team = teams[index % len(teams)]
        sent = await submit(team.http, team.workflow)
        if index == 0:
            first = sent.sent
        last = await log.wait(sent.task_id, ASSIGN_TIMEOUT_S)
        latencies.append(last - sent.sent)
        submits.append(sent)
        if (index + 1) % 100 == 0:
            progress(f"paced {index + 1}/{count}")
    return Phase("paced", latencies, last - first, submits)


async def burst(teams: Sequence[Team], log: AssignLog, count: int, concurrency: int) -> Phase:
    """Submit ``count`` tasks from ``concurrency`` submitters at once; wait for every assign."""
    numbers = iter(range(count))
    sent_at: dict[str, float] = {}
    submits: list[Submitted] = []

    async def submitter() -> None:
        for index in numbers:
            team = teams[index % len(teams)]
            sent = await submit(team.http, team.workflow)
            sent_at[sent.task_id] = sent.sent
            submits.append(sent)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(submitter())
    progress(f"burst: {count} submitted in {time.perf_counter() - started:.1f} s")
    arrived = {task_id: await log.wait(task_id, ASSIGN_TIMEOUT_S) for task_id in sent_at}
    latencies = [arrived[task_id] - sent for task_id, sent in sent_at.items()]
    span = max(arrived.values()) - min(sent_at.values())
    return Phase("burst", latencies, span, submits)


async def measure(
    api: str, ws_url: str, credentials: Sequence[str], args: argparse.Namespace
) -> Results:
    """Connect the fleet, run both phases, disconnect; return the results."""
    results = Results(agents=args.agents, teams=len(credentials))
    log = AssignLog()
    agents = [
        TimedSimAgent(ws_url, credentials[i // TEAM_SIZE], f"fleet-{i:05d}", log)
        for i in range(args.agents)
    ]
    connections = args.concurrency + 2
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(rest_client(api, dk, connections=connections))
            for dk in credentials
        ]
        workflow = _workflow()
        teams = [Team(http, await create_workflow(http, workflow)) for http in clients]
        stack.push_async_callback(close_all, agents)
        started = time.perf_counter()
        await connect_all(agents, CONNECT_CONCURRENCY, timeout_s=max(60.0, args.agents * 0.2))
        results.connect_s = time.perf_counter() - started
        progress(f"{args.agents} agents connected in {results.connect_s:.1f} s")
        await paced(teams, log, 20)  # warm-up, not kept
        results.load.append(load_average())
        results.phases.append(await paced(teams, log, args.paced))
        results.phases.append(await burst(teams, log, args.burst, args.concurrency))
        results.load.append(load_average())
    return results


def _workflow() -> dict[str, object]:
    from tests.agent_process import script_workflow  # noqa: PLC0415

    return script_workflow(steps=1, step_s=0, outputs=0)


def _rss_mib(pid: int) -> float:
    import psutil  # noqa: PLC0415

    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


def run(args: argparse.Namespace, workdir: Path) -> Results:
    """Start the gateway, mint one credential per team, measure; stop everything."""
    from tests.gateway_process import gateway  # noqa: PLC0415

    nofile = raise_nofile_limit()
    if nofile[0] < args.agents * FDS_PER_AGENT + 256:
        raise BenchError(
            f"RLIMIT_NOFILE {nofile[0]} is too low for {args.agents} agents (ulimit -Hn)"
        )
    teams = -(-args.agents // TEAM_SIZE)
    with gateway(workdir / "gateway", timeout=START_TIMEOUT_S) as gw:
        credentials = [gw.credential(f"fleet-{team:03d}") for team in range(teams)]
        results = asyncio.run(measure(gw.api, gw.ws_url, credentials, args))
        with contextlib.suppress(Exception):
            results.gateway_rss_mib = _rss_mib(gw.process.pid)
    queued = gateway_queued_times(workdir / "gateway" / "gateway.sqlite3")
    for phase in results.phases:
        phase.queued = [
            queued[one.task_id] - one.sent_wall for one in phase.submits if one.task_id in queued
        ]
    results.nofile = nofile
    return results


def render_table(results: Results) -> str:
    """Return the results as a markdown table followed by the targets and notes."""
    lines = [
        ("| Phase | Tasks | Tasks/s dispatched | p50 ms | p90 ms | p99 ms | max ms | mean ms |"),
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    labels = {
        "paced": "paced (one at a time)",
        "burst": "burst",
    }
    for phase in results.phases:
        values = phase.latencies
        lines.append(
            f"| {labels[phase.name]} | {len(values)} | {phase.rate:.0f} "
            f"| {ms(percentile(values, 50))} | {ms(percentile(values, 90))} "
            f"| {ms(percentile(values, 99))} | {ms(max(values))} "
            f"| {ms(statistics.fmean(values))} |"
        )
    lines += targets(results.verdicts(), "Targets (latency: submit → task.assign decoded):")
    burst_p99 = percentile(results.phase("burst").latencies, 99)
    lines += [
        "",
        "Notes:",
        "",
        (
            f"- {results.agents} simulated agents in {results.teams} teams of ≤ {TEAM_SIZE}, "
            f"connected in {results.connect_s:.1f} s ({CONNECT_CONCURRENCY} handshakes at a time)"
        ),
        (
            "- the paced phase is one dispatch at a time with the fleet connected (what the "
            "target judges); the burst's latency includes waiting behind the other submits, "
            f"its p99 was {ms(burst_p99)} ms"
        ),
        (
            "- tasks/s dispatched: tasks over first submit → last assign; the paced rate is "
            "bounded by one submit's round trip"
        ),
        *[
            (
                f"- {phase.name}: submit → the gateway's own `queued` event (its event table, "
                f"read after it stopped): p50 {ms(percentile(phase.queued, 50))} ms, p99 "
                f"{ms(percentile(phase.queued, 99))} ms, max {ms(max(phase.queued))} ms"
            )
            for phase in results.phases
            if phase.queued
        ],
        f"- gateway RSS at the end: {results.gateway_rss_mib:.0f} MiB",
        f"- RLIMIT_NOFILE soft/hard: {results.nofile[0]}/{results.nofile[1]}",
    ]
    if len(results.load) == 2:
        lines.append(
            f"- 1-minute load average before / after the phases: {results.load[0]:.2f} / "
            f"{results.load[1]:.2f} (the agents run in the benchmark's process, beside the "
            "gateway)"
        )
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """Return the paragraph that introduces the results section."""
    return (
        f"{args.agents} simulated agents (the agent's sans-I/O session over a real WebSocket "
        "each, all in the benchmark's process) connected to one real gateway on loopback; "
        f"{args.paced} tasks submitted one at a time, then a burst of {args.burst} from "
        f"{args.concurrency} concurrent submitters: `python -m bench.fleet --agents "
        f"{args.agents} --paced {args.paced} --burst {args.burst} --concurrency "
        f"{args.concurrency} --write`."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = bench_parser("fleet", __doc__)
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (1000)")
    parser.add_argument("--paced", type=int, default=300, help="tasks one at a time (300)")
    parser.add_argument("--burst", type=int, default=2000, help="tasks in the burst (2000)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent submitters in the burst (32)"
    )
    args = parser.parse_args(argv)
    if min(args.agents, args.paced, args.burst, args.concurrency) < 1:
        parser.error("--agents, --paced, --burst and --concurrency must be >= 1")
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
        extra=lambda: [
            f"- stack: {package_versions('uvicorn', 'starlette', 'fastapi', 'websockets')}"
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
