"""Pure ComfyUI graph handling: injections, validation, prompt ids, outputs, errors.

No I/O here: everything takes and returns plain data, so every rule is unit-tested.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.runtimes.base import Injection, TaskFailure

NAMESPACE = uuid.UUID("4f0c4f1e-6d1b-4c55-9a61-6b0a1f3c9e11")
MAX_TRACEBACK_LINES = 20
MAX_MESSAGE = 4000
FILE_FIELDS = ("filename", "subfolder", "type")


@dataclass(frozen=True)
class OutputRef:
    """One output file ComfyUI produced, keyed ``<node>.<field>.<index>``."""

    key: str
    filename: str
    subfolder: str
    kind: str


def prompt_id_for(task_id: str, attempt: int) -> str:
    """The prompt id of a task attempt: stable, so a restarted agent can find it again."""
    return str(uuid.uuid5(NAMESPACE, f"{task_id}/{attempt}"))


def apply_injections(
    workflow: Mapping[str, Any], injections: Iterable[Injection]
) -> dict[str, Any]:
    """A copy of ``workflow`` with each ``workflow[node_id].inputs[field] = value``.

    Refuses (``invalid_workflow``) a graph that is not an API-format prompt, and an
    injection into a node or field that does not exist; coerces the value to the type the
    field currently holds (int/float/bool/str).
    """
    graph = copy.deepcopy(dict(workflow))
    check_graph(graph)
    for injection in injections:
        node = graph.get(str(injection.node_id))
        if injection.node_id is None or injection.field is None or not isinstance(node, dict):
            raise TaskFailure(
                "invalid_workflow",
                f"parameter {injection.key}: node {injection.node_id!r} not in the workflow",
            )
        inputs = node["inputs"]
        if injection.field not in inputs:
            where = f"node {injection.node_id} has no input {injection.field!r}"
            raise TaskFailure(
                "invalid_workflow",
                f"parameter {injection.key}: {where}",
                node_id=str(injection.node_id),
            )
        inputs[injection.field] = _coerce(injection, inputs[injection.field])
    return graph


def check_graph(graph: Mapping[str, Any]) -> None:
    """An API-format prompt: node id → ``{class_type: str, inputs: dict}``."""
    if not graph:
        raise TaskFailure("invalid_workflow", "the workflow has no nodes")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise TaskFailure(
                "invalid_workflow", f"node {node_id} has no class_type (not an API-format workflow)"
            )
        if not isinstance(node.setdefault("inputs", {}), dict):
            raise TaskFailure(
                "invalid_workflow",
                f"node {node_id}: inputs must be an object",
                node_id=str(node_id),
            )


def _coerce(injection: Injection, current: Any) -> Any:
    value = injection.value
    try:
        if isinstance(current, bool):
            return bool(value)
        if (
            isinstance(current, int)
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            return int(value) if float(value).is_integer() else float(value)
        if isinstance(current, float) and isinstance(value, int | float):
            return float(value)
    except (TypeError, ValueError) as exc:
        raise TaskFailure(
            "invalid_workflow", f"parameter {injection.key}: cannot use {value!r}"
        ) from exc
    return value


def unknown_classes(
    graph: Mapping[str, Any], object_info: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """(node id, class type) of every node ComfyUI does not know, sorted."""
    return sorted(
        (str(node_id), str(node["class_type"]))
        for node_id, node in graph.items()
        if node["class_type"] not in object_info
    )


def output_refs(outputs: Mapping[str, Any]) -> list[OutputRef]:
    """Every file in a history entry's (or ``executed`` event's) outputs, of every kind.

    ``outputs`` maps node id → ``{field: [items]}``; file items carry ``filename``,
    ``subfolder`` and ``type`` whatever the field (images, gifs, videos, audio, 3d, …).
    """
    refs: list[OutputRef] = []
    for node_id, fields in sorted(outputs.items()):
        if not isinstance(fields, dict):
            continue
        refs.extend(_field_refs(str(node_id), fields))
    return refs


def _field_refs(node_id: str, fields: Mapping[str, Any]) -> list[OutputRef]:
    refs = []
    for field, items in sorted(fields.items()):
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            if isinstance(item, dict) and isinstance(item.get("filename"), str):
                refs.append(
                    OutputRef(
                        key=f"{node_id}.{field}.{index}",
                        filename=item["filename"],
                        subfolder=str(item.get("subfolder") or ""),
                        kind=str(item.get("type") or "output"),
                    )
                )
    return refs


def text_outputs(outputs: Mapping[str, Any]) -> dict[str, str]:
    """Text results (``{"text": ["…"]}`` style), keyed like files."""
    found: dict[str, str] = {}
    for node_id, fields in sorted(outputs.items()):
        if not isinstance(fields, dict):
            continue
        for field, items in fields.items():
            if isinstance(items, list):
                for index, item in enumerate(items):
                    if isinstance(item, str):
                        found[f"{node_id}.{field}.{index}"] = item
    return found


def prompt_rejection(body: Mapping[str, Any]) -> TaskFailure:
    """A 400 from ``/prompt`` as a task failure naming the node, class and message."""
    node_errors = body.get("node_errors") or {}
    if isinstance(node_errors, dict):
        for node_id, detail in node_errors.items():
            if not isinstance(detail, dict):
                continue
            errors = detail.get("errors") or [{}]
            first = errors[0] if isinstance(errors, list) and errors else {}
            message = _first_text(first, "details", "message") or "invalid input"
            class_type = detail.get("class_type", "?")
            return TaskFailure(
                "invalid_workflow",
                f"node {node_id} ({class_type}): {message}"[:MAX_MESSAGE],
                node_id=str(node_id),
            )
    error = body.get("error") or {}
    message = _first_text(error, "message", "details") if isinstance(error, dict) else str(error)
    return TaskFailure(
        "invalid_workflow", (message or "ComfyUI rejected the workflow")[:MAX_MESSAGE]
    )


def execution_failure(event: Mapping[str, Any]) -> TaskFailure:
    """An ``execution_error`` as a task failure (never the huge ``current_inputs``)."""
    node_id = str(event.get("node_id") or "") or None
    node_type = event.get("node_type") or "?"
    message = str(event.get("exception_message") or "execution error").strip()
    trace = event.get("traceback") or []
    tail = (
        "".join(str(line) for line in trace[-MAX_TRACEBACK_LINES:])
        if isinstance(trace, list)
        else ""
    )
    text = f"node {node_id} ({node_type}): {message}"
    if tail:
        text += f"\n{tail}"
    return TaskFailure("node_error", text[:MAX_MESSAGE], node_id=node_id)


def _first_text(mapping: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""
