"""The team model registry over REST, the sync set agents receive, and warm scheduling."""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any

import httpx
import pytest

from tests.gateway_process import GatewayProcess, comfy_workflow
from tests.simagent import SimAgent

_teams = itertools.count()


def fresh_team(gw: GatewayProcess) -> str:
    """A new team's device credential (tests never see each other's models)."""
    return gw.credential(f"models-{next(_teams)}")


def body_for(
    content: bytes, path: str = "sdxl.safetensors", kind: str = "checkpoints"
) -> dict[str, Any]:
    """The register/presign body describing ``content``."""
    return {
        "model_type": kind,
        "model_path": path,
        "file_size": len(content),
        "file_hash": "sha256:" + hashlib.sha256(content).hexdigest(),
    }


def upload(gw: GatewayProcess, dk: str, content: bytes, **where: str) -> dict[str, Any]:
    """Presign, PUT the bytes with the headers verbatim; return the register body."""
    body = body_for(content, **where)
    with gw.client(dk) as http:
        presign = http.post("/models/presign", json=body)
    assert presign.status_code == 200, presign.text
    slot = presign.json()
    if not slot["already_uploaded"]:
        put = httpx.put(slot["upload_url"], content=content, headers=slot["upload_headers"])
        assert put.status_code in (200, 201), put.text
    return body


def register(gw: GatewayProcess, dk: str, content: bytes, **where: str) -> dict[str, Any]:
    """Upload and register a model; return its record."""
    body = upload(gw, dk, content, **where)
    with gw.client(dk) as http:
        answer = http.post("/models", json=body)
    assert answer.status_code == 201, answer.text
    record: dict[str, Any] = answer.json()
    return record


def set_status(gw: GatewayProcess, dk: str, model_id: str, status: str) -> dict[str, Any]:
    """PATCH a model's status and return the record."""
    with gw.client(dk) as http:
        answer = http.patch(f"/models/{model_id}", json={"model_status": status})
    assert answer.status_code == 200, answer.text
    record: dict[str, Any] = answer.json()
    return record


def assert_refused(answer: httpx.Response, status: int, field: str, rule: str | None) -> None:
    """The answer is the project's error body naming ``field`` (and ``rule``)."""
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["field"] == field, error
    if rule is not None:
        assert error["rule"] == rule, error


def test_presign_upload_register_and_list(gw: GatewayProcess) -> None:
    """A model is uploaded through the presigned PUT, registered active and listed."""
    dk = fresh_team(gw)
    content = os.urandom(4096)
    body = upload(gw, dk, content)
    with gw.client(dk) as http:
        again = http.post("/models/presign", json=body).json()
        created = http.post("/models", json=body)
        listed = http.get("/models").json()["model_list"]
        duplicate = http.post("/models", json=body)
    assert again["already_uploaded"] is True
    assert again["storage_key"].endswith("/" + body["file_hash"].removeprefix("sha256:"))
    assert created.status_code == 201, created.text
    record = created.json()
    assert {k: record[k] for k in body} == body
    assert record["model_status"] == "active"
    assert record["id"]
    assert record["created_at"]
    assert listed == [record]
    assert_refused(duplicate, 409, "model_path", "duplicate")


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/etc/passwd", "absolute"),
        ("C:/models/x.safetensors", "absolute"),
        ("../escape.safetensors", "dot_segment"),
        ("sub/../../escape.safetensors", "dot_segment"),
        ("./x.safetensors", "dot_segment"),
        ("sub\\x.safetensors", "backslash"),
        ("sub//x.safetensors", "empty_segment"),
        ("sub/", "empty_segment"),
        ("bad\x00name", "control_character"),
        ("", "min_length"),
        ("x" * 257, "max_length"),
    ],
)
def test_hostile_model_paths_are_refused(gw: GatewayProcess, path: str, rule: str) -> None:
    """Presign and register refuse an unsafe model_path with 400 naming model_path and rule."""
    dk = fresh_team(gw)
    body = body_for(b"weights", path=path)
    with gw.client(dk) as http:
        for route in ("/models/presign", "/models"):
            assert_refused(http.post(route, json=body), 400, "model_path", rule)


def test_other_fields_are_validated(gw: GatewayProcess) -> None:
    """model_type, file_hash and file_size break their rules with a 400 naming the field."""
    dk = fresh_team(gw)
    good = body_for(b"weights")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"model_type": "Checkpoints"}, "model_type", "pattern"),
        ({"model_type": "../x"}, "model_type", "pattern"),
        ({"file_hash": "md5:abc"}, "file_hash", "pattern"),
        ({"file_size": 0}, "file_size", "min"),
        ({"file_size": 64 * 1024**3 + 1}, "file_size", "max"),
    ]
    with gw.client(dk) as http:
        for change, field, rule in cases:
            assert_refused(http.post("/models/presign", json=good | change), 400, field, rule)
        assert_refused(http.post("/models", json=good | {"extra": 1}), 400, "extra", "unknown_key")


def test_register_before_upload_is_refused(gw: GatewayProcess) -> None:
    """Registering content that was never uploaded (or of another size) is a 400 on file_hash."""
    dk = fresh_team(gw)
    content = os.urandom(512)
    body = body_for(content)
    with gw.client(dk) as http:
        assert_refused(http.post("/models", json=body), 400, "file_hash", "not_uploaded")
        upload(gw, dk, content)
        wrong = body | {"file_size": len(content) + 1}
        assert_refused(http.post("/models", json=wrong), 400, "file_hash", "not_uploaded")
        assert http.get("/models").json()["model_list"] == []


