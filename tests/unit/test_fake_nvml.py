"""The compiled fake NVML behaves as specified, seen through the real pynvml in a subprocess.

Each test writes a scenario, starts ``python -c <script>`` with the fake on ``LD_LIBRARY_PATH``
and reads back what pynvml returned (JSON on stdout; an ``NVMLError`` becomes its class name).
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.nvml_fake import (
    EXPORTED,
    FakeGpu,
    build_fake_nvml,
    nvml_env,
    scenario_text,
    write_scenario,
)

TIMEOUT_S = 30.0  # hang guard for every subprocess and every line we wait for

PRELUDE = textwrap.dedent(
    """
    import ctypes, json, sys
    import pynvml

    def attempt(call, *args):
        try:
            return call(*args)
        except pynvml.NVMLError as error:
            return type(error).__name__

    def checkpoint(value):
        print(json.dumps(value), flush=True)
        sys.stdin.readline()
    """
)

RTX_4090 = FakeGpu(
    name="NVIDIA GeForce RTX 4090",
    uuid="GPU-11111111-2222-3333-4444-555555555555",
    total=25_757_220_864,
    used=1_073_741_824,
    cc=(8, 9),
    mig=False,
    bus="00000000:01:00.0",
    power_limit_mw=450_000,
    power_mw=61_250,
    temp=47,
    util_gpu=12,
    util_mem=4,
    throttle=0x1,  # GPU idle
    ecc_uncorrected=None,  # GeForce: no ECC
)
H100 = FakeGpu(
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    total=85_520_809_984,
    used=0,
    cc=(9, 0),
    mig=True,
    bus="00000001:C1:00.0",
    power_limit_mw=700_000,
    power_mw=312_000,
    temp=71,
    util_gpu=98,
    util_mem=55,
    throttle=0x28,  # SW thermal slowdown | HW slowdown
    ecc_uncorrected=3,
)
READ_DEVICE = """
def device(i):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    m = pynvml.nvmlDeviceGetMemoryInfo(h)
    m2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    pci = pynvml.nvmlDeviceGetPciInfo(h)
    return {
        "index": pynvml.nvmlDeviceGetIndex(h),
        "name": pynvml.nvmlDeviceGetName(h),
        "uuid": pynvml.nvmlDeviceGetUUID(h),
        "memory": [m.total, m.free, m.used],
        "memory_v2": [m2.total, m2.reserved, m2.free, m2.used],
        "cc": list(pynvml.nvmlDeviceGetCudaComputeCapability(h)),
        "mig": pynvml.nvmlDeviceGetMigMode(h),
        "pci": [pci.busId, pci.busIdLegacy, pci.domain, pci.bus, pci.device],
        "power_limit": [pynvml.nvmlDeviceGetEnforcedPowerLimit(h),
                        pynvml.nvmlDeviceGetPowerManagementLimit(h)],
    }
