"""GPU health: which GPUs may be offered work, and why not.

:class:`GpuMonitor` owns the NVML session (:mod:`agent.nvml`) and turns each sample into a
:class:`GpuState`; :func:`assess` is the pure rule, one reason per unusable GPU:

- fallen off the bus (NVML: GPU is lost);
- uncorrectable ECC errors since the driver loaded (volatile count > 0);
- too hot: temperature at or above ``gpu.max_temperature_c``;
- NVML has stopped answering (a sample still running when the next one is due).

A task that needs more free VRAM than any usable GPU has is refused
(:meth:`GpuState.vram_refusal`). When the machine has GPUs and none is usable, the agent
reports ``unhealthy`` with the reasons; with no NVIDIA driver at all it is a CPU-only
agent (no ``gpu`` label), which is not a health problem.

"Only when idle" (``pools.community``) asks :meth:`GpuState.idle_problem` whether the
usable GPUs are busy: utilisation at or above a threshold, or a compute process that is not
in the agent's own process tree (:func:`process_tree`).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.nvml import Gpu, GpuReading, Inventory, Nvml, open_nvml
from agent.protocol.messages import GpuInfo, GpuSnapshot
from agent.settings import GpuSettings

log = structlog.get_logger("agent.health")
GIB = 1024**3
PROC = Path("/proc")
MAX_PIDS_SHOWN = 5


@dataclass(frozen=True)
class GpuPolicy:
    """Limits beyond which a GPU is not offered work."""

    max_temperature_c: float = 90.0
    enabled: bool = True
    """False: never touch NVML (a CPU-only agent even on a GPU machine)."""
    devices: tuple[str, ...] = ()
    """Only these GPUs (NVML index or UUID); empty: all."""

    @classmethod
    def of(cls, settings: GpuSettings) -> GpuPolicy:
        """The policy the ``gpu`` settings describe."""
        return cls(
            max_temperature_c=settings.max_temperature_c,
            enabled=settings.enabled,
            devices=settings.devices,
        )

    def owns(self, gpu: Gpu) -> bool:
        """Whether ``gpu`` is one of this agent's."""
        return not self.devices or str(gpu.index) in self.devices or gpu.uuid in self.devices


def assess(gpu: Gpu, reading: GpuReading | None, policy: GpuPolicy) -> str | None:
    """Why this GPU must not get work (``None``: it may)."""
    name = f"GPU {gpu.index}" + (f" ({gpu.name})" if gpu.name else "")
    if gpu.lost or (reading is not None and reading.lost):
        return f"{name} has fallen off the bus (NVML: GPU is lost)"
    if reading is None:
        return None
    if reading.ecc_uncorrected:
        return f"{name} reports {reading.ecc_uncorrected} uncorrectable ECC error(s)"
    temperature = reading.temperature_c
    if temperature is not None and temperature >= policy.max_temperature_c:
        return (
            f"{name} is too hot: {temperature:g} °C "
            f"(gpu.max_temperature_c is {policy.max_temperature_c:g})"
        )
    return None


