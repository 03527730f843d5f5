"""GPU capability, labels and health through the real pynvml code against a compiled fake NVML.

``cyberun-agent hardware --json`` and the daemon run as real processes whose pynvml loads the
fake ``libnvidia-ml.so.1`` (tests/nvml_fake.py); the no-driver cases use the real library
lookup with nothing to find. The daemon cases are checked at the real gateway's REST API.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import ROOT, AgentProcess, agent_cli, script_workflow, start_agent
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway
from tests.nvml_fake import FakeGpu, nvml_env, write_scenario

GIB = 1024**3
RTX = FakeGpu(
    name="NVIDIA GeForce RTX 4090",
    uuid="GPU-11111111-2222-3333-4444-555555555555",
    total=24 * GIB,
    used=2 * GIB,
    cc=(8, 9),
    bus="00000000:01:00.0",
    power_limit_mw=450_000,
    power_mw=61_500,
    temp=47,
    util_gpu=12,
    throttle=0x1,
)
H100 = FakeGpu(
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    total=80 * GIB,
    used=GIB,
    cc=(9, 0),
    mig=True,
    bus="00000000:41:00.0",
    power_limit_mw=700_000,
    ecc_uncorrected=None,  # not supported: no reading, not a problem
)


def hardware(env: dict[str, str], home: Path, *args: str) -> dict[str, Any]:
    """Run ``cyberun-agent hardware --json`` in a fresh process and return its report."""
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_STATE_DIR": str(home / "state"),
        "CYBERUN_AGENT_CACHE_DIR": str(home / "cache"),
    }
    done = agent_cli("hardware", "--json", *args, env={**base, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def scenario_env(lib: Path, tmp_path: Path, gpus: Sequence[FakeGpu], **kw: Any) -> dict[str, str]:
    """The environment pointing pynvml at the fake library with this scenario."""
    return nvml_env(lib, write_scenario(tmp_path / "nvml.txt", gpus, **kw))


def test_two_gpus_are_advertised_with_every_static_fact(
    fake_nvml_lib: Path, tmp_path: Path
) -> None:
    """Both GPUs reach the capability with uuid, VRAM, CC, MIG, PCI, power, driver and CUDA."""
    env = scenario_env(fake_nvml_lib, tmp_path, [RTX, H100], driver_version="550.54.15")
    report = hardware(env, tmp_path, "--label", "team-a", "--region", "  EU-West ")
    gpus = report["capability"]["gpus"]
    assert [g["index"] for g in gpus] == [0, 1]
    rtx, h100 = gpus
    assert rtx["name"] == "NVIDIA GeForce RTX 4090"
    assert rtx["uuid"] == RTX.uuid
    assert rtx["vram_total"] == 24 * GIB
    assert rtx["vram_free"] == 22 * GIB
    assert rtx["compute_capability"] == "8.9"
    assert rtx["mig"] is False
    assert rtx["pci_bus_id"] == "00000000:01:00.0"
    assert rtx["power_limit_w"] == 450.0
    assert rtx["driver_version"] == "550.54.15"
    assert rtx["cuda_version"] == "12.4"
    assert h100["mig"] is True
    assert h100["compute_capability"] == "9.0"
    assert report["labels"] == ["gpu", "rtx-4090", "h100", "vram-80gb", "team-a"]
    assert report["region"] == "eu-west"
    assert report["nvml"] == "ok"
    assert report["capability"]["platform_arch"] == "linux/amd64"
    assert report["capability"]["cpu"]["count"] >= 1
    assert report["capability"]["cache_free_bytes"] > 0


def test_live_readings_include_utilization_power_and_throttle(
    fake_nvml_lib: Path, tmp_path: Path
) -> None:
    """Heartbeat readings carry utilization, memory, temperature, power and throttle names."""
    report = hardware(scenario_env(fake_nvml_lib, tmp_path, [RTX, H100]), tmp_path)
    rtx, h100 = report["gpus"]
    assert rtx["utilization"] == 12.0
    assert rtx["memory_used"] == 2 * GIB
    assert rtx["memory_free"] == 22 * GIB
    assert rtx["temperature_c"] == 47.0
    assert rtx["power_w"] == 61.5
    assert rtx["throttle_reasons"] == ["gpu_idle"]
    assert rtx["ecc_uncorrected"] == 0
    assert "ecc_uncorrected" not in h100  # NotSupported on that GPU: no reading
    assert "problem" not in rtx
    assert "problem" not in h100


def test_a_function_missing_from_the_driver_library_leaves_only_that_reading_empty(
    fake_nvml_lib_factory: Callable[[Sequence[str]], Path], tmp_path: Path
) -> None:
    """An older driver lacking nvmlDeviceGetPowerUsage: no power reading, everything else works."""
    lib = fake_nvml_lib_factory(("nvmlDeviceGetPowerUsage",))
    report = hardware(scenario_env(lib, tmp_path, [RTX]), tmp_path)
    (gpu,) = report["gpus"]
    assert "power_w" not in gpu
    assert gpu["temperature_c"] == 47.0
    assert report["labels"] == ["gpu", "rtx-4090", "vram-24gb"]


def test_driver_not_loaded_is_a_clean_cpu_only_agent(fake_nvml_lib: Path, tmp_path: Path) -> None:
    """NVML init failing with DriverNotLoaded gives no GPU, no gpu label and the reason."""
    report = hardware(
        scenario_env(fake_nvml_lib, tmp_path, [RTX], init="driver_not_loaded"), tmp_path
    )
    assert report["capability"]["gpus"] == []
    assert report["labels"] == []
    assert report["nvml"] == "the NVIDIA driver is not loaded"


def test_no_nvml_library_at_all_is_a_clean_cpu_only_agent(tmp_path: Path) -> None:
    """With no libnvidia-ml.so.1 to load (the real lookup), the agent is CPU-only, no crash."""
    empty = tmp_path / "empty"
    empty.mkdir()
    report = hardware({"LD_LIBRARY_PATH": str(empty)}, tmp_path)
    if report["nvml"] == "ok":  # pragma: no cover - a host with a real driver
        pytest.skip("this machine has a real NVIDIA driver")
    assert report["nvml"] == "no NVIDIA driver library (libnvidia-ml.so.1) found"
    assert report["capability"]["gpus"] == []
    assert "gpu" not in report["labels"]


def test_gpu_disabled_by_configuration_never_reads_nvml(
    fake_nvml_lib: Path, tmp_path: Path
) -> None:
    """gpu.enabled false: the GPUs NVML would report are not advertised."""
    env = scenario_env(fake_nvml_lib, tmp_path, [RTX])
    report = hardware({**env, "CYBERUN_AGENT_GPU__ENABLED": "false"}, tmp_path)
    assert report["capability"]["gpus"] == []
    assert report["labels"] == []


def test_gpu_devices_limits_the_agent_to_its_own_gpus(fake_nvml_lib: Path, tmp_path: Path) -> None:
    """gpu.devices by index or UUID: only those GPUs are advertised, read and labelled."""
    env = scenario_env(fake_nvml_lib, tmp_path, [RTX, H100])
    by_index = hardware({**env, "CYBERUN_AGENT_GPU__DEVICES": "1"}, tmp_path)
    assert [g["name"] for g in by_index["capability"]["gpus"]] == [H100.name]
    assert [g["index"] for g in by_index["gpus"]] == [1]
    assert by_index["labels"] == ["gpu", "h100", "vram-80gb"]
    by_uuid = hardware({**env, "CYBERUN_AGENT_GPU__DEVICES": str(RTX.uuid)}, tmp_path)
    assert [g["uuid"] for g in by_uuid["capability"]["gpus"]] == [RTX.uuid]


def test_unhealthy_gpus_are_left_out_with_their_reasons(
    fake_nvml_lib: Path, tmp_path: Path
) -> None:
    """A hot GPU, one with ECC errors and a lost one get no work; the healthy one keeps labels."""
    gpus = [
        FakeGpu(name="NVIDIA H200", total=140 * GIB, temp=91),
        FakeGpu(name="NVIDIA A100-SXM4-80GB", total=80 * GIB, ecc_uncorrected=2),
        FakeGpu(name="NVIDIA L40S", total=48 * GIB, lost=True),
        RTX,
    ]
    report = hardware(scenario_env(fake_nvml_lib, tmp_path, gpus), tmp_path)
    assert [g["index"] for g in report["capability"]["gpus"]] == [3]
    assert report["labels"] == ["gpu", "rtx-4090", "vram-24gb"]
    problems = {g["index"]: g.get("problem") for g in report["gpus"]}
    assert "too hot: 91 °C" in problems[0]
    assert "2 uncorrectable ECC" in problems[1]
    assert "fallen off the bus" in problems[2]
    assert problems[3] is None


# ------------------------------------------------------------------ the daemon at the gateway


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A fresh gateway with fast protocol timers."""
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as proc:
        yield proc


