"""Network faults between a real agent and a real gateway: every task still ends exactly once.

Everything is real and on loopback: the gateway process (embedded storage), agent processes
running the scripted runtime (a real subprocess per task), and the proxies of
``tests/faultproxy.py`` in between. The agent's ``gateway_url`` is a ``FaultProxy`` in front
of the gateway (the WebSocket link); the gateway's ``--public-url`` is an ``HttpFaultProxy``
in front of itself, so every presigned storage URL (agent uploads, test downloads) goes
through it.

What is checked after every scenario, at the gateway and in the agent's log:

- exactly one terminal event per task in the gateway's stored event history (its SQLite
  file, read-only: the SSE stream stops at the first one, so it cannot show a second);
- every completed task's outputs download with the right size;
- no attempt ran twice: the scripted runtime logs ``script started`` once per execution, the
  agent ``task accepted`` once per (task, attempt); a re-dispatch after a lost lease is a new
  attempt, allowed, and noted in the record;
- the agent ends idle at the gateway (``agent_status`` idle, no running task).

Random choices come from one ``random.Random``; its seed is in every failure message
(``CYBERUN_RELIABILITY_SEED`` replays one).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.tasks.runner import URL_REFRESHES
from tests.agent_process import AgentProcess, script_workflow, start_agent
from tests.faultproxy import (
    Fault,
    FaultProxy,
    HttpFaultProxy,
    ResetRequest,
    ResetResponse,
    Trickle,
    expired,
    status,
)
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway
from tests.reliability.ledger import record, size

pytestmark = [pytest.mark.slow]

SEED = int(os.environ.get("CYBERUN_RELIABILITY_SEED") or secrets.randbits(32))
TERMINAL = ("completed", "failed", "cancelled")
OUTPUT_PATH = r"^/storage/tasks/"  # the agent's output uploads
KEEPALIVE_TIMEOUT = "- timed out waiting for keepalive pong"  # websockets' debug record
FAST_PING = {  # the agent notices a dead link within about a second
    "CYBERUN_AGENT_TIMEOUTS__PING_INTERVAL_S": "0.5",
    "CYBERUN_AGENT_TIMEOUTS__PING_TIMEOUT_S": "0.5",
    "CYBERUN_AGENT_TIMEOUTS__CONNECT_S": "2",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Rig:
    """A gateway behind two fault proxies, the agents started against it, and its team key."""

    gw: GatewayProcess
    link: FaultProxy
    storage: HttpFaultProxy
    dk: str
    home: Path
    agents: list[AgentProcess] = field(default_factory=list)

    def start(self, name: str, **env: str) -> AgentProcess:
        """Start an agent whose gateway link goes through ``link``; wait until connected."""
        agent = start_agent(self.home / name, self.link.url, self.dk, name, extra_env=env)
        self.agents.append(agent)
        agent.wait_log("connected to the gateway", timeout=30)
        return agent

    def submit(self, workflow: str, **parameters: Any) -> str:
        """Run the workflow; return the task id."""
        with self.gw.client(self.dk) as http:
            answer = http.post(f"/r/workflows/{workflow}/run", json={"parameters": parameters})
        assert answer.status_code == 202, answer.text
        return str(answer.json()["task_id"])

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Every task's record once all of them are terminal (fails after ``timeout``)."""
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        with self.gw.client(self.dk) as http:
            while True:
                for task_id in [t for t in ids if t not in done]:
                    task = http.get(f"/r/tasks/{task_id}").json()
                    if task["task_status"] in TERMINAL:
                        done[task_id] = task
                if len(done) == len(ids):
                    return done
                if time.monotonic() > deadline:
                    left = {t: http.get(f"/r/tasks/{t}").json()["task_status"] for t in ids}
                    raise AssertionError(
                        f"seed {SEED}: tasks not terminal after {timeout}s: {left}\n"
                        + "\n".join(a.log_text() for a in self.agents)
                    )
                time.sleep(0.1)  # a poll interval with a deadline: REST has no "any task ended"

    def all_terminal(self, ids: list[str]) -> bool:
        """Whether every one of these tasks has ended."""
        with self.gw.client(self.dk) as http:
            return all(http.get(f"/r/tasks/{t}").json()["task_status"] in TERMINAL for t in ids)

    def wait_idle(self, agent_id: str, timeout: float = 20) -> None:
        """Wait until the gateway lists the agent idle with nothing running."""
        deadline = time.monotonic() + timeout
        with self.gw.client(self.dk) as http:
            while True:
                listed = http.get("/r/agents").json()["agent_list"]
                found = next((a for a in listed if a["agent_id"] == agent_id), None)
                if found and found["agent_status"] == "idle" and not found["running_tasks"]:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"seed {SEED}: {agent_id} not idle: {found}")
                time.sleep(0.1)  # a poll interval with a deadline: statuses come every 0.5 s

    def terminal_events(self) -> Counter[str]:
        """Terminal events per task in the gateway's stored history (read-only)."""
        db = self.gw.data_dir / "gateway.sqlite3"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                "SELECT task_id FROM task_events WHERE event IN (?, ?, ?)", TERMINAL
            ).fetchall()
        return Counter(row[0] for row in rows)

    def outputs_intact(self, task_id: str, sizes: dict[str, int]) -> bool:
        """Whether the task's result lists exactly ``sizes`` and each downloads at its size."""
        with self.gw.client(self.dk) as http:
            urls: dict[str, str] = http.get(f"/r/tasks/{task_id}/result").json()["download_urls"]
        if sorted(urls) != sorted(sizes):
            return False
        return all(len(httpx.get(url, timeout=30).content) == sizes[k] for k, url in urls.items())


