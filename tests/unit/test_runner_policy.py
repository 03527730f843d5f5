"""The task runner's community rules: the policy duration cap, the purge, a private log.

The runner is driven directly with an in-process runtime that waits on events (no
subprocess, no network) and a host that records the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from agent.protocol.messages import (
    ErrorInfo,
    LogLine,
    OutputFile,
    Pool,
    TaskAssign,
    TaskPhase,
    TaskRef,
    TaskUploadUrls,
    Timings,
    UploadFile,
)
from agent.runtimes.base import Output, Progress, RuntimeEvents, TaskInterrupted, TaskSpec
from agent.settings import Settings, load_settings
from agent.tasks.runner import TaskRunner, workspace_for
from tests.factories import assign

CAP_S = 0.3
GUARD_S = 10.0  # a hang guard for every awaited runner
PRIVATE_NAME = "holiday-photo-of-alice.png"


class Host:
    """Records the runner's one outcome; refuses upload URLs (no test here uploads)."""

    def __init__(self) -> None:
        """Nothing reported yet."""
        self.outcome: tuple[str, Any] | None = None
        self.phases: list[TaskPhase] = []
        self.watch: Path | None = None
        """A path whose existence is recorded when the outcome is reported."""
        self.watched_existed: bool | None = None

    def _record(self, outcome: tuple[str, Any]) -> None:
        self.outcome = outcome
        if self.watch is not None:
            self.watched_existed = self.watch.exists()

    def set_phase(self, task: TaskRef, phase: TaskPhase) -> None:
        """Record the phase."""
        self.phases.append(phase)

    def set_handle(self, task: TaskRef, handle: Mapping[str, Any]) -> None:
        """Ignored."""

    def send_progress(self, task: TaskRef, progress: Progress) -> None:
        """Ignored."""

    def send_log(self, task: TaskRef, lines: list[LogLine], dropped: int) -> None:
        """Ignored."""

    async def upload_urls(self, task: TaskRef, files: list[UploadFile]) -> TaskUploadUrls:
        """Not expected."""
        raise AssertionError("no output to upload")

    def output_uploaded(self, task: TaskRef, output: OutputFile) -> None:
        """Ignored."""

    def complete(self, task: TaskRef, outputs: list[OutputFile], timings: Timings) -> None:
        """Record success."""
        self._record(("complete", outputs))

    def fail(
        self, task: TaskRef, error: ErrorInfo, outputs: list[OutputFile], timings: Timings
    ) -> None:
        """Record failure."""
        self._record(("fail", error))

    def cancelled(
        self, task: TaskRef, reason: str, outputs: list[OutputFile], timings: Timings
    ) -> None:
        """Record cancellation."""
        self._record(("cancelled", reason))


class WaitingRuntime:
    """Runs until interrupted (``hang``), ends at once, or raises ``error``; no purge."""

    tool = "comfyui"
    version: str | None = None

    def __init__(self, *, hang: bool = False, error: Exception | None = None) -> None:
        """Configure the run."""
        self.hang = hang
        self.error = error
        self.running = asyncio.Event()
        self.interrupted = asyncio.Event()

    async def start(self) -> None:
        """Nothing to start."""

    async def healthy(self) -> bool:
        """Ready."""
        return True

    async def prepare(self, spec: TaskSpec, workspace: Path) -> None:
        """Nothing to stage."""

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Wait for an interrupt when hanging; else finish (or fail) at once."""
        self.running.set()
        if self.error is not None:
            raise self.error
        if self.hang:
            await self.interrupted.wait()
            raise TaskInterrupted
        return []

    async def interrupt(self, spec: TaskSpec) -> None:
        """End a hanging run."""
        self.interrupted.set()

    async def resume(
        self, spec: TaskSpec, workspace: Path, handle: Mapping[str, Any], events: RuntimeEvents
    ) -> None:
        """Cannot re-attach."""

    async def close(self) -> None:
        """Nothing held."""


class PurgingRuntime(WaitingRuntime):
    """A :class:`WaitingRuntime` that is also ``Purging``: records each purge."""

    def __init__(self, workspace_seen: list[bool], host: Host | None = None, **kwargs: Any) -> None:
        """Record purges, whether the workspace still existed, and ``host``'s outcome then."""
        super().__init__(**kwargs)
        self.purged: list[TaskSpec] = []
        self.workspace_seen = workspace_seen
        self.workspace: Path | None = None
        self.host = host
        self.outcome_at_purge: list[tuple[str, Any] | None] = []

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Remember the workspace, then run as configured."""
        self.workspace = workspace
        return await super().run(spec, workspace, events)

    async def purge(self, spec: TaskSpec) -> None:
        """Record the purge."""
        self.purged.append(spec)
        self.workspace_seen.append(self.workspace is not None and self.workspace.exists())
        if self.host is not None:
            self.outcome_at_purge.append(self.host.outcome)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings with a short ``policy.max_duration_s``."""
    environ = {
        "HOME": str(tmp_path),
        "CYBERUN_AGENT_WORK_DIR": str(tmp_path / "work"),
        "CYBERUN_AGENT_POLICY__MAX_DURATION_S": str(CAP_S),
        "CYBERUN_AGENT_TIMEOUTS__CANCEL_GRACE_S": "5",
    }
    return load_settings(environ=environ).settings


