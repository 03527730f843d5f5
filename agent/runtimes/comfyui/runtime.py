"""The ComfyUI runtime: runs a task's API-format graph on a real ComfyUI server.

Attach to ``runtimes.comfyui.url`` or launch and supervise ComfyUI
(``runtimes.comfyui.launch``). Per task:

- **prepare**: injections applied to the graph (nodes and fields must exist), file inputs
  uploaded through ``/upload/image`` and substituted, every ``class_type`` checked against
  ``/object_info`` — so a bad graph fails before anything runs;
- **run**: the ``/ws`` stream opened with the task's client id BEFORE ``POST /prompt`` with
  a prompt id derived from task id + attempt (journaled: a restarted agent finds the same
  prompt again); task progress is nodes done (``executing``, ``execution_cached``) plus the
  running node's own steps (``progress``), over all nodes; ``executed`` → outputs downloaded via
  ``/view`` and handed over for upload at once; ``/history`` is the truth (read after
  ``executing {node: null}``, and polled when the WebSocket drops);
- **interrupt**: ``/interrupt`` when running, ``/queue`` delete when pending;
- **resume**: a prompt still queued or running is followed again; a finished one has its
  outputs collected; a prompt ComfyUI no longer knows cannot be resumed;
- **purge** (community tasks, :class:`~agent.runtimes.base.Purging`): the inputs uploaded
  for the prompt (remembered, and after a restart found by their ``<prompt_id[:8]>-`` name
  prefix), every ``output``/``temp`` file its ``/history`` entry (or an ``executed`` event)
  names, and the history entry itself are removed. Files only where the server's
  directories are known (launch mode; ``runtimes.comfyui.directory`` when attached), each
  path checked to lie inside its directory (:mod:`~agent.runtimes.comfyui.cleanup`).

Private (community) tasks log ids and counts only, and the launched ComfyUI's own output is
kept out of the agent's log while their prompt holds the server (it prints file names and
error details).
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import structlog

from agent.runtimes.base import (
    Injection,
    Output,
    Progress,
    RuntimeEvents,
    TaskFailure,
    TaskInterrupted,
    TaskSpec,
)
from agent.runtimes.comfyui.cleanup import Removed, remove_prompt_files
from agent.runtimes.comfyui.client import ComfyClient, ComfyError, EventStream, PromptRejectedError
from agent.runtimes.comfyui.servers import Server, ServerPool
from agent.runtimes.comfyui.workflow import (
    OutputRef,
    apply_injections,
    execution_failure,
    output_refs,
    prompt_id_for,
    prompt_rejection,
    unknown_classes,
)

log = structlog.get_logger("agent.comfyui")
T = TypeVar("T")
OBJECT_INFO_TTL_S = 60.0
HISTORY_POLL_S = 0.5
SILENCE_S = 5.0
"""After this long without a WebSocket event, ``/history`` is asked whether the prompt ended."""
WS_REGISTER_S = 10.0
HISTORY_AFTER_SUCCESS_S = 10.0
PURGE_SETTLE_S = 10.0
"""How long a purge waits for a prompt still running (interrupted) to end before removing."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class _Trace:
    """What a private prompt left in ComfyUI, for :meth:`ComfyUIRuntime.purge`."""

    server: Server | None = None
    uploaded: set[str] = field(default_factory=set)
    refs: set[OutputRef] = field(default_factory=set)


@dataclass
class _Run:
    prompt_id: str
    workspace: Path
    events: RuntimeEvents
    client: ComfyClient
    collected: dict[str, Output] = field(default_factory=dict)
    current: str | None = None
    nodes: int = 0
    """Nodes in the prompt: progress is node-level, refined by a node's own steps."""
    done: set[str] = field(default_factory=set)
    """Nodes finished or taken from ComfyUI's cache."""
    trace: _Trace | None = None
    """Set for a private task: every file seen is remembered for the purge."""


