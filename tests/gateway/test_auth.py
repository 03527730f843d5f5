"""Credentials, JWTs and surfaces (``gateway.auth``)."""

from __future__ import annotations

import hashlib
import string
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth import (
    PREFIXES,
    AuthError,
    CredentialKind,
    Principal,
    StoredCredential,
    Surface,
    authenticate,
    generate_secret,
    hash_secret,
    issue_jwt,
    kind_of,
    verify_secret,
)

TEAM = "team-a"
KEY = b"k" * 32
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
INTEGRATION, DEVICE, AGENT = CredentialKind.INTEGRATION, CredentialKind.DEVICE, CredentialKind.AGENT


class Store:
    """An in-memory credential store keyed by secret hash."""

    def __init__(self) -> None:
        """Start empty."""
        self.by_hash: dict[str, StoredCredential] = {}
        self.seen: list[str] = []

    def add(self, kind: CredentialKind, *, revoked: bool = False, team: str = TEAM) -> str:
        """Mint and store a credential; return its secret."""
        secret, prefix, digest = generate_secret(kind)
        cred_id = f"cred-{len(self.by_hash) + 1}"
        self.by_hash[digest] = StoredCredential(cred_id, team, kind, prefix, revoked)
        return secret

    def lookup(self, digest: str) -> StoredCredential | None:
        """Find by hash, remembering what was asked."""
        self.seen.append(digest)
        return self.by_hash.get(digest)


def auth(
    store: Store,
    token: str | None,
    surface: Surface = "rest",
    team: str | None = None,
    now: datetime = T0,
) -> Principal:
    """Authenticate ``Bearer <token>`` (or no header when None) against ``store``."""
    header = None if token is None else f"Bearer {token}"
    return authenticate(header, team, surface=surface, lookup=store.lookup, jwt_key=KEY, now=now)


def refused(
    store: Store,
    token: str | None,
    surface: Surface = "rest",
    team: str | None = None,
    now: datetime = T0,
) -> AuthError:
    """Return the AuthError an authentication raises."""
    with pytest.raises(AuthError) as caught:
        auth(store, token, surface, team, now)
    return caught.value


# ------------------------------------------------------------------ secrets


@pytest.mark.parametrize("kind", list(CredentialKind))
def test_generate_secret_has_prefix_display_prefix_and_sha256(kind: CredentialKind) -> None:
    """A minted secret is prefix + 43 url-safe chars; the display prefix and hash match it."""
    secret, display, digest = generate_secret(kind)
    assert secret.startswith(PREFIXES[kind])
    assert len(secret) == 3 + 43
    assert set(secret[3:]) <= set(string.ascii_letters + string.digits + "-_")
    assert display == secret[:10]
    assert digest == hashlib.sha256(secret.encode()).hexdigest() == hash_secret(secret)
    assert kind_of(secret) is kind
    assert generate_secret(kind)[0] != secret


def test_prefixes_are_the_documented_ones() -> None:
    """sk- is integration, dk- device, ak- agent; anything else has no kind."""
    assert PREFIXES == {INTEGRATION: "sk-", DEVICE: "dk-", AGENT: "ak-"}
    assert kind_of("sk-x") is INTEGRATION
    assert kind_of("dk-x") is DEVICE
    assert kind_of("ak-x") is AGENT
    assert kind_of("eyJhbGciOiJIUzI1NiJ9.e30.x") is None
    assert kind_of("DK-x") is None


def test_verify_secret_compares_against_the_stored_hash() -> None:
    """``verify_secret`` accepts the secret of a hash and nothing else."""
    secret, _, digest = generate_secret(DEVICE)
    assert verify_secret(secret, digest)
    assert not verify_secret(secret + "x", digest)


# ------------------------------------------------------------------ kinds x surfaces


@pytest.mark.parametrize(
    ("kind", "surface", "allowed"),
    [
        (INTEGRATION, "rest", True),
        (INTEGRATION, "agent", False),
        (DEVICE, "rest", True),
        (DEVICE, "agent", True),
        (AGENT, "rest", False),
        (AGENT, "agent", True),
    ],
)
def test_each_kind_on_each_surface(kind: CredentialKind, surface: Surface, allowed: bool) -> None:
    """sk- is REST only, ak- agent only, dk- both; a refusal is 403 naming the surface."""
    store = Store()
    secret = store.add(kind)
    if allowed:
        assert auth(store, secret, surface) == Principal(TEAM, kind, "cred-1")
    else:
        err = refused(store, secret, surface)
        assert err.status == 403
        assert PREFIXES[kind] in err.message


def test_agent_key_on_rest_says_it_is_for_the_agent_connection() -> None:
    """An ak- key on REST is 403 with a message saying agent keys are for the agent only."""
    store = Store()
    err = refused(store, store.add(AGENT), "rest")
    assert err.status == 403
    assert "agent connection only" in err.message