@dataclass(frozen=True)
class Audit:
    """What the checks found for a set of tasks."""

    tasks: int
    lost: int
    duplicated: int
    redispatched: int
    statuses: dict[str, int]
    detail: str


def audit(rig: Rig, records: dict[str, dict[str, Any]], sizes: dict[str, int]) -> Audit:
    """Check terminal events, outputs and executions of these tasks (module docstring)."""
    events = rig.terminal_events()
    starts: Counter[str] = Counter()
    accepts: Counter[tuple[str, int]] = Counter()
    for agent in rig.agents:
        agent.log_text()  # drain what the agent logged so far into agent.seen
        for line in agent.seen:
            if line.get("event") == "script started":
                starts[str(line["task_id"])] += 1
            elif line.get("event") == "task accepted":
                accepts[(str(line["task_id"]), int(line["attempt"]))] += 1
    lost, duplicated, notes = 0, 0, []
    for task_id, task in records.items():
        attempts = [a for (t, a) in accepts if t == task_id]
        if events[task_id] != 1:
            notes.append(f"{task_id}: {events[task_id]} terminal events")
            lost += events[task_id] == 0
            duplicated += events[task_id] > 1
        if task["task_status"] == "completed" and not rig.outputs_intact(task_id, sizes):
            notes.append(f"{task_id}: outputs missing or wrong")
            lost += 1
        if starts[task_id] > len(attempts) or any(accepts[(task_id, a)] > 1 for a in attempts):
            notes.append(f"{task_id}: {starts[task_id]} executions for attempts {attempts}")
            duplicated += 1
    redispatched = sum(1 for task in records.values() if task["retry_count"])
    statuses = Counter(str(task["task_status"]) for task in records.values())
    failures = sorted({str(t["task_error"]) for t in records.values() if t["task_error"]})
    detail = f"seed {SEED}; {dict(statuses)}; re-dispatched {redispatched}; {notes}; {failures}"
    return Audit(len(records), lost, duplicated, redispatched, dict(statuses), detail)


@contextlib.contextmanager
def make_rig(home: Path, team: str, *gateway_args: str) -> Iterator[Rig]:
    """A gateway on a known port with both proxies in front of it; agents stopped at the end."""
    port = _free_port()
    with (
        FaultProxy("127.0.0.1", port) as link,
        HttpFaultProxy("127.0.0.1", port) as storage,
        gateway(home / "gw", "--port", str(port), "--public-url", storage.url, *gateway_args) as gw,
    ):
        gw.url = f"http://127.0.0.1:{port}"  # it prints its public URL: the storage proxy's
        rig = Rig(gw=gw, link=link, storage=storage, dk=gw.credential(team), home=home)
        try:
            yield rig
        finally:
            for agent in rig.agents:
                agent.stop()


