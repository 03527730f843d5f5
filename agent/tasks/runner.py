"""One task attempt's life on the agent, as an explicit sequence of stages.

::

    accepted → preparing (workspace, inputs, runtime.prepare) → running → uploading
             → reporting → done | failed | cancelled

Each stage has a deadline (inputs: ``timeouts.download_s``; preparing + running: the task's
``timeout_s``, 0 = none, capped at ``policy.max_duration_s`` for policed pools; uploading:
``timeouts.upload_s``) and reports its phase to the host (journal + session). Outputs are
uploaded as soon as the runtime announces them. Progress is coalesced and logs are batched
and bounded (:mod:`agent.tasks.reporting`).

The runner reports exactly one outcome to its host — complete, fail or cancelled — unless
it was abandoned (the gateway gave the attempt to someone else), in which case it reports
nothing. It never raises except ``CancelledError`` when the agent itself is torn down; the
workspace is then kept so a restarted agent can resume.

A community task (:attr:`TaskSpec.private`) is a stranger's: once its outcome is known (its
outputs uploaded) and before it is reported, a :class:`~agent.runtimes.base.Purging` runtime
removes what it left outside the workspace and the workspace goes too — also when it failed,
was cancelled or abandoned, but not when the agent is going down. The agent's own log names
only ids, codes and sizes for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import math
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import structlog

from agent.protocol.messages import (
    ErrorInfo,
    LogLine,
    OutputFile,
    OutputPart,
    TaskAssign,
    TaskPhase,
    TaskRef,
    TaskUploadUrls,
    Timings,
    UploadFile,
    UploadTarget,
)
from agent.runtimes.base import (
    PRIVATE_POOLS,
    Injection,
    Output,
    Progress,
    Purging,
    Runtime,
    Stream,
    TaskFailure,
    TaskInterrupted,
    TaskSpec,
)
from agent.settings import Settings
from agent.tasks.reporting import LogBatcher, ProgressCoalescer
from agent.transfer import (
    DEFAULT_RETRY,
    RetryPolicy,
    TransferError,
    download,
    sha256_file,
    upload,
    upload_part,
)

log = structlog.get_logger("agent.runner")
T = TypeVar("T")
LOG_FLUSH_S = 0.5
URL_REFRESHES = 3
PURGE_TIMEOUT_S = 60.0
"""The most a runtime's purge of a private task may take (it is best effort)."""
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class TaskHost(Protocol):
    """What a runner needs from the agent around it (the task manager implements it)."""

    def set_phase(self, task: TaskRef, phase: TaskPhase) -> None: ...
    def set_handle(self, task: TaskRef, handle: Mapping[str, Any]) -> None: ...
    def send_progress(self, task: TaskRef, progress: Progress) -> None: ...
    def send_log(self, task: TaskRef, lines: list[LogLine], dropped: int) -> None: ...
    async def upload_urls(self, task: TaskRef, files: list[UploadFile]) -> TaskUploadUrls: ...
    def output_uploaded(self, task: TaskRef, output: OutputFile) -> None: ...
    def complete(self, task: TaskRef, outputs: list[OutputFile], timings: Timings) -> None: ...
    def fail(
        self, task: TaskRef, error: ErrorInfo, outputs: list[OutputFile], timings: Timings
    ) -> None: ...
    def cancelled(
        self, task: TaskRef, reason: str, outputs: list[OutputFile], timings: Timings
    ) -> None: ...


class _Stopped(Exception):  # noqa: N818 - internal control flow
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Resume:
    """What the journal knew of a task when the agent restarted."""

    phase: TaskPhase
    handle: dict[str, Any]
    outputs: list[OutputFile]


def workspace_for(work_dir: Path, task: TaskRef) -> Path:
    """The task's workspace: stable across restarts, always a direct child of ``work_dir``."""
    name = f"{task.task_id}-{task.attempt}"
    if not _SAFE_ID.fullmatch(name):
        name = hashlib.sha256(name.encode()).hexdigest()[:32]
    return work_dir / name