def _assign(pool: Pool, timeout_s: float = 0.0, task_id: str = "t1") -> TaskAssign:
    return assign(task_id, pool=pool).model_copy(update={"timeout_s": timeout_s})


async def _run(
    task: TaskAssign, runtime: WaitingRuntime, host: Host, settings: Settings
) -> tuple[TaskRunner, float]:
    """Run one runner to its end (guarded); return it and the seconds it took."""
    async with httpx.AsyncClient() as http:
        runner = TaskRunner(task, runtime, host, http, settings)
        started = time.monotonic()
        async with asyncio.timeout(GUARD_S):
            await runner.run()
    return runner, time.monotonic() - started


@pytest.mark.asyncio
async def test_a_community_task_without_timeout_fails_at_policy_max_duration(
    settings: Settings,
) -> None:
    """A community task with no timeout_s is failed (code timeout) at policy.max_duration_s."""
    runtime, host = WaitingRuntime(hang=True), Host()
    _, took = await _run(_assign(Pool.COMMUNITY), runtime, host, settings)
    assert host.outcome is not None
    kind, error = host.outcome
    assert kind == "fail"
    assert error.code == "timeout"
    assert "policy.max_duration_s" in error.message
    assert runtime.interrupted.is_set()  # stopped cooperatively, like any timeout
    assert took >= CAP_S


@pytest.mark.asyncio
async def test_the_cap_wins_over_a_longer_timeout(settings: Settings) -> None:
    """A community task's longer timeout_s is cut to policy.max_duration_s."""
    runtime, host = WaitingRuntime(hang=True), Host()
    _, took = await _run(_assign(Pool.COMMUNITY, timeout_s=60), runtime, host, settings)
    assert host.outcome is not None
    assert host.outcome[0] == "fail"
    assert host.outcome[1].code == "timeout"
    assert "policy.max_duration_s" in host.outcome[1].message
    assert CAP_S <= took < 60


@pytest.mark.asyncio
async def test_a_shorter_timeout_still_applies_and_is_named(settings: Settings) -> None:
    """Below the cap, the task's own timeout_s sets the deadline and the message says so."""
    runtime, host = WaitingRuntime(hang=True), Host()
    runner, _ = await _run(_assign(Pool.COMMUNITY, timeout_s=0.1), runtime, host, settings)
    assert runner.limit_s == pytest.approx(0.1)
    assert host.outcome is not None
    assert host.outcome[1].code == "timeout"
    assert "its timeout of 0.1 s" in host.outcome[1].message


