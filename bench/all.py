"""Every benchmark in turn, then one summary table of every target (met / MISSED).

Run from the repository root (``scripts/bench`` sets up the venv first and runs this)::

    .venv/bin/python -m bench.all [NAME...] [--write] [--check] [--only NAME,...] [--skip NAME,...]

Each benchmark runs as its own process (``python -m bench.NAME`` at its defaults, plus
``--write`` when given here), its table streaming through; a non-zero exit is an error. Names
given as arguments are the same as ``--only`` (``scripts/bench reliability --write``). The
reliability long mode (``bench.reliability``: the whole tests/reliability suite at full size,
tens of minutes) runs only when named; it writes docs/reliability.md, not results.md. The
summary is built from the lines of its "Targets" list that end in ``: met`` or ``: MISSED``
(the convention every benchmark's output follows). Before the first benchmark that needs the
test ComfyUI, ``scripts/install-comfyui`` runs (a no-op when its install is cached).

With ``--write``, after the runs the "Summary of targets" section of bench/results.md is rebuilt
from every section there (so it also lists benchmarks not run this time, with their dates).

Exit code: 1 when a benchmark failed to run, or with ``--check`` when a target was missed;
else 0.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench._common import RESULTS, ROOT, load_average, replace_section, sigterm_as_exit

BENCHMARKS: tuple[str, ...] = ("upload", "dispatch", "overhead", "idle", "fleet", "progress")
ON_REQUEST: tuple[str, ...] = ("reliability",)  # run only when named: too long for every run
NEEDS_COMFYUI = frozenset({"overhead", "idle", "progress", "reliability"})
TITLES = {
    "upload": "Upload throughput and memory",
    "dispatch": "Dispatch latency",
    "overhead": "Agent overhead",
    "idle": "Idle footprint",
    "fleet": "Fleet",
    "progress": "Progress flood",
    "reliability": "Reliability (long mode)",
}
VERDICT = re.compile(r"^- (?P<target>.+): (?P<verdict>met|MISSED)$")
SUMMARY = "Summary of targets"
DATE = re.compile(r"^- date: (?P<date>.+)$")
BENCH_TIMEOUT_S = 1800.0  # one benchmark, start to end (each takes a few minutes here)
TIMEOUTS_S = {"reliability": 3 * 3600.0 + 120}  # the whole reliability suite at full size
INSTALL_TIMEOUT_S = 1800.0


@dataclass
class Outcome:
    """One benchmark's run: exit code, the verdicts it printed, its wall time."""

    name: str
    returncode: int
    seconds: float
    verdicts: list[tuple[str, bool]] = field(default_factory=list)


