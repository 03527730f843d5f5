"""Every NVML call the agent makes, through NVIDIA's official bindings (``nvidia-ml-py``).

This is the only module that imports ``pynvml``. NVML calls block (they are driver ioctls,
and a wedged GPU can stall them), so the daemon calls :meth:`Nvml.inventory` and
:meth:`Nvml.read` through ``asyncio.to_thread``; ``doctor`` and ``hardware`` call them
directly.

Errors are translated here and go no further:

- no library, driver not loaded, no permission, any other ``nvmlInit`` failure →
  :func:`open_nvml` returns ``None`` with a reason: a CPU-only agent, never a crash;
- a query the GPU or driver does not support (``NotSupported``), or a function this
  driver's library lacks (``FunctionNotFound``) → that field is ``None``;
- ``GPU is lost`` (fallen off the bus) on any query → :attr:`GpuReading.lost`;
- any other error on a query → that field is ``None`` and the error is kept in
  :attr:`GpuReading.errors` (the reading of the other GPUs goes on).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pynvml

T = TypeVar("T")

THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
"""NVML's clocks-event (throttle) reason bits, by name."""

_INIT_REASONS = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "no NVIDIA driver library (libnvidia-ml.so.1) found",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA driver is not loaded",
    pynvml.NVML_ERROR_NO_PERMISSION: "no permission to open the NVIDIA devices",
}


@dataclass(frozen=True)
class Gpu:
    """One GPU's static facts (bytes for memory, watts for power)."""

    index: int
    uuid: str = ""
    name: str = ""
    vram_total: int = 0
    compute_capability: str | None = None
    mig: bool | None = None
    pci_bus_id: str | None = None
    power_limit_w: float | None = None
    lost: bool = False


@dataclass(frozen=True)
class Inventory:
    """What NVML says about the machine, once per start."""

    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: tuple[Gpu, ...] = ()


@dataclass(frozen=True)
class GpuReading:
    """Live readings of one GPU; ``None`` where NVML could not say."""

    index: int
    lost: bool = False
    vram_total: int | None = None
    vram_used: int | None = None
    vram_free: int | None = None
    utilization: float | None = None
    memory_utilization: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    throttle_reasons: tuple[str, ...] | None = None
    ecc_uncorrected: int | None = None
    processes: tuple[int, ...] | None = None
    """PIDs of the compute processes on this GPU (as NVML sees them), in NVML's order."""
    errors: tuple[str, ...] = field(default=())


class _Lost(Exception):  # noqa: N818 - control flow: the GPU fell off the bus
    pass