@pytest.mark.asyncio
async def test_team_tasks_are_not_capped_unless_policed(settings: Settings) -> None:
    """A team task's deadline is its timeout_s alone (the cap applies to policed pools)."""
    runtime, host = WaitingRuntime(hang=True), Host()
    runner, took = await _run(_assign(Pool.TEAM, timeout_s=2 * CAP_S), runtime, host, settings)
    assert runner.limit_s == pytest.approx(2 * CAP_S)
    assert host.outcome is not None
    assert "its timeout of" in host.outcome[1].message
    assert took >= 2 * CAP_S
    async with httpx.AsyncClient() as http:
        untimed = TaskRunner(_assign(Pool.TEAM), WaitingRuntime(), Host(), http, settings)
    assert untimed.limit_s == float("inf")


@pytest.mark.asyncio
async def test_policy_team_caps_team_tasks_too(tmp_path: Path) -> None:
    """With policy.team set, a team task is capped at policy.max_duration_s as well."""
    environ = {
        "HOME": str(tmp_path),
        "CYBERUN_AGENT_WORK_DIR": str(tmp_path / "work"),
        "CYBERUN_AGENT_POLICY__MAX_DURATION_S": str(CAP_S),
        "CYBERUN_AGENT_POLICY__TEAM": "true",
    }
    settings = load_settings(environ=environ).settings
    runtime, host = WaitingRuntime(hang=True), Host()
    await _run(_assign(Pool.TEAM), runtime, host, settings)
    assert host.outcome is not None
    assert "policy.max_duration_s" in host.outcome[1].message


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("runtime_kwargs", "outcome"),
    [({}, "complete"), ({"error": RuntimeError("bug")}, "fail"), ({"hang": True}, "fail")],
)
async def test_a_community_task_is_purged_whatever_its_outcome(
    settings: Settings, runtime_kwargs: dict[str, Any], outcome: str
) -> None:
    """Completed, failed or timed out: purge, then workspace removal, then the report."""
    seen: list[bool] = []
    host = Host()
    runtime = PurgingRuntime(seen, host, **runtime_kwargs)
    host.watch = workspace_for(settings.work_dir, TaskRef(task_id="t1", attempt=0))
    runner, _ = await _run(_assign(Pool.COMMUNITY), runtime, host, settings)
    assert host.outcome is not None
    assert host.outcome[0] == outcome
    assert [(s.task_id, s.pool, s.private) for s in runtime.purged] == [("t1", "community", True)]
    assert seen == [True]  # purged before the workspace was removed
    assert runtime.outcome_at_purge == [None]  # ... and before the outcome was reported
    assert host.watched_existed is False  # the workspace was gone when it was reported
    assert not runner.workspace.exists()


@pytest.mark.asyncio
async def test_a_cancelled_community_task_is_purged(settings: Settings) -> None:
    """A community task cancelled by the gateway is reported cancelled, then purged."""
    seen: list[bool] = []
    runtime, host = PurgingRuntime(seen, hang=True), Host()
    async with httpx.AsyncClient() as http:
        runner = TaskRunner(_assign(Pool.COMMUNITY, timeout_s=60), runtime, host, http, settings)
        work = asyncio.ensure_future(runner.run())
        async with asyncio.timeout(GUARD_S):
            await runtime.running.wait()
            runner.cancel("user")
            await work
    assert host.outcome == ("cancelled", "user")
    assert len(runtime.purged) == 1


@pytest.mark.asyncio
async def test_team_tasks_are_not_purged(settings: Settings) -> None:
    """A team task's traces are the team's own: the runner never purges them."""
    runtime, host = PurgingRuntime([]), Host()
    await _run(_assign(Pool.TEAM), runtime, host, settings)
    assert host.outcome is not None
    assert host.outcome[0] == "complete"
    assert runtime.purged == []


@pytest.mark.asyncio
async def test_an_agent_going_down_keeps_the_task_unpurged(settings: Settings) -> None:
    """Cancelling the runner (agent shutdown) neither purges nor removes the workspace."""
    runtime, host = PurgingRuntime([], hang=True), Host()
    async with httpx.AsyncClient() as http:
        runner = TaskRunner(_assign(Pool.COMMUNITY, timeout_s=60), runtime, host, http, settings)
        work = asyncio.ensure_future(runner.run())
        async with asyncio.timeout(GUARD_S):
            await runtime.running.wait()
            work.cancel()
            await asyncio.wait({work})
    assert work.cancelled()
    assert runtime.purged == []
    assert host.outcome is None
    assert runner.workspace.exists()


