"""Idle footprint: the real agent process, connected to a gateway and idle: RSS and CPU%.

Run from the repository root (see bench/README.md)::

    .venv/bin/python -m bench.idle [--seconds 60] [--settle 5] [--no-comfyui] [--write] [--check]

One real gateway (``cyberun-gateway serve``, production timeouts: 15 s heartbeat) and, side by
side over the same window, the real agent daemon (``cyberun-agent run``, ``tests.agent_process``)
in up to two configurations:

- ``scripted``: the scripted test runtime (no runtime process of its own when idle);
- ``comfyui``: attached by URL to a real CPU ComfyUI 0.3.75 (``tests.comfyui``), so its
  ComfyUI runtime's health checks run. Skipped with ``--no-comfyui``.

Both run at production settings (info-level logs, production timeouts; GPU discovery enabled:
on a machine without the NVIDIA driver the agent runs CPU-only). Once each has logged
``connected to the gateway``, ``--settle`` seconds pass unmeasured; then every second, for
``--seconds``, each agent process's RSS (``psutil``: ``VmRSS``) and CPU times (user + system,
all threads) are sampled. CPU% is CPU seconds over wall seconds, times 100 (one core = 100 %).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from bench._common import (
    MIB,
    BenchError,
    bench_parser,
    load_average,
    progress,
    run_benchmark,
    targets,
)

if TYPE_CHECKING:
    from tests.agent_process import AgentProcess

SECTION = "Idle footprint"
TARGET_RSS_BYTES = 80 * 1000 * 1000  # 80 MB
TARGET_CPU_PERCENT = 0.5
START_TIMEOUT_S = 90.0
SAMPLE_S = 1.0
TICK_S = 1 / os.sysconf("SC_CLK_TCK")  # the resolution of /proc CPU times
PRODUCTION_ENV = {
    "CYBERUN_AGENT_LOG_LEVEL": "info",
    "CYBERUN_AGENT_TIMEOUTS__HEARTBEAT_S": "15",
    "CYBERUN_AGENT_TIMEOUTS__RETRANSMIT_S": "5",
    "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "15",
}


@dataclass
class Samples:
    """One agent's samples: RSS per second, CPU seconds and wall seconds over the window."""

    name: str
    rss: list[int] = field(default_factory=list)
    cpu_percent_each: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    uss: int | None = None
    threads: int = 0

    @property
    def cpu_percent(self) -> float:
        """Mean CPU% over the window."""
        return 100 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Results:
    """Every configuration's samples and the load around the window."""

    samples: list[Samples] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def verdicts(self) -> dict[str, bool]:
        """Return each target and whether it was met (worst configuration)."""
        verdicts: dict[str, bool] = {}
        for one in self.samples:
            verdicts[f"`{one.name}`: peak RSS ≤ 80 MB ({TARGET_RSS_BYTES / MIB:.1f} MiB)"] = (
                max(one.rss) <= TARGET_RSS_BYTES
            )
            verdicts[f"`{one.name}`: mean CPU ≤ {TARGET_CPU_PERCENT} %"] = (
                one.cpu_percent <= TARGET_CPU_PERCENT
            )
        return verdicts


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def sample(agents: dict[str, AgentProcess], seconds: float) -> list[Samples]:
    """Sample every agent's RSS and CPU once a second for ``seconds``; same clock for all."""
    processes = {name: psutil.Process(agent.process.pid) for name, agent in agents.items()}
    results = {name: Samples(name) for name in agents}
    first = {name: _cpu(process) for name, process in processes.items()}
    previous = dict(first)
    started = time.monotonic()
    tick = started
    while True:
        tick += SAMPLE_S
        time.sleep(max(0.0, tick - time.monotonic()))  # the sampling period
        for name, process in processes.items():
            if not process.is_running() or agents[name].process.poll() is not None:
                raise BenchError(f"the {name} agent exited during the measurement")
            now_cpu = _cpu(process)
            results[name].rss.append(int(process.memory_info().rss))
            results[name].cpu_percent_each.append(100 * (now_cpu - previous[name]) / SAMPLE_S)
            previous[name] = now_cpu
        if tick - started >= seconds:
            break
    wall = time.monotonic() - started
    for name, process in processes.items():
        one = results[name]
        one.cpu_s, one.wall_s = previous[name] - first[name], wall
        with contextlib.suppress(psutil.Error):
            one.uss = int(process.memory_full_info().uss)
        one.threads = process.num_threads()
    return list(results.values())


