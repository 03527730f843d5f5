"""The agent side of protocol v1 as a sans-I/O state machine.

The session owns the protocol rules — handshake, heartbeats, credits per pool, the
assign → accept/reject exchange, lease renewal, terminal messages retransmitted until the
gateway acknowledges them, resumption after a reconnect, drain — and nothing else. It reads
no clock, opens no socket and awaits nothing: every call takes ``now`` (seconds on a
monotonic clock) and returns the :mod:`~agent.protocol.actions` the shell must carry out.
The shell calls :meth:`Session.tick` at :meth:`Session.next_deadline`.

The session lives across connections: tasks keep running while disconnected and their
terminal messages wait for the next session. Connection states::

    DISCONNECTED --connected()--> HELLO_SENT --welcome--> ESTABLISHED
         ^                                                     |
         +-------------------- disconnected() ----------------+

It never raises on peer input: a bad frame is answered with an ``error`` message.
Calls from the agent itself that make no sense (finishing an unknown task) are no-ops,
which is what makes terminal reports idempotent.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

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
from agent.protocol.codec import DecodeError, decode_gateway
from agent.protocol.ids import RandomBytes, uuid7
from agent.protocol.messages import (
    DEFAULT_MAX_FRAME_BYTES,
    PREEMPTED,
    PROTOCOL_VERSION,
    Ack,
    AgentStatus,
    Capability,
    CloseCode,
    Drain,
    Envelope,
    Error,
    ErrorCode,
    ErrorInfo,
    GatewayMessage,
    Hello,
    InFlight,
    LogLine,
    OutputFile,
    Pool,
    RejectReason,
    ResourceSnapshot,
    ResumeAction,
    Status,
    Sync,
    SyncProgress,
    SystemStats,
    TaskAccept,
    TaskAssign,
    TaskCancel,
    TaskCancelled,
    TaskComplete,
    TaskFail,
    TaskLog,
    TaskPhase,
    TaskProgress,
    TaskRef,
    TaskReject,
    TaskUploadRequest,
    TaskUploadUrls,
    TerminalMessage,
    Timings,
    ToolInfo,
    UploadFile,
    Welcome,
)

E = TypeVar("E", bound=Envelope)
V = TypeVar("V")
TaskKey = tuple[str, int]

#: Statuses the agent may set itself; busy/idle/draining are derived.
SETTABLE_STATUSES = frozenset({AgentStatus.SYNCING, AgentStatus.TUNNEL, AgentStatus.UNHEALTHY})


class ConnState(enum.Enum):
    """Where the current connection is in the handshake."""

    DISCONNECTED = "disconnected"
    HELLO_SENT = "hello_sent"
    ESTABLISHED = "established"


@dataclass(frozen=True)
class SessionConfig:
    """Fixed parameters of a session (from settings)."""

    agent_id: str
    agent_version: str
    slots: int
    pool_caps: Mapping[Pool, int]
    """Most tasks per pool; a pool absent here is not offered."""
    handshake_s: float = 10.0
    retransmit_s: float = 5.0
    default_heartbeat_s: float = 15.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    remembered_rejects: int = 256
    """How many rejected, acknowledged or abandoned attempts are remembered (duplicates)."""
    preemptible: frozenset[Pool] = frozenset()
    """Pools whose running tasks a team task may pre-empt (``pools.community.preempt``)."""
    exclusive: frozenset[Pool] = frozenset()
    """Pools that get no credit while a team task is held (``pools.community.only_when_idle``)."""


@dataclass(frozen=True)
class Advert:
    """What the agent says about itself in ``hello`` (refreshed by the app)."""

    tools: tuple[ToolInfo, ...] = ()
    labels: tuple[str, ...] = ()
    region: str = ""
    capability: Capability = field(default_factory=Capability)
    system_stats: SystemStats | None = None
    models: tuple[str, ...] = ()
    features: tuple[str, ...] = ()


@dataclass
class _Task:
    pool: Pool
    assign: TaskAssign | None
    decided: bool
    phase: TaskPhase = TaskPhase.ACCEPTED
    cancel_sent: bool = False
    preempted: bool = False
    """Cancelled to make room for a team task: it no longer counts against the slots."""
    terminal: TerminalMessage | None = None
    next_send: float | None = None


@dataclass
class _Timers:
    handshake: float | None = None
    heartbeat: float | None = None


@dataclass
class _Health:
    status: AgentStatus | None = None
    reason: str | None = None
    resources: ResourceSnapshot | None = None
    sync: SyncProgress | None = None
    last_sent: tuple[Any, ...] | None = field(default=None)


class Session:
    """Agent-side protocol v1 state machine (see the module docstring)."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        wall_offset: float,
        advert: Advert | None = None,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        """Create a disconnected session.

        ``wall_offset`` is added to ``now`` to stamp messages (``time.time() -
        time.monotonic()`` in production), so the session never reads a clock.
        """
        if config.slots < 1:
            raise ValueError("slots must be >= 1")
        self.config = config
        self._wall_offset = wall_offset
        self._random_bytes = random_bytes
        self._advert = advert or Advert()
        self._pool_caps: dict[Pool, int] = dict(config.pool_caps)
        self._pool_caps.setdefault(Pool.TEAM, config.slots)
        self._conn = ConnState.DISCONNECTED
        self._heartbeat_s = config.default_heartbeat_s
        self._timers = _Timers()
        self._health = _Health()
        self._draining = False
        self._tasks: dict[TaskKey, _Task] = {}
        self._rejects: OrderedDict[TaskKey, TaskReject] = OrderedDict()
        self._retired: OrderedDict[TaskKey, None] = OrderedDict()
        self.welcome: Welcome | None = None

    # ------------------------------------------------------------------ queries

    @property
    def state(self) -> ConnState:
        """The connection state."""
        return self._conn

    @property
    def draining(self) -> bool:
        """True once a drain began (locally or by the gateway)."""
        return self._draining

    def agent_status(self) -> AgentStatus:
        """The status the next ``status`` message will carry."""
        if self._draining:
            return AgentStatus.DRAINING
        if self._health.status is not None:
            return self._health.status
        return AgentStatus.BUSY if self._active() else AgentStatus.IDLE

    def free_slots(self) -> dict[Pool, int]:
        """Credits per offered pool: what the gateway may still assign."""
        if self.agent_status() not in {AgentStatus.IDLE, AgentStatus.BUSY}:
            return dict.fromkeys(self._pool_caps, 0)
        active = [t for t in self._active() if not t.preempted]
        accepted = set(self.welcome.pools) if self.welcome is not None else set(self._pool_caps)
        team_held = any(t.pool is Pool.TEAM for t in active)
        return {
            pool: self._credit(pool, cap, active)
            if pool in accepted and not (team_held and pool in self.config.exclusive)
            else 0
            for pool, cap in self._pool_caps.items()
        }

    def _credit(self, pool: Pool, cap: int, active: list[_Task]) -> int:
        """One pool's credit: its cap less its tasks, within the slots its tasks may use."""
        preemptible = self.config.preemptible if pool is Pool.TEAM else frozenset()
        # a team task may take the slot of a pre-emptible task that is already running
        blocking = [t for t in active if not (t.decided and t.pool in preemptible)]
        total_free = max(0, self.config.slots - len(blocking))
        return min(total_free, max(0, cap - sum(1 for t in active if t.pool is pool)))

    def running(self) -> list[TaskRef]:
        """Accepted tasks not yet finished (their leases are renewed by ``status``)."""
        return [
            TaskRef(task_id=k[0], attempt=k[1])
            for k, t in self._tasks.items()
            if t.decided and t.terminal is None
        ]

    def terminal_for(self, task: TaskRef) -> TerminalMessage | None:
        """The unacknowledged terminal message of ``task``, if it has one."""
        entry = self._tasks.get((task.task_id, task.attempt))
        return entry.terminal if entry is not None else None

    def pending_terminals(self) -> list[TerminalMessage]:
        """Terminal messages not yet acknowledged by the gateway."""
        return [t.terminal for t in self._tasks.values() if t.terminal is not None]

    def is_empty(self) -> bool:
        """No task held at all (nothing running, nothing awaiting an ack)."""
        return not self._tasks

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must next be called (``None``: nothing scheduled)."""
        candidates: list[float] = []
        if self._conn is ConnState.HELLO_SENT and self._timers.handshake is not None:
            candidates.append(self._timers.handshake)
        if self._conn is ConnState.ESTABLISHED:
            if self._timers.heartbeat is not None:
                candidates.append(self._timers.heartbeat)
            candidates.extend(t.next_send for t in self._tasks.values() if t.next_send)
        return min(candidates, default=None)

    # ------------------------------------------------------------------ connection events

    def connected(self, now: float) -> list[Action]:
        """A WebSocket is open: say hello."""
        self._conn = ConnState.HELLO_SENT
        self._timers = _Timers(handshake=now + self.config.handshake_s)
        self._health.last_sent = None
        return [Send(self._hello(now))]

    def disconnected(self, now: float) -> list[Action]:
        """The WebSocket is gone. Tasks keep running; undecided offers are withdrawn."""
        del now
        self._conn = ConnState.DISCONNECTED
        self._timers = _Timers()
        self.welcome = None
        for key in [k for k, t in self._tasks.items() if not t.decided]:
            del self._tasks[key]
        for task in self._tasks.values():
            task.next_send = None
        return []

    def tick(self, now: float) -> list[Action]:
        """Do what is due: handshake timeout, heartbeat, retransmissions."""
        if self._conn is ConnState.HELLO_SENT:
            if self._timers.handshake is not None and now >= self._timers.handshake:
                self._timers.handshake = None
                return [Close(CloseCode.HANDSHAKE_TIMEOUT, "no welcome within the deadline")]
            return []
        if self._conn is not ConnState.ESTABLISHED:
            return []
        actions: list[Action] = []
        if self._timers.heartbeat is not None and now >= self._timers.heartbeat:
            actions.append(self._send_status(now))
        for task in self._tasks.values():
            if task.terminal is not None and task.next_send is not None and now >= task.next_send:
                actions.append(Send(task.terminal))
                task.next_send = now + self.config.retransmit_s
        return actions

    # ------------------------------------------------------------------ peer input

    def receive(self, frame: str | bytes, now: float) -> list[Action]:
        """Decode one frame from the gateway and handle it; bad frames get an ``error``."""
        try:
            message = decode_gateway(frame, self.config.max_frame_bytes)
        except DecodeError as exc:
            if exc.kind == "error" or _looks_like_error(frame):
                return []  # never answer an error with an error, however it is spelled
            return self._error(exc.code, exc.message, exc.re, now)
        return self.handle(message, now)

    def handle(self, message: GatewayMessage, now: float) -> list[Action]:
        """Handle one decoded gateway message."""
        if isinstance(message, Error):
            return [PeerError(message)]
        if isinstance(message, Welcome):
            return self._on_welcome(message, now)
        if self._conn is not ConnState.ESTABLISHED:
            return self._error(
                ErrorCode.UNEXPECTED_MESSAGE, f"{message.type} before welcome", message.id, now
            )
        return self._dispatch(message, now)

    def _dispatch(self, message: GatewayMessage, now: float) -> list[Action]:
        match message:
            case TaskAssign():
                return self._on_assign(message, now)
            case TaskCancel():
                return self._on_cancel(message, now)
            case Ack():
                return self._on_ack(message, now)
            case Drain():
                return self._on_drain(message, now)
        return self._passed_on(message)

    def _passed_on(self, message: GatewayMessage) -> list[Action]:
        """Messages the session only hands over: upload URLs (for a task held), model sets."""
        match message:
            case TaskUploadUrls():
                known = (message.task_id, message.attempt) in self._tasks
                return [Deliver(message)] if known else []
            case Sync():
                return [SyncModels(tuple(message.models))]
        return []  # Error and Welcome are handled before dispatch

    def _on_welcome(self, welcome: Welcome, now: float) -> list[Action]:
        if self._conn is not ConnState.HELLO_SENT:
            return self._error(ErrorCode.UNEXPECTED_MESSAGE, "welcome twice", welcome.id, now)
        if welcome.agent_id != self.config.agent_id:
            return [Close(CloseCode.PROTOCOL_ERROR, "welcome for another agent_id")]
        self._conn = ConnState.ESTABLISHED
        self.welcome = welcome
        self._heartbeat_s = welcome.heartbeat_interval_s
        self._timers.handshake = None
        actions: list[Action] = [Established(welcome)]
        if welcome.sync is not None:
            actions.append(SyncModels(tuple(welcome.sync)))
        actions += self._apply_resume(welcome)
        for task in self._tasks.values():
            if task.terminal is not None:
                actions.append(Send(task.terminal))
                task.next_send = now + self.config.retransmit_s
        actions.append(self._send_status(now))
        return actions

    def _apply_resume(self, welcome: Welcome) -> list[Action]:
        verdicts = {(r.task_id, r.attempt): r.action for r in welcome.resume}
        actions: list[Action] = []
        for key in list(self._tasks):
            if verdicts.get(key) is ResumeAction.CONTINUE:
                continue
            task = self._tasks.pop(key)  # abandoned, or not listed: the gateway gave it away
            _remember(self._retired, key, None, self.config.remembered_rejects)
            ref = TaskRef(task_id=key[0], attempt=key[1])
            actions.append(AbandonTask(ref) if task.terminal is None else Forget(ref))
        return actions

    def _on_assign(self, assign: TaskAssign, now: float) -> list[Action]:
        key = (assign.task_id, assign.attempt)
        if key in self._tasks:
            return self._repeat_answer(key, assign, now)
        if key in self._rejects:
            return [Send(self._rejects[key])]
        if key in self._retired:
            return [Send(self._reject(assign, RejectReason.DUPLICATE, "attempt already held", now))]
        refusal = self._refusal(assign.pool)
        if refusal is not None:
            return [Send(self._reject(assign, refusal[0], refusal[1], now))]
        self._tasks[key] = _Task(pool=assign.pool, assign=assign, decided=False)
        return [Evaluate(assign), *self._status_if_changed(now)]

    def _repeat_answer(self, key: TaskKey, assign: TaskAssign, now: float) -> list[Action]:
        task = self._tasks[key]
        if not task.decided:
            return []  # still being evaluated; the answer will follow
        if task.terminal is not None:
            return [Send(task.terminal)]
        accept = self._new(TaskAccept, now, task_id=key[0], attempt=key[1], re=assign.id)
        return [Send(accept)]

    def _refusal(self, pool: Pool) -> tuple[RejectReason, str] | None:
        """Why a task of ``pool`` cannot be taken now (``None``: it can)."""
        status = self.agent_status()
        if status is AgentStatus.DRAINING:
            return RejectReason.DRAINING, "agent is draining"
        if status is not AgentStatus.IDLE and status is not AgentStatus.BUSY:
            return RejectReason.UNHEALTHY, f"agent is {status.value}"
        if self.free_slots().get(pool, 0) < 1:
            return RejectReason.NO_CAPACITY, f"no free slot in pool {pool.value}"
        return None

    def _on_cancel(self, cancel: TaskCancel, now: float) -> list[Action]:
        keys = [k for k in self._tasks if k[0] == cancel.task_id and cancel.attempt in (None, k[1])]
        if not keys:
            return self._error(ErrorCode.UNKNOWN_TASK, "no such task here", cancel.id, now)
        actions: list[Action] = []
        for key in keys:
            task = self._tasks[key]
            if task.terminal is not None:
                actions.append(Send(task.terminal))
            elif not task.decided:
                del self._tasks[key]  # never started: nothing to report
            elif not task.cancel_sent:
                task.cancel_sent = True
                actions.append(CancelTask(TaskRef(task_id=key[0], attempt=key[1]), cancel.reason))
        return [*actions, *self._status_if_changed(now)]

    def _on_ack(self, ack: Ack, now: float) -> list[Action]:
        del now  # acknowledgements change nothing the gateway needs to hear about
        key = (ack.task_id, ack.attempt)
        task = self._tasks.get(key)
        if task is None or task.terminal is None:
            return []
        del self._tasks[key]
        _remember(self._retired, key, None, self.config.remembered_rejects)
        return [Forget(TaskRef(task_id=key[0], attempt=key[1]))]

    def _on_drain(self, drain: Drain, now: float) -> list[Action]:
        already = self._draining
        actions = self.drain(now)
        return actions if already else [DrainRequested(drain.reason), *actions]

    # ------------------------------------------------------------------ local events

    def decide(
        self,
        task: TaskRef,
        now: float,
        *,
        reject: RejectReason | None = None,
        message: str = "",
    ) -> list[Action]:
        """Answer an :class:`Evaluate`: accept (``reject=None``) or reject the task.

        Returns ``[]`` when the offer was withdrawn meanwhile (disconnect, cancel).
        """
        key = (task.task_id, task.attempt)
        entry = self._tasks.get(key)
        if entry is None or entry.decided or entry.assign is None:
            return []
        assign = entry.assign
        del self._tasks[key]  # re-check as if new: caps or health may have changed meanwhile
        if reject is None and (refusal := self._refusal(assign.pool)) is not None:
            reject, message = refusal
        if reject is not None:
            return [Send(self._reject(assign, reject, message, now)), *self._status_if_changed(now)]
        self._tasks[key] = entry
        entry.decided = True
        accept = self._new(TaskAccept, now, task_id=key[0], attempt=key[1], re=assign.id)
        preempt = self._preempt_for(entry)
        return [Send(accept), *preempt, StartTask(assign), *self._status_if_changed(now)]

    def _preempt_for(self, entry: _Task) -> list[Action]:
        """Cancel pre-emptible tasks while the accepted team task leaves too few slots."""
        if entry.pool is not Pool.TEAM:
            return []
        actions: list[Action] = []
        live = [(k, t) for k, t in self._tasks.items() if t.terminal is None and not t.preempted]
        victims = [
            (k, t)
            for k, t in live
            if t.decided and t.pool in self.config.preemptible and not t.cancel_sent
        ]
        excess = len(live) - self.config.slots
        for key, victim in reversed(victims):  # the most recently accepted loses least work
            if excess <= 0:
                break
            victim.preempted = victim.cancel_sent = True
            actions.append(CancelTask(TaskRef(task_id=key[0], attempt=key[1]), PREEMPTED))
            excess -= 1
        return actions

    def set_phase(self, task: TaskRef, phase: TaskPhase) -> None:
        """Record where a running task is (reported in ``hello.in_flight``)."""
        entry = self._tasks.get((task.task_id, task.attempt))
        if entry is not None and entry.decided and entry.terminal is None:
            entry.phase = phase

    def progress(
        self,
        task: TaskRef,
        now: float,
        *,
        progress: float,
        current_node: str | None = None,
        step_current: int | None = None,
        step_total: int | None = None,
    ) -> list[Action]:
        """Report progress of a running task (dropped while disconnected: it is transient)."""
        if not self._is_running(task):
            return []
        message = self._new(
            TaskProgress,
            now,
            task_id=task.task_id,
            attempt=task.attempt,
            progress=min(1.0, max(0.0, progress)),
            current_node=current_node,
            step_current=step_current,
            step_total=step_total,
        )
        return [Send(message)]

    def log(
        self, task: TaskRef, now: float, lines: list[LogLine], dropped: int = 0
    ) -> list[Action]:
        """Send a batch of log lines of a running task (dropped while disconnected)."""
        if not self._is_running(task) or not (lines or dropped):
            return []
        message = self._new(
            TaskLog, now, task_id=task.task_id, attempt=task.attempt, lines=lines, dropped=dropped
        )
        return [Send(message)]

    def request_upload(
        self, task: TaskRef, files: list[UploadFile], now: float
    ) -> tuple[str | None, list[Action]]:
        """Ask for upload URLs; the answer arrives as :class:`Deliver` with ``re`` = the id.

        Returns ``(None, [])`` while disconnected: ask again after reconnecting.
        """
        if not self._is_running(task) or not files:
            return None, []
        message = self._new(
            TaskUploadRequest, now, task_id=task.task_id, attempt=task.attempt, files=files
        )
        return message.id, [Send(message)]

    def complete(
        self, task: TaskRef, now: float, outputs: list[OutputFile], timings: Timings | None = None
    ) -> list[Action]:
        """The task succeeded: report it (exactly once; retransmitted until acknowledged)."""
        return self._finish(
            task,
            now,
            TaskComplete,
            outputs=outputs,
            timings=timings or Timings(),
        )

    def fail(
        self,
        task: TaskRef,
        now: float,
        error: ErrorInfo,
        outputs: Iterable[OutputFile] = (),
        timings: Timings | None = None,
    ) -> list[Action]:
        """The task failed: report it (exactly once; retransmitted until acknowledged)."""
        return self._finish(
            task, now, TaskFail, error=error, outputs=list(outputs), timings=timings or Timings()
        )

    def cancelled(
        self,
        task: TaskRef,
        now: float,
        reason: str,
        outputs: Iterable[OutputFile] = (),
        timings: Timings | None = None,
    ) -> list[Action]:
        """The task was cancelled: report it (exactly once; retransmitted until acknowledged)."""
        return self._finish(
            task,
            now,
            TaskCancelled,
            reason=reason,
            outputs=list(outputs),
            timings=timings or Timings(),
        )

    def _finish(self, task: TaskRef, now: float, kind: type[E], **fields: Any) -> list[Action]:
        entry = self._tasks.get((task.task_id, task.attempt))
        if entry is None or not entry.decided or entry.terminal is not None:
            return []  # unknown, abandoned, or already reported: idempotent
        message = self._new(kind, now, task_id=task.task_id, attempt=task.attempt, **fields)
        assert isinstance(message, TaskComplete | TaskFail | TaskCancelled)  # noqa: S101
        entry.terminal = message
        entry.phase = TaskPhase.REPORTING
        actions: list[Action] = []
        if self._conn is ConnState.ESTABLISHED:
            actions.append(Send(message))
            entry.next_send = now + self.config.retransmit_s
        return [*actions, *self._status_if_changed(now)]

    def restore(self, assign: TaskAssign, phase: TaskPhase) -> None:
        """Re-adopt an accepted task from the journal before the first connect."""
        key = (assign.task_id, assign.attempt)
        self._tasks[key] = _Task(pool=assign.pool, assign=assign, decided=True, phase=phase)

    def restore_terminal(self, message: TerminalMessage, pool: Pool) -> None:
        """Re-adopt an unacknowledged terminal message from the journal (same ``id``)."""
        key = (message.task_id, message.attempt)
        self._tasks[key] = _Task(
            pool=pool, assign=None, decided=True, phase=TaskPhase.REPORTING, terminal=message
        )

    def drain(self, now: float) -> list[Action]:
        """Stop taking work (idempotent); running tasks go on."""
        if self._draining:
            return []
        self._draining = True
        return self._status_if_changed(now)

    def set_status(
        self, status: AgentStatus | None, now: float, reason: str | None = None
    ) -> list[Action]:
        """Set or clear (``None``) syncing/tunnel/unhealthy; sends ``status`` if it changed."""
        if status is not None and status not in SETTABLE_STATUSES:
            raise ValueError(f"{status.value} is derived, not settable")
        self._health.status = status
        self._health.reason = reason if status is not None else None
        return self._status_if_changed(now)

    def set_pool_cap(self, pool: Pool, cap: int, now: float) -> list[Action]:
        """Change how many tasks a pool may hold (community hours, pre-emption settings)."""
        self._pool_caps[pool] = max(0, cap)
        return self._status_if_changed(now)

    @property
    def advert(self) -> Advert:
        """What ``hello`` says now."""
        return self._advert

    def set_advert(self, advert: Advert, now: float) -> list[Action]:
        """Refresh what ``hello`` says; label changes are pushed in the next ``status``."""
        self._advert = advert
        return self._status_if_changed(now)

    @property
    def resources(self) -> ResourceSnapshot | None:
        """The readings the next heartbeat carries."""
        return self._health.resources

    def set_resources(self, resources: ResourceSnapshot | None, sync: SyncProgress | None) -> None:
        """Readings for the next heartbeat (they do not trigger a ``status`` by themselves)."""
        self._health.resources = resources
        self._health.sync = sync

    # ------------------------------------------------------------------ helpers

    def _active(self) -> list[_Task]:
        return [t for t in self._tasks.values() if t.terminal is None]

    def _is_running(self, task: TaskRef) -> bool:
        entry = self._tasks.get((task.task_id, task.attempt))
        return (
            self._conn is ConnState.ESTABLISHED
            and entry is not None
            and entry.decided
            and entry.terminal is None
        )

    def _new(self, kind: type[E], now: float, **fields: Any) -> E:
        wall = now + self._wall_offset
        stamp = datetime.fromtimestamp(wall, UTC)
        ident = uuid7(max(0, int(wall * 1000)), self._random_bytes)
        return kind(id=ident, ts=stamp, **fields)

    def _reject(
        self, assign: TaskAssign, reason: RejectReason, message: str, now: float
    ) -> TaskReject:
        reject = self._new(
            TaskReject,
            now,
            task_id=assign.task_id,
            attempt=assign.attempt,
            re=assign.id,
            reason=reason,
            message=message[:16_384],
        )
        key = (assign.task_id, assign.attempt)
        _remember(self._rejects, key, reject, self.config.remembered_rejects)
        return reject

    def _error(self, code: ErrorCode, message: str, re: str | None, now: float) -> list[Action]:
        if self._conn is ConnState.DISCONNECTED:
            return []
        return [Send(self._new(Error, now, code=code, message=message[:16_384], re=re))]

    def _hello(self, now: float) -> Hello:
        advert = self._advert
        in_flight = [
            InFlight(task_id=k[0], attempt=k[1], phase=t.phase)
            for k, t in self._tasks.items()
            if t.decided
        ]
        return self._new(
            Hello,
            now,
            agent_id=self.config.agent_id,
            agent_version=self.config.agent_version,
            protocol=PROTOCOL_VERSION,
            tools=list(advert.tools),
            labels=list(advert.labels),
            pools=list(self._pool_caps),
            region=advert.region,
            capacity=self.capacity(),
            capability=advert.capability,
            system_stats=advert.system_stats,
            models=list(advert.models),
            in_flight=in_flight,
            features=list(advert.features),
        )

    def capacity(self) -> dict[Pool, int]:
        """Most tasks per pool (each pool's cap, at most ``slots``)."""
        return {pool: min(cap, self.config.slots) for pool, cap in self._pool_caps.items()}

    def _signature(self) -> tuple[Any, ...]:
        return (
            self.agent_status(),
            tuple(sorted(self.free_slots().items())),
            tuple(sorted((r.task_id, r.attempt) for r in self.running())),
            self._health.reason,
            self._advert.labels,
            self._advert.models,
        )

    def _status_if_changed(self, now: float) -> list[Action]:
        if self._conn is not ConnState.ESTABLISHED or self._signature() == self._health.last_sent:
            return []
        return [self._send_status(now)]

    def _send_status(self, now: float) -> Send:
        self._health.last_sent = self._signature()
        self._timers.heartbeat = now + self._heartbeat_s
        message = self._new(
            Status,
            now,
            agent_status=self.agent_status(),
            free_slots=self.free_slots(),
            running=self.running(),
            reason=self._health.reason,
            labels=list(self._advert.labels),
            resources=self._health.resources,
            sync=self._health.sync,
            models=list(self._advert.models),
        )
        return Send(message)


def _remember(memory: OrderedDict[TaskKey, V], key: TaskKey, value: V, limit: int) -> None:
    """Insert into a bounded insertion-ordered memory, forgetting the oldest entries."""
    memory[key] = value
    while len(memory) > limit:
        memory.popitem(last=False)


def _looks_like_error(frame: str | bytes) -> bool:
    """Cheap check for a frame that claims to be an ``error`` (not worth an answer)."""
    head = frame[:4096] if isinstance(frame, str) else frame[:4096].decode("utf-8", "replace")
    return '"type":"error"' in head.replace(" ", "")