class ComfyUIRuntime:
    """See the module docstring."""

    tool = "comfyui"

    def __init__(self, pool: ServerPool, *, ready_timeout: float = 120.0) -> None:
        """Run tasks on the servers of ``pool``."""
        self.pool = pool
        self.ready_timeout = ready_timeout
        self.version: str | None = None
        self.pytorch_version: str | None = None
        self.devices: list[dict[str, Any]] = []
        """``/system_stats`` devices (name, type, vram_total, vram_free) of the first server."""
        self._object_info: tuple[float, dict[str, Any]] | None = None
        self._graphs: dict[str, dict[str, Any]] = {}
        self._traces: dict[str, _Trace] = {}
        """Private prompts not yet purged."""

    @classmethod
    def attach(
        cls,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        ready_timeout: float = 120.0,
        directory: Path | None = None,
    ) -> ComfyUIRuntime:
        """Use a ComfyUI someone else runs (``headers``: e.g. a cloud API key).

        ``directory`` is its base directory (``input/``, ``output/``, ``temp/``), where a
        purge removes files; without it a purge only forgets the history entry.
        """
        return cls(ServerPool.attach(url, headers, directory), ready_timeout=ready_timeout)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Launch the supervised servers (launch mode) and wait for them; read versions."""
        for server in self.pool.servers:
            await server.start(self.ready_timeout)
        try:
            stats = await self.pool.any.system_stats()
        except ComfyError:
            return
        system = stats.get("system") or {}
        self.version = str(system.get("comfyui_version") or "") or None
        self.pytorch_version = str(system.get("pytorch_version") or "") or None
        self.devices = [d for d in stats.get("devices") or [] if isinstance(d, dict)]

    async def healthy(self) -> bool:
        """Every server answers (a crashed one makes the agent unhealthy until it is back)."""
        checks = await asyncio.gather(*(server.healthy() for server in self.pool.servers))
        return all(checks)

    async def close(self) -> None:
        """Stop the supervised servers side by side (each may take its graces); close clients."""
        await asyncio.gather(*(server.close() for server in self.pool.servers))

    # ------------------------------------------------------------------ tasks

    async def prepare(self, spec: TaskSpec, workspace: Path) -> None:
        """Apply injections and check node classes (before anything runs or is uploaded)."""
        del workspace  # ComfyUI reads its inputs from its own input/ directory
        prompt_id = prompt_id_for(spec.task_id, spec.attempt)
        graph = apply_injections(spec.workflow, [i for i in spec.injections if i.type != "file"])
        files = [i for i in spec.injections if i.type == "file"]
        apply_injections(graph, [replace(i, value="") for i in files])  # targets must exist
        missing = unknown_classes(graph, await self._classes())
        if missing:
            node_id, class_type = missing[0]
            raise TaskFailure(
                "unsupported_node",
                f"node {node_id}: class_type {class_type!r} is not installed",
                node_id=node_id,
            )
        self._graphs[prompt_id] = graph

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Queue the graph on a free server and follow it to its end; return every output."""
        prompt_id = prompt_id_for(spec.task_id, spec.attempt)
        if prompt_id not in self._graphs:
            await self.prepare(spec, workspace)
        graph = self._graphs.pop(prompt_id)
        client = await self.pool.acquire(prompt_id)
        trace = self._trace(spec, prompt_id)
        try:
            uploads = await self._upload_inputs(client, spec, prompt_id, trace)
            graph = apply_injections(graph, uploads)
            run = _Run(prompt_id, workspace / "outputs", events, client, nodes=len(graph))
            run.trace = trace
            run.workspace.mkdir(parents=True, exist_ok=True)
            events.handle({"prompt_id": prompt_id})
            async with _events_or_none(client, prompt_id) as stream:
                if stream is not None:
                    await stream.registered(WS_REGISTER_S)
                await self._submit(client, graph, prompt_id)
                log.info("ComfyUI prompt queued", task_id=spec.task_id, prompt_id=prompt_id)
                if stream is not None:
                    await self._follow(stream, run)
            return await self._finish(run)
        finally:
            await self.pool.release(prompt_id)

    def _trace(self, spec: TaskSpec, prompt_id: str) -> _Trace | None:
        """Start remembering a private prompt's files (and keep ComfyUI's output private)."""
        if not spec.private:
            return None
        trace = self._traces.setdefault(prompt_id, _Trace())
        trace.server = self.pool.server_of(prompt_id) or trace.server
        if trace.server is not None and trace.server.process is not None:
            trace.server.process.withhold(prompt_id)
        return trace

    async def _upload_inputs(
        self, client: ComfyClient, spec: TaskSpec, prompt_id: str, trace: _Trace | None
    ) -> list[Injection]:
        """Upload file inputs to the server's input/ and inject their names there."""
        injections = []
        for injection in spec.injections:
            if injection.type == "file" and injection.key in spec.inputs:
                path = spec.inputs[injection.key]
                name = f"{_input_prefix(prompt_id)}{_UNSAFE.sub('_', path.name)}"
                if trace is not None:
                    trace.uploaded.add(name)  # before: the upload may land, its answer not
                uploaded = await self._comfy(client.upload_image(path, name))
                if trace is not None:
                    trace.uploaded.add(uploaded)
                injections.append(replace(injection, value=uploaded))
        return injections

    async def _submit(self, client: ComfyClient, graph: dict[str, Any], prompt_id: str) -> None:
        """``POST /prompt``; a partly invalid graph (which ComfyUI would run in part) is refused."""
        try:
            queued = await client.post_prompt(graph, prompt_id, prompt_id)
        except PromptRejectedError as rejected:
            raise prompt_rejection(rejected.body) from None
        except ComfyError as exc:
            raise TaskFailure("runtime_unavailable", str(exc), retryable=True) from exc
        if queued.get("node_errors"):
            await self._comfy(client.delete_pending(prompt_id))
            await self._comfy(client.interrupt(prompt_id))
            raise prompt_rejection(queued)

    async def interrupt(self, spec: TaskSpec) -> None:
        """Interrupt the running prompt, or drop it from the queue if it has not started."""
        prompt_id = prompt_id_for(spec.task_id, spec.attempt)
        client = self.pool.held(prompt_id)
        if client is None:
            return
        state = await self._comfy(client.queue_state(prompt_id))
        if state == "running":
            await self._comfy(client.interrupt(prompt_id))
        elif state == "pending":
            await self._comfy(client.delete_pending(prompt_id))

    async def resume(
        self, spec: TaskSpec, workspace: Path, handle: Mapping[str, Any], events: RuntimeEvents
    ) -> list[Output] | None:
        """Re-attach to the journaled prompt on whichever server still knows it."""
        prompt_id = str(handle.get("prompt_id") or prompt_id_for(spec.task_id, spec.attempt))
        client = await self._find(prompt_id)
        if client is None:
            return None
        await self.pool.adopt(prompt_id, client)
        try:
            run = _Run(prompt_id, workspace / "outputs", events, client)
            run.trace = self._trace(spec, prompt_id)
            run.workspace.mkdir(parents=True, exist_ok=True)
            log.info("re-attached to a ComfyUI prompt", prompt_id=prompt_id)
            return await self._finish(run)
        finally:
            await self.pool.release(prompt_id)

    async def _find(self, prompt_id: str) -> ComfyClient | None:
        for server in self.pool.servers:
            try:
                if await server.client.history(prompt_id) is not None:
                    return server.client
                if await server.client.queue_state(prompt_id) is not None:
                    return server.client
            except ComfyError:
                continue
        return None

    # ------------------------------------------------------------------ following

    async def _follow(self, stream: EventStream, run: _Run) -> None:
        """Follow WebSocket events until ``executing {node: null}`` for our prompt.

        After ``SILENCE_S`` without an event ``/history`` is asked (it is the truth; the
        socket only speeds things up); if the socket ends, ``_finish`` polls instead.
        """
        while True:
            try:
                event = await asyncio.wait_for(stream.next(), SILENCE_S)
            except TimeoutError:
                if await self._done(run):
                    return
                state = await self._comfy(run.client.queue_state(run.prompt_id))
                log.info("no ComfyUI event lately", prompt_id=run.prompt_id, queue=state)
                continue
            if event is None:
                log.warning(
                    "ComfyUI event stream ended; following /history", prompt_id=run.prompt_id
                )
                return
            if await self._on_event(run, event):
                return

    async def _on_event(self, run: _Run, event: Mapping[str, Any]) -> bool:
        """Apply one event of our prompt; True when the prompt has ended."""
        kind, data = event.get("type"), event.get("data") or {}
        log.debug(
            "ComfyUI event",
            kind=kind,
            prompt_id=data.get("prompt_id") if isinstance(data, dict) else None,
        )
        if not isinstance(data, dict) or data.get("prompt_id", run.prompt_id) != run.prompt_id:
            return False
        if kind == "executing":
            if run.current is not None:
                run.done.add(run.current)
            run.current = data.get("node")
            if run.current is None:
                return True
            run.events.progress(_progress({}, run))
        elif kind == "execution_cached":
            run.done.update(str(node) for node in data.get("nodes") or [])
        elif kind == "progress":
            run.events.progress(_progress(data, run))
        elif kind == "executed":
            await self._collect(run, {str(data.get("node")): data.get("output") or {}})
        elif kind == "execution_error":
            raise execution_failure(data)
        elif kind == "execution_interrupted":
            raise TaskInterrupted
        return False

    async def _done(self, run: _Run) -> bool:
        """Whether ``/history`` says the prompt has ended."""
        entry = await self._comfy(run.client.history(run.prompt_id))
        return entry is not None and (entry.get("status") or {}).get("completed") is not None

    async def _finish(self, run: _Run) -> list[Output]:
        """Read the outcome from ``/history`` (polling until it is there); collect outputs."""
        entry = await self._history_when_done(run.client, run.prompt_id)
        status = entry.get("status") or {}
        for name, data in status.get("messages") or []:
            if name == "execution_error" and isinstance(data, dict):
                raise execution_failure(data)
            if name == "execution_interrupted":
                raise TaskInterrupted
        await self._collect(run, entry.get("outputs") or {})
        return list(run.collected.values())

    async def _history_when_done(self, client: ComfyClient, prompt_id: str) -> dict[str, Any]:
        while True:
            entry = await self._comfy(client.history(prompt_id))
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if entry is None and await self._comfy(client.queue_state(prompt_id)) is None:
                # neither queued nor in history: ComfyUI lost it (a restart, a crash)
                deadline = time.monotonic() + HISTORY_AFTER_SUCCESS_S
                while (entry := await self._comfy(client.history(prompt_id))) is None:
                    if time.monotonic() > deadline:
                        raise TaskFailure(
                            "runtime_lost_prompt",
                            "ComfyUI no longer knows this prompt",
                            retryable=True,
                        )
                    await asyncio.sleep(HISTORY_POLL_S)
                return entry
            await asyncio.sleep(HISTORY_POLL_S)  # polling /history: no other signal here

    async def _collect(self, run: _Run, outputs: Mapping[str, Any]) -> None:
        for ref in output_refs(outputs):
            if run.trace is not None:
                run.trace.refs.add(ref)
            if ref.key in run.collected or ref.kind == "temp":
                continue
            dest = run.workspace / _file_name(ref)
            await self._comfy(run.client.download(ref.filename, ref.subfolder, ref.kind, dest))
            output = Output(ref.key, dest, _content_type(ref.filename))
            run.collected[ref.key] = output
            run.events.output(output)

    # ------------------------------------------------------------------ purging

    async def purge(self, spec: TaskSpec) -> None:
        """Remove the prompt's inputs, outputs, temp files and history entry (best effort).

        See the module docstring. Never raises but ``CancelledError``; logs counts only.
        """
        prompt_id = prompt_id_for(spec.task_id, spec.attempt)
        self._graphs.pop(prompt_id, None)
        trace = self._traces.pop(prompt_id, None) or _Trace()
        servers = [trace.server] if trace.server is not None else list(self.pool.servers)
        total, forgotten = Removed(), 0
        try:
            for server in servers:
                removed, deleted = await self._purge_on(server, prompt_id, trace)
                forgotten += deleted
                total.add(removed)
        except Exception:  # noqa: BLE001 - best effort; the details may be a stranger's
            log.warning("ComfyUI purge incomplete", task_id=spec.task_id, prompt_id=prompt_id)
        finally:
            for server in self.pool.servers:
                if server.process is not None:
                    server.process.forward(prompt_id)
        log.info(
            "ComfyUI prompt purged",
            task_id=spec.task_id,
            prompt_id=prompt_id,
            inputs=total.inputs,
            outputs=total.outputs,
            temp=total.temp,
            refused=total.refused,
            failed=total.failed,
            history_deleted=forgotten,
            files_known=all(server.directories is not None for server in servers),
        )

    async def _purge_on(self, server: Server, prompt_id: str, trace: _Trace) -> tuple[Removed, int]:
        """Purge the prompt on one server: (files removed, history entries deleted)."""
        client = server.client
        refs = set(trace.refs)
        with contextlib.suppress(ComfyError):
            await self._settle(client, prompt_id)
        entry = None
        with contextlib.suppress(ComfyError):
            entry = await client.history(prompt_id)
        if entry is not None:
            refs.update(output_refs(entry.get("outputs") or {}))
        removed = Removed()
        if server.directories is not None:
            removed = await asyncio.to_thread(
                remove_prompt_files,
                server.directories,
                trace.uploaded,
                refs,
                _input_prefix(prompt_id),
            )
        if entry is None:
            return removed, 0
        try:
            await client.delete_history(prompt_id)
        except ComfyError:
            return removed, 0
        return removed, 1

    async def _settle(self, client: ComfyClient, prompt_id: str) -> None:
        """A prompt still queued is dropped; one still running is interrupted and awaited."""
        state = await client.queue_state(prompt_id)
        if state == "pending":
            await client.delete_pending(prompt_id)
        elif state == "running":
            await client.interrupt(prompt_id)
            with contextlib.suppress(TimeoutError, TaskFailure):
                async with asyncio.timeout(PURGE_SETTLE_S):
                    await self._history_when_done(client, prompt_id)

    async def node_catalog(self) -> dict[str, Any]:
        """``/object_info`` (cached for ``OBJECT_INFO_TTL_S``): the policy engine reads it."""
        return await self._classes()

    async def _classes(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._object_info is None or now - self._object_info[0] > OBJECT_INFO_TTL_S:
            self._object_info = (now, await self._comfy(self.pool.any.object_info()))
        return self._object_info[1]

    @staticmethod
    async def _comfy(call: Awaitable[T]) -> T:
        try:
            return await call
        except ComfyError as exc:
            raise TaskFailure("runtime_unavailable", str(exc), retryable=True) from exc


@asynccontextmanager
async def _events_or_none(client: ComfyClient, client_id: str) -> AsyncIterator[EventStream | None]:
    """The prompt's event stream, or ``None`` when the WebSocket cannot be opened."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            stream: EventStream | None = await stack.enter_async_context(client.events(client_id))
        except ComfyError:
            log.warning("ComfyUI WebSocket unavailable; following /history only")
            stream = None
        yield stream


def _progress(data: Mapping[str, Any], run: _Run) -> Progress:
    """Nodes done (plus the running node's steps, from a ``progress`` event) over all nodes."""
    value, maximum = int(data.get("value") or 0), int(data.get("max") or 0)
    node = str(data.get("node") or run.current or "") or None
    steps = min(1.0, value / maximum) if maximum > 0 else 0.0
    overall = (len(run.done) + steps) / run.nodes if run.nodes else steps
    return Progress(
        progress=max(0.0, min(1.0, overall)),
        current_node=node,
        step_current=value if maximum else None,
        step_total=maximum or None,
    )


def _input_prefix(prompt_id: str) -> str:
    """How the names of a prompt's uploaded inputs begin (found again after a restart)."""
    return f"{prompt_id[:8]}-"


def _file_name(ref: OutputRef) -> str:
    key = _UNSAFE.sub("-", ref.key)
    return f"{key}-{_UNSAFE.sub('_', ref.filename)}"[:200]


def _content_type(filename: str) -> str:
    guessed, _ = mimetypes.guess_type(filename)
    return guessed or "application/octet-stream"
