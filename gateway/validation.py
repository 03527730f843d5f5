"""Validation of a run request's ``parameters`` against a workflow's ``ParameterDef`` list.

Pure code: the caller looks up files (``file_keys_to_lookup``) in its store before calling
``resolve_parameters``, which either returns the injections the agent applies or raises
``ValidationFailure`` for the first problem, in a fixed order:

1. more than ``MAX_PARAMETER_KEYS`` keys (``max_keys``);
2. unknown keys, in sorted order (``unknown_key``);
3. each declared parameter in declaration order: ``required``, then ``type``, then the
   type's own rules (``min``/``max``, ``options``, ``max_length``, and for files
   ``file_not_found``, ``file_team``, ``accept``).

An optional key that is omitted or given as ``null`` takes the parameter's ``default``
(when there is one); the default goes through the same checks as a given value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeGuard, cast

from agent.protocol.messages import Injection
from gateway.models import (
    MAX_PARAMETER_KEYS,
    ParameterDef,
    ParameterType,
    Scalar,
    ToolType,
    Workflow,
    WorkflowIn,
)

MAX_STRING_LENGTH = 10_000
"""The longest ``string`` parameter value, in characters."""

MAX_TARGET_LENGTH = 256
"""The longest ``node_id``/``field``/``target_path`` an ``Injection`` carries."""

_SHOWN_KEY = 64  # an unknown key is cut to this many characters in fields and messages
_SHOWN_OPTIONS = 10  # a message lists at most this many options

InjectionType = Literal["string", "number", "boolean", "select", "file"]
_INJECTION_TYPE: dict[ParameterType, InjectionType] = {
    ParameterType.STRING: "string",
    ParameterType.NUMBER: "number",
    ParameterType.BOOLEAN: "boolean",
    ParameterType.SELECT: "select",
    ParameterType.FILE: "file",
}


@dataclass(frozen=True)
class FileMeta:
    """What the gateway's store knows about an uploaded input file."""

    file_key: str
    team_id: str
    size: int
    content_type: str
    sha256: str | None = None


class ValidationFailure(Exception):  # noqa: N818 - the name is the API the brief fixes
    """A run request or workflow broke a rule; becomes an HTTP 400 ``validation_error``.

    ``field`` names the offending place (``parameters.seed``, ``parameters[2].node_id``),
    ``rule`` is a short machine word (``required``, ``type``, ``min``…), ``message`` is
    the human sentence, naming the parameter key.
    """

    def __init__(self, field: str, rule: str, message: str) -> None:
        """Record where, which rule, and the human message."""
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.message = message


@dataclass(frozen=True)
class ResolvedRun:
    """The validated parameters: what to inject, and which input files the agent fetches."""

    injections: list[Injection]
    files: list[tuple[str, FileMeta]]


# ------------------------------------------------------------------ small helpers


def _show_key(key: str) -> str:
    """Return a key cut to a bounded length (for fields and messages)."""
    return key if len(key) <= _SHOWN_KEY else key[:_SHOWN_KEY] + "…"


_JSON_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (type(None), "null"),
    (bool, "boolean"),  # before int: a bool is an int to Python
    ((int, float), "number"),
    (str, "string"),
    ((list, tuple), "array"),
    (Mapping, "object"),
)


def _json_type(value: object) -> str:
    """Return the JSON name of a value's type, for messages."""
    for kinds, name in _JSON_TYPES:
        if isinstance(value, kinds):
            return name
    return type(value).__name__


def _show_number(value: float) -> str:
    """Return a bound as written by a person (``1`` rather than ``1.0``)."""
    return str(int(value)) if value.is_integer() else repr(value)


def _is_number(value: object) -> TypeGuard[int | float]:
    """Return whether a value is a JSON number: int or finite float, never a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True  # math.isfinite would overflow on huge ints; every int is finite
    return isinstance(value, float) and math.isfinite(value)


def _same_scalar(value: object, option: Scalar) -> bool:
    """Return whether a value equals an option without Python's ``True == 1`` coercion."""
    if isinstance(value, bool) or isinstance(option, bool):
        return isinstance(value, bool) and isinstance(option, bool) and value is option
    if isinstance(value, str) or isinstance(option, str):
        return isinstance(value, str) and isinstance(option, str) and value == option
    return _is_number(value) and value == option


