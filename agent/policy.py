"""The community policy engine: whether a stranger's task may run on this GPU at all.

Pure (no I/O): :func:`check_task` reads a ``task.assign``, the ``policy.*`` settings, ComfyUI's
node catalog (``GET /object_info``, fetched by the caller) and the names of the model files
the agent's cache holds, and returns the first :class:`Violation` or ``None``. The caller
rejects a violating task with reason ``policy_denied`` and ``str(violation)`` before
``task.accept``, so nothing is downloaded or executed. Rules (``Violation.rule``):

``duration``
    ``timeout_s`` above ``policy.max_duration_s`` (0, no timeout, is allowed: the runner caps
    a policed task at ``max_duration_s``).

ComfyUI — the graph as the runtime would build it (non-file injections applied, file
injections with a placeholder; a graph the runtime would refuse as ``invalid_workflow`` is
left to it: it executes nothing). Each rule in turn, nodes in numeric id order then the rest:

``comfyui.nodes``
    a class that is not built in (``python_module`` ``nodes`` or ``comfy_extras.*`` in the
    catalog) nor in ``policy.comfyui.allow_nodes`` — custom nodes (``custom_nodes.*``), the
    paid API nodes (``comfy_api_nodes.*``: they call external services) and unknown classes
    included — or one in ``deny_nodes``; also: no catalog at all. The built-ins of
    :data:`RESTRICTED_BUILT_INS` (readers of shared folders, writers of unreported files)
    need ``allow_nodes`` too.
``comfyui.limits.<kind>``
    literal numbers (a number, a numeric string, ``{"__value__": …}``, or the ``value`` of a
    ``PrimitiveInt``/``PrimitiveFloat`` node one link away), by input name, case-insensitive:
    ``resolution`` (``width``/``height`` over ``max_side``), ``pixels`` (one node's
    width * height over ``max_pixels``), ``batch_size`` (``batch_size``, ``amount``),
    ``steps``, ``frames`` (``length``, ``frames``, ``video_frames``, ``num_frames``,
    ``frame_count``), ``seconds`` (``seconds``, ``duration``), ``scale`` (``scale_by``,
    ``upscale_factor``, ``upscale_by``). NaN and infinities are refused too, and so is an
    ``INT``/``FLOAT`` limited input fed by any other node (``StringLength``, ``GetImageSize``…):
    its value is known only once the graph runs.
``comfyui.urls`` / ``comfyui.paths``
    a string input that is not prompt text (``multiline`` in the catalog) holding a URL
    (``scheme://``, leading ``//``, ``file:``) or a path that could leave ComfyUI's folders
    (absolute, ``~``, a drive letter, any backslash, a ``..`` segment, NUL). A string from a
    ``PrimitiveString``/``PrimitiveStringMultiline`` node one link away counts as literal; a
    ``STRING`` input fed by any other node (``StringConcatenate``…) is refused as ``paths``.
``comfyui.inputs``
    a file-picking combo (``*_upload`` in its options: ``LoadImage``, ``LoadVideo``…) or a
    combo value that looks like a file name (an extension with a letter), not a model file,
    that no ``file`` injection of this task fills: it could read someone else's upload. A
    file combo (a picker, file-like choices, or none: an empty folder) fed by a link is
    refused too.
``comfyui.models``
    a combo naming a model file (``.safetensors``, ``.ckpt``…) that is neither in the
    agent's model cache nor in ``policy.comfyui.allow_models``.

Nerfstudio — the spec as ``parse_spec`` validates it (an invalid one is left to the runtime):
``nerfstudio.method`` (outside ``policy.nerfstudio.methods``), ``nerfstudio.options``
(``train.options``/``train.dataparser`` keys outside ``allow_options``, when set),
``nerfstudio.limits`` (``max_num_iterations`` over ``max_iterations``, an export's
``num_points`` over ``max_points``, ``process.num_frames_target`` over ``max_frames``).

Other tools: the duration rule only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import Any

from agent.protocol.messages import TaskAssign, Tool
from agent.runtimes.base import Injection, TaskFailure
from agent.runtimes.comfyui.workflow import apply_injections
from agent.runtimes.nerfstudio.spec import PipelineSpec, parse_spec
from agent.settings import ComfyUIPolicy, NerfstudioPolicy, PolicySettings

BUILT_IN_MODULE = "nodes"
BUILT_IN_PREFIX = "comfy_extras."
_READS_SHARED = "reads a folder ComfyUI shares between tasks (other tasks' files)"
_WRITES_UNREPORTED = (
    "writes files its history does not report (models, datasets), which the purge of a "
    "community task could not remove"
)
#: Built-in nodes refused unless the owner lists them in ``policy.comfyui.allow_nodes``, and
#: why (ComfyUI 0.3.75's comfy_extras).
RESTRICTED_BUILT_INS: dict[str, str] = {
    "LoadImageDataSetFromFolder": _READS_SHARED,
    "LoadImageTextDataSetFromFolder": _READS_SHARED,
    "LoadTrainingDataset": _READS_SHARED,
    "CheckpointSave": _WRITES_UNREPORTED,
    "ImageOnlyCheckpointSave": _WRITES_UNREPORTED,
    "CLIPSave": _WRITES_UNREPORTED,
    "VAESave": _WRITES_UNREPORTED,
    "ModelSave": _WRITES_UNREPORTED,
    "LoraSave": _WRITES_UNREPORTED,
    "SaveLoRA": _WRITES_UNREPORTED,
    "SaveImageDataSetToFolder": _WRITES_UNREPORTED,
    "SaveImageTextDataSetToFolder": _WRITES_UNREPORTED,
    "SaveTrainingDataset": _WRITES_UNREPORTED,
    "Preview3D": _WRITES_UNREPORTED,
}
NUMBER_PRIMITIVES = frozenset({"PrimitiveInt", "PrimitiveFloat"})
STRING_PRIMITIVES = frozenset({"PrimitiveString", "PrimitiveStringMultiline"})
NUMBER_TYPES = frozenset({"INT", "FLOAT"})
STRING_TYPES = frozenset({"STRING"})
MODEL_EXTENSIONS = frozenset(
    {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx", ".pkl", ".vae"}
)
#: Lower-case input name → limit kind (the rule is ``comfyui.limits.<kind>``).
LIMITED_INPUTS: dict[str, str] = {
    "width": "resolution",
    "height": "resolution",
    "batch_size": "batch_size",
    "amount": "batch_size",
    "steps": "steps",
    "length": "frames",
    "frames": "frames",
    "video_frames": "frames",
    "num_frames": "frames",
    "frame_count": "frames",
    "seconds": "seconds",
    "duration": "seconds",
    "scale_by": "scale",
    "upscale_factor": "scale",
    "upscale_by": "scale",
}
#: Limit kind → the ``policy.comfyui`` setting that bounds it.
LIMIT_SETTINGS: dict[str, str] = {
    "resolution": "max_side",
    "batch_size": "max_batch_size",
    "steps": "max_steps",
    "frames": "max_frames",
    "seconds": "max_seconds",
    "scale": "max_scale",
}
MAX_NUMERIC_ID = 18  # digits of a node id sorted as a number
MAX_SHOWN = 80  # characters of a stranger's value quoted in a message

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
_FILE_NAME = re.compile(r"[^/\\]\.(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{1,8}$")
_SEPARATORS = re.compile(r"[\\/]")

Number = int | float


@dataclass(frozen=True)
class Violation:
    """Why a task may not run here: a stable dotted ``rule`` and a ``message`` for people."""

    rule: str
    message: str

    def __str__(self) -> str:
        """``<rule>: <message>`` (what ``task.reject`` carries)."""
        return f"{self.rule}: {self.message}"


def check_task(
    assign: TaskAssign,
    policy: PolicySettings,
    *,
    node_catalog: Mapping[str, Any] | None,
    models: Collection[str],
) -> Violation | None:
    """The first rule ``assign`` breaks under ``policy``, or ``None`` when it may run.

    ``node_catalog``: ComfyUI's ``/object_info`` (``None``: unavailable, which refuses a
    ComfyUI task); ``models``: the model file names the agent's cache holds, relative to
    their model folder as ComfyUI lists them.
    """
    if assign.timeout_s > policy.max_duration_s:
        return Violation(
            "duration",
            f"timeout_s {assign.timeout_s:g} s exceeds policy.max_duration_s "
            f"{policy.max_duration_s:g} s",
        )
    if assign.tool == Tool.COMFYUI:
        return _check_comfyui(assign, policy.comfyui, node_catalog, models)
    # other tools (none today): the duration rule only
    return _check_nerfstudio(assign, policy.nerfstudio) if assign.tool == Tool.NERFSTUDIO else None


def _injections(assign: TaskAssign) -> list[Injection]:
    """The assign's injections as the runner hands them to a runtime."""
    return [Injection(**item.model_dump()) for item in assign.injections]


