"""The Nerfstudio runtime: a task's pipeline spec run as ``ns-*`` subprocesses.

Stages (each a process group in the task workspace, output streamed to the task's log):

1. input — the ``file`` parameter named by ``input.param``: a dataset zip is extracted
   (zip-slip and bomb safe) into ``data/``; photos or a video go to ``raw/``;
2. ``ns-process-data`` — for photo/video inputs: COLMAP and ffmpeg from the host's PATH
   (checked before anything runs), SIFT on the CPU unless ``runtimes.nerfstudio.colmap_gpu``;
   it must leave ``data/transforms.json`` (it exits 0 on some failures);
3. ``ns-train`` — progress parsed from its table (step / total) into 10-90 %;
4. ``ns-export`` — each requested export; its files are uploaded as soon as it ends.

Outputs: ``train.config.0`` (config.yml), ``export.<kind>.<n>`` files, and, when
``runtimes.nerfstudio.keep_checkpoint`` is set, ``train.checkpoint.0``. Exit status 2 is
"bad arguments", anything else non-zero a stage failure, both with the last log lines.
Cancel: SIGINT to the stage's group → grace → SIGTERM → grace → SIGKILL; nothing survives.
Purge (community tasks) has nothing to do beyond the workspace the runner deletes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.archive import ArchiveError, extract_zip
from agent.runtimes.base import (
    Output,
    Progress,
    RuntimeEvents,
    TaskFailure,
    TaskInterrupted,
    TaskSpec,
)
from agent.runtimes.nerfstudio.commands import (
    Layout,
    export_argv,
    parse_step,
    process_argv,
    train_argv,
)
from agent.runtimes.nerfstudio.spec import PipelineSpec, parse_spec
from agent.runtimes.process import GroupIdentity, ManagedProcess, Stream, kill_orphan_group

log = structlog.get_logger("agent.nerfstudio")
TAIL_LINES = 20
PROBE_TIMEOUT_S = 120.0
PROCESS_TOOLS = ("colmap", "ffmpeg")
"""What ``ns-process-data`` runs (``images`` and ``video`` alike: ffmpeg copies and scales)."""
EXPORT_FILES = (".ply", ".json", ".obj", ".mtl", ".png")


class NerfstudioRuntime:
    """See the module docstring."""

    tool = "nerfstudio"

    def __init__(
        self,
        bin_dir: Path,
        *,
        keep_checkpoint: bool = False,
        torch_home: Path | None = None,
        colmap_gpu: bool = False,
        interrupt_grace: float = 15.0,
        term_grace: float = 10.0,
    ) -> None:
        """Use the ``ns-*`` commands (and their Python) in ``bin_dir``."""
        self.bin_dir = bin_dir
        self.keep_checkpoint = keep_checkpoint
        self.torch_home = torch_home
        self.colmap_gpu = colmap_gpu
        self.interrupt_grace = interrupt_grace
        self.term_grace = term_grace
        self.version: str | None = None
        self._healthy = False
        self._specs: dict[str, PipelineSpec] = {}
        self._current: dict[str, tuple[ManagedProcess, dict[str, bool]]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Probe ``ns-train --help`` and read the installed version."""
        code, _ = await self._capture([str(self.bin_dir / "ns-train"), "--help"])
        self._healthy = code == 0
        if not self._healthy:
            log.warning(
                "ns-train --help failed: the nerfstudio runtime is not offered", exit_code=code
            )
            return
        script = "import importlib.metadata as m; print(m.version('nerfstudio'))"
        code, out = await self._capture([str(self.bin_dir / "python"), "-c", script])
        self.version = out.strip().splitlines()[-1] if code == 0 and out.strip() else None

    async def healthy(self) -> bool:
        """The CLI answered at start."""
        return self._healthy

    async def close(self) -> None:
        """Nothing held between tasks."""

    def environment(self) -> dict[str, str]:
        """The children's environment: the agent's, made offline and headless."""
        env = dict(os.environ)
        env.update(
            TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
            HF_HUB_OFFLINE="1",
            WANDB_MODE="disabled",
            MPLBACKEND="Agg",
            PYTHONUNBUFFERED="1",
            QT_QPA_PLATFORM="offscreen",  # COLMAP links Qt: never look for a display
        )
        if self.torch_home is not None:
            env["TORCH_HOME"] = str(self.torch_home)
        return env

    # ------------------------------------------------------------------ tasks

    async def prepare(self, spec: TaskSpec, workspace: Path) -> None:
        """Validate the spec (injections included) and check its input exists."""
        del workspace
        pipeline = parse_spec(spec.workflow, spec.injections)
        if pipeline.input.param not in spec.inputs:
            raise TaskFailure(
                "invalid_workflow", f"input parameter {pipeline.input.param!r} was not supplied"
            )
        if pipeline.process is not None:
            path = self.environment().get("PATH")
            missing = [tool for tool in PROCESS_TOOLS if shutil.which(tool, path=path) is None]
            if missing:
                raise TaskFailure(
                    "runtime_unavailable",
                    f"ns-process-data needs {' and '.join(missing)} on this host's PATH "
                    "(Debian: apt-get install colmap ffmpeg)",
                    retryable=True,  # another agent may have them
                )
        self._specs[_key(spec)] = pipeline

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Run every stage; return the outputs."""
        if _key(spec) not in self._specs:
            await self.prepare(spec, workspace)
        pipeline = self._specs.pop(_key(spec))
        layout = Layout(workspace)
        outputs: list[Output] = []
        data = await self._stage_input(
            pipeline, spec.inputs[pipeline.input.param], layout, spec, events
        )
        await self._train(spec, pipeline, layout, data, events)
        config = layout.config(pipeline.train.method)
        if not config.is_file():
            raise TaskFailure("stage_failed", "ns-train finished without writing config.yml")
        outputs.append(_announce(events, Output("train.config.0", config, "application/yaml")))
        outputs += await self._exports(spec, pipeline, layout, config, events)
        if self.keep_checkpoint:
            outputs += [_announce(events, o) for o in _checkpoint(layout, pipeline.train.method)]
        return outputs

    async def interrupt(self, spec: TaskSpec) -> None:
        """Stop the running stage's process group (SIGINT → SIGTERM → SIGKILL)."""
        current = self._current.get(_key(spec))
        if current is not None:
            process, flags = current
            flags["interrupted"] = True
            await process.stop(interrupt_grace=self.interrupt_grace, term_grace=self.term_grace)

    async def resume(
        self, spec: TaskSpec, workspace: Path, handle: Mapping[str, Any], events: RuntimeEvents
    ) -> list[Output] | None:
        """Training cannot be re-attached: kill what a crashed agent left, report a restart."""
        del workspace, events
        if "pgid" in handle and "start_time" in handle:
            identity = GroupIdentity(int(handle["pgid"]), int(handle["start_time"]))
            await asyncio.to_thread(kill_orphan_group, identity, term_grace=self.term_grace)
        log.info("a nerfstudio stage cannot be re-attached", task_id=spec.task_id)
        return None

    async def purge(self, spec: TaskSpec) -> None:
        """Nothing to remove: every stage works inside the workspace, which the runner deletes.

        (``TORCH_HOME`` holds shared pretrained weights, not task data.)
        """
        self._current.pop(_key(spec), None)

    # ------------------------------------------------------------------ stages

    async def _stage_input(
        self,
        pipeline: PipelineSpec,
        source: Path,
        layout: Layout,
        spec: TaskSpec,
        events: RuntimeEvents,
    ) -> Path:
        """The dataset directory, extracted (dataset) or processed (images/video)."""
        kind = pipeline.input.kind
        target = layout.data if kind == "dataset" else layout.raw
        if kind in {"dataset", "images"}:
            await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
            try:
                await asyncio.to_thread(extract_zip, source, target)
            except ArchiveError as exc:
                raise TaskFailure("input_invalid", f"input {pipeline.input.param}: {exc}") from exc
        if kind == "dataset":
            return _dataset_root(layout.data)
        assert pipeline.process is not None  # noqa: S101 - the spec guarantees it
        media = target if kind == "images" else source
        argv = process_argv(
            self.bin_dir, pipeline.process, kind, media, layout, gpu=self.colmap_gpu
        )
        last = await self._stage(
            spec, "ns-process-data", argv, layout.workspace, events, span=(0.0, 0.1)
        )
        if not (layout.data / "transforms.json").is_file():  # it exits 0 on some failures
            raise TaskFailure(
                "stage_failed",
                f"ns-process-data wrote no transforms.json (COLMAP found no poses?):\n{last}",
            )
        return layout.data

    async def _train(
        self,
        spec: TaskSpec,
        pipeline: PipelineSpec,
        layout: Layout,
        data: Path,
        events: RuntimeEvents,
    ) -> None:
        argv = train_argv(self.bin_dir, pipeline, layout)
        argv[argv.index("--data") + 1] = str(data)
        total = pipeline.train.max_num_iterations
        await self._stage(
            spec, "ns-train", argv, layout.workspace, events, span=(0.1, 0.9), total=total
        )

    async def _exports(
        self,
        spec: TaskSpec,
        pipeline: PipelineSpec,
        layout: Layout,
        config: Path,
        events: RuntimeEvents,
    ) -> list[Output]:
        outputs: list[Output] = []
        count = len(pipeline.export)
        for index, export in enumerate(pipeline.export):
            out = layout.export_dir(index, export.kind)
            span = (0.9 + 0.1 * index / count, 0.9 + 0.1 * (index + 1) / count)
            await self._stage(
                spec,
                "ns-export",
                export_argv(self.bin_dir, export, config, out),
                layout.workspace,
                events,
                span=span,
            )
            files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in EXPORT_FILES)
            for number, path in enumerate(files):
                key = (
                    f"export.{export.kind}.{number}"
                    if index == 0
                    else f"export{index}.{export.kind}.{number}"
                )
                outputs.append(_announce(events, Output(key, path, _content_type(path))))
        return outputs

    async def _stage(
        self,
        spec: TaskSpec,
        name: str,
        argv: Sequence[str],
        cwd: Path,
        events: RuntimeEvents,
        *,
        span: tuple[float, float],
        total: int | None = None,
    ) -> str:
        """Run one stage; return its last lines, or raise TaskFailure / TaskInterrupted."""
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        low, high = span
        best = [-1]  # the table redraws older rows: report only new highs

        def on_line(stream: Stream, line: str) -> None:
            tail.append(line)
            events.log(stream, line)
            step = parse_step(line)
            if step is not None and step[0] > best[0]:
                best[0] = step[0]
                fraction = step[1] / 100
                events.progress(Progress(low + (high - low) * fraction, name, step[0], total))

        flags = {"interrupted": False}
        events.progress(Progress(low, name))
        async with await ManagedProcess.start(
            argv, cwd=cwd, env=self.environment(), on_line=on_line
        ) as process:
            identity = process.identity
            events.handle({"stage": name, "pgid": identity.pgid, "start_time": identity.start_time})
            self._current[_key(spec)] = (process, flags)
            try:
                code = await process.wait()
            finally:
                self._current.pop(_key(spec), None)
        if flags["interrupted"]:
            raise TaskInterrupted
        last = "\n".join(tail)
        if code == 2:
            raise TaskFailure("invalid_arguments", f"{name} refused its arguments:\n{last}")
        if code != 0:
            raise TaskFailure("stage_failed", f"{name} exited with {code}:\n{last}")
        return last

    async def _capture(self, argv: list[str]) -> tuple[int, str]:
        """Run a short command, collecting stdout (for probes)."""
        lines: list[str] = []
        try:
            process = await ManagedProcess.start(
                argv,
                cwd=Path.cwd(),
                env=self.environment(),
                on_line=lambda stream, line: lines.append(line) if stream == "stdout" else None,
            )
        except Exception as exc:  # noqa: BLE001 - a missing CLI is an unhealthy runtime, not a crash
            log.warning("cannot run a nerfstudio probe", argv=argv[0], error=str(exc))
            return 127, ""
        async with process:
            try:
                code = await asyncio.wait_for(process.wait(), PROBE_TIMEOUT_S)
            except TimeoutError:
                return 124, ""
        return code, "\n".join(lines)


def _key(spec: TaskSpec) -> str:
    return f"{spec.task_id}/{spec.attempt}"


def _announce(events: RuntimeEvents, output: Output) -> Output:
    events.output(output)
    return output


def _dataset_root(data: Path) -> Path:
    """The directory holding ``transforms.json`` (the zip's root, or its only folder)."""
    if (data / "transforms.json").is_file():
        return data
    found = [p.parent for p in data.glob("*/transforms.json")]
    if len(found) == 1:
        return found[0]
    raise TaskFailure(
        "input_invalid", "the dataset has no transforms.json at its root or in one folder"
    )


def _checkpoint(layout: Layout, method: str) -> list[Output]:
    models = layout.config(method).parent / "nerfstudio_models"
    checkpoints = sorted(models.glob("*.ckpt"))
    return (
        [Output("train.checkpoint.0", checkpoints[-1], "application/octet-stream")]
        if checkpoints
        else []
    )


def _content_type(path: Path) -> str:
    return {".ply": "application/ply", ".json": "application/json", ".png": "image/png"}.get(
        path.suffix, "application/octet-stream"
    )