def agent_record(gw: GatewayProcess, dk: str, agent_id: str) -> dict[str, Any]:
    """The agent's documented record from GET /r/agents."""
    with gw.client(dk) as http:
        listed = http.get("/r/agents").json()["agent_list"]
    found = [a for a in listed if a["agent_id"] == agent_id]
    assert found, listed
    return dict(found[0])


def start_gpu_agent(
    tmp_path: Path, gw: GatewayProcess, dk: str, env: dict[str, str], **extra: str
) -> AgentProcess:
    """An agent whose pynvml reads the fake library; waits until it is connected."""
    agent = start_agent(tmp_path / "agent", gw.url, dk, "gpu-node-01", extra_env={**env, **extra})
    try:
        agent.wait_log("connected to the gateway")
    except AssertionError:
        agent.stop()
        raise
    return agent


def test_hello_advertises_gpus_labels_and_region_at_the_gateway(
    fake_nvml_lib: Path, tmp_path: Path, gw: GatewayProcess
) -> None:
    """GET /r/agents shows the derived and configured labels, the region and the GPU devices."""
    dk = gw.credential("team-gpu")
    env = scenario_env(fake_nvml_lib, tmp_path, [RTX, H100])
    agent = start_gpu_agent(
        tmp_path, gw, dk, env, CYBERUN_AGENT_AGENT_LABELS="team-a", CYBERUN_AGENT_REGION=" EU-West "
    )
    try:
        inventory = agent.wait_log("GPU inventory")
        assert inventory["cuda_version"] == "12.4"
        found = agent_record(gw, dk, "gpu-node-01")
        labels = found["agent_labels"]
        assert labels[:4] == ["gpu", "rtx-4090", "h100", "vram-80gb"]
        assert "comfyui" in labels  # the scripted runtime offers the comfyui tool
        assert labels[-1] == "team-a"
        assert found["region"] == "eu-west"
        devices = found["system_stats"]["gpu_devices"]
        assert [d["device_name"] for d in devices] == [RTX.name, H100.name]
        assert devices[1]["vram_total"] == 80 * GIB
    finally:
        agent.stop()


