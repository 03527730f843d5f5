"""Where configuration values come from: the layers under `agent.settings`, with provenance.

Each source becomes a *layer*: a nested mapping of raw values and the source of every dotted
path in it (``"FILE:LINE"``, ``"env NAME"`` or ``"flag --name"``)::

    read_config_file   cyberun-agent.yaml, keeping the line of every key and list item
    env_layer          CYBERUN_AGENT_* variables, nested keys joined with ``__``
    flag_layer         dotted keys the command line set
    Layers             merges them in rising precedence, key by key (lists are replaced)
    validate           model-validates the merged data; a `ValidationError` becomes one
                       `ConfigError` naming the dotted key, its source and the rule

This module never reads ``os.environ``: callers pass the environment as a mapping. It knows
the settings model only as a parameter, so `agent.settings` imports it and not the reverse.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from agent.errors import ConfigError

if typing.TYPE_CHECKING:
    from pydantic_core import ErrorDetails

ModelT = TypeVar("ModelT", bound=BaseModel)
Layer = tuple[dict[str, Any], dict[str, str]]  # raw data, and the source of each dotted path

ENV_PREFIX = "CYBERUN_AGENT_"
CONFIG_ENV = "CYBERUN_AGENT_CONFIG"

# Command-line spelling of each key the CLI sets, used to say "from flag --slots".
FLAG_NAMES: dict[str, str] = {
    "gateway_url": "--gateway-url",
    "credential_file": "--credential-file",
    "agent_id": "--agent-id",
    "region": "--region",
    "agent_labels": "--label",
    "slots": "--slots",
    "state_dir": "--state-dir",
    "work_dir": "--work-dir",
    "cache_dir": "--cache-dir",
    "log_level": "--log-level",
    "log_format": "--log-format",
    "pools.community.enabled": "--community",
}

_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"
_YAML_STR_TAG = "tag:yaml.org,2002:str"

# ---------------------------------------------------------------- config file lookup


def find_config_file(
    config_path: Path | None, environ: Mapping[str, str], *, home: Path, defaults: Iterable[Path]
) -> Path | None:
    """Return the config file to read: *config_path*, ``$CYBERUN_AGENT_CONFIG``, *defaults*.

    An explicitly named file (``~`` expands to *home*) must exist, else `ConfigError`; the
    first existing one of *defaults* is returned, or None when none exists. A default
    location this user may not even look into (``/etc/cyberun-agent`` mode 0750 for a
    non-root user running ``status``) is passed over, not a crash.
    """
    explicit = [(config_path, "flag --config")]
    if environ.get(CONFIG_ENV):
        explicit.append((Path(environ[CONFIG_ENV]), f"env {CONFIG_ENV}"))
    for path, source in explicit:
        if path is None:
            continue
        full = _expand_user(path, home)
        try:
            found = full.is_file()
        except PermissionError:
            raise ConfigError("config file", source, f"{full}: permission denied") from None
        if not found:
            raise ConfigError("config file", source, f"{full} does not exist or is not a file")
        return full
    for candidate in defaults:
        with contextlib.suppress(PermissionError):
            if candidate.is_file():
                return candidate
    return None


def _expand_user(path: Path, home: Path) -> Path:
    text = str(path)
    if text == "~" or text.startswith("~/"):
        path = home / text[2:]
    return path if path.is_absolute() else path.absolute()


# ---------------------------------------------------------------- layers


class Layers:
    """The merged raw data of all sources, and the source of each dotted path in it."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def merge(self, data: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        """Lay *data* over what is merged so far; mappings merge key by key."""
        self._merge_into(self.data, data, "")
        self.sources.update(sources)

    def _merge_into(self, base: dict[str, Any], over: Mapping[str, Any], prefix: str) -> None:
        for key, value in over.items():
            path = f"{prefix}{key}"
            current = base.get(key)
            if isinstance(value, Mapping) and isinstance(current, dict):
                self._merge_into(current, value, path + ".")
                continue
            for stale in [k for k in self.sources if k.startswith((path + ".", path + "["))]:
                del self.sources[stale]
            base[key] = dict(value) if isinstance(value, Mapping) else value


def read_config_file(path: Path, model: type[BaseModel]) -> Layer:
    """Read the YAML file at *path* as a layer whose sources are ``FILE:LINE``.

    Raises `ConfigError` for an unreadable file, invalid YAML (never quoting it), a
    top level that is not a mapping, a key that is not a string, or a duplicate key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError("config file", str(path), f"cannot read it: {reason}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, path) from None
    if data is None or node is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1
        raise ConfigError("(top level)", f"{path}:{line}", "must be a mapping of keys to values")
    sources: dict[str, str] = {}
    _record_lines(node, "", path, sources)
    _drop_empty_groups(data, model)
    return data, sources


def _drop_empty_groups(data: dict[str, Any], model: type[BaseModel]) -> None:
    """Treat a group key left empty (``timeouts:`` with its keys commented out) as absent."""
    for key in list(data):
        field = model.model_fields.get(key) if isinstance(key, str) else None
        group = field.annotation if field is not None else None
        if not (isinstance(group, type) and issubclass(group, BaseModel)):
            continue
        if data[key] is None:
            del data[key]
        elif isinstance(data[key], dict):
            _drop_empty_groups(data[key], group)


def _yaml_error(exc: yaml.YAMLError, path: Path) -> ConfigError:
    """Name the file and line of a YAML syntax error, but never quote the offending text."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    return ConfigError("yaml syntax", where, f"invalid YAML: {problem}")


def _record_lines(node: yaml.Node, prefix: str, path: Path, sources: dict[str, str]) -> None:
    """Record ``FILE:LINE`` for every mapping key and sequence item below *node*."""
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            sources[f"{prefix}[{index}]"] = f"{path}:{item.start_mark.line + 1}"
            _record_lines(item, f"{prefix}[{index}]", path, sources)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        if key_node.tag == _YAML_MERGE_TAG:
            continue
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _YAML_STR_TAG:
            raise ConfigError(prefix or "(top level)", where, "keys must be strings")
        dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
        if dotted in sources:
            raise ConfigError(dotted, where, "duplicate key")
        sources[dotted] = where
        _record_lines(value_node, dotted, path, sources)


_KUBERNETES_LINK = re.compile(
    ENV_PREFIX + r"(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)$"
)
"""What the kubelet injects for a Service named ``cyberun-agent`` (no setting has these names)."""


def env_layer(environ: Mapping[str, str], model: type[BaseModel]) -> Layer:
    """Return the layer of every ``CYBERUN_AGENT_*`` variable except ``CYBERUN_AGENT_CONFIG``.

    Values are shaped by the field of *model* they name (comma lists, JSON, empty = null);
    raises `ConfigError` for invalid JSON or a key set both as a value and as a group.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or _KUBERNETES_LINK.match(name):
            continue
        parts = [part.lower() for part in name.removeprefix(ENV_PREFIX).split("__")]
        value = _parse_env_value(model, parts, environ[name], name)
        _set_nested(data, parts, value, f"env {name}")
        _record(sources, ".".join(parts), value, f"env {name}")
    return data, sources


def _parse_env_value(model: type[BaseModel], parts: list[str], raw: str, name: str) -> object:
    """Turn an environment string into what the field expects (lists, JSON objects, null)."""
    annotation = _annotation_at(model, parts)
    inner = _unwrap_optional(annotation)
    text = raw.strip()
    if typing.get_origin(inner) in {list, tuple}:
        return _env_json(text, parts, name) if text.startswith("[") else split_commas(text)
    if _is_model(inner) and text.startswith("{"):
        return _env_json(text, parts, name)
    if text == "" and inner is not annotation:  # an optional field: empty means unset
        return None
    return raw


def _env_json(text: str, parts: list[str], name: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(".".join(parts), f"env {name}", f"invalid JSON: {exc.msg}") from None


def split_commas(value: object) -> object:
    """Split ``"a, b,,c"`` into ``["a", "b", "c"]``; leave anything but a string alone."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _set_nested(data: dict[str, Any], parts: list[str], value: object, source: str) -> None:
    for depth, part in enumerate(parts[:-1]):
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            key = ".".join(parts[: depth + 1])
            raise ConfigError(
                key, source, "is also set as a single value, so it cannot hold nested keys"
            )
        data = child
    data[parts[-1]] = value


def _record(sources: dict[str, str], path: str, value: object, source: str) -> None:
    """Record *source* for *path* and for everything nested in *value*."""
    sources[path] = source
    if isinstance(value, Mapping):
        for key, item in value.items():
            _record(sources, f"{path}.{key}", item, source)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _record(sources, f"{path}[{index}]", item, source)


def flag_label(key: str, value: object) -> str:
    """Return the spelling of the flag that set *key*, e.g. ``--slots`` or ``--no-community``."""
    name = FLAG_NAMES.get(key, "--" + key.replace(".", "-").replace("_", "-"))
    return "--no-" + name[2:] if value is False else name


def flag_layer(flags: Mapping[str, object]) -> Layer:
    """Return the layer of *flags* (dotted keys); None values are left out."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in flags.items():
        if value is None:
            continue
        source = f"flag {flag_label(key, value)}"
        _set_nested(data, key.split("."), value, source)
        _record(sources, key, value, source)
    return data, sources


# ---------------------------------------------------------------- annotations


def _annotation_at(model: type[BaseModel], parts: list[str]) -> Any:
    """Return the annotation of the field of *model* at *parts*, or None if there is none."""
    group: type[BaseModel] = model
    annotation: Any = None
    for index, part in enumerate(parts):
        field = group.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        inner = _unwrap_optional(annotation)
        if index < len(parts) - 1:
            if not _is_model(inner):
                return None
            group = inner
    return annotation


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in {typing.Union, types.UnionType}:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# ---------------------------------------------------------------- errors and provenance


def validate(model: type[ModelT], layers: Layers, context: Mapping[str, Any]) -> ModelT:
    """Validate the merged *layers* as *model*; raise the first error as a `ConfigError`."""
    try:
        return model.model_validate(layers.data, context=context)
    except ValidationError as exc:
        raise translate(exc, layers.sources, model) from None


def translate(
    exc: ValidationError, sources: Mapping[str, str], model: type[BaseModel]
) -> ConfigError:
    """Turn the first error of *exc* into a `ConfigError`: dotted key, its source, the rule."""
    error = exc.errors(include_url=False, include_context=True, include_input=False)[0]
    key = _dotted(error["loc"]) or "(top level)"
    return ConfigError(key, source_for(key, sources), _rule(error, model))


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _parent(key: str) -> str:
    cut = max(key.rfind("."), key.rfind("["))
    return key[:cut] if cut > 0 else ""


def source_for(key: str, sources: Mapping[str, str]) -> str:
    """Return the source of *key*, else of its nearest ancestor or of what it contains.

    A mapping set only through nested environment variables or flags has no source of its
    own; the sources of its contents are what made it exist.
    """
    probe = key
    while probe:
        if probe in sources:
            return sources[probe]
        inside = sorted({v for k, v in sources.items() if k.startswith((probe + ".", probe + "["))})
        if inside:
            return " and ".join(inside)
        probe = _parent(probe)
    return "default"


def _rule(error: ErrorDetails, model: type[BaseModel]) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(error["loc"], model)
    if kind == "missing":
        return "is required"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return "must be a mapping of keys to values"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if message.startswith("Input should be "):
        return "must be " + message.removeprefix("Input should be ")
    return message[:1].lower() + message[1:]


def _suggestion(loc: tuple[int | str, ...], model: type[BaseModel]) -> str:
    parent = _unwrap_optional(
        _annotation_at(model, [str(p) for p in loc[:-1]]) if loc[:-1] else model
    )
    if not _is_model(parent):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def leaf_sources(model: BaseModel, sources: Mapping[str, str], prefix: str = "") -> dict[str, str]:
    """Return the source of every leaf key of *model*, in declaration order."""
    out: dict[str, str] = {}
    for name in type(model).model_fields:
        dotted = prefix + name
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(leaf_sources(value, sources, dotted + "."))
        else:
            out[dotted] = sources.get(dotted, "default")
    return out
