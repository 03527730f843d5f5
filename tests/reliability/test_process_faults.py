"""Process faults and a full disk: every task ends exactly once, nothing is lost or run twice.

Real processes throughout: the gateway and the agent as subprocesses on loopback, tasks in
the scripted runtime (a real child process per task), a real ComfyUI. Faults are SIGKILLs
at seeded random points (the seed is in every failure message; set
``CYBERUN_RELIABILITY_SEED`` to replay one), a ComfyUI killed under the agent, and a
``work_dir`` on a 3 MiB tmpfs. For every task the checks are the same (:class:`Tally`):

- exactly one terminal event in the task's whole event history (read from the gateway's
  store: the SSE stream stops at the first terminal event, so it cannot show a second one);
- every output of a completed task downloads at its full size (else the task is *lost*);
- no attempt executed twice (runs counted from the agents' logs, attempts from the
  gateway's events), else the task is *duplicated*;
- the agent is idle again at the end (``/r/agents``: idle, no running task).

Each scenario reports its counts with :func:`tests.reliability.ledger.record`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from agent.runtimes.comfyui.workflow import prompt_id_for
from tests.agent_process import AgentProcess, script_workflow, start_agent
from tests.comfyui import COMFYUI_TEST_TIMEOUT_S, STARTUP_DEADLINE_S, ComfyUIServer
from tests.comfyui import _install_test_nodes as install_test_nodes
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway, task_record
from tests.gateway_process import submit_workflow as submit
from tests.reliability.ledger import record, size
from tests.reliability.tmpfs import start_agent_on_tmpfs, writer_workflow

if TYPE_CHECKING:
    from types import TracebackType

pytest_plugins = ["tests.comfyui"]

TERMINAL = frozenset({"completed", "failed", "cancelled"})
SEED_ENV = "CYBERUN_RELIABILITY_SEED"
POLL_S = 0.2
OUTPUT_BYTES = 40_000
SCRIPT_OUTPUTS = {"1.images.0": OUTPUT_BYTES, "1.images.1": OUTPUT_BYTES}
# The lease is not under test in the gateway-restart scenario: long enough that a restart
# plus the agent's reconnect backoff (up to ~3 s) never expires it.
GATEWAY_RESTART_TIMEOUTS = ("--ack-timeout", "1.5", "--lease-ttl", "15", "--heartbeat", "0.5")
COMFY_ROUNDS = size(sampled=1, long=5)


# ---------------------------------------------------------------------- helpers


def seeded() -> tuple[int, random.Random]:
    """A seed (from ``CYBERUN_RELIABILITY_SEED``, or fresh) and its generator."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    return seed, random.Random(seed)  # noqa: S311 - fault timing, not cryptography


def free_port() -> str:
    """A loopback port that was free a moment ago (a restarted gateway binds it again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agent processes started by a test; all stopped at the end."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def launch(
    agents: list[AgentProcess], home: Path, gw: GatewayProcess, dk: str, name: str, **env: str
) -> AgentProcess:
    """Start an agent on ``home`` (its state dir survives a restart) and wait until connected."""
    agent = start_agent(home, gw.url, dk, name, extra_env=env)
    agents.append(agent)
    agent.wait_log("connected to the gateway", timeout=60)
    return agent


def wait_terminal(gw: GatewayProcess, dk: str, task_id: str, timeout: float = 90) -> str:
    """Follow the task's SSE stream to its terminal event; return that event's name."""
    headers = {"Authorization": f"Bearer {dk}"}
    with (
        httpx.Client(base_url=gw.api, headers=headers, timeout=timeout) as http,
        http.stream("GET", f"/r/tasks/{task_id}/events") as stream,
    ):
        for line in stream.iter_lines():
            name = line.removeprefix("event: ")
            if line.startswith("event: ") and name in TERMINAL:
                return name
    raise AssertionError(f"the event stream of {task_id} ended without a terminal event")


def wait_progress(gw: GatewayProcess, dk: str, task_id: str, timeout: float = 90) -> None:
    """Follow the task's SSE stream until its first progress event."""
    headers = {"Authorization": f"Bearer {dk}"}
    with (
        httpx.Client(base_url=gw.api, headers=headers, timeout=timeout) as http,
        http.stream("GET", f"/r/tasks/{task_id}/events") as stream,
    ):
        for line in stream.iter_lines():
            if line == "event: progress":
                return
    raise AssertionError(f"{task_id} ended without progress")


