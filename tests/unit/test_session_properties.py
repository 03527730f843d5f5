"""Property-based tests of the protocol session (hypothesis stateful testing).

A random gateway and a random agent drive one session through arbitrary sequences of
connects, welcomes, assigns, decisions, finishes, acks, cancels, drains, clock advances
and garbage frames. Invariants: nothing raises; no more tasks are accepted than credits
allow; every terminal message is retransmitted until acknowledged, never after, and each
task attempt gets exactly one terminal message.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agent.protocol.actions import Action, Evaluate, Send, StartTask
from agent.protocol.messages import (
    AgentStatus,
    ErrorInfo,
    Pool,
    RejectReason,
    ResumeAction,
    TaskAccept,
    TaskCancelled,
    TaskComplete,
    TaskFail,
)
from agent.protocol.session import ConnState, Session, TaskKey
from tests import factories as f

SLOTS = 2
COMMUNITY_CAP = 1
RETRANSMIT_S = 5.0
task_ids = st.sampled_from(["a", "b", "c", "d"])
attempts = st.integers(min_value=0, max_value=1)
pools = st.sampled_from([Pool.TEAM, Pool.COMMUNITY])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TYPES = ["welcome", "task.assign", "task.cancel", "task.upload_urls", "ack", "drain", "error", "x"]


@st.composite
def junk_frames(draw: st.DrawFn) -> str | bytes:
    """Frames a hostile or buggy gateway might send."""
    kind = draw(st.integers(min_value=0, max_value=3))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:
        return draw(st.binary(max_size=200))
    if kind == 2:
        return json.dumps(draw(json_values))
    base: dict[str, Any] = json.loads(f.assign().model_dump_json())
    base["type"] = draw(st.sampled_from(TYPES))
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3)):
        base[key] = draw(json_values)
    return json.dumps(base)


class SessionMachine(RuleBasedStateMachine):
    """A random gateway and a random agent around one session."""

    def __init__(self) -> None:
        super().__init__()
        self.session: Session = f.make_session(SLOTS, COMMUNITY_CAP, retransmit_s=RETRANSMIT_S)
        self.now = 0.0
        self.evaluating: set[TaskKey] = set()
        self.pools: dict[TaskKey, Pool] = {}
        self.terminal_ids: dict[TaskKey, str] = {}
        self.last_sent: dict[str, float] = {}
        self.acked_ids: set[str] = set()
        self.caps = {Pool.TEAM: SLOTS, Pool.COMMUNITY: COMMUNITY_CAP}

    # ------------------------------------------------------------ bookkeeping

    def observe(self, actions: list[Action]) -> None:
        """Check and record every action the session returned."""
        for action in actions:
            if isinstance(action, Evaluate):
                key = (action.assign.task_id, action.assign.attempt)
                self.evaluating.add(key)
                self.pools[key] = action.assign.pool
            if isinstance(action, StartTask):
                self.check_acceptance(action.assign.pool)
            if isinstance(action, Send):
                self.observe_send(action)
        self.check_credits()

    def observe_send(self, action: Send) -> None:
        """Record a sent message; terminal messages are checked for uniqueness."""
        message = action.message
        assert message.id not in self.acked_ids, "terminal resent after its ack"
        if isinstance(message, TaskComplete | TaskFail | TaskCancelled):
            key = (message.task_id, message.attempt)
            assert self.terminal_ids.setdefault(key, message.id) == message.id, "two terminals"
            self.last_sent[message.id] = self.now
        if isinstance(message, TaskAccept):
            assert self.session.state is ConnState.ESTABLISHED

    def check_acceptance(self, pool: Pool) -> None:
        """At the moment a task starts, its pool and the agent are within their caps."""
        in_pool = sum(
            1 for r in self.session.running() if self.pools[(r.task_id, r.attempt)] is pool
        )
        assert in_pool <= self.caps[pool], f"{pool} over its cap"
        assert len(self.session.running()) <= SLOTS

    def check_credits(self) -> None:
        """Never more active tasks than slots, nor than a pool's cap."""
        running = self.session.running()
        assert len(running) <= SLOTS
        free = self.session.free_slots()
        assert all(0 <= n <= SLOTS for n in free.values())

    def step(self, actions: list[Action]) -> None:
        """Observe ``actions``."""
        self.observe(actions)

    # ------------------------------------------------------------ connection

    @initialize()
    def handshake(self) -> None:
        """Start connected, as most real sessions are."""
        self.step(self.session.connected(self.now))
        self.step(self.session.handle(f.welcome(), self.now))

    @rule(
        verdicts=st.lists(st.sampled_from(list(ResumeAction)), max_size=8),
        answer=st.sampled_from(["welcome", "welcome", "welcome", "none", "timeout"]),
    )
    def reconnect(self, verdicts: list[ResumeAction], answer: str) -> None:
        """Drop the link and open a new one, welcomed, left hanging, or timed out."""
        self.step(self.session.disconnected(self.now))
        self.evaluating.clear()
        self.step(self.session.connected(self.now))
        if answer == "timeout":
            self.now += self.session.config.handshake_s
            self.step(self.session.tick(self.now))
        if answer != "welcome":
            return
        held = [(r.task_id, r.attempt) for r in self.session.running()]
        held += [(t.task_id, t.attempt) for t in self.session.pending_terminals()]
        resume = dict(zip(held, verdicts, strict=False))
        self.step(self.session.handle(f.welcome(resume), self.now))

    @precondition(lambda self: self.session.state is ConnState.HELLO_SENT)
    @rule()
    def late_welcome(self) -> None:
        """Welcome a connection that was left waiting (nothing resumed)."""
        self.step(self.session.handle(f.welcome(), self.now))

    # ------------------------------------------------------------ gateway

    @rule(task_id=task_ids, attempt=attempts, pool=pools)
    def assign(self, task_id: str, attempt: int, pool: Pool) -> None:
        """Offer a task (possibly a duplicate)."""
        self.step(self.session.handle(f.assign(task_id, attempt, pool), self.now))

    @rule(task_id=task_ids, attempt=attempts, pool=pools)
    def assign_and_accept(self, task_id: str, attempt: int, pool: Pool) -> None:
        """Offer a task and accept it at once if it was put up for evaluation."""
        actions = self.session.handle(f.assign(task_id, attempt, pool), self.now)
        self.step(actions)
        if any(isinstance(a, Evaluate) for a in actions):
            self.evaluating.discard((task_id, attempt))
            self.step(self.session.decide(f.ref(task_id, attempt), self.now))

    @rule(task_id=task_ids, attempt=st.none() | attempts)
    def cancel(self, task_id: str, attempt: int | None) -> None:
        """Cancel a task (possibly unknown)."""
        self.step(self.session.handle(f.cancel(task_id, attempt), self.now))

    @rule(task_id=task_ids, attempt=attempts)
    def ack(self, task_id: str, attempt: int) -> None:
        """Acknowledge a terminal (possibly one never sent)."""
        key = (task_id, attempt)
        held = {(t.task_id, t.attempt) for t in self.session.pending_terminals()}
        was_sent = key in self.terminal_ids and self.terminal_ids[key] in self.last_sent
        established = self.session.state is ConnState.ESTABLISHED
        self.step(self.session.handle(f.ack(f.ref(task_id, attempt)), self.now))
        if key in held and was_sent and established:
            self.acked_ids.add(self.terminal_ids[key])

    @rule(chance=st.integers(min_value=0, max_value=15), local=st.booleans())
    def drain(self, chance: int, local: bool) -> None:
        """Rarely (drains are final), begin a drain locally (SIGTERM) or from the gateway."""
        if chance != 0:
            return
        if local:
            self.step(self.session.drain(self.now))
        else:
            self.step(self.session.handle(f.drain(), self.now))

    @rule(frame=junk_frames())
    def garbage(self, frame: str | bytes) -> None:
        """Send a malformed or hostile frame."""
        self.step(self.session.receive(frame, self.now))

    # ------------------------------------------------------------ agent

    @precondition(lambda self: bool(self.evaluating))
    @rule(data=st.data(), accept=st.booleans())
    def decide(self, data: st.DataObject, accept: bool) -> None:
        """Finish evaluating an offer."""
        key = data.draw(st.sampled_from(sorted(self.evaluating)))
        self.evaluating.discard(key)
        reject = None if accept else RejectReason.POLICY_DENIED
        self.step(self.session.decide(f.ref(*key), self.now, reject=reject))

    @precondition(lambda self: bool(self.session.running()))
    @rule(data=st.data(), outcome=st.sampled_from(["complete", "fail", "cancelled"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        """Finish a running task one way or another."""
        task = data.draw(st.sampled_from(self.session.running()))
        if outcome == "complete":
            actions = self.session.complete(task, self.now, [])
        elif outcome == "fail":
            actions = self.session.fail(task, self.now, ErrorInfo(code="x", message="y"))
        else:
            actions = self.session.cancelled(task, self.now, "user")
        self.step(actions)

    @rule(status=st.sampled_from([None, None, AgentStatus.UNHEALTHY, AgentStatus.SYNCING]))
    def set_status(self, status: AgentStatus | None) -> None:
        """Change health (mostly back to healthy)."""
        self.step(self.session.set_status(status, self.now))

    @rule(pool=pools, cap=st.sampled_from([0, 1, 2, 2, 3]))
    def set_pool_cap(self, pool: Pool, cap: int) -> None:
        """Resize a pool (lowering a cap never cancels running work)."""
        self.caps[pool] = cap
        self.step(self.session.set_pool_cap(pool, cap, self.now))

    @rule(dt=st.floats(min_value=0, max_value=30, allow_nan=False))
    def advance(self, dt: float) -> None:
        """Let time pass, ticking at every deadline like the shell does."""
        target = self.now + dt
        while (deadline := self.session.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.step(self.session.tick(self.now))
        self.now = target
        self.step(self.session.tick(self.now))

    # ------------------------------------------------------------ invariants

    @invariant()
    def unacked_terminals_are_retransmitted(self) -> None:
        """While connected, no unacknowledged terminal goes unsent for a full interval."""
        if self.session.state is not ConnState.ESTABLISHED:
            return
        for message in self.session.pending_terminals():
            last = self.last_sent.get(message.id)
            assert last is not None, "pending terminal never sent while connected"
            assert self.now - last <= RETRANSMIT_S + 1e-9

    @invariant()
    def credits_match_running_work(self) -> None:
        """Advertised credit never exceeds what the slots and pool caps leave free."""
        running = self.session.running()
        free = self.session.free_slots()
        for pool, credit in free.items():
            in_pool = sum(1 for r in running if self.pools[(r.task_id, r.attempt)] is pool)
            assert credit <= max(0, self.caps[pool] - in_pool)
            assert credit <= SLOTS - len(running)


SessionMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSessionProperties = SessionMachine.TestCase