"""


def run_pynvml(env: dict[str, str], body: str) -> Any:
    """Run ``body`` (which sets ``out``) after PRELUDE in a fresh interpreter; return ``out``."""
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # the whole of stdout: the fake prints nothing there


def run_interactive(env: dict[str, str], body: str, actions: Sequence[Callable[[], None]]) -> Any:
    """Run ``body``, doing ``actions[i]`` while the script waits at its i-th ``checkpoint()``.

    Returns the checkpoint values followed by the final ``out``.
    """
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    seen: list[Any] = []
    with subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            for action in actions:
                ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
                assert ready, "the script did not reach its checkpoint in time"
                seen.append(json.loads(proc.stdout.readline()))
                action()
                proc.stdin.write("\n")
                proc.stdin.flush()
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode == 0, stderr
    return [*seen, json.loads(stdout)]


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    """The scenario file path of one test (written by the test)."""
    return tmp_path / "nvml-scenario.txt"


@pytest.fixture
def env(fake_nvml_lib: Path, scenario: Path) -> dict[str, str]:
    """A subprocess environment that loads the complete fake and reads ``scenario``."""
    return os.environ | nvml_env(fake_nvml_lib, scenario)


def test_static_fields_of_two_gpus(env: dict[str, str], scenario: Path) -> None:
    """Count, names, UUIDs, memory, compute capability, MIG, PCI, power limits and versions."""
    write_scenario(scenario, [RTX_4090, H100], driver_version="550.54.15", cuda_version=12040)
    out = run_pynvml(
        env,
        READ_DEVICE
        + textwrap.dedent(
            """
        pynvml.nvmlInit()
        out = {
            "count": pynvml.nvmlDeviceGetCount(),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "cuda": [pynvml.nvmlSystemGetCudaDriverVersion(),
                     pynvml.nvmlSystemGetCudaDriverVersion_v2()],
            "gpus": [device(0), device(1)],
        }
        pynvml.nvmlShutdown()
        """
        ),
    )
    assert out["count"] == 2
    assert out["driver"] == "550.54.15"
    assert out["cuda"] == [12040, 12040]
    rtx, h100 = out["gpus"]
    assert rtx == {
        "index": 0,
        "name": "NVIDIA GeForce RTX 4090",
        "uuid": "GPU-11111111-2222-3333-4444-555555555555",
        "memory": [25_757_220_864, 25_757_220_864 - 1_073_741_824, 1_073_741_824],
        "memory_v2": [25_757_220_864, 0, 25_757_220_864 - 1_073_741_824, 1_073_741_824],
        "cc": [8, 9],
        "mig": [0, 0],
        "pci": ["00000000:01:00.0", "0000:01:00.0", 0, 1, 0],
        "power_limit": [450_000, 450_000],
    }
    assert h100 == {
        "index": 1,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "memory": [85_520_809_984, 85_520_809_984, 0],
        "memory_v2": [85_520_809_984, 0, 85_520_809_984, 0],
        "cc": [9, 0],
        "mig": [1, 1],
        "pci": ["00000001:C1:00.0", "0001:C1:00.0", 1, 0xC1, 0],
        "power_limit": [700_000, 700_000],
    }


def test_live_readings(env: dict[str, str], scenario: Path) -> None:
    """Utilization, temperature, power, clock event/throttle reasons and ECC counts read back."""
    write_scenario(scenario, [RTX_4090, H100])
    out = run_pynvml(
        env,
        """
        pynvml.nvmlInit()
        def live(i):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            u = pynvml.nvmlDeviceGetUtilizationRates(h)
            ecc = pynvml.nvmlDeviceGetTotalEccErrors
            return {
                "util": [u.gpu, u.memory],
                "temp": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                "power": pynvml.nvmlDeviceGetPowerUsage(h),
                "reasons": [pynvml.nvmlDeviceGetCurrentClocksEventReasons(h),
                            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)],
                "ecc": [
                    attempt(ecc, h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                            pynvml.NVML_VOLATILE_ECC),
                    attempt(ecc, h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                            pynvml.NVML_AGGREGATE_ECC),
                    attempt(ecc, h, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                            pynvml.NVML_VOLATILE_ECC),
                ],
            }
        out = [live(0), live(1)]
        """,
    )
    assert out == [
        {
            "util": [12, 4],
            "temp": 47,
            "power": 61_250,
            "reasons": [1, 1],
            "ecc": ["NVMLError_NotSupported"] * 3,
        },
        {
            "util": [98, 55],
            "temp": 71,
            "power": 312_000,
            "reasons": [0x28, 0x28],
            "ecc": [3, 3, 0],
        },
    ]


def test_handwritten_scenario_format(env: dict[str, str], scenario: Path) -> None:
    """Comments, blank lines, spaces around '=', quoted values with '#', hex and quoted "na"."""
    scenario.write_text(
        textwrap.dedent(
            """\
            # a comment line

              init   =   ok     # trailing comment
            driver_version = "555.42.02"
            cuda_version=12050
            gpu name="Fake # GPU  one" uuid=GPU-x throttle=0X40 temp = 0x3C  # hex, spaced
            gpu name="na" uuid=na
            """
        ),
        encoding="utf-8",
    )
    out = run_pynvml(
        env,
        """
        pynvml.nvmlInit()
        a, b = (pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(2))
        out = [pynvml.nvmlSystemGetDriverVersion(), pynvml.nvmlSystemGetCudaDriverVersion(),
               pynvml.nvmlDeviceGetName(a), pynvml.nvmlDeviceGetUUID(a),
               pynvml.nvmlDeviceGetCurrentClocksEventReasons(a),
               pynvml.nvmlDeviceGetTemperature(a, 0),
               attempt(pynvml.nvmlDeviceGetPowerUsage, a),
               pynvml.nvmlDeviceGetName(b), attempt(pynvml.nvmlDeviceGetUUID, b)]
        """,
    )
    assert out == [
        "555.42.02",
        12050,
        "Fake # GPU  one",
        "GPU-x",
        0x40,
        60,
        "NVMLError_NotSupported",  # a field left out is not supported
        "na",  # quoted: the string, not `na`
        "NVMLError_NotSupported",
    ]


def test_na_fields_raise_not_supported(env: dict[str, str], scenario: Path) -> None:
    """A field set to na makes exactly its query raise NVMLError_NotSupported."""
    na_everywhere = FakeGpu(
        name=None,
        uuid=None,
        total=None,
        used=None,
        cc=None,
        mig=None,
        bus=None,
        power_limit_mw=None,
        power_mw=None,
        temp=None,
        util_gpu=None,
        util_mem=None,
        throttle=None,
        ecc_uncorrected=None,
    )
    write_scenario(scenario, [na_everywhere, FakeGpu(util_mem=None)], driver_version=None)
    out = run_pynvml(
        env,
        """
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        calls = [
            lambda: pynvml.nvmlDeviceGetName(h),
            lambda: pynvml.nvmlDeviceGetUUID(h),
            lambda: pynvml.nvmlDeviceGetMemoryInfo(h),
            lambda: pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2),
            lambda: pynvml.nvmlDeviceGetCudaComputeCapability(h),
            lambda: pynvml.nvmlDeviceGetMigMode(h),
            lambda: pynvml.nvmlDeviceGetPciInfo(h),
            lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h),
            lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h),
            lambda: pynvml.nvmlDeviceGetPowerUsage(h),
            lambda: pynvml.nvmlDeviceGetTemperature(h, 0),
            lambda: pynvml.nvmlDeviceGetUtilizationRates(h),
            lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(h),
            lambda: pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h),
            lambda: pynvml.nvmlDeviceGetTotalEccErrors(h, 1, 0),
            lambda: pynvml.nvmlSystemGetDriverVersion(),
        ]
        other = pynvml.nvmlDeviceGetHandleByIndex(1)
        out = {
            "na": [attempt(call) for call in calls],
            "index": pynvml.nvmlDeviceGetIndex(h),
            "cuda": pynvml.nvmlSystemGetCudaDriverVersion(),
            "other": [attempt(pynvml.nvmlDeviceGetUtilizationRates, other),
                      pynvml.nvmlDeviceGetTemperature(other, 0)],
        }
        """,
    )
    assert out == {
        "na": ["NVMLError_NotSupported"] * 16,
        "index": 0,
        "cuda": 12040,
        "other": ["NVMLError_NotSupported", 45],  # one na utilization field: no utilization
    }


def test_lost_gpu_raises_gpu_is_lost(env: dict[str, str], scenario: Path) -> None:
    """lost=1: the handle lookup raises NVMLError_GpuIsLost; the other GPU still answers."""
    write_scenario(scenario, [FakeGpu(lost=True), FakeGpu(name="healthy")])
    out = run_pynvml(
        env,
        """
        pynvml.nvmlInit()
        out = [pynvml.nvmlDeviceGetCount(), attempt(pynvml.nvmlDeviceGetHandleByIndex, 0),
               pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(1))]
        """,
    )
    assert out == [2, "NVMLError_GpuIsLost", "healthy"]


def test_gpu_lost_while_running(env: dict[str, str], scenario: Path) -> None:
    """A handle taken before the GPU is lost raises NVMLError_GpuIsLost on every query after."""
    write_scenario(scenario, [FakeGpu(uuid="GPU-1")])
    body = """
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        checkpoint(pynvml.nvmlDeviceGetUUID(h))
        out = [attempt(call, h) for call in (
            pynvml.nvmlDeviceGetUUID, pynvml.nvmlDeviceGetIndex, pynvml.nvmlDeviceGetMemoryInfo,
            pynvml.nvmlDeviceGetPowerUsage, pynvml.nvmlDeviceGetUtilizationRates,
            pynvml.nvmlDeviceGetCurrentClocksEventReasons)]
        """

    def fall_off_the_bus() -> None:
        write_scenario(scenario, [FakeGpu(uuid="GPU-1", lost=True)])

    first, after = run_interactive(env, body, [fall_off_the_bus])
    assert first == "GPU-1"
    assert after == ["NVMLError_GpuIsLost"] * 6


@pytest.mark.parametrize(
    ("init", "error"),
    [
        ("driver_not_loaded", "NVMLError_DriverNotLoaded"),
        ("no_permission", "NVMLError_NoPermission"),
        ("unknown_error", "NVMLError_Unknown"),
    ],
)
def test_init_failure_from_scenario(
    env: dict[str, str], scenario: Path, init: str, error: str
) -> None:
    """init=<failure> makes nvmlInit raise the matching NVMLError; later calls are uninitialised."""
    write_scenario(scenario, [FakeGpu()], init=init)
    out = run_pynvml(
        env,
        """
        out = [attempt(pynvml.nvmlInit), attempt(pynvml.nvmlDeviceGetCount),
               attempt(pynvml.nvmlShutdown)]
        """,
    )
    assert out == [error, "NVMLError_Uninitialized", "NVMLError_Uninitialized"]


def test_missing_or_unset_config_fails_init(fake_nvml_lib: Path, tmp_path: Path) -> None:
    """A missing, unreadable or unset FAKE_NVML_CONFIG makes nvmlInit raise NVMLError_Unknown."""
    missing = os.environ | nvml_env(fake_nvml_lib, tmp_path / "absent.txt")
    unset = {k: v for k, v in missing.items() if k != "FAKE_NVML_CONFIG"}
    directory = missing | {"FAKE_NVML_CONFIG": str(tmp_path)}
    body = "out = attempt(pynvml.nvmlInit)"
    assert run_pynvml(missing, body) == "NVMLError_Unknown"
    assert run_pynvml(unset, body) == "NVMLError_Unknown"
    assert run_pynvml(directory, body) == "NVMLError_Unknown"


@pytest.mark.parametrize(
    "line",
    [
        "gpu temp_c=40",  # unknown field
        "gpu temp=-1",  # negative
        "gpu temp=4294967296",  # over unsigned int
        "gpu temp=12abc",  # trailing junk
        "gpu temp",  # no value
        "gpu temp=1 temp=2",  # twice
        'gpu name="unterminated',
        "gpu total=10 used=11",  # used > total
        "gpu bus=0:1:0.1",  # not function 0
        "gpu cc=9",  # not major.minor
        "gpu lost=na",  # lost cannot be na
        "init = maybe",
        "cuda_version = 12.4",
        "driver_version = 1 2",  # trailing text
        "frobnicate = 1",  # unknown key
        "gpu processes=1234",  # no bytes
        "gpu processes=1234:",  # empty bytes
        "gpu processes=1:2,",  # trailing comma
        "gpu processes=1:2,,3:4",  # empty item
        "gpu processes=-1:0",  # negative pid
        "gpu processes=4294967296:0",  # pid over unsigned int
        "gpu processes=1:2x",  # junk bytes
        "gpu processes=" + ",".join(f"{pid}:0" for pid in range(1, 66)),  # over 64
    ],
)
def test_malformed_scenario_fails_init(env: dict[str, str], scenario: Path, line: str) -> None:
    """A malformed line fails nvmlInit with NVMLError_Unknown and says why on stderr if asked."""
    scenario.write_text(f"init = ok\n{line}\n", encoding="utf-8")
    script = PRELUDE + "print(json.dumps(attempt(pynvml.nvmlInit)))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env | {"FAKE_NVML_DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert json.loads(result.stdout) == "NVMLError_Unknown"
    assert re.search(r"fake_nvml: .* line 2: ", result.stderr), result.stderr


def test_compute_processes_through_pynvml(env: dict[str, str], scenario: Path) -> None:
    """processes=: pynvml's _v3, _v2 and unversioned calls list them; none is []; na unsupported."""
    gpus = [
        FakeGpu(processes=((1234, 104_857_600), (5678, None), (42, 0))),
        FakeGpu(processes=()),
        FakeGpu(processes=None),
    ]
    write_scenario(scenario, gpus)
    out = run_pynvml(
        env,
        """
        pynvml.nvmlInit()
        h = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(3)]
        def procs(call, handle):
            found = attempt(call, handle)
            if isinstance(found, str):
                return found
            return [[p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId]
                    for p in found]
        calls = (pynvml.nvmlDeviceGetComputeRunningProcesses_v3,
                 pynvml.nvmlDeviceGetComputeRunningProcesses_v2,
                 pynvml.nvmlDeviceGetComputeRunningProcesses)
        out = [[procs(call, handle) for call in calls] for handle in h]
        """,
    )
    listed = [
        [1234, 104_857_600, 0xFFFFFFFF, 0xFFFFFFFF],
        [5678, None, 0xFFFFFFFF, 0xFFFFFFFF],  # NVML_VALUE_NOT_AVAILABLE: pynvml says None
        [42, 0, 0xFFFFFFFF, 0xFFFFFFFF],
    ]
    assert out == [[listed] * 3, [[]] * 3, ["NVMLError_NotSupported"] * 3]


