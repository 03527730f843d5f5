"""Driving a real gateway from a benchmark: REST submits, SSE follows, timed simulated agents.

The gateway is the real ``cyberun-gateway serve`` subprocess (``tests.gateway_process``). The
simulated agents are ``tests.simagent.SimAgent``: the agent's own sans-I/O session over a real
WebSocket; :class:`TimedSimAgent` adds the moment each ``task.assign`` was decoded and a loop
that completes every started task at once (no outputs), so its slot frees immediately.

Every wait here has a timeout (``BenchError`` when it passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from agent.protocol.messages import TaskAssign, TaskRef
from bench._common import BenchError
from tests.simagent import SimAgent

TERMINAL = frozenset({"completed", "failed", "cancelled"})
FOLLOW_TIMEOUT_S = 60.0  # one task, submit to terminal event
IDLE_TIMEOUT_S = 30.0
IDLE_POLL_S = 0.005
HTTP_TIMEOUT_S = 30.0


def rest_client(api: str, credential: str, *, connections: int = 20) -> httpx.AsyncClient:
    """Return an async REST client for the gateway's ``/api/v1`` with ``credential``."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=api,
        headers={"Authorization": f"Bearer {credential}"},
        timeout=HTTP_TIMEOUT_S,
        limits=limits,
        trust_env=False,  # loopback only: no proxy from the environment
    )


@dataclass
class Submitted:
    """One REST submit: the task id and when (wall clock and ``perf_counter``) it was sent."""

    task_id: str
    sent_wall: float
    sent: float
    answered: float  # perf_counter when the 202 arrived


async def submit(http: httpx.AsyncClient, workflow_id: str, **request: Any) -> Submitted:
    """``POST /r/workflows/{id}/run``; return the task id and the client-side timestamps."""
    sent_wall, sent = time.time(), time.perf_counter()
    answer = await http.post(f"/r/workflows/{workflow_id}/run", json=request)
    answered = time.perf_counter()
    if answer.status_code != 202:
        raise BenchError(f"run answered {answer.status_code}: {answer.text[:300]}")
    return Submitted(str(answer.json()["task_id"]), sent_wall, sent, answered)


@dataclass
class Followed:
    """What a task's SSE stream showed: when each status / event first arrived (perf_counter)."""

    first_seen: dict[str, float] = field(default_factory=dict)
    progress: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    terminal: str = ""


