"""Reliability, long mode: every scenario of tests/reliability at full size, as one table.

Run from the repository root (see bench/README.md and docs/reliability.md)::

    .venv/bin/python -m bench.reliability [--sampled] [--write] [--check] [-- PYTEST_ARGS...]

Runs ``pytest tests/reliability`` (every file there at run time) in a child process with
``CYBERUN_RELIABILITY_SCALE=long`` (``--sampled``: the test command's small scale, a quick
check) and ``CYBERUN_RELIABILITY_LEDGER`` pointing at a temporary file, into which each
scenario appends its counts (``tests/reliability/ledger.py``: tasks, faults injected, tasks
lost, tasks executed twice). This module is also loaded into that pytest as a plugin (``-p
bench.reliability``): around each test it notes which ledger lines the test wrote and how it
ended, so every record is tied to its test and its result. pytest's own output goes to
stderr; stdout carries the table: one row per scenario (its records summed), one row per file
for the tests that record nothing (hostile input and secrets checks, for instance), then the
"Targets" list (every test passed; no task lost; no task executed twice).

With ``--write`` the table replaces the results part of docs/reliability.md, between the
``<!-- reliability:begin -->`` and ``<!-- reliability:end -->`` markers. Exit code: 1 when
pytest could not run the suite (collection error, interrupted) or, with ``--check``, when a
target was missed; else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench._common import (
    ROOT,
    bench_parser,
    load_average,
    machine,
    progress,
    sigterm_as_exit,
    targets,
)

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
SCALE_ENV = "CYBERUN_RELIABILITY_SCALE"  # the names tests/reliability/ledger.py reads
LEDGER_ENV = "CYBERUN_RELIABILITY_LEDGER"
OUTCOMES_ENV = "CYBERUN_RELIABILITY_OUTCOMES"  # this plugin's file: one JSON line per test
SUITE = "tests/reliability"
SUITE_TIMEOUT_S = 3 * 3600.0  # the whole long run, start to end
STOP_GRACE_S = 60.0  # after SIGINT, for pytest's teardowns to stop their processes

# How each scenario is tested, by the start of the scenario name its test passes to record()
# (the first match wins). A scenario matching none shows its record's detail instead.
HOW: dict[str, str] = {
    "network: random link cuts": (
        "the agent reaches the gateway through a TCP fault proxy that resets the link at "
        "random points while tasks run"
    ),
    "network: upload request lost": (
        "a task ends while the proxy holds the agent's gateway link dead; once it heals, the "
        "agent asks for its upload URLs again and reports"
    ),
    "network:": (
        "the TCP fault proxy on the agent's gateway link stalls, black-holes or refuses it "
        "past the ping timeout, then heals"
    ),
    "storage:": (
        "every presigned URL goes through an HTTP fault proxy that injects this fault into "
        "the agent's uploads"
    ),
    "agent kill -9": "the agent is SIGKILLed at seeded random points and restarted",
    "gateway kill -9": "the gateway is SIGKILLed and restarted on the same data dir",
    "launched ComfyUI killed": "the ComfyUI the agent launched and supervises is SIGKILLed",
    "disk full": "the agent's work_dir is a 3 MiB tmpfs that an output overflows",
    "hostile frames": (
        "hypothesis-generated hostile frames from a fake gateway to the real agent process"
    ),
    "hostile input": (
        "path-bearing fields with traversal, absolute paths, NUL, newlines, 10 kB names"
    ),
    "secret": "every log, answer, event and status is searched for credentials and signatures",
    "load": (
        "one agent, several slots, a queue kept non-empty; RSS, fds, threads, children and "
        "directories sampled idle after a warm-up and at the end"
    ),
}


def how_tested(scenario: str) -> str:
    """The "how it is tested" text for ``scenario`` (empty when :data:`HOW` has none)."""
    return next((text for start, text in HOW.items() if scenario.startswith(start)), "")


# ------------------------------------------------------------------ the pytest plugin


@dataclass
class _Watch:
    """The plugin's state in the pytest process: each test's outcome so far."""

    outcome: dict[str, str] = field(default_factory=dict)


_WATCH = _Watch()


def _ledger_lines() -> int:
    path = os.environ.get(LEDGER_ENV)
    if not path or not Path(path).exists():
        return 0
    with Path(path).open(encoding="utf-8") as ledger:
        return sum(1 for _ in ledger)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Note the worst outcome of a test's phases (setup, call, teardown)."""
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    else:
        outcome = "passed"
    previous = _WATCH.outcome.get(report.nodeid, "passed")
    rank = ("passed", "skipped", "xfailed", "failed", "error")
    _WATCH.outcome[report.nodeid] = max(previous, outcome, key=rank.index)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """Tie the ledger lines a test appends to that test and its outcome."""
    first = _ledger_lines()
    yield
    path = os.environ.get(OUTCOMES_ENV)
    if path:
        line = {
            "nodeid": item.nodeid,
            "outcome": _WATCH.outcome.get(item.nodeid, "passed"),
            "first": first,
            "last": _ledger_lines(),
        }
        with Path(path).open("a", encoding="utf-8") as outcomes:
            outcomes.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------ the benchmark


