"""Builders for protocol messages as a gateway would send them, for tests."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.protocol.messages import (
    Ack,
    Drain,
    Pool,
    ResumeAction,
    ResumeEntry,
    TaskAssign,
    TaskCancel,
    TaskRef,
    Tool,
    Welcome,
)
from agent.protocol.session import Session, SessionConfig

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
WALL_OFFSET = T0.timestamp()
_counter = itertools.count(1)


def next_id() -> str:
    """Return a fresh, unique message id."""
    return f"gw-{next(_counter)}"


def make_session(
    slots: int = 2,
    community: int | None = None,
    *,
    retransmit_s: float = 5.0,
    handshake_s: float = 10.0,
    preempt: bool = False,
    only_when_idle: bool = False,
) -> Session:
    """Build a session for agent ``gpu-node-01`` with deterministic random bytes."""
    caps = {Pool.TEAM: slots}
    if community is not None:
        caps[Pool.COMMUNITY] = community
    config = SessionConfig(
        agent_id="gpu-node-01",
        agent_version="0.1.0",
        slots=slots,
        pool_caps=caps,
        retransmit_s=retransmit_s,
        handshake_s=handshake_s,
        preemptible=frozenset({Pool.COMMUNITY}) if preempt else frozenset(),
        exclusive=frozenset({Pool.COMMUNITY}) if only_when_idle else frozenset(),
    )
    rng = random.Random(7)  # noqa: S311 - ids only need to be distinct, and repeatable in tests
    return Session(config, wall_offset=WALL_OFFSET, random_bytes=rng.randbytes)


def welcome(
    resume: dict[tuple[str, int], ResumeAction] | None = None,
    pools: tuple[Pool, ...] = (Pool.TEAM, Pool.COMMUNITY),
    heartbeat_s: float = 15.0,
    agent_id: str = "gpu-node-01",
) -> Welcome:
    """Build a ``welcome`` for ``gpu-node-01``."""
    entries = [ResumeEntry(task_id=k[0], attempt=k[1], action=v) for k, v in (resume or {}).items()]
    return Welcome(
        id=next_id(),
        ts=T0,
        agent_id=agent_id,
        session_id="s-1",
        heartbeat_interval_s=heartbeat_s,
        lease_ttl_s=60,
        server_time=T0,
        resume=entries,
        pools=list(pools),
    )


def assign(task_id: str = "t1", attempt: int = 0, pool: Pool = Pool.TEAM) -> TaskAssign:
    """Build a ``task.assign`` for a tiny ComfyUI workflow."""
    workflow: dict[str, Any] = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}
    return TaskAssign(
        id=next_id(),
        ts=T0,
        task_id=task_id,
        attempt=attempt,
        pool=pool,
        tool=Tool.COMFYUI,
        workflow=workflow,
        lease_expires_at=T0 + timedelta(seconds=60),
    )


def cancel(task_id: str = "t1", attempt: int | None = 0, reason: str = "user") -> TaskCancel:
    """Build a ``task.cancel``."""
    return TaskCancel(id=next_id(), ts=T0, task_id=task_id, attempt=attempt, reason=reason)


def ack(task: TaskRef, re: str | None = None) -> Ack:
    """Build an ``ack`` of a terminal message."""
    return Ack(id=next_id(), ts=T0, task_id=task.task_id, attempt=task.attempt, re=re)


def drain(reason: str = "maintenance") -> Drain:
    """Build a ``drain``."""
    return Drain(id=next_id(), ts=T0, reason=reason)


def ref(task_id: str = "t1", attempt: int = 0) -> TaskRef:
    """Build a task reference."""
    return TaskRef(task_id=task_id, attempt=attempt)
