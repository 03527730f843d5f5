"""A protocol-level simulated agent: the real sans-I/O session over a real WebSocket.

Used to test the gateway (scheduler, leases, cancel…) without GPUs or runtimes. It runs the
agent's own :class:`~agent.protocol.session.Session`, so the gateway is exercised by the
same protocol engine the daemon uses. Everything it receives is recorded in queues the
tests await with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect

from agent.protocol.actions import (
    AbandonTask,
    Action,
    CancelTask,
    Close,
    Deliver,
    Established,
    Evaluate,
    Send,
    StartTask,
    SyncModels,
)
from agent.protocol.codec import encode
from agent.protocol.messages import (
    SUBPROTOCOL,
    Capability,
    GpuInfo,
    OutputFile,
    Pool,
    RejectReason,
    SyncModel,
    TaskAssign,
    TaskRef,
    TaskUploadUrls,
    Tool,
    ToolInfo,
    UploadFile,
    Welcome,
)
from agent.protocol.session import Advert, Session, SessionConfig

GIB = 1024**3
Mode = Literal["accept", "reject", "ignore"]


class SimAgent:
    """One simulated agent connection (use as ``async with``)."""

    def __init__(
        self,
        ws_url: str,
        credential: str,
        agent_id: str,
        *,
        labels: Sequence[str] = ("gpu", "comfyui"),
        region: str = "",
        community: int | None = None,
        slots: int = 1,
        vram_gb: Sequence[float] = (24,),
        tools: Sequence[Tool] = (Tool.COMFYUI,),
        mode: Mode = "accept",
        reject_reason: RejectReason = RejectReason.POLICY_DENIED,
        models: Sequence[str] = (),
    ) -> None:
        """Describe the agent; nothing connects until ``async with``."""
        self.ws_url = ws_url
        self.credential = credential
        self.mode = mode
        self.reject_reason = reject_reason
        caps = {Pool.TEAM: slots} | ({Pool.COMMUNITY: community} if community is not None else {})
        self.session = Session(
            SessionConfig(agent_id=agent_id, agent_version="sim-1", slots=slots, pool_caps=caps),
            wall_offset=time.time() - time.monotonic(),
            advert=Advert(
                tools=tuple(ToolInfo(name=t, version="1.0") for t in tools),
                labels=tuple(labels),
                region=region,
                models=tuple(models),
                capability=Capability(
                    platform_arch="linux/amd64",
                    gpus=[
                        GpuInfo(
                            index=i, name="Sim GPU", vram_total=int(v * GIB), vram_free=int(v * GIB)
                        )
                        for i, v in enumerate(vram_gb)
                    ],
                ),
            ),
        )
        self.assigns: asyncio.Queue[TaskAssign] = asyncio.Queue()
        self.offers: asyncio.Queue[TaskAssign] = asyncio.Queue()
        self.cancels: asyncio.Queue[CancelTask] = asyncio.Queue()
        self.abandons: asyncio.Queue[AbandonTask] = asyncio.Queue()
        self.syncs: asyncio.Queue[tuple[SyncModel, ...]] = asyncio.Queue()
        """Each model set received (``welcome.sync`` first, then every ``sync``)."""
        self.replies: dict[str, asyncio.Future[TaskUploadUrls]] = {}
        self.welcome: Welcome | None = None
        self._established = asyncio.Event()
        self._changed = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SimAgent:
        """Connect, say hello and wait for the welcome."""
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close cleanly."""
        await self.close()

    async def connect(self, timeout: float = 10) -> None:
        """Open the WebSocket and complete the handshake."""
        self._established.clear()
        self._ws = await connect(
            self.ws_url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {self.credential}"},
            proxy=None,
            open_timeout=timeout,
        )
        await self._perform(self.session.connected(self._now()))
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._ticker())]
        await asyncio.wait_for(self._established.wait(), timeout)

    async def close(self) -> None:
        """Close the connection (the session keeps its tasks, like a real agent)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        await self._perform(self.session.disconnected(self._now()))

    # ------------------------------------------------------------------ agent actions

    async def next_assign(self, timeout: float = 10) -> TaskAssign:
        """Wait for the next task this agent started."""
        return await asyncio.wait_for(self.assigns.get(), timeout)

    async def next_offer(self, timeout: float = 10) -> TaskAssign:
        """Wait for the next assign offered (whatever the mode does with it)."""
        return await asyncio.wait_for(self.offers.get(), timeout)

    async def next_cancel(self, timeout: float = 10) -> CancelTask:
        """Wait for the next cancel the gateway sent for a running task."""
        return await asyncio.wait_for(self.cancels.get(), timeout)

    async def next_sync(self, timeout: float = 10) -> tuple[SyncModel, ...]:
        """Wait for the next model set the gateway sent (``welcome.sync`` or ``sync``)."""
        return await asyncio.wait_for(self.syncs.get(), timeout)

    async def progress(self, task: TaskRef, value: float, **extra: Any) -> None:
        """Report progress."""
        await self._perform(self.session.progress(task, self._now(), progress=value, **extra))

    async def upload_urls(
        self, task: TaskRef, files: list[UploadFile], timeout: float = 10
    ) -> TaskUploadUrls:
        """Ask for upload URLs and wait for the reply."""
        request_id, actions = self.session.request_upload(task, files, self._now())
        assert request_id is not None
        future: asyncio.Future[TaskUploadUrls] = asyncio.get_running_loop().create_future()
        self.replies[request_id] = future
        await self._perform(actions)
        return await asyncio.wait_for(future, timeout)

    async def complete(self, task: TaskRef, outputs: list[OutputFile] | None = None) -> None:
        """Report success."""
        await self._perform(self.session.complete(task, self._now(), outputs or []))

    async def cancelled(self, task: TaskRef, reason: str) -> None:
        """Report a cancellation."""
        await self._perform(self.session.cancelled(task, self._now(), reason))

    async def wait_acknowledged(self, timeout: float = 10) -> None:
        """Wait until every terminal message was acknowledged by the gateway."""
        while self.session.pending_terminals():
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ------------------------------------------------------------------ shell

    def _now(self) -> float:
        return time.monotonic()

    async def _reader(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(Exception):
            async for frame in self._ws:
                await self._perform(self.session.receive(frame, self._now()))
                self._changed.set()

    async def _ticker(self) -> None:
        while True:
            deadline = self.session.next_deadline()
            delay = 0.05 if deadline is None else max(0.0, min(0.5, deadline - self._now()))
            await asyncio.sleep(delay)
            await self._perform(self.session.tick(self._now()))

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            await self._do(action)

    async def _do(self, action: Action) -> None:
        match action:
            case Send():
                if self._ws is not None:
                    with contextlib.suppress(Exception):
                        await self._ws.send(encode(action.message))
            case Established():
                self.welcome = action.welcome
                self._established.set()
            case Evaluate():
                await self._evaluate(action.assign)
            case Close():
                if self._ws is not None:
                    await self._ws.close(int(action.code), action.reason)
            case _:
                self._record(action)

    def _record(self, action: Action) -> None:
        match action:
            case StartTask():
                self.assigns.put_nowait(action.assign)
            case CancelTask():
                self.cancels.put_nowait(action)
            case AbandonTask():
                self.abandons.put_nowait(action)
            case SyncModels():
                self.syncs.put_nowait(action.models)
            case Deliver():
                future = self.replies.pop(action.message.re or "", None)
                if future is not None and not future.done():
                    future.set_result(action.message)

    async def _evaluate(self, assign: TaskAssign) -> None:
        self.offers.put_nowait(assign)
        ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
        if self.mode == "accept":
            await self._perform(self.session.decide(ref, self._now()))
        elif self.mode == "reject":
            await self._perform(self.session.decide(ref, self._now(), reject=self.reject_reason))
