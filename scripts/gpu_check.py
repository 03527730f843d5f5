"""The GPU check behind ``scripts/gpu-check`` (run on an NVIDIA host; prints markdown).

1. NVML inventory through the official bindings (``pynvml`` from ``nvidia-ml-py``), then
   the agent's own capability probe (``cyberun-agent hardware --json``: GPUs, readings,
   health, labels) and ``cyberun-agent doctor`` against a real gateway.
2. The ComfyUI runtime on CUDA: a real gateway, a real agent launching ComfyUI without
   ``--cpu`` (``COMFYUI_MAIN``/``COMFYUI_PYTHON`` from the CUDA install), and the invert
   workflow at several sizes submitted over REST; per-task wall time and ComfyUI's devices.
3. A short real splatfacto run and its gaussian-splat export (Nerfstudio on CUDA torch).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.agent_process import start_agent
from tests.gateway_process import gateway
from tests.nerfstudio_scene import make_scene

SIZES = (512, 1024, 2048)
OBSERVE_PORT = 19464
RUNS = 3


def nvml_report() -> list[str]:
    """Driver, CUDA and per-GPU inventory as markdown lines."""
    import pynvml  # noqa: PLC0415 - only on NVIDIA hosts

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        lines = [f"- driver {driver}, CUDA {pynvml.nvmlSystemGetCudaDriverVersion_v2()}"]
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            lines.append(
                f"- GPU {index}: {pynvml.nvmlDeviceGetName(handle)}, "
                f"{memory.total / 2**30:.0f} GiB ({memory.free / 2**30:.0f} free), "
                f"compute {major}.{minor}, {pynvml.nvmlDeviceGetTemperature(handle, 0)} °C"
            )
        return lines
    finally:
        pynvml.nvmlShutdown()


def agent_command(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agent ARGS`` the way an owner would, on the real driver."""
    return subprocess.run(  # noqa: S603 - our own argv, no shell
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


def probe_report() -> list[str]:
    """The agent's capability probe: what it would advertise, as markdown."""
    done = agent_command("hardware", "--json")
    if done.returncode:
        return [f"- failed: hardware exited {done.returncode}: {done.stderr[-1000:]}"]
    report = json.loads(done.stdout)
    lines = [f"- nvml: {report['nvml']}", f"- labels: {', '.join(report['labels'])}"]
    lines += [
        f"- advertised GPU {gpu['index']}: {gpu['name']} {gpu['uuid']}, "
        f"{gpu['vram_total'] / 2**30:.1f} GiB, CC {gpu['compute_capability']}, "
        f"MIG {gpu['mig']}, PCI {gpu['pci_bus_id']}, power limit {gpu['power_limit_w']} W, "
        f"driver {gpu['driver_version']}, CUDA {gpu['cuda_version']}"
        for gpu in report["capability"]["gpus"]
    ]
    lines += ["", "```json", json.dumps(report["gpus"], indent=1), "```"]
    return lines


def doctor_report(work: Path) -> list[str]:
    """``cyberun-agent doctor`` against a real gateway with a good key."""
    with gateway(work / "doctor-gw") as gw:
        env = {
            "CYBERUN_AGENT_GATEWAY_URL": gw.url,
            "CYBERUN_AGENT_CREDENTIAL": gw.credential("gpu-check"),
            "CYBERUN_AGENT_STATE_DIR": str(work / "doctor-state"),
            "CYBERUN_AGENT_CACHE_DIR": str(work / "doctor-cache"),
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON": os.environ["COMFYUI_PYTHON"],
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN": os.environ["COMFYUI_MAIN"],
            "CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__ENABLED": "true",
            "CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__BIN_DIR": os.environ["NERFSTUDIO_BIN"],
        }
        done = agent_command("doctor", env=env)
    verdict = "failed" if done.returncode else "passed"
    return [f"- doctor {verdict} (exit {done.returncode})", "", "```", done.stdout.strip(), "```"]


def invert(size: int) -> dict[str, Any]:
    """The invert workflow at ``size`` x ``size``."""
    empty = {"width": size, "height": size, "batch_size": 1, "color": 0}
    save = {"images": ["5", 0], "filename_prefix": f"gpu{size}"}
    return {
        "3": {"class_type": "EmptyImage", "inputs": empty},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": save},
    }


def comfyui_report(work: Path) -> list[str]:
    """Run the workflow through gateway + agent + ComfyUI on CUDA; return markdown lines."""
    lines: list[str] = []
    with gateway(work / "gw") as gw:
        dk = gw.credential("gpu-check")
        env = {
            "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON": os.environ["COMFYUI_PYTHON"],
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN": os.environ["COMFYUI_MAIN"],
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PORT": "18188",
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__BASE_DIRECTORY": str(work / "comfy"),
            "CYBERUN_AGENT_TIMEOUTS__RUNTIME_READY_S": "600",
            "CYBERUN_AGENT_OBSERVE__LISTEN": f"127.0.0.1:{OBSERVE_PORT}",
        }
        started = time.monotonic()
        agent = start_agent(work / "agent", gw.url, dk, "gpu-check", extra_env=env)
        try:
            agent.wait_log("ComfyUI is ready", timeout=600)
            agent.wait_log("connected to the gateway", timeout=60)
            lines.append(f"- ComfyUI launched and ready in {time.monotonic() - started:.1f} s")
            stats = httpx.get("http://127.0.0.1:18188/system_stats").json()
            lines += [
                f"- ComfyUI device: {device.get('name')} ({device.get('type')})"
                for device in stats.get("devices", [])
            ]
            lines += ["", "| size | runs | median s | min s | status |", "|---|---|---|---|---|"]
            for size in SIZES:
                lines.append(_run_size(gw, dk, agent, size))
            lines += ["", *metrics_report()]
        finally:
            agent.stop()
    return lines


def metrics_report() -> list[str]:
    """The agent's /metrics GPU gauges and task counters, scraped after the runs."""
    text = httpx.get(f"http://127.0.0.1:{OBSERVE_PORT}/metrics", timeout=10).text
    wanted = ("cyberun_agent_gpu_", "cyberun_agent_tasks_total", "cyberun_agent_uploaded_bytes")
    kept = [line for line in text.splitlines() if line.startswith(wanted)]
    return ["/metrics after the runs (GPU gauges from the real NVML):", "", "```", *kept, "```"]


def _run_size(gw: Any, dk: str, agent: Any, size: int) -> str:
    workflow = gw.create_workflow(dk, {"name": f"gpu-{size}", "workflow_json": invert(size)})
    times, statuses = [], set()
    with gw.client(dk) as http:
        for _ in range(RUNS):
            begun = time.monotonic()
            task_id = http.post(f"/r/workflows/{workflow}/run").json()["task_id"]
            agent.wait_log("report acknowledged", task_id=task_id, timeout=600)
            times.append(time.monotonic() - begun)
            statuses.add(http.get(f"/r/tasks/{task_id}").json()["task_status"])
    status = ",".join(sorted(statuses))
    return f"| {size}² | {RUNS} | {statistics.median(times):.2f} | {min(times):.2f} | {status} |"


def splatfacto_report(work: Path) -> list[str]:
    """A short real splatfacto run (CUDA) and its gaussian-splat export, timed."""
    bin_dir = Path(os.environ["NERFSTUDIO_BIN"])
    env = {**os.environ, "TORCH_HOME": os.environ["NERFSTUDIO_TORCH_HOME"], "MPLBACKEND": "Agg"}
    env |= {
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    scene = make_scene(work / "scene", images=24, size=128)
    train = [
        str(bin_dir / "ns-train"), "splatfacto", "--max-num-iterations", "300",
        "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
        "--output-dir", str(work / "out"), "--experiment-name", "gpu", "--timestamp", "run",
        "nerfstudio-data", "--data", str(scene),
    ]  # fmt: skip
    lines = []
    started = time.monotonic()
    trained = subprocess.run(  # noqa: S603 - our own argv, no shell
        train, env=env, capture_output=True, text=True, check=False, timeout=1800
    )
    took = time.monotonic() - started
    lines.append(
        f"- ns-train splatfacto, 300 iterations: exit {trained.returncode} in {took:.1f} s"
    )
    config = work / "out" / "gpu" / "splatfacto" / "run" / "config.yml"
    export = [
        str(bin_dir / "ns-export"),
        "gaussian-splat",
        "--load-config",
        str(config),
        "--output-dir",
        str(work / "export"),
    ]
    started = time.monotonic()
    exported = subprocess.run(  # noqa: S603 - our own argv, no shell
        export, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    took = time.monotonic() - started
    splat = work / "export" / "splat.ply"
    size = splat.stat().st_size if splat.exists() else 0
    lines.append(
        f"- ns-export gaussian-splat: exit {exported.returncode} in {took:.1f} s, "
        f"splat.ply {size} bytes"
    )
    if trained.returncode or exported.returncode:
        lines.append("- failed: " + (trained.stderr + exported.stderr)[-2000:].replace("\n", " | "))
    return lines


def main() -> int:
    """Print the report; non-zero when a task did not complete."""
    report = [f"## GPU check ({time.strftime('%Y-%m-%d')}, {platform.node()})", "", "### NVML", ""]
    report += nvml_report()
    report += ["", "### The agent's capability probe", ""]
    report += probe_report()
    with tempfile.TemporaryDirectory(prefix="cyberun-gpu-check-") as work:
        report += ["", "### cyberun-agent doctor", ""]
        report += doctor_report(Path(work))
        report += ["", "### ComfyUI on CUDA through gateway + agent", ""]
        report += comfyui_report(Path(work))
        report += ["", "### splatfacto (Nerfstudio 3DGS) on CUDA", ""]
        report += splatfacto_report(Path(work))
    print("\n".join(report))
    return 0 if all("failed" not in line for line in report) else 1


if __name__ == "__main__":
    sys.exit(main())
