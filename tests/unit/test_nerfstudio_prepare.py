"""NerfstudioRuntime.prepare: what it refuses before any ns-* process starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.runtimes.base import TaskFailure, TaskSpec
from agent.runtimes.nerfstudio.runtime import NerfstudioRuntime

PHOTOS = {
    "input": {"param": "scene", "kind": "images"},
    "process": {"matching_method": "exhaustive"},
    "train": {"method": "nerfacto", "max_num_iterations": 5, "device": "cpu"},
}


def task(workflow: dict[str, object], tmp_path: Path) -> TaskSpec:
    """A team Nerfstudio task whose ``scene`` input is a file in ``tmp_path``."""
    scene = tmp_path / "scene.zip"
    scene.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    return TaskSpec("t1", 0, "nerfstudio", "team", workflow, inputs={"scene": scene})


def fake_tools(folder: Path, *names: str) -> Path:
    """A PATH folder holding executables of these names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("present", "named"),
    [((), "colmap and ffmpeg"), (("ffmpeg",), "colmap"), (("colmap",), "ffmpeg")],
)
async def test_photos_without_colmap_or_ffmpeg_are_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, present: tuple[str, ...], named: str
) -> None:
    """A process stage on a host without COLMAP or ffmpeg fails runtime_unavailable, naming it."""
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", *present)))
    runtime = NerfstudioRuntime(tmp_path / "ns")
    with pytest.raises(TaskFailure) as refused:
        await runtime.prepare(task(PHOTOS, tmp_path), tmp_path)
    assert refused.value.code == "runtime_unavailable"
    assert refused.value.retryable  # another agent may have them
    assert f"ns-process-data needs {named} on this host's PATH" in str(refused.value)


@pytest.mark.asyncio
async def test_photos_pass_with_both_tools_and_a_dataset_needs_neither(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With colmap and ffmpeg on PATH photos are accepted; a dataset never looks for them."""
    runtime = NerfstudioRuntime(tmp_path / "ns")
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "both", "colmap", "ffmpeg")))
    await runtime.prepare(task(PHOTOS, tmp_path), tmp_path)
    monkeypatch.setenv("PATH", os.devnull)
    dataset = {**PHOTOS, "input": {"param": "scene", "kind": "dataset"}}
    del dataset["process"]
    await runtime.prepare(task(dataset, tmp_path), tmp_path)