@pytest.mark.asyncio
async def test_a_runtime_without_purge_still_runs_community_tasks(settings: Settings) -> None:
    """A plugin runtime that is not Purging runs community tasks as before."""
    runtime, host = WaitingRuntime(), Host()
    await _run(_assign(Pool.COMMUNITY), runtime, host, settings)
    assert host.outcome is not None
    assert host.outcome[0] == "complete"


@pytest.mark.asyncio
async def test_a_failing_purge_does_not_fail_the_runner(settings: Settings) -> None:
    """A purge that raises is logged by its error type only; the runner ends normally."""

    class BrokenPurge(PurgingRuntime):
        async def purge(self, spec: TaskSpec) -> None:
            raise OSError(f"cannot remove /comfy/output/{PRIVATE_NAME}")

    runtime, host = BrokenPurge([]), Host()
    with capture_logs() as logs:
        runner, _ = await _run(_assign(Pool.COMMUNITY), runtime, host, settings)
    assert host.outcome is not None
    assert host.outcome[0] == "complete"
    assert not runner.workspace.exists()
    assert any(entry["event"] == "task purge failed" for entry in logs)
    assert PRIVATE_NAME not in repr(logs)


@pytest.mark.asyncio
async def test_a_community_task_crash_logs_no_details(settings: Settings) -> None:
    """An agent bug in a community task logs its type, not its message or traceback."""
    runtime, host = WaitingRuntime(error=ValueError(f"cannot open {PRIVATE_NAME}")), Host()
    with capture_logs() as logs:
        await _run(_assign(Pool.COMMUNITY), runtime, host, settings)
    assert host.outcome is not None
    assert host.outcome[1].code == "internal_error"
    crash = [entry for entry in logs if entry["event"] == "task runner failed"]
    assert crash == [
        {
            "event": "task runner failed",
            "task_id": "t1",
            "error": "ValueError",
            "log_level": "error",
        }
    ]
    assert PRIVATE_NAME not in repr(logs)


@pytest.mark.asyncio
async def test_a_team_task_crash_keeps_its_traceback(settings: Settings) -> None:
    """The same bug in a team task is logged with its traceback (the team's own data)."""
    runtime, host = WaitingRuntime(error=ValueError(f"cannot open {PRIVATE_NAME}")), Host()
    with capture_logs() as logs:
        await _run(_assign(Pool.TEAM), runtime, host, settings)
    crash = [entry for entry in logs if entry["event"] == "task runner failed"]
    assert len(crash) == 1
    assert crash[0].get("exc_info") is True


class EmptyUrlsHost(Host):
    """Answers every upload request with no URL at all (a broken gateway)."""

    async def upload_urls(self, task: TaskRef, files: list[UploadFile]) -> TaskUploadUrls:
        """An answer listing no file."""
        return TaskUploadUrls(
            id="u1", ts=datetime.now(UTC), task_id=task.task_id, attempt=task.attempt, files=[]
        )


class OneOutputRuntime(WaitingRuntime):
    """Writes one output file in the workspace and returns it."""

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Produce ``outputs/a.png``."""
        path = workspace / "outputs" / "a.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG" + b"0" * 60)
        return [Output("9.images.0", path, "image/png")]


@pytest.mark.asyncio
async def test_an_upload_answer_without_urls_fails_the_task_clearly(settings: Settings) -> None:
    """A task.upload_urls listing no file fails the task upload_refused, not internal_error."""
    host = EmptyUrlsHost()
    await _run(_assign(Pool.TEAM), OneOutputRuntime(), host, settings)
    assert host.outcome is not None
    kind, error = host.outcome
    assert (kind, error.code) == ("fail", "upload_refused")
    assert "no upload URL" in error.message
