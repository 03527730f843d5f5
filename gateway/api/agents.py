"""``GET /r/agents``: the caller's team's connected agents, with the documented fields."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter

from agent.protocol.messages import Pool, Tool
from gateway.api.deps import CallerDep, ServicesDep
from gateway.hub import AgentConn
from gateway.models import AgentRecord, GpuDevice, SystemStatsOut

router = APIRouter(tags=["agents"])


def agent_record(conn: AgentConn) -> AgentRecord:
    """The documented agent record of a live connection."""
    hello, status = conn.hello, conn.status
    running = [r.task_id for r in status.running] if status else []
    tool = hello.tools[0] if hello.tools else None
    stats = hello.system_stats
    comfyui = next((t.version for t in hello.tools if t.name is Tool.COMFYUI), None)
    sync = status.sync if status else None
    return AgentRecord(
        agent_id=hello.agent_id,
        agent_status=status.agent_status.value if status else "idle",
        agent_status_reason=status.reason if status else None,
        agent_labels=list(status.labels if status and status.labels is not None else hello.labels),
        last_heartbeat=datetime.fromtimestamp(conn.last_heartbeat, UTC),
        agent_version=hello.agent_version,
        tool=tool.name.value if tool else None,
        tool_version=tool.version if tool else None,
        comfyui_version=(stats.comfyui_version if stats else None) or comfyui,
        gpu_capacity=hello.capacity.get(Pool.TEAM, 0),
        running_count=len(running),
        running_tasks=running,
        current_task_id=running[0] if running else None,
        tasks_completed=conn.tasks_completed,
        platform_arch=hello.capability.platform_arch,
        connected_at=datetime.fromtimestamp(conn.connected_at, UTC),
        sync_phase=sync.sync_phase if sync else "",
        sync_detail=sync.sync_detail if sync else "",
        sync_percent=sync.sync_percent if sync else 0.0,
        region=hello.region,
        pools=[p.value for p in hello.pools],
        system_stats=SystemStatsOut(
            comfyui_version=stats.comfyui_version if stats else None,
            pytorch_version=stats.pytorch_version if stats else None,
            os_type=stats.os_type if stats else None,
            gpu_devices=[
                GpuDevice(device_name=g.name, vram_total=g.vram_total, vram_free=g.vram_free)
                for g in hello.capability.gpus
            ],
        ),
    )


@router.get("/r/agents")
def list_agents(principal: CallerDep, svc: ServicesDep) -> dict[str, list[AgentRecord]]:
    """Connected agents of the caller's team (an agent gone from the list is disconnected)."""
    conns = [c for c in svc.hub.agents.values() if c.team_id == principal.team_id]
    return {"agent_list": [agent_record(c) for c in sorted(conns, key=lambda c: c.agent_id)]}