def _mime(text: str) -> str:
    """Return the bare, lower-case MIME type of a header value (parameters dropped)."""
    return text.split(";", 1)[0].strip().lower()


def _mime_matches(pattern: str, content_type: str) -> bool:
    """Return whether one ``accept`` entry (``image/png``, ``image/*``, ``*/*``) matches."""
    if pattern in {"*", "*/*"}:
        return True
    if pattern.endswith("/*"):
        major, slash, _ = content_type.partition("/")
        return bool(slash) and major == pattern[:-2]
    return pattern == content_type


def accepts(accept: str | None, content_type: str) -> bool:
    """Return whether a file's MIME type satisfies a parameter's ``accept``.

    ``accept`` is a comma-separated list of MIME types or wildcards (``image/*``, ``*/*``),
    compared case-insensitively with parameters after ``;`` ignored on both sides. ``None``
    (or a list with no entries) accepts anything.
    """
    if accept is None:
        return True
    patterns = [p for p in (_mime(entry) for entry in accept.split(",")) if p]
    if not patterns:
        return True
    bare = _mime(content_type)
    return any(_mime_matches(pattern, bare) for pattern in patterns)


# ------------------------------------------------------------------ value rules
# Each checker returns None when the value passes, else (rule, what is wrong).

Problem = tuple[str, str] | None


def _check_string(_param: ParameterDef, value: object) -> Problem:
    """A ``string``: a str of at most ``MAX_STRING_LENGTH`` characters."""
    if not isinstance(value, str):
        return "type", f"must be a string, got {_json_type(value)}"
    if len(value) > MAX_STRING_LENGTH:
        return "max_length", f"must be at most {MAX_STRING_LENGTH} characters, got {len(value)}"
    return None


def _check_number(param: ParameterDef, value: object) -> Problem:
    """A ``number``: int or finite float (never a bool) within ``min``/``max``."""
    if not _is_number(value):
        got = "a non-finite number" if isinstance(value, float) else _json_type(value)
        return "type", f"must be a finite number, got {got}"
    if param.min is not None and value < param.min:
        return "min", f"must be at least {_show_number(param.min)}"
    if param.max is not None and value > param.max:
        return "max", f"must be at most {_show_number(param.max)}"
    return None


def _check_boolean(_param: ParameterDef, value: object) -> Problem:
    """A ``boolean``: a JSON true/false."""
    if not isinstance(value, bool):
        return "type", f"must be a boolean, got {_json_type(value)}"
    return None


def _check_select(param: ParameterDef, value: object) -> Problem:
    """A ``select``: equal to one of ``options``, type included (``true`` is not ``1``)."""
    options = param.options or []
    if any(_same_scalar(value, option) for option in options):
        return None
    listed = ", ".join(_show_key(repr(option)) for option in options[:_SHOWN_OPTIONS])
    more = ", …" if len(options) > _SHOWN_OPTIONS else ""
    return "options", f"must be one of: {listed}{more}"


def _check_file_key(_param: ParameterDef, value: object) -> Problem:
    """A ``file`` value: a file_key string (looked up separately)."""
    if not isinstance(value, str):
        return "type", f"must be a file_key string, got {_json_type(value)}"
    return None


_CHECKERS: dict[ParameterType, Callable[[ParameterDef, object], Problem]] = {
    ParameterType.STRING: _check_string,
    ParameterType.NUMBER: _check_number,
    ParameterType.BOOLEAN: _check_boolean,
    ParameterType.SELECT: _check_select,
    ParameterType.FILE: _check_file_key,
}


def _check_file(
    param: ParameterDef, file_key: str, team_id: str, files: Mapping[str, FileMeta]
) -> tuple[FileMeta | None, Problem]:
    """Check a file parameter's ``file_key`` against the looked-up files.

    Messages never echo the file_key or the owning team (a file_key embeds its team).
    """
    meta = files.get(file_key)
    if meta is None:
        return None, ("file_not_found", "names a file_key that was not found")
    if meta.team_id != team_id:
        return None, ("file_team", "names a file_key that belongs to another team")
    if not accepts(param.accept, meta.content_type):
        bare = _mime(meta.content_type)[:100]
        return None, ("accept", f"must be a file of type {param.accept}, got {bare!r}")
    return meta, None


