"""Which agent gets a task: eligibility rules and the score among eligible agents (pure).

Eligible (all must hold):

- the agent's labels are a superset of the workflow's ``required_labels``;
- pool: ``team`` tasks go to agents of the submitting team; ``community`` tasks to agents
  of any team that offer the community pool (the owner opted in);
- the agent has a free credit in that pool and its status is ``idle`` or ``busy``;
- ``min_vram_gb`` ≤ the VRAM of at least one of its GPUs (0 = no GPU needed);
- the tool matches one the agent offers and still labels (an unhealthy runtime's label
  is dropped from the agent's status);
- the agent did not refuse this task for a lasting reason (policy, unsupported node…).

Score (higher wins; ties go to the agent connected longest)::

    score = 4·region + 2·free_ratio + 1·gpu_fit + 1·warm + 0.5·preferred_gpu

- ``region``: 1 when the submitter's region equals the agent's, 0 when both are known and
  differ, 0.5 when either is unknown (empty) — so no agent is ever disqualified by region;
- ``free_ratio``: free credits / capacity in the pool (spreads load);
- ``gpu_fit``: ``min_vram / vram`` of the smallest GPU that fits, so big GPUs stay free for
  big jobs (1 when the workflow needs no VRAM);
- ``warm``: fraction of ``required_models`` already in the agent's cache;
- ``preferred_gpu``: 1 when a GPU name contains the workflow's ``preferred_gpu``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

GIB = 1024**3
WEIGHTS = {"region": 4.0, "free": 2.0, "gpu_fit": 1.0, "warm": 1.0, "preferred": 0.5}


@dataclass(frozen=True)
class AgentView:
    """What the scheduler knows of one connected agent."""

    key: str
    team_id: str
    labels: frozenset[str]
    pools: frozenset[str]
    region: str
    free: dict[str, int]
    capacity: dict[str, int]
    status: str
    tools: frozenset[str]
    gpu_vram: tuple[int, ...] = ()
    gpu_names: tuple[str, ...] = ()
    models: frozenset[str] = frozenset()
    connected_at: float = 0.0


@dataclass(frozen=True)
class Demand:
    """What a task needs."""

    team_id: str
    pool: str
    tool: str
    required_labels: frozenset[str] = frozenset()
    min_vram_gb: float = 0.0
    submitter_region: str = ""
    required_models: frozenset[str] = frozenset()
    preferred_gpu: str | None = None
    refused_by: frozenset[str] = field(default_factory=frozenset)


def eligible(agent: AgentView, demand: Demand) -> bool:
    """Whether ``agent`` may receive a task with ``demand`` right now."""
    if agent.key in demand.refused_by or agent.status not in {"idle", "busy"}:
        return False
    if demand.pool == "team" and agent.team_id != demand.team_id:
        return False
    if demand.pool not in agent.pools or agent.free.get(demand.pool, 0) < 1:
        return False
    if demand.tool not in agent.tools or demand.tool not in agent.labels:
        return False  # a tool whose runtime turned unhealthy loses its label
    if not demand.required_labels <= agent.labels:
        return False
    need = int(demand.min_vram_gb * GIB)
    return need == 0 or any(v >= need for v in agent.gpu_vram)


def region_factor(agent_region: str, submitter_region: str) -> float:
    """1 for a match, 0 for a known mismatch, 0.5 when either side is unknown."""
    if not agent_region or not submitter_region:
        return 0.5
    return 1.0 if agent_region == submitter_region else 0.0


def gpu_fit(agent: AgentView, min_vram_gb: float) -> float:
    """How snugly the smallest fitting GPU matches the need (1 = exact, → 0 = oversized)."""
    need = int(min_vram_gb * GIB)
    fitting = [v for v in agent.gpu_vram if v >= need and v > 0]
    if need == 0:
        return 1.0
    return need / min(fitting) if fitting else 0.0


def score(agent: AgentView, demand: Demand) -> float:
    """The agent's score for this demand (see the module docstring)."""
    capacity = max(1, agent.capacity.get(demand.pool, 1))
    free_ratio = agent.free.get(demand.pool, 0) / capacity
    warm = (
        len(demand.required_models & agent.models) / len(demand.required_models)
        if demand.required_models
        else 0.0
    )
    preferred = 0.0
    if demand.preferred_gpu:
        wanted = demand.preferred_gpu.lower()
        preferred = 1.0 if any(wanted in name.lower() for name in agent.gpu_names) else 0.0
    return (
        WEIGHTS["region"] * region_factor(agent.region, demand.submitter_region)
        + WEIGHTS["free"] * free_ratio
        + WEIGHTS["gpu_fit"] * gpu_fit(agent, demand.min_vram_gb)
        + WEIGHTS["warm"] * warm
        + WEIGHTS["preferred"] * preferred
    )


def choose(agents: Iterable[AgentView], demand: Demand) -> AgentView | None:
    """The best eligible agent, or ``None`` (the task then waits)."""
    best: tuple[float, float, AgentView] | None = None
    for agent in agents:
        if not eligible(agent, demand):
            continue
        candidate = (score(agent, demand), -agent.connected_at, agent)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return best[2] if best is not None else None