def test_a_gpu_that_overheats_is_withdrawn_until_it_cools(
    fake_nvml_lib: Path, tmp_path: Path, gw: GatewayProcess
) -> None:
    """Too hot: status unhealthy with the reason and no gpu label; cooled down: idle again."""
    dk = gw.credential("team-gpu")
    scenario = tmp_path / "nvml.txt"
    env = nvml_env(fake_nvml_lib, write_scenario(scenario, [RTX]))
    agent = start_gpu_agent(tmp_path, gw, dk, env, CYBERUN_AGENT_GPU__MAX_TEMPERATURE_C="85")
    try:
        assert agent_record(gw, dk, "gpu-node-01")["agent_status"] == "idle"
        seen = len(agent.seen)
        write_scenario(scenario, [FakeGpu(**{**RTX.__dict__, "temp": 96})])
        warning = agent.wait_log("GPU not offered work", since=seen)
        assert "too hot: 96 °C" in warning["reason"]
        hot = wait_for(lambda: agent_record(gw, dk, "gpu-node-01"), "unhealthy")
        assert (
            "no usable GPU: GPU 0 (NVIDIA GeForce RTX 4090) is too hot"
            in hot["agent_status_reason"]
        )
        assert "gpu" not in hot["agent_labels"]
        assert "rtx-4090" not in hot["agent_labels"]
        seen = len(agent.seen)
        write_scenario(scenario, [RTX])
        agent.wait_log("GPU healthy again", since=seen)
        cool = wait_for(lambda: agent_record(gw, dk, "gpu-node-01"), "idle")
        assert "gpu" in cool["agent_labels"]
    finally:
        agent.stop()