def _canonical(param: ParameterDef, value: Scalar) -> Scalar:
    """Return the value to inject: for a select, the declared option it matched."""
    if param.type is ParameterType.SELECT:
        for option in param.options or []:
            if _same_scalar(value, option):
                return option
    return value


# ------------------------------------------------------------------ run requests


def _value_of(param: ParameterDef, parameters: Mapping[str, object]) -> object:
    """Return the given value, or the default when the key is omitted or null."""
    value = parameters.get(param.key)
    return param.default if value is None else value


def file_keys_to_lookup(workflow: Workflow, parameters: Mapping[str, object] | None) -> list[str]:
    """Return the distinct ``file_key`` strings to look up before ``resolve_parameters``.

    One per ``file`` parameter whose value (given, else default) is a string, in
    declaration order. Other values are left for ``resolve_parameters`` to refuse.
    """
    given = parameters or {}
    found: list[str] = []
    for param in workflow.parameters:
        if param.type is ParameterType.FILE:
            value = _value_of(param, given)
            if isinstance(value, str) and value not in found:
                found.append(value)
    return found


def _check_keys(workflow: Workflow, parameters: Mapping[str, object]) -> None:
    """Refuse too many keys, then unknown keys (first in sorted order)."""
    if len(parameters) > MAX_PARAMETER_KEYS:
        raise ValidationFailure(
            "parameters",
            "max_keys",
            f"parameters has {len(parameters)} keys; at most {MAX_PARAMETER_KEYS} are allowed",
        )
    declared = {param.key for param in workflow.parameters}
    unknown = sorted((key for key in parameters if key not in declared), key=str)
    if unknown:
        shown = _show_key(str(unknown[0]))
        raise ValidationFailure(
            f"parameters.{shown}",
            "unknown_key",
            f"unknown parameter {shown!r}: the workflow declares no such key",
        )


def _injection(tool: ToolType, param: ParameterDef, value: Scalar) -> Injection:
    """Build the injection of one value at the parameter's target for this tool."""
    if tool is ToolType.NERFSTUDIO:
        return Injection(
            key=param.key,
            type=_INJECTION_TYPE[param.type],
            value=value,
            target_path=param.target_path,
        )
    return Injection(
        key=param.key,
        type=_INJECTION_TYPE[param.type],
        value=value,
        node_id=param.node_id,
        field=param.field,
    )


def _resolve_one(
    param: ParameterDef,
    value: object,
    team_id: str,
    files: Mapping[str, FileMeta],
) -> tuple[Scalar, FileMeta | None]:
    """Validate one present value; return the value to inject and, for a file, its file."""
    problem = _CHECKERS[param.type](param, value)
    meta = None
    if problem is None and param.type is ParameterType.FILE and isinstance(value, str):
        meta, problem = _check_file(param, value, team_id, files)
    if problem is not None:
        rule, what = problem
        raise ValidationFailure(f"parameters.{param.key}", rule, f"parameter {param.key!r} {what}")
    return _canonical(param, cast(Scalar, value)), meta  # the checker proved it is a Scalar


def resolve_parameters(
    workflow: Workflow,
    parameters: Mapping[str, object] | None,
    *,
    team_id: str,
    files: Mapping[str, FileMeta],
) -> ResolvedRun:
    """Validate a run request's parameters and resolve them into injections.

    ``files`` maps the looked-up ``file_key`` strings (see ``file_keys_to_lookup``) to their
    metadata; keys that were not found are simply absent. Raises ``ValidationFailure`` for
    the first problem, in the order of the module docstring.
    """
    given = parameters or {}
    _check_keys(workflow, given)
    injections: list[Injection] = []
    used: list[tuple[str, FileMeta]] = []
    for param in workflow.parameters:
        if param.required and given.get(param.key) is None:
            raise ValidationFailure(
                f"parameters.{param.key}", "required", f"parameter {param.key!r} is required"
            )
        value = _value_of(param, given)
        if value is None:
            continue
        resolved, meta = _resolve_one(param, value, team_id, files)
        if meta is not None:
            used.append((param.key, meta))
        injections.append(_injection(workflow.tool_type, param, resolved))
    return ResolvedRun(injections=injections, files=used)


