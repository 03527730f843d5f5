"""Upload throughput and memory: ``curl -T`` against the agent's presigned uploads.

Run from the repository root (see bench/README.md)::

    .venv/bin/python -m bench.upload [--size-mb 200] [--runs 3] [--part-mb 16] [--write] [--check]

It starts one real SeaweedFS on loopback (``tests.seaweedfs.start_seaweedfs``), writes one random
file, and in each run uploads that file four times, side by side, to fresh keys:

- ``curl``: ``curl -T FILE`` to a presigned PUT URL with its signed headers (the reference);
- ``agent``: ``agent.transfer.upload`` to the same kind of URL;
- ``curl-parts``: the same multipart upload by one curl process over one kept-alive connection
  (``curl -T part1 URL1 -T part2 URL2 ...``, the file split into part files beforehand);
- ``agent-parts``: ``agent.transfer.upload_parts`` over presigned part URLs of ``--part-mb``
  MiB. Both multipart paths are completed by this process, as the gateway would, outside the
  timing.

The order rotates from run to run, so no path always goes first (cold connection pool, CPU
frequency, SeaweedFS compaction). Every stored object is checked (HEAD size, and the SHA-256 of
a presigned GET equals the file's) and then deleted.

Each upload runs in a fresh process. The agent's run in ``python -m bench.upload --child`` (a
JSON job on stdin, one JSON line on stdout), which imports only what the agent needs; it reads
``VmRSS`` after its imports (the baseline), resets ``VmHWM`` to it (``/proc/self/clear_refs``),
uploads, and reports ``VmHWM - baseline`` as the RSS growth and ``VmHWM`` as its peak RSS during
the upload. curl's peak RSS is its ``VmHWM`` sampled every 20 ms while it runs (``wait4``'s
``ru_maxrss`` is no use: Linux carries the forking parent's peak into it). Throughput is timed
inside each process around the transfer alone (curl's ``time_total``; ``perf_counter`` around
the agent's call), so interpreter start-up is not counted. tests/integration/
test_upload_memory.py reuses this child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx

from agent.protocol.messages import UploadPart
from agent.transfer import CHUNK_SIZE, upload, upload_parts

if TYPE_CHECKING:
    from gateway.storage import S3Storage
    from tests.seaweedfs import SeaweedFS

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results.md")
SECTION = "Upload throughput"
CONTENT_TYPE = "application/octet-stream"
URL_EXPIRY_S = 3600
TARGET_RATIO = 0.9  # agent MiB/s over curl MiB/s, medians
TARGET_GROWTH_MIB = 64  # agent peak RSS growth, worst run
POLL_INTERVAL_S = 0.02  # how often a running child is checked (timing is taken inside it)
CHILD_TIMEOUT_S = 600.0
Mode = Literal["curl", "agent", "curl-parts", "agent-parts"]
MODES: tuple[Mode, ...] = ("curl", "agent", "curl-parts", "agent-parts")


class BenchError(RuntimeError):
    """A measurement could not be taken or an uploaded object is wrong."""


# ------------------------------------------------------------------------------ the child


def _status_kib(name: str, pid: int | str = "self") -> int:
    """Return a memory field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in KiB."""
    text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    match = re.search(rf"^{name}:\s+(\d+) kB$", text, re.MULTILINE)
    if match is None:  # a zombie has no memory fields
        raise BenchError(f"/proc/{pid}/status has no {name}")
    return int(match.group(1))


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False  # the peak then includes the imports: the growth is overstated, not hidden
    return True


async def _child_upload(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run the job's upload with a fresh client; return its wall and CPU seconds and ETags."""
    path = Path(job["path"])
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as client:
        started, cpu_started = time.perf_counter(), time.process_time()
        if job["mode"] == "agent":
            await upload(client, job["url"], job["headers"], path)
            done = []
        else:
            parts = [UploadPart.model_validate(part) for part in job["parts"]]
            done = await upload_parts(client, parts, path)
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    parts_done = [[part.part_number, part.etag] for part in done]
    return {"seconds": seconds, "cpu_s": cpu_s, "parts": parts_done}


