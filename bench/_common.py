"""What the benchmarks share: results.md sections, the machine description, percentiles.

Every benchmark module prints a markdown table followed by a "Targets" list whose lines read
``- <target>: met`` or ``- <target>: MISSED`` (``bench.all`` collects exactly those lines into
its summary), replaces its own ``## <title>`` section of bench/results.md with ``--write``, and
exits 1 on a missed target with ``--check``. ``bench.upload`` predates this module and keeps its
own copies of these helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import resource
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results.md")
MIB = 1024 * 1024
RESULTS_HEADER = """# Benchmark results

Measured figures, one section per benchmark; bench/README.md says how to run each and what its
figures mean. A benchmark's `--write` flag replaces its own section and leaves the others.
"""


class BenchError(RuntimeError):
    """A measurement could not be taken (a server did not start, a task did not finish)."""


def percentile(values: Sequence[float], q: float) -> float:
    """Return the nearest-rank ``q``-th percentile (p99 of 200 samples is the 198th smallest)."""
    if not values:
        raise BenchError("no samples")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def load_average() -> float:
    """Return the 1-minute load average."""
    return os.getloadavg()[0]


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return (soft, hard).

    Children started afterwards (the gateway) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` so every ``finally`` stops its processes."""

    def _exit(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _proc_field(path: str, name: str) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def machine(extra: Sequence[str] = ()) -> list[str]:
    """Return a markdown list describing this machine, then ``extra`` lines, then the date."""
    memory = _proc_field("/proc/meminfo", "MemTotal") or "0 kB"
    ram_gib = int(memory.split()[0]) / MIB
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    usable = len(os.sched_getaffinity(0))
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores ({usable} usable by this process)",
        f"- RAM: {ram_gib:.1f} GiB",
        f"- OS: {platform.platform()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}",
        *extra,
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def package_versions(*names: str) -> str:
    """Return ``name version`` for each installed distribution, comma separated."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    found: list[str] = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def targets(verdicts: Mapping[str, bool], heading: str = "Targets:") -> list[str]:
    """Return the "Targets" block: one ``- target: met|MISSED`` line per verdict."""
    lines = ["", heading, ""]
    lines += [f"- {target}: {'met' if ok else 'MISSED'}" for target, ok in verdicts.items()]
    return lines


def section(title: str, intro: str, machine_lines: Sequence[str], table: str) -> str:
    """Return a results.md section: title, a paragraph, the machine, the table."""
    return "\n".join([f"## {title}", "", intro, "", *machine_lines, "", table, ""])


def replace_section(text: str, title: str, body: str) -> str:
    """Return ``text`` with its ``## title`` section replaced by ``body`` (appended if absent)."""
    pattern = re.compile(rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: body.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"


def write_results(title: str, body: str) -> None:
    """Replace (or add) the ``## title`` section of bench/results.md."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else RESULTS_HEADER
    RESULTS.write_text(replace_section(text, title, body), encoding="utf-8")
    print(f"\nwrote the {title!r} section of {RESULTS.relative_to(ROOT)}", file=sys.stderr)


def progress(message: str) -> None:
    """Print a progress line on stderr (stdout carries only the table)."""
    print(message, file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    """Format seconds as milliseconds for a table cell."""
    value = seconds * 1000
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


R = TypeVar("R")


def run_benchmark(
    title: str,
    run: Callable[[Path], R],
    render: Callable[[R], str],
    *,
    intro: str,
    write: bool,
    check: bool,
    verdicts: Callable[[R], Mapping[str, bool]] = lambda _: {},
    extra: Callable[[], Sequence[str]] = tuple,
) -> int:
    """Every benchmark's ``main``: run in a temporary directory, print, write, judge.

    Returns the exit code: 1 for an error, or with ``check`` for a missed target.
    """
    try:
        with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="cyberun-bench-") as tmp:
            results = run(Path(tmp))
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = render(results)
    print(table)
    if write:
        write_results(title, section(title, intro, machine(extra()), table))
    return 1 if check and not all(verdicts(results).values()) else 0


def bench_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: ``--write`` and ``--check``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{module}", description=(doc or "").split("\n")[0]
    )
    parser.add_argument("--write", action="store_true", help="update bench/results.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return parser