def wait_for(
    read: Callable[[], dict[str, Any]], status: str, timeout: float = 15
) -> dict[str, Any]:
    """Re-read the agent record until it reports ``status`` (a hang guard, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if found["agent_status"] == status:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"agent never became {status}: {found}")
        time.sleep(0.1)  # the gateway learns it from the next status frame


def test_a_task_needing_more_free_vram_than_any_gpu_has_is_refused(
    fake_nvml_lib: Path, tmp_path: Path, gw: GatewayProcess
) -> None:
    """min_vram_gb above every GPU's free VRAM is rejected as insufficient_vram, never run."""
    dk = gw.credential("team-gpu")
    busy = FakeGpu(**{**RTX.__dict__, "used": 20 * GIB})  # 24 GiB card, 4 GiB free
    agent = start_gpu_agent(tmp_path, gw, dk, scenario_env(fake_nvml_lib, tmp_path, [busy]))
    try:
        workflow = gw.create_workflow(dk, {**script_workflow(), "min_vram_gb": 8})
        with gw.client(dk) as http:
            answer = http.post(f"/r/workflows/{workflow}/run", json={})
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        refused = agent.wait_log("task refused", task_id=task_id)
        assert "needs 8 GiB of free VRAM" in refused["reason"]
        assert "4.0 GiB" in refused["reason"]
        with gw.client(dk) as http:
            task = http.get(f"/r/tasks/{task_id}").json()
        assert task["task_status"] in {"pending", "waiting", "queued"}
        assert not any(r.get("event") == "task accepted" for r in agent.seen)
    finally:
        agent.stop()


def test_a_machine_without_a_driver_runs_cpu_only_and_says_so(
    tmp_path: Path, gw: GatewayProcess
) -> None:
    """No libnvidia-ml.so.1: one clear log line, no gpu label, no GPU devices, still idle."""
    if ctypes.util.find_library("nvidia-ml"):  # pragma: no cover - a host with a real driver
        pytest.skip("this machine has a real NVIDIA driver")
    empty = tmp_path / "no-driver"
    empty.mkdir()
    dk = gw.credential("team-cpu")
    agent = start_gpu_agent(tmp_path, gw, dk, {"LD_LIBRARY_PATH": str(empty)})
    try:
        line = agent.wait_log("no usable NVIDIA GPU; running CPU-only")
        assert line["reason"] == "no NVIDIA driver library (libnvidia-ml.so.1) found"
        found = agent_record(gw, dk, "gpu-node-01")
        assert found["agent_status"] == "idle"
        assert "gpu" not in found["agent_labels"]
        assert "comfyui" in found["agent_labels"]
        assert found["system_stats"]["gpu_devices"] == []
    finally:
        agent.stop()
