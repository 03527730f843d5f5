"""The agent's tasks: carries out the session's actions and hosts the runners.

Owns every :class:`~agent.tasks.runner.TaskRunner` (one asyncio task each, inside the
manager's TaskGroup) and the journal. It is the only code that turns session actions into
work (start, cancel, abandon) and that keeps the journal in step with the session:

- an assignment is journaled *before* its ``task.accept`` is sent;
- every phase change, runtime handle and uploaded output is journaled as it happens;
- a terminal message is journaled before it is sent, and dropped only on ``Forget``
  (the gateway's ack, or an abandon).

Frames go out through a :class:`Transport` (the connection); the manager never touches a
socket.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import structlog

from agent.errors import ConnectionLostError
from agent.metrics import Metrics
from agent.policy import check_task
from agent.protocol.actions import (
    AbandonTask,
    Action,
    CancelTask,
    Close,
    Deliver,
    DrainRequested,
    Established,
    Evaluate,
    Forget,
    PeerError,
    Send,
    StartTask,
    SyncModels,
)
from agent.protocol.messages import (
    PREEMPTED,
    CloseCode,
    Envelope,
    ErrorInfo,
    LogLine,
    OutputFile,
    Pool,
    RejectReason,
    SyncModel,
    TaskAssign,
    TaskPhase,
    TaskRef,
    TaskReject,
    TaskUploadUrls,
    Timings,
    UploadFile,
)
from agent.protocol.session import ConnState, Session
from agent.runtimes.base import Progress, Runtime, TaskFailure
from agent.settings import Settings
from agent.tasks.journal import Journal, JournalEntry
from agent.tasks.runner import Resume, TaskRunner
from agent.transfer import RetryPolicy

log = structlog.get_logger("agent.tasks")
UPLOAD_REPLY_S = 30.0


class Transport(Protocol):
    """Where frames go (the connection); both calls never block."""

    def send(self, message: Envelope) -> None: ...
    def close(self, code: CloseCode, reason: str) -> None: ...


@dataclass
class TaskManager:
    """See the module docstring."""

    settings: Settings
    session: Session
    journal: Journal
    runtimes: Mapping[str, Runtime]
    http: httpx.AsyncClient
    transport: Transport | None = None
    clock: Any = time.monotonic
    on_drain: Any = None
    """Called with the reason when the gateway asks for a drain."""
    vram_refusal: Callable[[float], str | None] = lambda _need_gb: None
    """Why a task needing this many GiB of free VRAM cannot run here (``None``: it can)."""
    metrics: Metrics = field(default_factory=Metrics)
    on_sync: Callable[[list[SyncModel]], None] = lambda _models: None
    """Called with the team's model set (welcome.sync, then each sync message)."""
    missing_models: Callable[[list[str]], list[str]] = lambda _required: []
    """Which of a task's ``required_models`` are not ready on this agent."""
    cached_models: Callable[[], Collection[str]] = tuple
    """Model file names (``model_path``) the cache holds: the policy allows those."""
    runners: dict[tuple[str, int], TaskRunner] = field(default_factory=dict)
    _group: asyncio.TaskGroup | None = None
    _pending_start: list[TaskRunner] = field(default_factory=list)
    _restored: list[TaskRunner] = field(default_factory=list)
    _replies: dict[str, asyncio.Future[TaskUploadUrls]] = field(default_factory=dict)
    _established: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _checks: set[asyncio.Task[None]] = field(default_factory=set)

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Host runners until cancelled (cancelling this cancels every runner)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for runner in self._pending_start:
                    self._spawn(runner)
                self._pending_start.clear()
                await asyncio.Event().wait()  # runners live in the group; this waits for cancel
        finally:
            for check in list(self._checks):
                check.cancel()

    def recover(self) -> None:
        """Re-adopt the journal's tasks into the session (before the first connect)."""
        for entry in self.journal.entries():
            if entry.terminal is not None:
                self.session.restore_terminal(entry.terminal, entry.pool)
                continue
            self.session.restore(entry.assign, entry.phase)
            resume = Resume(
                phase=entry.phase, handle=dict(entry.handle), outputs=list(entry.outputs)
            )
            self._restored.append(self._runner(entry.assign, resume))
            log.info(
                "task restored from the journal", task_id=entry.task_id, phase=entry.phase.value
            )

    def idle(self) -> bool:
        """Nothing running and nothing left to report."""
        return not self.runners and self.session.is_empty()

    async def wait_changed(self) -> None:
        """Wait until a task starts, ends or is acknowledged."""
        self._changed.clear()
        await self._changed.wait()

    def cancel_all(self, reason: str) -> None:
        """Cancel every running task (they report ``task.cancelled``)."""
        for runner in list(self.runners.values()):
            runner.cancel(reason)

    def disconnected(self) -> None:
        """The connection dropped: pending upload requests ask again on the next one."""
        self._established.clear()
        replies, self._replies = self._replies, {}
        for future in replies.values():  # their answers, if any, were lost with the link
            if not future.done():
                future.set_exception(ConnectionLostError("the link dropped before the answer"))

    # ------------------------------------------------------------------ actions

    def perform(self, actions: list[Action]) -> None:
        """Carry out the session's actions, in order."""
        for action in actions:
            self._perform_one(action)

    def _perform_one(self, action: Action) -> None:
        match action:
            case Send():
                if isinstance(action.message, TaskReject):
                    self.metrics.rejected(action.message.reason.value)
                if self.transport is not None:
                    self.transport.send(action.message)
            case Close():
                if self.transport is not None:
                    self.transport.close(action.code, action.reason)
            case Established():
                self._on_established()
            case Evaluate():
                self._evaluate(action.assign)
            case _:
                self._perform_task_action(action)

    def _perform_task_action(self, action: Action) -> None:
        match action:
            case StartTask():
                self._start(action.assign)
            case CancelTask():
                runner = self.runners.get((action.task.task_id, action.task.attempt))
                if runner is not None:
                    runner.cancel(action.reason or "cancelled by the gateway")
            case AbandonTask():
                self._abandon(action.task)
            case Forget():
                self.journal.remove(action.task)
                log.info(
                    "report acknowledged", task_id=action.task.task_id, attempt=action.task.attempt
                )
                self._changed.set()
            case _:
                self._perform_message_action(action)

    def _perform_message_action(self, action: Action) -> None:
        match action:
            case Deliver():
                future = self._replies.pop(action.message.re or "", None)
                if future is not None and not future.done():
                    future.set_result(action.message)
            case DrainRequested():
                if self.on_drain is not None:
                    self.on_drain(action.reason)
            case SyncModels():
                self.on_sync(list(action.models))
            case PeerError():
                self._peer_error(action)

    def _on_established(self) -> None:
        self._established.set()
        restored, self._restored = self._restored, []
        held = {(r.task_id, r.attempt) for r in self.session.running()}
        for runner in restored:
            key = (runner.ref.task_id, runner.ref.attempt)
            if key in held:
                self._launch(runner)

    def _evaluate(self, assign: TaskAssign) -> None:
        ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
        if assign.tool.value not in self.runtimes:
            message = f"no {assign.tool.value} runtime on this agent"
            self._refuse(ref, RejectReason.UNSUPPORTED_TOOL, message)
            return
        if self.settings.policy.applies(assign.pool.value):
            check = asyncio.get_running_loop().create_task(
                self._police(assign), name=f"policy {ref.task_id}"
            )
            self._checks.add(check)  # a strong reference until it is done
            check.add_done_callback(self._checks.discard)
            return
        self._decide(assign)

    async def _police(self, assign: TaskAssign) -> None:
        """Apply the policy engine (it may read ComfyUI's node catalog), then decide."""
        ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
        # a runtime that lists its node classes (ComfyUI's /object_info) has node_catalog()
        node_catalog = getattr(self.runtimes.get(assign.tool.value), "node_catalog", None)
        catalog: Mapping[str, Any] | None = None
        if node_catalog is not None:
            try:
                catalog = await node_catalog()
            except TaskFailure as exc:
                self._refuse(ref, RejectReason.UNHEALTHY, f"cannot check the task: {exc.message}")
                return
        try:
            violation = check_task(
                assign, self.settings.policy, node_catalog=catalog, models=self.cached_models()
            )
        except Exception as exc:  # noqa: BLE001 - a stranger's task must never wedge a slot
            log.error("policy check failed", task_id=ref.task_id, error=type(exc).__name__)  # noqa: TRY400
            self._refuse(ref, RejectReason.POLICY_DENIED, "the policy engine could not check it")
            return
        if violation is not None:
            # the rule only: the message may echo the stranger's input
            log.info("task refused by policy", task_id=ref.task_id, rule=violation.rule)
            self._refuse(ref, RejectReason.POLICY_DENIED, str(violation))
            return
        self._decide(assign)

    def _refuse(self, ref: TaskRef, reason: RejectReason, message: str) -> None:
        self.perform(self.session.decide(ref, self.clock(), reject=reason, message=message))

    def _decide(self, assign: TaskAssign) -> None:
        """The checks that need no I/O (models, VRAM), then the accept."""
        ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
        now = self.clock()
        if missing := self.missing_models(assign.required_models):
            message = f"models not on this agent yet: {', '.join(missing)}"[:1000]
            log.info("task refused", task_id=ref.task_id, reason=_private(assign, message))
            reason = RejectReason.MISSING_MODEL
            self.perform(self.session.decide(ref, now, reject=reason, message=message))
            return
        if (refusal := self.vram_refusal(assign.min_vram_gb)) is not None:
            log.info("task refused", task_id=ref.task_id, reason=_private(assign, refusal))
            reason = RejectReason.INSUFFICIENT_VRAM
            self.perform(self.session.decide(ref, now, reject=reason, message=refusal))
            return
        if (refusal := self._disk_refusal()) is not None:
            log.warning("task refused", task_id=ref.task_id, reason=refusal)
            self.perform(
                self.session.decide(ref, now, reject=RejectReason.UNHEALTHY, message=refusal)
            )
            return
        self.journal.record_accept(assign)  # durable before the accept leaves
        actions = self.session.decide(ref, now)
        if any(isinstance(a, StartTask) for a in actions):
            log.info(
                "task accepted", task_id=ref.task_id, attempt=ref.attempt, pool=assign.pool.value
            )
        else:
            self.journal.remove(ref)  # withdrawn or turned into a reject meanwhile
        self.perform(actions)

    def _disk_refusal(self) -> str | None:
        """Why ``work_dir`` is too full for a new task (``limits.min_free_disk_bytes``)."""
        need = self.settings.limits.min_free_disk_bytes
        try:
            free = shutil.disk_usage(self.settings.work_dir).free
        except OSError as exc:
            return f"work_dir cannot be read: {exc.strerror}"
        if free >= need:
            return None
        return (
            f"only {free / 2**20:.0f} MiB free in work_dir "
            f"(limits.min_free_disk_bytes is {need / 2**20:.0f} MiB)"
        )

    def _start(self, assign: TaskAssign) -> None:
        self._launch(self._runner(assign, None))

    def _runner(self, assign: TaskAssign, resume: Resume | None) -> TaskRunner:
        runtime = self.runtimes.get(assign.tool.value)
        if runtime is None:
            runtime = _MissingRuntime(assign.tool.value)
        return TaskRunner(
            retry=RetryPolicy(on_retry=self.metrics.upload_retry),
            assign=assign,
            runtime=runtime,
            host=self,
            http=self.http,
            settings=self.settings,
            resume=resume,
        )

    def _launch(self, runner: TaskRunner) -> None:
        self.runners[(runner.ref.task_id, runner.ref.attempt)] = runner
        self._changed.set()
        if self._group is None:
            self._pending_start.append(runner)
        else:
            self._spawn(runner)

    def _spawn(self, runner: TaskRunner) -> None:
        assert self._group is not None  # noqa: S101 - only called once run() holds the group

        async def life() -> None:
            try:
                await runner.run()
            finally:
                self.runners.pop((runner.ref.task_id, runner.ref.attempt), None)
                self._changed.set()

        self._group.create_task(life(), name=f"task {runner.ref.task_id}")

    def _abandon(self, task: TaskRef) -> None:
        runner = self.runners.get((task.task_id, task.attempt))
        if runner is not None:
            runner.abandon()
        self._restored = [r for r in self._restored if r.ref != task]
        self.journal.remove(task)
        self._changed.set()

    def _peer_error(self, action: PeerError) -> None:
        error = action.error
        log.warning(
            "the gateway reported a protocol error", code=error.code.value, detail=error.message
        )
        future = self._replies.pop(error.re or "", None)
        if future is not None and not future.done():
            future.set_exception(
                TaskFailure("upload_refused", f"the gateway refused: {error.message}")
            )

    # ------------------------------------------------------------------ TaskHost

    def set_phase(self, task: TaskRef, phase: TaskPhase) -> None:
        """Journal and announce a runner's phase."""
        if self.journal.get(task) is not None:
            self.journal.set_phase(task, phase)
        self.session.set_phase(task, phase)

    def set_handle(self, task: TaskRef, handle: Mapping[str, Any]) -> None:
        """Journal a runner's re-attach handle."""
        if self.journal.get(task) is not None:
            self.journal.set_handle(task, handle)

    def send_progress(self, task: TaskRef, progress: Progress) -> None:
        """Forward coalesced progress."""
        self.perform(
            self.session.progress(
                task,
                self.clock(),
                progress=progress.progress,
                current_node=progress.current_node,
                step_current=progress.step_current,
                step_total=progress.step_total,
            )
        )

    def send_log(self, task: TaskRef, lines: list[LogLine], dropped: int) -> None:
        """Forward a log batch."""
        self.perform(self.session.log(task, self.clock(), lines, dropped))

    async def upload_urls(self, task: TaskRef, files: list[UploadFile]) -> TaskUploadUrls:
        """Ask the gateway for upload URLs, waiting through reconnects."""
        while True:
            await self._established.wait()
            request_id, actions = self.session.request_upload(task, files, self.clock())
            if request_id is None:
                if self.session.state is ConnState.ESTABLISHED:
                    raise TaskFailure("upload_failed", "the session no longer holds this task")
                self._established.clear()  # the link dropped meanwhile: wait for the next
                continue
            future: asyncio.Future[TaskUploadUrls] = asyncio.get_running_loop().create_future()
            self._replies[request_id] = future
            self.perform(actions)
            try:
                return await asyncio.wait_for(future, UPLOAD_REPLY_S)
            except (TimeoutError, ConnectionLostError):
                self._replies.pop(request_id, None)  # lost with a dropped link: ask again

    def output_uploaded(self, task: TaskRef, output: OutputFile) -> None:
        """Journal an uploaded output."""
        self.metrics.uploaded(output.size)
        if self.journal.get(task) is not None:
            self.journal.add_output(task, output)

    def complete(self, task: TaskRef, outputs: list[OutputFile], timings: Timings) -> None:
        """Report success (journaled first)."""
        self._count(task, "completed", timings)
        self._terminal(task, self.session.complete(task, self.clock(), outputs, timings))

    def fail(
        self, task: TaskRef, error: ErrorInfo, outputs: list[OutputFile], timings: Timings
    ) -> None:
        """Report failure (journaled first)."""
        self._count(task, "failed", timings)
        self._terminal(task, self.session.fail(task, self.clock(), error, outputs, timings))

    def cancelled(
        self, task: TaskRef, reason: str, outputs: list[OutputFile], timings: Timings
    ) -> None:
        """Report cancellation (journaled first); a pre-empted task is not a failure."""
        self._count(task, "preempted" if reason == PREEMPTED else "cancelled", timings)
        self._terminal(task, self.session.cancelled(task, self.clock(), reason, outputs, timings))

    def _count(self, task: TaskRef, outcome: str, timings: Timings) -> None:
        runner = self.runners.get((task.task_id, task.attempt))
        pool = runner.assign.pool.value if runner is not None else "unknown"
        self.metrics.task_finished(outcome, pool, timings)

    def _terminal(self, task: TaskRef, actions: list[Action]) -> None:
        message = self.session.terminal_for(task)
        if message is not None and self.journal.get(task) is not None:
            self.journal.set_terminal(message)
        if message is not None:
            log.info(
                "task reported", task_id=task.task_id, attempt=task.attempt, outcome=message.type
            )
        self.perform(actions)
        self._changed.set()


def _private(assign: TaskAssign, detail: str) -> str:
    """``detail`` for the agent's log, or only its kind for a community task (privacy)."""
    return "(withheld: community task)" if assign.pool is Pool.COMMUNITY else detail


@dataclass
class _MissingRuntime:
    """Stands in for a runtime that is gone after a restart; every task fails cleanly."""

    tool: str
    version: str | None = None

    async def start(self) -> None:
        return None

    async def healthy(self) -> bool:
        return False

    async def prepare(self, *_: Any) -> None:
        raise TaskFailure("unsupported_tool", f"no {self.tool} runtime on this agent any more")

    async def run(self, *_: Any) -> list[Any]:
        raise TaskFailure("unsupported_tool", f"no {self.tool} runtime on this agent any more")

    async def interrupt(self, *_: Any) -> None:
        return None

    async def resume(self, *_: Any) -> None:
        return None

    async def close(self) -> None:
        return None


__all__ = ["JournalEntry", "TaskManager", "Transport"]