# ------------------------------------------------------------------ workflow create/update


def _check_comfyui_target(
    workflow_json: Mapping[str, object], param: ParameterDef, at: str
) -> None:
    """Require ``workflow_json[node_id]`` to be a node with ``field`` in its ``inputs``."""
    node = workflow_json.get(param.node_id or "")
    if node is None:
        raise ValidationFailure(
            f"{at}.node_id",
            "node_not_found",
            f"parameter {param.key!r}: node {param.node_id!r} is not in workflow_json",
        )
    inputs = node.get("inputs") if isinstance(node, Mapping) else None
    if not isinstance(inputs, Mapping):
        raise ValidationFailure(
            f"{at}.node_id",
            "node_inputs",
            f"parameter {param.key!r}: node {param.node_id!r} is not a node object with an "
            '"inputs" object',
        )
    if param.field not in inputs:
        raise ValidationFailure(
            f"{at}.field",
            "field_not_found",
            f"parameter {param.key!r}: node {param.node_id!r} has no input {param.field!r}",
        )


def _check_nerfstudio_target(param: ParameterDef, at: str) -> None:
    """Require a ``target_path`` short enough for an ``Injection``."""
    if param.target_path is not None and len(param.target_path) > MAX_TARGET_LENGTH:
        raise ValidationFailure(
            f"{at}.target_path",
            "max_length",
            f"parameter {param.key!r}: target_path must be at most {MAX_TARGET_LENGTH} characters",
        )


def _target_of(tool: ToolType, param: ParameterDef) -> tuple[str | None, ...]:
    """Return where a parameter injects, for duplicate detection."""
    if tool is ToolType.NERFSTUDIO:
        return (param.target_path,)
    return (param.node_id, param.field)


def _check_default(param: ParameterDef, at: str) -> None:
    """Require a default to satisfy the parameter's own type rules.

    A file default is only checked to be a string: whether it exists, belongs to the team
    and matches ``accept`` is checked at run time, like a given file_key.
    """
    if param.default is None:
        return
    problem = _CHECKERS[param.type](param, param.default)
    if problem is not None:
        rule, what = problem
        raise ValidationFailure(f"{at}.default", rule, f"default of parameter {param.key!r} {what}")


def check_workflow_targets(workflow: WorkflowIn) -> None:
    """Check, at workflow create/update, that every parameter can be injected.

    ComfyUI: ``workflow_json[node_id]`` must exist (``node_not_found``) and be an object
    with an ``inputs`` object (``node_inputs``), and ``field`` must already be a key of
    those inputs (``field_not_found``) — a literal or a link: the agent overwrites it, and
    requiring the key catches typos that ComfyUI would silently ignore. Nerfstudio:
    ``target_path`` must fit an ``Injection`` (``max_length``); its existence in the
    pipeline spec is not required. Two parameters may not share a target
    (``duplicate_target``). A default must satisfy the parameter's rules (the value rules'
    names, field ``parameters[i].default``). Raises ``ValidationFailure`` for the first
    problem, parameters in declaration order.
    """
    seen: dict[tuple[str | None, ...], str] = {}
    for index, param in enumerate(workflow.parameters):
        at = f"parameters[{index}]"
        if workflow.tool_type is ToolType.COMFYUI:
            _check_comfyui_target(workflow.workflow_json, param, at)
        else:
            _check_nerfstudio_target(param, at)
        target = _target_of(workflow.tool_type, param)
        if target in seen:
            where = "node_id" if workflow.tool_type is ToolType.COMFYUI else "target_path"
            raise ValidationFailure(
                f"{at}.{where}",
                "duplicate_target",
                f"parameter {param.key!r} injects at the same place as {seen[target]!r}",
            )
        seen[target] = param.key
        _check_default(param, at)
