"""The Nerfstudio runtime end to end: gateway + agent process + the REAL ns-* CLI (CPU).

Generated inputs are uploaded as the task's ``file`` input, exactly as a platform user would:
12 photos that ns-process-data poses with the REAL COLMAP (Debian's, CPU), or a ready
12-image dataset; nerfacto trains for 5 iterations on the CPU and a point cloud is exported.
splatfacto needs CUDA: its success path runs through the same runtime code against a
recorded run (``tests/data/splatfacto``) replayed by stand-in ``ns-*`` commands.
"""

from __future__ import annotations

import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_process import AgentProcess, start_agent
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway
from tests.nerfstudio import NerfstudioInstall
from tests.nerfstudio_scene import make_photos_zip, make_scene_zip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
RECORDED = Path(__file__).parents[1] / "data" / "splatfacto"
SCENE = {"key": "scene", "type": "file", "accept": "application/zip", "target_path": "input"}
ITERATIONS = {
    "key": "iterations",
    "type": "number",
    "min": 1,
    "max": 100,
    "target_path": "train.max_num_iterations",
}


def spec(**train: Any) -> dict[str, Any]:
    """A nerfacto-on-CPU pipeline with a point cloud export, from a dataset zip."""
    return {
        "input": {"param": "scene", "kind": "dataset"},
        "train": {"method": "nerfacto", "max_num_iterations": 5, "device": "cpu", **train},
        "export": [{"kind": "pointcloud", "num_points": 2000, "normal_method": "open3d"}],
    }