# ---------------------------------------------------------------- ComfyUI


@dataclass(frozen=True)
class _Node:
    """One node of the graph with its catalog input specs (name → ``[type, options]``)."""

    node_id: str
    class_type: str
    inputs: Mapping[str, Any]
    specs: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"node {self.node_id} ({self.class_type})"


@dataclass(frozen=True)
class _Context:
    """What every ComfyUI rule may look at."""

    policy: ComfyUIPolicy
    graph: Mapping[str, Any]
    catalog: Mapping[str, Any]
    files: frozenset[tuple[str, str]]
    """(node id, field) of every ``file`` injection of the task."""
    models: frozenset[str]


NodeRule = Callable[[_Node, _Context], Violation | None]


def _check_comfyui(
    assign: TaskAssign,
    policy: ComfyUIPolicy,
    catalog: Mapping[str, Any] | None,
    models: Collection[str],
) -> Violation | None:
    if catalog is None:
        return Violation(
            "comfyui.nodes", "the node catalog is unavailable (ComfyUI's /object_info)"
        )
    injections = _injections(assign)
    graph = _graph(assign.workflow, injections)
    if graph is None:
        return None  # the runtime fails it as invalid_workflow, executing nothing
    context = _Context(
        policy=policy,
        graph=graph,
        catalog=catalog,
        files=frozenset((str(i.node_id), str(i.field)) for i in injections if i.type == "file"),
        models=frozenset(models) | frozenset(policy.allow_models),
    )
    nodes = [_node(node_id, graph[node_id], catalog) for node_id in sorted(graph, key=_order)]
    rules: tuple[NodeRule, ...] = (_node_class, _limits, _strings, _combos)
    for rule in rules:
        for node in nodes:
            violation = rule(node, context)
            if violation is not None:
                return violation
    return None


