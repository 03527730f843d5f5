"""Credentials and principals: who is calling, for which team, on which surface.

Pure code (no I/O): the caller passes a ``lookup`` that finds a stored credential by the
sha256 hash of the presented secret. Kinds, by prefix:

- ``sk-`` integration key: REST (``/r/``) only; refused on the agent WebSocket (403).
- ``dk-`` device credential: REST, management and the agent WebSocket.
- ``ak-`` agent key: the agent WebSocket only; refused on REST (403).
- anything else is read as a user JWT (HS256, claims ``sub`` and ``exp`` required,
  ``teams`` a list of team ids): REST only, with an ``X-Team-ID`` header naming one of
  the token's teams (missing → 400, not one of them → 403).

Authentication comes before authorisation: an unknown, revoked or malformed credential
is 401 whatever the surface; only a valid one is told 403. Error messages never contain
the presented secret or token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt

JWT_ALGORITHM = "HS256"
DISPLAY_PREFIX_LENGTH = 10
"""Characters of a secret kept for display (``dk-AbCdEfG``); the rest is only hashed."""

TEAM_HEADER = "X-Team-ID"
AUTH_HEADER = "Authorization"

Surface = Literal["rest", "agent"]
"""Where a request arrives: the REST API (``/r/`` and management), or the agent WebSocket."""


class CredentialKind(enum.StrEnum):
    """Kinds of stored credential, told apart by the secret's prefix."""

    INTEGRATION = "integration"
    DEVICE = "device"
    AGENT = "agent"


PREFIXES: dict[CredentialKind, str] = {
    CredentialKind.INTEGRATION: "sk-",
    CredentialKind.DEVICE: "dk-",
    CredentialKind.AGENT: "ak-",
}
"""The prefix of each kind's secrets."""

_ALLOWED: dict[Surface, frozenset[CredentialKind | Literal["user"]]] = {
    "rest": frozenset({CredentialKind.INTEGRATION, CredentialKind.DEVICE, "user"}),
    "agent": frozenset({CredentialKind.DEVICE, CredentialKind.AGENT}),
}
_REFUSED: dict[tuple[Surface, CredentialKind | Literal["user"]], str] = {
    ("agent", CredentialKind.INTEGRATION): (
        "integration keys (sk-) are for the REST API only; "
        "the agent connection takes an agent key (ak-) or a device credential (dk-)"
    ),
    ("rest", CredentialKind.AGENT): (
        "agent keys (ak-) are for the agent connection only; "
        "the REST API takes an integration key (sk-), a device credential (dk-) or a user token"
    ),
    ("agent", "user"): (
        "user tokens are not accepted on the agent connection; "
        "use an agent key (ak-) or a device credential (dk-)"
    ),
}

_INVALID = "invalid or revoked credential"
_MALFORMED = f"missing or malformed {AUTH_HEADER} header; expected 'Bearer <credential>'"


@dataclass(frozen=True)
class StoredCredential:
    """What the store keeps of a credential: never the secret, only its prefix (and hash)."""

    id: str
    team_id: str
    kind: CredentialKind
    prefix: str
    revoked: bool


@dataclass(frozen=True)
class Principal:
    """An authenticated caller acting for one team.

    ``subject`` is the credential id, or the JWT ``sub`` when ``kind`` is ``"user"``.
    """

    team_id: str
    kind: CredentialKind | Literal["user"]
    subject: str


class AuthError(Exception):
    """Authentication or authorisation failed: 400, 401 or 403 with a safe message.

    ``field`` names the header at fault (``Authorization``, ``X-Team-ID``) where there
    is one. The message never contains the presented secret.
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        """Record the HTTP status, the message and the header at fault."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


# ------------------------------------------------------------------ secrets


def hash_secret(secret: str) -> str:
    """Return the sha256 hex digest of a secret (what the store keeps and looks up)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def verify_secret(secret: str, secret_hash: str) -> bool:
    """Return whether a secret matches a stored hash, in constant time."""
    return hmac.compare_digest(hash_secret(secret), secret_hash)


def generate_secret(kind: CredentialKind) -> tuple[str, str, str]:
    """Mint a secret of a kind: ``(secret, display prefix, sha256 hex of the secret)``.

    The secret is the kind's prefix + ``secrets.token_urlsafe(32)``; it is shown once, and
    only the prefix and the hash are stored.
    """
    secret = PREFIXES[kind] + secrets.token_urlsafe(32)
    return secret, secret[:DISPLAY_PREFIX_LENGTH], hash_secret(secret)


def kind_of(secret: str) -> CredentialKind | None:
    """Return the kind a secret's prefix announces, or None (then it may be a JWT)."""
    for kind, prefix in PREFIXES.items():
        if secret.startswith(prefix):
            return kind
    return None


# ------------------------------------------------------------------ JWT


