"""The Nerfstudio pipeline spec: validation, target_path injection, command lines."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.runtimes.base import Injection, TaskFailure
from agent.runtimes.nerfstudio.commands import (
    Layout,
    export_argv,
    parse_step,
    process_argv,
    train_argv,
)
from agent.runtimes.nerfstudio.spec import ExportSpec, nerfstudio_schema, parse_spec

SPEC: dict[str, Any] = {
    "input": {"param": "scene", "kind": "dataset"},
    "train": {"method": "nerfacto", "max_num_iterations": 5, "device": "cpu"},
    "export": [{"kind": "pointcloud", "num_points": 2000, "normal_method": "open3d"}],
}


def at(path: str, value: Any, key: str = "p") -> Injection:
    """An injection of ``value`` at the dotted ``path``."""
    return Injection(key=key, type="number", value=value, target_path=path)


def test_defaults_describe_a_3dgs_run() -> None:
    """An empty spec is a splatfacto run on CUDA from a dataset input."""
    spec = parse_spec({})
    assert (spec.input.kind, spec.train.method, spec.train.device) == (
        "dataset",
        "splatfacto",
        "cuda",
    )


def test_target_path_injection_sets_the_value() -> None:
    """train.max_num_iterations is injected by its dotted path."""
    spec = parse_spec(SPEC, [at("train.max_num_iterations", 7)])
    assert spec.train.max_num_iterations == 7


def test_unknown_path_or_wrong_type_is_refused() -> None:
    """An injection into a path the schema lacks, or of the wrong type, refuses the task."""
    with pytest.raises(TaskFailure, match=r"train\.bogus"):
        parse_spec(SPEC, [at("train.bogus", 1)])
    with pytest.raises(TaskFailure, match="max_num_iterations"):
        parse_spec(SPEC, [at("train.max_num_iterations", "many")])
    with pytest.raises(TaskFailure, match="not a path"):
        parse_spec(SPEC, [at("train.method.deeper", 1)])


def test_only_allowlisted_options_reach_the_command_line() -> None:
    """Free-form flags, odd characters and out-of-list choices are refused."""
    for options in (
        {"--data": "/etc"},
        {"pipeline.model.background-color": "$(reboot)"},
        {"pipeline.model.background-color": "purple"},
        {"pipeline.model.sh-degree": True},
    ):
        with pytest.raises(TaskFailure, match=r"train\.options"):
            parse_spec({**SPEC, "train": {**SPEC["train"], "options": options}})


def test_splatfacto_needs_cuda_and_photo_inputs_need_processing() -> None:
    """Combinations that cannot run are refused before any process starts."""
    with pytest.raises(TaskFailure, match="needs CUDA"):
        parse_spec({"train": {"method": "splatfacto", "device": "cpu"}})
    with pytest.raises(TaskFailure, match="needs a process stage"):
        parse_spec({"input": {"kind": "images"}})
    with pytest.raises(TaskFailure, match="takes no num_points"):
        parse_spec({"export": [{"kind": "gaussian-splat", "num_points": 5000}]})


def test_train_command_has_every_path_inside_the_workspace_and_no_viewer() -> None:
    """ns-train gets the workspace paths, tensorboard instead of the viewer, and sorted options."""
    spec = parse_spec({**SPEC, "train": {**SPEC["train"], "options": {"steps-per-save": 100}}})
    layout = Layout(Path("/w"))
    argv = train_argv(Path("/bin"), spec, layout)
    assert argv[:2] == ["/bin/ns-train", "nerfacto"]
    assert argv[argv.index("--vis") + 1] == "tensorboard"
    assert argv[argv.index("--viewer.quit-on-train-completion") + 1] == "True"
    assert argv[argv.index("--output-dir") + 1] == "/w/train"
    assert argv[argv.index("--steps-per-save") + 1] == "100"
    assert argv[-3:] == ["nerfstudio-data", "--data", "/w/data"]
    assert layout.config("nerfacto") == Path("/w/train/task/nerfacto/run/config.yml")


def test_export_and_process_commands() -> None:
    """ns-export and ns-process-data take only typed options."""
    export = ExportSpec(kind="pointcloud", num_points=2000, normal_method="open3d")
    argv = export_argv(Path("/bin"), export, Path("/w/c.yml"), Path("/w/e"))
    assert argv == [
        "/bin/ns-export", "pointcloud", "--load-config", "/w/c.yml", "--output-dir", "/w/e",
        "--num-points", "2000", "--normal-method", "open3d",
    ]  # fmt: skip
    spec = parse_spec({"input": {"kind": "video"}, "process": {"num_frames_target": 50}})
    assert spec.process is not None
    layout = Layout(Path("/w"))
    video = process_argv(Path("/bin"), spec.process, "video", Path("/w/in.mp4"), layout, gpu=False)
    assert video[:4] == ["/bin/ns-process-data", "video", "--data", "/w/in.mp4"]
    assert video[video.index("--num-frames-target") + 1] == "50"
    assert "--no-gpu" in video
    assert "--gpu" not in video
    images = process_argv(Path("/bin"), spec.process, "images", Path("/w/raw"), layout, gpu=True)
    assert "--gpu" in images
    assert "--num-frames-target" not in images


def test_the_schema_is_exported() -> None:
    """The JSON Schema names every stage."""
    schema = nerfstudio_schema()
    assert {"input", "process", "train", "export"} <= set(schema["properties"])


@given(
    st.dictionaries(
        st.text(max_size=12),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=8),
            lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=8), x, max_size=3),
            max_leaves=8,
        ),
        max_size=4,
    )
)
def test_arbitrary_specs_only_raise_task_failures(workflow: dict[str, Any]) -> None:
    """Whatever a workflow holds, parsing it is a spec or a TaskFailure, never a crash."""
    with contextlib.suppress(TaskFailure):
        parse_spec(workflow)


def test_progress_rows_of_a_real_ns_train_run_are_parsed() -> None:
    """Every table row of a recorded nerfacto run parses; the highest is the last step."""
    recorded = Path(__file__).parents[1] / "data" / "nerfstudio" / "ns-train-nerfacto.stdout.txt"
    steps = [
        step
        for line in recorded.read_text(encoding="utf-8").splitlines()
        if (step := parse_step(line)) is not None
    ]
    assert len(steps) > 10
    assert max(steps) == (119, 99.17)
    assert parse_step("\x1b[2K\x1b[1A  42 (35.00%)   1 s") == (42, 35.0)
    assert parse_step("Step (% Done)    Train Iter (time)") is None


def test_checked_in_schema_matches_the_spec_models() -> None:
    """docs/nerfstudio.schema.json equals what the spec models export."""
    import json  # noqa: PLC0415

    checked_in = (Path(__file__).parents[2] / "docs" / "nerfstudio.schema.json").read_text(
        encoding="utf-8"
    )
    assert checked_in == json.dumps(nerfstudio_schema(), indent=2, sort_keys=True) + "\n"
