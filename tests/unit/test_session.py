"""Every transition of the agent-side protocol session, one behaviour per test."""

from __future__ import annotations

import json
from typing import TypeVar

import pytest

from agent.protocol.actions import (
    AbandonTask,
    Action,
    CancelTask,
    Close,
    Deliver,
    DrainRequested,
    Established,
    Evaluate,
    Forget,
    PeerError,
    Send,
    StartTask,
    SyncModels,
)
from agent.protocol.messages import (
    AgentStatus,
    CloseCode,
    Envelope,
    Error,
    ErrorCode,
    ErrorInfo,
    Hello,
    LogLine,
    OutputFile,
    Pool,
    RejectReason,
    ResumeAction,
    Status,
    Sync,
    SyncModel,
    TaskAccept,
    TaskCancelled,
    TaskComplete,
    TaskFail,
    TaskLog,
    TaskPhase,
    TaskProgress,
    TaskReject,
    TaskUploadRequest,
    TaskUploadUrls,
    UploadFile,
    UploadTarget,
)
from agent.protocol.session import ConnState, Session
from tests import factories as f

M = TypeVar("M", bound=Envelope)
SHA = "a" * 64


def sent(actions: list[Action], kind: type[M]) -> list[M]:
    """Return the messages of type ``kind`` that ``actions`` send."""
    return [a.message for a in actions if isinstance(a, Send) and isinstance(a.message, kind)]


def only(actions: list[Action], kind: type[M]) -> M:
    """Return the single message of type ``kind`` that ``actions`` send."""
    found = sent(actions, kind)
    assert len(found) == 1, actions
    return found[0]


def established(slots: int = 2, community: int | None = None) -> Session:
    """Return a session that has completed its handshake at t=0."""
    session = f.make_session(slots, community)
    session.connected(0.0)
    session.handle(f.welcome(), 0.0)
    return session


def running_task(session: Session, task_id: str = "t1", now: float = 1.0) -> None:
    """Assign ``task_id`` and accept it."""
    session.handle(f.assign(task_id), now)
    session.decide(f.ref(task_id), now)


def test_connected_sends_hello_with_identity_pools_and_capacity() -> None:
    """Opening a connection sends exactly one hello describing the agent."""
    session = f.make_session(slots=2, community=1)
    hello = only(session.connected(0.0), Hello)
    assert hello.agent_id == "gpu-node-01"
    assert hello.protocol == 1
    assert hello.pools == [Pool.TEAM, Pool.COMMUNITY]
    assert hello.capacity == {Pool.TEAM: 2, Pool.COMMUNITY: 1}
    assert hello.in_flight == []
    assert session.state is ConnState.HELLO_SENT


def test_message_ids_are_uuid7_and_timestamps_follow_now() -> None:
    """Messages carry a UUIDv7 id and a UTC timestamp derived from ``now``."""
    session = f.make_session()
    hello = only(session.connected(30.0), Hello)
    assert hello.id[14] == "7"
    assert (hello.ts - f.T0).total_seconds() == pytest.approx(30.0)


def test_no_welcome_within_handshake_deadline_closes() -> None:
    """Without a welcome the handshake deadline closes the connection once."""
    session = f.make_session(handshake_s=10)
    session.connected(0.0)
    assert session.next_deadline() == 10.0
    assert session.tick(9.9) == []
    assert session.tick(10.0) == [
        Close(CloseCode.HANDSHAKE_TIMEOUT, "no welcome within the deadline")
    ]
    assert session.tick(11.0) == []


def test_welcome_establishes_and_sends_status() -> None:
    """A welcome establishes the session, announces it, and sends an idle status."""
    session = f.make_session(slots=2, community=1)
    session.connected(0.0)
    actions = session.handle(f.welcome(heartbeat_s=7), 0.5)
    assert isinstance(actions[0], Established)
    status = only(actions, Status)
    assert status.agent_status is AgentStatus.IDLE
    assert status.free_slots == {Pool.TEAM: 2, Pool.COMMUNITY: 1}
    assert session.state is ConnState.ESTABLISHED
    assert session.next_deadline() == pytest.approx(7.5)