def issue_jwt(
    sub: str,
    teams: list[str],
    key: bytes,
    ttl_s: int = 3600,
    now: datetime | None = None,
) -> str:
    """Sign an HS256 user token for ``sub`` with access to ``teams`` (tests and the CLI)."""
    issued = now or datetime.now(UTC)
    claims = {
        "sub": sub,
        "teams": list(teams),
        "iat": int(issued.timestamp()),
        "exp": int((issued + timedelta(seconds=ttl_s)).timestamp()),
    }
    return jwt.encode(claims, key, algorithm=JWT_ALGORITHM)


def _timestamp(claims: dict[str, Any], name: str) -> float | None:
    """Return a numeric time claim, or None when absent; 401 when it is not a number."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(401, f"invalid token: the {name} claim must be a number", AUTH_HEADER)
    return float(value)


def _decode_jwt(token: str, key: bytes, now: datetime) -> tuple[str, list[str]]:
    """Verify a user token; return its ``sub`` and ``teams``. 401 on any defect.

    PyJWT checks the signature, the algorithm and the presence of ``sub``/``exp``; the
    time claims are checked here against ``now`` (PyJWT would read the wall clock).
    PyJWT's own messages are not forwarded.
    """
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[JWT_ALGORITHM],
            options={
                "require": ["sub", "exp"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except (jwt.PyJWTError, ValueError):  # ValueError: e.g. text that cannot be encoded
        raise AuthError(401, "invalid token", AUTH_HEADER) from None
    at = now.timestamp() if now.tzinfo else now.replace(tzinfo=UTC).timestamp()
    exp = _timestamp(claims, "exp")
    if exp is not None and exp <= at:
        raise AuthError(401, "token expired", AUTH_HEADER)
    nbf = _timestamp(claims, "nbf")
    if nbf is not None and nbf > at:
        raise AuthError(401, "token not yet valid", AUTH_HEADER)
    sub, teams = claims.get("sub"), claims.get("teams", [])
    if not isinstance(sub, str) or not sub:
        raise AuthError(401, "invalid token: sub must be a non-empty string", AUTH_HEADER)
    if not isinstance(teams, list) or not all(isinstance(team, str) for team in teams):
        raise AuthError(401, "invalid token: teams must be a list of strings", AUTH_HEADER)
    return sub, teams


def _user_principal(sub: str, teams: list[str], x_team_id: str | None) -> Principal:
    """Pick the team of a user request from ``X-Team-ID``: 400 missing, 403 not a member."""
    team = (x_team_id or "").strip()
    if not team:
        raise AuthError(400, f"user tokens need an {TEAM_HEADER} header", TEAM_HEADER)
    if team not in teams:
        raise AuthError(403, f"the token does not grant access to the {TEAM_HEADER} team")
    return Principal(team_id=team, kind="user", subject=sub)


# ------------------------------------------------------------------ requests


def _bearer(authorization: str | None) -> str:
    """Return the credential of a ``Bearer <credential>`` header; 401 otherwise."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(ch.isspace() for ch in token):
        raise AuthError(401, _MALFORMED, AUTH_HEADER)
    return token


def _stored(
    token: str, kind: CredentialKind, lookup: Callable[[str], StoredCredential | None]
) -> StoredCredential:
    """Find a live credential of the announced kind; 401 (one message) when there is none."""
    found = lookup(hash_secret(token))
    if found is None or found.revoked or found.kind is not kind:
        raise AuthError(401, _INVALID, AUTH_HEADER)
    return found


def _check_surface(surface: Surface, kind: CredentialKind | Literal["user"]) -> None:
    """Refuse, with 403 and the reason, a valid credential on a surface it may not use."""
    if kind not in _ALLOWED[surface]:
        raise AuthError(403, _REFUSED[(surface, kind)])


def authenticate(
    authorization: str | None,
    x_team_id: str | None,
    *,
    surface: Surface,
    lookup: Callable[[str], StoredCredential | None],
    jwt_key: bytes,
    now: datetime | None = None,
) -> Principal:
    """Authenticate a request and return who it acts as; raise ``AuthError`` otherwise.

    ``authorization`` is the ``Authorization`` header; ``lookup`` finds a stored credential
    by the sha256 hex of the secret. ``sk-``/``dk-``/``ak-`` credentials carry their team
    (any ``X-Team-ID`` is ignored); a JWT takes its team from ``X-Team-ID``. See the module
    docstring for which kinds each surface accepts.
    """
    token = _bearer(authorization)
    kind = kind_of(token)
    if kind is None:
        sub, teams = _decode_jwt(token, jwt_key, now or datetime.now(UTC))
        _check_surface(surface, "user")
        return _user_principal(sub, teams, x_team_id)
    stored = _stored(token, kind, lookup)
    _check_surface(surface, kind)
    return Principal(team_id=stored.team_id, kind=kind, subject=stored.id)
