"""The community pool's gate: opt-in, the owner's hours and "only when idle"."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.community import community_gate
from agent.health import GpuState
from agent.nvml import Gpu, GpuReading, Inventory
from agent.settings import CommunityPoolSettings

NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OWN = 4242


def gpus(utilization: float | None = 0.0, processes: tuple[int, ...] | None = ()) -> GpuState:
    """One usable GPU with this utilisation and these compute processes."""
    reading = GpuReading(index=0, utilization=utilization, processes=processes)
    return GpuState(inventory=Inventory(gpus=(Gpu(index=0, name="H200"),)), readings=(reading,))


def settings(**values: object) -> CommunityPoolSettings:
    """Community settings, enabled, with ``values``."""
    return CommunityPoolSettings.model_validate({"enabled": True, "max_concurrent": 2, **values})


def test_disabled_pool_has_no_cap() -> None:
    """A pool the owner did not opt into gets a cap of 0 and says why."""
    gate = community_gate(
        CommunityPoolSettings(), NOON, gpus(), own_pids={OWN}, tasks_running=False
    )
    assert (gate.cap, gate.reason) == (0, "pools.community.enabled is false")


def test_inside_the_hours_the_cap_is_max_concurrent() -> None:
    """Within a window the cap is max_concurrent and no reason is given."""
    gate = community_gate(
        settings(hours=["11:00-13:00"]), NOON, gpus(), own_pids={OWN}, tasks_running=False
    )
    assert (gate.cap, gate.reason) == (2, "")


def test_outside_the_hours_the_pool_closes_in_the_owner_time_zone() -> None:
    """12:00 UTC is 21:00 in Tokyo: a 09:00-17:00 Tokyo window is closed then."""
    gate = community_gate(
        settings(hours=["09:00-17:00"], timezone="Asia/Tokyo"),
        NOON,
        gpus(),
        own_pids={OWN},
        tasks_running=False,
    )
    assert gate.cap == 0
    assert gate.reason == "outside pools.community.hours (09:00-17:00 Asia/Tokyo)"


def test_a_busy_gpu_closes_an_only_when_idle_pool() -> None:
    """only_when_idle: utilisation at the threshold closes the pool, naming the setting."""
    gate = community_gate(
        settings(only_when_idle=True, idle_max_utilization=10),
        NOON,
        gpus(utilization=35),
        own_pids={OWN},
        tasks_running=False,
    )
    assert gate.cap == 0
    assert "35 % busy" in gate.reason
    assert "idle_max_utilization" in gate.reason


def test_the_agents_own_load_does_not_close_the_pool() -> None:
    """While one of its own tasks runs, the agent's GPU load is not held against it."""
    gate = community_gate(
        settings(only_when_idle=True),
        NOON,
        gpus(utilization=99, processes=(OWN,)),
        own_pids={OWN},
        tasks_running=True,
    )
    assert gate.cap == 2


def test_a_foreign_gpu_process_closes_the_pool_unless_processes_are_ignored() -> None:
    """A GPU process outside the agent's tree closes the pool; idle_check_processes opens it."""
    busy = gpus(processes=(OWN, 999))
    closed = community_gate(
        settings(only_when_idle=True), NOON, busy, own_pids={OWN}, tasks_running=False
    )
    assert closed.cap == 0
    assert "pid 999" in closed.reason
    ignored = community_gate(
        settings(only_when_idle=True, idle_check_processes=False),
        NOON,
        busy,
        own_pids={OWN},
        tasks_running=False,
    )
    assert ignored.cap == 2


def test_without_only_when_idle_a_busy_gpu_does_not_matter() -> None:
    """The idle rules apply only when the owner asked for them."""
    gate = community_gate(
        settings(), NOON, gpus(utilization=100, processes=(1,)), own_pids={OWN}, tasks_running=False
    )
    assert gate.cap == 2