def test_heartbeat_status_is_sent_at_the_welcome_interval() -> None:
    """A status goes out one heartbeat interval after the last one, listing running tasks."""
    session = established()
    running_task(session, now=1.0)  # the change itself sends a status at t=1
    assert session.tick(15.9) == []
    status = only(session.tick(16.0), Status)
    assert [(r.task_id, r.attempt) for r in status.running] == [("t1", 0)]
    assert status.agent_status is AgentStatus.BUSY
    assert session.next_deadline() == 31.0


def test_welcome_for_another_agent_closes_with_protocol_error() -> None:
    """A welcome naming a different agent_id closes the connection."""
    session = f.make_session()
    session.connected(0.0)
    actions = session.handle(f.welcome(agent_id="someone-else"), 0.0)
    assert actions == [Close(CloseCode.PROTOCOL_ERROR, "welcome for another agent_id")]


def test_second_welcome_is_a_protocol_error() -> None:
    """A welcome after the session is established is answered with an error."""
    session = established()
    error = only(session.handle(f.welcome(), 1.0), Error)
    assert error.code is ErrorCode.UNEXPECTED_MESSAGE


def test_assign_before_welcome_is_unexpected() -> None:
    """Work offered before the handshake completes is refused with an error."""
    session = f.make_session()
    session.connected(0.0)
    assign = f.assign()
    error = only(session.handle(assign, 0.1), Error)
    assert error.code is ErrorCode.UNEXPECTED_MESSAGE
    assert error.re == assign.id


def test_assign_reserves_a_slot_and_asks_for_evaluation() -> None:
    """An assign with credit yields Evaluate and a status with one credit fewer."""
    session = established(slots=2)
    assign = f.assign()
    actions = session.handle(assign, 1.0)
    assert actions[0] == Evaluate(assign)
    assert only(actions, Status).free_slots[Pool.TEAM] == 1


def test_accepting_sends_ack_and_starts_the_task() -> None:
    """Accepting sends task.accept (re = assign id) and starts the task."""
    session = established()
    assign = f.assign()
    session.handle(assign, 1.0)
    actions = session.decide(f.ref(), 1.1)
    accept = only(actions, TaskAccept)
    assert (accept.task_id, accept.attempt, accept.re) == ("t1", 0, assign.id)
    assert StartTask(assign) in actions
    assert session.running() == [f.ref()]


def test_rejecting_sends_reason_and_frees_the_slot() -> None:
    """Rejecting sends task.reject with the reason and releases the reserved slot."""
    session = established(slots=1)
    session.handle(f.assign(), 1.0)
    actions = session.decide(f.ref(), 1.1, reject=RejectReason.POLICY_DENIED, message="node X")
    reject = only(actions, TaskReject)
    assert reject.reason is RejectReason.POLICY_DENIED
    assert reject.message == "node X"
    assert session.free_slots() == {Pool.TEAM: 1}
    assert session.is_empty()


def test_assign_without_credit_is_rejected_no_capacity() -> None:
    """An assign beyond the free slots is rejected at once, never evaluated."""
    session = established(slots=1)
    running_task(session, "t1")
    actions = session.handle(f.assign("t2"), 2.0)
    assert only(actions, TaskReject).reason is RejectReason.NO_CAPACITY
    assert not any(isinstance(a, Evaluate) for a in actions)


def test_community_cap_limits_community_credit_only() -> None:
    """The community cap bounds community tasks while team credit remains."""
    session = established(slots=3, community=1)
    session.handle(f.assign("c1", pool=Pool.COMMUNITY), 1.0)
    session.decide(f.ref("c1"), 1.0)
    assert session.free_slots() == {Pool.TEAM: 2, Pool.COMMUNITY: 0}
    rejected = session.handle(f.assign("c2", pool=Pool.COMMUNITY), 1.5)
    assert only(rejected, TaskReject).reason is RejectReason.NO_CAPACITY