@dataclass(frozen=True)
class GpuState:
    """One sample: the inventory, the live readings and what is wrong with each GPU."""

    inventory: Inventory = field(default_factory=Inventory)
    readings: tuple[GpuReading, ...] = ()
    problems: dict[int, str] = field(default_factory=dict)
    nvml: str = ""
    """Why NVML is not available (empty when it is)."""

    @property
    def usable(self) -> tuple[Gpu, ...]:
        """The GPUs that may be offered work."""
        return tuple(g for g in self.inventory.gpus if g.index not in self.problems)

    @property
    def all_unusable(self) -> bool:
        """The machine has GPUs and none of them may get work."""
        return bool(self.inventory.gpus) and not self.usable

    def reading(self, index: int) -> GpuReading | None:
        """The live reading of GPU ``index``, if one was taken."""
        return next((r for r in self.readings if r.index == index), None)

    def gpu_infos(self) -> list[GpuInfo]:
        """The usable GPUs as ``hello.capability.gpus``."""
        inventory = self.inventory
        out = []
        for gpu in self.usable:
            reading = self.reading(gpu.index)
            free = reading.vram_free if reading is not None else None
            out.append(
                GpuInfo(
                    index=gpu.index,
                    uuid=gpu.uuid,
                    name=gpu.name,
                    vram_total=gpu.vram_total,
                    vram_free=free if free is not None else gpu.vram_total,
                    compute_capability=gpu.compute_capability,
                    driver_version=inventory.driver_version,
                    cuda_version=inventory.cuda_version,
                    mig=bool(gpu.mig),
                    pci_bus_id=gpu.pci_bus_id,
                    power_limit_w=gpu.power_limit_w,
                )
            )
        return out

    def snapshots(self) -> list[GpuSnapshot]:
        """Every GPU's live readings for the heartbeat, with its problem if any."""
        out = []
        for gpu in self.inventory.gpus:
            reading = self.reading(gpu.index) or GpuReading(index=gpu.index, lost=gpu.lost)
            utilization = reading.utilization
            out.append(
                GpuSnapshot(
                    index=gpu.index,
                    utilization=min(100.0, max(0.0, utilization))
                    if utilization is not None
                    else None,
                    memory_used=reading.vram_used,
                    memory_total=reading.vram_total,
                    memory_free=reading.vram_free,
                    temperature_c=reading.temperature_c,
                    power_w=reading.power_w,
                    throttle_reasons=list(reading.throttle_reasons or ()),
                    ecc_uncorrected=reading.ecc_uncorrected,
                    problem=(self.problems.get(gpu.index) or "")[:256] or None,
                )
            )
        return out

    def vram_refusal(self, min_vram_gb: float) -> str | None:
        """Why a task needing ``min_vram_gb`` GiB free cannot run here (``None``: it can)."""
        need = int(min_vram_gb * GIB)
        if need <= 0 or not self.inventory.gpus:
            return None  # no GPU needed, or GPUs unknown to NVML (the gateway decided)
        free = [self._free(gpu) for gpu in self.usable]
        if any(f >= need for f in free):
            return None
        best = max(free, default=0)
        return (
            f"the task needs {min_vram_gb:g} GiB of free VRAM; the most free on a usable GPU "
            f"here is {best / GIB:.1f} GiB"
        )

    def idle_problem(
        self, *, own_pids: Collection[int], max_utilization: float, check_processes: bool
    ) -> str | None:
        """Why the usable GPUs are not idle (``None``: idle, or no GPU at all).

        Busy: a usable GPU's utilisation is ``max_utilization`` percent or more, or (with
        ``check_processes``) it runs a compute process whose pid is not in ``own_pids``. A
        reading NVML could not take (no utilisation, no process list) does not make it busy.
        """
        for gpu in self.usable:
            reading = self.reading(gpu.index)
            if reading is None:
                continue
            utilization = reading.utilization
            if utilization is not None and utilization >= max_utilization:
                return (
                    f"GPU {gpu.index} is {utilization:g} % busy "
                    f"(pools.community.idle_max_utilization is {max_utilization:g})"
                )
            if not check_processes or not reading.processes:
                continue
            foreign = [pid for pid in reading.processes if pid not in own_pids]
            if len(foreign) == 1:
                return f"GPU {gpu.index} runs a process that is not the agent's (pid {foreign[0]})"
            if foreign:
                shown = ", ".join(str(pid) for pid in foreign[:MAX_PIDS_SHOWN])
                more = ", ..." if len(foreign) > MAX_PIDS_SHOWN else ""
                return (
                    f"GPU {gpu.index} runs {len(foreign)} processes that are not the agent's "
                    f"(pids {shown}{more})"
                )
        return None

    def _free(self, gpu: Gpu) -> int:
        reading = self.reading(gpu.index)
        free = reading.vram_free if reading is not None else None
        return free if free is not None else gpu.vram_total