class _Query:
    """Runs NVML calls for one device, collecting what failed instead of raising."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, what: str, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except pynvml.NVMLError as exc:
            code = exc.value
            if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost from None
            if code not in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                self.errors.append(f"{what}: {_text(exc)}")
            return None


class Nvml:
    """An initialised NVML library (one ``nvmlInit`` until :meth:`close`); thread-safe."""

    def __init__(self) -> None:
        """Use :func:`open_nvml`; this assumes ``nvmlInit`` succeeded."""
        self._lock = threading.Lock()
        self._handles: list[Any] | None = None
        self._closed = False

    def inventory(self) -> Inventory:
        """Driver, CUDA and the static facts of every GPU."""
        with self._lock:
            query = _Query()
            driver = query("driver version", pynvml.nvmlSystemGetDriverVersion)
            cuda = query("CUDA version", pynvml.nvmlSystemGetCudaDriverVersion)
            gpus = tuple(self._static(index, handle) for index, handle in self._devices())
        return Inventory(
            driver_version=_text(driver) if driver is not None else None,
            cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None,
            gpus=gpus,
        )

    def read(self) -> tuple[GpuReading, ...]:
        """Live readings of every GPU (a lost GPU reads as ``lost``, the others go on)."""
        with self._lock:
            return tuple(self._reading(index, handle) for index, handle in self._devices())

    def close(self) -> None:
        """``nvmlShutdown`` (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(pynvml.NVMLError):  # a broken library: nothing to release
                pynvml.nvmlShutdown()

    # ------------------------------------------------------------------ internals

    def _devices(self) -> list[tuple[int, Any]]:
        """Handles by index (looked up once; a GPU whose handle fails is skipped)."""
        if self._handles is None:
            try:
                count = pynvml.nvmlDeviceGetCount()
            except pynvml.NVMLError:
                count = 0
            handles: list[Any] = []
            for index in range(count):
                try:
                    handles.append(pynvml.nvmlDeviceGetHandleByIndex(index))
                except pynvml.NVMLError as exc:
                    handles.append(exc)  # e.g. GPU lost at start-up: reported as lost
            self._handles = handles
        return list(enumerate(self._handles))

    @staticmethod
    def _static(index: int, handle: Any) -> Gpu:
        if isinstance(handle, Exception):
            return Gpu(index=index, lost=True)
        query = _Query()
        try:
            memory = query("memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
            capability = query(
                "compute capability", lambda: pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            )
            mig = query("MIG mode", lambda: pynvml.nvmlDeviceGetMigMode(handle))
            pci = query("PCI info", lambda: pynvml.nvmlDeviceGetPciInfo(handle))
            limit = query("power limit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
            return Gpu(
                index=index,
                uuid=_text(query("uuid", lambda: pynvml.nvmlDeviceGetUUID(handle)) or ""),
                name=_text(query("name", lambda: pynvml.nvmlDeviceGetName(handle)) or ""),
                vram_total=int(memory.total) if memory is not None else 0,
                compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
                mig=bool(mig[0]) if mig else None,
                pci_bus_id=_text(pci.busId) if pci is not None else None,
                power_limit_w=limit / 1000 if limit is not None else None,
            )
        except _Lost:
            return Gpu(index=index, lost=True)

    @staticmethod
    def _reading(index: int, handle: Any) -> GpuReading:
        if isinstance(handle, Exception):
            return GpuReading(index=index, lost=True)
        query = _Query()
        try:
            memory = query("memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
            rates = query("utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
            temperature = query(
                "temperature",
                lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            )
            power = query("power", lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
            reasons = query("throttle reasons", lambda: _throttle_bits(handle))
            ecc = query(
                "ECC errors",
                lambda: pynvml.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
                ),
            )
            processes = query("compute processes", lambda: _compute_pids(handle))
        except _Lost:
            return GpuReading(index=index, lost=True)
        return GpuReading(
            index=index,
            vram_total=int(memory.total) if memory is not None else None,
            vram_used=int(memory.used) if memory is not None else None,
            vram_free=int(memory.free) if memory is not None else None,
            utilization=float(rates.gpu) if rates is not None else None,
            memory_utilization=float(rates.memory) if rates is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_w=power / 1000 if power is not None else None,
            throttle_reasons=throttle_names(reasons) if reasons is not None else None,
            ecc_uncorrected=int(ecc) if ecc is not None else None,
            processes=processes,
            errors=tuple(query.errors),
        )


def open_nvml() -> tuple[Nvml | None, str]:
    """Initialise NVML: ``(Nvml, "")``, or ``(None, why)`` on a machine without a usable one."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, _INIT_REASONS.get(exc.value, f"NVML failed to initialise: {_text(exc)}")
    except OSError as exc:  # a library that loads but is not NVML
        return None, f"NVML failed to initialise: {exc}"
    return Nvml(), ""


def throttle_names(bits: int) -> tuple[str, ...]:
    """Name the throttle reasons set in ``bits`` (unknown bits as hex)."""
    names = [name for bit, name in THROTTLE_REASONS if bits & bit]
    unknown = bits & ~sum(bit for bit, _ in THROTTLE_REASONS)
    return (*names, f"0x{unknown:x}") if unknown else tuple(names)


def _throttle_bits(handle: Any) -> int:
    """Current clocks-event reasons (the newer name first, the deprecated one as fallback)."""
    try:
        return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
    except pynvml.NVMLError as exc:
        if exc.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
            raise
    return int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))


def _compute_pids(handle: Any) -> tuple[int, ...]:
    """PIDs of the compute processes (``_v3`` first, ``_v2`` on drivers that lack it), unique."""
    try:
        found = pynvml.nvmlDeviceGetComputeRunningProcesses_v3(handle)
    except pynvml.NVMLError as exc:
        if exc.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
            raise
        found = pynvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)
    return tuple(dict.fromkeys(int(process.pid) for process in found))


def _text(value: object) -> str:
    """NVML strings as text (older bindings return bytes), bounded."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).replace("\x00", "")[:256]
