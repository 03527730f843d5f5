"""The REAL Nerfstudio 1.1.5 CLI (CPU torch) behaves as the agent's Nerfstudio runtime expects.

No agent code here: the ``ns-*`` commands that ``tests.nerfstudio`` installs, run as
subprocesses on the synthetic scene of ``tests.nerfstudio_scene``, pin down Nerfstudio's own
behaviour (shared/design/real-components.md): ``ns-train nerfacto`` on the CPU finishes with
exit 0, writes ``<output>/<experiment>/nerfacto/<timestamp>/config.yml`` and prints its progress
table ("Step (% Done)" rows) on stdout; ``ns-export pointcloud`` writes a PLY; argument errors
exit 2, a missing data directory exits 1.

The recorded samples under ``tests/data`` are checked against the live CLI here, so they stay
true to the installed version: ``nerfstudio/ns-train-nerfacto.stdout.txt`` (a real stdout of a
longer CPU run, for the progress parser's unit tests; how it was made: see
docs/nerfstudio-runtime-install.md), ``nerfstudio/ns-train-splatfacto.help.txt`` (the exact
help text at 80 columns, the venv path replaced by ``ns-train``) and ``splatfacto/`` (a
splatfacto run recorded without a GPU, see its README).

Every process runs under a timeout (its whole process group is killed when it overruns).
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.nerfstudio import NerfstudioInstall
from tests.nerfstudio_scene import make_scene, make_scene_zip

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "data"
NERFACTO_SAMPLE = DATA / "nerfstudio" / "ns-train-nerfacto.stdout.txt"
SPLATFACTO_HELP = DATA / "nerfstudio" / "ns-train-splatfacto.help.txt"
SPLATFACTO_RUN = DATA / "splatfacto"

EXPERIMENT = "task"
TIMESTAMP = "run"
TRAIN_TIMEOUT_S = 900.0  # ~55 s on an idle 2-core machine (~20 s of it start-up)
EXPORT_TIMEOUT_S = 600.0  # ~25 s idle
CLI_TIMEOUT_S = 300.0  # argument parsing alone: ~8 s (importing torch and every method)
HELP_COLUMNS = "80"  # tyro wraps its help to the terminal width

# A row of the progress table: "<step> (<percent>%)" left-aligned in 20 columns.
ROW = re.compile(r"^(\d+) \((\d+\.\d\d)%\)\s")
HEADER = "Step (% Done)"
PLY_SIZES = {"float": 4, "uchar": 1, "double": 8, "int": 4, "uint": 4}


@dataclass(frozen=True)
class TrainRun:
    """One finished ``ns-train`` run: where it wrote and what it printed."""

    output_dir: Path
    config: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def nerfacto_run(
    nerfstudio: NerfstudioInstall, tmp_path_factory: pytest.TempPathFactory
) -> TrainRun:
    """``ns-train nerfacto`` for 5 iterations on the CPU, on a 12-image 32x32 scene."""
    root = tmp_path_factory.mktemp("nerfacto")
    data = make_scene(root / "data")
    output = root / "train"
    result = nerfstudio.run(
        [
            "ns-train",
            "nerfacto",
            "--machine.device-type",
            "cpu",
            "--max-num-iterations",
            "5",
            "--vis",
            "tensorboard",
            "--output-dir",
            output,
            "--experiment-name",
            EXPERIMENT,
            "--timestamp",
            TIMESTAMP,
            "--viewer.quit-on-train-completion",
            "True",
            "nerfstudio-data",
            "--data",
            data,
        ],
        cwd=root,
        timeout_s=TRAIN_TIMEOUT_S,
    )
    config = output / EXPERIMENT / "nerfacto" / TIMESTAMP / "config.yml"
    return TrainRun(output, config, result.returncode, result.stdout, result.stderr)


def table_rows(stdout: str) -> list[tuple[int, float]]:
    """(step, percent) of every progress-table row, in order (rows are reprinted as it grows)."""
    rows = []
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match:
            rows.append((int(match.group(1)), float(match.group(2))))
    return rows


def table_headers(stdout: str) -> list[str]:
    """Every header line of the progress table, without cursor escapes or trailing blanks."""
    escapes = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")
    return [
        escapes.sub("", line).rstrip()
        for line in stdout.splitlines()
        if HEADER in line and "Printing max" not in line
    ]


def ply_header(path: Path) -> tuple[str, int, list[tuple[str, str]], int]:
    """Read a PLY's header: (format line, vertex count, [(type, name)], bytes after header)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    assert lines[0] == "ply", lines[:2]
    formats = [line for line in lines if line.startswith("format ")]
    counts = [int(line.split()[2]) for line in lines if line.startswith("element vertex ")]
    properties = [
        (line.split()[1], line.split()[2]) for line in lines if line.startswith("property ")
    ]
    assert len(formats) == 1, lines
    assert len(counts) == 1, lines
    return formats[0], counts[0], properties, len(data) - end