def child_main() -> None:
    """Read a job on stdin, upload, print one JSON line: timings, baseline and peak RSS."""
    job = json.loads(sys.stdin.read())
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    result = asyncio.run(_child_upload(job))
    peak = _status_kib("VmHWM")
    print(json.dumps({**result, "baseline_kib": baseline, "peak_kib": peak, "peak_reset": reset}))


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Exited:
    """A finished child: exit code, output, last ``VmHWM`` sampled, CPU seconds (``wait4``)."""

    returncode: int
    stdout: str
    stderr: str
    sampled_peak_kib: int
    cpu_s: float


def spawn(args: Sequence[str], *, stdin: bytes, workdir: Path, timeout_s: float) -> Exited:
    """Run ``args`` in the repository root, feed ``stdin``, sample its peak RSS until it exits.

    Output goes to files in ``workdir`` (no pipe to drain while it runs). A child still running
    after ``timeout_s`` is killed and ``BenchError`` is raised.
    """
    name = uuid.uuid4().hex
    out_path, err_path = workdir / f"{name}.out", workdir / f"{name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter or curl, no shell
            args, cwd=ROOT, stdin=subprocess.PIPE, stdout=out, stderr=err
        )
    try:
        assert process.stdin is not None  # noqa: S101 - stdin=PIPE
        with contextlib.suppress(BrokenPipeError):  # a child that died early: its exit says why
            process.stdin.write(stdin)
        with contextlib.suppress(BrokenPipeError):  # closes even when the flush fails
            process.stdin.close()
        peak, cpu_s = _watch(process, timeout_s)
    except BaseException:
        process.kill()
        process.wait()
        raise
    try:
        return Exited(
            returncode=process.returncode,
            stdout=out_path.read_text(encoding="utf-8", errors="replace"),
            stderr=err_path.read_text(encoding="utf-8", errors="replace"),
            sampled_peak_kib=peak,
            cpu_s=cpu_s,
        )
    finally:
        out_path.unlink()
        err_path.unlink()


def _watch(process: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float]:
    """Reap ``process`` with ``wait4``; return its last sampled ``VmHWM`` (KiB) and CPU seconds.

    ``Popen`` returns after the child's ``exec``, so every sample is of the new program. The
    exit code is stored in ``process.returncode``.
    """
    deadline = time.monotonic() + timeout_s
    peak = 0
    while True:
        with contextlib.suppress(OSError, BenchError):  # it is exiting
            peak = max(peak, _status_kib("VmHWM", process.pid))
        reaped, status, usage = os.wait4(process.pid, os.WNOHANG)
        if reaped == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return peak, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise BenchError(f"{process.args!r} still running after {timeout_s} s")
        time.sleep(POLL_INTERVAL_S)


# ------------------------------------------------------------------------------ uploads


@dataclass(frozen=True)
class Upload:
    """One measured upload; ``growth_kib`` (VmHWM - VmRSS after imports) is the agent's only.

    ``peak_kib``: the process's peak RSS during the upload (see the module docstring).
    """

    mode: Mode
    size: int
    seconds: float
    cpu_s: float
    peak_kib: int
    growth_kib: int | None = None
    baseline_kib: int | None = None
    peak_reset: bool = True
    parts: list[tuple[int, str]] = field(default_factory=list)

    @property
    def mib_per_s(self) -> float:
        """Throughput in MiB (2^20 bytes) per second."""
        return self.size / MIB / self.seconds


