# mypy: ignore-errors
r"""Record a splatfacto run for tests: for real on a CUDA host, reconstructed without one.

Run it with the Python of the Nerfstudio venv that ``scripts/install-nerfstudio`` made, in the
environment ``tests.nerfstudio`` gives the ``ns-*`` commands (TORCH_HOME and the offline flags;
see README.md in this folder)::

    eval "$(scripts/install-nerfstudio | tail -n 1)"
    TORCH_HOME=$TORCH_HOME TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 HF_HUB_OFFLINE=1 \\
        "$NERFSTUDIO_BIN/python" tests/data/splatfacto/make_recording.py

It writes, into this folder (``--out``): ``ns-train-splatfacto.stdout.txt``, ``config.yml``,
``dataparser_transforms.json``, ``splat.ply`` and ``provenance.txt`` (which mode made them).

Both modes first run the real command, on the scene of ``tests.nerfstudio_scene`` (12 views,
32x32, 256 seed points) in ``--workspace``::

    ns-train splatfacto --max-num-iterations 120 --vis tensorboard --output-dir W/train
        --experiment-name task --timestamp run --viewer.quit-on-train-completion True
        nerfstudio-data --data W/data

- On a CUDA host it succeeds: its stdout, config.yml and dataparser_transforms.json are kept
  as they are, and ``ns-export gaussian-splat --load-config … --output-dir W/export`` makes the
  real splat.ply. Nothing is reconstructed.
- Without CUDA it dies while building the model ("Torch not compiled with CUDA enabled"), after
  printing the Config dump and its first log lines and after writing config.yml. Those are
  kept, real, and the rest of the stdout is then produced in this process by Nerfstudio's own
  code, driven the way ``Trainer.train()`` drives it (engine/trainer.py of 1.1.5): the
  pipeline, data manager and model are built on the CPU (only ``Tensor.cuda()`` is redirected,
  while the model is built), the real ``Optimizers`` step their schedulers, the real
  ``FullImageDatamanager`` caches the train and eval images (its log lines), and the real
  ``writer`` module (LocalWriter: the progress table) and profiler print, under a synthetic
  clock. No gradient step is taken: the DURATIONS in the table and the profile are invented
  (``_duration``), and splat.ply holds splatfacto's INITIAL Gaussians (one per seed point),
  written by the real ``ExportGaussianSplat.main()`` from that untrained model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from nerfstudio.scripts import exporter
from nerfstudio.utils import profiler, writer
from nerfstudio.utils.misc import step_check
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.utils.writer import EventName, TimeWriter
from rich import box, style
from rich.panel import Panel
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from tests.nerfstudio_scene import make_scene  # noqa: E402 -- the repository, found just above

ITERATIONS = 120
EXPERIMENT = "task"
TIMESTAMP = "run"
NO_CUDA = "Torch not compiled with CUDA enabled"


def main() -> int:
    """Record into ``--out``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_workspace = Path(tempfile.gettempdir()) / "cyberun-splatfacto"
    parser.add_argument("--workspace", type=Path, default=default_workspace)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    workspace: Path = args.workspace.resolve()
    shutil.rmtree(workspace, ignore_errors=True)
    data = make_scene(workspace / "data")
    bin_dir = Path(sys.executable).parent
    run_dir = workspace / "train" / EXPERIMENT / "splatfacto" / TIMESTAMP
    train = subprocess.run(
        [
            str(bin_dir / "ns-train"),
            "splatfacto",
            "--max-num-iterations",
            str(ITERATIONS),
            "--vis",
            "tensorboard",
            "--output-dir",
            str(workspace / "train"),
            "--experiment-name",
            EXPERIMENT,
            "--timestamp",
            TIMESTAMP,
            "--viewer.quit-on-train-completion",
            "True",
            "nerfstudio-data",
            "--data",
            str(data),
        ],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
    )
    splat = workspace / "export" / "splat.ply"
    if train.returncode == 0:
        mode = "real: ns-train and ns-export gaussian-splat ran on a CUDA host"
        stdout = train.stdout
        subprocess.run(
            [
                str(bin_dir / "ns-export"),
                "gaussian-splat",
                "--load-config",
                str(run_dir / "config.yml"),
                "--output-dir",
                str(splat.parent),
            ],
            cwd=workspace,
            check=True,
        )
    elif NO_CUDA in train.stderr:
        mode = "reconstructed without CUDA (see make_recording.py and README.md)"
        stdout = train.stdout + reconstruct(run_dir / "config.yml", splat)
    else:
        sys.stderr.write(train.stdout[-4000:] + train.stderr[-4000:])
        print(f"ns-train failed (exit {train.returncode}) for another reason", file=sys.stderr)
        return 1
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ns-train-splatfacto.stdout.txt").write_text(stdout, encoding="utf-8")
    shutil.copyfile(run_dir / "config.yml", out / "config.yml")
    shutil.copyfile(run_dir / "dataparser_transforms.json", out / "dataparser_transforms.json")
    shutil.copyfile(splat, out / "splat.ply")
    (out / "provenance.txt").write_text(f"{mode}\n", encoding="utf-8")
    print(f"{mode}; written to {out}")
    return 0


