"""``cyberun-agent login``: pair this machine with a team through the device flow.

The documented flow: ``POST /desktop/pair/start`` gives a ``device_code`` (kept secret
here), a ``user_code`` and a ``verification_uri`` to show the owner, ``expires_in`` and the
polling ``interval``. The agent then polls ``POST /desktop/pair/poll {device_code}`` every
``interval`` seconds: ``pending`` until someone on the team approves the code, then once
``approved`` with ``raw_key`` (the ``dk-`` device credential) and ``agent_key`` (its
companion ``ak-``). Both are written, one per line, to the credential file with mode 0600
(``credential_file``, else ``<state_dir>/credential``, where ``run`` finds them); neither
is ever printed or logged.

Transient answers (connection errors, 429, 5xx) are retried at the polling interval until
the code expires; 404 (unknown or already used) and 410 (expired) end the attempt.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from agent import __version__
from agent.errors import AgentError, CredentialError
from agent.settings import pick_credential, write_private_file

API_PREFIX = "/api/v1"
START_PATH = f"{API_PREFIX}/desktop/pair/start"
POLL_PATH = f"{API_PREFIX}/desktop/pair/poll"
REQUEST_TIMEOUT_S = 30.0
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 30.0


class PairingError(AgentError):
    """The gateway could not be reached or answered something the flow does not allow."""


@dataclass(frozen=True)
class Pairing:
    """An open pairing: what to show the owner, and what to poll with."""

    device_code: str
    user_code: str
    verification_uri: str
    expires_in: float
    interval: float


@dataclass(frozen=True)
class Paired:
    """The outcome of a completed login."""

    path: Path
    kinds: tuple[str, ...]
    """The kinds of key stored (``dk``, ``ak``)."""


def start(http: httpx.Client, gateway_url: str) -> Pairing:
    """Open a pairing on the gateway."""
    body = {"device_name": socket.gethostname()[:64]}
    answer = _post(http, gateway_url + START_PATH, body)
    if answer.status_code != 200:
        raise PairingError(f"the gateway refused to start pairing: {_describe(answer)}")
    data = _json(answer)
    try:
        return Pairing(
            device_code=str(data["device_code"]),
            user_code=str(data["user_code"])[:32],
            verification_uri=str(data["verification_uri"])[:2048],
            expires_in=float(data["expires_in"]),
            interval=min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, float(data.get("interval", 2)))),
        )
    except (KeyError, TypeError, ValueError):
        raise PairingError("the gateway's pairing answer lacks a required field") from None


def wait_for_keys(
    http: httpx.Client,
    gateway_url: str,
    pairing: Pairing,
    *,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> tuple[str, str]:
    """Poll until the pairing is approved; return ``(raw_key, agent_key)``.

    Raises `CredentialError` when the code expires or is no longer valid, `PairingError`
    when the gateway answers something the flow does not allow.
    """
    deadline = clock() + pairing.expires_in
    while clock() < deadline:
        pause(min(pairing.interval, max(0.0, deadline - clock())))  # the polling interval
        try:
            answer = _post(http, gateway_url + POLL_PATH, {"device_code": pairing.device_code})
        except PairingError:
            continue  # the gateway is briefly unreachable: poll again
        if answer.status_code == 429 or answer.status_code >= 500:
            continue
        if answer.status_code == 404:
            raise CredentialError("the pairing is unknown or was already used; run login again")
        if answer.status_code == 410:
            raise CredentialError("the code expired before it was approved; run login again")
        if answer.status_code != 200:
            raise PairingError(f"unexpected answer while pairing: {_describe(answer)}")
        data = _json(answer)
        if data.get("status") == "approved":
            return _keys(data)
    raise CredentialError("the code expired before it was approved; run login again")


def store_keys(path: Path, gateway_url: str, raw_key: str, agent_key: str) -> Paired:
    """Write both keys to ``path`` (mode 0600, atomically replacing an older pair)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = (
        f"# written by cyberun-agent {__version__} login, {gateway_url}, {stamp}\n"
        "# the device credential (REST) and its agent key (the agent connection)\n"
        f"{raw_key}\n{agent_key}\n"
    )
    write_private_file(path, text, overwrite=True)
    return Paired(path=path, kinds=("dk", "ak"))


def login(
    gateway_url: str,
    path: Path,
    *,
    show: Callable[[str], None],
    http: httpx.Client | None = None,
) -> Paired:
    """The whole flow: start, show the code, wait for approval, store the keys."""
    own = http is None
    client = http or httpx.Client(
        timeout=REQUEST_TIMEOUT_S, headers={"User-Agent": f"cyberun-agent/{__version__}"}
    )
    try:
        pairing = start(client, gateway_url)
        minutes = max(1, round(pairing.expires_in / 60))
        show(
            f"To pair this machine, open {pairing.verification_uri}\n"
            f"and approve the code:  {pairing.user_code}\n"
            f"(it expires in {minutes} min; waiting for approval…)"
        )
        raw_key, agent_key = wait_for_keys(client, gateway_url, pairing)
    finally:
        if own:
            client.close()
    return store_keys(path, gateway_url, raw_key, agent_key)


def _keys(data: dict[str, Any]) -> tuple[str, str]:
    raw_key, agent_key = data.get("raw_key"), data.get("agent_key")
    if not isinstance(raw_key, str) or not isinstance(agent_key, str):
        raise PairingError("the approved pairing lacks raw_key or agent_key")
    origin = "the gateway's pairing answer"
    if not (raw_key.startswith("dk-") and pick_credential(raw_key, origin) == raw_key):
        raise PairingError("the gateway's raw_key is not a dk- device credential")
    if not (agent_key.startswith("ak-") and pick_credential(agent_key, origin) == agent_key):
        raise PairingError("the gateway's agent_key is not an ak- agent key")
    return raw_key, agent_key


def _post(http: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response:
    try:
        return http.post(url, json=body)
    except httpx.HTTPError as exc:
        raise PairingError(f"cannot reach the gateway: {type(exc).__name__}") from exc


def _json(answer: httpx.Response) -> dict[str, Any]:
    try:
        data = answer.json()
    except ValueError:
        raise PairingError("the gateway's answer is not JSON") from None
    if not isinstance(data, dict):
        raise PairingError("the gateway's answer is not a JSON object")
    return data


def _describe(answer: httpx.Response) -> str:
    """``HTTP 429: message`` from the project's error body (never echoes a secret: none sent)."""
    try:
        error = answer.json().get("error", {})
        message = str(error.get("message", ""))[:300]
    except (ValueError, AttributeError):
        message = answer.text[:300]
    return f"HTTP {answer.status_code}" + (f": {message}" if message else "")