def test_compute_processes_two_call_protocol(env: dict[str, str], scenario: Path) -> None:
    """A count too small (0 with NULL infos) returns INSUFFICIENT_SIZE and the count needed."""
    write_scenario(scenario, [FakeGpu(processes=((7, 1), (8, 2))), FakeGpu(processes=())])
    out = run_pynvml(
        env,
        """
        pynvml.nvmlInit()
        busy = pynvml.nvmlDeviceGetHandleByIndex(0)
        empty = pynvml.nvmlDeviceGetHandleByIndex(1)
        lib = pynvml.nvmlLib
        def call(name, handle, count, size):
            n = ctypes.c_uint(count)
            infos = (pynvml.c_nvmlProcessInfo_v3_t * size)() if size else None
            code = getattr(lib, name)(handle, ctypes.byref(n), infos)
            pids = [infos[i].pid for i in range(min(n.value, size))] if code == 0 else []
            return [code, n.value, pids]
        v3 = "nvmlDeviceGetComputeRunningProcesses_v3"
        out = {
            "ask": call(v3, busy, 0, 0),
            "short": call(v3, busy, 1, 1),
            "exact": call(v3, busy, 2, 2),
            "roomy": call(v3, busy, 9, 9),
            "v2": call("nvmlDeviceGetComputeRunningProcesses_v2", busy, 0, 0),
            "empty": call(v3, empty, 0, 0),
            "null_infos": call(v3, busy, 2, 0),
            "null_count": lib.nvmlDeviceGetComputeRunningProcesses_v3(busy, None, None),
        }
        """,
    )
    assert out == {
        "ask": [7, 2, []],  # NVML_ERROR_INSUFFICIENT_SIZE, the count needed
        "short": [7, 2, []],
        "exact": [0, 2, [7, 8]],
        "roomy": [0, 2, [7, 8]],
        "v2": [7, 2, []],
        "empty": [0, 0, []],  # no process: success at the first call
        "null_infos": [2, 2, []],  # NVML_ERROR_INVALID_ARGUMENT
        "null_count": 2,
    }


