"""The Nerfstudio pipeline spec: the ``workflow`` of a ``nerfstudio`` task.

The platform calls it "a Nerfstudio 3DGS pipeline spec" and injects parameters by dotted
``target_path`` (``train.max_num_iterations``) but publishes no schema; this module is
that schema (``docs/nerfstudio.md``; ``nerfstudio_schema()`` exports it). Everything that
reaches a command line is typed and allowlisted here: no shell, no free-form flags, no
paths — the runtime supplies every path inside the task's workspace.

::

    {
      "input":   {"param": "scene", "kind": "dataset"},          # or images / video
      "process": {"matching_method": "sequential"},              # images / video only
      "train":   {"method": "splatfacto", "max_num_iterations": 30000,
                  "device": "cuda", "options": {"pipeline.model.sh-degree": 3}},
      "export":  [{"kind": "gaussian-splat"}, {"kind": "pointcloud", "num_points": 1000000}]
    }
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.runtimes.base import Injection, TaskFailure

Method = Literal["splatfacto", "splatfacto-big", "nerfacto", "nerfacto-big", "nerfacto-huge"]
ExportKind = Literal["gaussian-splat", "pointcloud", "poisson", "cameras"]
Scalar = bool | int | float | str

#: ``ns-train`` options a task may set, with their types (everything else is refused).
TRAIN_OPTIONS: dict[str, type] = {
    "pipeline.datamanager.train-num-rays-per-batch": int,
    "pipeline.datamanager.eval-num-rays-per-batch": int,
    "pipeline.model.sh-degree": int,
    "pipeline.model.cull-alpha-thresh": float,
    "pipeline.model.densify-grad-thresh": float,
    "pipeline.model.num-random": int,
    "pipeline.model.background-color": str,
    "pipeline.model.predict-normals": bool,
    "steps-per-save": int,
    "steps-per-eval-image": int,
    "mixed-precision": bool,
    "optimizers.fields.optimizer.lr": float,
}
#: ``nerfstudio-data`` data parser options.
DATAPARSER_OPTIONS: dict[str, type] = {
    "downscale-factor": int,
    "scene-scale": float,
    "orientation-method": str,
    "center-method": str,
    "auto-scale-poses": bool,
}
_CHOICES: dict[str, frozenset[str]] = {
    "pipeline.model.background-color": frozenset({"random", "last_sample", "black", "white"}),
    "orientation-method": frozenset({"pca", "up", "vertical", "none"}),
    "center-method": frozenset({"poses", "focus", "none"}),
}


class SpecModel(BaseModel):
    """Strict: unknown keys are refused (they would be silently ignored flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(SpecModel):
    """Where the scene comes from: a ``file`` parameter of the workflow."""

    param: Annotated[str, Field(min_length=1, max_length=64)] = "scene"
    kind: Literal["dataset", "images", "video"] = "dataset"
    """``dataset``: a zip with ``transforms.json`` + images (already processed);
    ``images``: a zip of photos; ``video``: a video file — both need ``process``."""


class ProcessSpec(SpecModel):
    """``ns-process-data`` options (images / video inputs)."""

    matching_method: Literal["exhaustive", "sequential", "vocab_tree"] = "sequential"
    camera_type: Literal["perspective", "fisheye", "equirectangular"] = "perspective"
    num_frames_target: Annotated[int, Field(ge=10, le=2000)] = 300
    num_downscales: Annotated[int, Field(ge=0, le=4)] = 3


class TrainSpec(SpecModel):
    """``ns-train``: the method, its length, the device and allowlisted options."""

    method: Method = "splatfacto"
    max_num_iterations: Annotated[int, Field(ge=1, le=1_000_000)] = 30_000
    device: Literal["cuda", "cpu"] = "cuda"
    options: dict[str, Scalar] = Field(default_factory=dict)
    dataparser: dict[str, Scalar] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        return _check_options(value, TRAIN_OPTIONS, "train.options")

    @field_validator("dataparser")
    @classmethod
    def _dataparser(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        return _check_options(value, DATAPARSER_OPTIONS, "train.dataparser")


class ExportSpec(SpecModel):
    """One ``ns-export`` run."""

    kind: ExportKind
    num_points: Annotated[int, Field(ge=1_000, le=10_000_000)] | None = None
    normal_method: Literal["open3d", "model_output"] | None = None
    remove_outliers: bool | None = None

    @model_validator(mode="after")
    def _fits_kind(self) -> ExportSpec:
        if self.kind in {"gaussian-splat", "cameras"} and (self.num_points or self.normal_method):
            raise ValueError(f"{self.kind} takes no num_points/normal_method")
        return self


class PipelineSpec(SpecModel):
    """A whole Nerfstudio pipeline (see the module docstring)."""

    input: InputSpec = Field(default_factory=InputSpec)
    process: ProcessSpec | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: list[ExportSpec] = Field(default_factory=list, max_length=4)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        if self.input.kind != "dataset" and self.process is None:
            raise ValueError(f"input kind {self.input.kind} needs a process stage")
        if self.train.method.startswith("splatfacto") and self.train.device != "cuda":
            raise ValueError(f"{self.train.method} needs CUDA (train.device: cuda)")
        return self


def _check_options(
    value: dict[str, Scalar], allowed: Mapping[str, type], where: str
) -> dict[str, Scalar]:
    for key, option in value.items():
        kind = allowed.get(key)
        if kind is None:
            raise ValueError(f"{where}: {key!r} is not an allowed option")
        if kind is float and isinstance(option, int) and not isinstance(option, bool):
            continue
        if not isinstance(option, kind) or (kind is int and isinstance(option, bool)):
            raise ValueError(f"{where}.{key} must be {kind.__name__}")
        if key in _CHOICES and option not in _CHOICES[key]:
            raise ValueError(f"{where}.{key} must be one of {sorted(_CHOICES[key])}")
        if isinstance(option, str) and not option.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}.{key} contains characters that are not allowed")
    return value


def parse_spec(workflow: Mapping[str, Any], injections: Iterable[Injection] = ()) -> PipelineSpec:
    """Apply ``target_path`` injections and validate; raises ``TaskFailure`` (invalid_workflow)."""
    data = copy.deepcopy(dict(workflow))
    for injection in injections:
        if injection.type == "file":
            continue  # a file parameter supplies the input; it has no place in the spec
        _inject(data, injection)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "spec"
        raise TaskFailure("invalid_workflow", f"nerfstudio spec {where}: {first['msg']}") from None


def _inject(data: dict[str, Any], injection: Injection) -> None:
    path = (injection.target_path or "").split(".")
    if not injection.target_path or not all(path):
        raise TaskFailure("invalid_workflow", f"parameter {injection.key}: no target_path")
    node: Any = data
    for part in path[:-1]:
        if not isinstance(node, dict):
            raise TaskFailure(
                "invalid_workflow",
                f"parameter {injection.key}: {injection.target_path} is not a path",
            )
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise TaskFailure(
            "invalid_workflow", f"parameter {injection.key}: {injection.target_path} is not a path"
        )
    node[path[-1]] = injection.value


def nerfstudio_schema() -> dict[str, Any]:
    """JSON Schema of the pipeline spec (for docs and clients)."""
    return PipelineSpec.model_json_schema()