# ----------------------------------------------------------------------------- link cuts


@pytest.mark.timeout(300)
def test_random_cuts_of_the_gateway_link_end_every_task_exactly_once(tmp_path: Path) -> None:
    """Resetting the agent's link at random points never loses, repeats or doubles a task."""
    rng = random.Random(SEED)  # noqa: S311 - a replayable fault schedule
    tasks, cuts = size(sampled=12, long=100), size(sampled=8, long=60)
    with make_rig(tmp_path, "cuts", *FAST_TIMEOUTS, "--lease-ttl", "6") as rig:
        body = script_workflow(outputs=2, output_bytes=20_000, step_s=0.05) | {"max_retries": 2}
        workflow = rig.gw.create_workflow(rig.dk, body)
        # two agents: an offer lost with a cut keeps that agent off the task for 30 s (the
        # gateway's refusal after a missed ACK deadline); the other one can take it meanwhile
        names = ["cut-agent-1", "cut-agent-2"]
        agents = [rig.start(n, CYBERUN_AGENT_SLOTS=str(rng.choice((2, 3)))) for n in names]
        ids = [rig.submit(workflow, steps=rng.randint(5, 40)) for _ in range(tasks)]
        done = 0
        for _ in range(cuts):
            if rig.all_terminal(ids):
                break  # nothing left to disturb
            # a random point in the stream: after a random number of further bytes
            stats = rig.link.stats
            target = stats.bytes_up + stats.bytes_down + rng.randint(200, 4000)
            with contextlib.suppress(AssertionError):  # quiet link: cut where it is
                rig.link.wait_bytes(target, timeout=5)
            since = [len(agent.seen) for agent in agents]
            if rig.link.cut() == 0:
                continue
            done += 1
            for agent, seen in zip(agents, since, strict=True):
                agent.wait_log("connected to the gateway", since=seen, timeout=30)
        records = rig.wait_terminal(ids, timeout=size(sampled=90, long=600))
        for name in names:
            rig.wait_idle(name)
        found = audit(rig, records, {"1.images.0": 20_000, "1.images.1": 20_000})
    record(
        "network: random link cuts",
        tasks=found.tasks,
        faults=done,
        lost=found.lost,
        duplicated=found.duplicated,
        detail=found.detail,
    )
    assert (found.lost, found.duplicated) == (0, 0), found.detail
    assert found.statuses == {"completed": tasks}, found.detail
    assert done > 0, found.detail


# ----------------------------------------------------------------------------- dead links


def _kill_link(agent: AgentProcess, link: FaultProxy, how: str) -> None:
    """Make the link dead; return once the agent noticed (its keepalive ping went unanswered)."""
    since = len(agent.seen)
    if how == "stall":
        link.stall()
    elif how == "blackhole":
        link.blackhole()
    else:  # the live connection is reset and every new one refused
        link.refuse()
        link.cut()
        agent.wait_log("disconnected from the gateway", since=since, timeout=15)
        link.wait_faults("refused", 2, timeout=15)  # it keeps trying meanwhile
        return
    agent.wait_log(KEEPALIVE_TIMEOUT, since=since, timeout=15)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["stall", "blackhole", "refuse"])