# ------------------------------------------------------------------------------ tests


def test_scene_zip_holds_a_nerfstudio_dataset(tmp_path: Path) -> None:
    """The generated upload zip holds transforms.json, 12 PNG frames and the sparse cloud."""
    archive = make_scene_zip(tmp_path / "scene.zip", folder="scene")
    with zipfile.ZipFile(archive) as opened:
        names = set(opened.namelist())
        transforms = json.loads(opened.read("scene/transforms.json"))
        first = opened.read("scene/images/frame_00001.png")
    frames = transforms["frames"]
    assert len(frames) == 12
    assert {f"scene/{frame['file_path']}" for frame in frames} <= names
    assert "scene/sparse_pc.ply" in names
    assert transforms["w"] == transforms["h"] == 32
    assert all(len(frame["transform_matrix"]) == 4 for frame in frames)
    assert first.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.timeout(TRAIN_TIMEOUT_S + 60)
def test_train_nerfacto_on_cpu_finishes_and_writes_config(nerfacto_run: TrainRun) -> None:
    """ns-train nerfacto on the CPU exits 0, says so, and writes O/X/nerfacto/T/config.yml."""
    assert nerfacto_run.returncode == 0, (nerfacto_run.stdout + nerfacto_run.stderr)[-4000:]
    assert nerfacto_run.config.is_file()
    assert "method_name: nerfacto" in nerfacto_run.config.read_text(encoding="utf-8")
    checkpoints = list((nerfacto_run.config.parent / "nerfstudio_models").glob("step-*.ckpt"))
    assert [path.name for path in checkpoints] == ["step-000000004.ckpt"]
    assert "Training Finished" in nerfacto_run.stdout
    assert str(nerfacto_run.config) in nerfacto_run.stdout


@pytest.mark.timeout(TRAIN_TIMEOUT_S + 60)
def test_train_progress_table_matches_the_recorded_sample(nerfacto_run: TrainRun) -> None:
    """The live progress table has the recorded sample's header and "<step> (<pct>%)" rows."""
    assert nerfacto_run.returncode == 0, nerfacto_run.stderr[-4000:]
    live_headers = table_headers(nerfacto_run.stdout)
    assert live_headers, nerfacto_run.stdout[-4000:]
    assert live_headers[0] == "Step (% Done)       Train Iter (time)    ETA (time)"
    sample = NERFACTO_SAMPLE.read_text(encoding="utf-8")
    assert table_headers(sample)[0] == live_headers[0]
    # 5 iterations, logged every 10 steps: step 0 only (0/5 done), as printed at start.
    assert table_rows(nerfacto_run.stdout)[0] == (0, 0.0)
    # The sample (120 iterations) shows what the parser must cope with: the table reprinted
    # after each new row, a column added later, and a last row for step max-1 with no values.
    sample_rows = table_rows(sample)
    assert sample_rows[0] == (0, 0.0)
    assert sample_rows[-1] == (119, 99.17)
    assert {step for step, _ in sample_rows} == {*range(0, 120, 10), 119}
    assert "\x1b[" in sample  # cursor-up escapes are written even to a pipe


