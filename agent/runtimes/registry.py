"""Which runtimes this agent offers, built from the settings.

ComfyUI and Nerfstudio drivers register here as their issues land; ``runtimes.extra``
adds plugin runtimes as ``module:factory`` where ``factory(settings)`` returns a
:class:`~agent.runtimes.base.Runtime`.
"""

from __future__ import annotations

import importlib

from agent.errors import ConfigError
from agent.runtimes.base import Runtime
from agent.settings import Settings


def load_runtimes(settings: Settings) -> dict[str, Runtime]:
    """Build every configured runtime, keyed by tool name (``comfyui``, ``nerfstudio``…)."""
    runtimes: dict[str, Runtime] = {}
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
