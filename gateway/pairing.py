"""Device pairing, the pure part: codes, the pairing record and its rules.

The flow (``POST /desktop/pair/start`` → ``…/approve`` → ``…/poll``, see
``docs/gateway.md``) in three states::

    pending ──approve──▶ approved ──poll──▶ consumed      (any state past expires_at: expired)

- The **device code** is the device's secret (``secrets.token_urlsafe(32)``); only its
  sha256 is stored (:func:`gateway.auth.hash_secret`), and it is never logged.
- The **user code** is what a person types: 8 characters of :data:`USER_CODE_ALPHABET`
  (no ``0 O 1 I L``), shown as ``XXXX-XXXX``; case, dashes and spaces are ignored when it
  is typed back (:func:`normalise_user_code`).
- The ``dk-``/``ak-`` pair is minted when an approved pairing is polled, never before, and
  handed out once: the same transaction marks the pairing consumed.

No I/O and no clock: callers pass ``now``. The rules raise :class:`PairingError`
subclasses (or :class:`LookupError` for "no such pairing"); the HTTP layer and the CLI
translate them.

Exceptions::

    PairingError
    ├── PairingExpiredError       410: past expires_at
    ├── PairingApprovedError      409: approved (or consumed) already
    └── TooManyPairingsError      429: too many pending pairings
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from datetime import datetime

USER_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
"""Upper-case letters and digits without the ambiguous ``0 O 1 I L`` (31 symbols)."""
USER_CODE_LENGTH = 8
"""Characters of a user code, shown in two groups of four (31⁸ ≈ 8.5·10¹¹ codes)."""
PURGE_AFTER_S = 3600
"""Pairings are deleted this long after they expire (until then an old code reads 410)."""


class PairingStatus(enum.StrEnum):
    """Where a pairing is in its life."""

    PENDING = "pending"
    APPROVED = "approved"
    CONSUMED = "consumed"


@dataclass(frozen=True)
class Pairing:
    """A pairing as stored: never the device code itself, only its sha256 hex."""

    device_hash: str
    user_code: str
    """Canonical form, ``XXXX-XXXX``."""
    device_name: str
    created_at: datetime
    expires_at: datetime
    status: PairingStatus = PairingStatus.PENDING
    team_id: str | None = None
    """The approving team (set on approval)."""

    def expired(self, now: datetime) -> bool:
        """Whether the pairing is past its expiry at ``now``."""
        return now >= self.expires_at


class PairingError(Exception):
    """A pairing rule refused the request; ``status``/``code``/``rule`` say how to answer."""

    status = 400
    code = "pairing_error"
    rule: str | None = None


class PairingExpiredError(PairingError):
    """The pairing expired before it was approved or collected."""

    status = 410
    code = "expired"
    rule = "expired"


class PairingApprovedError(PairingError):
    """The pairing was approved already (a user code approves once)."""

    status = 409
    code = "conflict"
    rule = "already_approved"


class TooManyPairingsError(PairingError):
    """Too many pairings are pending; new ones are refused until some finish or expire."""

    status = 429
    code = "too_many_pairings"


# ------------------------------------------------------------------ codes


def new_device_code() -> str:
    """A fresh device code: 43 URL-safe characters (256 bits)."""
    return secrets.token_urlsafe(32)


def new_user_code() -> str:
    """A fresh user code like ``AB7K-PNQ3``."""
    chars = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return f"{chars[:4]}-{chars[4:]}"


def normalise_user_code(typed: str) -> str | None:
    """The canonical ``XXXX-XXXX`` form of a typed user code, or None if it cannot be one.

    Case, dashes and whitespace are ignored: ``ab7k pnq3``, ``AB7KPNQ3`` and ``ab7k-pnq3``
    all read ``AB7K-PNQ3``.
    """
    chars = "".join(ch for ch in typed.upper() if ch != "-" and not ch.isspace())
    if len(chars) != USER_CODE_LENGTH or any(ch not in USER_CODE_ALPHABET for ch in chars):
        return None
    return f"{chars[:4]}-{chars[4:]}"


def parse_user_code(typed: str) -> str:
    """Like :func:`normalise_user_code`, but raise ``LookupError`` for a non-code."""
    canonical = normalise_user_code(typed)
    if canonical is None:
        raise LookupError(f"no pairing has user code {typed.strip()}")
    return canonical


# ------------------------------------------------------------------ rules


def check_approve(pairing: Pairing | None, user_code: str, now: datetime) -> Pairing:
    """Return ``pairing`` if it may be approved now; raise otherwise.

    Raises ``LookupError`` (no such pairing), :class:`PairingApprovedError` (approved or
    consumed already) or :class:`PairingExpiredError` (pending but expired).
    """
    if pairing is None:
        raise LookupError(f"no pairing has user code {user_code}")
    if pairing.status is not PairingStatus.PENDING:
        raise PairingApprovedError(f"user code {user_code} was already approved")
    if pairing.expired(now):
        raise PairingExpiredError(f"user code {user_code} has expired")
    return pairing


def check_poll(pairing: Pairing | None, now: datetime) -> Pairing:
    """Return ``pairing`` if a poll may see it (pending or approved); raise otherwise.

    Raises ``LookupError`` for an unknown or already collected pairing (the keys are
    handed out once) and :class:`PairingExpiredError` past its expiry.
    """
    if pairing is None or pairing.status is PairingStatus.CONSUMED:
        raise LookupError("unknown or already used device_code")
    if pairing.expired(now):
        raise PairingExpiredError("the device_code has expired; start pairing again")
    return pairing


def check_capacity(pending: int, limit: int) -> None:
    """Refuse a new pairing when ``pending`` (unexpired) pairings reach ``limit``."""
    if pending >= limit:
        raise TooManyPairingsError("too many pairings in progress; try again later")