@dataclass
class Row:
    """One scenario (or one file's unrecorded tests) in the table."""

    scenario: str
    how: str
    tests: list[str] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    tasks: int | None = None
    faults: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    details: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        """Sum one ledger record into the row."""
        self.tasks = (self.tasks or 0) + int(record["tasks"])
        self.faults = (self.faults or 0) + int(record["faults"])
        self.lost = (self.lost or 0) + int(record["lost"])
        self.duplicated = (self.duplicated or 0) + int(record["duplicated"])
        if record.get("detail"):
            self.details.append(str(record["detail"]))

    @property
    def result(self) -> str:
        """``passed`` when every test behind the row passed, else how many did what.

        ``xfail`` is a test marked as a known bug (strict: it must still fail); ``skipped``
        one that could not run here.
        """
        tally = Counter(self.outcomes)
        bad = tally["failed"] + tally["error"]
        if bad:
            return f"**FAILED** ({bad} of {len(self.outcomes)})"
        if tally.keys() == {"passed"}:
            return "passed" if tally["passed"] < 2 else f"passed ({tally['passed']} tests)"
        labels = {"passed": "passed", "xfailed": "xfail (known bug)", "skipped": "skipped"}
        return ", ".join(f"{labels[o]} {n}" for o, n in tally.items() if o in labels)


@dataclass
class Results:
    """The run: its rows, pytest's exit code, the scale, the wall time and the load."""

    rows: list[Row]
    returncode: int
    scale: str
    seconds: float
    load: tuple[float, float]
    command: str

    def verdicts(self) -> dict[str, bool]:
        """Every test passed; no task lost; no task executed twice (as each scenario counts).

        A strict xfail (a known bug, its failure asserted) does not miss the first target; the
        target's text counts them.
        """
        outcomes = [o for row in self.rows for o in row.outcomes]
        known = outcomes.count("xfailed")
        passed = "every reliability test passed" + (
            f" ({known} known bugs marked xfail)" if known else ""
        )
        return {
            passed: self.returncode == 0
            and bool(outcomes)
            and all(o in ("passed", "skipped", "xfailed") for o in outcomes),
            "no task lost": all(not row.lost for row in self.rows),
            "no task executed twice": all(not row.duplicated for row in self.rows),
        }


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _test_name(nodeid: str) -> str:
    return nodeid.removeprefix(f"{SUITE}/")


def build_rows(records: Sequence[dict[str, Any]], tests: Iterable[dict[str, Any]]) -> list[Row]:
    """Group the ledger records by scenario, each tied to its test; add unrecorded tests."""
    rows: dict[str, Row] = {}
    unrecorded: dict[str, Row] = {}
    for test in tests:
        name = _test_name(str(test["nodeid"]))
        mine = records[int(test["first"]) : int(test["last"])]
        for entry in mine:
            scenario = str(entry["scenario"])
            row = rows.setdefault(scenario, Row(scenario, how_tested(scenario)))
            row.add(entry)
            if name not in row.tests:
                row.tests.append(name)
                row.outcomes.append(str(test["outcome"]))
        if not mine:
            file = name.split("::", 1)[0]
            row = unrecorded.setdefault(file, Row(f"{file}: other checks", ""))
            row.tests.append(name)
            row.outcomes.append(str(test["outcome"]))
    for row in rows.values():
        if not row.how:  # no text in HOW: the details say what was done (not repeated below)
            row.how, row.details = "; ".join(row.details) or "—", []
    return [*rows.values(), *unrecorded.values()]


