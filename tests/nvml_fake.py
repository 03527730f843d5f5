"""A compiled fake NVML, so the real pynvml ctypes code runs in tests on a machine without a GPU.

``tests/fake_nvml/fake_nvml.c`` is built with gcc against the official ``nvml.h`` (pip package
``nvidia-nvml-dev``) into ``<dir>/libnvidia-ml.so.1``. A test starts a subprocess with
``nvml_env(lib_dir, scenario)`` added to its environment: pynvml's ``CDLL("libnvidia-ml.so.1")``
then finds the fake first on ``LD_LIBRARY_PATH``, and the fake reads the scenario file named by
``FAKE_NVML_CONFIG`` at ``nvmlInit`` and again on every query, so rewriting the file with
``write_scenario`` while the process runs changes what it reads next (a temperature rising,
a GPU falling off the bus). The scenario file format is described in ``fake_nvml.c``.

Fixtures (register this module as a pytest plugin)::

    def test_something(fake_nvml_lib: Path, tmp_path: Path) -> None:
        scenario = write_scenario(tmp_path / "nvml.txt", [FakeGpu(temp=80)])
        env = os.environ | nvml_env(fake_nvml_lib, scenario)

``fake_nvml_lib_factory(("nvmlDeviceGetPowerUsage",))`` builds (once per session and omit set)
a library lacking those functions; pynvml then raises ``NVMLError_FunctionNotFound`` for them.
PYTEST_DONT_REWRITE (assertion rewriting is off here, so importing names from this module
before pytest registers it as a plugin is harmless).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().with_name("fake_nvml") / "fake_nvml.c"
LIBRARY_NAME = "libnvidia-ml.so.1"
COMPILE_TIMEOUT_S = 60.0
CFLAGS = ("-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-pthread")

# Every function the fake exports (each can be left out of a build with omit=...).
EXPORTED: tuple[str, ...] = (
    "nvmlInitWithFlags",
    "nvmlInit_v2",
    "nvmlInit",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlSystemGetCudaDriverVersion_v2",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetCudaComputeCapability",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
)
INIT_RESULTS = ("ok", "driver_not_loaded", "no_permission", "unknown_error")
MAX_PROCESSES = 64  # compute processes per GPU the fake can hold (MAX_PROCS in fake_nvml.c)


class FakeNvmlBuildError(RuntimeError):
    """gcc or nvml.h is missing, or the fake did not compile."""


def find_nvml_header() -> Path:
    """Return the directory holding the official ``nvml.h`` (from ``nvidia-nvml-dev``)."""
    roots: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations is not None:
        roots.extend(Path(p) for p in spec.submodule_search_locations)
    roots.extend(Path(p) / "nvidia" for p in sys.path if p)
    for root in roots:
        for header in sorted(root.glob("*/include/nvml.h")):
            return header.parent
    raise FakeNvmlBuildError(
        "nvml.h not found under any nvidia/*/include/ on sys.path; "
        "install the dev extra (pip install nvidia-nvml-dev)"
    )


def build_fake_nvml(out_dir: Path, omit: Sequence[str] = ()) -> Path:
    """Compile the fake into ``out_dir/libnvidia-ml.so.1`` and return ``out_dir``.

    Each name in ``omit`` is left out of the library. Raises ``ValueError`` for a name the fake
    does not export and ``FakeNvmlBuildError`` when gcc or nvml.h is missing or gcc fails.
    """
    unknown = sorted(set(omit) - set(EXPORTED))
    if unknown:
        raise ValueError(f"the fake NVML does not export {unknown}; it exports {EXPORTED}")
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FakeNvmlBuildError("gcc not found on PATH; it is needed to build the fake NVML")
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
    command = [
        gcc,
        *CFLAGS,
        f"-I{find_nvml_header()}",
        *(f"-DOMIT_{name}" for name in sorted(set(omit))),
        str(SOURCE),
        "-o",
        str(staged),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise FakeNvmlBuildError(
            f"gcc failed ({result.returncode}): {' '.join(command)}\n{result.stderr}"
        )
    staged.replace(out_dir / LIBRARY_NAME)
    return out_dir


def _new_uuid() -> str:
    return f"GPU-{uuid.uuid4()}"


@dataclass(frozen=True)
class FakeGpu:
    """One ``gpu`` line of a scenario. ``None`` writes ``na``: that query is not supported."""

    name: str | None = "NVIDIA GeForce RTX 4090"
    uuid: str | None = field(default_factory=_new_uuid)
    total: int | None = 25_757_220_864  # bytes
    used: int | None = 1_073_741_824  # bytes; free = total - used
    cc: tuple[int, int] | None = (8, 9)
    mig: bool | None = False
    bus: str | None = "00000000:01:00.0"  # DOMAIN:BUS:DEVICE.0, hex
    power_limit_mw: int | None = 450_000  # enforced and management limit
    power_mw: int | None = 60_000
    temp: int | None = 45  # degrees C, NVML_TEMPERATURE_GPU
    util_gpu: int | None = 3  # percent
    util_mem: int | None = 1  # percent
    throttle: int | None = 0  # clocks event reasons bitmask
    ecc_uncorrected: int | None = 0  # volatile and aggregate; corrected reads 0
    processes: tuple[tuple[int, int | None], ...] | None = ()
    """Compute processes as ``(pid, used GPU memory bytes)``; ``None`` bytes: not available."""
    lost: bool = False  # every query on this GPU raises NVMLError_GpuIsLost

    def line(self) -> str:
        """Return this GPU as one scenario line."""
        parts = ["gpu"]
        for f in fields(self):
            value = getattr(self, f.name)
            text = _processes(value) if f.name == "processes" else _value(value)
            parts.append(f"{f.name}={text}")
        return " ".join(parts)


def _processes(processes: tuple[tuple[int, int | None], ...] | None) -> str:
    """``pid:bytes,...`` (``none`` for no process, ``na`` when the query is not supported)."""
    if processes is None:
        return "na"
    if len(processes) > MAX_PROCESSES:
        raise ValueError(f"the fake holds at most {MAX_PROCESSES} processes per GPU")
    if not processes:
        return "none"
    items = []
    for pid, used in processes:
        if not 0 <= pid < 2**32 or (used is not None and not 0 <= used < 2**64 - 1):
            raise ValueError(f"a process needs a 32-bit pid and 64-bit bytes: {(pid, used)}")
        items.append(f"{pid}:{'na' if used is None else used}")
    return ",".join(items)


def _value(value: object) -> str:
    if value is None:
        return "na"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return ".".join(str(part) for part in value)
    if isinstance(value, int) and value < 0:
        raise ValueError(f"scenario numbers cannot be negative: {value}")
    text = str(value)
    if any(c in text for c in '"\n\r') or not text:
        raise ValueError(f"scenario values cannot be empty or hold quotes or newlines: {text!r}")
    return f'"{text}"' if isinstance(value, str) else text


def scenario_text(
    gpus: Sequence[FakeGpu],
    *,
    init: str = "ok",
    driver_version: str | None = "550.54.15",
    cuda_version: int | None = 12040,
) -> str:
    """Return the scenario file text for these GPUs (index order) and system values."""
    if init not in INIT_RESULTS:
        raise ValueError(f"init must be one of {INIT_RESULTS}, not {init!r}")
    lines = [
        "# fake NVML scenario (tests/nvml_fake.py)",
        f"init = {init}",
        f"driver_version = {_value(driver_version)}",
        f"cuda_version = {_value(cuda_version)}",
        *(gpu.line() for gpu in gpus),
    ]
    return "\n".join(lines) + "\n"


def write_scenario(
    path: Path,
    gpus: Sequence[FakeGpu],
    *,
    init: str = "ok",
    driver_version: str | None = "550.54.15",
    cuda_version: int | None = 12040,
) -> Path:
    """Write a scenario atomically (temp file + ``os.replace``) and return ``path``.

    A process using the fake reads either the old file or the new one, never a torn one.
    """
    text = scenario_text(gpus, init=init, driver_version=driver_version, cuda_version=cuda_version)
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        Path(staged).replace(path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return path


def nvml_env(lib_dir: Path, scenario: Path) -> dict[str, str]:
    """Return the variables to add to a subprocess's environment so its pynvml loads the fake."""
    inherited = os.environ.get("LD_LIBRARY_PATH")
    search = str(lib_dir.resolve()) + (f"{os.pathsep}{inherited}" if inherited else "")
    return {"LD_LIBRARY_PATH": search, "FAKE_NVML_CONFIG": str(scenario.resolve())}


@pytest.fixture(scope="session")
def fake_nvml_lib_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[Sequence[str]], Path]:
    """Build a fake NVML lacking the named functions, once per session and set of names."""
    built: dict[tuple[str, ...], Path] = {}

    def build(omit: Sequence[str] = ()) -> Path:
        key = tuple(sorted(set(omit)))
        if key not in built:
            built[key] = build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"), key)
        return built[key]

    return build


@pytest.fixture(scope="session")
def fake_nvml_lib(fake_nvml_lib_factory: Callable[[Sequence[str]], Path]) -> Path:
    """The directory holding the complete fake ``libnvidia-ml.so.1`` (built once per session)."""
    return fake_nvml_lib_factory(())
