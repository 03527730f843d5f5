"""The GPU check behind ``scripts/gpu-check`` (run on an NVIDIA host; prints markdown).

1. NVML inventory through the official bindings (``pynvml`` from ``nvidia-ml-py``).
2. The ComfyUI runtime on CUDA: a real gateway, a real agent launching ComfyUI without
   ``--cpu`` (``COMFYUI_MAIN``/``COMFYUI_PYTHON`` from the CUDA install), and the invert
   workflow at several sizes submitted over REST; per-task wall time and ComfyUI's devices.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.agent_process import start_agent
from tests.gateway_process import gateway

SIZES = (512, 1024, 2048)
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
        finally:
            agent.stop()
    return lines


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


def main() -> int:
    """Print the report; non-zero when a task did not complete."""
    report = [f"## GPU check ({time.strftime('%Y-%m-%d')}, {platform.node()})", "", "### NVML", ""]
    report += nvml_report()
    report += ["", "### ComfyUI on CUDA through gateway + agent", ""]
    with tempfile.TemporaryDirectory(prefix="cyberun-gpu-check-") as work:
        report += comfyui_report(Path(work))
    print("\n".join(report))
    return 0 if all("failed" not in line for line in report) else 1


if __name__ == "__main__":
    sys.exit(main())