@contextlib.contextmanager
def _cuda_is_cpu() -> Iterator[None]:
    """Make ``Tensor.cuda()`` a no-op (splatfacto's model puts its SH coefficients on cuda)."""

    def stay(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        del args, kwargs
        return self

    original = torch.Tensor.cuda
    torch.Tensor.cuda = stay
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class _Clock:
    """A clock that moves only when told to: the durations the writer and profiler see."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _duration(step: int, jitter: random.Random) -> float:
    """An invented iteration time on a GPU: slow first steps, then ~12 ms."""
    if step == 0:
        return 1.84  # the first batch caches the images and warms CUDA up
    if step == 1:
        return 0.061
    return 0.012 + jitter.uniform(-0.0015, 0.0025)


def reconstruct(config_path: Path, splat: Path) -> str:
    """Print what the GPU run prints after model set-up; write splat.ply; return the text."""
    # How nerfstudio itself loads config.yml (python/object tags); the file was written just now.
    config = yaml.load(config_path.read_text(encoding="utf-8"), Loader=yaml.Loader)  # noqa: S506
    # scripts/train.py: train_loop() seeds everything before building the trainer.
    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    discarded = io.StringIO()
    with contextlib.redirect_stdout(discarded), _cuda_is_cpu():
        trainer = config.setup(local_rank=0, world_size=1)  # device "cuda:0", as on the GPU
        trainer.pipeline = config.pipeline.setup(
            device="cpu",
            test_mode="val",
            world_size=1,
            local_rank=0,
            grad_scaler=trainer.grad_scaler,
        )
    _check_discarded(discarded.getvalue())
    pipeline = trainer.pipeline
    datamanager = pipeline.datamanager
    optimizers = trainer.setup_optimizers()
    base_dir = config.get_base_dir()
    log_dir = base_dir / config.logging.relative_log_dir

    clock = _Clock()
    jitter = random.Random(0)  # noqa: S311 -- invented timings, reproducible
    writer.time = clock  # TimeWriter's clock (writer.py does `from time import time`)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # Trainer.setup(), after the pipeline and optimizers:
        trainer._check_viewer_warnings()
        trainer._load_checkpoint()
        writer.setup_event_writer(
            config.is_wandb_enabled(),
            config.is_tensorboard_enabled(),
            config.is_comet_enabled(),
            log_dir=log_dir,
            experiment_name=config.experiment_name,
            project_name=config.project_name,
        )
        writer.setup_local_writer(config.logging, max_iter=config.max_num_iterations)
        writer.put_config(name="config", config_dict=dataclasses.asdict(config), step=0)
        profiler.setup_profiler(config.logging, log_dir)
        record = profiler.PROFILER[0].update_time
        # Trainer.train():
        datamanager.train_dataparser_outputs.save_dataparser_transform(
            base_dir / "dataparser_transforms.json"
        )
        with TimeWriter(writer, EventName.TOTAL_TRAIN_TIME):
            for step in range(config.max_num_iterations):
                with TimeWriter(writer, EventName.ITER_TRAIN_TIME, step=step) as train_t:
                    start = clock()
                    datamanager.next_train(step)  # step 0: "Caching / undistorting train images"
                    clock.advance(_duration(step, jitter))
                    record("VanillaPipeline.get_train_loss_dict", start, clock() - 0.003)
                    optimizers.scheduler_step_all(step)
                    record("Trainer.train_iteration", start, clock())
                if step > 1:
                    writer.put_time(
                        name=EventName.TRAIN_RAYS_PER_SEC,
                        duration=datamanager.get_train_rays_per_batch()
                        / max(0.001, train_t.duration),
                        step=step,
                        avg_over_steps=True,
                    )
                if step_check(step, config.logging.steps_per_log, run_at_zero=True):
                    # Values go to tensorboard only (discarded), never to the table.
                    writer.put_scalar(name="Train Loss", scalar=0.0, step=step)
                    writer.put_dict(name="Train Loss Dict", scalar_dict={}, step=step)
                    writer.put_dict(name="Train Metrics Dict", scalar_dict={}, step=step)
                    writer.put_scalar(name="GPU Memory (MB)", scalar=0.0, step=step)
                eval_start = clock()
                if step_check(step, config.steps_per_eval_image):
                    with TimeWriter(writer, EventName.TEST_RAYS_PER_SEC, write=False) as test_t:
                        camera, _ = datamanager.next_eval_image(step)  # first: eval images cached
                        clock.advance(0.021)
                    record("VanillaPipeline.get_eval_image_metrics_and_images", eval_start, clock())
                    num_rays = int((camera.height * camera.width * camera.size).item())
                    writer.put_time(
                        name=EventName.TEST_RAYS_PER_SEC,
                        duration=num_rays / test_t.duration,
                        step=step,
                        avg_over_steps=True,
                    )
                    writer.put_dict(
                        name="Eval Images Metrics", scalar_dict={"num_rays": num_rays}, step=step
                    )
                    writer.put_image(name="Eval Images/img", image=torch.zeros(2, 2, 3), step=step)
                if step_check(step, config.steps_per_eval_all_images):
                    clock.advance(0.05 * len(datamanager.eval_dataset))
                    writer.put_dict(
                        name="Eval Images Metrics Dict (all images)", scalar_dict={}, step=step
                    )
                record("Trainer.eval_iteration", eval_start, clock())
                writer.write_out_storage()
        # Trainer._after_train() (the checkpoint it saves is left out of the recording):
        writer.write_out_storage()
        table = Table(
            title=None, show_header=False, box=box.MINIMAL, title_style=style.Style(bold=True)
        )
        table.add_row("Config File", str(config.get_base_dir() / "config.yml"))
        table.add_row("Checkpoint Directory", str(config.get_checkpoint_dir()))
        CONSOLE.print(
            Panel(table, title="[bold][green]:tada: Training Finished :tada:[/bold]", expand=False)
        )
        # scripts/train.py: launch() flushes the profiler last.
        profiler.flush_profiler(config.logging)

    # ns-export gaussian-splat, on this (untrained) model instead of a loaded checkpoint.
    def loaded(*args: Any, **kwargs: Any) -> tuple[Any, Any, Path, int]:
        del args, kwargs
        return config, pipeline, config_path, step

    exporter.eval_setup = loaded
    with contextlib.redirect_stdout(io.StringIO()):
        exporter.ExportGaussianSplat(load_config=config_path, output_dir=splat.parent).main()
    return printed.getvalue()


def _check_discarded(text: str) -> None:
    """Building the pipeline again may print only what the real prefix already holds."""
    expected = ("Saving checkpoints to:", "Auto image downscale factor of", "trainer.py:142")
    unexpected = [
        line
        for line in text.splitlines()
        if line.strip() and not any(part in line for part in expected)
    ]
    if unexpected:
        raise SystemExit(f"pipeline set-up printed lines the recording would lose: {unexpected}")


if __name__ == "__main__":
    sys.exit(main())
