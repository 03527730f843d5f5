"""The agent's Prometheus metrics: one registry per agent, filled by the parts that know.

Nothing here does I/O; :mod:`agent.observe` serves :meth:`Metrics.render` at ``/metrics``.
Names (all prefixed ``cyberun_agent_``):

- ``info{version, agent_id}`` 1;
- ``connected`` 0/1, ``reconnects_total`` (sessions after the first);
- ``status{status}`` 1 for the current agent status, 0 for the others;
- ``tasks_total{outcome, pool}``: ``completed``, ``failed``, ``cancelled``, ``preempted`` (a
  community task stopped for a team task; reported once per attempt);
  ``gpu_seconds_total{pool}``: seconds tasks spent running (the ``run`` stage, one GPU each) —
  what the owner contributed to each pool since the process started (``/status``
  ``contribution`` keeps the lifetime totals: :mod:`agent.contribution`);
  ``rejections_total{reason}``: assignments refused
  (``insufficient_vram``, ``policy_denied``…);
- ``stage_seconds{stage}`` histograms: ``queued``, ``prepare``, ``run``, ``upload``;
- ``uploaded_bytes_total``, ``upload_retries_total``;
- ``slots{pool}`` and ``slots_busy{pool}``;
- per GPU (``gpu`` = index): ``gpu_usable``, ``gpu_utilization_percent``,
  ``gpu_memory_used_bytes``, ``gpu_memory_total_bytes``, ``gpu_temperature_celsius``,
  ``gpu_power_watts``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.protocol.messages import AgentStatus, GpuSnapshot, Timings

PREFIX = "cyberun_agent"
OUTCOMES = ("completed", "failed", "cancelled", "preempted")
POOLS = ("team", "community")
STAGES = ("queued", "prepare", "run", "upload")
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Every metric of one agent process (its own registry: no global state)."""

    def __init__(
        self,
        *,
        contribution: Mapping[str, Mapping[str, float]] | None = None,
        on_contribution: Callable[[dict[str, dict[str, float]]], None] | None = None,
    ) -> None:
        """Create the instruments; outcome and stage series exist from the start at 0.

        ``contribution``: the lifetime per-pool totals to count on from (the Prometheus
        counters still start at 0); ``on_contribution`` receives the new totals after each
        attempt, to keep them (:class:`agent.contribution.ContributionFile`).
        """
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._info = Gauge(
            f"{PREFIX}_info", "The agent", ["version", "agent_id"], registry=registry
        )
        self._connected = Gauge(f"{PREFIX}_connected", "1 while connected", registry=registry)
        self._reconnects = Counter(
            f"{PREFIX}_reconnects", "Sessions opened after the first", registry=registry
        )
        self._status = Gauge(
            f"{PREFIX}_status", "1 for the current status", ["status"], registry=registry
        )
        self._tasks = Counter(
            f"{PREFIX}_tasks", "Task attempts by outcome", ["outcome", "pool"], registry=registry
        )
        self._gpu_seconds = Counter(
            f"{PREFIX}_gpu_seconds", "Seconds tasks ran, by pool", ["pool"], registry=registry
        )
        self._contribution: dict[str, dict[str, float]] = {pool: _zero() for pool in POOLS}
        for pool, totals in (contribution or {}).items():
            self._contribution.setdefault(pool, {}).update(totals)
        self._on_contribution = on_contribution
        self._rejections = Counter(
            f"{PREFIX}_rejections", "Assignments refused, by reason", ["reason"], registry=registry
        )
        self._stages = Histogram(
            f"{PREFIX}_stage_seconds",
            "Seconds per task stage",
            ["stage"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._uploaded = Counter(
            f"{PREFIX}_uploaded_bytes", "Output bytes uploaded", registry=registry
        )
        self._upload_retries = Counter(
            f"{PREFIX}_upload_retries", "Transfer attempts retried", registry=registry
        )
        self._slots = Gauge(f"{PREFIX}_slots", "Task slots", ["pool"], registry=registry)
        self._busy = Gauge(f"{PREFIX}_slots_busy", "Task slots in use", ["pool"], registry=registry)
        gpu = ["gpu"]
        self._gpu = {
            "usable": Gauge(f"{PREFIX}_gpu_usable", "1 if offered work", gpu, registry=registry),
            "utilization": Gauge(
                f"{PREFIX}_gpu_utilization_percent", "GPU utilization", gpu, registry=registry
            ),
            "memory_used": Gauge(
                f"{PREFIX}_gpu_memory_used_bytes", "VRAM in use", gpu, registry=registry
            ),
            "memory_total": Gauge(
                f"{PREFIX}_gpu_memory_total_bytes", "VRAM", gpu, registry=registry
            ),
            "temperature_c": Gauge(
                f"{PREFIX}_gpu_temperature_celsius", "GPU temperature", gpu, registry=registry
            ),
            "power_w": Gauge(f"{PREFIX}_gpu_power_watts", "GPU power draw", gpu, registry=registry),
        }
        self._sessions = 0
        for stage in STAGES:
            self._stages.labels(stage=stage)
        for pool in POOLS:
            self._gpu_seconds.labels(pool=pool)
            for outcome in OUTCOMES:
                self._tasks.labels(outcome=outcome, pool=pool)

    # ------------------------------------------------------------------ events

    def identify(self, version: str, agent_id: str) -> None:
        """Who this agent is."""
        self._info.labels(version=version, agent_id=agent_id).set(1)

    def connection(self, *, up: bool) -> None:
        """The gateway connection opened (``up``) or closed."""
        self._connected.set(1 if up else 0)
        if up:
            if self._sessions:
                self._reconnects.inc()
            self._sessions += 1

    def status(self, current: AgentStatus) -> None:
        """The agent's status, one-hot."""
        for each in AgentStatus:
            self._status.labels(status=each.value).set(1 if each is current else 0)

    def task_finished(self, outcome: str, pool: str, timings: Timings | None = None) -> None:
        """One attempt reported (or one assignment rejected)."""
        self._tasks.labels(outcome=outcome, pool=pool).inc()
        totals = self._contribution.setdefault(pool, _zero())
        totals[outcome] = totals.get(outcome, 0.0) + 1
        if timings is not None and timings.run_s is not None and timings.run_s > 0:
            self._gpu_seconds.labels(pool=pool).inc(timings.run_s)
            totals["gpu_seconds"] = totals.get("gpu_seconds", 0.0) + timings.run_s
        if self._on_contribution is not None:
            self._on_contribution(self.contribution())
        if timings is None:
            return
        for stage in STAGES:
            seconds = getattr(timings, f"{stage}_s")
            if seconds is not None:
                self._stages.labels(stage=stage).observe(seconds)

    def contribution(self) -> dict[str, dict[str, float]]:
        """Per pool: attempts by outcome and GPU-seconds, counted on from ``contribution``."""
        return {pool: dict(totals) for pool, totals in self._contribution.items()}

    def rejected(self, reason: str) -> None:
        """An assignment was refused."""
        self._rejections.labels(reason=reason).inc()

    def uploaded(self, size: int) -> None:
        """An output finished uploading."""
        self._uploaded.inc(max(0, size))

    def upload_retry(self) -> None:
        """A transfer attempt failed and will be retried."""
        self._upload_retries.inc()

    def slots(self, capacity: Mapping[str, int], free: Mapping[str, int]) -> None:
        """Slots per pool, and how many are in use."""
        for pool, total in capacity.items():
            self._slots.labels(pool=pool).set(total)
            self._busy.labels(pool=pool).set(max(0, total - free.get(pool, 0)))

    def gpus(self, snapshots: Iterable[GpuSnapshot]) -> None:
        """Each GPU's latest readings (a reading NVML could not take is left as it was)."""
        for snapshot in snapshots:
            gpu = str(snapshot.index)
            self._gpu["usable"].labels(gpu=gpu).set(0 if snapshot.problem else 1)
            readings = {
                "utilization": snapshot.utilization,
                "memory_used": snapshot.memory_used,
                "memory_total": snapshot.memory_total,
                "temperature_c": snapshot.temperature_c,
                "power_w": snapshot.power_w,
            }
            for name, value in readings.items():
                if value is not None:
                    self._gpu[name].labels(gpu=gpu).set(value)

    # ------------------------------------------------------------------ output

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))


def _zero() -> dict[str, float]:
    """One pool's contribution before anything ran: every outcome and GPU-seconds at 0."""
    return {**dict.fromkeys(OUTCOMES, 0.0), "gpu_seconds": 0.0}