def test_pool_not_accepted_by_gateway_gets_no_credit() -> None:
    """A pool the welcome does not accept is advertised with zero credit."""
    session = f.make_session(slots=2, community=2)
    session.connected(0.0)
    session.handle(f.welcome(pools=(Pool.TEAM,)), 0.0)
    assert session.free_slots() == {Pool.TEAM: 2, Pool.COMMUNITY: 0}


def test_set_pool_cap_changes_credit_and_sends_status() -> None:
    """Closing the community pool (e.g. outside its hours) is announced at once."""
    session = established(slots=2, community=2)
    status = only(session.set_pool_cap(Pool.COMMUNITY, 0, 1.0), Status)
    assert status.free_slots == {Pool.TEAM: 2, Pool.COMMUNITY: 0}


def preempting(slots: int = 1) -> Session:
    """An established session whose team tasks may pre-empt community tasks."""
    session = f.make_session(slots, community=1, preempt=True)
    session.connected(0.0)
    session.handle(f.welcome(), 0.0)
    return session


def test_preempt_keeps_team_credit_while_a_community_task_runs() -> None:
    """With pre-emption a running community task leaves the team credit at one slot."""
    session = preempting(slots=1)
    session.handle(f.assign("c1", pool=Pool.COMMUNITY), 1.0)
    session.decide(f.ref("c1"), 1.0)
    assert session.free_slots() == {Pool.TEAM: 1, Pool.COMMUNITY: 0}


def test_team_task_preempts_the_community_task_when_no_slot_is_free() -> None:
    """Accepting a team task in a full agent cancels a community task as ``preempted``."""
    session = preempting(slots=1)
    session.handle(f.assign("c1", pool=Pool.COMMUNITY), 1.0)
    session.decide(f.ref("c1"), 1.0)
    session.handle(f.assign("t1"), 2.0)
    actions = session.decide(f.ref("t1"), 2.0)
    cancels = [a for a in actions if isinstance(a, CancelTask)]
    assert [(c.task.task_id, c.reason) for c in cancels] == [("c1", "preempted")]
    assert only(actions, TaskAccept).task_id == "t1"
    assert any(isinstance(a, StartTask) for a in actions)
    assert session.free_slots() == {Pool.TEAM: 0, Pool.COMMUNITY: 0}
    report = session.cancelled(f.ref("c1"), 3.0, "preempted")
    assert only(report, TaskCancelled).reason == "preempted"


def test_team_task_with_a_free_slot_preempts_nothing() -> None:
    """Pre-emption only happens when the slots are actually full."""
    session = preempting(slots=2)
    session.handle(f.assign("c1", pool=Pool.COMMUNITY), 1.0)
    session.decide(f.ref("c1"), 1.0)
    session.handle(f.assign("t1"), 2.0)
    actions = session.decide(f.ref("t1"), 2.0)
    assert not any(isinstance(a, CancelTask) for a in actions)


def test_without_preempt_a_community_task_blocks_team_credit() -> None:
    """Pre-emption is off by default: a full agent offers no team credit."""
    session = established(slots=1, community=1)
    session.handle(f.assign("c1", pool=Pool.COMMUNITY), 1.0)
    session.decide(f.ref("c1"), 1.0)
    assert session.free_slots() == {Pool.TEAM: 0, Pool.COMMUNITY: 0}


def test_gateway_cancel_of_a_preempted_task_is_not_repeated() -> None:
    """A task already stopping for pre-emption is not cancelled a second time."""
    session = preempting(slots=1)
    session.handle(f.assign("c1", pool=Pool.COMMUNITY), 1.0)
    session.decide(f.ref("c1"), 1.0)
    session.handle(f.assign("t1"), 2.0)
    session.decide(f.ref("t1"), 2.0)
    actions = session.handle(f.cancel("c1"), 2.5)
    assert not any(isinstance(a, CancelTask) for a in actions)