def test_integration_keys_cannot_manage_models(gw: GatewayProcess) -> None:
    """An sk- key gets 403 on the model routes; an unknown model id is 404."""
    dk = fresh_team(gw)
    sk = gw.credential(f"models-{next(_teams)}", kind="integration")
    with gw.client(sk) as http:
        assert http.get("/models").status_code == 403
    with gw.client(dk) as http:
        answer = http.patch("/models/model_nope", json={"model_status": "disabled"})
        assert answer.status_code == 404
        assert http.delete("/models/model_nope").status_code == 404


@pytest.mark.asyncio
async def test_welcome_sync_lists_active_models_with_working_urls(gw: GatewayProcess) -> None:
    """welcome.sync holds the active models only, and each download_url serves the bytes."""
    dk = fresh_team(gw)
    kept, dropped = os.urandom(3000), os.urandom(2000)
    lora = register(gw, dk, kept, kind="loras", path="style/ink.safetensors")
    off = register(gw, dk, dropped, path="old.safetensors")
    set_status(gw, dk, off["id"], "disabled")
    async with SimAgent(gw.ws_url, dk, "syncer") as agent:
        assert agent.welcome is not None
        assert agent.welcome.sync is not None
        models = agent.welcome.sync
        assert [(m.model_type, m.model_path) for m in models] == [
            ("loras", "style/ink.safetensors")
        ]
        assert models[0].file_hash == lora["file_hash"]
        assert models[0].file_size == len(kept)
        async with httpx.AsyncClient() as http:
            fetched = await http.get(models[0].download_url)
        assert fetched.status_code == 200
        assert fetched.content == kept
        assert tuple(await agent.next_sync()) == tuple(models)


@pytest.mark.asyncio
async def test_changes_send_sync_to_the_team_agents_only(gw: GatewayProcess) -> None:
    """Register, disable, enable and delete each send the team's new set to its agents only."""
    dk, other = fresh_team(gw), fresh_team(gw)
    async with (
        SimAgent(gw.ws_url, dk, "mine") as mine,
        SimAgent(gw.ws_url, other, "theirs") as theirs,
    ):
        assert await mine.next_sync() == ()
        assert await theirs.next_sync() == ()
        record = register(gw, dk, os.urandom(1024), path="a.safetensors")
        assert [m.model_path for m in await mine.next_sync()] == ["a.safetensors"]
        set_status(gw, dk, record["id"], "disabled")
        assert await mine.next_sync() == ()
        set_status(gw, dk, record["id"], "disabled")  # no change: no message
        set_status(gw, dk, record["id"], "active")
        assert [m.model_path for m in await mine.next_sync()] == ["a.safetensors"]
        with gw.client(dk) as http:
            assert http.delete(f"/models/{record['id']}").status_code == 204
        assert await mine.next_sync() == ()
        # the other team's next set is its own registration: nothing of ours came before it
        register(gw, other, os.urandom(100), path="b.safetensors")
        assert [m.model_path for m in await theirs.next_sync()] == ["b.safetensors"]
        assert mine.syncs.empty()


@pytest.mark.asyncio
async def test_task_requiring_a_model_goes_to_the_warm_agent(gw: GatewayProcess) -> None:
    """An agent that holds the required model beats an otherwise equal agent that lacks it."""
    dk = fresh_team(gw)
    record = register(gw, dk, os.urandom(2048), path="sdxl.safetensors")
    workflow = gw.create_workflow(
        dk, comfy_workflow(required_models=["checkpoints/sdxl.safetensors"])
    )
    digest = record["file_hash"].removeprefix("sha256:")
    # the cold agent connects first: it would win a tie (longest connected)
    async with (
        SimAgent(gw.ws_url, dk, "cold") as cold,
        SimAgent(gw.ws_url, dk, "warm", models=[digest]) as warm,
    ):
        with gw.client(dk) as http:
            answer = http.post(f"/r/workflows/{workflow}/run", json={})
        assert answer.status_code == 202, answer.text
        assign = await warm.next_assign()
        assert assign.task_id == answer.json()["task_id"]
        assert assign.required_models == ["checkpoints/sdxl.safetensors"]
        assert cold.offers.empty()


def test_unknown_or_disabled_required_model_is_refused_at_run(gw: GatewayProcess) -> None:
    """A run whose workflow requires an unregistered or disabled model is a 400."""
    dk = fresh_team(gw)
    record = register(gw, dk, os.urandom(64), kind="vae", path="v.safetensors")
    unknown = gw.create_workflow(dk, comfy_workflow(required_models=["loras/none.safetensors"]))
    known = gw.create_workflow(dk, comfy_workflow(required_models=["vae/v.safetensors"]))
    set_status(gw, dk, record["id"], "disabled")
    with gw.client(dk) as http:
        for workflow, name in ((unknown, "loras/none.safetensors"), (known, "vae/v.safetensors")):
            answer = http.post(f"/r/workflows/{workflow}/run", json={})
            assert_refused(answer, 400, "required_models", "model_not_found")
            assert name in answer.json()["error"]["message"]
        set_status(gw, dk, record["id"], "active")
        assert http.post(f"/r/workflows/{known}/run", json={}).status_code == 202
