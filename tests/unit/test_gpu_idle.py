"""Only-when-idle: the agent's own process tree, GPU compute processes and the idle rule.

``process_tree`` is checked against real child processes (and a made-up ``/proc`` for the
awkward cases); ``GpuState.idle_problem`` as a pure rule; and the compute-process pids are
read through the real pynvml code against the compiled fake NVML (tests/nvml_fake.py).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.health import GpuState, process_tree
from agent.nvml import Gpu, GpuReading, Inventory
from tests.nvml_fake import FakeGpu, nvml_env, write_scenario

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0  # hang guard for every child process and every line we wait for
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

# A child that blocks on stdin; with an argument it first starts one such child of its own
# (and prints its pid), and renames itself (prctl PR_SET_NAME) to a tricky comm.
BLOCKER = textwrap.dedent(
    """
    import ctypes, subprocess, sys
    if len(sys.argv) > 1:
        ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
        grandchild = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                      stdin=subprocess.PIPE)
        print(grandchild.pid, flush=True)
    sys.stdin.read()
    if len(sys.argv) > 1:
        grandchild.stdin.close()
        grandchild.wait()
    """
)


def read_line(proc: subprocess.Popen[str]) -> str:
    """Return the next stdout line of ``proc``, failing (not hanging) if none comes in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
    assert ready, "the child printed nothing in time"
    return proc.stdout.readline().strip()


@contextmanager
def blocker(*args: str) -> Iterator[subprocess.Popen[str]]:
    """Run BLOCKER until the block ends (its stdin closes), then reap it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


# ------------------------------------------------------------------ process_tree


@linux_only
def test_process_tree_holds_children_and_grandchildren() -> None:
    """A live child and grandchild are in our tree; the child's tree is exactly the two."""
    with blocker("x) (y z) q") as child:
        grandchild = int(read_line(child))
        stat = Path(f"/proc/{child.pid}/stat").read_bytes()
        assert stat.startswith(f"{child.pid} (x) (y z) q) ".encode())  # comm with ") ("
        ours = process_tree(os.getpid())
        assert {os.getpid(), child.pid, grandchild} <= ours
        assert os.getppid() not in ours
        assert process_tree(child.pid) == {child.pid, grandchild}


@linux_only
def test_process_tree_of_a_childless_process_is_itself() -> None:
    """A process without children is its own whole tree."""
    with blocker() as child:
        assert process_tree(child.pid) == {child.pid}


def write_stat(proc: Path, pid: str, text: bytes | None) -> None:
    """Make ``proc/<pid>`` with a ``stat`` holding ``text`` (``None``: the process vanished)."""
    (proc / pid).mkdir()
    if text is not None:
        (proc / pid / "stat").write_bytes(text)


def test_process_tree_tolerates_odd_and_vanishing_entries(tmp_path: Path) -> None:
    """Spaces, parentheses and bad bytes in comm parse; vanished and malformed entries skip."""
    write_stat(tmp_path, "1", b"1 (init) S 0 1 1 0 -1\n")
    write_stat(tmp_path, "10", b"10 (a (b) c) S 1 10 10 0 -1\n")
    write_stat(tmp_path, "13", b"13 (\xff) ) R 10 13 13 0 -1\n")
    write_stat(tmp_path, "14", b"14 (worker) S 13 13 13 0 -1\n")
    write_stat(tmp_path, "11", None)  # exited between the listing and the read
    write_stat(tmp_path, "12", b"12 (truncated")  # no closing parenthesis
    write_stat(tmp_path, "15", b"15 (odd) S x 1 1\n")  # ppid not a number
    write_stat(tmp_path, "20", b"20 (other) S 99 20 20 0 -1\n")  # another tree
    write_stat(tmp_path, "self", b"1 (init) S 0\n")  # not a pid directory
    assert process_tree(1, proc=tmp_path) == {1, 10, 13, 14}
    assert process_tree(13, proc=tmp_path) == {13, 14}
    assert process_tree(20, proc=tmp_path) == {20}
    assert process_tree(777, proc=tmp_path) == {777}  # not running: itself alone