def process_tree(root: int, *, proc: Path = PROC) -> frozenset[int]:
    """``root`` and all its descendants, from the parent pids in ``/proc/*/stat``.

    A process that exits mid-scan is skipped; on a system without ``/proc`` (not Linux) the
    tree is ``{root}`` alone.
    """
    if not sys.platform.startswith("linux"):
        return frozenset({root})
    try:
        names = [entry.name for entry in proc.iterdir()]
    except OSError:
        return frozenset({root})
    children: dict[int, list[int]] = {}
    for name in names:
        if name.isdigit():
            parent = _parent_pid(proc / name / "stat")
            if parent is not None:
                children.setdefault(parent, []).append(int(name))
    tree, pending = {root}, [root]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in tree:
                tree.add(child)
                pending.append(child)
    return frozenset(tree)


def _parent_pid(stat: Path) -> int | None:
    """The ppid field of one ``/proc/<pid>/stat`` (``None``: gone, unreadable or malformed)."""
    try:
        text = stat.read_bytes()
    except OSError:  # exited mid-scan (ENOENT, ESRCH) or hidden from us
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it
    _, closing, rest = text.rpartition(b")")
    fields = rest.split()
    if not closing or len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


class GpuMonitor:
    """Owns NVML for the agent's life; every method blocks (call them off the event loop)."""

    def __init__(self, policy: GpuPolicy) -> None:
        """Nothing is opened until :meth:`start`."""
        self.policy = policy
        self._nvml: Nvml | None = None
        self._inventory = Inventory()
        self._why = "NVML not started"
        self._busy = threading.Lock()

    def start(self) -> GpuState:
        """Open NVML and take the inventory; log what was found (or why there is no GPU)."""
        if not self.policy.enabled:
            self._why = "GPU use is disabled (gpu.enabled: false)"
            log.info("GPUs disabled by configuration; running CPU-only")
            return GpuState(nvml=self._why)
        self._nvml, self._why = open_nvml()
        if self._nvml is None:
            log.info("no usable NVIDIA GPU; running CPU-only", reason=self._why)
            return GpuState(nvml=self._why)
        found = self._nvml.inventory()
        owned = tuple(g for g in found.gpus if self.policy.owns(g))
        self._inventory = dataclasses.replace(found, gpus=owned)
        inventory = self._inventory
        if len(owned) < len(found.gpus):
            log.info("GPUs limited by gpu.devices", devices=list(self.policy.devices))
        log.info(
            "GPU inventory",
            driver_version=inventory.driver_version,
            cuda_version=inventory.cuda_version,
            gpus=[f"{g.index}: {g.name} {g.vram_total // GIB} GiB" for g in inventory.gpus],
        )
        return self.sample()

    def sample(self) -> GpuState:
        """Read every GPU and assess it; a sample still running elsewhere is not repeated."""
        nvml = self._nvml
        if nvml is None:
            return GpuState(nvml=self._why)
        if not self._busy.acquire(blocking=False):
            return self.not_answering()
        try:
            owned = {g.index for g in self._inventory.gpus}
            readings = tuple(r for r in nvml.read() if r.index in owned)
        finally:
            self._busy.release()
        problems = {}
        for gpu in self._inventory.gpus:
            reading = next((r for r in readings if r.index == gpu.index), None)
            reason = assess(gpu, reading, self.policy)
            if reason is not None:
                problems[gpu.index] = reason
        return GpuState(inventory=self._inventory, readings=readings, problems=problems)

    def not_answering(self) -> GpuState:
        """The state while an NVML call hangs: every GPU unusable, no readings (non-blocking)."""
        stuck = dict.fromkeys(
            (g.index for g in self._inventory.gpus), "NVML is not answering (a query hangs)"
        )
        return GpuState(inventory=self._inventory, problems=stuck)

    def close(self) -> None:
        """Shut NVML down."""
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