def test_omitted_compute_processes_raise_function_not_found(
    fake_nvml_lib_factory: Callable[[Sequence[str]], Path], scenario: Path
) -> None:
    """A build without the process functions raises FunctionNotFound (unversioned: mismatch)."""
    lib = fake_nvml_lib_factory(
        ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2")
    )
    write_scenario(scenario, [FakeGpu(processes=((1, 1),))])
    out = run_pynvml(
        os.environ | nvml_env(lib, scenario),
        """
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        try:
            pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            unversioned = "no error"
        except pynvml.NVMLLibraryMismatchError as error:
            unversioned = type(error).__name__
        out = [attempt(pynvml.nvmlDeviceGetComputeRunningProcesses_v3, h),
               attempt(pynvml.nvmlDeviceGetComputeRunningProcesses_v2, h), unversioned]
        """,
    )
    assert out == [
        "NVMLError_FunctionNotFound",
        "NVMLError_FunctionNotFound",
        "NVMLLibraryMismatchError",
    ]


def test_omitted_function_raises_function_not_found(
    fake_nvml_lib_factory: Callable[[Sequence[str]], Path], scenario: Path
) -> None:
    """A build without nvmlDeviceGetPowerUsage raises NVMLError_FunctionNotFound for it alone."""
    lib = fake_nvml_lib_factory(("nvmlDeviceGetPowerUsage",))
    write_scenario(scenario, [FakeGpu(name="no power", temp=50)])
    out = run_pynvml(
        os.environ | nvml_env(lib, scenario),
        """
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out = [attempt(pynvml.nvmlDeviceGetPowerUsage, h), pynvml.nvmlDeviceGetName(h),
               pynvml.nvmlDeviceGetTemperature(h, 0), pynvml.nvmlDeviceGetEnforcedPowerLimit(h)]
        """,
    )
    assert out == ["NVMLError_FunctionNotFound", "no power", 50, 450_000]