def test_only_when_idle_closes_community_credit_while_a_team_task_runs() -> None:
    """``only_when_idle``: no community credit while a team task is held."""
    session = f.make_session(3, community=2, only_when_idle=True)
    session.connected(0.0)
    session.handle(f.welcome(), 0.0)
    assert session.free_slots() == {Pool.TEAM: 3, Pool.COMMUNITY: 2}
    running_task(session, "t1")
    assert session.free_slots() == {Pool.TEAM: 2, Pool.COMMUNITY: 0}
    rejected = session.handle(f.assign("c1", pool=Pool.COMMUNITY), 2.0)
    assert only(rejected, TaskReject).reason is RejectReason.NO_CAPACITY


def test_duplicate_assign_while_evaluating_is_ignored() -> None:
    """A repeated assign during evaluation produces nothing new."""
    session = established()
    assign = f.assign()
    session.handle(assign, 1.0)
    assert session.handle(assign, 1.2) == []


def test_duplicate_assign_after_accept_repeats_the_accept() -> None:
    """A repeated assign of an accepted task is answered with task.accept again."""
    session = established()
    running_task(session)
    again = f.assign()
    accept = only(session.handle(again, 2.0), TaskAccept)
    assert accept.re == again.id
    assert len(session.running()) == 1


def test_duplicate_assign_after_reject_repeats_the_same_reject() -> None:
    """A repeated assign of a rejected task gets the identical reject back."""
    session = established()
    session.handle(f.assign(), 1.0)
    first = only(session.decide(f.ref(), 1.0, reject=RejectReason.UNSUPPORTED_NODE), TaskReject)
    assert only(session.handle(f.assign(), 2.0), TaskReject) == first


def test_duplicate_assign_after_finish_repeats_the_terminal() -> None:
    """A repeated assign of a finished task resends its terminal message."""
    session = established()
    running_task(session)
    done = only(session.complete(f.ref(), 3.0, []), TaskComplete)
    assert only(session.handle(f.assign(), 4.0), TaskComplete) == done


def test_draining_rejects_new_work_and_advertises_no_credit() -> None:
    """While draining, assigns are rejected and the status says draining."""
    session = established()
    status = only(session.drain(1.0), Status)
    assert status.agent_status is AgentStatus.DRAINING
    assert status.free_slots == {Pool.TEAM: 0}
    assert only(session.handle(f.assign(), 2.0), TaskReject).reason is RejectReason.DRAINING
    assert session.drain(3.0) == []


def test_accept_decided_after_drain_began_becomes_reject() -> None:
    """An evaluation that ends after a drain began is turned into a reject."""
    session = established()
    session.handle(f.assign(), 1.0)
    session.drain(1.5)
    reject = only(session.decide(f.ref(), 2.0), TaskReject)
    assert reject.reason is RejectReason.DRAINING


def test_gateway_drain_requests_local_drain_once() -> None:
    """A drain from the gateway is surfaced once and switches to draining."""
    session = established()
    actions = session.handle(f.drain("upgrade"), 1.0)
    assert actions[0] == DrainRequested("upgrade")
    assert only(actions, Status).agent_status is AgentStatus.DRAINING
    assert session.handle(f.drain(), 2.0) == []


def test_unhealthy_status_rejects_and_zeroes_credit() -> None:
    """An unhealthy agent advertises no credit and rejects assigns as unhealthy."""
    session = established()
    status = only(session.set_status(AgentStatus.UNHEALTHY, 1.0, "comfyui down"), Status)
    assert (status.agent_status, status.reason) == (AgentStatus.UNHEALTHY, "comfyui down")
    assert status.free_slots == {Pool.TEAM: 0}
    assert only(session.handle(f.assign(), 2.0), TaskReject).reason is RejectReason.UNHEALTHY
    assert only(session.set_status(None, 3.0), Status).agent_status is AgentStatus.IDLE