def event_history(gw: GatewayProcess, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event the gateway stored for the task, in order (its whole history)."""
    uri = f"file:{gw.data_dir / 'gateway.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute(
            "SELECT event, data FROM task_events WHERE task_id=? ORDER BY seq", (task_id,)
        ).fetchall()
    return [(str(event), json.loads(data)) for event, data in rows]


def wait_idle(gw: GatewayProcess, dk: str, agent_id: str, timeout: float = 30) -> None:
    """Wait until ``/r/agents`` shows the agent connected, idle and running nothing."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while True:
        with gw.client(dk) as http:
            listed = http.get("/r/agents").json()["agent_list"]
        seen = next((a for a in listed if a["agent_id"] == agent_id), None)
        if seen and seen["agent_status"] == "idle" and not seen["running_tasks"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{agent_id} not idle within {timeout}s: {seen}")
        # deadline polling: the status changes with the agent's next heartbeat (1 s), and
        # the gateway offers no event for it
        time.sleep(POLL_S)


def log_records(agents: list[AgentProcess], event: str, task_id: str) -> list[dict[str, Any]]:
    """The agents' log records ``event`` about ``task_id`` (all processes, in order)."""
    found = []
    for agent in agents:
        agent.log_text()  # moves what is queued into ``seen``
        found += [r for r in agent.seen if r.get("event") == event and r.get("task_id") == task_id]
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Tally:
    """The per-task checks of a scenario and its counts."""

    seed: int
    tasks: int = 0
    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def check(
        self,
        gw: GatewayProcess,
        dk: str,
        task_id: str,
        *,
        executions: int,
        outputs: dict[str, int] | None,
    ) -> tuple[str, dict[str, Any]]:
        """Check one finished task; return its terminal event and its record.

        ``outputs`` maps each output key a completed task must have to its size (``0``: any
        non-empty size); ``None`` skips the output check.
        """
        self.tasks += 1
        history = event_history(gw, task_id)
        terminal = [name for name, _ in history if name in TERMINAL]
        attempts = {
            data.get("attempt")
            for name, data in history
            if name == "status" and data.get("task_status") == "running"
        }
        task = task_record(gw, dk, task_id)
        outcome = terminal[0] if terminal else "none"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if not terminal:
            self._lost(task_id, f"no terminal event ({task['task_status']})")
        if len(terminal) > 1:
            self._duplicated(task_id, f"{len(terminal)} terminal events: {terminal}")
        if executions > max(1, len(attempts)):
            story = [
                (name, data.get("task_status"), data.get("attempt"), data.get("task_error"))
                for name, data in history
                if name != "progress"
            ]
            self._duplicated(
                task_id, f"{executions} executions of {len(attempts)} attempt(s); events {story}"
            )
        if terminal == ["completed"] and outputs is not None:
            self._check_outputs(gw, dk, task_id, outputs)
        return outcome, task

    def _check_outputs(
        self, gw: GatewayProcess, dk: str, task_id: str, expected: dict[str, int]
    ) -> None:
        with gw.client(dk) as http:
            urls: dict[str, str] = http.get(f"/r/tasks/{task_id}/result").json()["download_urls"]
        if sorted(urls) != sorted(expected):
            self._lost(task_id, f"outputs {sorted(urls)}, expected {sorted(expected)}")
            return
        for key, want in expected.items():
            got = len(httpx.get(urls[key], timeout=30).content)
            if got == 0 or (want and got != want):
                self._lost(task_id, f"output {key} downloads {got} bytes, expected {want or '>0'}")

    def _lost(self, task_id: str, why: str) -> None:
        self.lost += 1
        self.problems.append(f"{task_id} lost: {why}")

    def _duplicated(self, task_id: str, why: str) -> None:
        self.duplicated += 1
        self.problems.append(f"{task_id} duplicated: {why}")

    def problem(self, message: str) -> None:
        """A check failed that is neither a loss nor a duplicate."""
        self.problems.append(message)

    def finish(self, scenario: str, faults: int) -> None:
        """Record the counts, then fail on any loss, duplicate or other problem."""
        detail = f"seed={self.seed} outcomes={self.outcomes}"
        record(
            scenario,
            tasks=self.tasks,
            faults=faults,
            lost=self.lost,
            duplicated=self.duplicated,
            detail=detail,
        )
        summary = f"{scenario} ({detail}, {SEED_ENV}={self.seed} replays it)"
        assert self.lost == 0, f"{summary}: {self.problems}"
        assert self.duplicated == 0, f"{summary}: {self.problems}"
        assert not self.problems, f"{summary}: {self.problems}"


# ---------------------------------------------------------------------- scenarios


@pytest.mark.timeout(120 + 60 * size(sampled=3, long=20))
def test_agent_kill_9_at_random_points_reports_every_task_once(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """An agent SIGKILLed at random points of its tasks and restarted ends each exactly once."""
    seed, rng = seeded()
    rounds = size(sampled=3, long=20)
    tally = Tally(seed)
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as gw:
        dk = gw.credential("kill9")
        body = script_workflow(steps=10, step_s=0.1, outputs=2, output_bytes=OUTPUT_BYTES)
        workflow = gw.create_workflow(dk, {**body, "max_retries": 1})
        home = tmp_path / "worker"
        agent = launch(agents, home, gw, dk, "kill9-worker")
        for _ in range(rounds):
            task_id = submit(gw, dk, workflow)
            agent.wait_log("script started", task_id=task_id, timeout=60)
            # the fault's random point: running, uploading, reporting or after the ack
            time.sleep(rng.uniform(0.0, 1.6))
            agent.kill()
            agent = launch(agents, home, gw, dk, "kill9-worker")  # same state dir
            wait_terminal(gw, dk, task_id)
            wait_idle(gw, dk, "kill9-worker")
            started = log_records(agents, "script started", task_id)
            outcome, task = tally.check(
                gw, dk, task_id, executions=len(started), outputs=SCRIPT_OUTPUTS
            )
            if outcome == "failed" and "agent_restarted" not in str(task["task_error"]):
                tally.problem(f"{task_id} failed for another reason: {task['task_error']}")
            if outcome not in {"completed", "failed"}:
                tally.problem(f"{task_id} ended {outcome}")
            left = [r["pid"] for r in started if alive(int(r["pid"]))]
            if left:
                tally.problem(f"{task_id}: script processes still running: {left}")
    tally.finish("agent kill -9 mid-task (scripted runtime)", faults=rounds)


def slow_graph(steps: int, step_s: float, prefix: str) -> dict[str, Any]:
    """EmptyImage → the test-only slow pass-through (progress per step) → SaveImage."""
    return {
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "4": {
            "class_type": "CyberunSlowPassthrough",
            "inputs": {"image": ["3", 0], "steps": steps, "step_s": step_s},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


@pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S + 120 * COMFY_ROUNDS)
def test_agent_kill_9_with_real_comfyui_reattaches_and_runs_each_prompt_once(
    tmp_path: Path, agents: list[AgentProcess], comfyui: ComfyUIServer
) -> None:
    """A SIGKILLed agent, restarted, re-attaches to its ComfyUI prompt: run once, uploaded once."""
    seed, rng = seeded()
    tally = Tally(seed)
    env = {"CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": comfyui.url, "CYBERUN_AGENT_RUNTIMES__EXTRA": ""}
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as gw:
        dk = gw.credential("kill9-comfy")
        home = tmp_path / "worker"
        agent = launch(agents, home, gw, dk, "kill9-comfy", **env)
        for round_no in range(COMFY_ROUNDS):
            prefix = f"kill9_{seed}_{round_no}"
            workflow = gw.create_workflow(
                dk, {"name": prefix, "workflow_json": slow_graph(40, 0.1, prefix)}
            )
            task_id = submit(gw, dk, workflow)
            attempt = int(agent.wait_log("task accepted", task_id=task_id, timeout=60)["attempt"])
            prompt_id = prompt_id_for(task_id, attempt)
            wait_progress(gw, dk, task_id)  # the prompt runs inside the slow node (4 s)
            time.sleep(rng.uniform(0.0, 1.0))  # the fault's random point within the node
            agent.kill()
            agent = launch(agents, home, gw, dk, "kill9-comfy", **env)
            agent.wait_log("re-attached to a ComfyUI prompt", prompt_id=prompt_id, timeout=60)
            wait_terminal(gw, dk, task_id, timeout=120)
            wait_idle(gw, dk, "kill9-comfy")
            queued = log_records(agents, "ComfyUI prompt queued", task_id)
            queued = [r for r in queued if r.get("prompt_id") == prompt_id]
            outcome, _ = tally.check(
                gw, dk, task_id, executions=len(queued), outputs={"9.images.0": 0}
            )
            if outcome != "completed":
                tally.problem(f"{task_id} ended {outcome}, expected completed")
            history = httpx.get(f"{comfyui.url}/history", timeout=30).json()
            runs = [p for p, entry in history.items() if prefix in json.dumps(entry["outputs"])]
            if runs != [prompt_id]:
                tally.problem(f"{task_id}: ComfyUI history for {prefix}: {runs} != [{prompt_id}]")
            files = sorted(p.name for p in comfyui.output_directory.glob(f"{prefix}_*"))
            if len(files) != 1:
                tally.problem(f"{task_id}: ComfyUI wrote {files}, expected one image")
            objects = list((gw.data_dir / "storage" / "objects" / "tasks" / task_id).iterdir())
            if len(objects) != 1:
                tally.problem(f"{task_id}: {len(objects)} objects uploaded, expected one")
    tally.finish("agent kill -9 mid-task (real ComfyUI, re-attach)", faults=COMFY_ROUNDS)


@pytest.mark.timeout(120 + 45 * size(sampled=2, long=10))
def test_gateway_kill_9_and_restart_completes_a_batch_exactly_once(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """The gateway SIGKILLed and restarted at random points mid-batch: all complete once."""
    seed, rng = seeded()
    faults = size(sampled=2, long=10)
    tally = Tally(seed)
    port = free_port()
    data = tmp_path / "gw"
    with contextlib.ExitStack() as stack:
        gw = stack.enter_context(gateway(data, "--port", port, *GATEWAY_RESTART_TIMEOUTS))
        dk = gw.credential("gw-kill")
        body = script_workflow(steps=8, step_s=0.1, outputs=2, output_bytes=OUTPUT_BYTES)
        workflow = gw.create_workflow(dk, body)
        agent = launch(agents, tmp_path / "worker", gw, dk, "gw-kill-worker")
        # each fault waits for a task to start after the previous restart: two per fault
        # always leave one to start
        tasks = [submit(gw, dk, workflow) for _ in range(2 * faults + 1)]
        for _ in range(faults):
            agent.log_text()
            agent.wait_log("script started", since=len(agent.seen), timeout=60)
            time.sleep(rng.uniform(0.0, 1.2))  # the fault's random point (running or between)
            gw.process.kill()
            gw.process.wait(timeout=10)
            agent.log_text()
            mark = len(agent.seen)
            gw = stack.enter_context(gateway(data, "--port", port, *GATEWAY_RESTART_TIMEOUTS))
            agent.wait_log("connected to the gateway", since=mark, timeout=60)
        for task_id in tasks:
            wait_terminal(gw, dk, task_id, timeout=120)
        wait_idle(gw, dk, "gw-kill-worker")
        for task_id in tasks:
            started = log_records(agents, "script started", task_id)
            outcome, task = tally.check(
                gw, dk, task_id, executions=len(started), outputs=SCRIPT_OUTPUTS
            )
            if outcome != "completed":
                tally.problem(f"{task_id} ended {outcome}: {task['task_error']}")
        assert agent.process.poll() is None
    tally.finish("gateway kill -9 and restart mid-batch", faults=faults)


class HoldingProxy:
    """A loopback TCP proxy to the gateway that can hold back what the agent sends.

    While held, bytes from the agent are read but not forwarded: the gateway's assign reaches
    the agent, the agent's accept never reaches the gateway.
    """

    def __init__(self, upstream_port: int) -> None:
        """Listen on a free loopback port; forward each connection to ``upstream_port``."""
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        """Stop forwarding what the agent sends."""
        self.flowing.clear()

    def release(self) -> None:
        """Forward again (to a connection's own upstream: a dead one drops what was held)."""
        self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, from_agent: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_agent:
                    self.flowing.wait()
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()  # each socket is the source of exactly one pipe

    def __enter__(self) -> HoldingProxy:
        """The running proxy."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop accepting connections and end the open ones."""
        self.release()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.timeout(120)
def test_a_task_accepted_just_before_a_gateway_crash_is_continued_not_run_again(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """A task accepted just before a gateway SIGKILL (accept unread) is continued, not rerun."""
    seed, _ = seeded()
    tally = Tally(seed)
    port = free_port()
    data = tmp_path / "gw"
    timeouts = ("--ack-timeout", "30", "--lease-ttl", "15", "--heartbeat", "0.5")
    with contextlib.ExitStack() as stack:
        gw = stack.enter_context(gateway(data, "--port", port, *timeouts))
        proxy = stack.enter_context(HoldingProxy(int(port)))
        dk = gw.credential("lost-accept")
        workflow = gw.create_workflow(dk, script_workflow(steps=20, step_s=0.1))
        agent = start_agent(tmp_path / "worker", proxy.url, dk, "lost-accept")
        agents.append(agent)
        agent.wait_log("connected to the gateway", timeout=60)
        wait_idle(gw, dk, "lost-accept")  # its hello went through: the gateway knows it
        proxy.hold()
        task_id = submit(gw, dk, workflow)
        agent.wait_log("script started", task_id=task_id, timeout=60)
        assert task_record(gw, dk, task_id)["task_status"] == "queued"  # the accept is held
        gw.process.kill()
        gw.process.wait(timeout=10)
        agent.log_text()
        mark = len(agent.seen)
        proxy.release()
        gw = stack.enter_context(gateway(data, "--port", port, *timeouts))
        agent.wait_log("connected to the gateway", since=mark, timeout=60)
        wait_terminal(gw, dk, task_id)
        wait_idle(gw, dk, "lost-accept")
        started = log_records(agents, "script started", task_id)
        outcome, task = tally.check(gw, dk, task_id, executions=len(started), outputs=None)
        if outcome != "completed":
            tally.problem(f"{task_id} ended {outcome}: {task['task_error']}")
    tally.finish("gateway kill -9 between assign and accept", faults=1)


@pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S + 2 * int(STARTUP_DEADLINE_S) + 120)
def test_launched_comfyui_killed_mid_task_fails_it_once_and_is_restarted(
    tmp_path: Path, agents: list[AgentProcess], comfyui: ComfyUIServer
) -> None:
    """A supervised ComfyUI SIGKILLed mid-task fails that task once; the next one completes."""
    seed, _ = seeded()
    tally = Tally(seed)
    base = tmp_path / "comfy-base"
    (base / "custom_nodes").mkdir(parents=True)
    install_test_nodes(base / "custom_nodes")
    env = {
        "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON": str(comfyui.python),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN": str(comfyui.main),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PORT": free_port(),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__BASE_DIRECTORY": str(base),
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__ARGS": json.dumps(
            ["--cpu", "--database-url", "sqlite:///:memory:"]
        ),
    }
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as gw:
        dk = gw.credential("comfy-kill")
        agent = start_agent(tmp_path / "worker", gw.url, dk, "comfy-kill", extra_env=env)
        agents.append(agent)
        first_pid = agent.wait_log("ComfyUI is ready", timeout=STARTUP_DEADLINE_S + 30)["pid"]
        agent.wait_log("connected to the gateway", timeout=60)
        doomed_flow = gw.create_workflow(
            dk, {"name": "doomed", "workflow_json": slow_graph(200, 0.1, f"doomed_{seed}")}
        )
        doomed = submit(gw, dk, doomed_flow)
        wait_progress(gw, dk, doomed)  # inside the slow node
        agent.log_text()
        mark = len(agent.seen)
        os.killpg(first_pid, signal.SIGKILL)
        wait_terminal(gw, dk, doomed, timeout=60)
        agent.wait_log("ComfyUI exited; restarting", since=mark, timeout=30)
        back = agent.wait_log("ComfyUI is ready", since=mark, timeout=STARTUP_DEADLINE_S + 30)
        assert back["pid"] != first_pid
        after_flow = gw.create_workflow(
            dk, {"name": "after", "workflow_json": slow_graph(2, 0.05, f"after_{seed}")}
        )
        after = submit(gw, dk, after_flow)
        wait_terminal(gw, dk, after, timeout=120)
        wait_idle(gw, dk, "comfy-kill")
        for task_id, want in ((doomed, "failed"), (after, "completed")):
            queued = log_records(agents, "ComfyUI prompt queued", task_id)
            outcome, task = tally.check(
                gw, dk, task_id, executions=len(queued), outputs={"9.images.0": 0}
            )
            if outcome != want:
                tally.problem(f"{task_id} ended {outcome} ({task['task_error']}), expected {want}")
            if want == "failed" and not str(task["task_error"]).startswith("runtime_"):
                tally.problem(f"{task_id} failed without a runtime error: {task['task_error']}")
        assert agent.process.poll() is None, "the agent went down with its ComfyUI"
    tally.finish("launched ComfyUI killed mid-task", faults=1)


@pytest.mark.timeout(120)
def test_a_full_work_dir_fails_the_task_with_disk_full_and_the_agent_carries_on(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """An output too big for a 3 MiB work_dir fails once with disk_full; the next task completes."""
    seed, _ = seeded()
    tally = Tally(seed)
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as gw:
        dk = gw.credential("disk-full")
        big = gw.create_workflow(dk, writer_workflow(8 * 1024 * 1024))
        small = gw.create_workflow(dk, writer_workflow(256 * 1024))
        worker = start_agent_on_tmpfs(
            tmp_path / "worker",
            gw.url,
            dk,
            "disk-full",
            size="3m",
            extra_env={"CYBERUN_AGENT_LIMITS__MIN_FREE_DISK_BYTES": "65536"},
        )
        agent = worker.agent
        agents.append(agent)
        agent.wait_log("connected to the gateway", timeout=60)
        stats = os.statvfs(worker.work())
        assert stats.f_blocks * stats.f_frsize == 3 * 1024 * 1024, "work_dir is not the tmpfs"
        free_before = worker.free_bytes()

        full = submit(gw, dk, big)
        wait_terminal(gw, dk, full)
        failed = agent.wait_log("task failed", task_id=full, timeout=30)
        assert failed["code"] == "disk_full", failed
        ok = submit(gw, dk, small)
        wait_terminal(gw, dk, ok)
        wait_idle(gw, dk, "disk-full")
        for task_id, want in ((full, "failed"), (ok, "completed")):
            writes = log_records(agents, "writer started", task_id)
            outcome, task = tally.check(
                gw, dk, task_id, executions=len(writes), outputs={"1.files.0": 256 * 1024}
            )
            if outcome != want:
                tally.problem(f"{task_id} ended {outcome} ({task['task_error']}), expected {want}")
        error = task_record(gw, dk, full)["task_error"]
        if error != "disk_full: no space left on the agent's disk":
            tally.problem(f"{full}: unclear error {error!r}")
        assert agent.process.poll() is None, "the agent went down with its disk"
        assert list(worker.work().iterdir()) == [], "a workspace was left on the full disk"
        assert worker.free_bytes() == free_before
    tally.finish("disk full in work_dir", faults=1)