def test_rewriting_scenario_changes_temperature(env: dict[str, str], scenario: Path) -> None:
    """The fake re-reads the scenario on each query: a rewrite mid-process changes the reading."""
    write_scenario(scenario, [FakeGpu(temp=45)])
    body = """
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        checkpoint(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        out = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        """

    def heat_up() -> None:
        write_scenario(scenario, [FakeGpu(temp=91)])

    assert run_interactive(env, body, [heat_up]) == [45, 91]


def test_broken_rewrite_fails_queries_until_fixed(env: dict[str, str], scenario: Path) -> None:
    """A malformed rewrite makes queries raise NVMLError_Unknown; a good one makes them work."""
    write_scenario(scenario, [FakeGpu(power_mw=1000)])
    body = """
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        checkpoint(pynvml.nvmlDeviceGetPowerUsage(h))
        checkpoint(attempt(pynvml.nvmlDeviceGetPowerUsage, h))
        out = pynvml.nvmlDeviceGetPowerUsage(h)
        """

    def break_it() -> None:
        scenario.write_text("gpu power_mw=oops\n", encoding="utf-8")

    def fix_it() -> None:
        write_scenario(scenario, [FakeGpu(power_mw=2000)])

    assert run_interactive(env, body, [break_it, fix_it]) == [1000, "NVMLError_Unknown", 2000]


