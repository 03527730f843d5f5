"""Which runtimes this agent offers, built from the settings.

ComfyUI and Nerfstudio drivers register here as their issues land; ``runtimes.extra``
adds plugin runtimes as ``module:factory`` where ``factory(settings)`` returns a
:class:`~agent.runtimes.base.Runtime`.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

from agent.errors import ConfigError
from agent.runtimes.base import Runtime
from agent.runtimes.comfyui.runtime import ComfyUIRuntime
from agent.runtimes.comfyui.servers import ServerPool
from agent.runtimes.comfyui.supervisor import ComfyProcess
from agent.runtimes.nerfstudio.runtime import NerfstudioRuntime
from agent.settings import Settings


def load_runtimes(settings: Settings) -> dict[str, Runtime]:
    """Build every configured runtime, keyed by tool name (``comfyui``, ``nerfstudio``…)."""
    runtimes: dict[str, Runtime] = {}
    for runtime in (_comfyui(settings), _nerfstudio(settings)):
        if runtime is not None:
            runtimes[runtime.tool] = runtime
    for spec in settings.runtimes.extra:
        runtime = _plugin(spec, settings)
        runtimes[runtime.tool] = runtime
    return runtimes


def _plugin(spec: str, settings: Settings) -> Runtime:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
        runtime: Runtime = factory(settings)
    except Exception as exc:  # plugin code is foreign: any failure is a configuration error
        rule = f"cannot load the runtime plugin: {exc!r}"
        raise ConfigError("runtimes.extra", spec, rule) from exc
    return runtime


def _comfyui(settings: Settings) -> Runtime | None:
    """ComfyUI, attached by URL or launched and supervised (``None`` when not configured)."""
    config = settings.runtimes.comfyui
    ready = settings.timeouts.runtime_ready_s
    if config.url:
        return ComfyUIRuntime.attach(config.url, ready_timeout=ready, directory=config.directory)
    launch = config.launch
    if launch is None:
        return None
    processes = [
        ComfyProcess(
            launch.python,
            launch.main,
            port=launch.port + index,
            args=[*launch.args, *_per_gpu_dirs(launch.base_directory, gpu)],
            base_directory=launch.base_directory,
            env=_gpu_env(gpu),
            ready_timeout=ready,
        )
        for index, gpu in enumerate(launch.gpus or (None,))
    ]
    return ComfyUIRuntime(ServerPool.launch(processes), ready_timeout=ready)


def _gpu_env(gpu: int | None) -> dict[str, str] | None:
    """The agent's environment, restricted to one GPU when one is given."""
    if gpu is None:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}


def _per_gpu_dirs(base: Path | None, gpu: int | None) -> list[str]:
    """Separate output and temp directories per instance (file counters must not collide).

    Each server's purge reads its directories back from these arguments (``input/`` stays
    shared); a ``--output-directory``/``--temp-directory`` in ``launch.args`` comes first and so
    is overridden here, as ComfyUI's argparse would.
    """
    if gpu is None or base is None:
        return []
    return [
        "--output-directory",
        str(base / "output" / f"gpu{gpu}"),
        "--temp-directory",
        str(base / "temp" / f"gpu{gpu}"),
    ]


def _nerfstudio(settings: Settings) -> Runtime | None:
    """The ``ns-*`` CLI from ``bin_dir`` or PATH (``None`` unless enabled)."""
    config = settings.runtimes.nerfstudio
    if not config.enabled:
        return None
    found = shutil.which("ns-train")
    bin_dir = config.bin_dir or (Path(found).parent if found else Path("/nonexistent"))
    return NerfstudioRuntime(
        bin_dir,
        keep_checkpoint=config.keep_checkpoint,
        torch_home=config.torch_home,
        colmap_gpu=config.colmap_gpu,
        interrupt_grace=settings.timeouts.cancel_grace_s,
        term_grace=settings.timeouts.kill_grace_s,
    )