def test_a_dead_link_is_dropped_and_tasks_resume_once_after_heal(tmp_path: Path, how: str) -> None:
    """A link that stops answering past the ping timeout is dropped, re-made; tasks end once."""
    rng = random.Random(f"{SEED}-{how}")  # noqa: S311
    count = size(sampled=3, long=12)
    # the lease outlives the outage, so the gateway answers the reconnect with `continue`
    with make_rig(tmp_path, f"dead-{how}", *FAST_TIMEOUTS, "--lease-ttl", "20") as rig:
        body = script_workflow(outputs=1, output_bytes=10_000, step_s=0.1)
        workflow = rig.gw.create_workflow(rig.dk, body)
        agent = rig.start("dead-agent", CYBERUN_AGENT_SLOTS=str(count), **FAST_PING)
        # long enough to still run when the link is back (see the reconnect test below for why)
        ids = [rig.submit(workflow, steps=rng.randint(50, 70)) for _ in range(count)]
        for task_id in ids:
            agent.wait_log("script started", task_id=task_id, timeout=30)
        started = time.monotonic()
        _kill_link(agent, rig.link, how)
        detected_s = time.monotonic() - started
        since = len(agent.seen)
        rig.link.heal()
        if how != "refuse":  # (refused: it was dropped at once)
            agent.wait_log("disconnected from the gateway", since=since, timeout=15)
        agent.wait_log("connected to the gateway", since=since, timeout=30)
        outage_s = time.monotonic() - started
        records = rig.wait_terminal(ids, timeout=60)
        rig.wait_idle("dead-agent")
        found = audit(rig, records, {"1.images.0": 10_000})
    record(
        f"network: {how} of the gateway link",
        tasks=found.tasks,
        faults=1,
        lost=found.lost,
        duplicated=found.duplicated,
        detail=f"detected {detected_s:.1f}s, back {outage_s:.1f}s; {found.detail}",
    )
    assert (found.lost, found.duplicated) == (0, 0), found.detail
    assert found.statuses == {"completed": count}, found.detail
    assert found.redispatched == 0, found.detail  # resumed, not re-run
    assert detected_s < 10, found.detail


@pytest.mark.timeout(60)
def test_a_link_that_stays_dead_is_given_up_within_the_ping_timeout(tmp_path: Path) -> None:
    """An unanswered ping drops a dead link within ping_timeout_s, not websockets' 5 s close."""
    with make_rig(tmp_path, "stays-dead", *FAST_TIMEOUTS) as rig:
        agent = rig.start("stays-dead-agent", **FAST_PING)
        since = len(agent.seen)
        rig.link.stall()  # never healed while the agent gives up on it
        timed_out = agent.wait_log(KEEPALIVE_TIMEOUT, since=since, timeout=15)
        dropped = agent.wait_log("disconnected from the gateway", since=since, timeout=15)
        rig.link.heal()
        agent.wait_log("connected to the gateway", since=since, timeout=30)
    gap_s = (_stamp(dropped) - _stamp(timed_out)).total_seconds()
    # the closing handshake waits at most ping_timeout_s (0.5 s here), plus the 2 s bound on
    # the agent's own close; websockets' default close_timeout alone would be 5 s
    assert gap_s < 3.5, f"a dead link was held {gap_s:.1f} s after its ping timed out"


def _stamp(entry: dict[str, Any]) -> datetime:
    """When the agent wrote a log record (its ISO ``timestamp``)."""
    return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00"))


@pytest.mark.timeout(120)
def test_an_upload_request_lost_with_the_link_is_asked_again_on_reconnect(
    tmp_path: Path,
) -> None:
    """A task that ends while the link is dead uploads and reports promptly once it is back."""
    with make_rig(tmp_path, "lost-request", *FAST_TIMEOUTS, "--lease-ttl", "20") as rig:
        body = script_workflow(outputs=1, output_bytes=10_000, step_s=0.1)
        workflow = rig.gw.create_workflow(rig.dk, body)
        agent = rig.start("lost-request-agent", **FAST_PING)
        task_id = rig.submit(workflow, steps=3)
        agent.wait_log("script started", task_id=task_id, timeout=30)
        _kill_link(agent, rig.link, "stall")  # the script ends and asks for URLs meanwhile
        since = len(agent.seen)
        rig.link.heal()
        agent.wait_log("connected to the gateway", since=since, timeout=30)
        back = time.monotonic()
        # a re-asked request is answered in milliseconds on loopback; 5 s is generous
        try:
            agent.wait_log("report acknowledged", task_id=task_id, since=since, timeout=5)
        except AssertionError:
            agent.kill()  # not worth a drain: it would wait out the lost request
            raise
        lag_s = time.monotonic() - back
        records = rig.wait_terminal([task_id], timeout=10)
        found = audit(rig, records, {"1.images.0": 10_000})
    record(
        "network: upload request lost with the link",
        tasks=found.tasks,
        faults=1,
        lost=found.lost,
        duplicated=found.duplicated,
        detail=f"reported {lag_s:.1f}s after the reconnect; {found.detail}",
    )
    assert (found.lost, found.duplicated) == (0, 0), found.detail
    assert found.statuses == {"completed": 1}, found.detail


