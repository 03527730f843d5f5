"""When the community pool gets credit: the owner's hours and "only when idle" (pure).

The community pool is opt-in (``pools.community.enabled``). While it is enabled, its cap
is ``max_concurrent`` — or 0, so the agent advertises no community credit, when:

- the time is outside ``hours`` (in ``timezone``);
- ``only_when_idle`` is set and the GPUs are not idle: a usable GPU is busier than
  ``idle_max_utilization`` while none of this agent's tasks runs, or (``idle_check_processes``)
  a GPU process outside the agent's own process tree runs. A team task held by the agent
  closes the pool too; the session applies that part at once (``SessionConfig.exclusive``).

The app re-evaluates the gate on every resource sample (``timeouts.heartbeat_s``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from agent.health import GpuState
from agent.settings import CommunityPoolSettings


@dataclass(frozen=True)
class Gate:
    """The community pool's cap now, and why it is closed (``reason`` empty when open)."""

    cap: int
    reason: str = ""


def community_gate(
    settings: CommunityPoolSettings,
    at: datetime,
    gpus: GpuState,
    *,
    own_pids: Collection[int],
    tasks_running: bool,
) -> Gate:
    """The cap the community pool should have at the aware datetime *at*."""
    if not settings.enabled:
        return Gate(0, "pools.community.enabled is false")
    if not settings.is_open(at):
        hours = ", ".join(settings.hours)
        return Gate(0, f"outside pools.community.hours ({hours} {settings.timezone})")
    if settings.only_when_idle:
        # our own tasks make the GPU busy: then only foreign processes count
        problem = gpus.idle_problem(
            own_pids=own_pids,
            max_utilization=101.0 if tasks_running else settings.idle_max_utilization,
            check_processes=settings.idle_check_processes,
        )
        if problem is not None:
            return Gate(0, f"only_when_idle: {problem}")
    return Gate(settings.max_concurrent)
