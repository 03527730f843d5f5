"""Device pairing (``/desktop/pair/*``, ``cyberun-gateway pair approve``) on a real gateway."""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth import issue_jwt
from gateway.pairing import (
    USER_CODE_ALPHABET,
    Pairing,
    new_device_code,
    new_user_code,
    normalise_user_code,
)
from gateway.store import SqliteStore, utcnow
from tests.gateway_process import GatewayProcess, comfy_workflow, gateway, run_cli
from tests.simagent import SimAgent

USER_CODE_RE = re.compile(r"^[A-HJKMNP-Z2-9]{4}-[A-HJKMNP-Z2-9]{4}$")
_teams = itertools.count()


@pytest.fixture(scope="module")
def pair_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with the documented pairing defaults, logging at debug level."""
    with gateway(tmp_path_factory.mktemp("pairing"), "--log-level", "debug") as proc:
        yield proc


def fresh_team() -> str:
    """A team name no other test uses."""
    return f"pair-{next(_teams)}"


def start(gw: GatewayProcess, **body: Any) -> dict[str, Any]:
    """Start a pairing (no credential) and return the answer."""
    answer = httpx.post(f"{gw.api}/desktop/pair/start", json=body or None, timeout=30)
    assert answer.status_code == 200, answer.text
    started: dict[str, Any] = answer.json()
    return started


def poll(gw: GatewayProcess, device_code: str) -> httpx.Response:
    """Poll a pairing as the device does."""
    return httpx.post(f"{gw.api}/desktop/pair/poll", json={"device_code": device_code}, timeout=30)


def approve(gw: GatewayProcess, credential: str, user_code: str) -> httpx.Response:
    """Approve a user code over REST with ``credential``."""
    with gw.client(credential) as http:
        return http.post("/desktop/pair/approve", json={"user_code": user_code})


def approve_cli(gw: GatewayProcess, user_code: str, team: str) -> str:
    """Approve a user code with ``cyberun-gateway pair approve``; return its stdout."""
    return run_cli("pair", "approve", user_code, "--team", team, "--data-dir", str(gw.data_dir))


def approve_cli_fails(gw: GatewayProcess, user_code: str, team: str) -> str:
    """Run ``pair approve`` expecting exit status 1; return its stderr."""
    args = ["pair", "approve", user_code, "--team", team, "--data-dir", str(gw.data_dir)]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    return done.stderr


def error(answer: httpx.Response) -> dict[str, Any]:
    """The ``error`` block of an error answer."""
    detail: dict[str, Any] = answer.json()["error"]
    return detail


def collect(gw: GatewayProcess, device_code: str) -> tuple[str, str]:
    """Poll an approved pairing once and return its ``(raw_key, agent_key)``."""
    answer = poll(gw, device_code)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"status", "raw_key", "agent_key"}
    assert body["status"] == "approved"
    return body["raw_key"], body["agent_key"]


def poll_until_not_pending(
    gw: GatewayProcess, device_code: str, deadline_s: float
) -> httpx.Response:
    """Poll until the answer is no longer ``pending`` (fails past the deadline)."""
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        answer = poll(gw, device_code)
        if answer.status_code != 200 or answer.json() != {"status": "pending"}:
            return answer
        time.sleep(0.05)  # a device waits `interval` between polls; tests need not wait as long
    raise AssertionError(f"still pending after {deadline_s}s")


# ------------------------------------------------------------------ codes (pure)


def test_user_codes_use_the_unambiguous_alphabet() -> None:
    """User codes read XXXX-XXXX from upper-case letters and digits without 0, O, 1, I, L."""
    assert not set("0O1IL") & set(USER_CODE_ALPHABET)
    codes = {new_user_code() for _ in range(500)}
    assert all(USER_CODE_RE.fullmatch(code) for code in codes)
    assert len(codes) > 490  # random, not a counter


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("AB7K-PNQ3", "AB7K-PNQ3"),
        ("ab7k-pnq3", "AB7K-PNQ3"),
        ("AB7KPNQ3", "AB7K-PNQ3"),
        (" ab7k pnq3 ", "AB7K-PNQ3"),
        ("AB7K-PNQ", None),
        ("AB7K-PNQ33", None),
        ("AB7K-PNQ0", None),
        ("", None),
    ],
)
def test_typed_user_codes_ignore_case_dashes_and_spaces(typed: str, canonical: str | None) -> None:
    """A typed code is read in any case, with or without its dash; a non-code reads None."""
    assert normalise_user_code(typed) == canonical


def test_device_codes_are_long_url_safe_and_fresh() -> None:
    """Device codes are 43 URL-safe characters (256 bits) and never repeat."""
    codes = {new_device_code() for _ in range(100)}
    assert len(codes) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", code) for code in codes)


def test_an_old_database_gains_the_pairings_table(tmp_path: Path) -> None:
    """A database created before pairing existed gets the table when it is opened."""
    path = tmp_path / "gateway.sqlite3"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE pairings")
    store = SqliteStore(path)
    try:
        now = utcnow()
        store.add_pairing(Pairing("h", "AB7K-PNQ3", "", now, now), max_pending=1)
        assert store.pairing("h") is not None
    finally:
        store.close()


# ------------------------------------------------------------------ the flow


def test_start_answers_the_documented_fields(pair_gw: GatewayProcess) -> None:
    """Start takes no credential and an optional body; it answers the documented five fields."""
    no_body = httpx.post(f"{pair_gw.api}/desktop/pair/start", timeout=30)
    assert no_body.status_code == 200, no_body.text
    assert no_body.headers["cache-control"] == "no-store"
    named = start(pair_gw, device_name="studio-pc")
    for body in (no_body.json(), named):
        assert set(body) == {
            "device_code",
            "user_code",
            "verification_uri",
            "expires_in",
            "interval",
        }
        assert USER_CODE_RE.fullmatch(body["user_code"])
        assert len(body["device_code"]) >= 43
        assert body["verification_uri"] == f"{pair_gw.url}/pair"
        assert (body["expires_in"], body["interval"]) == (300, 2)
    assert named["device_code"] != no_body.json()["device_code"]


def test_start_refuses_a_long_device_name(pair_gw: GatewayProcess) -> None:
    """A device_name over 64 characters is a 400 naming the field."""
    answer = httpx.post(f"{pair_gw.api}/desktop/pair/start", json={"device_name": "x" * 65})
    assert answer.status_code == 400
    assert (error(answer)["field"], error(answer)["rule"]) == ("device_name", "max_length")


@pytest.mark.asyncio
async def test_cli_approval_pairs_a_device_with_working_keys_once(pair_gw: GatewayProcess) -> None:
    """Pending until the CLI approves; then once a dk- for REST and an ak- for agents; then 404."""
    team = fresh_team()
    started = start(pair_gw, device_name="gpu-box")
    assert poll(pair_gw, started["device_code"]).json() == {"status": "pending"}
    assert poll(pair_gw, started["device_code"]).json() == {"status": "pending"}
    out = approve_cli(pair_gw, started["user_code"], team)
    assert out == f"approved {started['user_code']} for team {team}\n"
    raw_key, agent_key = collect(pair_gw, started["device_code"])
    assert raw_key.startswith("dk-")
    assert agent_key.startswith("ak-")
    again = poll(pair_gw, started["device_code"])
    assert again.status_code == 404
    assert error(again)["field"] == "device_code"
    with pair_gw.client(raw_key) as http:
        assert http.get("/r/workflows").json() == {"workflow_list": []}
    with pair_gw.client(agent_key) as http:
        refused = http.get("/r/workflows")
    assert refused.status_code == 403
    assert "agent connection only" in error(refused)["message"]
    async with SimAgent(pair_gw.ws_url, agent_key, "paired-box") as agent:
        assert agent.welcome is not None
        with pair_gw.client(raw_key) as http:
            listed = http.get("/r/agents").json()["agent_list"]
        assert [a["agent_id"] for a in listed] == ["paired-box"]  # same team as the dk-


def test_rest_approval_pairs_into_the_callers_team(pair_gw: GatewayProcess) -> None:
    """A team's dk- approves a code (any case, no dash); the minted dk- sees that team's data."""
    owner = pair_gw.credential(fresh_team())
    workflow = pair_gw.create_workflow(owner, comfy_workflow())
    started = start(pair_gw)
    typed = started["user_code"].replace("-", "").lower()
    answer = approve(pair_gw, owner, typed)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"status", "user_code", "team_id"}
    assert (body["status"], body["user_code"]) == ("approved", started["user_code"])
    raw_key, _ = collect(pair_gw, started["device_code"])
    with pair_gw.client(raw_key) as http:
        listed = http.get("/r/workflows").json()["workflow_list"]
    assert [w["id"] for w in listed] == [workflow]
    assert listed[0]["team_id"] == body["team_id"]


def test_a_user_token_approves_into_its_x_team_id(pair_gw: GatewayProcess) -> None:
    """A user JWT with X-Team-ID approves into that team; a team the gateway lacks is 404."""
    store = SqliteStore(pair_gw.data_dir / "gateway.sqlite3")  # the server runs meanwhile (WAL)
    try:
        team = store.ensure_team(fresh_team())
    finally:
        store.close()
    token = issue_jwt(
        "user-1", [team.id, "team_unknown"], (pair_gw.data_dir / "jwt.key").read_bytes()
    )
    code = start(pair_gw)["user_code"]
    with pair_gw.client(token) as http:
        stranger, member = (
            http.post(
                "/desktop/pair/approve", json={"user_code": code}, headers={"X-Team-ID": team_id}
            )
            for team_id in ("team_unknown", team.id)
        )
    assert stranger.status_code == 404
    assert error(stranger)["field"] == "X-Team-ID"
    assert member.status_code == 200, member.text
    assert member.json()["team_id"] == team.id


def test_approval_needs_a_management_credential(pair_gw: GatewayProcess) -> None:
    """Approving without a credential is 401; with an sk- or ak- key it is 403."""
    team = fresh_team()
    code = start(pair_gw)["user_code"]
    anonymous = httpx.post(f"{pair_gw.api}/desktop/pair/approve", json={"user_code": code})
    assert anonymous.status_code == 401
    for kind in ("integration", "agent"):
        assert approve(pair_gw, pair_gw.credential(team, kind), code).status_code == 403
    assert approve(pair_gw, pair_gw.credential(team), code).status_code == 200


def test_unknown_codes_are_404(pair_gw: GatewayProcess) -> None:
    """An unknown device_code or user_code is 404 naming it; the CLI exits 1 saying so."""
    unknown = poll(pair_gw, new_device_code())
    assert unknown.status_code == 404
    assert (error(unknown)["code"], error(unknown)["field"]) == ("not_found", "device_code")
    dk = pair_gw.credential(fresh_team())
    for typed in ("AB7K-PNQ3", "not a code"):
        answer = approve(pair_gw, dk, typed)
        assert answer.status_code == 404
        assert (error(answer)["code"], error(answer)["field"]) == ("not_found", "user_code")
    assert "no pairing has user code AB7K-PNQ3" in approve_cli_fails(
        pair_gw, "AB7K-PNQ3", fresh_team()
    )


def test_a_code_approves_once(pair_gw: GatewayProcess) -> None:
    """A second approval, over REST or the CLI, is 409 / exit 1 and the first one stands."""
    team = fresh_team()
    dk = pair_gw.credential(team)
    started = start(pair_gw)
    assert approve(pair_gw, dk, started["user_code"]).status_code == 200
    twice = approve(pair_gw, pair_gw.credential(fresh_team()), started["user_code"])
    assert twice.status_code == 409
    assert (error(twice)["field"], error(twice)["rule"]) == ("user_code", "already_approved")
    assert "already approved" in approve_cli_fails(pair_gw, started["user_code"], fresh_team())
    raw_key, _ = collect(pair_gw, started["device_code"])
    with pair_gw.client(raw_key) as http, pair_gw.client(dk) as own:
        assert http.get("/r/agents").status_code == 200
        wf = own.post("/workflows", json=comfy_workflow()).json()["id"]
        assert http.get(f"/r/workflows/{wf}").status_code == 200  # the first approver's team


@pytest.mark.asyncio
async def test_concurrent_polls_get_the_keys_once(pair_gw: GatewayProcess) -> None:
    """Of many simultaneous polls of an approved pairing exactly one gets keys; the rest 404."""
    started = start(pair_gw)
    approve_cli(pair_gw, started["user_code"], fresh_team())
    async with httpx.AsyncClient(base_url=pair_gw.api, timeout=30) as http:
        answers = await asyncio.gather(
            *(
                http.post("/desktop/pair/poll", json={"device_code": started["device_code"]})
                for _ in range(24)
            )
        )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [404] * 23
    winner = next(a for a in answers if a.status_code == 200).json()
    assert winner["status"] == "approved"
    assert winner["raw_key"].startswith("dk-")


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({}, "required"),
        ({"device_code": 5}, "type"),
        ({"device_code": "x", "more": 1}, "unknown_key"),
    ],
)
def test_malformed_polls_are_400_naming_the_field(
    pair_gw: GatewayProcess, body: dict[str, Any], rule: str
) -> None:
    """A poll body without a string device_code, or with extra keys, is a 400 naming the field."""
    answer = httpx.post(f"{pair_gw.api}/desktop/pair/poll", json=body)
    assert answer.status_code == 400
    assert error(answer)["rule"] == rule
    assert error(answer)["field"] in {"device_code", "more"}


def test_secrets_reach_neither_the_log_nor_the_database(pair_gw: GatewayProcess) -> None:
    """The device code, raw_key and agent_key are in no log line and no database file."""
    started = start(pair_gw, device_name="log-check")
    poll(pair_gw, started["device_code"])
    approve_cli(pair_gw, started["user_code"], fresh_team())
    raw_key, agent_key = collect(pair_gw, started["device_code"])
    poll(pair_gw, started["device_code"])
    with pair_gw.client(raw_key) as http:
        http.get("/r/workflows")
    logs = pair_gw.logs()
    assert "device paired" in logs  # the flow was logged, at debug level
    stored = b"".join(p.read_bytes() for p in pair_gw.data_dir.glob("gateway.sqlite3*"))
    for secret in (started["device_code"], raw_key, agent_key):
        assert secret not in logs
        assert secret.encode() not in stored


def test_pair_page_is_self_contained_html(pair_gw: GatewayProcess) -> None:
    """GET /pair is a small HTML page with the approval command, no scripts or external assets."""
    answer = httpx.get(f"{pair_gw.url}/pair")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    page = answer.text
    assert "cyberun-gateway pair approve USER_CODE --team TEAM" in page
    assert f"{pair_gw.api}/desktop/pair/approve" in page
    assert "<script" not in page
    assert not re.search(r"(src|href)=", page)


# ------------------------------------------------------------------ expiry and limits


def test_an_expired_pairing_is_410(tmp_path: Path) -> None:
    """Past --pair-ttl a pairing polls 410 expired; approving it is 410 and the CLI exits 1."""
    with gateway(tmp_path, "--pair-ttl", "1") as gw:
        started = start(gw)
        assert started["expires_in"] == 1
        answer = poll_until_not_pending(gw, started["device_code"], deadline_s=15)
        assert answer.status_code == 410
        assert error(answer) == {
            "code": "expired",
            "message": error(answer)["message"],
            "field": "device_code",
            "rule": "expired",
        }
        late = approve(gw, gw.credential(fresh_team()), started["user_code"])
        assert late.status_code == 410
        assert (error(late)["field"], error(late)["rule"]) == ("user_code", "expired")
        assert "expired" in approve_cli_fails(gw, started["user_code"], fresh_team())


def test_pending_pairings_are_bounded(tmp_path: Path) -> None:
    """Past --max-pairings pending pairings, start is 429; collected or expired ones free room."""
    with gateway(tmp_path, "--max-pairings", "2", "--pair-ttl", "3") as gw:
        dk = gw.credential(fresh_team())
        first, second = start(gw), start(gw)
        crowded = httpx.post(f"{gw.api}/desktop/pair/start")
        assert crowded.status_code == 429
        assert error(crowded)["code"] == "too_many_pairings"
        assert approve(gw, dk, first["user_code"]).status_code == 200  # no longer pending
        third = start(gw)
        assert httpx.post(f"{gw.api}/desktop/pair/start").status_code == 429
        for pairing in (second, third):
            assert poll_until_not_pending(gw, pairing["device_code"], 15).status_code == 410
        assert start(gw)["expires_in"] == 3  # expired pairings no longer count
