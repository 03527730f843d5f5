"""Command lines for each Nerfstudio stage, built only from a validated spec (pure).

Every path is inside the task workspace and supplied here, never by the task. The viewer
is never started (``--vis tensorboard``; ``--viewer.quit-on-train-completion True``), so no
port is ever bound, let alone on 0.0.0.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.runtimes.nerfstudio.spec import ExportSpec, PipelineSpec, ProcessSpec, Scalar

EXPERIMENT = "task"
TIMESTAMP = "run"
_STEP = re.compile(r"^\s*(\d+)\s+\((\d+(?:\.\d+)?)%\)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes, under one workspace."""

    workspace: Path

    @property
    def data(self) -> Path:
        """The nerfstudio dataset (extracted or processed)."""
        return self.workspace / "data"

    @property
    def raw(self) -> Path:
        """Photos or video before processing."""
        return self.workspace / "raw"

    @property
    def train_root(self) -> Path:
        """``--output-dir`` of ns-train."""
        return self.workspace / "train"

    def config(self, method: str) -> Path:
        """The trained model's config.yml."""
        return self.train_root / EXPERIMENT / method / TIMESTAMP / "config.yml"

    def export_dir(self, index: int, kind: str) -> Path:
        """Output directory of one export."""
        return self.workspace / "export" / f"{index}-{kind}"


def _flag(name: str, value: Scalar) -> list[str]:
    text = ("True" if value else "False") if isinstance(value, bool) else str(value)
    return [f"--{name}", text]


def process_argv(
    bin_dir: Path, spec: ProcessSpec, kind: str, source: Path, layout: Layout, *, gpu: bool
) -> list[str]:
    """``ns-process-data images|video`` (``gpu``: COLMAP's SIFT on the GPU)."""
    argv = [
        str(bin_dir / "ns-process-data"),
        kind,
        "--data",
        str(source),
        "--output-dir",
        str(layout.data),
    ]
    argv += _flag("matching-method", spec.matching_method)
    argv += _flag("camera-type", spec.camera_type)
    argv += _flag("num-downscales", spec.num_downscales)
    argv.append("--gpu" if gpu else "--no-gpu")  # a tyro flag pair: no value
    if kind == "video":
        argv += _flag("num-frames-target", spec.num_frames_target)
    return argv


def train_argv(bin_dir: Path, spec: PipelineSpec, layout: Layout) -> list[str]:
    """``ns-train METHOD … nerfstudio-data --data DATA``."""
    train = spec.train
    argv = [str(bin_dir / "ns-train"), train.method]
    argv += _flag("machine.device-type", train.device)
    argv += _flag("max-num-iterations", train.max_num_iterations)
    argv += ["--vis", "tensorboard", "--viewer.quit-on-train-completion", "True"]
    argv += [
        "--output-dir",
        str(layout.train_root),
        "--experiment-name",
        EXPERIMENT,
        "--timestamp",
        TIMESTAMP,
    ]
    for name, value in sorted(train.options.items()):
        argv += _flag(name, value)
    argv += ["nerfstudio-data", "--data", str(layout.data)]
    for name, value in sorted(train.dataparser.items()):
        argv += _flag(name, value)
    return argv


def export_argv(bin_dir: Path, export: ExportSpec, config: Path, out: Path) -> list[str]:
    """``ns-export KIND --load-config CONFIG --output-dir OUT …``."""
    argv = [
        str(bin_dir / "ns-export"),
        export.kind,
        "--load-config",
        str(config),
        "--output-dir",
        str(out),
    ]
    if export.num_points is not None:
        argv += _flag("num-points", export.num_points)
    if export.normal_method is not None:
        argv += _flag("normal-method", export.normal_method)
    if export.remove_outliers is not None:
        argv += _flag("remove-outliers", export.remove_outliers)
    return argv


def parse_step(line: str) -> tuple[int, float] | None:
    """(step, percent done) from a row of ns-train's progress table, else ``None``.

    The table is redrawn with ANSI cursor codes even into a pipe, so older rows repeat:
    callers keep the highest step.
    """
    match = _STEP.match(_ANSI.sub("", line))
    if match is None:
        return None
    return int(match.group(1)), float(match.group(2))
