"""``dispatch_target: comfy_cloud``: the gateway runs such tasks itself.

It drives a ComfyUI-compatible cloud endpoint with the same driver the agent uses
(``agent.runtimes.comfyui``).

One coroutine per task, owned by :class:`CloudRunner`'s TaskGroup. The task goes
``queued → running → completed | failed | cancelled`` like an agent task; inputs are read
from and outputs written to the gateway's object storage through presigned URLs, keyed
``tasks/<task_id>/<name>`` like agent outputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import structlog

from agent.runtimes.base import (
    Injection,
    Output,
    Progress,
    Stream,
    TaskFailure,
    TaskInterrupted,
    TaskSpec,
)
from agent.runtimes.comfyui.runtime import ComfyUIRuntime
from gateway.config import GatewayConfig
from gateway.models import DispatchTarget, TaskStatus
from gateway.storage import ObjectStorage
from gateway.store import Store, TaskRow
from gateway.tasks import TaskService

log = structlog.get_logger("gateway.cloud")
CLOUD_AGENT_KEY = "cloud/comfy_cloud"


class _Events:
    """Runtime events of one cloud task: progress to the task, outputs collected."""

    def __init__(self, runner: CloudRunner, task_id: str) -> None:
        self.runner = runner
        self.task_id = task_id

    def progress(self, progress: Progress) -> None:
        task = self.runner.store.task(self.task_id)
        data = {"progress": progress.progress, "current_node": progress.current_node}
        data |= {"step_current": progress.step_current, "step_total": progress.step_total}
        self.runner.tasks.progress(task, {k: v for k, v in data.items() if v is not None})

    def log(self, stream: Stream, line: str) -> None:
        log.debug("cloud task log", task_id=self.task_id, stream=stream, line=line[:500])

    def output(self, output: Output) -> None:
        """Outputs are uploaded once the run ends (the cloud run is short-lived)."""

    def handle(self, data: Mapping[str, Any]) -> None:
        """Nothing to journal: a gateway restart re-queues the task."""


class CloudRunner:
    """Runs comfy_cloud tasks (see the module docstring)."""

    def __init__(
        self, config: GatewayConfig, store: Store, tasks: TaskService, storage: ObjectStorage
    ) -> None:
        """Prepare the driver; nothing runs until :meth:`run`."""
        assert config.comfy_cloud_url is not None  # noqa: S101 - built only when configured
        headers = (
            {"Authorization": f"Bearer {config.comfy_cloud_key}"} if config.comfy_cloud_key else {}
        )
        self.runtime = ComfyUIRuntime.attach(config.comfy_cloud_url, headers=headers)
        self.config = config
        self.store = store
        self.tasks = tasks
        self.storage = storage
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}

    def wake(self) -> None:
        """A comfy_cloud task may be waiting."""
        self._wake.set()

    def cancel(self, task_id: str) -> None:
        """Stop a running cloud task (its status is set by the caller)."""
        running = self._running.get(task_id)
        if running is not None:
            running.cancel()

    async def run(self) -> None:
        """Start every pending comfy_cloud task; runs until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    self._wake.clear()
                    for task in self.store.tasks_in({TaskStatus.PENDING}):
                        if (
                            task.dispatch_target is DispatchTarget.COMFY_CLOUD
                            and task.id not in self._running
                        ):
                            self._running[task.id] = group.create_task(self._execute(task))
                    await self._wake.wait()
        finally:
            await self.runtime.close()

    async def _execute(self, task: TaskRow) -> None:
        queued = self.tasks.assign(task, CLOUD_AGENT_KEY, ["comfy_cloud"], None)
        running = self.tasks.start(queued, self.config.timeouts.lease_ttl_s) if queued else None
        try:
            if running is not None:
                await self._run(running)
        except asyncio.CancelledError:
            if running is not None:
                await self._interrupt(running)
            raise
        finally:
            self._running.pop(task.id, None)

    async def _run(self, task: TaskRow) -> None:
        with tempfile.TemporaryDirectory(prefix="cyberun-cloud-") as scratch:
            workspace = Path(scratch)
            try:
                outputs = await self._produce(task, workspace)
                stored = [await self._store(task, output) for output in outputs]
            except TaskInterrupted:
                self.tasks.cancel(self.store.task(task.id), "interrupted on comfy_cloud")
                return
            except TaskFailure as failure:
                where = f" (node {failure.node_id})" if failure.node_id else ""
                self.tasks.fail(
                    self.store.task(task.id), f"{failure.code}: {failure.message}{where}"
                )
                return
            except (httpx.HTTPError, OSError) as exc:
                self.tasks.fail(
                    self.store.task(task.id), f"comfy_cloud transfer failed: {type(exc).__name__}"
                )
                return
        self.tasks.complete(self.store.task(task.id), stored)

    async def _produce(self, task: TaskRow, workspace: Path) -> list[Output]:
        payload = task.payload
        inputs = await self._inputs(payload.get("inputs", []), workspace)
        spec = TaskSpec(
            task_id=task.id,
            attempt=max(0, task.attempt),
            tool="comfyui",
            pool=task.target_pool.value,
            workflow=payload["workflow"],
            injections=tuple(Injection(**i) for i in payload.get("injections", [])),
            inputs=inputs,
            timeout_s=float(task.task_timeout),
        )
        await self.runtime.prepare(spec, workspace)
        timeout = task.task_timeout or None
        try:
            return await asyncio.wait_for(
                self.runtime.run(spec, workspace, _Events(self, task.id)), timeout
            )
        except TimeoutError:
            await self.runtime.interrupt(spec)
            raise TaskFailure(
                "timeout", f"the task exceeded its timeout of {task.task_timeout} s"
            ) from None

    async def _inputs(self, items: list[dict[str, Any]], workspace: Path) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            for item in items:
                url, _ = self.storage.presign_get(item["file_key"], expires_s=600)
                dest = workspace / "inputs" / item["file_key"].rsplit("/", 1)[-1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                response = await http.get(url)
                response.raise_for_status()
                await asyncio.to_thread(dest.write_bytes, response.content)
                paths[item["key"]] = dest
        return paths

    async def _store(self, task: TaskRow, output: Output) -> dict[str, Any]:
        """Upload one output (read whole: cloud outputs are single images or clips)."""
        data = await asyncio.to_thread(output.path.read_bytes)
        key = f"tasks/{task.id}/{output.path.name}"
        put = self.storage.presign_put(
            key, size=len(data), content_type=output.content_type, expires_s=600
        )
        async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
            response = await http.put(put.url, content=data, headers=put.headers)
        response.raise_for_status()
        digest = hashlib.sha256(data).hexdigest()
        return {
            "key": output.key,
            "storage_key": key,
            "size": len(data),
            "sha256": digest,
            "content_type": output.content_type,
        }

    async def _interrupt(self, task: TaskRow) -> None:
        spec = TaskSpec(
            task_id=task.id, attempt=task.attempt, tool="comfyui", pool="team", workflow={}
        )
        try:
            await asyncio.shield(self.runtime.interrupt(spec))
        except (TaskFailure, asyncio.CancelledError):
            log.warning("could not interrupt a cloud task", task_id=task.id)
