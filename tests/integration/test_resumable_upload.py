"""A multipart output upload cut off midway resumes without re-sending finished parts.

The task runner is driven directly (its host backed by a simulated agent on the real
gateway), with a real HTTP transport that refuses one part, as a network fault would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.protocol.messages import (
    ErrorInfo,
    LogLine,
    OutputFile,
    TaskPhase,
    TaskRef,
    TaskUploadUrls,
    Timings,
    UploadFile,
)
from agent.runtimes.base import Output, Progress, RuntimeEvents, TaskSpec
from agent.settings import load_settings
from agent.tasks.runner import Resume, TaskRunner
from tests.gateway_process import FAST_TIMEOUTS, comfy_workflow, gateway
from tests.simagent import SimAgent

MIB = 1024 * 1024
SIZE = 12 * MIB  # three parts of 5 MiB, 5 MiB and 2 MiB


class Host:
    """A runner host that forwards upload requests to a simulated agent and records the rest."""

    def __init__(self, agent: SimAgent) -> None:
        """Forward to ``agent``."""
        self.agent = agent
        self.handle: dict[str, Any] = {}
        self.outcome: tuple[str, Any] | None = None

    def set_phase(self, task: TaskRef, phase: TaskPhase) -> None:
        """Ignored."""

    def set_handle(self, task: TaskRef, handle: Mapping[str, Any]) -> None:
        """Keep a deep copy, as the journal would."""
        self.handle = _copy(handle)

    def send_progress(self, task: TaskRef, progress: Progress) -> None:
        """Ignored."""

    def send_log(self, task: TaskRef, lines: list[LogLine], dropped: int) -> None:
        """Ignored."""

    async def upload_urls(self, task: TaskRef, files: list[UploadFile]) -> TaskUploadUrls:
        """Ask the gateway through the simulated agent's session."""
        return await self.agent.upload_urls(task, files)

    def output_uploaded(self, task: TaskRef, output: OutputFile) -> None:
        """Ignored (the handle has what matters)."""

    def complete(self, task: TaskRef, outputs: list[OutputFile], timings: Timings) -> None:
        """Record success."""
        self.outcome = ("complete", outputs)

    def fail(
        self, task: TaskRef, error: ErrorInfo, outputs: list[OutputFile], timings: Timings
    ) -> None:
        """Record failure."""
        self.outcome = ("fail", error)

    def cancelled(
        self, task: TaskRef, reason: str, outputs: list[OutputFile], timings: Timings
    ) -> None:
        """Record cancellation."""
        self.outcome = ("cancelled", reason)


class OneFileRuntime:
    """Writes one 12 MiB output (its content is fixed by the test)."""

    tool = "comfyui"
    version: str | None = None

    def __init__(self, data: bytes) -> None:
        """Produce ``data``."""
        self.data = data

    async def start(self) -> None:
        """Nothing to start."""

    async def healthy(self) -> bool:
        """Ready."""
        return True

    async def prepare(self, spec: TaskSpec, workspace: Path) -> None:
        """Nothing to stage."""

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Write the output file."""
        path = workspace / "big.bin"
        path.write_bytes(self.data)
        return [Output("9.files.0", path, "application/octet-stream")]

    async def interrupt(self, spec: TaskSpec) -> None:
        """Nothing to interrupt."""

    async def resume(
        self, spec: TaskSpec, workspace: Path, handle: Mapping[str, Any], events: RuntimeEvents
    ) -> None:
        """Cannot re-attach."""

    async def close(self) -> None:
        """Nothing held."""


class PartLog:
    """Counts part PUTs and, while ``refuse`` is set, fails that part like a dropped link."""

    def __init__(self, refuse: str | None) -> None:
        """Refuse the part numbered ``refuse`` (``None``: refuse nothing)."""
        self.refuse = refuse
        self.parts: list[str] = []

    async def __call__(self, request: httpx.Request) -> None:
        """Event hook on every request."""
        part = request.url.params.get("part") or request.url.params.get("partNumber")
        if request.method == "PUT" and part:
            self.parts.append(part)
            if part == self.refuse:
                raise httpx.ConnectError("injected: link dropped", request=request)


def _restore(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@pytest.mark.asyncio
async def test_a_cut_multipart_upload_resumes_with_only_the_missing_part(tmp_path: Path) -> None:
    """After a failed part, a resumed runner sends only that part and the object is intact."""
    data = os.urandom(SIZE)
    settings = load_settings(
        environ={"HOME": str(tmp_path), "CYBERUN_AGENT_WORK_DIR": str(tmp_path / "work")}
    ).settings
    multipart = ("--multipart-threshold-mb", "8", "--part-size-mb", "5")
    with gateway(tmp_path / "gw", *multipart, *FAST_TIMEOUTS) as gw:
        dk = gw.credential("resume")
        workflow = gw.create_workflow(dk, comfy_workflow())
        async with SimAgent(gw.ws_url, dk, "uploader") as agent:
            with gw.client(dk) as http:
                task_id = http.post(f"/r/workflows/{workflow}/run").json()["task_id"]
            assign = await agent.next_assign()
            host = Host(agent)
            faulty = PartLog(refuse="3")
            async with httpx.AsyncClient(event_hooks={"request": [faulty]}) as client:
                first = TaskRunner(assign, OneFileRuntime(data), host, client, settings)
                await first.run()
            assert host.outcome is not None
            assert host.outcome[0] == "fail"
            assert host.handle["multipart"]["9.files.0"]["parts"].keys() == {"1", "2"}

            # the workspace a crashed agent would have kept
            await asyncio.to_thread(_restore, Path(host.handle["outputs"][0]["path"]), data)
            healthy = PartLog(refuse=None)
            resume = Resume(phase=TaskPhase.UPLOADING, handle=host.handle, outputs=[])
            async with httpx.AsyncClient(event_hooks={"request": [healthy]}) as client:
                second = TaskRunner(
                    assign, OneFileRuntime(data), host, client, settings, resume=resume
                )
                await second.run()
            assert healthy.parts == ["3"]  # parts 1 and 2 were not sent again
            assert host.outcome is not None
            assert host.outcome[0] == "complete"
            outputs: list[OutputFile] = host.outcome[1]
            await agent.complete(TaskRef(task_id=task_id, attempt=assign.attempt), outputs)
            await agent.wait_acknowledged()
            with gw.client(dk) as http:
                result = http.get(f"/r/tasks/{task_id}/result").json()
            assert result["task_status"] == "completed", result
            body = httpx.get(result["download_urls"]["9.files.0"]).content
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