@contextlib.contextmanager
def comfyui(workdir: Path, wanted: bool) -> Iterator[str | None]:
    """Yield a real ComfyUI's URL (installed and started here), or ``None`` when not wanted."""
    if not wanted:
        yield None
        return
    from tests.comfyui import ComfyUIError, install_comfyui, start_comfyui  # noqa: PLC0415

    try:
        install = install_comfyui()
        server = start_comfyui(install, workdir / "comfyui")
    except ComfyUIError as error:
        raise BenchError(f"ComfyUI: {error}") from error
    with server:
        yield server.url


def run(args: argparse.Namespace, workdir: Path) -> Results:
    """Start the gateway, ComfyUI and the agents; sample; stop everything."""
    from tests.agent_process import start_agent  # noqa: PLC0415
    from tests.gateway_process import gateway  # noqa: PLC0415

    results = Results(seconds=args.seconds)
    agents: dict[str, AgentProcess] = {}
    with (
        comfyui(workdir, not args.no_comfyui) as comfyui_url,
        gateway(workdir / "gateway", timeout=START_TIMEOUT_S) as gw,
    ):
        configs: dict[str, dict[str, str]] = {"scripted": {}}
        if comfyui_url is not None:
            configs["comfyui"] = {
                "CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": comfyui_url,
                "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
            }
        try:
            for name, env in configs.items():
                dk = gw.credential(f"idle-{name}")
                agents[name] = start_agent(
                    workdir / name, gw.url, dk, f"idle-{name}", extra_env=PRODUCTION_ENV | env
                )
            for agent in agents.values():
                agent.wait_log("connected to the gateway", timeout=START_TIMEOUT_S)
            progress(f"agents connected; settling {args.settle} s, then {args.seconds} s sampled")
            time.sleep(args.settle)  # unmeasured: start-up work ends
            results.load.append(load_average())
            results.samples = sample(agents, args.seconds)
            results.load.append(load_average())
            for name, agent in agents.items():
                if agent.process.poll() is not None:
                    raise BenchError(f"the {name} agent exited:\n{agent.log_text()}")
        finally:
            for agent in agents.values():
                agent.stop()
    return results


def _mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def render_table(results: Results) -> str:
    """Return the results as a markdown table followed by the targets and notes."""
    labels = {
        "scripted": "agent, scripted runtime (no runtime process)",
        "comfyui": "agent attached to a real ComfyUI by URL",
    }
    lines = [
        (
            "| Agent process | Median RSS, MiB | Peak RSS, MiB | USS at the end, MiB "
            "| Mean CPU % | Busiest second, CPU % | Threads |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for one in results.samples:
        uss = "n/a" if one.uss is None else _mib(one.uss)
        lines.append(
            f"| {labels.get(one.name, one.name)} | {_mib(statistics.median(one.rss))} "
            f"| {_mib(max(one.rss))} | {uss} | {one.cpu_percent:.3f} "
            f"| {max(one.cpu_percent_each):.1f} | {one.threads} |"
        )
    lines += targets(results.verdicts(), "Targets (peak RSS; mean CPU over the window):")
    lines += [
        "",
        "Notes:",
        "",
        (
            f"- sampled every {SAMPLE_S:g} s for {results.seconds:g} s, side by side; CPU % = CPU "
            "seconds (user + system, all threads) over wall seconds, one core = 100 %"
        ),
        (
            "- RSS counts shared library pages too; USS (memory unique to the process) is what "
            "stopping it would free"
        ),
        (
            f"- CPU times come in clock ticks ({TICK_S * 1000:g} ms), so over the window the "
            f"CPU % resolution is {100 * TICK_S / results.seconds:.3f} %"
        ),
    ]
    if len(results.load) == 2:
        lines.append(
            f"- 1-minute load average before / after the window: {results.load[0]:.2f} / "
            f"{results.load[1]:.2f}"
        )
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """Return the paragraph that introduces the results section."""
    configs = "two configurations side by side" if not args.no_comfyui else "one configuration"
    return (
        f"The real agent daemon connected to a real gateway on loopback and idle, {configs}, "
        f"production settings, sampled for {args.seconds:g} s after {args.settle:g} s of "
        f"settling: `python -m bench.idle --seconds {args.seconds:g} --settle {args.settle:g}"
        f"{' --no-comfyui' if args.no_comfyui else ''} --write`."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = bench_parser("idle", __doc__)
    parser.add_argument("--seconds", type=float, default=60, help="sampled seconds (60)")
    parser.add_argument(
        "--settle", type=float, default=5, help="unmeasured seconds after connecting (5)"
    )
    parser.add_argument(
        "--no-comfyui", action="store_true", help="skip the agent attached to ComfyUI"
    )
    args = parser.parse_args(argv)
    if args.seconds < SAMPLE_S or args.settle < 0:
        parser.error(f"--seconds must be >= {SAMPLE_S:g} and --settle >= 0")
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
    )


if __name__ == "__main__":
    sys.exit(main())
