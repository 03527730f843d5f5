"""The README's demo command, run for real: gateway + agent + a ComfyUI the agent launches.

``python -m demo`` is what ``scripts/demo`` runs once the venv and the CPU ComfyUI are in
place; here it gets the test session's ComfyUI installation. Every process the demo starts
must be gone when it ends, whether it finished or was interrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from demo.png import size_of
from tests.agent_process import ROOT
from tests.comfyui import ComfyUIServer
from tests.streams import Lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Demo:
    """A running ``python -m demo`` in a session of its own (as a terminal would run it)."""

    def __init__(self, comfyui: ComfyUIServer, data_dir: Path, *args: str) -> None:
        """Start it; its stdout lines are collected as they come."""
        self.data_dir = data_dir
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "COMFYUI_PYTHON": str(comfyui.install.python),
            "COMFYUI_MAIN": str(comfyui.install.main),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "demo", "--data-dir", str(data_dir), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self.lines = Lines(self.process.stdout)

    @property
    def out(self) -> str:
        """What the demo printed so far."""
        return self.lines.text

    def wait_line(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """Wait for a line of the demo's output matching ``pattern``."""
        return self.lines.wait(pattern, timeout)

    def ctrl_c(self) -> None:
        """What Ctrl-C in a terminal does: SIGINT to the foreground process group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the exit; return its code and all it printed."""
        code = self.process.wait(timeout=timeout)
        return code, self.lines.rest()

    def kill(self) -> None:
        """Make sure the demo itself is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def demo(comfyui: ComfyUIServer, data_dir: Path, *args: str) -> Iterator[Demo]:
    """Run the demo; kill it (and, failing the test, what it left) at the end."""
    running = Demo(comfyui, data_dir, *args)
    try:
        yield running
    finally:
        running.kill()
        leftovers = processes_of(data_dir)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)


def processes_of(data_dir: Path, *, environ: bool = True) -> list[int]:
    """Pids whose command line (or environment) names ``data_dir``: the demo's processes."""
    marker = str(data_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "cmdline").read_bytes()
            if environ:
                seen += (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if marker in seen:
            found.append(int(entry.name))
    return found


def test_the_demo_runs_a_workflow_end_to_end_and_cleans_up(
    tmp_path: Path, comfyui: ComfyUIServer
) -> None:
    """Upload, run with an override, follow the events, download the result; no process left."""
    out = tmp_path / "out"
    with demo(comfyui, tmp_path / "data", "--output", str(out)) as running:
        code, printed = running.finish(timeout=240)
    assert code == 0, printed
    assert re.search(r"gateway listening on http://127\.0\.0\.1:\d+", printed)
    assert '"blur_radius": 4' in printed
    assert "status: running" in printed
    assert re.search(r"\]\s+\d+%\s+node \d+", printed)  # the progress bar moved
    saved = re.search(r"==> saved (\S+)", printed)
    assert saved, printed
    picture = Path(saved.group(1))
    assert picture.parent.parent == out
    assert size_of(picture.read_bytes()) == (256, 160)  # 320x200 scaled to width 256
    assert processes_of(tmp_path / "data") == []


def test_ctrl_c_while_comfyui_starts_leaves_no_process(
    tmp_path: Path, comfyui: ComfyUIServer
) -> None:
    """Ctrl-C once the managed ComfyUI is starting stops everything; exit 130."""
    data = tmp_path / "data"
    with demo(comfyui, data) as running:
        running.wait_line("starting the agent")
        deadline = time.monotonic() + 60
        while not processes_of(data / "comfyui", environ=False):
            assert time.monotonic() < deadline, "ComfyUI never started"
            time.sleep(0.05)  # watching for another process to appear: no event to await
        running.ctrl_c()
        code, printed = running.finish()
    assert code == 130, printed
    assert "interrupted: stopping the agent and the gateway" in printed
    assert processes_of(data) == []


def test_serve_mode_prints_a_curl_example_that_works(
    tmp_path: Path, comfyui: ComfyUIServer
) -> None:
    """--serve keeps the stack up; the printed curl lines run the workflow to completion."""
    data = tmp_path / "data"
    with demo(comfyui, data, "--serve") as running:
        running.wait_line(r"curl -s \{?.*/result")
        printed = running.out
        script = "\n".join(
            line.strip()
            for line in printed.split("(paste into a shell):", 1)[1].splitlines()
            if line.startswith("  ")
        )
        done = subprocess.run(
            ["bash", "-c", f"set -e\n{script}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "event: completed" in done.stdout
        result = json.loads(done.stdout.strip().rsplit("\n", 1)[-1])  # the last curl's answer
        assert result["task_status"] == "completed"
        picture = httpx.get(result["download_urls"]["9.images.0"]).content
        assert size_of(picture) == (256, 160)
        running.ctrl_c()
        code, _ = running.finish()
    assert code == 130
    assert processes_of(data) == []