# ----------------------------------------------------------------------------- storage

OUTPUT_BYTES = 200_000
STORAGE_CASES: list[tuple[str, Fault, int | None, str]] = [
    ("500", status(500), 2, "completed"),
    ("503 with Retry-After", status(503, retry_after=1), 1, "completed"),
    ("reset mid-body", ResetRequest(after=50_000), 2, "completed"),
    ("slow body", Trickle(chunk=8192, interval_s=0.01), 2, "completed"),
    ("expired URL", expired(), 2, "completed"),
    ("expired URL forever", expired(), None, "failed"),
    ("503 forever", status(503, retry_after=0), None, "failed"),
]


@pytest.fixture(scope="module")
def storage_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, str]]:
    """One gateway + agent (2 slots) whose uploads all go through the storage proxy."""
    with make_rig(tmp_path_factory.mktemp("storage"), "storage", *FAST_TIMEOUTS) as rig:
        body = script_workflow(outputs=2, output_bytes=OUTPUT_BYTES)
        workflow = rig.gw.create_workflow(rig.dk, body)
        rig.start("storage-agent", CYBERUN_AGENT_SLOTS="2")
        yield rig, workflow


def _storage_case(
    rig: Rig, workflow: str, fault: Fault, times: int | None
) -> tuple[dict[str, dict[str, Any]], Audit, int]:
    """Run tasks while ``fault`` hits the next ``times`` output PUTs; audit them."""
    count = size(sampled=2, long=10)
    before = rig.storage.stats.faults.get(fault.name, 0)
    rig.storage.inject(fault, times=times, method="PUT", path=OUTPUT_PATH)
    try:
        ids = [rig.submit(workflow, steps=3) for _ in range(count)]
        records = rig.wait_terminal(ids, timeout=size(sampled=60, long=300))
        assert times is None or rig.storage.pending() == 0, f"seed {SEED}: faults left"
    finally:
        rig.storage.heal()
    rig.wait_idle("storage-agent")
    sizes = {"1.images.0": OUTPUT_BYTES, "1.images.1": OUTPUT_BYTES}
    return records, audit(rig, records, sizes), rig.storage.stats.faults[fault.name] - before


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "fault", "times", "outcome"), STORAGE_CASES)
def test_storage_faults_during_uploads_keep_every_output_or_fail_once(
    storage_rig: tuple[Rig, str], name: str, fault: Fault, times: int | None, outcome: str
) -> None:
    """Upload faults are retried (fresh URLs when expired); outputs intact, or one clear failure."""
    rig, workflow = storage_rig
    records, found, injected = _storage_case(rig, workflow, fault, times)
    record(
        f"storage: {name}",
        tasks=found.tasks,
        faults=injected,
        lost=found.lost,
        duplicated=found.duplicated,
        detail=found.detail,
    )
    assert (found.lost, found.duplicated) == (0, 0), found.detail
    assert found.statuses == {outcome: found.tasks}, found.detail
    if outcome == "failed":
        assert all(t["task_error"].startswith("upload_failed: output ") for t in records.values())
    if times is None and fault.name == "expired":
        # each task's first output: one PUT per fresh set of URLs, never a blind retry
        assert injected == URL_REFRESHES * found.tasks, found.detail


@pytest.mark.timeout(120)
def test_a_lost_upload_answer_does_not_fail_the_task(storage_rig: tuple[Rig, str]) -> None:
    """An upload stored but whose 200 never arrived is not a failure: the retry's 412 is ours."""
    rig, workflow = storage_rig
    _, found, injected = _storage_case(rig, workflow, ResetResponse(), 1)
    assert injected == 1
    assert (found.lost, found.duplicated) == (0, 0), found.detail
    assert found.statuses == {"completed": found.tasks}, found.detail