def _md(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _cell(value: int | None) -> str:
    return "—" if value is None else str(value)


def _tests_cell(tests: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{t}`" for t in tests[:limit])
    return shown + (f" and {len(tests) - limit} more" if len(tests) > limit else "")


def render_table(results: Results) -> str:
    """The table, the targets, the details the scenarios recorded."""
    lines = [
        "| Scenario | How it is tested | Tasks | Faults injected | Lost | Duplicated | Result |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for row in results.rows:
        how = f"{row.how} ({_tests_cell(row.tests)})" if row.how else _tests_cell(row.tests)
        lines.append(
            f"| {_md(row.scenario)} | {_md(how)} | {_cell(row.tasks)} | {_cell(row.faults)} "
            f"| {_cell(row.lost)} | {_cell(row.duplicated)} | {row.result} |"
        )
    if not results.rows:
        lines.append("| (no test ran) | — | — | — | — | — | **error** |")
    lines += targets(results.verdicts())
    details = [(row.scenario, d) for row in results.rows for d in row.details]
    lines += ["", "Notes:", ""]
    lines += [f"- {scenario}: {_md(detail)}" for scenario, detail in details]
    lines += [
        (
            f"- scale `{results.scale}`, pytest exit code {results.returncode}, "
            f"{results.seconds:.0f} s in all; 1-minute load average before / after: "
            f"{results.load[0]:.2f} / {results.load[1]:.2f}"
        ),
        f"- command: `{results.command}`",
    ]
    return "\n".join(lines)


def run_suite(args: argparse.Namespace, tmp: Path) -> Results:
    """Run pytest on the suite with the ledger and this plugin; gather the rows."""
    ledger, outcomes = tmp / "ledger.jsonl", tmp / "outcomes.jsonl"
    scale = "sampled" if args.sampled else "long"
    env = os.environ | {
        SCALE_ENV: scale,
        LEDGER_ENV: str(ledger),
        OUTCOMES_ENV: str(outcomes),
    }
    argv = [
        sys.executable,
        "-m",
        "pytest",
        SUITE,
        "-p",
        "bench.reliability",
        "-p",
        "no:cacheprovider",
        "-q",
        *args.pytest_args,
    ]
    progress(f"==> {SCALE_ENV}={scale} {' '.join(['python', *argv[1:]])}")
    load_before, started = load_average(), time.monotonic()
    returncode = _run(argv, env)
    seconds = time.monotonic() - started
    rows = build_rows(_read_lines(ledger), _read_lines(outcomes))
    return Results(
        rows=rows,
        returncode=returncode,
        scale=scale,
        seconds=seconds,
        load=(load_before, load_average()),
        command=" ".join(
            [
                "python -m bench.reliability",
                *(["--sampled"] if args.sampled else []),
                *(["--", *args.pytest_args] if args.pytest_args else []),
            ]
        ),
    )


def _run(argv: Sequence[str], env: dict[str, str]) -> int:
    """Run pytest, its output on our stderr; on our interruption, SIGINT it (teardowns run)."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sys.stderr)  # noqa: S603
    try:
        return process.wait(timeout=SUITE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # pytest's KeyboardInterrupt runs the finallys
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def write_doc(results: Results, table: str) -> None:
    """Replace the results part of docs/reliability.md (between the markers) with ``table``."""
    scale = {
        "long": "the long mode (`CYBERUN_RELIABILITY_SCALE=long`)",
        "sampled": "the sampled scale of the test command (`--sampled`)",
    }[results.scale]
    body = "\n".join(
        [
            BEGIN,
            "",
            f"From the last `{results.command} --write`, at {scale}:",
            "",
            *machine(),
            "",
            table,
            "",
            END,
        ]
    )
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Reliability\n"
    head, found, rest = text.partition(BEGIN)
    if found:
        _, ended, tail = rest.partition(END)
        if not ended:
            raise SystemExit(f"{DOC}: {BEGIN} without {END}")
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + body + "\n"
    DOC.write_text(text, encoding="utf-8")
    progress(f"\nwrote the results of {DOC.relative_to(ROOT)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options (``--`` then arguments for pytest, e.g. ``-k load``)."""
    parser = bench_parser("reliability", __doc__)
    parser.add_argument(
        "--sampled", action="store_true", help="the test command's small scale (quick check)"
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: passed on to pytest")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; print the table; write; return the exit code."""
    args = parse_args(argv)
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="cyberun-reliability-") as tmp:
        results = run_suite(args, Path(tmp))
    table = render_table(results)
    print(table)
    if args.write:
        write_doc(results, table)
    if results.returncode not in (0, 1) or not results.rows:  # 1: tests failed, shown above
        progress(f"error: pytest exited {results.returncode}")
        return 1
    return 1 if args.check and not all(results.verdicts().values()) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
