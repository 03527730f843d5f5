"""The REST API walked as a platform client would, against a real gateway process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agent.protocol.messages import OutputFile, TaskRef, UploadFile
from gateway.auth import issue_jwt
from tests.gateway_process import GatewayProcess, comfy_workflow
from tests.simagent import SimAgent

PARAMS: list[dict[str, Any]] = [
    {
        "key": "width",
        "type": "number",
        "required": True,
        "min": 8,
        "max": 512,
        "node_id": "3",
        "field": "width",
    },
    {
        "key": "prefix",
        "type": "string",
        "default": "out",
        "node_id": "9",
        "field": "filename_prefix",
    },
    {
        "key": "color",
        "type": "select",
        "options": [0, 255],
        "default": 0,
        "node_id": "3",
        "field": "color",
    },
    {"key": "batch", "type": "boolean", "node_id": "3", "field": "batch_size"},
    {"key": "image", "type": "file", "accept": "image/*", "node_id": "10", "field": "image"},
]


@pytest.fixture(scope="module")
def team(gw: GatewayProcess) -> dict[str, str]:
    """Credentials of two teams and a parameterised workflow of team A."""
    dk = gw.credential("rest-a")
    return {
        "dk": dk,
        "sk": gw.credential("rest-a", "integration"),
        "ak": gw.credential("rest-a", "agent"),
        "other": gw.credential("rest-b"),
        "wf": gw.create_workflow(dk, comfy_workflow(PARAMS, workflow_slug="invert")),
        "plain": gw.create_workflow(dk, comfy_workflow(name="plain")),
    }


@pytest.fixture
def http(gw: GatewayProcess, team: dict[str, str]) -> Iterator[httpx.Client]:
    """A client of team A with its device credential."""
    with gw.client(team["dk"]) as client:
        yield client


def upload(gw: GatewayProcess, credential: str, name: str, data: bytes, content_type: str) -> str:
    """Presign and PUT an input file exactly as documented; return its file_key."""
    with gw.client(credential) as client:
        slot = client.post(
            "/r/files/presign",
            json={"file_name": name, "file_size": len(data), "content_type": content_type},
        )
        assert slot.status_code == 200, slot.text
        body = slot.json()
        put = httpx.put(body["upload_url"], content=data, headers=body["upload_headers"])
        assert put.status_code in (200, 201, 204), put.text
        return str(body["file_key"])


def run(http: httpx.Client, workflow: str, body: dict[str, Any] | None = None) -> httpx.Response:
    """POST a run request."""
    if body is None:
        return http.post(f"/r/workflows/{workflow}/run")
    return http.post(f"/r/workflows/{workflow}/run", json=body)


def rejected(answer: httpx.Response, field: str, rule: str) -> str:
    """Assert a 400 naming ``field`` and ``rule``; return the message."""
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["field"], error["rule"]) == (field, rule), error
    return str(error["message"])


def test_unknown_key_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """A parameter key the workflow does not declare is a 400 naming it."""
    message = rejected(
        run(http, team["wf"], {"parameters": {"width": 64, "bogus": 1}}),
        "parameters.bogus",
        "unknown_key",
    )
    assert "bogus" in message


def test_missing_required_key_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """Omitting a required parameter is a 400 naming it."""
    assert "width" in rejected(
        run(http, team["wf"], {"parameters": {}}), "parameters.width", "required"
    )


def test_type_mismatch_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """A string for a number parameter is a 400 type error."""
    rejected(run(http, team["wf"], {"parameters": {"width": "64"}}), "parameters.width", "type")


def test_number_below_min_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """A number under its minimum is a 400 naming the rule min."""
    rejected(run(http, team["wf"], {"parameters": {"width": 1}}), "parameters.width", "min")


def test_number_above_max_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """A number over its maximum is a 400 naming the rule max."""
    rejected(run(http, team["wf"], {"parameters": {"width": 4096}}), "parameters.width", "max")


def test_select_value_not_in_options_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """A select value outside its options is a 400."""
    rejected(
        run(http, team["wf"], {"parameters": {"width": 64, "color": 7}}),
        "parameters.color",
        "options",
    )


def test_unknown_file_key_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """A file_key that was never uploaded is a 400."""
    body = {"parameters": {"width": 64, "image": "inputs/x/0/nothing.png"}}
    rejected(run(http, team["wf"], body), "parameters.image", "file_not_found")


def test_presigned_but_never_uploaded_file_is_refused(
    http: httpx.Client, team: dict[str, str]
) -> None:
    """A file_key whose object was never PUT is not found in storage."""
    slot = http.post(
        "/r/files/presign", json={"file_name": "a.png", "file_size": 3, "content_type": "image/png"}
    )
    body = {"parameters": {"width": 64, "image": slot.json()["file_key"]}}
    rejected(run(http, team["wf"], body), "parameters.image", "file_not_found")


def test_file_of_another_team_is_refused(
    gw: GatewayProcess, http: httpx.Client, team: dict[str, str]
) -> None:
    """A file_key uploaded by another team cannot be used."""
    foreign = upload(gw, team["other"], "x.png", b"\x89PNG", "image/png")
    rejected(
        run(http, team["wf"], {"parameters": {"width": 64, "image": foreign}}),
        "parameters.image",
        "file_team",
    )


def test_file_with_wrong_mime_is_refused(
    gw: GatewayProcess, http: httpx.Client, team: dict[str, str]
) -> None:
    """A text file for an image/* parameter is a 400 naming accept."""
    text = upload(gw, team["dk"], "notes.txt", b"hello", "text/plain")
    rejected(
        run(http, team["wf"], {"parameters": {"width": 64, "image": text}}),
        "parameters.image",
        "accept",
    )


def test_more_than_100_keys_is_refused(http: httpx.Client, team: dict[str, str]) -> None:
    """A request with over 100 parameter keys is refused before anything else."""
    many = {f"k{i}": i for i in range(101)}
    rejected(run(http, team["wf"], {"parameters": many}), "parameters", "max_keys")


def test_empty_and_absent_parameters_run_a_workflow_without_parameters(
    http: httpx.Client, team: dict[str, str]
) -> None:
    """``{}`` and no body at all are valid for a workflow that requires nothing."""
    assert run(http, team["plain"], {"parameters": {}}).status_code == 202
    assert run(http, team["plain"], {}).status_code == 202
    assert run(http, team["plain"]).status_code == 202


def test_unknown_body_field_and_bad_enum_are_named(
    http: httpx.Client, team: dict[str, str]
) -> None:
    """Body-level mistakes are 400s naming the field (not FastAPI's 422)."""
    rejected(run(http, team["plain"], {"paramters": {}}), "paramters", "unknown_key")
    rejected(run(http, team["plain"], {"target_pool": "everyone"}), "target_pool", "options")
    rejected(run(http, team["plain"], {"submitter_region": "x" * 65}), "submitter_region", "type")


def test_comfy_cloud_without_configuration_is_refused(
    http: httpx.Client, team: dict[str, str]
) -> None:
    """dispatch_target comfy_cloud is refused, naming the field, when not configured."""
    rejected(
        run(http, team["plain"], {"dispatch_target": "comfy_cloud"}),
        "dispatch_target",
        "not_configured",
    )


def test_credentials_by_kind(gw: GatewayProcess, team: dict[str, str]) -> None:
    """sk- may use /r/ only, ak- is refused on REST, a missing or bad token is 401."""
    with gw.client(team["sk"]) as sk:
        assert sk.get("/r/workflows").status_code == 200
        assert sk.post("/workflows", json=comfy_workflow()).status_code == 403
    with gw.client(team["ak"]) as ak:
        assert ak.get("/r/workflows").status_code == 403
    assert httpx.get(f"{gw.api}/r/workflows").status_code == 401
    with gw.client("dk-" + "x" * 40) as bad:
        answer = bad.get("/r/workflows")
    assert answer.status_code == 401
    assert "x" * 40 not in answer.text


def test_team_isolation_of_workflows_tasks_and_files(
    gw: GatewayProcess, http: httpx.Client, team: dict[str, str]
) -> None:
    """Another team sees none of team A's workflows or tasks."""
    task_id = run(http, team["plain"]).json()["task_id"]
    with gw.client(team["other"]) as other:
        assert other.get(f"/r/workflows/{team['wf']}").status_code == 404
        assert other.get(f"/r/tasks/{task_id}").status_code == 404
        assert other.post(f"/r/tasks/{task_id}/cancel").status_code == 404
        assert all(t["id"] != task_id for t in other.get("/r/tasks").json()["task_list"])


def test_workflow_versions_and_slug_pins(http: httpx.Client) -> None:
    """An update bumps the version; slug@version pins the old one."""
    body = comfy_workflow(PARAMS, workflow_slug="pinned")
    created = http.post("/workflows", json=body).json()
    updated = http.put(f"/workflows/{created['id']}", json={**body, "description": "v2"}).json()
    assert (created["version"], updated["version"]) == (1, 2)
    assert http.get("/r/workflows/slug/pinned").json()["version"] == 2
    assert http.get("/r/workflows/slug/pinned@1").json()["description"] == ""
    assert http.post("/workflows", json={**body, "name": "dup"}).status_code == 409


def test_workflow_with_a_target_node_that_does_not_exist_is_refused(http: httpx.Client) -> None:
    """A parameter injected into a missing node is refused at creation."""
    bad = [{"key": "w", "type": "number", "node_id": "99", "field": "width"}]
    answer = http.post("/workflows", json=comfy_workflow(bad))
    assert answer.status_code == 400
    assert answer.json()["error"]["rule"] == "node_not_found"


def test_presign_rules(http: httpx.Client) -> None:
    """Presign caps the size and needs a MIME type; the upload must send the signed headers."""
    too_big = http.post(
        "/r/files/presign",
        json={"file_name": "a", "file_size": 501 * 1024**2, "content_type": "image/png"},
    )
    rejected(too_big, "file_size", "max")
    slot = http.post(
        "/r/files/presign",
        json={"file_name": "../../a b.png", "file_size": 4, "content_type": "image/png"},
    ).json()
    assert slot["file_key"].endswith("/a_b.png")
    assert slot["upload_headers"]["If-None-Match"] == "*"
    bare = httpx.put(slot["upload_url"], content=b"abcd")
    assert bare.status_code == 403


@pytest.mark.asyncio
async def test_run_follow_result_and_cancel(gw: GatewayProcess) -> None:
    """A run is dispatched with defaults filled, streams SSE, yields a result, and cancels."""
    dk = gw.credential("rest-run")  # a team without the other tests' waiting backlog
    workflow = gw.create_workflow(dk, comfy_workflow(PARAMS))
    image = upload(gw, dk, "in.png", b"\x89PNG\r\n", "image/png")
    async with SimAgent(gw.ws_url, dk, "rest-agent") as agent:
        with gw.client(dk) as http:
            task_id = run(http, workflow, {"parameters": {"width": 64, "image": image}}).json()[
                "task_id"
            ]
            assign = await agent.next_assign()
            assert assign.task_id == task_id
            values = {i.key: i.value for i in assign.injections}
            assert values == {"width": 64, "prefix": "out", "color": 0, "image": image}
            assert assign.inputs[0].file_key == image
            assert httpx.get(assign.inputs[0].download_url).content == b"\x89PNG\r\n"
            ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
            await agent.progress(ref, 0.5, current_node="5", step_current=1, step_total=2)
            data = b"\x89PNG-result"
            file = UploadFile(
                name="out_00001_.png", size=len(data), content_type="image/png", sha256="0" * 64
            )
            target = (await agent.upload_urls(ref, [file])).files[0]
            assert target.storage_key == f"tasks/{task_id}/0/out_00001_.png"  # per attempt
            assert (
                httpx.put(
                    target.upload_url or "", content=data, headers=target.upload_headers
                ).status_code
                < 300
            )
            output = OutputFile(
                key="9.images.0",
                storage_key=target.storage_key,
                size=len(data),
                sha256="0" * 64,
                content_type="image/png",
            )
            await agent.complete(ref, [output])
            await agent.wait_acknowledged()
            events = sse_events(http, task_id)
            assert events[0][0] == "status"
            assert (
                "progress",
                {"progress": 0.5, "current_node": "5", "step_current": 1, "step_total": 2},
            ) in events
            assert events[-1][0] == "completed"
            result = http.get(f"/r/tasks/{task_id}/result").json()
            assert result["task_output"]["storage_key"] == target.storage_key
            assert result["task_output"]["image_count"] == 1
            assert httpx.get(result["download_urls"]["9.images.0"]).content == data
            assert result["download_url"] == result["download_urls"]["9.images.0"]
            assert http.post(f"/r/tasks/{task_id}/cancel").json()["task_status"] == "completed"

            second = run(http, workflow, {"parameters": {"width": 64}}).json()["task_id"]
            running = await agent.next_assign()
            cancel = http.post(f"/r/tasks/{second}/cancel")
            assert cancel.json()["task_status"] == "cancelled"
            told = await agent.next_cancel()
            assert told.task.task_id == running.task_id == second
            assert sse_events(http, second)[-1][0] == "cancelled"
            assert http.get(f"/r/tasks/{second}/result").json()["task_output"] is None


def sse_events(http: httpx.Client, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Read a finished task's SSE stream to its end."""
    events: list[tuple[str, dict[str, Any]]] = []
    with http.stream("GET", f"/r/tasks/{task_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_task_list_is_paged_and_filtered(http: httpx.Client, team: dict[str, str]) -> None:
    """GET /r/tasks pages with page_meta and filters by status."""
    for _ in range(3):
        run(http, team["plain"])
    page = http.get("/r/tasks", params={"per_page": 2, "current_page": 1}).json()
    assert len(page["task_list"]) == 2
    assert page["page_meta"]["per_page"] == 2
    assert page["page_meta"]["total_count"] >= 3
    waiting = http.get("/r/tasks", params={"status": "waiting", "per_page": 100}).json()
    assert all(t["task_status"] == "waiting" for t in waiting["task_list"])
    rejected(http.get("/r/tasks", params={"per_page": 1000}), "per_page", "max")


def test_user_tokens_need_a_team_header_naming_one_of_their_teams(
    gw: GatewayProcess, http: httpx.Client
) -> None:
    """A JWT works with X-Team-ID of one of its teams; without the header it is a 400."""
    team_id = (
        http.post(
            "/r/files/presign", json={"file_name": "a", "file_size": 1, "content_type": "image/png"}
        )
        .json()["file_key"]
        .split("/")[1]
    )
    key = (gw.data_dir / "jwt.key").read_bytes()
    token = issue_jwt("user-1", [team_id], key)
    bearer = {"Authorization": f"Bearer {token}"}
    missing = httpx.get(f"{gw.api}/r/workflows", headers=bearer)
    assert (missing.status_code, missing.json()["error"]["field"]) == (400, "X-Team-ID")
    ok = httpx.get(f"{gw.api}/r/workflows", headers={**bearer, "X-Team-ID": team_id})
    assert ok.status_code == 200
    assert ok.json()["workflow_list"]
    other = httpx.get(f"{gw.api}/r/workflows", headers={**bearer, "X-Team-ID": "team_other"})
    assert other.status_code == 403
    forged = issue_jwt("user-1", [team_id], b"not-the-gateway-key-but-32-bytes!!")
    bad = httpx.get(
        f"{gw.api}/r/workflows", headers={"Authorization": f"Bearer {forged}", "X-Team-ID": team_id}
    )
    assert bad.status_code == 401