@dataclass
class TaskRunner:
    """Runs one accepted task attempt (see the module docstring)."""

    assign: TaskAssign
    runtime: Runtime
    host: TaskHost
    http: httpx.AsyncClient
    settings: Settings
    resume: Resume | None = None
    clock: Callable[[], float] = time.monotonic
    retry: RetryPolicy = DEFAULT_RETRY
    """How transfers are retried (the manager's counts the retries for /metrics)."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _stop_reason: str = ""
    _abandoned: bool = False
    _uploaded: dict[str, OutputFile] = field(default_factory=dict)
    _announced: asyncio.Queue[Output | None] = field(default_factory=asyncio.Queue)
    _handle: dict[str, Any] = field(default_factory=dict)
    _timings: dict[str, float] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _upload_failure: TaskFailure | None = None
    _spec: TaskSpec | None = None
    _deadline: float | None = None

    def __post_init__(self) -> None:
        """Derive the task reference, workspace and rate limiters."""
        self.ref = TaskRef(task_id=self.assign.task_id, attempt=self.assign.attempt)
        self.workspace = workspace_for(self.settings.work_dir, self.ref)
        limits = self.settings.limits
        self._progress = ProgressCoalescer(limits.progress_per_s)
        self._logs = LogBatcher(limits.log_lines_per_batch, limits.log_bytes_per_task)
        if self.resume is not None:
            self._handle = dict(self.resume.handle)
            self._uploaded = {o.key: o for o in self.resume.outputs}
        self.private = self.assign.pool.value in PRIVATE_POOLS
        """A stranger's task (see :attr:`TaskSpec.private`)."""
        self.limit_s, self._limit_name = self._duration_limit()

    def _duration_limit(self) -> tuple[float, str]:
        """How long preparing + running may take, and what sets it (for the failure message)."""
        timeout = self.assign.timeout_s if self.assign.timeout_s > 0 else math.inf
        policy = self.settings.policy
        if policy.applies(self.assign.pool.value) and policy.max_duration_s < timeout:
            return policy.max_duration_s, f"policy.max_duration_s of {policy.max_duration_s:g} s"
        return timeout, f"its timeout of {timeout:g} s"

    # ------------------------------------------------------------------ control

    def cancel(self, reason: str) -> None:
        """Stop the task and report it cancelled (idempotent; the first reason wins)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def abandon(self) -> None:
        """Stop the task and report nothing: the gateway gave this attempt away."""
        self._abandoned = True
        self.cancel("abandoned")

    @property
    def stopping(self) -> bool:
        """A cancel or abandon was requested."""
        return self._stop.is_set()

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Run the task to exactly one reported outcome (or none if abandoned)."""
        keep_workspace = False
        pump = asyncio.ensure_future(self._pump())
        try:
            report = await self._outcome()
            if self.private:  # nothing of a stranger's task is left when its end is reported
                await self._purge()
                await asyncio.to_thread(shutil.rmtree, self.workspace, ignore_errors=True)
            report()
        except asyncio.CancelledError:
            keep_workspace = True  # the agent is going down: a restart resumes from here
            raise
        finally:
            await _cancel_and_wait(pump)
            if not keep_workspace:
                await asyncio.to_thread(shutil.rmtree, self.workspace, ignore_errors=True)

    async def _outcome(self) -> Callable[[], None]:
        """Run the stages; return how to report their outcome (called once, after a purge)."""
        try:
            outputs = await self._stages()
        except TaskFailure as failure:
            return functools.partial(self._report_failure, failure)
        except _Stopped as stopped:
            return functools.partial(self._report_cancelled, stopped.reason)
        except Exception as exc:  # a bug must fail the task, not the agent
            if self.private:  # a traceback quotes paths and values of a stranger's task
                log.error(  # noqa: TRY400 - deliberately without the traceback
                    "task runner failed", task_id=self.ref.task_id, error=type(exc).__name__
                )
            else:
                log.exception("task runner failed", task_id=self.ref.task_id)
            bug = TaskFailure("internal_error", f"agent error: {type(exc).__name__}")
            return functools.partial(self._report_failure, bug)
        return functools.partial(self._report_complete, outputs)

    def _report_complete(self, outputs: list[OutputFile]) -> None:
        self._flush_reports(final=True)
        self.host.complete(self.ref, outputs, self._timing())

    def _report_cancelled(self, reason: str) -> None:
        self._flush_reports(final=True)
        if not self._abandoned:
            self.host.cancelled(self.ref, reason, self._done(), self._timing())

    def _report_failure(self, failure: TaskFailure) -> None:
        self._flush_reports(final=True)
        error = ErrorInfo(
            code=failure.code[:200],
            message=failure.message[:8000],
            node_id=failure.node_id,
            retryable=failure.retryable,
        )
        log.info("task failed", task_id=self.ref.task_id, code=error.code)
        self.host.fail(self.ref, error, self._done(), self._timing())

    async def _purge(self) -> None:
        """Have the runtime remove a private task's traces outside the workspace (best effort)."""
        if not self.private or not isinstance(self.runtime, Purging):
            return
        try:
            await asyncio.wait_for(
                self.runtime.purge(self._spec or self._make_spec({})), PURGE_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 - a failed purge must not fail the agent
            log.warning("task purge failed", task_id=self.ref.task_id, error=type(exc).__name__)

    async def _stages(self) -> list[OutputFile]:
        phase = self.resume.phase if self.resume else TaskPhase.ACCEPTED
        deadline = self.clock() + self.limit_s if math.isfinite(self.limit_s) else None
        self._deadline = deadline
        if phase is TaskPhase.UPLOADING and "outputs" in self._handle:
            # restarted while uploading: the outputs are on disk, only the uploads remain
            listed = self._handle["outputs"]
            outputs = [Output(o["key"], Path(o["path"]), o["content_type"]) for o in listed]
        else:
            spec = await self._timed("prepare_s", self._prepare(deadline))
            outputs = await self._timed("run_s", self._execute(spec, phase, deadline))
        self._phase(TaskPhase.UPLOADING)
        self._remember_outputs(outputs)
        upload_deadline = self.clock() + self.settings.timeouts.upload_s
        await self._timed(
            "upload_s", self._guard(self._upload_all(outputs), upload_deadline, "upload")
        )
        self._phase(TaskPhase.REPORTING)
        return self._done()

    # ------------------------------------------------------------------ preparing

    async def _prepare(self, deadline: float | None) -> TaskSpec:
        self._phase(TaskPhase.PREPARING)
        inputs_dir = self.workspace / "inputs"
        try:
            await asyncio.to_thread(inputs_dir.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_failure(exc) from exc
        download_deadline = self.clock() + self.settings.timeouts.download_s
        limit = min(filter(None, (deadline, download_deadline)))
        inputs = await self._guard(self._download_inputs(inputs_dir), limit, "input download")
        spec = self._spec = self._make_spec(inputs)
        await self._guard(self.runtime.prepare(spec, self.workspace), deadline, "preparation")
        return spec

    def _make_spec(self, inputs: dict[str, Path]) -> TaskSpec:
        return TaskSpec(
            task_id=self.ref.task_id,
            attempt=self.ref.attempt,
            tool=self.assign.tool.value,
            pool=self.assign.pool.value,
            workflow=self.assign.workflow,
            injections=tuple(Injection(**i.model_dump()) for i in self.assign.injections),
            inputs=inputs,
            timeout_s=self.assign.timeout_s,
        )

    async def _download_inputs(self, inputs_dir: Path) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for item in self.assign.inputs:
            name = item.file_key.rsplit("/", 1)[-1]
            try:
                paths[item.key] = await download(
                    self.http,
                    item.download_url,
                    inputs_dir,
                    name,
                    max_bytes=self.settings.limits.max_input_bytes,
                    declared_size=item.size,
                    expected_sha256=item.sha256,
                    retry=self.retry,
                )
            except TransferError as exc:
                raise TaskFailure(
                    "input_failed", f"input {item.key}: {exc}", retryable=exc.retryable
                ) from exc
            except OSError as exc:
                raise _disk_failure(exc) from exc
        return paths

    # ------------------------------------------------------------------ running

    async def _execute(
        self, spec: TaskSpec, phase: TaskPhase, deadline: float | None
    ) -> list[Output]:
        self._phase(TaskPhase.RUNNING)
        uploader = asyncio.ensure_future(self._upload_announced())
        try:
            outputs = await self._run_runtime(spec, phase, deadline)
            self._announced.put_nowait(None)  # the run is over: finish the uploads under way
            await uploader
        except BaseException:
            await _cancel_and_wait(uploader)
            raise
        if self._upload_failure is not None:
            raise self._upload_failure
        return outputs

    async def _run_runtime(
        self, spec: TaskSpec, phase: TaskPhase, deadline: float | None
    ) -> list[Output]:
        events = _Events(self)
        if phase is TaskPhase.RUNNING and self.resume is not None:
            coro: Awaitable[list[Output] | None] = self.runtime.resume(
                spec, self.workspace, self._handle, events
            )
        else:
            coro = self.runtime.run(spec, self.workspace, events)
        work = asyncio.ensure_future(coro)
        try:
            outcome = await self._race(work, deadline)
        except BaseException:
            await _cancel_and_wait(work)
            raise
        if outcome == "done":
            return self._result(work)
        await self._interrupt(spec, work)
        if self._upload_failure is not None:
            raise self._upload_failure
        if outcome == "timeout":
            raise TaskFailure("timeout", f"the task exceeded {self._limit_name}")
        raise _Stopped(self._stop_reason)

    def _result(self, work: asyncio.Future[list[Output] | None]) -> list[Output]:
        try:
            outputs = work.result()
        except TaskInterrupted:
            raise _Stopped(self._stop_reason or "interrupted") from None
        except OSError as exc:
            raise _disk_failure(exc) from exc
        if outputs is None:
            raise TaskFailure(
                "agent_restarted",
                "the agent restarted while the task ran and could not re-attach",
                retryable=True,
            )
        return outputs

    async def _race(self, work: asyncio.Future[Any], deadline: float | None) -> str:
        """Wait for the work, a stop request or the deadline: "done", "stop" or "timeout"."""
        stop = asyncio.ensure_future(self._stop.wait())
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        try:
            done, _ = await asyncio.wait(
                {work, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        if work in done:
            return "done"
        return "stop" if stop in done else "timeout"

    async def _interrupt(self, spec: TaskSpec, work: asyncio.Future[Any]) -> None:
        """Cooperative interrupt, then cancellation after the grace."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.runtime.interrupt(spec), self.settings.timeouts.cancel_grace_s
            )
        try:
            await asyncio.wait_for(asyncio.shield(work), self.settings.timeouts.cancel_grace_s)
        except (TimeoutError, Exception):  # noqa: BLE001 - any outcome of a stopped run is moot
            await _cancel_and_wait(work)

    # ------------------------------------------------------------------ uploading

    async def _upload_announced(self) -> None:
        """Upload outputs while the runtime still runs; a failure stops the task."""
        while (output := await self._announced.get()) is not None:
            if output.key in self._uploaded:
                continue
            try:
                await self._upload_one(output)
            except TaskFailure as failure:
                self._upload_failure = failure
                self.cancel(failure.message)
                return

    async def _upload_all(self, outputs: list[Output]) -> None:
        for output in outputs:
            if output.key not in self._uploaded:
                await self._upload_one(output)

    async def _upload_one(self, output: Output) -> None:
        try:
            size = (await asyncio.to_thread(output.path.stat)).st_size
            digest = await sha256_file(output.path)
        except OSError as exc:
            raise TaskFailure(
                "output_missing", f"output {output.key} cannot be read: {exc.strerror}"
            ) from exc
        if size > self.settings.limits.max_output_bytes:
            raise TaskFailure(
                "output_too_large", f"output {output.key} is {size} bytes, over the limit"
            )
        name = self._storage_name(output)
        file = UploadFile(name=name, size=size, content_type=output.content_type, sha256=digest)
        uploaded = await self._put(output, file)
        self._uploaded[output.key] = uploaded
        self.host.output_uploaded(self.ref, uploaded)

    async def _put(self, output: Output, file: UploadFile) -> OutputFile:
        for refresh in range(URL_REFRESHES):
            started = self._multipart.get(output.key, {}).get("upload_id")
            ask = file.model_copy(update={"upload_id": started}) if started else file
            reply = await self.host.upload_urls(self.ref, [ask])
            if not reply.files:
                raise TaskFailure("upload_refused", "the gateway answered with no upload URL")
            target = reply.files[0]
            try:
                parts = None
                if target.parts:
                    parts = await self._upload_multipart(output, target)
                else:
                    await upload(
                        self.http,
                        target.upload_url or "",
                        target.upload_headers,
                        output.path,
                        retry=self.retry,
                    )
            except ValueError as exc:  # the gateway's URLs or parts do not fit the file
                raise TaskFailure("upload_failed", f"output {output.key}: {exc}") from exc
            except TransferError as exc:
                if exc.refresh_urls and refresh < URL_REFRESHES - 1:
                    continue
                raise TaskFailure(
                    "upload_failed", f"output {output.key}: {exc}", retryable=exc.retryable
                ) from exc
            return OutputFile(
                key=output.key,
                storage_key=target.storage_key,
                size=file.size,
                sha256=file.sha256,
                content_type=file.content_type,
                upload_id=target.upload_id,
                parts=parts,
            )
        raise TaskFailure(
            "upload_failed", f"output {output.key}: no usable upload URL"
        )  # pragma: no cover

    async def _upload_multipart(self, output: Output, target: UploadTarget) -> list[OutputPart]:
        """Upload the parts not yet sent, journaling each one (a restart resumes here)."""
        assert target.parts is not None  # noqa: S101 - the caller checked
        record = self._multipart.get(output.key)
        if record is None or record.get("upload_id") != target.upload_id:
            record = {"upload_id": target.upload_id, "parts": {}}
            self._multipart[output.key] = record
        done: dict[str, str] = record["parts"]
        results: list[OutputPart] = []
        offset = 0
        for part in sorted(target.parts, key=lambda p: p.part_number):
            etag = done.get(str(part.part_number))
            if etag is None:
                etag = (
                    await upload_part(self.http, part, output.path, offset, retry=self.retry)
                ).etag
                done[str(part.part_number)] = etag
                self.host.set_handle(self.ref, self._handle)
            results.append(OutputPart(part_number=part.part_number, etag=etag))
            offset += part.size
        return results

    @property
    def _multipart(self) -> dict[str, dict[str, Any]]:
        """Multipart uploads in progress, per output key (lives in the journaled handle)."""
        found: dict[str, dict[str, Any]] = self._handle.setdefault("multipart", {})
        return found

    def _storage_name(self, output: Output) -> str:
        """A unique, safe object name (two nodes may both write ``out_00001_.png``)."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", output.path.name).strip("._") or "output"
        taken = {o.storage_key.rsplit("/", 1)[-1] for o in self._uploaded.values()}
        if base not in taken:
            return base[:200]
        prefix = re.sub(r"[^A-Za-z0-9]+", "-", output.key).strip("-")
        return f"{prefix}-{base}"[:200]

    def _remember_outputs(self, outputs: list[Output]) -> None:
        listed = [
            {"key": o.key, "path": str(o.path), "content_type": o.content_type} for o in outputs
        ]
        self._handle["outputs"] = listed
        self.host.set_handle(self.ref, self._handle)

    # ------------------------------------------------------------------ reports

    def on_progress(self, progress: Progress) -> None:
        """Runtime progress (coalesced)."""
        self._progress.offer(progress)
        self._wake.set()

    def on_log(self, stream: Stream, line: str) -> None:
        """A runtime log line (batched, bounded)."""
        self._logs.add(stream, line)
        if self._logs.full:
            self._wake.set()

    def on_output(self, output: Output) -> None:
        """An output is ready: upload it now."""
        self._announced.put_nowait(output)

    def on_handle(self, data: Mapping[str, Any]) -> None:
        """Journal the runtime's re-attach handle."""
        self._handle.update(data)
        self.host.set_handle(self.ref, self._handle)

    async def _pump(self) -> None:
        """Send coalesced progress and log batches at their rates."""
        next_log = self.clock() + LOG_FLUSH_S
        while True:
            now = self.clock()
            due = [t for t in (self._progress.due(now), next_log) if t is not None]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(due) - now))
            self._wake.clear()
            now = self.clock()
            if now >= next_log or self._logs.full:
                next_log = now + LOG_FLUSH_S
                self._flush_logs()
            progress = self._progress.take(now)
            if progress is not None:
                self.host.send_progress(self.ref, progress)

    def _flush_reports(self, *, final: bool) -> None:
        self._flush_logs()
        if final:
            progress = self._progress.take(float("inf"))
            if progress is not None:
                self.host.send_progress(self.ref, progress)

    def _flush_logs(self) -> None:
        while True:
            batch, dropped = self._logs.take()
            if not batch and not dropped:
                return
            lines = [LogLine(stream=stream, text=text) for stream, text in batch]
            self.host.send_log(self.ref, lines, dropped)

    # ------------------------------------------------------------------ helpers

    def _phase(self, phase: TaskPhase) -> None:
        log.info(
            "task phase", task_id=self.ref.task_id, attempt=self.ref.attempt, phase=phase.value
        )
        self.host.set_phase(self.ref, phase)

    def _done(self) -> list[OutputFile]:
        return list(self._uploaded.values())

    def _timing(self) -> Timings:
        return Timings(**self._timings)

    async def _timed(self, name: str, coro: Awaitable[T]) -> T:
        start = self.clock()
        try:
            return await coro
        finally:
            self._timings[name] = round(self.clock() - start, 3)

    async def _guard(self, coro: Awaitable[T], deadline: float | None, stage: str) -> T:
        """Run a stage unless a stop request or the deadline comes first."""
        work = asyncio.ensure_future(coro)
        try:
            outcome = await self._race(work, deadline)
        except BaseException:
            await _cancel_and_wait(work)
            raise
        if outcome == "done":
            return work.result()
        await _cancel_and_wait(work)
        if outcome == "timeout":
            if deadline is not None and deadline == self._deadline:
                raise TaskFailure("timeout", f"the {stage} stage exceeded {self._limit_name}")
            raise TaskFailure("timeout", f"the {stage} stage exceeded its deadline")
        raise _Stopped(self._stop_reason)


class _Events:
    """The runtime-facing side of a runner."""

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    def progress(self, progress: Progress) -> None:
        self._runner.on_progress(progress)

    def log(self, stream: Stream, line: str) -> None:
        self._runner.on_log(stream, line)

    def output(self, output: Output) -> None:
        self._runner.on_output(output)

    def handle(self, data: Mapping[str, Any]) -> None:
        self._runner.on_handle(data)


async def _cancel_and_wait(work: asyncio.Future[Any]) -> None:
    """Cancel ``work`` and wait until it has really stopped (its cleanup ran).

    Waits with ``asyncio.wait`` so that the caller's own cancellation still propagates.
    """
    if not work.done():
        work.cancel()
        await asyncio.wait({work})
    if not work.cancelled():
        work.exception()  # retrieved: the outcome of a stopped piece of work is moot


def _disk_failure(exc: OSError) -> TaskFailure:
    if exc.errno == errno.ENOSPC:
        return TaskFailure("disk_full", "no space left on the agent's disk", retryable=True)
    return TaskFailure("io_error", f"local I/O failed: {exc.strerror or exc}", retryable=True)