@pytest.mark.timeout(TRAIN_TIMEOUT_S + EXPORT_TIMEOUT_S + 60)
def test_export_pointcloud_writes_a_ply(
    nerfstudio: NerfstudioInstall, nerfacto_run: TrainRun, tmp_path: Path
) -> None:
    """ns-export pointcloud with open3d normals writes point_cloud.ply with a valid header."""
    assert nerfacto_run.returncode == 0, nerfacto_run.stderr[-4000:]
    out = tmp_path / "export"
    result = nerfstudio.run(
        [
            "ns-export",
            "pointcloud",
            "--load-config",
            nerfacto_run.config,
            "--output-dir",
            out,
            "--num-points",
            "2000",
            "--normal-method",
            "open3d",
        ],
        cwd=tmp_path,
        timeout_s=EXPORT_TIMEOUT_S,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    form, count, properties, body = ply_header(out / "point_cloud.ply")
    assert form == "format binary_little_endian 1.0"
    assert [name for _, name in properties] == [
        *("x", "y", "z", "nx", "ny", "nz"),
        *("red", "green", "blue"),
    ]
    assert count > 0
    assert body == count * sum(PLY_SIZES[kind] for kind, _ in properties)


@pytest.mark.timeout(CLI_TIMEOUT_S + 60)
def test_splatfacto_help_parses_and_matches_the_recording(
    nerfstudio: NerfstudioInstall, tmp_path: Path
) -> None:
    """ns-train splatfacto --help exits 0 and prints exactly the recorded help text."""
    result = nerfstudio.run(
        ["ns-train", "splatfacto", "--help"],
        cwd=tmp_path,
        timeout_s=CLI_TIMEOUT_S,
        extra_env={"COLUMNS": HELP_COLUMNS},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    text = result.stdout.replace(str(nerfstudio.command("ns-train")), "ns-train")
    assert "Gaussian Splatting model" in text
    assert "--pipeline.model.sh-degree INT" in text
    assert text == SPLATFACTO_HELP.read_text(encoding="utf-8"), (
        f"the help text changed: regenerate {SPLATFACTO_HELP} (docs/nerfstudio-runtime-install.md)"
    )


@pytest.mark.timeout(CLI_TIMEOUT_S + 60)
def test_bad_flag_exits_2(nerfstudio: NerfstudioInstall, tmp_path: Path) -> None:
    """An unknown ns-train option exits 2 and names the option on stderr."""
    data = make_scene(tmp_path / "data", images=2, size=4)
    result = nerfstudio.run(
        ["ns-train", "splatfacto", "--no-such-flag", "3", "nerfstudio-data", "--data", data],
        cwd=tmp_path,
        timeout_s=CLI_TIMEOUT_S,
    )
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    assert "Unrecognized options" in result.stderr
    assert "--no-such-flag" in result.stderr
    assert not (tmp_path / "outputs").exists()  # nothing was started


@pytest.mark.timeout(CLI_TIMEOUT_S + 60)
def test_missing_data_dir_exits_1(nerfstudio: NerfstudioInstall, tmp_path: Path) -> None:
    """ns-train on a data directory that does not exist exits 1 with the dataparser's error."""
    missing = tmp_path / "no-such-data"
    result = nerfstudio.run(
        [
            "ns-train",
            "nerfacto",
            "--machine.device-type",
            "cpu",
            "--max-num-iterations",
            "5",
            "--vis",
            "tensorboard",
            "--output-dir",
            tmp_path / "train",
            "--viewer.quit-on-train-completion",
            "True",
            "nerfstudio-data",
            "--data",
            missing,
        ],
        cwd=tmp_path,
        timeout_s=CLI_TIMEOUT_S,
    )
    assert result.returncode == 1, (result.stdout + result.stderr)[-4000:]
    assert f"Data directory {missing} does not exist." in result.stdout + result.stderr


@pytest.mark.timeout(CLI_TIMEOUT_S + 60)
def test_recorded_splatfacto_run_loads_in_nerfstudio(nerfstudio: NerfstudioInstall) -> None:
    """The recorded splatfacto config.yml loads as a nerfstudio TrainerConfig; splat.ply parses."""
    script = (
        "import sys, yaml\n"
        "from nerfstudio.engine.trainer import TrainerConfig\n"
        "config = yaml.load(open(sys.argv[1]).read(), Loader=yaml.Loader)\n"
        "assert isinstance(config, TrainerConfig), type(config)\n"
        "print(config.method_name, config.pipeline.model.sh_degree, config.max_num_iterations)\n"
    )
    result = nerfstudio.run(
        [nerfstudio.python, "-c", script, SPLATFACTO_RUN / "config.yml"],
        cwd=SPLATFACTO_RUN,
        timeout_s=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    method, sh_degree, iterations = result.stdout.split()
    assert method == "splatfacto"
    form, count, properties, body = ply_header(SPLATFACTO_RUN / "splat.ply")
    assert form == "format binary_little_endian 1.0"
    names = [name for _, name in properties]
    rest = 3 * ((int(sh_degree) + 1) ** 2 - 1)  # SH coefficients beyond the DC term, x RGB
    assert names == [
        *("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"),
        *(f"f_rest_{i}" for i in range(rest)),
        "opacity",
        *(f"scale_{i}" for i in range(3)),
        *(f"rot_{i}" for i in range(4)),
    ]
    assert count > 0
    assert body == count * struct.calcsize("<f") * len(names)
    stdout = (SPLATFACTO_RUN / "ns-train-splatfacto.stdout.txt").read_text(encoding="utf-8")
    rows = table_rows(stdout)
    assert rows[0] == (0, 0.0)
    assert rows[-1] == (
        int(iterations) - 1,
        round(100 * (int(iterations) - 1) / int(iterations), 2),
    )
    assert "method_name='splatfacto'" in stdout
    assert "Training Finished" in stdout