def run_one(name: str, write: bool) -> Outcome:
    """Run ``python -m bench.NAME``, echoing its stdout; collect its verdict lines."""
    args = [sys.executable, "-m", f"bench.{name}", *(["--write"] if write else [])]
    print(f"\n==> {' '.join(['python', *args[1:]])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    verdicts: list[tuple[str, bool]] = []
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        assert process.stdout is not None  # noqa: S101 - stdout=PIPE
        for line in process.stdout:
            print(line, end="", flush=True)
            if match := VERDICT.match(line.rstrip("\n")):
                verdicts.append((match["target"], match["verdict"] == "met"))
        returncode = process.wait(timeout=TIMEOUTS_S.get(name, BENCH_TIMEOUT_S))
    finally:
        if process.poll() is None:  # interrupted, or a hung benchmark: stop it and its finallys
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    return Outcome(name, returncode, time.monotonic() - started, verdicts)


def install_comfyui() -> bool:
    """Run ``scripts/install-comfyui`` (cached); return whether it succeeded."""
    print("\n==> scripts/install-comfyui (cached by recipe under .cache/)", file=sys.stderr)
    try:
        done = subprocess.run(  # noqa: S603 - our own script, no shell
            [str(ROOT / "scripts" / "install-comfyui")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"install-comfyui failed: {error}", file=sys.stderr)
        return False
    return done.returncode == 0


def summary(outcomes: Sequence[Outcome]) -> str:
    """Return the summary table: one row per target (or per benchmark without one)."""
    lines = ["| Benchmark | Target | Result | Wall s |", "|---|---|---|--:|"]
    for one in outcomes:
        title = TITLES.get(one.name, one.name)
        if one.returncode != 0:
            lines.append(f"| {title} | — | **error** (exit {one.returncode}) | {one.seconds:.0f} |")
            continue
        if not one.verdicts:
            lines.append(f"| {title} | none set (figures only) | — | {one.seconds:.0f} |")
            continue
        for target, met in one.verdicts:
            result = "met" if met else "**MISSED**"
            lines.append(f"| {title} | {target} | {result} | {one.seconds:.0f} |")
    return "\n".join(lines)


def results_summary(text: str) -> str:
    """Return the "Summary of targets" section: every target recorded in results.md."""
    lines = [
        f"## {SUMMARY}",
        "",
        (
            "Every target of every section below, as last written (`scripts/bench --write` "
            "rebuilds this list from the sections; each section says how and when it was run)."
        ),
        "",
        "| Benchmark | Target | Result | Run |",
        "|---|---|---|---|",
    ]
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    for body in sections:
        title, _, rest = body.partition("\n")
        if title.strip() == SUMMARY:
            continue
        date = next((m["date"] for m in map(DATE.match, rest.splitlines()) if m), "")
        found = [m for m in map(VERDICT.match, rest.splitlines()) if m]
        if not found:
            lines.append(f"| {title.strip()} | none set (figures only) | — | {date} |")
        for match in found:
            result = "met" if match["verdict"] == "met" else "**MISSED**"
            lines.append(f"| {title.strip()} | {match['target']} | {result} | {date} |")
    return "\n".join(lines) + "\n"


def write_summary() -> None:
    """Rebuild the summary section of results.md, placed before the first other section."""
    text = RESULTS.read_text(encoding="utf-8")
    body = results_summary(text)
    if re.search(rf"^## {re.escape(SUMMARY)}[ \t]*$", text, re.MULTILINE):
        text = replace_section(text, SUMMARY, body)
    else:
        head, sep, tail = text.partition("\n## ")
        text = f"{head.rstrip()}\n\n{body}\n## {tail}" if sep else f"{text.rstrip()}\n\n{body}"
    RESULTS.write_text(text, encoding="utf-8")
    print(f"\nwrote the {SUMMARY!r} section of {RESULTS.relative_to(ROOT)}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.all", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="benchmarks to run (as --only); default: all"
    )
    parser.add_argument("--write", action="store_true", help="each benchmark updates results.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {(*BENCHMARKS, *ON_REQUEST)}"
    )
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    args = parser.parse_args(argv)
    only = [*args.names, *(n.strip() for n in args.only.split(",") if n.strip())]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    known = (*BENCHMARKS, *ON_REQUEST)
    unknown = [n for n in [*only, *skip] if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(known)}")
    args.names = [n for n in dict.fromkeys(only or BENCHMARKS) if n not in skip]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; print the summary; return the exit code."""
    args = parse_args(argv)
    with sigterm_as_exit():  # a SIGTERM still stops the running benchmark (run_one's finally)
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    """Run ``args.names`` in turn; print the summary; return the exit code."""
    outcomes: list[Outcome] = []
    started, load = time.monotonic(), load_average()
    comfyui_ready: bool | None = None
    for name in args.names:
        if name in NEEDS_COMFYUI and comfyui_ready is None:
            comfyui_ready = install_comfyui()
        if name in NEEDS_COMFYUI and not comfyui_ready:
            outcomes.append(Outcome(name, 2, 0.0))
            continue
        outcomes.append(run_one(name, args.write))
    print(f"\n## Summary ({time.monotonic() - started:.0f} s)\n")
    print(summary(outcomes))
    print(f"\n1-minute load average before / after: {load:.2f} / {load_average():.2f}")
    if args.write and RESULTS.exists():
        write_summary()
    failed = any(one.returncode != 0 for one in outcomes)
    missed = any(not met for one in outcomes for _, met in one.verdicts)
    return 1 if failed or (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
