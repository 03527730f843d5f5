"""Community tasks leave nothing behind in ComfyUI, and hostile names cannot widen the purge.

The ComfyUI runtime is driven directly against the REAL ComfyUI of the ``comfyui`` fixture
(attached, with its base directory known, as ``runtimes.comfyui.directory`` says); the path
rules of :mod:`agent.runtimes.comfyui.cleanup` are checked on their own on a scratch tree.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from agent.runtimes.base import (
    Injection,
    Output,
    Progress,
    Purging,
    Stream,
    TaskSpec,
)
from agent.runtimes.comfyui.cleanup import (
    ComfyDirectories,
    directories_from_argv,
    remove_prompt_files,
    resolve_inside,
)
from agent.runtimes.comfyui.runtime import ComfyUIRuntime
from agent.runtimes.comfyui.supervisor import ComfyProcess
from agent.runtimes.comfyui.workflow import OutputRef, prompt_id_for
from agent.runtimes.nerfstudio.runtime import NerfstudioRuntime
from agent.runtimes.registry import load_runtimes
from agent.settings import load_settings
from tests.comfyui import COMFYUI_TEST_TIMEOUT_S, ComfyUIServer

pytest_plugins = ["tests.comfyui"]

PRIVATE_NAME = "alice-passport-scan"
IMAGE = Injection(key="image", type="file", value=None, node_id="1", field="image")


class Events:
    """Collects what the runtime reports."""

    def __init__(self) -> None:
        """Nothing yet."""
        self.outputs: list[Output] = []
        self.handles: list[dict[str, Any]] = []

    def progress(self, progress: Progress) -> None:
        """Ignored."""

    def log(self, stream: Stream, line: str) -> None:
        """Ignored."""

    def output(self, output: Output) -> None:
        """Keep it."""
        self.outputs.append(output)

    def handle(self, data: Mapping[str, Any]) -> None:
        """Keep it."""
        self.handles.append(dict(data))


def _png(width: int, height: int) -> bytes:
    """A tiny valid PNG, written by hand (Pillow is not a dependency of the agent)."""
    raw = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    out = io.BytesIO()
    out.write(b"\x89PNG\r\n\x1a\n")
    out.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
    out.write(chunk(b"IDAT", zlib.compress(raw)))
    out.write(chunk(b"IEND", b""))
    return out.getvalue()


def _graph(folder: str, prefix: str) -> dict[str, Any]:
    """LoadImage of the uploaded input → SaveImage (in a subfolder), EmptyImage → Preview."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": f"{folder}/{prefix}"},
        },
        "10": {
            "class_type": "SaveImage",
            "inputs": {"images": ["3", 0], "filename_prefix": prefix},
        },
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def _spec(tmp_path: Path, pool: str, folder: str, prefix: str) -> TaskSpec:
    """A task of ``pool`` whose file input is a fresh PNG named after the task."""
    task_id = f"{pool}-{uuid.uuid4().hex[:12]}"
    source = tmp_path / task_id / "inputs" / f"{PRIVATE_NAME}.png"
    source.parent.mkdir(parents=True)
    source.write_bytes(_png(12, 10))
    return TaskSpec(
        task_id=task_id,
        attempt=0,
        tool="comfyui",
        pool=pool,
        workflow=_graph(folder, prefix),
        injections=(IMAGE,),
        inputs={"image": source},
    )


def _files(base: Path) -> set[Path]:
    """Every file (and symlink) under ``base``'s input/, output/ and temp/."""
    found: set[Path] = set()
    for name in ("input", "output", "temp"):
        for root, _, files in os.walk(base / name):
            found.update(Path(root) / file for file in files)
    return found


async def _run(runtime: ComfyUIRuntime, spec: TaskSpec, tmp_path: Path) -> list[Output]:
    """Prepare and run ``spec`` to its end (guarded)."""
    workspace = tmp_path / spec.task_id
    async with asyncio.timeout(60):
        await runtime.prepare(spec, workspace)
        return await runtime.run(spec, workspace, Events())