def test_init_is_reference_counted(env: dict[str, str], scenario: Path) -> None:
    """N inits need N shutdowns (nvmlInit and nvmlInit_v2 count too); then calls are refused."""
    write_scenario(scenario, [FakeGpu()])
    out = run_pynvml(
        env,
        """
        lib_count = ctypes.c_uint()
        pynvml.nvmlInit()
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        steps = [pynvml.nvmlDeviceGetCount()]
        pynvml.nvmlShutdown()
        steps.append(attempt(pynvml.nvmlDeviceGetCount))
        steps.append(attempt(pynvml.nvmlShutdown))
        lib = pynvml.nvmlLib
        steps += [lib.nvmlInit_v2(), lib.nvmlInit(), lib.nvmlShutdown(),
                  lib.nvmlDeviceGetCount_v2(ctypes.byref(lib_count)), lib_count.value,
                  lib.nvmlShutdown(), lib.nvmlDeviceGetCount_v2(ctypes.byref(lib_count))]
        out = steps
        """,
    )
    assert out == [1, "NVMLError_Uninitialized", "NVMLError_Uninitialized", 0, 0, 0, 0, 1, 0, 1]


def test_invalid_arguments_and_small_buffers(env: dict[str, str], scenario: Path) -> None:
    """Bad index, sensor, ECC type, struct version, null pointers and short buffers are refused."""
    write_scenario(scenario, [FakeGpu(name="NVIDIA GeForce RTX 4090")])
    out = run_pynvml(
        env,
        """
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        lib = pynvml.nvmlLib
        small = ctypes.create_string_buffer(8)
        exact = ctypes.create_string_buffer(len("NVIDIA GeForce RTX 4090") + 1)
        out = {
            "index": attempt(pynvml.nvmlDeviceGetHandleByIndex, 1),
            "sensor_max": attempt(pynvml.nvmlDeviceGetTemperature, h, 1),
            "sensor_bad": attempt(pynvml.nvmlDeviceGetTemperature, h, 77),
            "ecc_type": attempt(pynvml.nvmlDeviceGetTotalEccErrors, h, 5, 0),
            "ecc_counter": attempt(pynvml.nvmlDeviceGetTotalEccErrors, h, 1, 5),
            "mem_version": attempt(pynvml.nvmlDeviceGetMemoryInfo, h, 123),
            "null_out": lib.nvmlDeviceGetPowerUsage(h, None),
            "null_handle": lib.nvmlDeviceGetPowerUsage(pynvml.c_nvmlDevice_t(), None),
            "bogus_handle": lib.nvmlDeviceGetName(ctypes.c_void_p(8), exact, ctypes.c_uint(64)),
            "null_count": lib.nvmlDeviceGetCount_v2(None),
            "small": lib.nvmlDeviceGetName(h, small, ctypes.c_uint(8)),
            "exact": [lib.nvmlDeviceGetName(h, exact, ctypes.c_uint(len(exact))),
                      exact.value.decode()],
            "driver_small": lib.nvmlSystemGetDriverVersion(small, ctypes.c_uint(4)),
            "strings": [pynvml.nvmlErrorString(code)
                        for code in (0, 3, 15, 999, 12345)],
        }
        """,
    )
    assert out == {
        "index": "NVMLError_InvalidArgument",
        "sensor_max": "NVMLError_NotSupported",  # a real sensor the fake does not model
        "sensor_bad": "NVMLError_InvalidArgument",
        "ecc_type": "NVMLError_InvalidArgument",
        "ecc_counter": "NVMLError_InvalidArgument",
        "mem_version": "NVMLError_ArgumentVersionMismatch",
        "null_out": 2,
        "null_handle": 2,
        "bogus_handle": 2,
        "null_count": 2,
        "small": 7,
        "exact": [0, "NVIDIA GeForce RTX 4090"],
        "driver_small": 7,
        "strings": ["Success", "Not Supported", "GPU is lost", "Unknown Error", "Unknown Error"],
    }