@pytest.mark.parametrize("kind", [INTEGRATION, DEVICE])
def test_credentials_ignore_x_team_id(kind: CredentialKind) -> None:
    """sk-/dk- take their team from the credential; any X-Team-ID is ignored."""
    store = Store()
    principal = auth(store, store.add(kind), "rest", team="team-b")
    assert principal.team_id == TEAM


def test_lookup_receives_the_sha256_not_the_secret() -> None:
    """The store is asked for the hash of the secret, never the secret itself."""
    store = Store()
    secret = store.add(DEVICE)
    auth(store, secret)
    assert store.seen == [hash_secret(secret)]


@pytest.mark.parametrize("surface", ["rest", "agent"])
def test_unknown_and_revoked_credentials_are_the_same_401(surface: Surface) -> None:
    """Unknown and revoked credentials get one 401 message, whatever the surface."""
    store = Store()
    revoked = store.add(DEVICE, revoked=True)
    unknown = generate_secret(DEVICE)[0]
    first, second = refused(store, revoked, surface), refused(store, unknown, surface)
    assert (first.status, second.status) == (401, 401)
    assert first.message == second.message


def test_unknown_credential_of_a_refused_kind_is_401_not_403() -> None:
    """Authentication comes first: an unknown sk- on the agent surface is 401."""
    assert refused(Store(), generate_secret(INTEGRATION)[0], "agent").status == 401


def test_stored_kind_must_match_the_prefix() -> None:
    """A hash that maps to a credential of another kind is refused as invalid."""
    store = Store()
    secret = "dk-" + "x" * 43
    store.by_hash[hash_secret(secret)] = StoredCredential(
        "c", TEAM, AGENT, "dk-xxxxxxx", revoked=False
    )
    assert refused(store, secret, "agent").status == 401


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dk-abc", "dk-abc", "Bearer dk-a b", "Token x"],
)
def test_missing_or_malformed_authorization_is_401(header: str | None) -> None:
    """No header, another scheme or an empty/spaced credential is 401 on Authorization."""
    with pytest.raises(AuthError) as caught:
        authenticate(header, None, surface="rest", lookup=Store().lookup, jwt_key=KEY, now=T0)
    assert (caught.value.status, caught.value.field) == (401, "Authorization")


def test_bearer_scheme_is_case_insensitive() -> None:
    """``bearer`` in any case introduces the credential."""
    store = Store()
    secret = store.add(DEVICE)
    principal = authenticate(
        f"bEaReR {secret}", None, surface="rest", lookup=store.lookup, jwt_key=KEY
    )
    assert principal.kind is DEVICE


# ------------------------------------------------------------------ JWT


def token(
    teams: list[str] | None = None, *, ttl_s: int = 3600, key: bytes = KEY, now: datetime = T0
) -> str:
    """Issue a user token for ``user-1``."""
    return issue_jwt("user-1", [TEAM] if teams is None else teams, key, ttl_s=ttl_s, now=now)


def test_jwt_with_x_team_id_of_one_of_its_teams_is_a_user() -> None:
    """A valid JWT plus X-Team-ID of one of its teams authenticates as that user and team."""
    principal = auth(Store(), token([TEAM, "team-b"]), team="team-b")
    assert principal == Principal(team_id="team-b", kind="user", subject="user-1")


@pytest.mark.parametrize("team", [None, "", "  "])
def test_jwt_without_x_team_id_is_400_naming_the_header(team: str | None) -> None:
    """A JWT without X-Team-ID is 400 on field X-Team-ID, and the message names it."""
    err = refused(Store(), token(), team=team)
    assert (err.status, err.field) == (400, "X-Team-ID")
    assert "X-Team-ID" in err.message


def test_jwt_for_another_team_is_403() -> None:
    """X-Team-ID naming a team the token lacks is 403."""
    err = refused(Store(), token(), team="team-b")
    assert err.status == 403


def test_jwt_on_the_agent_surface_is_403() -> None:
    """User tokens are refused on the agent WebSocket with 403."""
    err = refused(Store(), token(), "agent", team=TEAM)
    assert err.status == 403
    assert "agent connection" in err.message


def test_expired_jwt_is_401() -> None:
    """A token past its exp is 401 (time taken from ``now``)."""
    issued = token(ttl_s=60)
    assert auth(Store(), issued, team=TEAM, now=T0 + timedelta(seconds=59)).kind == "user"
    err = refused(Store(), issued, team=TEAM, now=T0 + timedelta(seconds=60))
    assert (err.status, err.message) == (401, "token expired")


def test_jwt_signed_with_another_key_is_401() -> None:
    """A token with a bad signature is 401."""
    assert refused(Store(), token(key=b"x" * 32), team=TEAM).status == 401


