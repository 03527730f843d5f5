"""The agent's composition root and supervisor (``cyberun-agent run``).

Builds everything from the settings, runs the connection, the task manager and the
watchdog in one TaskGroup, and turns signals into the documented stop policy
(:mod:`agent.lifecycle`): the first SIGTERM/SIGINT drains (no new work; running tasks
finish within ``timeouts.drain_grace_s``; then what is left is cancelled and reported),
the second cancels at once, the third exits at once (exit 1, the journal keeps the rest).
A drain or cancel ends with exit 0 once every task is reported and acknowledged, or after
``ACK_WAIT_S`` without the gateway (the journal re-sends the reports after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from agent import __version__, hardware
from agent.community import Gate, community_gate
from agent.contribution import FILE_NAME as CONTRIBUTION_FILE
from agent.contribution import ContributionFile
from agent.control.connection import Connection
from agent.errors import AgentError
from agent.health import GpuMonitor, GpuPolicy, GpuState, process_tree
from agent.lifecycle import Lifecycle, Phase
from agent.metrics import Metrics
from agent.observe import ObserveServer
from agent.protocol.messages import (
    AgentStatus,
    GpuInfo,
    Pool,
    SyncProgress,
    SystemStats,
    Tool,
    ToolInfo,
)
from agent.protocol.session import Advert, Session, SessionConfig
from agent.runtimes.base import Runtime
from agent.runtimes.registry import load_runtimes
from agent.settings import Settings, resolve_agent_id
from agent.sync import ModelCache, Syncer
from agent.systemd import Notifier, WatchdogGate, feed_watchdog
from agent.tasks.journal import Journal
from agent.tasks.manager import TaskManager

log = structlog.get_logger("agent.app")
ACK_WAIT_S = 10.0
"""How long a stopping agent waits for the gateway to acknowledge its last reports."""
CANCEL_SLACK_S = 5.0
"""Beyond the cancel and kill graces: time for cancelled runners to report."""
WATCHDOG_DISCONNECT_GRACE_S = 120.0
RUNTIME_CHECK_S = 5.0
NVML_ANSWER_S = 30.0
"""How long one NVML sample may take before the GPUs count as not answering."""
NVML_CLOSE_S = 5.0


def run(settings: Settings) -> int:
    """Run the agent until it is stopped; return the process exit code."""
    try:
        return asyncio.run(Agent(settings).main())
    except AgentError as exc:
        # an expected fatal condition (bad credential…), not a bug: no traceback
        log.error("agent stopped", error=str(exc), exit_code=int(exc.exit_code))  # noqa: TRY400
        return int(exc.exit_code)


class Agent:
    """Everything one agent process runs."""

    def __init__(self, settings: Settings) -> None:
        """Build the parts that need no event loop."""
        self.settings = settings
        self.credential = settings.credential_value() or ""
        self.agent_id = resolve_agent_id(settings)
        settings.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.journal = Journal(settings.state_dir / "journal.sqlite3")
        self.runtimes = load_runtimes(settings)
        self.gpus = GpuMonitor(GpuPolicy.of(settings.gpu))
        self.gpu_state = GpuState()
        self.community = self._community_gate()
        self.healthy: frozenset[str] | None = None
        """Runtimes that passed their last health check (``None``: not checked yet)."""
        self.contribution = ContributionFile(settings.state_dir / CONTRIBUTION_FILE)
        self.metrics = Metrics(
            contribution=self.contribution.totals, on_contribution=self.contribution.save
        )
        self.metrics.identify(__version__, self.agent_id)
        self.connection: Connection | None = None
        self.syncer: Syncer | None = None
        self.sync_progress: SyncProgress | None = None
        self.session = Session(
            self._session_config(),
            wall_offset=time.time() - time.monotonic(),
            advert=self._advert(),
        )
        self.lifecycle = Lifecycle()
        self.changed = asyncio.Event()
        systemd = settings.systemd
        self.notifier = Notifier(
            systemd.notify_socket, systemd.watchdog_usec, systemd.watchdog_pid, own_pid=os.getpid()
        )
        self.gate = WatchdogGate(WATCHDOG_DISCONNECT_GRACE_S)
        self.fatal: AgentError | None = None
        self.manager: TaskManager

    def _session_config(self) -> SessionConfig:
        settings = self.settings
        slots = settings.slots or 1
        caps = {Pool.TEAM: slots}
        community = settings.pools.community
        if community.enabled:
            caps[Pool.COMMUNITY] = min(self.community.cap, slots)
        timeouts = settings.timeouts
        pools = frozenset({Pool.COMMUNITY})
        return SessionConfig(
            preemptible=pools if community.enabled and community.preempt else frozenset(),
            exclusive=pools if community.enabled and community.only_when_idle else frozenset(),
            agent_id=self.agent_id,
            agent_version=__version__,
            slots=slots,
            pool_caps=caps,
            handshake_s=timeouts.connect_s,
            retransmit_s=timeouts.retransmit_s,
            default_heartbeat_s=timeouts.heartbeat_s,
            max_frame_bytes=settings.limits.max_frame_bytes,
        )

    def _advert(self) -> Advert:
        """What hello/status say: healthy runtimes and usable GPUs, and the labels they earn."""
        healthy = self.healthy
        tools = tuple(
            ToolInfo(name=Tool(rt.tool), version=rt.version)
            for rt in self.runtimes.values()
            if rt.tool in set(Tool) and (healthy is None or rt.tool in healthy)
        )
        comfyui = self.runtimes.get(Tool.COMFYUI.value)
        stats = SystemStats(
            comfyui_version=comfyui.version if comfyui else None,
            pytorch_version=getattr(comfyui, "pytorch_version", None),
            os_type=platform.system(),
        )
        gpus = self._gpus(comfyui)
        derived = (*hardware.gpu_labels(gpus), *(t.name.value for t in tools))
        labels = tuple(dict.fromkeys((*derived, *self.settings.agent_labels)))
        settings = self.settings
        return Advert(
            tools=tools,
            labels=labels,
            region=settings.region,
            capability=hardware.capability(settings.work_dir, settings.cache_dir, gpus),
            system_stats=stats,
            models=self.syncer.held() if self.syncer is not None else (),
        )

    def _gpus(self, comfyui: Runtime | None) -> list[GpuInfo]:
        """The usable GPUs: NVML's, or ComfyUI's CUDA devices on a host where NVML is missing."""
        state = self.gpu_state
        if state.inventory.gpus or not self.settings.gpu.enabled:
            return state.gpu_infos()
        devices = getattr(comfyui, "devices", [])
        return [
            GpuInfo(
                index=index,
                name=str(device.get("name", ""))[:256],
                vram_total=int(device.get("vram_total") or 0),
                vram_free=int(device.get("vram_free") or 0),
            )
            for index, device in enumerate(d for d in devices if d.get("type") == "cuda")
        ]

    def _publish(self) -> None:
        """Push the advert and the health-derived status (``status`` only when they changed)."""
        now = time.monotonic()
        self.manager.perform(self.session.set_advert(self._advert(), now))
        reasons = []
        healthy = self.healthy
        if self.runtimes and healthy is not None and not healthy:
            reasons.append(f"runtime not healthy: {', '.join(sorted(self.runtimes))}")
        if self.gpu_state.all_unusable:
            reasons.append("no usable GPU: " + "; ".join(self.gpu_state.problems.values()))
        status = AgentStatus.UNHEALTHY if reasons else None
        if status is None and self.sync_progress is not None:
            status, reasons = AgentStatus.SYNCING, ["pulling the team's models"]
        self.manager.perform(self.session.set_status(status, now, "; ".join(reasons)[:256]))

    async def main(self) -> int:
        """Run until the lifecycle reaches STOPPED (or a fatal error)."""
        loop = asyncio.get_running_loop()
        timeouts = self.settings.timeouts
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=timeouts.connect_s)) as http:
            self.manager = TaskManager(
                self.settings, self.session, self.journal, self.runtimes, http, metrics=self.metrics
            )
            self.manager.on_drain = self._gateway_drain
            settings = self.settings
            self.syncer = Syncer(
                ModelCache(
                    settings.cache_dir / "models", budget_bytes=settings.models.budget_bytes
                ),
                settings.models_dir(),
                http,
                parallel=settings.models.parallel,
                on_progress=self._synced,
                in_use=self._models_in_use,
            )
            self.manager.on_sync = self.syncer.offer
            self.manager.missing_models = self.syncer.missing
            self.manager.cached_models = self._cached_models
            # late-bound: gpu_state is replaced by every sample
            self.manager.vram_refusal = lambda need_gb: self.gpu_state.vram_refusal(need_gb)  # noqa: PLW0108
            self.manager.recover()
            connection = Connection(
                self.settings,
                self.session,
                self.credential,
                self.manager.perform,
                on_connected=self._connected,
                on_disconnected=self._disconnected,
            )
            self.manager.transport = connection
            self.connection = connection
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
            try:
                self.gpu_state = await self._sample_gpus(self.gpus.start)
                for runtime in self.runtimes.values():
                    await runtime.start()
                self.session.set_advert(self._advert(), time.monotonic())  # now with versions
                await self._supervise(connection)
            finally:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
                for runtime in self.runtimes.values():
                    await runtime.close()
                with contextlib.suppress(TimeoutError):  # a hung NVML must not hang the exit
                    await asyncio.wait_for(asyncio.to_thread(self.gpus.close), NVML_CLOSE_S)
                self.journal.close()
                self.notifier.close()
        if self.fatal is not None:
            raise self.fatal
        return int(self.lifecycle.exit_code)

    async def _supervise(self, connection: Connection) -> None:
        """Run every part; end them all when the lifecycle stops or the link fails for good."""
        async with asyncio.TaskGroup() as group:
            parts = [
                group.create_task(self._link(connection), name="connection"),
                group.create_task(self.manager.run(), name="tasks"),
                group.create_task(
                    feed_watchdog(self.notifier, self.gate, time.monotonic), name="watchdog"
                ),
                group.create_task(self._sample_resources(), name="resources"),
                group.create_task(self._watch_runtimes(), name="runtime health"),
                group.create_task(self._observe(), name="observe endpoint"),
                group.create_task(self._sync_models(), name="model sync"),
            ]
            stopper = group.create_task(self._stop_when_told(), name="lifecycle")
            await asyncio.wait({parts[0], stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (*parts, stopper):
                task.cancel()

    async def _sample_resources(self) -> None:
        """Read the GPUs and the machine for the next heartbeat; act on GPU health changes."""
        while True:
            state = await self._sample_gpus(self.gpus.sample)
            before = self.gpu_state.problems
            for index in sorted(set(state.problems) - set(before)):
                log.warning("GPU not offered work", gpu=index, reason=state.problems[index])
            for index in sorted(set(before) - set(state.problems)):
                log.info("GPU healthy again", gpu=index)
            self.gpu_state = state
            self._publish()  # refreshes free VRAM for the next hello; status only on change
            self._gate_community()
            snapshots = state.snapshots()
            resources = hardware.resources(self.settings.work_dir, snapshots)
            self.session.set_resources(resources, self.sync_progress)
            self.metrics.gpus(snapshots)
            self._count_slots()
            await asyncio.sleep(self.settings.timeouts.heartbeat_s)  # a sampling period

    def _community_gate(self) -> Gate:
        running = bool(getattr(self, "manager", None) and self.manager.runners)
        return community_gate(
            self.settings.pools.community,
            datetime.now(UTC),
            self.gpu_state,
            own_pids=process_tree(os.getpid()),
            tasks_running=running,
        )

    def _gate_community(self) -> None:
        """Open or close the community pool (hours, idleness); log each change."""
        if not self.settings.pools.community.enabled:
            return
        gate, was = self._community_gate(), self.community
        self.community = gate
        if gate.reason != was.reason:
            if gate.reason:
                log.info("community pool closed", reason=gate.reason)
            else:
                log.info("community pool open", max_concurrent=gate.cap)
        cap = min(gate.cap, self.session.config.slots)
        self.manager.perform(self.session.set_pool_cap(Pool.COMMUNITY, cap, time.monotonic()))

    async def _sample_gpus(self, sample: Callable[[], GpuState]) -> GpuState:
        """Run an NVML sample off the event loop; a hung one reads as NVML not answering."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(sample), NVML_ANSWER_S)
        except TimeoutError:
            log.error("NVML did not answer", timeout_s=NVML_ANSWER_S)  # noqa: TRY400 - no traceback to show
            return self.gpus.not_answering()

    async def _watch_runtimes(self) -> None:
        """Offer only healthy runtimes; with none healthy the agent is ``unhealthy``."""
        while True:
            healthy = frozenset([tool for tool, rt in self.runtimes.items() if await rt.healthy()])
            if healthy != self.healthy:
                self.healthy = healthy
                failing = sorted(set(self.runtimes) - healthy)
                log.info("runtime health", healthy=sorted(healthy), failing=failing)
                self._publish()
            await asyncio.sleep(RUNTIME_CHECK_S)  # the health-check period

    async def _link(self, connection: Connection) -> None:
        """The connection, until a fatal error (bad credential, protocol version)."""
        try:
            await connection.run()
        except AgentError as exc:
            self.fatal = exc

    # ------------------------------------------------------------------ lifecycle

    def _on_signal(self, signum: int) -> None:
        transition = self.lifecycle.on_signal(signum)
        log.info(
            "signal received", signal=signal.Signals(signum).name, phase=transition.after.value
        )
        self.changed.set()

    def _gateway_drain(self, reason: str) -> None:
        """A gateway ``drain`` stops new work; the agent stays up, idle, until restarted."""
        log.info("the gateway asked this agent to drain", reason=reason)
        self.notifier.status(f"draining (gateway: {reason})")

    async def _stop_when_told(self) -> None:
        """Carry the lifecycle from DRAINING to STOPPED."""
        manager = self.manager
        timeouts = self.settings.timeouts
        while self.lifecycle.phase is Phase.RUNNING:
            await self._phase_change()
        if self.lifecycle.phase is Phase.DRAINING:
            manager.perform(self.session.drain(time.monotonic()))
            self.notifier.stopping("draining: finishing running tasks")
            if not await self._until(lambda: not manager.runners, timeouts.drain_grace_s):
                self.lifecycle.on_drain_deadline()
        if self.lifecycle.phase is Phase.CANCELLING:
            manager.perform(self.session.drain(time.monotonic()))
            self.notifier.stopping("stopping: cancelling running tasks")
            manager.cancel_all("the agent is stopping")
            grace = timeouts.cancel_grace_s + timeouts.kill_grace_s + CANCEL_SLACK_S
            await self._until(lambda: not manager.runners, grace)
        if self.lifecycle.phase is not Phase.STOPPED:
            await self._until(manager.idle, ACK_WAIT_S)
            self.lifecycle.on_idle()

    async def _phase_change(self) -> None:
        self.changed.clear()
        await self.changed.wait()

    async def _until(self, done: Callable[[], bool], limit: float) -> bool:
        """Wait until ``done()`` (True), or the timeout or a phase change (False)."""
        phase = self.lifecycle.phase
        deadline = time.monotonic() + limit
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.lifecycle.phase is not phase:
                return False
            waiters = {
                asyncio.ensure_future(self._phase_change()),
                asyncio.ensure_future(self.manager.wait_changed()),
            }
            _, pending = await asyncio.wait(
                waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
        return True

    # ------------------------------------------------------------------ connection events

    def _connected(self) -> None:
        self.metrics.connection(up=True)
        self.gate.connected(time.monotonic())
        self.notifier.ready(f"connected to {self.settings.gateway_url}")

    def _disconnected(self) -> None:
        self.metrics.connection(up=False)
        self.manager.disconnected()
        self.gate.disconnected(time.monotonic())
        self.notifier.status("disconnected from the gateway; reconnecting")

    # ------------------------------------------------------------------ models

    async def _sync_models(self) -> None:
        if self.syncer is not None:
            await self.syncer.run()

    def _synced(self, progress: SyncProgress | None) -> None:
        """Model sync progress: ``syncing`` while models are pulled, back to normal after."""
        was = self.sync_progress
        self.sync_progress = progress
        self.session.set_resources(self.session.resources, progress)
        if progress is None or was is None:  # started, or done (the models held changed)
            self._publish()

    def _cached_models(self) -> list[str]:
        """Model file names of the team's set that the cache holds (the policy allows them)."""
        syncer = self.syncer
        if syncer is None:
            return []
        return [s.model_path for s in syncer.specs.values() if syncer.cache.has(s.sha256)]

    def _models_in_use(self) -> set[str]:
        """Content hashes that running tasks need (never evicted)."""
        if self.syncer is None:
            return set()
        specs = self.syncer.specs
        return {
            specs[name].sha256
            for runner in self.manager.runners.values()
            for name in runner.assign.required_models
            if name in specs
        }

    # ------------------------------------------------------------------ observability

    async def _observe(self) -> None:
        """Serve /healthz, /readyz, /metrics and /status (see :mod:`agent.observe`)."""
        observe = self.settings.observe
        if observe.address is None:
            return
        host, port = observe.address
        server = ObserveServer(
            host, port, self.metrics, self.not_ready, self.state, token=observe.token()
        )
        try:
            await server.serve()
        except OSError as exc:  # the agent's work goes on without its endpoint
            log.error(  # noqa: TRY400 - the reason is the whole story
                "observe endpoint not started", listen=observe.listen, reason=str(exc)
            )

    def not_ready(self) -> list[str]:
        """Why this agent cannot take work now (empty: it can)."""
        reasons = []
        if self.connection is None or not self.connection.connected:
            reasons.append("not connected to the gateway")
        status = self.session.agent_status()
        if status not in {AgentStatus.IDLE, AgentStatus.BUSY}:
            reasons.append(f"agent status is {status.value}")
        if self.runtimes and self.healthy is not None and not self.healthy:
            reasons.append("no runtime is healthy")
        if self.gpu_state.all_unusable:
            reasons.append("no usable GPU: " + "; ".join(self.gpu_state.problems.values()))
        return reasons

    def state(self) -> dict[str, Any]:
        """What ``/status`` (and ``cyberun-agent status``) shows."""
        session, advert = self.session, self.session.advert
        connected = self.connection is not None and self.connection.connected
        reasons = self.not_ready()
        return {
            "agent_id": self.agent_id,
            "agent_version": __version__,
            "gateway_url": self.settings.gateway_url,
            "connected": connected,
            "agent_status": session.agent_status().value,
            "ready": not reasons,
            "not_ready": reasons,
            "labels": list(advert.labels),
            "region": advert.region,
            "capacity": {pool.value: n for pool, n in session.capacity().items()},
            "free_slots": {pool.value: n for pool, n in session.free_slots().items()},
            "running": [{"task_id": r.task_id, "attempt": r.attempt} for r in session.running()],
            "runtimes": {
                tool: {
                    "version": rt.version,
                    "healthy": None if self.healthy is None else tool in self.healthy,
                }
                for tool, rt in self.runtimes.items()
            },
            "gpus": [
                s.model_dump(mode="json", exclude_none=True) for s in self.gpu_state.snapshots()
            ],
            "nvml": self.gpu_state.nvml or "ok",
            "community": {
                "enabled": self.settings.pools.community.enabled,
                "open": self.settings.pools.community.enabled and not self.community.reason,
                "closed_reason": self.community.reason or None,
            },
            "contribution": self.metrics.contribution(),
            "contribution_since": self.contribution.since_text,
        }

    def _count_slots(self) -> None:
        session = self.session
        capacity = {pool.value: n for pool, n in session.capacity().items()}
        self.metrics.slots(capacity, {pool.value: n for pool, n in session.free_slots().items()})
        self.metrics.status(session.agent_status())