def test_concurrent_queries_from_threads(env: dict[str, str], scenario: Path) -> None:
    """Queries from eight threads at once all succeed (the fake serialises its re-reads)."""
    write_scenario(scenario, [FakeGpu(temp=50), FakeGpu(temp=60)])
    out = run_pynvml(
        env,
        """
        import concurrent.futures
        pynvml.nvmlInit()
        def work(i):
            h = pynvml.nvmlDeviceGetHandleByIndex(i % 2)
            return sum(pynvml.nvmlDeviceGetTemperature(h, 0) for _ in range(200))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            out = list(pool.map(work, range(8)))
        """,
    )
    assert out == [10_000, 12_000] * 4


def dynamic_symbols(lib_dir: Path) -> set[str]:
    """Return the functions a built library defines in its dynamic symbol table."""
    result = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib_dir / "libnvidia-ml.so.1")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    )
    return {line.split()[-1] for line in result.stdout.splitlines() if " T " in line}


def test_exports_exactly_the_listed_functions(
    fake_nvml_lib: Path, fake_nvml_lib_factory: Callable[[Sequence[str]], Path]
) -> None:
    """The library exports exactly EXPORTED, and a build omitting all of them exports none."""
    assert dynamic_symbols(fake_nvml_lib) == set(EXPORTED)
    assert dynamic_symbols(fake_nvml_lib_factory(EXPORTED)) == set()