def _graph(workflow: Mapping[str, Any], injections: list[Injection]) -> dict[str, Any] | None:
    """The graph the runtime would submit (file inputs as placeholders); None if invalid."""
    try:
        graph = apply_injections(workflow, [i for i in injections if i.type != "file"])
        files = [dataclass_replace(i, value="") for i in injections if i.type == "file"]
        return apply_injections(graph, files)
    except TaskFailure:
        return None


def _order(node_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order first, then the others (absurdly long numbers too) by name."""
    if node_id.isascii() and node_id.isdigit() and len(node_id) <= MAX_NUMERIC_ID:
        return (0, int(node_id), node_id)
    return (1, 0, node_id)


def _node(node_id: str, node: Mapping[str, Any], catalog: Mapping[str, Any]) -> _Node:
    class_type = str(node["class_type"])
    specs: dict[str, Any] = {}
    info = catalog.get(class_type)
    declared = info.get("input") if isinstance(info, Mapping) else None
    if isinstance(declared, Mapping):
        for category in ("optional", "required"):  # required wins on a clash
            group = declared.get(category)
            if isinstance(group, Mapping):
                specs.update(group)
    return _Node(str(node_id), class_type, node["inputs"], specs)


# -- nodes


def _node_class(node: _Node, context: _Context) -> Violation | None:
    policy = context.policy
    if node.class_type in policy.deny_nodes:
        return Violation(
            "comfyui.nodes", f"{node.where}: the class is in policy.comfyui.deny_nodes"
        )
    if node.class_type in policy.allow_nodes:
        return None
    info = context.catalog.get(node.class_type)
    if not isinstance(info, Mapping):
        return Violation(
            "comfyui.nodes",
            f"{node.where}: the class is not in ComfyUI's node catalog (not installed)",
        )
    module = str(info.get("python_module") or "")
    restricted = RESTRICTED_BUILT_INS.get(node.class_type)
    if restricted is not None:
        return Violation(
            "comfyui.nodes",
            f"{node.where}: {restricted}; allowed only through policy.comfyui.allow_nodes",
        )
    if module == BUILT_IN_MODULE or module.startswith(BUILT_IN_PREFIX):
        return None
    return Violation(
        "comfyui.nodes",
        f"{node.where}: {_kind_of(module)} ({module or 'unknown module'}), not one of "
        "ComfyUI's built-in nodes and not in policy.comfyui.allow_nodes",
    )


def _kind_of(module: str) -> str:
    if module.startswith("comfy_api_nodes"):
        return "a paid API node that calls an external service"
    if module.startswith("custom_nodes"):
        return "a custom node"
    return "a node from another module"


# -- limits


def _limits(node: _Node, context: _Context) -> Violation | None:
    sides: dict[str, Number] = {}
    for name, raw in node.inputs.items():
        kind = LIMITED_INPUTS.get(name.lower())
        if kind is None:
            continue
        computed = _computed(node, name, context.graph, types=NUMBER_TYPES)
        if computed:
            return Violation(
                f"comfyui.limits.{kind}",
                f"{node.where}: {name} is computed by {computed}; a limited input takes a "
                "literal or a PrimitiveInt/PrimitiveFloat (its value cannot be checked)",
            )
        found = _number(raw, context.graph)
        if found is None:
            continue
        value, source = found
        violation = _limit(node, context.policy, kind, f"{name} {_show(value)}{source}", value)
        if violation is not None:
            return violation
        if kind == "resolution":
            sides[name.lower()] = value
    return _pixels(node, context.policy, sides)


def _limit(
    node: _Node, policy: ComfyUIPolicy, kind: str, what: str, value: Number
) -> Violation | None:
    setting = LIMIT_SETTINGS[kind]
    limit: Number = getattr(policy, setting)
    shown = f"policy.comfyui.{setting} {_show(limit)}"
    if isinstance(value, float) and not math.isfinite(value):
        return Violation(f"comfyui.limits.{kind}", f"{node.where}: {what} is not finite ({shown})")
    if value > limit:
        return Violation(f"comfyui.limits.{kind}", f"{node.where}: {what} exceeds {shown}")
    return None


def _pixels(node: _Node, policy: ComfyUIPolicy, sides: Mapping[str, Number]) -> Violation | None:
    if "width" not in sides or "height" not in sides:
        return None
    width, height = sides["width"], sides["height"]
    if width * height <= policy.max_pixels:
        return None
    return Violation(
        "comfyui.limits.pixels",
        f"{node.where}: width x height {_show(width)} x {_show(height)} = "
        f"{_show(width * height)} exceeds policy.comfyui.max_pixels {policy.max_pixels}",
    )


def _number(raw: Any, graph: Mapping[str, Any]) -> tuple[Number, str] | None:
    """A literal number (as ComfyUI would read it), and where it came from; None if none."""
    value, source = _through_primitive(raw, graph, NUMBER_PRIMITIVES)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value, source
    if isinstance(value, str):
        try:
            return float(value), source  # ComfyUI converts "8192" to an INT/FLOAT input
        except ValueError:
            return None
    return None


def _through_primitive(
    raw: Any, graph: Mapping[str, Any], classes: frozenset[str]
) -> tuple[Any, str]:
    """The literal value of an input, following one link to a primitive node of ``classes``.

    Returns the value (a link or any non-literal when there is none) and `` (from node N
    Class)`` when it came through a link.
    """
    if not _is_link(raw):
        return _unwrap(raw), ""  # ComfyUI: a list is a link, else {"__value__": x} is x
    source = graph.get(str(raw[0]))
    if not isinstance(source, Mapping) or source.get("class_type") not in classes:
        return raw, ""
    literal = _unwrap(source["inputs"].get("value"))
    return literal, f" (from node {raw[0]} {source['class_type']})"


def _computed(node: _Node, name: str, graph: Mapping[str, Any], *, types: frozenset[str]) -> str:
    """Where an input's value is computed: ``node N (Class)``, or ``""`` for a literal.

    That is an input declared as one of ``types`` fed by a link to a node of the graph other
    than a primitive of those types. A link to a missing node is left to ComfyUI, which
    refuses the graph.
    """
    raw = node.inputs[name]
    primitives = NUMBER_PRIMITIVES if types == NUMBER_TYPES else STRING_PRIMITIVES
    spec = node.specs.get(name)
    declared = spec[0] if isinstance(spec, list | tuple) and spec else None
    if not _is_link(raw) or not isinstance(declared, str) or declared not in types:
        return ""
    source = graph.get(str(raw[0]))
    if not isinstance(source, Mapping) or source.get("class_type") in primitives:
        return ""
    return f"node {raw[0]} ({source.get('class_type')})"


def _unwrap(value: Any) -> Any:
    """ComfyUI unwraps ``{"__value__": x}`` (a list literal that is not a link) to ``x``."""
    if isinstance(value, Mapping) and "__value__" in value:
        return value["__value__"]
    return value


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


# -- strings


def _strings(node: _Node, context: _Context) -> Violation | None:
    for name, raw in node.inputs.items():
        if _spec_options(node.specs.get(name)).get("multiline") is True:
            continue  # prompt text
        computed = _computed(node, name, context.graph, types=STRING_TYPES)
        if computed:
            return Violation(
                "comfyui.paths",
                f"{node.where}: {name} is computed by {computed}; a string that is not prompt "
                "text takes a literal or a PrimitiveString (it could build a path or a URL)",
            )
        value, source = _through_primitive(raw, context.graph, STRING_PRIMITIVES)
        if not isinstance(value, str):
            continue
        what = f"{node.where}: {name} {_quote(value)}{source}"
        if _is_url(value):
            return Violation("comfyui.urls", f"{what} is a URL (only prompt text may hold one)")
        if _is_path(value):
            return Violation("comfyui.paths", f"{what} is a path that may leave ComfyUI's folders")
    return None


def _is_url(value: str) -> bool:
    text = value.strip()
    return bool(_SCHEME.search(text) or text.startswith("//") or text.lower().startswith("file:"))


def _is_path(value: str) -> bool:
    text = value.strip()
    return (
        text.startswith(("/", "~", "\\"))
        or _DRIVE.match(text) is not None
        or "\\" in value
        or "\0" in value
        or any(part.strip() == ".." for part in _SEPARATORS.split(value))
    )


# -- combos


def _combos(node: _Node, context: _Context) -> Violation | None:
    for name, raw in node.inputs.items():
        options = _combo_options(node.specs.get(name))
        value = _unwrap(raw)
        if options is None or (node.node_id, name) in context.files:
            continue
        if _is_link(raw) and _is_file_combo(node.specs[name], options):
            return Violation(
                "comfyui.inputs",
                f"{node.where}: {name} is fed by node {raw[0]}, not a file this task supplies "
                "(a file or model choice takes a literal)",
            )
        if not isinstance(value, str):
            continue
        violation = _combo(node, name, value, options, context)
        if violation is not None:
            return violation
    return None


def _combo(
    node: _Node, name: str, value: str, options: Mapping[str, Any], context: _Context
) -> Violation | None:
    what = f"{node.where}: {name} {_quote(value)}"
    model = _is_model_file(value)
    upload = any(key.endswith("_upload") and flag for key, flag in options.items())
    if upload or (not model and _FILE_NAME.search(value)):
        return Violation(
            "comfyui.inputs", f"{what} is not a file this task supplies (a file parameter)"
        )
    if model and value not in context.models:
        return Violation(
            "comfyui.models",
            f"{what} is neither in the agent's model cache nor in policy.comfyui.allow_models",
        )
    return None


def _combo_options(spec: Any) -> Mapping[str, Any] | None:
    """The options dict of a combo input spec (``[[choices], {…}]``, ``["COMBO", {…}]``)."""
    if not isinstance(spec, list | tuple) or not spec:
        return None
    if isinstance(spec[0], list | tuple) or spec[0] == "COMBO":
        return _spec_options(spec)
    return None


def _is_file_combo(spec: Any, options: Mapping[str, Any]) -> bool:
    """A file picker, or a combo listing files (or nothing: an empty model or input folder)."""
    if any(key.endswith("_upload") and flag for key, flag in options.items()):
        return True
    choices = spec[0] if isinstance(spec[0], list | tuple) else options.get("options")
    if not isinstance(choices, list | tuple) or not choices:
        return True
    return any(
        isinstance(choice, str) and (_is_model_file(choice) or _FILE_NAME.search(choice))
        for choice in choices
    )


def _spec_options(spec: Any) -> Mapping[str, Any]:
    if isinstance(spec, list | tuple) and len(spec) > 1 and isinstance(spec[1], Mapping):
        return spec[1]
    return {}


def _is_model_file(value: str) -> bool:
    dot = value.rfind(".")
    return dot > 0 and value[dot:].lower() in MODEL_EXTENSIONS


def _quote(value: str) -> str:
    shown = value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "…"
    return repr(shown)


def _show(value: Number) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else f"{value:g}"
    shown = str(value)  # at most 4300 digits: Python refuses to parse longer ones
    return shown if len(shown) <= MAX_SHOWN else f"{shown[:20]}…({len(shown)} digits)"


# ---------------------------------------------------------------- Nerfstudio


def _check_nerfstudio(assign: TaskAssign, policy: NerfstudioPolicy) -> Violation | None:
    try:
        spec = parse_spec(assign.workflow, _injections(assign))
    except TaskFailure:
        return None  # the runtime fails it as invalid_workflow, executing nothing
    if spec.train.method not in policy.methods:
        return Violation(
            "nerfstudio.method",
            f"train.method {spec.train.method} is not in policy.nerfstudio.methods "
            f"({', '.join(policy.methods)})",
        )
    return _nerfstudio_options(spec, policy) or _nerfstudio_limits(spec, policy)


def _nerfstudio_options(spec: PipelineSpec, policy: NerfstudioPolicy) -> Violation | None:
    if policy.allow_options is None:
        return None
    for where, options in (
        ("train.options", spec.train.options),
        ("train.dataparser", spec.train.dataparser),
    ):
        for key in sorted(options):
            if key not in policy.allow_options:
                return Violation(
                    "nerfstudio.options",
                    f"{where} {key!r} is not in policy.nerfstudio.allow_options",
                )
    return None


def _nerfstudio_limits(spec: PipelineSpec, policy: NerfstudioPolicy) -> Violation | None:
    for what, value, setting, limit in _nerfstudio_values(spec, policy):
        if value > limit:
            return Violation(
                "nerfstudio.limits", f"{what} {value} exceeds policy.nerfstudio.{setting} {limit}"
            )
    return None


def _nerfstudio_values(
    spec: PipelineSpec, policy: NerfstudioPolicy
) -> Iterator[tuple[str, int, str, int]]:
    """(what, value, setting, limit) of every bounded number in the spec."""
    yield (
        "train.max_num_iterations",
        spec.train.max_num_iterations,
        "max_iterations",
        policy.max_iterations,
    )
    for index, export in enumerate(spec.export):
        if export.num_points is not None:
            yield f"export[{index}].num_points", export.num_points, "max_points", policy.max_points
    if spec.process is not None:
        yield (
            "process.num_frames_target",
            spec.process.num_frames_target,
            "max_frames",
            policy.max_frames,
        )
