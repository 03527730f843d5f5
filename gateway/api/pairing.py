"""Device pairing: ``/desktop/pair/start``, ``…/poll``, ``…/approve`` and the ``/pair`` page.

``start`` and ``poll`` take no credential (the device has none yet; its device code is the
secret); ``approve`` takes a management principal (``dk-`` or a user token) and approves
into that principal's team. The rules are ``gateway.pairing``'s; this module translates
them into the error format: 404 (unknown), 409 (approved already), 410 (expired) naming
``device_code`` or ``user_code``, and 429 (too many pending pairings).

Answers that carry a secret are ``Cache-Control: no-store``. Nothing here logs a device
code or a minted secret: the log lines carry the user code, the team and the
``credential_kind``s.
"""

from __future__ import annotations

import contextlib
import html
from datetime import timedelta
from typing import Annotated

import structlog
from fastapi import APIRouter, Body, Response
from fastapi.responses import HTMLResponse

from gateway.api.deps import ApiError, ManagerDep, Services, ServicesDep
from gateway.auth import CredentialKind, generate_secret, hash_secret
from gateway.models import (
    PairApproveRequest,
    PairApproveResponse,
    PairPollRequest,
    PairPollResponse,
    PairStartRequest,
    PairStartResponse,
)
from gateway.pairing import (
    Pairing,
    PairingError,
    PairingStatus,
    check_poll,
    new_device_code,
    new_user_code,
    parse_user_code,
)
from gateway.store import ConflictError, NotFoundError, utcnow

router = APIRouter(tags=["pairing"])
page = APIRouter(include_in_schema=False)
log = structlog.get_logger("gateway.pairing")

USER_CODE_ATTEMPTS = 5
"""New user codes tried when one clashes with a live pairing (31⁸ codes: it never does)."""
_NO_STORE = {"Cache-Control": "no-store"}


def _refused(exc: PairingError, field: str | None) -> ApiError:
    return ApiError(exc.status, exc.code, str(exc), field=field, rule=exc.rule)


def _unknown(field: str, message: str) -> ApiError:
    return ApiError(404, "not_found", message, field=field)


def _store_new(svc: Services, device_code: str, device_name: str) -> Pairing:
    """Store a pending pairing under a fresh user code, retrying the (rare) clash."""

    def attempt() -> Pairing:
        now = utcnow()
        pairing = Pairing(
            device_hash=hash_secret(device_code),
            user_code=new_user_code(),
            device_name=device_name,
            created_at=now,
            expires_at=now + timedelta(seconds=svc.config.pair_ttl_s),
        )
        svc.store.add_pairing(pairing, svc.config.max_pending_pairings)
        return pairing

    for _ in range(USER_CODE_ATTEMPTS - 1):
        with contextlib.suppress(ConflictError):
            return attempt()
    return attempt()


@router.post("/desktop/pair/start")
def start_pairing(
    svc: ServicesDep,
    response: Response,
    body: Annotated[PairStartRequest | None, Body()] = None,
) -> PairStartResponse:
    """Start pairing a device: show ``user_code`` to its owner, poll with ``device_code``."""
    device_code = new_device_code()
    try:
        pairing = _store_new(svc, device_code, body.device_name if body else "")
    except PairingError as exc:
        raise _refused(exc, None) from None
    log.info("pairing started", user_code=pairing.user_code, device_name=pairing.device_name)
    response.headers.update(_NO_STORE)
    return PairStartResponse(
        device_code=device_code,
        user_code=pairing.user_code,
        verification_uri=f"{svc.config.public_url}/pair",
        expires_in=svc.config.pair_ttl_s,
        interval=svc.config.pair_interval_s,
    )


@router.post("/desktop/pair/poll", response_model_exclude_none=True)
def poll_pairing(body: PairPollRequest, svc: ServicesDep, response: Response) -> PairPollResponse:
    """``pending`` until approved; then, once, the new ``dk-`` and ``ak-`` secrets; then 404."""
    device_hash = hash_secret(body.device_code)
    now = utcnow()
    response.headers.update(_NO_STORE)
    try:
        if check_poll(svc.store.pairing(device_hash), now).status is PairingStatus.PENDING:
            return PairPollResponse(status="pending")
        raw_key, dk_prefix, dk_hash = generate_secret(CredentialKind.DEVICE)
        agent_key, ak_prefix, ak_hash = generate_secret(CredentialKind.AGENT)
        minted = [
            (CredentialKind.DEVICE, dk_prefix, dk_hash),
            (CredentialKind.AGENT, ak_prefix, ak_hash),
        ]
        paired = svc.store.redeem_pairing(device_hash, now, minted)
    except LookupError:  # NotFoundError included: unknown, consumed, or a concurrent poll won
        raise _unknown("device_code", "unknown or already used device_code") from None
    except PairingError as exc:
        raise _refused(exc, "device_code") from None
    log.info(
        "device paired",
        user_code=paired.user_code,
        team_id=paired.team_id,
        credential_kind=[CredentialKind.DEVICE.value, CredentialKind.AGENT.value],
    )
    return PairPollResponse(status="approved", raw_key=raw_key, agent_key=agent_key)


@router.post("/desktop/pair/approve")
def approve_pairing(
    body: PairApproveRequest, principal: ManagerDep, svc: ServicesDep
) -> PairApproveResponse:
    """Approve the pairing showing ``user_code`` into the caller's team."""
    try:
        svc.store.team(principal.team_id)
    except NotFoundError:  # a user token may name a team this gateway has never seen
        raise _unknown("X-Team-ID", "no such team") from None
    try:
        pairing = svc.store.approve_pairing(
            parse_user_code(body.user_code), principal.team_id, utcnow()
        )
    except LookupError:  # NotFoundError included
        raise _unknown("user_code", "no pairing has this user_code") from None
    except PairingError as exc:
        raise _refused(exc, "user_code") from None
    log.info(
        "pairing approved",
        user_code=pairing.user_code,
        team_id=principal.team_id,
        credential_kind=principal.kind,
    )
    return PairApproveResponse(
        status="approved", user_code=pairing.user_code, team_id=principal.team_id
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pair a device</title></head>
<body>
<h1>Pair a device</h1>
<p>Your device shows a code like <code>AB7K-PNQ3</code>. Approve it for your team
within {minutes} minutes, either on the gateway host:</p>
<pre>cyberun-gateway pair approve USER_CODE --team TEAM</pre>
<p>or through the API, with a <code>dk-</code> device credential (or a user token and an
<code>X-Team-ID</code> header):</p>
<pre>POST {approve}
Authorization: Bearer dk-&hellip;
Content-Type: application/json

{{"user_code": "USER_CODE"}}</pre>
<p>The device then receives its credentials by itself.</p>
</body></html>
"""


@page.get("/pair", response_class=HTMLResponse)
def pair_page(svc: ServicesDep) -> HTMLResponse:
    """How to approve the code a device shows (the ``verification_uri``)."""
    approve = html.escape(f"{svc.config.public_url}/api/v1/desktop/pair/approve")
    text = _PAGE.format(minutes=max(1, round(svc.config.pair_ttl_s / 60)), approve=approve)
    return HTMLResponse(
        text,
        headers={
            "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )
