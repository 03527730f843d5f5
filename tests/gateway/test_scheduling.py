"""Scheduler and protocol behaviour with several simulated agents on real WebSockets."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent.protocol.messages import SUBPROTOCOL, RejectReason, ResumeAction, TaskRef, UploadFile
from tests.gateway_process import GatewayProcess, comfy_workflow
from tests.gateway_process import run_workflow as submit
from tests.gateway_process import task_record as task
from tests.simagent import SimAgent

pytestmark = pytest.mark.asyncio
_teams = itertools.count()


def fresh_team(gw: GatewayProcess, **workflow: Any) -> tuple[str, str]:
    """A new team with one workflow (so tests never see each other's tasks)."""
    dk = gw.credential(f"sched-{next(_teams)}")
    return dk, gw.create_workflow(dk, comfy_workflow(**workflow))


async def wait_status(
    gw: GatewayProcess, dk: str, task_id: str, status: str, timeout: float = 15, **match: Any
) -> dict[str, Any]:
    """Follow the task's SSE stream until an event reports ``status`` (and ``match``'s fields)."""

    async def follow() -> None:
        headers = {"Authorization": f"Bearer {dk}"}
        async with (
            httpx.AsyncClient(base_url=gw.api, headers=headers, timeout=timeout) as http,
            http.stream("GET", f"/r/tasks/{task_id}/events") as stream,
        ):
            async for line in stream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = json.loads(line[6:])
                if data.get("task_status") == status and all(
                    data.get(k) == v for k, v in match.items()
                ):
                    return
        raise AssertionError(f"stream of {task_id} ended without {status} {match}")

    await asyncio.wait_for(follow(), timeout)
    return task(gw, dk, task_id)


async def test_region_match_wins_and_unknown_is_neutral(gw: GatewayProcess) -> None:
    """A region-matching agent is preferred; an unknown region beats a known mismatch."""
    dk, wf = fresh_team(gw)
    async with (
        SimAgent(gw.ws_url, dk, "us", region="us-east") as us,
        SimAgent(gw.ws_url, dk, "eu", region="eu-west") as eu,
    ):
        submit(gw, dk, wf, submitter_region="  EU-West ")
        assert (await eu.next_assign()).task_id
        assert us.assigns.empty()
    async with (
        SimAgent(gw.ws_url, dk, "us2", region="us-east") as us2,
        SimAgent(gw.ws_url, dk, "anywhere") as unknown,
    ):
        submit(gw, dk, wf, submitter_region="eu-west")
        await unknown.next_assign()
        assert us2.assigns.empty()


async def test_missing_label_keeps_task_waiting_until_a_superset_agent_comes(
    gw: GatewayProcess,
) -> None:
    """A task goes only to an agent whose labels are a superset of required_labels."""
    dk, wf = fresh_team(gw, required_labels=["gpu-h100"])
    async with SimAgent(gw.ws_url, dk, "plain-gpu", labels=["gpu", "comfyui"]) as plain:
        task_id = submit(gw, dk, wf)
        await wait_status(gw, dk, task_id, "waiting")
        async with SimAgent(gw.ws_url, dk, "h100", labels=["gpu", "comfyui", "gpu-h100"]) as h100:
            assert (await h100.next_assign()).task_id == task_id
        assert plain.offers.empty()


async def test_team_pool_never_crosses_teams(gw: GatewayProcess) -> None:
    """Another team's agent never receives a team-pool task, even when idle."""
    dk, wf = fresh_team(gw)
    other, _ = fresh_team(gw)
    async with SimAgent(gw.ws_url, other, "stranger", community=1) as stranger:
        task_id = submit(gw, dk, wf)
        await wait_status(gw, dk, task_id, "waiting")
        async with SimAgent(gw.ws_url, dk, "own") as own:
            assert (await own.next_assign()).task_id == task_id
        assert stranger.offers.empty()


async def test_community_tasks_reach_only_opted_in_agents(gw: GatewayProcess) -> None:
    """A community task skips agents not opted in and reaches an opted-in one of another team."""
    dk, wf = fresh_team(gw)
    other, _ = fresh_team(gw)
    async with SimAgent(gw.ws_url, other, "team-only") as team_only:
        task_id = submit(gw, dk, wf, target_pool="community")
        await wait_status(gw, dk, task_id, "waiting")
        async with SimAgent(gw.ws_url, other, "volunteer", community=1) as volunteer:
            assign = await volunteer.next_assign()
            assert (assign.task_id, assign.pool.value) == (task_id, "community")
        assert team_only.offers.empty()


async def test_a_preempted_community_task_is_requeued_without_a_retry(gw: GatewayProcess) -> None:
    """task.cancelled "preempted" hands the task back: re-dispatched, retry_count unchanged."""
    dk, wf = fresh_team(gw)
    other, _ = fresh_team(gw)
    task_id = submit(gw, dk, wf, target_pool="community")
    async with SimAgent(gw.ws_url, other, "lender", community=1) as lender:
        first = await lender.next_assign()
        ref = TaskRef(task_id=task_id, attempt=first.attempt)
        await wait_status(gw, dk, task_id, "running")
        await lender.cancelled(ref, "preempted")
        await lender.wait_acknowledged()  # the gateway re-queues before it acknowledges
        record = task(gw, dk, task_id)
        assert record["task_status"] in {"pending", "waiting"}
        assert record["task_error"] == "preempted on lender"
        async with SimAgent(gw.ws_url, other, "second", community=1) as second:
            again = await second.next_assign()
    assert (again.task_id, again.attempt) == (task_id, first.attempt + 1)
    assert task(gw, dk, task_id)["retry_count"] == 0


async def test_a_redispatched_attempt_uploads_the_same_name_again(gw: GatewayProcess) -> None:
    """Storage keys are per attempt: attempt 1 re-uploads the file attempt 0 had stored."""
    dk, wf = fresh_team(gw)
    other, _ = fresh_team(gw)
    task_id = submit(gw, dk, wf, target_pool="community")
    data = b"\x89PNG-same-name"
    file = UploadFile(name="out.png", size=len(data), content_type="image/png", sha256="0" * 64)
    keys = []
    async with SimAgent(gw.ws_url, other, "first", community=1) as first:
        assign = await first.next_assign()
        ref = TaskRef(task_id=task_id, attempt=assign.attempt)
        await wait_status(gw, dk, task_id, "running")
        target = (await first.upload_urls(ref, [file])).files[0]
        put = httpx.put(target.upload_url or "", content=data, headers=target.upload_headers)
        assert put.is_success, put.text
        keys.append(target.storage_key)
        await first.cancelled(ref, "preempted")
        await first.wait_acknowledged()
        async with SimAgent(gw.ws_url, other, "second", community=1) as second:
            again = await second.next_assign()
            ref = TaskRef(task_id=task_id, attempt=again.attempt)
            target = (await second.upload_urls(ref, [file])).files[0]
            put = httpx.put(target.upload_url or "", content=data, headers=target.upload_headers)
            assert put.is_success, put.text
            keys.append(target.storage_key)
    assert keys == [f"tasks/{task_id}/0/out.png", f"tasks/{task_id}/1/out.png"]


async def test_vram_requirement_selects_a_big_enough_gpu(gw: GatewayProcess) -> None:
    """min_vram_gb excludes smaller GPUs and prefers the snuggest fit among the rest."""
    dk, wf = fresh_team(gw, min_vram_gb=20)
    async with (
        SimAgent(gw.ws_url, dk, "small", vram_gb=[12]) as small,
        SimAgent(gw.ws_url, dk, "huge", vram_gb=[141]) as huge,
        SimAgent(gw.ws_url, dk, "fits", vram_gb=[24]) as fits,
    ):
        submit(gw, dk, wf)
        await fits.next_assign()
        assert small.offers.empty()
        assert huge.offers.empty()


async def test_ack_deadline_redispatches_without_counting_a_retry(gw: GatewayProcess) -> None:
    """An agent that never answers the assign loses the task to another after the ACK deadline."""
    dk, wf = fresh_team(gw)
    async with SimAgent(gw.ws_url, dk, "mute", mode="ignore") as mute:
        task_id = submit(gw, dk, wf)
        first = await mute.next_offer()
        async with SimAgent(gw.ws_url, dk, "live") as live:
            second = await live.next_assign()
        assert (first.task_id, second.task_id) == (task_id, task_id)
        assert second.attempt == first.attempt + 1
        assert task(gw, dk, task_id)["retry_count"] == 0


async def test_an_offer_lost_with_the_link_goes_to_the_reconnected_agent(
    gw: GatewayProcess,
) -> None:
    """The ACK-deadline refusal ends with the silent session: the same agent, back, gets it."""
    dk, wf = fresh_team(gw)
    async with SimAgent(gw.ws_url, dk, "flaky", mode="ignore") as mute:
        task_id = submit(gw, dk, wf)
        first = await mute.next_offer()
        await wait_status(gw, dk, task_id, "waiting")  # the ACK deadline passed: refused
    async with SimAgent(gw.ws_url, dk, "flaky") as back:
        again = await back.next_assign(timeout=10)  # well before the 30 s refusal ends
    assert (again.task_id, again.attempt) == (task_id, first.attempt + 1)


async def test_reject_redispatches_without_counting_a_retry(gw: GatewayProcess) -> None:
    """A rejected task goes to another agent and does not count as a retry."""
    dk, wf = fresh_team(gw)
    async with SimAgent(
        gw.ws_url, dk, "picky", mode="reject", reject_reason=RejectReason.POLICY_DENIED
    ) as picky:
        task_id = submit(gw, dk, wf)
        await picky.next_offer()
        async with SimAgent(gw.ws_url, dk, "willing") as willing:
            assert (await willing.next_assign()).task_id == task_id
        assert picky.assigns.empty()
        record = task(gw, dk, task_id)
        assert (record["retry_count"], record["agent_id"]) == (0, "willing")


async def test_lease_expiry_requeues_while_retries_remain_then_fails(gw: GatewayProcess) -> None:
    """A silent agent's task is retried while retries remain, then failed 'agent disconnected'."""
    dk, wf = fresh_team(gw, max_retries=1)
    lost = SimAgent(gw.ws_url, dk, "flaky")
    await lost.connect()
    task_id = submit(gw, dk, wf)
    await lost.next_assign()
    await wait_status(gw, dk, task_id, "running")
    await lost.close()  # and never comes back
    await wait_status(gw, dk, task_id, "pending", task_error="agent disconnected")
    assert task(gw, dk, task_id)["retry_count"] == 1
    second = SimAgent(gw.ws_url, dk, "flaky-2")
    await second.connect()
    assign = await second.next_assign()
    assert (assign.task_id, assign.attempt) == (task_id, 1)
    await second.close()
    failed = await wait_status(gw, dk, task_id, "failed")
    assert (failed["retry_count"], failed["task_error"]) == (1, "agent disconnected")


async def test_reconnect_within_the_lease_resumes_and_completes_once(gw: GatewayProcess) -> None:
    """An agent that reconnects in time is told to continue, and its completion is recorded."""
    dk, wf = fresh_team(gw)
    agent = SimAgent(gw.ws_url, dk, "returning")
    await agent.connect()
    task_id = submit(gw, dk, wf)
    assign = await agent.next_assign()
    await wait_status(gw, dk, task_id, "running")
    await agent.close()
    ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
    await agent.complete(ref)  # finished while offline: held until the next session
    await agent.connect()
    assert agent.welcome is not None
    assert [(r.task_id, r.action) for r in agent.welcome.resume] == [
        (task_id, ResumeAction.CONTINUE)
    ]
    await agent.wait_acknowledged()
    await agent.close()
    assert task(gw, dk, task_id)["task_status"] == "completed"


async def test_cancel_reaches_the_running_agent(gw: GatewayProcess) -> None:
    """Cancelling a running task tells its agent, whose late report changes nothing."""
    dk, wf = fresh_team(gw)
    async with SimAgent(gw.ws_url, dk, "worker") as worker:
        task_id = submit(gw, dk, wf)
        assign = await worker.next_assign()
        await wait_status(gw, dk, task_id, "running")
        with gw.client(dk) as http:
            assert http.post(f"/r/tasks/{task_id}/cancel").json()["task_status"] == "cancelled"
        cancel = await worker.next_cancel()
        assert cancel.task == TaskRef(task_id=task_id, attempt=assign.attempt)
        await worker.cancelled(cancel.task, cancel.reason)
        await worker.wait_acknowledged()
    assert task(gw, dk, task_id)["task_status"] == "cancelled"


async def test_handshake_refusals_are_http_statuses(gw: GatewayProcess) -> None:
    """No subprotocol → 426, unknown credential → 401, integration key → 403."""
    dk, _ = fresh_team(gw)
    sk = gw.credential("sched-sk", "integration")
    cases: list[tuple[list[str] | None, str, int]] = [
        (None, dk, 426),
        ([SUBPROTOCOL], "dk-" + "q" * 43, 401),
        ([SUBPROTOCOL], sk, 403),
    ]
    for protocols, credential, status in cases:
        with pytest.raises(InvalidStatus) as refused:
            await connect(
                gw.ws_url,
                subprotocols=protocols,  # type: ignore[arg-type]
                additional_headers={"Authorization": f"Bearer {credential}"},
                proxy=None,
            )
        assert refused.value.response.status_code == status


async def test_agent_key_connects_and_shows_in_agent_list(gw: GatewayProcess) -> None:
    """An ak- agent key may connect; the team's agent list shows it, other teams' lists do not."""
    dk, _ = fresh_team(gw)
    ak = gw.credential(f"sched-{next(_teams)}", "agent")
    async with (
        SimAgent(gw.ws_url, dk, "listed", region="eu-west"),
        SimAgent(gw.ws_url, ak, "ak-agent"),
    ):
        with gw.client(dk) as http:
            agents = http.get("/r/agents").json()["agent_list"]
    assert [a["agent_id"] for a in agents] == ["listed"]
    assert agents[0]["region"] == "eu-west"


async def test_team_tasks_are_placed_before_older_community_tasks(gw: GatewayProcess) -> None:
    """When one slot frees up, the team's task wins over an older community task."""
    dk, wf = fresh_team(gw)
    other, other_wf = fresh_team(gw)
    community = submit(gw, other, other_wf, target_pool="community")
    await wait_status(gw, other, community, "waiting")
    own = submit(gw, dk, wf)
    await wait_status(gw, dk, own, "waiting")
    async with SimAgent(gw.ws_url, dk, "owner-first", community=1) as agent:
        assert (await agent.next_assign()).task_id == own