def test_derived_statuses_cannot_be_set() -> None:
    """Idle, busy and draining are derived; setting them is a programming error."""
    session = established()
    with pytest.raises(ValueError, match="derived"):
        session.set_status(AgentStatus.IDLE, 1.0)


def test_progress_and_logs_flow_only_for_running_tasks() -> None:
    """Progress and log batches are sent for running tasks and dropped otherwise."""
    session = established()
    assert session.progress(f.ref(), 1.0, progress=0.5) == []
    running_task(session)
    progress = only(session.progress(f.ref(), 2.0, progress=1.7, step_current=3), TaskProgress)
    assert (progress.progress, progress.step_current) == (1.0, 3)
    log = only(session.log(f.ref(), 2.0, [LogLine(text="hi")], dropped=2), TaskLog)
    assert (log.lines[0].text, log.dropped) == ("hi", 2)
    assert session.log(f.ref(), 2.0, []) == []
    session.disconnected(3.0)
    assert session.progress(f.ref(), 4.0, progress=0.9) == []


def test_complete_is_sent_once_and_retransmitted_until_ack() -> None:
    """A terminal message is resent every retransmit interval until acknowledged."""
    session = established()
    running_task(session)
    output = OutputFile(
        key="9.images.0", storage_key="tasks/t1/a.png", size=3, sha256=SHA, content_type="image/png"
    )
    done = only(session.complete(f.ref(), 10.0, [output]), TaskComplete)
    assert done.outputs == [output]
    assert session.complete(f.ref(), 10.1, []) == []  # idempotent
    assert sent(session.tick(14.9), TaskComplete) == []
    assert only(session.tick(15.0), TaskComplete) == done
    assert session.handle(f.ack(f.ref(), re=done.id), 16.0) == [Forget(f.ref())]
    assert sent(session.tick(100.0), TaskComplete) == []
    assert session.is_empty()


def test_finishing_frees_the_slot_before_the_ack() -> None:
    """A finished task no longer holds a slot, even before its ack arrives."""
    session = established(slots=1)
    running_task(session)
    actions = session.fail(f.ref(), 5.0, ErrorInfo(code="boom", message="x"))
    assert only(actions, TaskFail).error.code == "boom"
    assert only(actions, Status).free_slots == {Pool.TEAM: 1}
    assert session.pending_terminals() != []


def test_finishing_an_unknown_task_does_nothing() -> None:
    """Reporting a task the session does not hold is a no-op (e.g. after abandon)."""
    session = established()
    assert session.cancelled(f.ref("ghost"), 1.0, "x") == []


def test_ack_of_unknown_or_running_task_is_ignored() -> None:
    """An ack that matches no pending terminal changes nothing."""
    session = established()
    running_task(session)
    assert session.handle(f.ack(f.ref()), 2.0) == []
    assert session.running() == [f.ref()]
    assert session.handle(f.ack(f.ref("ghost")), 2.0) == []


def test_disconnect_holds_terminal_and_hello_lists_in_flight() -> None:
    """Across a reconnect, hello lists running and reporting tasks with their phase."""
    session = established(slots=3)
    running_task(session, "run")
    running_task(session, "done")
    session.set_phase(f.ref("run"), TaskPhase.UPLOADING)
    session.handle(f.assign("undecided"), 1.0)
    session.disconnected(2.0)
    assert session.complete(f.ref("done"), 3.0, []) == []  # held, not sent
    hello = only(session.connected(4.0), Hello)
    phases = {entry.task_id: entry.phase for entry in hello.in_flight}
    assert phases == {"run": TaskPhase.UPLOADING, "done": TaskPhase.REPORTING}


def test_resume_continue_resends_terminal_at_once() -> None:
    """After reconnecting, a terminal the gateway still wants is resent immediately."""
    session = established()
    running_task(session)
    session.disconnected(2.0)
    session.complete(f.ref(), 3.0, [])
    session.connected(4.0)
    actions = session.handle(f.welcome({("t1", 0): ResumeAction.CONTINUE}), 4.0)
    assert only(actions, TaskComplete).task_id == "t1"
    assert session.next_deadline() == 9.0


def test_resume_abandon_stops_running_task_without_report() -> None:
    """An abandoned running task is stopped and never reported."""
    session = established()
    running_task(session)
    session.disconnected(2.0)
    session.connected(3.0)
    actions = session.handle(f.welcome({("t1", 0): ResumeAction.ABANDON}), 3.0)
    assert AbandonTask(f.ref()) in actions
    assert session.complete(f.ref(), 4.0, []) == []
    assert session.is_empty()


def test_task_left_out_of_resume_is_abandoned() -> None:
    """An in-flight task the welcome does not mention is treated as abandoned."""
    session = established()
    running_task(session)
    session.disconnected(2.0)
    session.connected(3.0)
    assert AbandonTask(f.ref()) in session.handle(f.welcome(), 3.0)


def test_abandoned_terminal_is_dropped_silently() -> None:
    """A pending terminal whose task the gateway abandoned is not resent."""
    session = established()
    running_task(session)
    session.complete(f.ref(), 2.0, [])
    session.disconnected(3.0)
    session.connected(4.0)
    actions = session.handle(f.welcome({("t1", 0): ResumeAction.ABANDON}), 4.0)
    assert sent(actions, TaskComplete) == []
    assert not any(isinstance(a, AbandonTask) for a in actions)
    assert Forget(f.ref()) in actions  # the journal drops it too
    assert session.is_empty()


def test_disconnect_withdraws_undecided_offers() -> None:
    """An offer still being evaluated when the link drops is withdrawn."""
    session = established()
    session.handle(f.assign(), 1.0)
    session.disconnected(2.0)
    assert session.decide(f.ref(), 3.0) == []
    assert session.is_empty()


def test_cancel_of_running_task_is_forwarded_once() -> None:
    """A cancel reaches the runner once, however often the gateway repeats it."""
    session = established()
    running_task(session)
    assert session.handle(f.cancel(reason="user"), 2.0) == [CancelTask(f.ref(), "user")]
    assert session.handle(f.cancel(), 2.5) == []
    done = only(session.cancelled(f.ref(), 3.0, "user"), TaskCancelled)
    assert done.reason == "user"


def test_cancel_without_attempt_hits_every_attempt() -> None:
    """A cancel naming only the task id cancels all local attempts of it."""
    session = established(slots=2)
    running_task(session, "t1")
    session.handle(f.assign("t1", attempt=1), 1.0)
    session.decide(f.ref("t1", 1), 1.0)
    actions = session.handle(f.cancel(attempt=None), 2.0)
    assert {a.task.attempt for a in actions if isinstance(a, CancelTask)} == {0, 1}


def test_cancel_during_evaluation_withdraws_the_offer() -> None:
    """A task cancelled while being evaluated is dropped and never starts."""
    session = established()
    session.handle(f.assign(), 1.0)
    session.handle(f.cancel(), 1.5)
    assert session.decide(f.ref(), 2.0) == []


def test_cancel_after_finish_resends_terminal() -> None:
    """A cancel for an already finished task resends its terminal message."""
    session = established()
    running_task(session)
    done = only(session.complete(f.ref(), 2.0, []), TaskComplete)
    assert only(session.handle(f.cancel(), 3.0), TaskComplete) == done


def test_cancel_of_unknown_task_answers_unknown_task() -> None:
    """A cancel for a task this agent does not hold is answered with unknown_task."""
    session = established()
    cancel = f.cancel("nope")
    error = only(session.handle(cancel, 1.0), Error)
    assert (error.code, error.re) == (ErrorCode.UNKNOWN_TASK, cancel.id)