def test_jwt_not_yet_valid_is_401() -> None:
    """A token whose nbf is in the future is 401."""
    claims = {"sub": "u", "exp": int(T0.timestamp()) + 600, "nbf": int(T0.timestamp()) + 60}
    err = refused(Store(), jwt.encode(claims, KEY, algorithm="HS256"), team=TEAM)
    assert err.status == 401


@pytest.mark.parametrize(
    ("claims", "algorithm"),
    [
        ({"sub": "u"}, "HS256"),  # no exp
        ({"exp": 2_000_000_000}, "HS256"),  # no sub
        ({"sub": "", "exp": 2_000_000_000}, "HS256"),
        ({"sub": 5, "exp": 2_000_000_000}, "HS256"),
        ({"sub": "u", "exp": "soon"}, "HS256"),
        ({"sub": "u", "exp": 2_000_000_000, "teams": "team-a"}, "HS256"),
        ({"sub": "u", "exp": 2_000_000_000, "teams": [1]}, "HS256"),
        ({"sub": "u", "exp": 2_000_000_000, "teams": ["team-a"]}, "HS512"),
    ],
)
def test_malformed_jwt_claims_or_algorithm_are_401(
    claims: dict[str, object], algorithm: str
) -> None:
    """Missing sub/exp, wrong claim types or another algorithm are 401."""
    presented = jwt.encode(claims, b"k" * 64 if algorithm == "HS512" else KEY, algorithm=algorithm)
    assert refused(Store(), presented, team=TEAM).status == 401


def test_unsigned_jwt_is_401() -> None:
    """An ``alg: none`` token is refused."""
    presented = jwt.encode({"sub": "u", "exp": 2_000_000_000, "teams": [TEAM]}, None, "none")
    assert refused(Store(), presented, team=TEAM).status == 401


def test_jwt_without_teams_grants_no_team() -> None:
    """A token with no teams claim is valid but grants no team (403)."""
    presented = jwt.encode({"sub": "u", "exp": 2_000_000_000}, KEY, algorithm="HS256")
    assert refused(Store(), presented, team=TEAM).status == 403


def test_jwt_checked_against_the_wall_clock_by_default() -> None:
    """Without ``now``, issuing and checking a token use the current time."""
    presented = issue_jwt("user-1", [TEAM], KEY)
    principal = authenticate(
        f"Bearer {presented}", TEAM, surface="rest", lookup=Store().lookup, jwt_key=KEY
    )
    assert principal.subject == "user-1"


def test_issue_jwt_sets_sub_teams_and_exp() -> None:
    """``issue_jwt`` signs sub, teams, iat and exp = now + ttl with HS256."""
    claims = jwt.decode(
        token(["t1", "t2"], ttl_s=120),
        KEY,
        algorithms=["HS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == "user-1"
    assert claims["teams"] == ["t1", "t2"]
    assert claims["exp"] == int(T0.timestamp()) + 120


# ------------------------------------------------------------------ properties

SECRET_TAIL = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=8, max_size=60
)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(["sk-", "dk-", "ak-"]),
    tail=SECRET_TAIL,
    stored=st.sampled_from([None, "live", "revoked", "other-kind"]),
    surface=st.sampled_from(["rest", "agent"]),
    team=st.none() | st.text(max_size=10),
)
def test_presented_secrets_never_appear_in_error_messages(
    prefix: str, tail: str, stored: str | None, surface: Surface, team: str | None
) -> None:
    """Whatever dk-/sk-/ak- string is presented, known or not, no error message contains it."""
    secret = prefix + tail
    store = Store()
    kind = kind_of(secret)
    assert kind is not None
    if stored is not None:
        stored_kind = AGENT if stored == "other-kind" and kind is not AGENT else kind
        store.by_hash[hash_secret(secret)] = StoredCredential(
            "c", TEAM, stored_kind, secret[:10], stored == "revoked"
        )
    outcome: Principal | AuthError
    try:
        outcome = auth(store, secret, surface, team)
    except AuthError as err:
        outcome = err
    if isinstance(outcome, AuthError):
        assert outcome.status in {400, 401, 403}
        assert secret not in str(outcome)
        assert secret.strip() not in outcome.message


@settings(max_examples=300, deadline=None)
@given(header=st.none() | st.text(max_size=80), surface=st.sampled_from(["rest", "agent"]))
def test_arbitrary_authorization_headers_only_raise_auth_error(
    header: str | None, surface: Surface
) -> None:
    """A random header against an empty store is refused with AuthError 400/401/403, never more."""
    outcome: Principal | AuthError
    try:
        outcome = authenticate(header, TEAM, surface=surface, lookup=Store().lookup, jwt_key=KEY)
    except AuthError as err:
        outcome = err
    assert isinstance(outcome, AuthError)
    assert outcome.status in {400, 401, 403}
