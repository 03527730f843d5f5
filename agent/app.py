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
import os
import platform
import signal
import time
from collections.abc import Callable

import httpx
import structlog

from agent import __version__, hardware
from agent.control.connection import Connection
from agent.errors import AgentError
from agent.lifecycle import Lifecycle, Phase
from agent.protocol.messages import (
    AgentStatus,
    Capability,
    GpuInfo,
    Pool,
    SystemStats,
    Tool,
    ToolInfo,
)
from agent.protocol.session import Advert, Session, SessionConfig
from agent.runtimes.base import Runtime
from agent.runtimes.registry import load_runtimes
from agent.settings import Settings, resolve_agent_id
from agent.systemd import Notifier, WatchdogGate, feed_watchdog
from agent.tasks.journal import Journal
from agent.tasks.manager import TaskManager

log = structlog.get_logger("agent.app")
ACK_WAIT_S = 10.0
"""How long a stopping agent waits for the gateway to acknowledge its last reports."""
WATCHDOG_DISCONNECT_GRACE_S = 120.0
RUNTIME_CHECK_S = 5.0


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
            caps[Pool.COMMUNITY] = min(community.max_concurrent, slots)
        timeouts = settings.timeouts
        return SessionConfig(
            agent_id=self.agent_id,
            agent_version=__version__,
            slots=slots,
            pool_caps=caps,
            handshake_s=timeouts.connect_s,
            retransmit_s=timeouts.retransmit_s,
            default_heartbeat_s=timeouts.heartbeat_s,
            max_frame_bytes=settings.limits.max_frame_bytes,
        )

    def _advert(self, healthy: frozenset[str] | None = None) -> Advert:
        """What hello/status say: tools and their labels only for healthy runtimes."""
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
        derived = tuple(t.name.value for t in tools)
        labels = tuple(dict.fromkeys((*derived, *self.settings.agent_labels)))
        return Advert(
            tools=tools,
            labels=labels,
            region=self.settings.region,
            capability=self._capability(comfyui),
            system_stats=stats,
        )

    def _capability(self, comfyui: Runtime | None) -> Capability:
        """Machine inventory; GPUs from ComfyUI's ``/system_stats`` until NVML reports them."""
        capability = hardware.capability(self.settings.work_dir)
        devices = getattr(comfyui, "devices", [])
        gpus = [
            GpuInfo(
                index=index,
                name=str(device.get("name", ""))[:256],
                vram_total=int(device.get("vram_total") or 0),
                vram_free=int(device.get("vram_free") or 0),
            )
            for index, device in enumerate(d for d in devices if d.get("type") == "cuda")
        ]
        return capability.model_copy(update={"gpus": gpus}) if gpus else capability

    async def main(self) -> int:
        """Run until the lifecycle reaches STOPPED (or a fatal error)."""
        loop = asyncio.get_running_loop()
        timeouts = self.settings.timeouts
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=timeouts.connect_s)) as http:
            self.manager = TaskManager(
                self.settings, self.session, self.journal, self.runtimes, http
            )
            self.manager.on_drain = self._gateway_drain
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
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
            try:
                for runtime in self.runtimes.values():
                    await runtime.start()
                self.session.set_advert(self._advert(), time.monotonic())  # now with versions
                await self._supervise(connection)
            finally:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
                for runtime in self.runtimes.values():
                    await runtime.close()
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
            ]
            stopper = group.create_task(self._stop_when_told(), name="lifecycle")
            await asyncio.wait({parts[0], stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (*parts, stopper):
                task.cancel()

    async def _sample_resources(self) -> None:
        """Refresh the readings the next heartbeat carries (cheap, non-blocking calls)."""
        while True:
            self.session.set_resources(hardware.resources(self.settings.work_dir), None)
            await asyncio.sleep(self.settings.timeouts.heartbeat_s)  # a sampling period

    async def _watch_runtimes(self) -> None:
        """Offer only healthy runtimes; with none healthy the agent is ``unhealthy``."""
        offered: frozenset[str] | None = None
        while True:
            healthy = frozenset([tool for tool, rt in self.runtimes.items() if await rt.healthy()])
            if healthy != offered:
                offered = healthy
                failing = sorted(set(self.runtimes) - healthy)
                log.info("runtime health", healthy=sorted(healthy), failing=failing)
                now = time.monotonic()
                self.manager.perform(self.session.set_advert(self._advert(healthy), now))
                reason = f"runtime not healthy: {', '.join(failing)}" if failing else None
                status = AgentStatus.UNHEALTHY if self.runtimes and not healthy else None
                self.manager.perform(
                    self.session.set_status(status, now, reason if status else None)
                )
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
            grace = timeouts.cancel_grace_s + timeouts.kill_grace_s + 5
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
        self.gate.connected(time.monotonic())
        self.notifier.ready(f"connected to {self.settings.gateway_url}")

    def _disconnected(self) -> None:
        self.manager.disconnected()
        self.gate.disconnected(time.monotonic())
        self.notifier.status("disconnected from the gateway; reconnecting")