def test_exported_names_are_the_ones_pynvml_looks_up() -> None:
    """Every export but nvmlInit/nvmlInit_v2 is a name pynvml passes to _nvmlGetFunctionPointer."""
    spec = importlib.util.find_spec("pynvml")
    assert spec is not None
    assert spec.origin is not None
    source = Path(spec.origin).read_text(encoding="utf-8")
    looked_up = set(re.findall(r'_nvmlGetFunctionPointer\("(\w+)"\)', source))
    assert set(EXPORTED) - looked_up == {"nvmlInit", "nvmlInit_v2"}


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None,
    reason="a real libnvidia-ml is installed system-wide; the loader would find it",
)
def test_no_library_raises_library_not_found(tmp_path: Path) -> None:
    """With no libnvidia-ml.so.1 to find, the real pynvml nvmlInit raises LibraryNotFound."""
    empty = tmp_path / "empty"
    empty.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "FAKE_NVML_CONFIG"}
    out = run_pynvml(environ | {"LD_LIBRARY_PATH": str(empty)}, "out = attempt(pynvml.nvmlInit)")
    assert out == "NVMLError_LibraryNotFound"


def test_build_refuses_unknown_omit_names(tmp_path: Path) -> None:
    """build_fake_nvml rejects an omit name the fake does not export (a typo would omit nothing)."""
    with pytest.raises(ValueError, match="nvmlDeviceGetPowerUsge"):
        build_fake_nvml(tmp_path, omit=("nvmlDeviceGetPowerUsge",))


def test_scenario_writer_validates_and_replaces_atomically(tmp_path: Path) -> None:
    """write_scenario renders na, bools and cc, refuses bad values and leaves no temp files."""
    path = write_scenario(tmp_path / "s.txt", [FakeGpu(uuid="GPU-1", temp=None, mig=True)])
    write_scenario(path, [FakeGpu(uuid="GPU-2")], init="driver_not_loaded")
    text = path.read_text(encoding="utf-8")
    assert "init = driver_not_loaded" in text
    assert 'uuid="GPU-2"' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.txt"]
    line = FakeGpu(uuid="GPU-1", temp=None, mig=True).line()
    assert " temp=na " in line
    assert " mig=1 " in line
    assert " cc=8.9 " in line
    assert line.endswith(" lost=0")
    with pytest.raises(ValueError, match="quotes"):
        scenario_text([FakeGpu(name='say "hi"')])
    with pytest.raises(ValueError, match="negative"):
        scenario_text([FakeGpu(temp=-1)])
    with pytest.raises(ValueError, match="init must be one of"):
        scenario_text([], init="sometimes")
    assert " processes=none " in FakeGpu().line()
    assert " processes=na " in FakeGpu(processes=None).line()
    assert " processes=1:2,3:na " in FakeGpu(processes=((1, 2), (3, None))).line()
    with pytest.raises(ValueError, match="pid"):
        scenario_text([FakeGpu(processes=((-1, 0),))])
    with pytest.raises(ValueError, match="at most 64"):
        scenario_text([FakeGpu(processes=tuple((pid, 0) for pid in range(65)))])


def test_nvml_env_prepends_the_library_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvml_env puts the fake first on LD_LIBRARY_PATH and names the scenario file."""
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other")
    added = nvml_env(tmp_path, tmp_path / "s.txt")
    assert added == {
        "LD_LIBRARY_PATH": f"{tmp_path.resolve()}:/opt/other",
        "FAKE_NVML_CONFIG": str((tmp_path / "s.txt").resolve()),
    }
    monkeypatch.delenv("LD_LIBRARY_PATH")
    assert nvml_env(tmp_path, tmp_path / "s.txt")["LD_LIBRARY_PATH"] == str(tmp_path.resolve())