def test_upload_request_and_reply_are_routed() -> None:
    """An upload request is sent and its reply delivered to the waiter."""
    session = established()
    running_task(session)
    file = UploadFile(name="a.png", size=3, content_type="image/png", sha256=SHA)
    request_id, actions = session.request_upload(f.ref(), [file], 2.0)
    request = only(actions, TaskUploadRequest)
    assert request.id == request_id
    reply = TaskUploadUrls(
        id=f.next_id(),
        ts=f.T0,
        re=request_id,
        task_id="t1",
        attempt=0,
        files=[
            UploadTarget(
                name="a.png", storage_key="tasks/t1/a.png", upload_url="http://s", expires_at=f.T0
            )
        ],
    )
    assert session.handle(reply, 2.5) == [Deliver(reply)]
    stray = reply.model_copy(update={"task_id": "other"})
    assert session.handle(stray, 2.6) == []


def test_upload_request_while_disconnected_returns_none() -> None:
    """No upload request can be made without a session."""
    session = established()
    running_task(session)
    session.disconnected(2.0)
    file = UploadFile(name="a.png", size=3, content_type="image/png", sha256=SHA)
    assert session.request_upload(f.ref(), [file], 3.0) == (None, [])


def test_receive_answers_garbage_with_errors() -> None:
    """Non-JSON, unknown types and invalid fields are answered, never raised."""
    session = established()
    assert only(session.receive("{nope", 1.0), Error).code is ErrorCode.INVALID_MESSAGE
    unknown = only(session.receive('{"type":"x.y","id":"abc"}', 1.0), Error)
    assert (unknown.code, unknown.re) == (ErrorCode.UNKNOWN_TYPE, "abc")
    bad = only(session.receive('{"type":"drain","id":"d1","ts":"yesterday"}', 1.0), Error)
    assert bad.code is ErrorCode.INVALID_MESSAGE
    assert "ts" in bad.message


def test_receive_decodes_and_handles_valid_frames() -> None:
    """A well-formed frame is decoded and handled like the typed message."""
    session = established()
    frame = f.drain("x").model_dump_json()
    assert session.receive(frame, 1.0)[0] == DrainRequested("x")


def test_peer_errors_are_surfaced_and_never_answered() -> None:
    """An error from the gateway is surfaced; a malformed one is not answered."""
    session = established()
    frame = json.dumps({"type": "error", "id": "e1", "ts": f.T0.isoformat(), "code": "too_large"})
    actions = session.receive(frame, 1.0)
    assert isinstance(actions[0], PeerError)
    assert session.receive('{"type": "error", "id": 5}', 1.0) == []


def test_oversize_frame_is_answered_too_large() -> None:
    """A frame above the size cap is refused without being parsed."""
    session = established()
    frame = '{"type":"drain","reason":"' + "x" * (session.config.max_frame_bytes + 1) + '"}'
    assert only(session.receive(frame, 1.0), Error).code is ErrorCode.TOO_LARGE


def test_nothing_is_sent_while_disconnected() -> None:
    """Errors and statuses are not produced when there is no connection."""
    session = f.make_session()
    assert session.receive("garbage", 0.0) == []
    assert session.drain(0.0) == []
    assert session.tick(100.0) == []
    assert session.next_deadline() is None


def test_restored_tasks_are_listed_in_hello() -> None:
    """Tasks re-adopted from the journal appear in hello.in_flight."""
    session = f.make_session()
    session.restore(f.assign("r1"), TaskPhase.RUNNING)
    terminal = TaskFail(
        id="j1", ts=f.T0, task_id="r2", attempt=1, error=ErrorInfo(code="c", message="m")
    )
    session.restore_terminal(terminal, Pool.TEAM)
    hello = only(session.connected(0.0), Hello)
    assert {(e.task_id, e.phase) for e in hello.in_flight} == {
        ("r1", TaskPhase.RUNNING),
        ("r2", TaskPhase.REPORTING),
    }
    actions = session.handle(
        f.welcome({("r1", 0): ResumeAction.CONTINUE, ("r2", 1): ResumeAction.CONTINUE}), 0.1
    )
    assert only(actions, TaskFail) == terminal  # same id: idempotent on the gateway