def photo_spec() -> dict[str, Any]:
    """The same pipeline from a zip of photos, posed by ns-process-data (COLMAP on the CPU)."""
    return {
        **spec(),
        "input": {"param": "scene", "kind": "images"},
        "process": {"matching_method": "exhaustive", "num_downscales": 0},
    }


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A fresh gateway."""
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as proc:
        yield proc


def nerf_agent(
    tmp_path: Path, gw: GatewayProcess, dk: str, bin_dir: Path, torch_home: Path
) -> AgentProcess:
    """An agent offering only the Nerfstudio runtime."""
    env = {
        "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
        "CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__ENABLED": "true",
        "CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__BIN_DIR": str(bin_dir),
        "CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__TORCH_HOME": str(torch_home),
        "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "10",
        "CYBERUN_AGENT_TIMEOUTS__KILL_GRACE_S": "5",
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    agent = start_agent(tmp_path / "agent", gw.url, dk, "nerf-agent", extra_env=env)
    agent.wait_log("connected to the gateway", timeout=180)
    return agent


def submit(
    gw: GatewayProcess,
    dk: str,
    tmp_path: Path,
    workflow_spec: dict[str, Any],
    archive: Path | None = None,
    **parameters: Any,
) -> str:
    """Upload ``archive`` (default: a dataset zip) and run the workflow; return the task id."""
    archive = archive or make_scene_zip(tmp_path / "scene.zip")
    data = archive.read_bytes()
    with gw.client(dk) as http:
        slot = http.post(
            "/r/files/presign",
            json={
                "file_name": "scene.zip",
                "file_size": len(data),
                "content_type": "application/zip",
            },
        ).json()
        assert (
            httpx.put(slot["upload_url"], content=data, headers=slot["upload_headers"]).status_code
            < 300
        )
        body = {
            "name": "nerf",
            "tool_type": "nerfstudio",
            "workflow_json": workflow_spec,
            "parameters": [SCENE, ITERATIONS],
        }
        workflow = http.post("/workflows", json=body).json()["id"]
        answer = http.post(
            f"/r/workflows/{workflow}/run",
            json={"parameters": {"scene": slot["file_key"], **parameters}},
        )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["task_id"])


def result_of(gw: GatewayProcess, dk: str, agent: AgentProcess, task_id: str) -> dict[str, Any]:
    """Wait for the acknowledged report; return the result."""
    agent.wait_log("report acknowledged", task_id=task_id, timeout=480)
    with gw.client(dk) as http:
        found: dict[str, Any] = http.get(f"/r/tasks/{task_id}/result").json()
    return found


def test_photos_are_posed_by_colmap_then_trained_exported_and_uploaded(
    tmp_path: Path, gw: GatewayProcess, nerfstudio: NerfstudioInstall
) -> None:
    """Photos go through real ns-process-data/COLMAP, 5 nerfacto iterations and an export."""
    dk = gw.credential("nerf")
    agent = nerf_agent(tmp_path, gw, dk, nerfstudio.bin, nerfstudio.torch_home)
    try:
        photos = make_photos_zip(tmp_path / "photos.zip")
        task_id = submit(gw, dk, tmp_path, photo_spec(), photos, iterations=5)
        result = result_of(gw, dk, agent, task_id)
        assert result["task_status"] == "completed", result
        assert set(result["download_urls"]) == {"train.config.0", "export.pointcloud.0"}
        config = httpx.get(result["download_urls"]["train.config.0"]).text
        assert "method_name: nerfacto" in config
        cloud = httpx.get(result["download_urls"]["export.pointcloud.0"]).content
        assert cloud.startswith(b"ply\n")
        with gw.client(dk) as http:
            events = http.get(f"/r/tasks/{task_id}/events").text
        assert '"current_node": "ns-process-data"' in events
        assert '"current_node": "ns-train"' in events
        assert '"step_total": 5' in events
        assert '"current_node": "ns-export"' in events
    finally:
        agent.stop()


def test_a_bad_option_is_refused_before_anything_runs(
    tmp_path: Path, gw: GatewayProcess, nerfstudio: NerfstudioInstall
) -> None:
    """An option outside the allowlist fails the task without starting any ns-* process."""
    dk = gw.credential("nerf-bad")
    agent = nerf_agent(tmp_path, gw, dk, nerfstudio.bin, nerfstudio.torch_home)
    try:
        bad = spec(options={"--data": "/etc"})
        task_id = submit(gw, dk, tmp_path, bad)
        result = result_of(gw, dk, agent, task_id)
        assert result["task_status"] == "failed"
        assert "is not an allowed option" in result["task_error"]
        assert not any(
            r.get("event") == "task phase" and r.get("phase") == "running" for r in agent.seen
        )
    finally:
        agent.stop()


def test_cancel_mid_training_kills_the_process_group(
    tmp_path: Path, gw: GatewayProcess, nerfstudio: NerfstudioInstall
) -> None:
    """Cancelling during ns-train stops the whole process group within the graces."""
    dk = gw.credential("nerf-cancel")
    agent = nerf_agent(tmp_path, gw, dk, nerfstudio.bin, nerfstudio.torch_home)
    try:
        task_id = submit(gw, dk, tmp_path, spec(max_num_iterations=100), iterations=100)
        _wait_for_training(gw, dk, task_id)
        started = time.monotonic()
        with gw.client(dk) as http:
            http.post(f"/r/tasks/{task_id}/cancel")
        reported = agent.wait_log("task reported", task_id=task_id, timeout=60)
        assert reported["outcome"] == "task.cancelled"
        assert time.monotonic() - started < 10 + 5 + 10  # interrupt grace + term grace + margin
        assert not _processes_in(tmp_path / "agent" / "work")
    finally:
        agent.stop()


def test_splatfacto_success_path_from_a_recorded_run(tmp_path: Path, gw: GatewayProcess) -> None:
    """The runtime handles a splatfacto run (recorded on the real trainer code) end to end."""
    bin_dir = _replay_commands(tmp_path / "replay-bin")
    dk = gw.credential("splat")
    agent = nerf_agent(tmp_path, gw, dk, bin_dir, tmp_path / "torch")
    try:
        splat = {
            "input": {"param": "scene", "kind": "dataset"},
            "train": {"method": "splatfacto", "max_num_iterations": 30, "device": "cuda"},
            "export": [{"kind": "gaussian-splat"}],
        }
        task_id = submit(gw, dk, tmp_path, splat)
        result = result_of(gw, dk, agent, task_id)
        assert result["task_status"] == "completed", result
        assert set(result["download_urls"]) == {"train.config.0", "export.gaussian-splat.0"}
        splat_ply = httpx.get(result["download_urls"]["export.gaussian-splat.0"]).content
        assert splat_ply == (RECORDED / "splat.ply").read_bytes()
        with gw.client(dk) as http:
            events = http.get(f"/r/tasks/{task_id}/events").text
        assert '"current_node": "ns-train"' in events
    finally:
        agent.stop()


def _wait_for_training(gw: GatewayProcess, dk: str, task_id: str) -> None:
    with (
        httpx.Client(
            base_url=gw.api, headers={"Authorization": f"Bearer {dk}"}, timeout=300
        ) as http,
        http.stream("GET", f"/r/tasks/{task_id}/events") as stream,
    ):
        for line in stream.iter_lines():
            if '"current_node": "ns-train"' in line and '"step_current"' in line:
                return
    raise AssertionError("training never reported a step")


def _processes_in(workspace_root: Path) -> list[int]:
    """Live processes whose command line mentions the agent's work directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(workspace_root) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _replay_commands(bin_dir: Path) -> Path:
    """Stand-in ns-train/ns-export that replay the recorded splatfacto run (no CUDA here)."""
    bin_dir.mkdir(parents=True)
    train = f"""#!{sys.executable}
import pathlib, shutil, sys
args = sys.argv[1:]
if "--help" in args:
    sys.exit(print("usage: ns-train [-h] METHOD"))
out = pathlib.Path(args[args.index("--output-dir") + 1]) / args[args.index("--experiment-name") + 1]
run = out / args[0] / args[args.index("--timestamp") + 1]
run.mkdir(parents=True, exist_ok=True)
shutil.copy({str(RECORDED / "config.yml")!r}, run / "config.yml")
sys.stdout.write(pathlib.Path({str(RECORDED / "ns-train-splatfacto.stdout.txt")!r}).read_text())
"""
    export = f"""#!{sys.executable}
import pathlib, shutil, sys
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output-dir") + 1])
out.mkdir(parents=True, exist_ok=True)
shutil.copy({str(RECORDED / "splat.ply")!r}, out / "splat.ply")
print("Saved splat.ply")
"""
    probe = f"""#!{sys.executable}
print("1.1.5")
"""
    for name, text in (("ns-train", train), ("ns-export", export), ("python", probe)):
        path = bin_dir / name
        path.write_text(text, encoding="utf-8")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir
