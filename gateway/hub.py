"""Connected agents, the dispatcher, and the timers that keep tasks moving.

The hub owns: the registry of live agent connections, the dispatch pass (pending tasks →
``task.assign`` to the scheduler's choice), and the deadlines — ACK (re-dispatch), lease
(``agent disconnected`` + retry), ``task_timeout`` (cancel + fail) and refusal expiry. One
coroutine, :meth:`Hub.run`, does all of it; everything else only wakes it.

Per-connection reading and writing lives in ``gateway.agent_ws``; what each agent message
does to a task lives in ``gateway.agent_messages``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from agent.protocol.codec import encode
from agent.protocol.ids import uuid7
from agent.protocol.messages import (
    CloseCode,
    Envelope,
    Error,
    ErrorCode,
    Hello,
    InFlight,
    Pool,
    ResumeAction,
    ResumeEntry,
    Status,
    Sync,
    SyncModel,
    TaskAssign,
    TaskCancel,
    TaskPhase,
    Tool,
    Welcome,
)
from agent.protocol.messages import (
    Injection as WireInjection,
)
from agent.protocol.messages import (
    InputFile as WireInput,
)
from gateway import model_set
from gateway.cloud import CLOUD_AGENT_KEY, CloudRunner
from gateway.config import GatewayConfig
from gateway.models import DispatchTarget, TargetPool, TaskStatus
from gateway.scheduler import AgentView, Demand, choose
from gateway.storage import ObjectStorage
from gateway.store import Store, TaskRow
from gateway.tasks import TaskService

log = structlog.get_logger("gateway.hub")

OUTBOX_SIZE = 4096
LASTING_REFUSAL_S = 3600.0
TRANSIENT_REFUSAL_S = 5.0


def message_id() -> str:
    """A fresh UUIDv7 message id."""
    return uuid7(int(time.time() * 1000))


def stamp() -> datetime:
    """Now, for a message's ``ts``."""
    return datetime.now(UTC)


def protocol_error(code: ErrorCode, message: str, re: str | None) -> Error:
    """An ``error`` message about the message ``re``."""
    return Error(id=message_id(), ts=stamp(), code=code, message=message, re=re)


@dataclass
class AgentConn:
    """One live agent session; ``outbox`` is drained by its writer task."""

    team_id: str
    hello: Hello
    session_id: str
    credential_kind: str
    connected_at: float = field(default_factory=time.time)
    outbox: asyncio.Queue[str | CloseCode] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_SIZE)
    )
    status: Status | None = None
    last_heartbeat: float = field(default_factory=time.time)
    tasks_completed: int = 0
    _view: tuple[Status | None, AgentView] | None = field(default=None, repr=False)

    @property
    def agent_id(self) -> str:
        """The agent's self-chosen id (unique within its team)."""
        return self.hello.agent_id

    @property
    def key(self) -> str:
        """Unique key across teams."""
        return f"{self.team_id}/{self.hello.agent_id}"

    def send(self, message: Envelope) -> None:
        """Queue a message; an agent that does not drain its outbox is disconnected."""
        try:
            self.outbox.put_nowait(encode(message))
        except asyncio.QueueFull:
            self.close(CloseCode.INTERNAL)

    def close(self, code: CloseCode) -> None:
        """Ask the writer to close the connection with ``code``."""
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(code)

    def view(self, awaiting_ack: int) -> AgentView:
        """What the scheduler sees (credits minus assigns not yet answered).

        The view is rebuilt only when a new ``status`` arrived: a dispatch pass over a large
        fleet must not allocate a fresh view per agent (garbage and collector pauses).
        """
        cached = self._view
        if cached is None or cached[0] is not self.status:
            cached = self._view = (self.status, self._build_view())
        view = cached[1]
        if awaiting_ack <= 0:
            return view
        free = {pool: max(0, n - awaiting_ack) for pool, n in view.free.items()}
        return dataclasses.replace(view, free=free)

    def _build_view(self) -> AgentView:
        hello = self.hello
        status = self.status
        free = dict(status.free_slots) if status else dict(hello.capacity)
        return AgentView(
            key=self.key,
            team_id=self.team_id,
            labels=frozenset(
                status.labels if status and status.labels is not None else hello.labels
            ),
            pools=frozenset(p.value for p in hello.pools),
            region=hello.region,
            free={p.value: max(0, n) for p, n in free.items()},
            capacity={p.value: n for p, n in hello.capacity.items()},
            status=status.agent_status.value if status else "idle",
            tools=frozenset(t.name.value for t in hello.tools),
            gpu_vram=tuple(g.vram_total for g in hello.capability.gpus),
            gpu_names=tuple(g.name for g in hello.capability.gpus),
            models=frozenset(
                status.models if status and status.models is not None else hello.models
            ),
            connected_at=self.connected_at,
        )


@dataclass
class _Deadlines:
    ack: dict[str, tuple[str, int, float]] = field(default_factory=dict)
    """task id → (agent key, attempt, deadline)"""
    lease: dict[str, float] = field(default_factory=dict)
    timeout: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, dict[str, float]] = field(default_factory=dict)
    """task id → {agent key: until}"""
    unanswered: dict[str, set[str]] = field(default_factory=dict)
    """agent key → task ids refused because that session left an offer unanswered"""

    def next(self) -> float | None:
        times = [d for _, _, d in self.ack.values()]
        times += self.lease.values()
        times += self.timeout.values()
        times += [u for by_agent in self.refusals.values() for u in by_agent.values()]
        return min(times, default=None)


class Hub:
    """Registry of agents + dispatcher + deadline keeper (see the module docstring)."""

    def __init__(
        self, config: GatewayConfig, store: Store, tasks: TaskService, storage: ObjectStorage
    ) -> None:
        """Create an idle hub; :meth:`run` starts its loop."""
        self.config = config
        self.store = store
        self.tasks = tasks
        self.storage = storage
        self.agents: dict[str, AgentConn] = {}
        self.deadlines = _Deadlines()
        self.cloud: CloudRunner | None = None
        self._wake = asyncio.Event()
        self._recover()

    # ------------------------------------------------------------------ loop

    def wake(self) -> None:
        """Ask the loop to run a dispatch pass soon."""
        self._wake.set()
        if self.cloud is not None:
            self.cloud.wake()

    async def run(self) -> None:
        """Dispatch and keep deadlines until cancelled."""
        while True:
            self._wake.clear()
            now = time.time()
            self.sweep(now)
            self.dispatch()
            deadline = self.deadlines.next()
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _recover(self) -> None:
        """After a restart: running tasks get a fresh lease, queued ones a fresh ACK deadline.

        A queued task's agent may have accepted it just before the restart (the accept was
        lost with the link): it lists the task in ``hello.in_flight`` and :meth:`_resume`
        continues it. Requeueing it here would run it twice. One whose agent does not come
        back within a lease TTL is requeued by the ACK deadline as usual.
        """
        ttl = self.config.timeouts.lease_ttl_s
        for task in self.store.tasks_in({TaskStatus.QUEUED, TaskStatus.RUNNING}):
            if task.task_status is TaskStatus.QUEUED:
                if task.agent_key:
                    self.deadlines.ack[task.id] = (task.agent_key, task.attempt, time.time() + ttl)
                else:
                    self.tasks.requeue(
                        task, "gateway restarted before the agent answered", count_retry=False
                    )
                continue
            self.tasks.renew(task, ttl)
            self.deadlines.lease[task.id] = time.time() + ttl
            self._arm_timeout(task)

    # ------------------------------------------------------------------ connections

    def attach(self, conn: AgentConn) -> None:
        """Register a new session; an older session of the same agent is closed (4003)."""
        old = self.agents.get(conn.key)
        if old is not None:
            old.close(CloseCode.SUPERSEDED)
        self.agents[conn.key] = conn
        # offers the old session never answered were most likely lost with its link
        for task_id in self.deadlines.unanswered.pop(conn.key, set()):
            self.deadlines.refusals.get(task_id, {}).pop(conn.key, None)
        self.wake()

    def detach(self, conn: AgentConn) -> None:
        """Forget a session that ended (its tasks keep their leases until they expire)."""
        if self.agents.get(conn.key) is conn:
            del self.agents[conn.key]

    def team_agent_count(self, team_id: str) -> int:
        """How many agents of a team are connected."""
        return sum(1 for conn in self.agents.values() if conn.team_id == team_id)

    def welcome(self, conn: AgentConn) -> Welcome:
        """Build the welcome for ``conn``, deciding every in-flight task's fate."""
        resume = [self._resume(conn, entry) for entry in conn.hello.in_flight]
        return Welcome(
            id=message_id(),
            ts=stamp(),
            re=conn.hello.id,
            agent_id=conn.agent_id,
            session_id=conn.session_id,
            heartbeat_interval_s=self.config.timeouts.heartbeat_interval_s,
            lease_ttl_s=self.config.timeouts.lease_ttl_s,
            server_time=stamp(),
            resume=resume,
            pools=list(conn.hello.pools),
            sync=self.sync_set(conn.team_id),
        )

    def sync_set(self, team_id: str) -> list[SyncModel]:
        """The team's active models with fresh download URLs (``welcome.sync``, ``sync``)."""
        return model_set.sync_set(
            self.store, self.storage, team_id, self.config.model_download_ttl_s
        )

    def send_sync(self, team_id: str) -> int:
        """Send the team's new model set to each of its connected agents; return how many."""
        conns = [conn for conn in self.agents.values() if conn.team_id == team_id]
        if not conns:
            return 0
        models = self.sync_set(team_id)
        for conn in conns:
            conn.send(Sync(id=message_id(), ts=stamp(), models=models))
        log.info("model set sent", team_id=team_id, agents=len(conns), models=len(models))
        return len(conns)

    def _resume(self, conn: AgentConn, entry: InFlight) -> ResumeEntry:
        action = ResumeAction.ABANDON
        try:
            task = self.store.task(entry.task_id)
        except LookupError:
            task = None
        if task is not None and task.agent_key == conn.key and task.attempt == entry.attempt:
            if task.task_status is TaskStatus.QUEUED:  # the accept was lost with the link
                self.deadlines.ack.pop(task.id, None)
                task = self.tasks.start(task, self.config.timeouts.lease_ttl_s) or task
                self._arm_timeout(task)
            if task.task_status is TaskStatus.RUNNING:
                self.renew(task)
                action = ResumeAction.CONTINUE
            elif task.task_status.terminal and entry.phase is TaskPhase.REPORTING:
                action = ResumeAction.CONTINUE  # it will resend its terminal; we ack it
        return ResumeEntry(task_id=entry.task_id, attempt=entry.attempt, action=action)

    # ------------------------------------------------------------------ dispatch

    def dispatch(self) -> None:
        """Assign every dispatchable task to the best eligible agent.

        Team tasks go before community tasks (owners first), each group oldest first.
        """
        pending = self.store.tasks_in({TaskStatus.PENDING, TaskStatus.WAITING})
        if not pending:
            return
        # owners first: team work is placed before community work (stable: oldest first)
        pending.sort(key=lambda task: task.target_pool is not TargetPool.TEAM)
        awaiting = collections.Counter(key for key, _, _ in self.deadlines.ack.values())
        views = {key: conn.view(awaiting[key]) for key, conn in self.agents.items()}
        for task in pending:
            if task.dispatch_target is not DispatchTarget.AGENT:
                continue
            choice = choose(views.values(), self._demand(task))
            if choice is None:
                self.tasks.waiting(task)
                continue
            self._assign(task, self.agents[choice.key])
            views[choice.key] = _one_less(choice)

    def _demand(self, task: TaskRow) -> Demand:
        payload = task.payload
        now = time.time()
        refused = self.deadlines.refusals.get(task.id, {})
        return Demand(
            team_id=task.team_id,
            pool=task.target_pool.value,
            tool=task.tool_type.value,
            required_labels=frozenset(payload.get("required_labels", [])),
            min_vram_gb=float(payload.get("min_vram_gb", 0)),
            submitter_region=task.submitter_region,
            required_models=frozenset(payload.get("required_model_hashes", [])),
            preferred_gpu=payload.get("preferred_gpu"),
            refused_by=frozenset(k for k, until in refused.items() if until > now),
        )

    def _assign(self, task: TaskRow, conn: AgentConn) -> None:
        gpu = conn.hello.capability.gpus[0].name if conn.hello.capability.gpus else None
        labels = sorted(conn.view(0).labels)
        queued = self.tasks.assign(task, conn.key, labels, gpu)
        if queued is None:
            return
        ack_deadline = time.time() + self.config.timeouts.ack_s
        self.deadlines.ack[task.id] = (conn.key, queued.attempt, ack_deadline)
        conn.send(self._assign_message(queued, ack_deadline))

    def _assign_message(self, task: TaskRow, ack_deadline: float) -> TaskAssign:
        payload = task.payload
        lease = ack_deadline + self.config.timeouts.lease_ttl_s
        return TaskAssign(
            id=message_id(),
            ts=stamp(),
            task_id=task.id,
            attempt=task.attempt,
            pool=Pool(task.target_pool.value),
            tool=Tool(task.tool_type.value),
            workflow_id=task.workflow_id,
            workflow_version=task.workflow_version,
            workflow=payload["workflow"],
            injections=[WireInjection.model_validate(i) for i in payload.get("injections", [])],
            inputs=[self._input(i) for i in payload.get("inputs", [])],
            required_models=payload.get("required_models", []),
            min_vram_gb=float(payload.get("min_vram_gb", 0)),
            timeout_s=float(task.task_timeout),
            lease_expires_at=datetime.fromtimestamp(lease, UTC),
        )

    def _input(self, item: dict[str, object]) -> WireInput:
        key = str(item["file_key"])
        url, _ = self.storage.presign_get(key, expires_s=self.config.download_ttl_s)
        return WireInput.model_validate({**item, "download_url": url})

    # ------------------------------------------------------------------ deadlines

    def sweep(self, now: float) -> None:
        """Act on every deadline that has passed."""
        for task_id, (agent_key, attempt, deadline) in list(self.deadlines.ack.items()):
            if deadline <= now:
                self._ack_timeout(task_id, agent_key, attempt)
        for task_id, deadline in list(self.deadlines.lease.items()):
            if deadline <= now:
                self._lease_expired(task_id)
        for task_id, deadline in list(self.deadlines.timeout.items()):
            if deadline <= now:
                self._timed_out(task_id)
        for task_id, by_agent in list(self.deadlines.refusals.items()):
            for agent_key in [k for k, until in by_agent.items() if until <= now]:
                del by_agent[agent_key]
                self._forget_unanswered(agent_key, task_id)
                self.wake()
            if not by_agent:
                del self.deadlines.refusals[task_id]

    def _forget_unanswered(self, agent_key: str, task_id: str) -> None:
        unanswered = self.deadlines.unanswered.get(agent_key)
        if unanswered is not None:
            unanswered.discard(task_id)
            if not unanswered:
                del self.deadlines.unanswered[agent_key]

    def _ack_timeout(self, task_id: str, agent_key: str, attempt: int) -> None:
        del self.deadlines.ack[task_id]
        task = self.store.task(task_id)
        if task.task_status is TaskStatus.QUEUED and task.attempt == attempt:
            log.info("ack deadline passed", task_id=task_id, agent=agent_key)
            self.refuse(task_id, agent_key, TRANSIENT_REFUSAL_S * 6)
            self.deadlines.unanswered.setdefault(agent_key, set()).add(task_id)
            self.tell_cancel(agent_key, task_id, attempt, "not acknowledged in time")
            self.tasks.requeue(task, "agent did not acknowledge in time", count_retry=False)
            self.wake()

    def _lease_expired(self, task_id: str) -> None:
        del self.deadlines.lease[task_id]
        self.deadlines.timeout.pop(task_id, None)
        task = self.store.task(task_id)
        if task.task_status is TaskStatus.RUNNING:
            log.info("lease expired", task_id=task_id, agent=task.agent_key)
            self.tasks.lease_lost(task)
            self.wake()

    def _timed_out(self, task_id: str) -> None:
        del self.deadlines.timeout[task_id]
        self.deadlines.lease.pop(task_id, None)
        task = self.store.task(task_id)
        if task.task_status is TaskStatus.RUNNING and task.agent_key:
            self.tell_cancel(task.agent_key, task.id, task.attempt, "task_timeout exceeded")
            self.tasks.fail(task, f"timed out after {task.task_timeout} s")

    def _arm_timeout(self, task: TaskRow) -> None:
        if task.task_timeout > 0 and task.task_status is TaskStatus.RUNNING:
            started = task.started_at.timestamp() if task.started_at else time.time()
            self.deadlines.timeout[task.id] = started + task.task_timeout
            self.wake()

    def renew(self, task: TaskRow) -> None:
        """Renew a running task's lease (store and timer)."""
        ttl = self.config.timeouts.lease_ttl_s
        self.tasks.renew(task, ttl)
        self.deadlines.lease[task.id] = time.time() + ttl

    def started(self, task: TaskRow) -> None:
        """A task was accepted: its ACK timer stops, its lease and timeout start."""
        self.deadlines.ack.pop(task.id, None)
        self.deadlines.refusals.pop(task.id, None)
        self.deadlines.lease[task.id] = time.time() + self.config.timeouts.lease_ttl_s
        self._arm_timeout(task)

    def finished(self, task_id: str) -> None:
        """A task reached a terminal state: drop its timers, free the slot."""
        for timers in (self.deadlines.ack, self.deadlines.lease, self.deadlines.timeout):
            timers.pop(task_id, None)
        self.deadlines.refusals.pop(task_id, None)
        self.wake()

    def refuse(self, task_id: str, agent_key: str, for_s: float) -> None:
        """Keep ``task_id`` away from ``agent_key`` for a while."""
        self.deadlines.refusals.setdefault(task_id, {})[agent_key] = time.time() + for_s

    def tell_cancel(self, agent_key: str, task_id: str, attempt: int | None, reason: str) -> None:
        """Send ``task.cancel`` to an agent if it is connected."""
        conn = self.agents.get(agent_key)
        if conn is not None:
            conn.send(
                TaskCancel(
                    id=message_id(), ts=stamp(), task_id=task_id, attempt=attempt, reason=reason
                )
            )

    def cancel(self, task: TaskRow, reason: str) -> TaskRow:
        """Cancel a task for its submitter (no-op when terminal); its agent is told."""
        if task.task_status.terminal:
            return task
        if task.agent_key == CLOUD_AGENT_KEY and self.cloud is not None:
            self.cloud.cancel(task.id)
        elif task.agent_key and task.task_status in {TaskStatus.QUEUED, TaskStatus.RUNNING}:
            self.tell_cancel(task.agent_key, task.id, task.attempt, reason)
        cancelled = self.tasks.cancel(task, reason) or task
        self.finished(task.id)
        return cancelled


def _one_less(view: AgentView) -> AgentView:
    """The view after one more assignment (every pool shares the slots)."""
    free = {pool: max(0, n - 1) for pool, n in view.free.items()}
    return AgentView(**{**view.__dict__, "free": free})


__all__ = ["AgentConn", "Hub"]
