"""What this machine is: CPU, memory, disk and platform (GPU inventory via NVML: issue 8).

All readings are blocking but cheap; callers on the event loop may call them directly.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import psutil

from agent.protocol.messages import Capability, CpuInfo, ResourceSnapshot

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def platform_arch() -> str:
    """``linux/amd64`` style, as the platform documents it."""
    machine = platform.machine().lower()
    return f"{platform.system().lower()}/{_ARCH.get(machine, machine)}"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (empty when unknown)."""
    try:
        for line in (
            Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
        ):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()[:200]
    except OSError:
        pass
    return platform.processor()[:200]


def capability(work_dir: Path) -> Capability:
    """The static inventory sent in ``hello`` (no GPUs until NVML support lands)."""
    return Capability(
        platform_arch=platform_arch(),
        cpu=CpuInfo(count=psutil.cpu_count() or 0, model=cpu_model()),
        ram_bytes=psutil.virtual_memory().total,
        disk_free_bytes=disk_free(work_dir),
    )


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def resources(work_dir: Path) -> ResourceSnapshot:
    """Live readings for the heartbeat."""
    memory = psutil.virtual_memory()
    return ResourceSnapshot(
        cpu_percent=psutil.cpu_percent(interval=None),
        ram_used=memory.total - memory.available,
        ram_total=memory.total,
        disk_free=disk_free(work_dir),
    )