def single_job(path: Path, url: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """Return the child's job for ``agent.transfer.upload`` of ``path`` to one PUT URL."""
    return {"mode": "agent", "path": str(path), "url": url, "headers": dict(headers)}


def parts_job(path: Path, parts: Sequence[UploadPart]) -> dict[str, Any]:
    """Return the child's job for ``agent.transfer.upload_parts`` of ``path``."""
    return {
        "mode": "agent-parts",
        "path": str(path),
        "parts": [part.model_dump(mode="json") for part in parts],
    }


def run_agent(
    job: Mapping[str, Any], *, workdir: Path, timeout_s: float = CHILD_TIMEOUT_S
) -> Upload:
    """Run ``job`` in a fresh ``python -m bench.upload --child`` and return what it measured."""
    size = Path(job["path"]).stat().st_size
    exited = spawn(
        [sys.executable, "-m", "bench.upload", "--child"],
        stdin=json.dumps(job).encode(),
        workdir=workdir,
        timeout_s=timeout_s,
    )
    lines = exited.stdout.strip().splitlines()
    if exited.returncode != 0 or not lines:
        raise BenchError(
            f"agent child ({job['mode']}) exited {exited.returncode}:\n{exited.stderr[-3000:]}"
        )
    result = json.loads(lines[-1])
    return Upload(
        mode=cast(Mode, job["mode"]),
        size=size,
        seconds=float(result["seconds"]),
        cpu_s=float(result["cpu_s"]),
        peak_kib=int(result["peak_kib"]),
        growth_kib=int(result["peak_kib"]) - int(result["baseline_kib"]),
        baseline_kib=int(result["baseline_kib"]),
        peak_reset=bool(result["peak_reset"]),
        parts=[(int(number), str(etag)) for number, etag in result["parts"]],
    )


def run_curl(
    curl: str,
    transfers: Sequence[tuple[Path, str]],
    headers: Mapping[str, str],
    *,
    workdir: Path,
    timeout_s: float = CHILD_TIMEOUT_S,
) -> tuple[Upload, list[str]]:
    """PUT each ``(file, url)`` in turn with one ``curl -T`` process and the given headers.

    One process and one kept-alive connection, as the agent's ``upload_parts``. curl sets each
    ``Content-Length`` from the file itself (the signed value: the file's size); ``Expect:``
    turns off its ``100-continue`` round trip, which httpx does not make either. Returns the
    summed transfer times (curl's ``time_total``) and the responses' ETags in order.
    """
    header_file = workdir / f"{uuid.uuid4().hex}.headers"
    args = [curl, "--silent", "--show-error", "--globoff", "--header", "Expect:"]
    args += ["--write-out", "%{http_code} %{size_upload} %{time_total}\\n"]
    args += ["--dump-header", str(header_file)]
    for name, value in headers.items():
        if name.lower() != "content-length":
            args += ["--header", f"{name}: {value}"]
    for file, url in transfers:
        args += ["--upload-file", str(file), "--output", os.devnull, url]
    try:
        exited = spawn(args, stdin=b"", workdir=workdir, timeout_s=timeout_s)
        response_headers = header_file.read_text(encoding="latin-1")
    finally:
        header_file.unlink(missing_ok=True)
    results = [line.split() for line in exited.stdout.splitlines() if line.strip()]
    sizes = [file.stat().st_size for file, _ in transfers]
    if exited.returncode != 0 or len(results) != len(transfers):
        raise BenchError(f"curl exited {exited.returncode} ({exited.stdout}): {exited.stderr}")
    for (status, sent, _), size in zip(results, sizes, strict=True):
        if status not in {"200", "201", "204"} or int(float(sent)) != size:
            raise BenchError(f"curl: status {status}, sent {sent} bytes of {size}")
    etags = re.findall(r"^etag:[ \t]*(\S.*?)[ \t]*\r?$", response_headers, re.I | re.M)
    mode: Mode = "curl" if len(transfers) == 1 else "curl-parts"
    seconds = sum(float(fields[2]) for fields in results)
    return Upload(mode, sum(sizes), seconds, exited.cpu_s, exited.sampled_peak_kib), etags


def run_curl_parts(
    curl: str, files: Sequence[Path], parts: Sequence[UploadPart], *, workdir: Path
) -> Upload:
    """Upload the part files over the presigned part URLs with one curl; keep the ETags."""
    if [file.stat().st_size for file in files] != [part.size for part in parts]:
        raise BenchError("the part files do not match the presigned parts")
    transfers = [(file, part.upload_url) for file, part in zip(files, parts, strict=True)]
    done, etags = run_curl(curl, transfers, {}, workdir=workdir)
    if len(etags) != len(parts):
        raise BenchError(f"curl: {len(etags)} ETags for {len(parts)} parts")
    numbers = [part.part_number for part in parts]
    return dataclasses.replace(
        done, mode="curl-parts", parts=list(zip(numbers, etags, strict=True))
    )


# ------------------------------------------------------------------------------ storage


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` in 1 MiB pieces; return their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as file:
        remaining = size
        while remaining > 0:
            chunk = os.urandom(min(CHUNK_SIZE, remaining))
            digest.update(chunk)
            file.write(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def split_file(path: Path, part_size: int, directory: Path) -> list[Path]:
    """Copy ``path`` into ``part_size`` pieces in ``directory`` (curl uploads whole files)."""
    files: list[Path] = []
    with path.open("rb") as source:
        while True:
            file = directory / f"{path.name}.part{len(files) + 1:05d}"
            with file.open("wb") as out:
                copied = 0
                while copied < part_size and (
                    chunk := source.read(min(CHUNK_SIZE, part_size - copied))
                ):
                    out.write(chunk)
                    copied += len(chunk)
            if copied == 0 and files:
                file.unlink()
                return files
            files.append(file)
            if copied < part_size:
                return files


def presigned_parts(
    storage: S3Storage, key: str, size: int, part_size: int
) -> tuple[str, list[UploadPart]]:
    """Start a multipart upload of ``size`` bytes; return its id and ``part_size`` part URLs."""
    upload_id = storage.create_multipart(key, content_type=CONTENT_TYPE)
    parts: list[UploadPart] = []
    offset = 0
    while offset < size or not parts:  # an empty file is one empty part
        length = min(part_size, size - offset)
        number = len(parts) + 1
        url = storage.presign_part(
            key, upload_id=upload_id, part_number=number, expires_s=URL_EXPIRY_S
        )
        parts.append(UploadPart(part_number=number, upload_url=url, size=length))
        offset += length
    return upload_id, parts


def stored_sha256(storage: S3Storage, key: str) -> str:
    """Return the SHA-256 of the stored object, streamed through a presigned GET."""
    url, _ = storage.presign_get(key, expires_s=URL_EXPIRY_S)
    digest = hashlib.sha256()
    with httpx.Client(timeout=60) as http, http.stream("GET", url) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def verify_stored(storage: S3Storage, key: str, size: int, sha256: str) -> None:
    """Raise ``BenchError`` unless HEAD gives ``size`` and a GET hashes to ``sha256``."""
    info = storage.head(key)
    if info is None or info.size != size:
        raise BenchError(f"{key}: HEAD gives {info}, expected {size} bytes")
    stored = stored_sha256(storage, key)
    if stored != sha256:
        raise BenchError(f"{key}: stored SHA-256 {stored} differs from the file's {sha256}")


def storage_for(server: SeaweedFS) -> S3Storage:
    """Return the gateway's S3 storage on ``server``'s bucket."""
    from gateway.storage import S3Storage  # noqa: PLC0415 - botocore stays out of the child

    return S3Storage(
        server.endpoint_url, server.bucket, server.access_key, server.secret_key, server.region
    )


# ------------------------------------------------------------------------------ the bench


@dataclass(frozen=True)
class Setup:
    """What every measured upload shares."""

    curl: str
    storage: S3Storage
    path: Path
    size: int
    sha256: str
    part_size: int
    part_files: list[Path]  # ``path`` split into ``part_size`` pieces, for curl
    workdir: Path


def measure(setup: Setup, mode: Mode) -> tuple[Upload, float]:
    """Upload the file once along ``mode`` to a fresh key, verify it, delete it.

    Returns the upload and the seconds the completion took (multipart only, else 0).
    """
    storage, key = setup.storage, f"bench/upload/{mode}-{uuid.uuid4().hex}.bin"
    complete_s = 0.0
    if mode in {"curl-parts", "agent-parts"}:
        upload_id, parts = presigned_parts(storage, key, setup.size, setup.part_size)
        try:
            if mode == "curl-parts":
                result = run_curl_parts(setup.curl, setup.part_files, parts, workdir=setup.workdir)
            else:
                result = run_agent(parts_job(setup.path, parts), workdir=setup.workdir)
            started = time.perf_counter()
            storage.complete_multipart(key, upload_id=upload_id, parts=result.parts)
            complete_s = time.perf_counter() - started
        except BaseException:
            storage.abort_multipart(key, upload_id=upload_id)
            raise
    else:
        put = storage.presign_put(
            key, size=setup.size, content_type=CONTENT_TYPE, expires_s=URL_EXPIRY_S
        )
        if mode == "curl":
            transfer = [(setup.path, put.url)]
            result, _ = run_curl(setup.curl, transfer, put.headers, workdir=setup.workdir)
        else:
            result = run_agent(single_job(setup.path, put.url, put.headers), workdir=setup.workdir)
    try:
        verify_stored(storage, key, setup.size, setup.sha256)
    finally:
        storage.delete(key)
    return result, complete_s


@dataclass
class Results:
    """Every measured upload by path, with what else the report needs."""

    samples: dict[Mode, list[Upload]] = field(default_factory=lambda: {m: [] for m in MODES})
    completions: list[float] = field(default_factory=list)  # complete_multipart seconds
    load: list[float] = field(default_factory=list)  # 1-minute load average, before and after

    def rate(self, mode: Mode) -> float:
        """Return the median MiB/s of ``mode``."""
        return statistics.median(one.mib_per_s for one in self.samples[mode])

    def ratio(self, mode: Mode, reference: Mode = "curl") -> float:
        """Return the median MiB/s of ``mode`` over ``reference``'s."""
        return self.rate(mode) / self.rate(reference)

    def paired(self, mode: Mode, reference: Mode = "curl") -> list[float]:
        """Return ``mode``'s MiB/s over ``reference``'s run by run (same minute, same load)."""
        pairs = zip(self.samples[mode], self.samples[reference], strict=True)
        return [mine.mib_per_s / theirs.mib_per_s for mine, theirs in pairs]

    def worst_growth_kib(self, mode: Mode) -> int:
        """Return the largest RSS growth of an agent ``mode`` (curl's is not measured: 0)."""
        return max(one.growth_kib or 0 for one in self.samples[mode])

    def verdicts(self) -> dict[str, bool]:
        """Return each target and whether it was met."""
        limit = TARGET_GROWTH_MIB * 1024
        return {
            f"agent `upload` / `curl -T` ≥ {TARGET_RATIO}": self.ratio("agent") >= TARGET_RATIO,
            f"agent `upload_parts` / `curl -T` ≥ {TARGET_RATIO}": self.ratio("agent-parts")
            >= TARGET_RATIO,
            f"agent `upload_parts` / `curl -T` per part ≥ {TARGET_RATIO}": self.ratio(
                "agent-parts", "curl-parts"
            )
            >= TARGET_RATIO,
            f"agent peak RSS growth ≤ {TARGET_GROWTH_MIB} MiB": max(
                self.worst_growth_kib("agent"), self.worst_growth_kib("agent-parts")
            )
            <= limit,
        }


def _load_average() -> float:
    return os.getloadavg()[0]


def run_bench(setup: Setup, runs: int, warmup: int) -> Results:
    """Upload along every path ``warmup`` times unmeasured, then ``runs`` times, rotating."""
    results = Results()
    for round_ in range(-warmup, runs):
        order = MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]
        if round_ == 0:
            results.load.append(_load_average())
        for mode in order:
            done, complete_s = measure(setup, mode)
            name = "warm-up" if round_ < 0 else f"run {round_ + 1}/{runs}"
            growth = "" if done.growth_kib is None else f", RSS +{_mib(done.growth_kib)} MiB"
            print(
                f"{name:<9} {mode:<11} {done.mib_per_s:7.1f} MiB/s{growth}",
                file=sys.stderr,
                flush=True,
            )
            if round_ >= 0:
                results.samples[mode].append(done)
                if mode == "agent-parts":
                    results.completions.append(complete_s)
    results.load.append(_load_average())
    return results


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def render_table(results: Results, part_mib: int) -> str:
    """Return the results as a markdown table followed by the targets and notes."""
    labels: dict[Mode, str] = {
        "curl": "`curl -T` (reference)",
        "agent": "agent `upload` (one PUT)",
        "curl-parts": f"`curl -T` per part ({part_mib} MiB parts, reference)",
        "agent-parts": f"agent `upload_parts` ({part_mib} MiB parts)",
    }
    lines = [
        (
            "| Upload path | Median MiB/s | Each run, MiB/s | Ratio to curl | CPU s (median) "
            "| Peak RSS growth, MiB (worst run) | Peak RSS, MiB (worst run) |"
        ),
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for mode in MODES:
        uploads = results.samples[mode]
        each = ", ".join(f"{one.mib_per_s:.1f}" for one in uploads)
        cpu = statistics.median(one.cpu_s for one in uploads)
        growth = results.worst_growth_kib(mode) if mode.startswith("agent") else None
        peak = max(one.peak_kib for one in uploads)
        lines.append(
            f"| {labels[mode]} | {results.rate(mode):.1f} | {each} | {results.ratio(mode):.2f} "
            f"| {cpu:.2f} | {_mib(growth)} | {_mib(peak)} |"
        )
    count = sum(len(uploads) for uploads in results.samples.values())
    lines += ["", "Targets (ratio of median throughputs; worst run for memory):", ""]
    lines += [
        f"- {target}: {'met' if ok else 'MISSED'}" for target, ok in results.verdicts().items()
    ]
    lines.append(
        f"- objects verified (HEAD size and GET SHA-256 equal the file's): {count}/{count}"
    )
    lines += ["", "Notes:", ""]
    comparisons: list[tuple[Mode, Mode]] = [
        ("agent", "curl"),
        ("agent-parts", "curl"),
        ("agent-parts", "curl-parts"),
    ]
    for mode, reference in comparisons:
        paired = results.paired(mode, reference)
        lines.append(
            f"- {labels[mode]} / {labels[reference]}, run by run: "
            f"{', '.join(f'{r:.2f}' for r in paired)} (median {statistics.median(paired):.2f})"
        )
    if results.completions:
        lines.append(
            "- multipart times cover the part PUTs only; completing the upload (the "
            f"gateway's call) took a median {statistics.median(results.completions) * 1000:.0f} "
            "ms more"
        )
    lines.append(
        "- CPU s: the uploader process's CPU time (user + system) for the transfer; curl's "
        "includes its start-up, the agent's excludes its imports"
    )
    if len(results.load) == 2:
        lines.append(
            f"- 1-minute load average before / after the runs: {results.load[0]:.2f} / "
            f"{results.load[1]:.2f} (anything else running shares the CPUs with SeaweedFS)"
        )
    if not all(one.peak_reset for uploads in results.samples.values() for one in uploads):
        lines.append("- VmHWM could not be reset: the growth includes the imports' transient peak")
    return "\n".join(lines)


def _first_line(args: Sequence[str]) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - fixed argument lists, no shell
            args, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout.strip().splitlines() or ["unknown"])[0]


def _proc_field(path: str, name: str) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def machine(curl: str) -> list[str]:
    """Return a markdown list describing this machine and the software measured."""
    from tests.seaweedfs import WEED  # noqa: PLC0415 - pytest and botocore stay out of the child

    memory = _proc_field("/proc/meminfo", "MemTotal") or "0 kB"
    ram_gib = int(memory.split()[0]) / MIB
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    return [
        f"- CPU: {cpu}, {cores} logical cores ({usable} usable by this process)",
        f"- RAM: {ram_gib:.1f} GiB",
        f"- OS: {platform.platform()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}",
        f"- httpx: {httpx.__version__}",
        f"- curl: {' '.join(_first_line([curl, '--version']).split()[:2])}",
        f"- SeaweedFS: `weed mini` {_first_line([str(WEED), 'version'])}, on the same machine",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def section(table: str, machine_lines: Sequence[str], args: argparse.Namespace) -> str:
    """Return the "Upload throughput" section of results.md."""
    command = (
        f"python -m bench.upload --size-mb {args.size_mb} --runs {args.runs} "
        f"--warmup {args.warmup} --part-mb {args.part_mb} --write"
    )
    return "\n".join(
        [
            f"## {SECTION}",
            "",
            (
                f"A {args.size_mb} MiB random file uploaded along each path {args.runs} times "
                f"(after {args.warmup} unmeasured round), order rotated each run, to a real "
                f"SeaweedFS on loopback: `{command}`. The file is in the page cache, SeaweedFS "
                "shares the CPUs with the uploader, and MiB/s = 2^20 bytes per second timed "
                "around the transfer alone."
            ),
            "",
            *machine_lines,
            "",
            table,
            "",
        ]
    )


def replace_section(text: str, title: str, body: str) -> str:
    """Return ``text`` with its ``## title`` section replaced by ``body`` (appended if absent)."""
    pattern = re.compile(rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: body.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"


RESULTS_HEADER = """# Benchmark results

Measured figures, one section per benchmark; bench/README.md says how to run each and what its
figures mean. A benchmark's `--write` flag replaces its own section and leaves the others.
"""


def write_results(body: str) -> None:
    """Replace (or add) the "Upload throughput" section of bench/results.md."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else RESULTS_HEADER
    RESULTS.write_text(replace_section(text, SECTION, body), encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.upload", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--size-mb", type=int, default=200, help="file size in MiB (200)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each path (3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (1)")
    parser.add_argument("--part-mb", type=int, default=16, help="multipart part size in MiB (16)")
    parser.add_argument("--write", action="store_true", help="update bench/results.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the file and data go")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.runs < 1 or args.warmup < 0 or not 5 <= args.part_mb <= 5120:
        parser.error("--size-mb and --runs must be >= 1, --warmup >= 0, --part-mb in 5..5120")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code (2: curl missing, 1: error or missed target)."""
    args = parse_args(argv)
    if args.child:
        child_main()
        return 0
    curl = shutil.which("curl")
    if curl is None:
        print(
            "error: curl not found on PATH; the reference upload needs it "
            "(Debian/Ubuntu: apt-get install -y curl)",
            file=sys.stderr,
        )
        return 2
    from tests.seaweedfs import start_seaweedfs  # noqa: PLC0415 - see storage_for

    try:
        with tempfile.TemporaryDirectory(prefix="cyberun-bench-", dir=args.tmp_dir) as tmp:
            workdir = Path(tmp)
            path, size = workdir / "payload.bin", args.size_mb * MIB
            sha256 = write_random_file(path, size)
            with start_seaweedfs(workdir / "weed") as server:
                part_size = args.part_mb * MIB
                part_files = split_file(path, part_size, workdir)
                storage = storage_for(server)
                setup = Setup(curl, storage, path, size, sha256, part_size, part_files, workdir)
                results = run_bench(setup, args.runs, args.warmup)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = render_table(results, args.part_mb)
    print(table)
    if args.write:
        write_results(section(table, machine(curl), args))
        print(f"\nwrote the {SECTION!r} section of {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 1 if args.check and not all(results.verdicts().values()) else 0


if __name__ == "__main__":
    sys.exit(main())
