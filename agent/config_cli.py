"""``cyberun-agent config show|init``: the settings as loaded, and a commented template."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agent import PROG, logs
from agent.config_template import config_template
from agent.errors import CredentialError, ExitCode
from agent.settings import LoadedSettings, Settings, credential_kind, write_private_file


def show(loaded: LoadedSettings, *, as_json: bool) -> int:
    """Print every setting with its value and source (``--json``: as one document)."""
    rows = _show_rows(loaded)
    derived = _derived(loaded.settings)
    config_file = str(loaded.config_file) if loaded.config_file else None
    if as_json:
        document = {
            "config_file": config_file,
            "settings": {key: {"value": value, "source": src} for key, value, src in rows},
            "derived": derived,
        }
        print(logs.redact(json.dumps(document, indent=2)))
        return ExitCode.OK
    table = [("KEY", "VALUE", "SOURCE")]
    table += [(key, _text(value), source) for key, value, source in rows]
    table += [(key, _text(value), "derived") for key, value in derived.items()]
    key_width = max(len(row[0]) for row in table)
    value_width = min(60, max(len(row[1]) for row in table))
    print(f"config file: {config_file or 'none'}")
    for key, value, source in table:
        print(logs.redact(f"{key:<{key_width}}  {value:<{value_width}}  {source}"))
    return ExitCode.OK


def init(path: Path, *, force: bool) -> int:
    """Write the commented configuration template to ``path`` (mode 0600)."""
    try:
        write_private_file(path, config_template(Settings()), overwrite=force)
    except FileExistsError:
        print(f"{PROG} config init: {path} exists; pass --force to overwrite it", file=sys.stderr)
        return ExitCode.FAILURE
    except OSError as exc:
        print(f"{PROG} config init: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return ExitCode.FAILURE
    print(path)
    return ExitCode.OK


def _describe_credential(loaded: LoadedSettings) -> str:
    """Say whether a credential is set and of which kind, never more of it."""
    settings = loaded.settings
    origin = settings.credential_origin()
    if origin is None:
        return "<not set>"
    if settings.credential is not None:
        origin = loaded.source_of("credential")
    try:
        value = settings.credential_value()
    except CredentialError:
        return f"<set but unusable, from {origin}>"
    kind = credential_kind(value) if value is not None else "?"
    return f"<set: {kind}-…, from {origin}>"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _show_rows(loaded: LoadedSettings) -> list[tuple[str, Any, str]]:
    values = _flatten(loaded.settings.model_dump(mode="json"))
    values["credential"] = _describe_credential(loaded)
    return [(key, values[key], source) for key, source in loaded.sources.items()]


def _derived(settings: Settings) -> dict[str, Any]:
    derived: dict[str, Any] = {"pools": settings.pool_names}
    if settings.gateway_url is not None:
        derived["agent_ws_url"] = settings.agent_ws_url
    return derived


def _text(value: Any) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)