def _history(server: ComfyUIServer, spec: TaskSpec) -> dict[str, Any]:
    """``GET /history/<prompt id>`` of the task."""
    prompt_id = prompt_id_for(spec.task_id, spec.attempt)
    found: dict[str, Any] = httpx.get(f"{server.url}/history/{prompt_id}", timeout=10).json()
    return found


def _hostile_outputs(base: Path, sentinel: Path, bystander: str) -> dict[str, Any]:
    """History outputs that name ``sentinel`` (outside) in every way, and an input file."""
    escape = os.path.relpath(sentinel, base / "output")
    return {
        "9": {
            "images": [
                {"filename": escape, "subfolder": "", "type": "output"},
                {
                    "filename": "passwd",
                    "subfolder": os.path.relpath(sentinel.parent, base / "temp"),
                    "type": "temp",
                },
                {"filename": str(sentinel), "subfolder": "", "type": "output"},
                {"filename": "passwd", "subfolder": str(sentinel.parent), "type": "output"},
                {"filename": bystander, "subfolder": "", "type": "input"},
                {"filename": "", "subfolder": "..", "type": "output"},
            ]
        }
    }


# ---------------------------------------------------------------------- with a real ComfyUI


@pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)
@pytest.mark.asyncio
async def test_a_purged_community_task_leaves_nothing_in_comfyui(
    comfyui: ComfyUIServer, tmp_path: Path
) -> None:
    """Purge removes a community task's input, outputs, temp files and history; a team's stay."""
    base = comfyui.base_directory
    folder = f"purge-{uuid.uuid4().hex[:8]}"
    runtime = ComfyUIRuntime.attach(comfyui.url, directory=base)
    assert isinstance(runtime, Purging)
    community = _spec(tmp_path, "community", folder, "community")
    team = _spec(tmp_path, "team", folder, "team")
    try:
        before = _files(base)
        outputs = await _run(runtime, community, tmp_path)
        assert {o.key for o in outputs} == {"9.images.0", "10.images.0"}
        theirs = _files(base) - before
        kinds = {path.relative_to(base).parts[0] for path in theirs}
        assert kinds == {"input", "output", "temp"}  # the test covers all three directories
        assert any(p.name.startswith(prompt_id_for(community.task_id, 0)[:8]) for p in theirs)
        await _run(runtime, team, tmp_path)
        teams = _files(base) - before - theirs
        assert teams

        with capture_logs() as logs:
            async with asyncio.timeout(30):
                await runtime.purge(community)

        assert _files(base) == before | teams  # every community file gone, every team file kept
        assert _history(comfyui, community) == {}
        assert _history(comfyui, team) != {}
        (purged,) = [entry for entry in logs if entry["event"] == "ComfyUI prompt purged"]
        assert (purged["inputs"], purged["outputs"], purged["temp"]) == (1, 2, 1)
        assert purged["refused"] == 0
        assert purged["history_deleted"] == 1
        assert PRIVATE_NAME not in repr(logs)
        assert folder not in repr(logs)
    finally:
        await runtime.close()


@pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)
@pytest.mark.asyncio
async def test_a_restarted_agent_purges_what_it_no_longer_remembers(
    comfyui: ComfyUIServer, tmp_path: Path
) -> None:
    """A fresh runtime finds the uploads by prompt-id prefix and the outputs by /history."""
    base = comfyui.base_directory
    folder = f"restart-{uuid.uuid4().hex[:8]}"
    community = _spec(tmp_path, "community", folder, "forgotten")
    first = ComfyUIRuntime.attach(comfyui.url, directory=base)
    try:
        before = _files(base)
        await _run(first, community, tmp_path)
        assert _files(base) - before
    finally:
        await first.close()
    second = ComfyUIRuntime.attach(comfyui.url, directory=base)  # the agent after a restart
    try:
        bare = TaskSpec(community.task_id, 0, "comfyui", "community", community.workflow)
        async with asyncio.timeout(30):
            await second.purge(bare)
    finally:
        await second.close()
    assert _files(base) == before
    assert _history(comfyui, community) == {}
    assert not (base / "output" / folder).exists()  # the emptied subfolder went too


@pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)
@pytest.mark.asyncio
async def test_without_a_directory_purge_only_forgets_the_history(
    comfyui: ComfyUIServer, tmp_path: Path
) -> None:
    """Attached with no directory (a team-only agent): the history goes, no file is touched."""
    base = comfyui.base_directory
    runtime = ComfyUIRuntime.attach(comfyui.url)
    community = _spec(tmp_path, "community", f"nodir-{uuid.uuid4().hex[:8]}", "nodir")
    try:
        before = _files(base)
        await _run(runtime, community, tmp_path)
        after = _files(base)
        async with asyncio.timeout(30):
            await runtime.purge(community)
        assert _files(base) == after
        assert _history(comfyui, community) == {}
    finally:
        await runtime.close()
        for path in after - before:  # tidy the shared server's directories
            path.unlink()


@pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)
@pytest.mark.asyncio
async def test_a_hostile_history_cannot_delete_outside_comfyuis_directories(
    comfyui: ComfyUIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """History items naming ../ paths, absolute paths or other inputs are refused or ignored."""
    base = comfyui.base_directory
    sentinel = tmp_path / "etc" / "passwd"
    sentinel.parent.mkdir()
    sentinel.write_text("root:x:0:0")
    bystander = base / "input" / f"team-{uuid.uuid4().hex[:8]}.png"
    bystander.write_bytes(_png(2, 2))
    hostile = _hostile_outputs(base, sentinel, bystander.name)

    async def history(prompt_id: str) -> dict[str, Any]:
        del prompt_id
        return {"outputs": hostile, "status": {"completed": True}}

    runtime = ComfyUIRuntime.attach(comfyui.url, directory=base)
    monkeypatch.setattr(runtime.pool.servers[0].client, "history", history)
    spec = TaskSpec(f"hostile-{uuid.uuid4().hex[:8]}", 0, "comfyui", "community", {})
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(30):
                await runtime.purge(spec)
    finally:
        await runtime.close()
    assert sentinel.read_text() == "root:x:0:0"
    assert bystander.exists()  # history may not name inputs to delete
    (purged,) = [entry for entry in logs if entry["event"] == "ComfyUI prompt purged"]
    assert purged["refused"] == 5
    assert purged["outputs"] == purged["temp"] == purged["inputs"] == 0
    bystander.unlink()


# ---------------------------------------------------------------------- path rules


def test_resolve_inside_keeps_names_under_their_root(tmp_path: Path) -> None:
    """Plain names and subfolders resolve under the root; .., absolute paths and NUL do not."""
    root = tmp_path / "output"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    real = Path(os.path.realpath(root))
    assert resolve_inside(root, "", "a.png") == real / "a.png"
    assert resolve_inside(root, "sub", "a.png") == real / "sub" / "a.png"
    assert resolve_inside(root, "sub/../sub", "a.png") == real / "sub" / "a.png"
    refused = [
        ("", "../../etc/passwd"),
        ("..", "passwd"),
        ("sub/../..", "passwd"),
        ("/etc", "passwd"),
        ("", "/etc/passwd"),
        ("", ".."),
        ("", "."),
        ("", ""),
        ("sub", "a\x00.png"),
        ("escape", "passwd"),  # a symlinked folder leading out
        ("sub", "../../x"),
    ]
    for subfolder, filename in refused:
        assert resolve_inside(root, subfolder, filename) is None, (subfolder, filename)


def test_removing_files_never_follows_names_out_or_into_directories(tmp_path: Path) -> None:
    """Only files inside output/temp go; a symlink is unlinked (its target stays); dirs stay."""
    dirs = ComfyDirectories.under(tmp_path / "comfy")
    for folder in (dirs.input, dirs.output / "deep" / "er", dirs.temp):
        folder.mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("keep")
    (dirs.output / "link.png").symlink_to(secret)
    (dirs.output / "deep" / "er" / "a.png").write_bytes(b"a")
    (dirs.output / "folder.png").mkdir()
    (dirs.temp / "t.png").write_bytes(b"t")
    (dirs.input / "abcd1234-in.png").write_bytes(b"i")
    (dirs.input / "abcd1234-other.png").write_bytes(b"o")
    (dirs.input / "other-team.png").write_bytes(b"x")
    refs = [
        OutputRef("9.images.0", "link.png", "", "output"),
        OutputRef("9.images.1", "a.png", "deep/er", "output"),
        OutputRef("9.images.2", "folder.png", "", "output"),
        OutputRef("9.images.3", "../../secret.txt", "", "output"),
        OutputRef("9.images.4", "t.png", "", "temp"),
        OutputRef("9.images.5", "other-team.png", "", "input"),
        OutputRef("9.images.6", "gone.png", "", "output"),
    ]
    removed = remove_prompt_files(dirs, ["abcd1234-in.png", "../secret.txt"], refs, "abcd1234-")
    assert secret.read_text() == "keep"
    assert not (dirs.output / "link.png").is_symlink()
    assert not (dirs.output / "deep").exists()  # emptied folders go, up to the root
    assert dirs.output.is_dir()
    assert (dirs.output / "folder.png").is_dir()
    assert sorted(p.name for p in dirs.input.iterdir()) == ["other-team.png"]
    assert list(dirs.temp.iterdir()) == []
    assert (removed.inputs, removed.outputs, removed.temp) == (2, 2, 1)
    assert removed.refused == 3  # ../secret.txt, folder.png, ../../secret.txt


def test_directories_follow_comfyuis_arguments(tmp_path: Path) -> None:
    """Base, input, output and temp come from main.py's flags as ComfyUI reads them."""
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    real = Path(os.path.realpath(comfy))
    assert directories_from_argv([], comfy) == ComfyDirectories.under(real)
    base = tmp_path / "base"
    assert directories_from_argv(["--base-directory", str(base)], comfy) == (
        ComfyDirectories.under(base)
    )
    found = directories_from_argv(
        [
            "--base-directory=/old",
            "--base-directory",
            str(base),
            "--output-directory",
            "out",
            "--input-directory=/srv/in",
            "--temp-directory",
            "/scratch",
        ],
        comfy,
    )
    assert found == ComfyDirectories(
        input=Path("/srv/in"), output=comfy / "out", temp=Path("/scratch/temp")
    )


@pytest.mark.asyncio
async def test_launched_servers_purge_in_their_own_directories(tmp_path: Path) -> None:
    """One ComfyUI per GPU: input/ is shared, each has its own output/gpuN and temp."""
    environ = {
        "HOME": str(tmp_path),
        "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON": str(tmp_path / "python"),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN": str(tmp_path / "ComfyUI" / "main.py"),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__BASE_DIRECTORY": str(tmp_path / "base"),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__GPUS": "0,1",
    }
    runtime = load_runtimes(load_settings(environ=environ).settings)["comfyui"]
    assert isinstance(runtime, ComfyUIRuntime)
    base = tmp_path / "base"
    assert [server.directories for server in runtime.pool.servers] == [
        ComfyDirectories(
            base / "input", base / "output" / f"gpu{n}", base / "temp" / f"gpu{n}" / "temp"
        )
        for n in (0, 1)
    ]
    await runtime.close()


def test_a_launched_comfyuis_output_is_withheld_during_community_prompts(tmp_path: Path) -> None:
    """ComfyUI's lines stay out of the agent's log from withhold() to forward()."""
    process = ComfyProcess(tmp_path / "python", tmp_path / "main.py", port=1)
    with capture_logs() as logs:
        process._line("stdout", "got prompt")
        process.withhold("p1")
        process._line("stderr", f"Invalid image file: {PRIVATE_NAME}.png")
        process.forward("p1")
        process._line("stdout", "Prompt executed in 0.01 seconds")
    assert list(process.tail) == ["got prompt", "Prompt executed in 0.01 seconds"]
    assert PRIVATE_NAME not in repr(logs)


@pytest.mark.asyncio
async def test_nerfstudio_purge_is_a_no_op(tmp_path: Path) -> None:
    """Nerfstudio works inside the workspace only: its purge removes nothing and never fails."""
    runtime = NerfstudioRuntime(tmp_path)
    assert isinstance(runtime, Purging)
    await runtime.purge(TaskSpec("t1", 0, "nerfstudio", "community", {}))