async def _sse(http: httpx.AsyncClient, task_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    async with http.stream("GET", f"/r/tasks/{task_id}/events") as stream:
        if stream.status_code != 200:
            raise BenchError(f"events of {task_id} answered {stream.status_code}")
        event = ""
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event:
                yield event, json.loads(line[len("data: ") :])


async def follow(
    http: httpx.AsyncClient, task_id: str, timeout_s: float = FOLLOW_TIMEOUT_S
) -> Followed:
    """Read ``/r/tasks/{id}/events`` until the terminal event; timestamp what arrives."""
    seen = Followed()
    try:
        async with asyncio.timeout(timeout_s):
            async for event, data in _sse(http, task_id):
                now = time.perf_counter()
                if event == "status":
                    seen.first_seen.setdefault(str(data.get("task_status")), now)
                elif event == "progress":
                    seen.progress.append((now, data))
                else:
                    seen.first_seen.setdefault(event, now)
                if event in TERMINAL:
                    seen.terminal = event
                    return seen
    except TimeoutError:
        raise BenchError(f"{task_id} did not finish within {timeout_s} s") from None
    raise BenchError(f"the event stream of {task_id} ended before a terminal event")


async def task_record(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    """``GET /r/tasks/{id}``."""
    answer = await http.get(f"/r/tasks/{task_id}")
    answer.raise_for_status()
    record: dict[str, Any] = answer.json()
    return record


def wall(iso: str) -> float:
    """Return an ISO 8601 timestamp (``Z`` or an offset) as POSIX seconds."""
    return datetime.fromisoformat(iso).timestamp()


def gateway_queued_times(database: Path) -> dict[str, float]:
    """Return task id → when the gateway stored its first ``queued`` status (wall clock)."""
    found: dict[str, float] = {}
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT task_id, data, created_at FROM task_events WHERE event='status' ORDER BY seq"
        ).fetchall()
    for task_id, data, created_at in rows:
        if json.loads(data).get("task_status") == "queued" and task_id not in found:
            found[task_id] = wall(created_at)
    return found


async def wait_agent_idle(
    http: httpx.AsyncClient, agent_id: str, timeout_s: float = IDLE_TIMEOUT_S
) -> None:
    """Poll ``GET /r/agents`` until ``agent_id`` is connected, idle and runs nothing."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                answer = await http.get("/r/agents")
                answer.raise_for_status()
                for agent in answer.json()["agent_list"]:
                    if agent["agent_id"] == agent_id and (
                        agent["agent_status"] == "idle" and agent["running_count"] == 0
                    ):
                        return
                await asyncio.sleep(IDLE_POLL_S)  # a poll interval under a deadline
    except TimeoutError:
        raise BenchError(f"agent {agent_id} not idle within {timeout_s} s") from None


async def create_workflow(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """``POST /workflows``; return the workflow id."""
    answer = await http.post("/workflows", json=body)
    if answer.status_code != 201:
        raise BenchError(f"creating a workflow answered {answer.status_code}: {answer.text}")
    return str(answer.json()["id"])


class AssignLog:
    """When each ``task.assign`` reached a simulated agent (``perf_counter``), shared by many."""

    def __init__(self) -> None:
        """Start empty."""
        self.times: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}

    def record(self, task_id: str) -> None:
        """Note that ``task_id``'s assign arrived now (the first arrival counts)."""
        if task_id in self.times:
            return
        now = self.times[task_id] = time.perf_counter()
        waiter = self._waiters.pop(task_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    async def wait(self, task_id: str, timeout_s: float) -> float:
        """Return when ``task_id``'s assign arrived, waiting up to ``timeout_s`` for it."""
        if task_id in self.times:
            return self.times[task_id]
        waiter = self._waiters.setdefault(task_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise BenchError(f"no agent received {task_id} within {timeout_s} s") from None


class TimedSimAgent(SimAgent):
    """A :class:`SimAgent` that timestamps each ``task.assign`` and completes tasks at once."""

    def __init__(
        self, ws_url: str, credential: str, agent_id: str, log: AssignLog, **options: Any
    ) -> None:
        """See :class:`SimAgent`; every assign's arrival goes to ``log``."""
        super().__init__(ws_url, credential, agent_id, **options)
        self.log = log
        self._finisher: asyncio.Task[None] | None = None

    async def _evaluate(self, assign: TaskAssign) -> None:
        """Timestamp the offer (the session just decoded the frame), then accept it."""
        self.log.record(assign.task_id)
        await super()._evaluate(assign)

    async def connect(self, timeout: float = 10) -> None:  # noqa: ASYNC109 - SimAgent's signature
        """Connect and start completing every started task."""
        await super().connect(timeout)
        if self._finisher is None:
            self._finisher = asyncio.create_task(self._finish_all())

    async def close(self) -> None:
        """Stop the completion loop and close."""
        if self._finisher is not None:
            self._finisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._finisher
            self._finisher = None
        await super().close()

    async def _finish_all(self) -> None:
        while True:
            assign = await self.assigns.get()
            await self.complete(TaskRef(task_id=assign.task_id, attempt=assign.attempt))


async def connect_all(agents: Sequence[TimedSimAgent], concurrency: int, timeout_s: float) -> None:
    """Connect every agent, ``concurrency`` handshakes at a time, within ``timeout_s`` overall."""
    gate = asyncio.Semaphore(concurrency)

    async def one(agent: TimedSimAgent) -> None:
        async with gate:
            await agent.connect(timeout=timeout_s)

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one(agent) for agent in agents))
    except TimeoutError:
        done = sum(1 for agent in agents if agent.welcome is not None)
        raise BenchError(f"only {done}/{len(agents)} agents connected in {timeout_s} s") from None


async def close_all(agents: Sequence[TimedSimAgent]) -> None:
    """Close every agent (errors of already-broken connections are ignored)."""
    results = await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
    del results