def test_team_pool_cap_can_shrink_below_slots() -> None:
    """The team pool's size can be lowered below the slot count."""
    session = established()
    session.set_pool_cap(Pool.TEAM, 1, 1.0)
    assert session.free_slots() == {Pool.TEAM: 1}


def test_session_requires_a_slot() -> None:
    """A session with zero slots is a configuration bug and is refused."""
    with pytest.raises(ValueError, match="slots"):
        f.make_session(slots=0)


def test_assign_of_an_acknowledged_attempt_is_rejected_duplicate() -> None:
    """A task attempt already reported and acknowledged is never run a second time."""
    session = established()
    running_task(session)
    done = only(session.complete(f.ref(), 2.0, []), TaskComplete)
    session.handle(f.ack(f.ref(), re=done.id), 3.0)
    reject = only(session.handle(f.assign(), 4.0), TaskReject)
    assert reject.reason is RejectReason.DUPLICATE


def test_assign_of_an_abandoned_attempt_is_rejected_duplicate() -> None:
    """An attempt the gateway abandoned is not run again if it is offered again."""
    session = established()
    running_task(session)
    session.disconnected(2.0)
    session.connected(3.0)
    session.handle(f.welcome({("t1", 0): ResumeAction.ABANDON}), 3.0)
    assert only(session.handle(f.assign(), 4.0), TaskReject).reason is RejectReason.DUPLICATE


def test_accept_after_cap_lowered_during_evaluation_becomes_reject() -> None:
    """A pool closed while an offer was evaluated turns the accept into no_capacity."""
    session = established(slots=2, community=1)
    session.handle(f.assign(pool=Pool.COMMUNITY), 1.0)
    session.set_pool_cap(Pool.COMMUNITY, 0, 1.5)
    assert only(session.decide(f.ref(), 2.0), TaskReject).reason is RejectReason.NO_CAPACITY


def test_accept_after_turning_unhealthy_becomes_reject() -> None:
    """An agent that turned unhealthy while evaluating rejects instead of accepting."""
    session = established()
    session.handle(f.assign(), 1.0)
    session.set_status(AgentStatus.UNHEALTHY, 1.5, "gpu too hot")
    assert only(session.decide(f.ref(), 2.0), TaskReject).reason is RejectReason.UNHEALTHY


def test_models_held_change_sends_a_status_carrying_them() -> None:
    """After a sync the held hashes go out in a status at once (hello.models is stale)."""
    from agent.protocol.session import Advert  # noqa: PLC0415 - only this test builds one

    session = established()
    held = ("a" * 64, "b" * 64)
    status = only(session.set_advert(Advert(models=held), 1.0), Status)
    assert status.models == list(held)
    assert session.set_advert(Advert(models=held), 2.0) == []  # unchanged: nothing sent


def test_welcome_sync_and_sync_messages_hand_over_the_model_set() -> None:
    """welcome.sync and every later sync message become SyncModels actions, in order."""
    model = SyncModel(
        model_type="checkpoints",
        model_path="a.safetensors",
        file_size=1,
        file_hash="sha256:" + "c" * 64,
        download_url="http://127.0.0.1/x",
    )
    session = f.make_session(1, None)
    session.connected(0.0)
    actions = session.handle(f.welcome().model_copy(update={"sync": [model]}), 0.0)
    assert [a.models for a in actions if isinstance(a, SyncModels)] == [(model,)]
    later = Sync(id="s1", ts=f.welcome().ts, models=[])
    assert session.handle(later, 1.0) == [SyncModels(())]
