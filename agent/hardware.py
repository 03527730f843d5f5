"""What this machine is: CPU, memory, disk, platform, and the labels its GPUs earn.

The GPU inventory itself comes from NVML (:mod:`agent.nvml`, assessed by
:mod:`agent.health`); this module turns it into the ``gpu``, GPU-model and VRAM-class
labels. The readings here are blocking but cheap (``/proc``, ``statvfs``); callers on the
event loop may call them directly.
"""

from __future__ import annotations

import platform
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import psutil

from agent.protocol.messages import Capability, CpuInfo, GpuInfo, GpuSnapshot, ResourceSnapshot

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
GIB = 1024**3
GPU_LABEL = "gpu"
_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla", "quadro", "gpu", "generation"})
_FORM_FACTOR = re.compile(r"\d+gb|pcie|sxm\d*|nvl|hbm\d*e?")
_LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


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


def capability(work_dir: Path, cache_dir: Path, gpus: Sequence[GpuInfo] = ()) -> Capability:
    """The inventory sent in ``hello``: the machine, and the GPUs that may get work."""
    return Capability(
        platform_arch=platform_arch(),
        cpu=CpuInfo(count=psutil.cpu_count() or 0, model=cpu_model()),
        ram_bytes=psutil.virtual_memory().total,
        disk_free_bytes=disk_free(work_dir),
        cache_free_bytes=disk_free(cache_dir),
        gpus=list(gpus),
    )


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def resources(work_dir: Path, gpus: Sequence[GpuSnapshot] = ()) -> ResourceSnapshot:
    """Live readings for the heartbeat."""
    memory = psutil.virtual_memory()
    return ResourceSnapshot(
        cpu_percent=psutil.cpu_percent(interval=None),
        ram_used=memory.total - memory.available,
        ram_total=memory.total,
        disk_free=disk_free(work_dir),
        gpus=list(gpus),
    )


# ---------------------------------------------------------------- labels


def model_label(name: str) -> str | None:
    """A GPU model as a label: ``NVIDIA GeForce RTX 4090`` → ``rtx-4090``, ``H100 80GB`` → ``h100``.

    Vendor and brand words, memory sizes and form factors (PCIe, SXM, NVL, HBM) are left
    out; ``None`` when nothing is left.
    """
    words = re.split(r"[^a-z0-9]+", name.lower())
    kept = [w for w in words if w and w not in _VENDOR_WORDS and not _FORM_FACTOR.fullmatch(w)]
    label = "-".join(kept)[:63].strip("-._")
    return label if _LABEL.fullmatch(label) else None


def vram_class(vram_bytes: int) -> str | None:
    """The VRAM class label, whole GiB rounded: 24 GiB → ``vram-24gb`` (``None`` for 0)."""
    gib = round(vram_bytes / GIB)
    return f"vram-{gib}gb" if gib > 0 else None


def gpu_labels(gpus: Sequence[GpuInfo]) -> tuple[str, ...]:
    """``gpu``, one label per GPU model, and the VRAM class of the largest GPU (none: ``()``)."""
    if not gpus:
        return ()
    models = [label for label in (model_label(g.name) for g in gpus) if label]
    largest = vram_class(max(g.vram_total for g in gpus))
    return tuple(dict.fromkeys([GPU_LABEL, *models, *([largest] if largest else [])]))
