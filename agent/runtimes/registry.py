"""Which runtimes this agent offers, built from the settings.

ComfyUI and Nerfstudio drivers register here as their issues land; ``runtimes.extra``
adds plugin runtimes as ``module:factory`` where ``factory(settings)`` returns a
:class:`~agent.runtimes.base.Runtime`.
"""

from __future__ import annotations

import importlib

from agent.errors import ConfigError
from agent.runtimes.base import Runtime
from agent.runtimes.comfyui.runtime import ComfyUIRuntime
from agent.runtimes.comfyui.supervisor import ComfyProcess
from agent.settings import Settings


def load_runtimes(settings: Settings) -> dict[str, Runtime]:
    """Build every configured runtime, keyed by tool name (``comfyui``, ``nerfstudio``…)."""
    runtimes: dict[str, Runtime] = {}
    comfyui = _comfyui(settings)
    if comfyui is not None:
        runtimes[comfyui.tool] = comfyui
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
        return ComfyUIRuntime(config.url, ready_timeout=ready)
    launch = config.launch
    if launch is None:
        return None
    process = ComfyProcess(
        launch.python,
        launch.main,
        port=launch.port,
        args=launch.args,
        base_directory=launch.base_directory,
        ready_timeout=ready,
    )
    return ComfyUIRuntime(process.url, process=process, ready_timeout=ready)