def test_process_tree_without_proc_is_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No /proc to read, or not Linux: the tree is the root alone."""
    assert process_tree(5, proc=tmp_path / "absent") == {5}
    write_stat(tmp_path, "6", b"6 (child) S 5 6 6 0 -1\n")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert process_tree(5, proc=tmp_path) == {5}


# ------------------------------------------------------------------ idle_problem


def state(*readings: GpuReading, problems: dict[int, str] | None = None) -> GpuState:
    """A sample with one GPU per reading (same index) and these problems."""
    gpus = tuple(Gpu(index=r.index, name=f"GPU model {r.index}") for r in readings)
    return GpuState(inventory=Inventory(gpus=gpus), readings=readings, problems=problems or {})


def idle(gpus: GpuState, *, own: Collection[int] = (), max_util: float = 10.0) -> str | None:
    """``gpus.idle_problem`` with processes checked."""
    return gpus.idle_problem(own_pids=own, max_utilization=max_util, check_processes=True)


def test_no_gpus_is_idle() -> None:
    """A machine without GPUs (CPU-only or NVML missing) is idle."""
    assert idle(GpuState()) is None
    assert idle(GpuState(nvml="the NVIDIA driver is not loaded")) is None


def test_utilisation_at_or_above_the_threshold_is_busy() -> None:
    """Below max_utilization is idle; at or above it names the GPU, its load and the setting."""
    assert idle(state(GpuReading(0, utilization=9.9), GpuReading(1, utilization=0.0))) is None
    busy = state(GpuReading(0, utilization=3.0), GpuReading(1, utilization=35.0))
    assert idle(busy) == "GPU 1 is 35 % busy (pools.community.idle_max_utilization is 10)"
    assert idle(state(GpuReading(0, utilization=10.0))) == (
        "GPU 0 is 10 % busy (pools.community.idle_max_utilization is 10)"
    )
    assert idle(busy, max_util=101.0) is None  # our own task runs: utilisation does not count


def test_foreign_compute_process_is_busy() -> None:
    """A compute pid outside own_pids is busy; our own pids are not, nor any with the check off."""
    ours = state(GpuReading(0, utilization=0.0, processes=(100, 101)))
    assert idle(ours, own=frozenset({1, 100, 101})) is None
    foreign = state(GpuReading(0, processes=()), GpuReading(1, processes=(100, 1234)))
    assert idle(foreign, own={100}) == "GPU 1 runs a process that is not the agent's (pid 1234)"
    assert foreign.idle_problem(own_pids={100}, max_utilization=10, check_processes=False) is None


def test_many_foreign_processes_are_listed_briefly() -> None:
    """Several foreign pids: the count and the first five."""
    crowd = state(GpuReading(0, processes=(1, 2, 3, 4, 5, 6, 7)))
    assert idle(crowd, own=[7]) == (
        "GPU 0 runs 6 processes that are not the agent's (pids 1, 2, 3, 4, 5, ...)"
    )
    assert idle(state(GpuReading(0, processes=(8, 9)))) == (
        "GPU 0 runs 2 processes that are not the agent's (pids 8, 9)"
    )


def test_missing_readings_do_not_make_a_gpu_busy() -> None:
    """No utilisation, no process list (NVML cannot tell) or no reading at all reads as idle."""
    unknown = state(GpuReading(0), GpuReading(1, utilization=None, processes=None))
    assert idle(unknown) is None
    unread = GpuState(inventory=Inventory(gpus=(Gpu(index=0), Gpu(index=1))))
    assert idle(unread) is None


def test_unusable_gpus_are_not_judged() -> None:
    """A GPU with a health problem is not offered work, so its load does not count."""
    hot = state(
        GpuReading(0, utilization=99.0, processes=(4321,)),
        GpuReading(1, utilization=1.0),
        problems={0: "GPU 0 is too hot"},
    )
    assert idle(hot) is None


# ------------------------------------------------------------------ through pynvml

AGENT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    print(os.getpid(), flush=True)
    sys.stdin.readline()  # the test writes the scenario now
    from agent.health import GpuMonitor, GpuPolicy, process_tree
    monitor = GpuMonitor(GpuPolicy())
    state = monitor.start()
    problem = state.idle_problem(
        own_pids=process_tree(os.getpid()), max_utilization=50.0, check_processes=True
    )
    monitor.close()
    out = {
        "processes": [r.processes and list(r.processes) for r in state.readings],
        "errors": [list(r.errors) for r in state.readings],
        "idle": problem,
    }
    print("RESULT " + json.dumps(out), flush=True)
    """
)
BOTH = ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2")


def run_agent_sample(lib: Path, scenario: Path, gpus: Callable[[int], list[FakeGpu]]) -> object:
    """Sample the GPUs in a fresh agent process whose pid ``gpus(pid)`` may put in the scenario."""
    env = os.environ | nvml_env(lib, scenario) | {"PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            write_scenario(scenario, gpus(int(read_line(proc))))
            stdout, stderr = proc.communicate("\n", timeout=TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode == 0, stderr
    result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, stdout
    return json.loads(result[0].removeprefix("RESULT "))


@pytest.mark.parametrize("omit", [(), BOTH[:1]], ids=["v3", "v2-fallback"])
def test_agent_reads_compute_pids_through_pynvml(
    fake_nvml_lib_factory: Callable[[Sequence[str]], Path], tmp_path: Path, omit: tuple[str, ...]
) -> None:
    """The agent's pynvml path lists each GPU's compute pids (via _v2 when _v3 is missing)."""
    test_pid = os.getpid()  # not in the agent's tree: a foreign process to it

    def gpus(agent_pid: int) -> list[FakeGpu]:
        return [
            FakeGpu(util_gpu=5, processes=((agent_pid, 1 << 20),)),
            FakeGpu(util_gpu=5, processes=((agent_pid, 0), (test_pid, None))),
            FakeGpu(util_gpu=5, processes=()),
        ]

    out = run_agent_sample(fake_nvml_lib_factory(omit), tmp_path / "nvml.txt", gpus)
    assert isinstance(out, dict)
    agent_pid = out["processes"][0][0]
    assert out == {
        "processes": [[agent_pid], [agent_pid, test_pid], []],
        "errors": [[], [], []],
        "idle": f"GPU 1 runs a process that is not the agent's (pid {test_pid})",
    }


def test_agent_without_process_functions_reads_none_and_idle(
    fake_nvml_lib_factory: Callable[[Sequence[str]], Path], tmp_path: Path
) -> None:
    """A driver lacking both process functions, or a GPU not supporting it: None, no error."""

    def gpus(agent_pid: int) -> list[FakeGpu]:
        return [FakeGpu(util_gpu=5, processes=((agent_pid + 1, 0),)), FakeGpu(processes=None)]

    out = run_agent_sample(fake_nvml_lib_factory(BOTH), tmp_path / "nvml.txt", gpus)
    assert out == {"processes": [None, None], "errors": [[], []], "idle": None}
    unsupported = run_agent_sample(fake_nvml_lib_factory(()), tmp_path / "nvml.txt", gpus)
    assert isinstance(unsupported, dict)
    assert unsupported["processes"][1] is None
    assert unsupported["errors"] == [[], []]
