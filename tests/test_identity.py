from __future__ import annotations

import datetime as dt
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser, UnauthenticatedUser
from starlette.datastructures import State
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import ConfigurationError
from lago_org_billing._identity import (
    SCOPE_KEY,
    Identity,
    call_resolver,
    default_identity,
    default_org_resolver,
    default_user_resolver,
    first_of,
    from_header,
    from_jwt_claim,
    from_state,
    from_user,
    get_current_org,
    get_current_user,
    reset_warnings,
    resolve_now,
)
from lago_org_billing._settings import BillingSettings

pytestmark = pytest.mark.anyio

SECRET = "test-secret-that-is-long-enough-for-hs256"


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    """Each test starts with no resolver error already reported."""
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, bytes]:
    """A fresh RSA key pair (private PEM, public PEM)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def make_scope(headers: dict[str, str] | list[tuple[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items],
    }
    scope.update(extra)
    return scope


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs_token(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


class OrgUser(SimpleUser):
    def __init__(self, username: str, org_id: Any) -> None:
        super().__init__(username)
        self.org_id = org_id


class PartialUser(BaseUser):
    """A custom user that does not implement ``identity``."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id

    @property
    def is_authenticated(self) -> bool:
        return True


# -- from_state ---------------------------------------------------------------------------------------------------


async def test_from_state_reads_the_state_dict() -> None:
    """request.state values live in scope["state"], which from_state reads."""
    assert "acme" == await call_resolver(from_state(), make_scope(state={"org_id": "acme"}))
    assert "u1" == await call_resolver(from_state("user_id"), make_scope(state={"user_id": "u1"}))


async def test_from_state_sees_values_set_through_request_state() -> None:
    """A value set with request.state.org_id = ... is found."""
    scope = make_scope()
    Request(scope).state.org_id = "acme"
    assert "acme" == from_state()(scope)


async def test_from_state_accepts_a_state_object_and_cleans_values() -> None:
    """A State object works; ints become strings; blanks are stripped; empty means unresolved."""
    state = State()
    state.org_id = 42
    assert "42" == from_state()(make_scope(state=state))
    assert "acme" == from_state()(make_scope(state={"org_id": "  acme "}))
    assert from_state()(make_scope(state={"org_id": ""})) is None
    assert resolve_now(from_state(), make_scope(state={"org_id": True})) is None  # (not an id: said, unresolved)
    assert from_state()(make_scope()) is None
    assert from_state()(make_scope(state={})) is None


# -- from_user ----------------------------------------------------------------------------------------------------


async def test_from_user_reads_an_attribute_of_the_authenticated_user() -> None:
    """scope["user"].org_id is the org."""
    assert "acme" == from_user()(make_scope(user=OrgUser("ann", "acme")))


async def test_from_user_ignores_unauthenticated_and_missing_users() -> None:
    """No user, an unauthenticated user, or a missing attribute resolve to None."""
    assert from_user()(make_scope()) is None
    assert from_user("identity")(make_scope(user=UnauthenticatedUser())) is None
    assert from_user()(make_scope(user=SimpleUser("ann"))) is None


async def test_from_user_reads_mappings_and_tries_attributes_in_order() -> None:
    """Mapping users use keys; a tuple of names is tried in order, skipping NotImplementedError."""
    assert "o1" == from_user()(make_scope(user={"org_id": "o1"}))
    assert "sub-1" == from_user(("id", "sub"))(make_scope(user={"sub": "sub-1"}))
    assert "u7" == from_user(("identity", "user_id"))(make_scope(user=PartialUser("u7")))


# -- from_header --------------------------------------------------------------------------------------------------


async def test_from_header_reads_the_named_header_case_insensitively() -> None:
    """The header name is matched without regard to case."""
    resolver = from_header("X-Org-Id")
    assert "acme" == resolver(make_scope({"x-org-id": "acme"}))
    assert resolver(make_scope({"x-other": "acme"})) is None


@pytest.mark.parametrize("value", ["", "   ", "a" * 256, "acme\x00", "ac\nme", "acme\x7f"])
async def test_from_header_rejects_invalid_values(value: str) -> None:
    """Empty, too long or control-character values are unresolved."""
    assert from_header("X-Org-Id")(make_scope({"X-Org-Id": value})) is None


async def test_from_header_accepts_the_maximum_length() -> None:
    """A 255-character id is accepted."""
    assert "a" * 255 == from_header("X-Org-Id")(make_scope({"X-Org-Id": "a" * 255}))


async def test_from_header_refuses_conflicting_repeated_headers() -> None:
    """Two different values are ambiguous; the same value twice is fine."""
    resolver = from_header("X-Org-Id")
    assert resolver(make_scope([("X-Org-Id", "a"), ("X-Org-Id", "b")])) is None
    assert "a" == resolver(make_scope([("X-Org-Id", "a"), ("X-Org-Id", "a")]))


async def test_from_header_refuses_values_a_proxy_joined_with_commas(caplog: pytest.LogCaptureFixture) -> None:
    """RFC 9110 lets a proxy join repeated headers with commas: ``acme, other`` is two ids (ambiguous: None, said once
    with the fix), not the customer ``"acme, other"``; one id repeated is that id."""
    resolver = from_header("X-Org-Id")
    with caplog.at_level("WARNING", logger="lago_org_billing"):
        assert resolver(make_scope({"X-Org-Id": "acme, other"})) is None
        assert resolver(make_scope({"X-Org-Id": "acme,other"})) is None
    assert "acme" == resolver(make_scope({"X-Org-Id": "acme, acme"}))
    assert "acme" == resolver(make_scope({"X-Org-Id": " acme ,"}))
    assert resolver(make_scope({"X-Org-Id": ","})) is None
    said = [r.getMessage() for r in caplog.records if "comma-separated" in r.getMessage()]
    assert len(said) <= 1 and all("Send the header once" in message for message in said)


async def test_from_header_needs_a_name() -> None:
    """An empty header name is a configuration error."""
    with pytest.raises(ConfigurationError):
        from_header(" ")


async def test_from_header_membership_check_sync() -> None:
    """A sync membership check gets the scope and the org; False rejects."""
    seen: list[tuple[str, str]] = []

    def check(scope: Scope, org_id: str) -> bool:
        seen.append((scope["path"], org_id))
        return org_id == "member-org"

    resolver = from_header("X-Org-Id", membership_check=check)
    assert "member-org" == await call_resolver(resolver, make_scope({"X-Org-Id": "member-org"}))
    assert await call_resolver(resolver, make_scope({"X-Org-Id": "other-org"})) is None
    assert [("/", "member-org"), ("/", "other-org")] == seen


async def test_from_header_membership_check_async_and_not_called_without_header() -> None:
    """An async membership check is awaited, and skipped when the header is absent."""
    calls: list[str] = []

    async def check(scope: Scope, org_id: str) -> bool:
        calls.append(org_id)
        return org_id.startswith("ok")

    resolver = from_header("X-Org-Id", membership_check=check)
    assert "ok-1" == await call_resolver(resolver, make_scope({"X-Org-Id": "ok-1"}))
    assert await call_resolver(resolver, make_scope({"X-Org-Id": "no-1"})) is None
    assert await call_resolver(resolver, make_scope()) is None
    assert ["ok-1", "no-1"] == calls


async def test_from_header_membership_check_must_say_true() -> None:
    """A truthy non-bool answer (e.g. a forgotten await result object) does not admit the org."""
    resolver = from_header("X-Org-Id", membership_check=lambda scope, org: "yes")  # type: ignore[arg-type,return-value]
    assert await call_resolver(resolver, make_scope({"X-Org-Id": "acme"})) is None


# -- from_jwt_claim -----------------------------------------------------------------------------------------------


async def test_jwt_hs256_valid_token() -> None:
    """A valid HS256 token yields its claim."""
    resolver = from_jwt_claim(key=SECRET)
    token = hs_token({"org_id": "acme", "sub": "u1"})
    assert "acme" == await call_resolver(resolver, make_scope(bearer(token)))
    assert "u1" == await call_resolver(from_jwt_claim("sub", key=SECRET), make_scope(bearer(token)))


async def test_jwt_invalid_tokens_resolve_to_none() -> None:
    """Wrong signature, garbage, wrong scheme, missing claim or header: unresolved."""
    resolver = from_jwt_claim(key=SECRET)
    assert (
        resolver(make_scope(bearer(hs_token({"org_id": "acme"}, secret="another-secret-long-enough-xxxxxx")))) is None
    )
    assert resolver(make_scope(bearer("not.a.token"))) is None
    assert resolver(make_scope({"Authorization": "Basic " + hs_token({"org_id": "acme"})})) is None
    assert resolver(make_scope({"Authorization": "Bearer "})) is None
    assert resolver(make_scope(bearer(hs_token({"sub": "u1"})))) is None
    assert resolver(make_scope()) is None


async def test_jwt_expired_token_resolves_to_none() -> None:
    """An expired token is rejected; one still valid is accepted."""
    now = dt.datetime.now(dt.timezone.utc)
    resolver = from_jwt_claim(key=SECRET)
    expired = hs_token({"org_id": "acme", "exp": now - dt.timedelta(minutes=5)})
    fresh = hs_token({"org_id": "acme", "exp": now + dt.timedelta(minutes=5)})
    assert resolver(make_scope(bearer(expired))) is None
    assert "acme" == resolver(make_scope(bearer(fresh)))


async def test_jwt_audience_and_issuer_are_checked() -> None:
    """Audience and issuer must match when configured."""
    resolver = from_jwt_claim(key=SECRET, audience="billing", issuer="https://auth.example")
    good = hs_token({"org_id": "acme", "aud": "billing", "iss": "https://auth.example"})
    wrong_aud = hs_token({"org_id": "acme", "aud": "other", "iss": "https://auth.example"})
    wrong_iss = hs_token({"org_id": "acme", "aud": "billing", "iss": "https://evil.example"})
    assert "acme" == resolver(make_scope(bearer(good)))
    assert resolver(make_scope(bearer(wrong_aud))) is None
    assert resolver(make_scope(bearer(wrong_iss))) is None


async def test_jwt_rs256_valid_and_forged(rsa_keys: tuple[bytes, bytes]) -> None:
    """RS256 verifies with the public key; an HS256 token signed with the public key (alg confusion) fails."""
    private_pem, public_pem = rsa_keys
    resolver = from_jwt_claim(key=public_pem)
    token = jwt.encode({"org_id": "acme"}, private_pem, algorithm="RS256")
    assert "acme" == resolver(make_scope(bearer(token)))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"org_id": "acme"}, other, algorithm="RS256")
    assert resolver(make_scope(bearer(forged))) is None
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    payload = jwt.utils.base64url_encode(b'{"org_id":"acme"}')
    import hashlib
    import hmac

    signature = hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest()
    confused = b".".join([header, payload, jwt.utils.base64url_encode(signature)]).decode()
    assert resolver(make_scope(bearer(confused))) is None


async def test_jwt_configuration_errors(rsa_keys: tuple[bytes, bytes]) -> None:
    """'none', an empty key or algorithms that cannot use the key are refused at configuration time."""
    with pytest.raises(ConfigurationError, match="none"):
        from_jwt_claim(key=SECRET, algorithms=("none",))
    with pytest.raises(ConfigurationError):
        from_jwt_claim(key="")
    with pytest.raises(ConfigurationError, match="PEM"):
        from_jwt_claim(key=rsa_keys[1], algorithms=("HS256",))
    with pytest.raises(ConfigurationError, match="HMAC"):
        from_jwt_claim(key=SECRET, algorithms=("RS256",))


async def test_jwt_is_verified_once_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Org and user resolved from the same token verify it once."""
    calls: list[str] = []
    real_decode = jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    scope = make_scope(bearer(hs_token({"org_id": "acme", "sub": "u1"})))
    assert "acme" == from_jwt_claim(key=SECRET)(scope)
    assert "u1" == from_jwt_claim("sub", key=SECRET)(scope)
    assert 1 == len(calls)


async def test_jwt_custom_header() -> None:
    """The token can come from another header."""
    resolver = from_jwt_claim(key=SECRET, header="X-Auth")
    assert "acme" == resolver(make_scope({"X-Auth": "Bearer " + hs_token({"org_id": "acme"})}))


# -- first_of and call_resolver ----------------------------------------------------------------------------------


async def test_first_of_returns_the_first_match_in_order() -> None:
    """Earlier resolvers win; None falls through."""
    order: list[str] = []

    def make(name: str, value: str | None) -> Any:
        def resolver(scope: Scope) -> str | None:
            order.append(name)
            return value

        return resolver

    resolver = first_of(make("a", None), make("b", "org-b"), make("c", "org-c"))
    assert "org-b" == resolver(make_scope())
    assert ["a", "b"] == order
    assert first_of(make("d", None))(make_scope()) is None
    assert first_of()(make_scope()) is None


async def test_first_of_stays_sync_until_an_async_resolver() -> None:
    """All-sync chains return values directly; an async one makes the result awaitable and keeps the order."""

    async def async_none(scope: Scope) -> str | None:
        return None

    async def async_org(scope: Scope) -> str | None:
        return "async-org"

    sync_chain = first_of(from_state(), from_header("X-Org-Id"))
    assert "h" == sync_chain(make_scope({"X-Org-Id": "h"}))
    mixed = first_of(async_none, from_state(), async_org)
    pending = mixed(make_scope())
    assert inspect.isawaitable(pending)
    assert "async-org" == await pending
    assert "s" == await call_resolver(mixed, make_scope(state={"org_id": "s"}))


async def test_call_resolver_runs_sync_and_async_callables_and_cleans_output() -> None:
    """Sync and async callables work; ints become strings, odd types become None."""

    async def async_resolver(scope: Scope) -> Any:
        return 7

    assert "7" == await call_resolver(async_resolver, make_scope())
    assert "x" == await call_resolver(lambda scope: " x ", make_scope())
    assert await call_resolver(lambda scope: ["x"], make_scope()) is None  # type: ignore[arg-type,return-value]


async def test_call_resolver_logs_errors_once_and_returns_none(caplog: pytest.LogCaptureFixture) -> None:
    """A failing resolver leaves the request unresolved, with one ERROR and traceback per error kind."""

    def broken(scope: Scope) -> str | None:
        raise RuntimeError("db down")

    caplog.set_level(logging.DEBUG, logger="lago_org_billing.identity")
    assert await call_resolver(broken, make_scope()) is None
    assert await call_resolver(broken, make_scope()) is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert 1 == len(errors)
    # the traceback as text (the exception's frames held the scope: error trackers ship a record's exception locals)
    assert errors[0].exc_info is None
    assert "broken" in errors[0].getMessage()
    assert 'raise RuntimeError("db down")' in errors[0].getMessage()


async def test_first_of_propagates_errors_instead_of_falling_through(caplog: pytest.LogCaptureFixture) -> None:
    """A broken strong resolver does not silently hand over to a weaker header resolver."""

    def broken(scope: Scope) -> str | None:
        raise RuntimeError("auth backend down")

    resolver = first_of(broken, from_header("X-Org-Id"))
    with pytest.raises(RuntimeError):
        resolver(make_scope({"X-Org-Id": "spoofed"}))
    with caplog.at_level(logging.ERROR, logger="lago_org_billing.identity"):
        assert await call_resolver(resolver, make_scope({"X-Org-Id": "spoofed"})) is None


# -- defaults -----------------------------------------------------------------------------------------------------


async def test_default_org_resolver_priority_and_opt_in_header() -> None:
    """State beats user beats header; the header is only read when LAGO_ORG_HEADER is set."""
    with_header = default_org_resolver(BillingSettings(org_header="X-Org-Id"))
    without_header = default_org_resolver(BillingSettings())
    full = make_scope({"X-Org-Id": "h"}, state={"org_id": "s"}, user=OrgUser("ann", "u"))
    assert "s" == await call_resolver(with_header, full)
    assert "u" == await call_resolver(with_header, make_scope({"X-Org-Id": "h"}, user=OrgUser("ann", "u")))
    assert "h" == await call_resolver(with_header, make_scope({"X-Org-Id": "h"}))
    assert await call_resolver(without_header, make_scope({"X-Org-Id": "h"})) is None


async def test_default_user_resolver() -> None:
    """State, then the user's identity/id, then LAGO_USER_HEADER when set."""
    resolver = default_user_resolver(BillingSettings(user_header="X-User-Id"))
    assert "s" == await call_resolver(resolver, make_scope(state={"user_id": "s"}, user=SimpleUser("ann")))
    assert "ann" == await call_resolver(resolver, make_scope(user=SimpleUser("ann")))
    assert "u9" == await call_resolver(resolver, make_scope(user={"id": "u9"}))

    class SimpleUserBefore17(SimpleUser):  # Starlette's SimpleUser has an identity only from 1.7
        @property
        def identity(self) -> str:
            raise NotImplementedError

    assert "bob" == await call_resolver(resolver, make_scope(user=SimpleUserBefore17("bob")))
    assert "h" == await call_resolver(resolver, make_scope({"X-User-Id": "h"}, user=UnauthenticatedUser()))
    assert await call_resolver(default_user_resolver(BillingSettings()), make_scope({"X-User-Id": "h"})) is None


# -- downstream access --------------------------------------------------------------------------------------------


async def test_get_current_org_and_user_from_scope_or_request() -> None:
    """The helpers read the billing dict from a scope or a Request; outside the middleware they return None."""
    scope = make_scope()
    scope[SCOPE_KEY] = {"org_id": "acme", "user_id": "u1"}
    assert "acme" == get_current_org(scope)
    assert "u1" == get_current_user(Request(scope))
    assert get_current_org(make_scope()) is None
    assert get_current_user(Request(make_scope())) is None
    assert get_current_org(object()) is None


async def test_identity_is_a_frozen_value() -> None:
    """Identity compares by value and cannot be mutated."""
    assert Identity("a", "u") == Identity("a", "u")
    assert Identity("a").user_id is None
    with pytest.raises(AttributeError):
        Identity("a").org_id = "b"  # type: ignore[misc]


class TokenBackend(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("x-test-user")
        if name is None:
            return None
        return AuthCredentials(["authenticated"]), OrgUser(name, f"org-of-{name}")


class ResolvingMiddleware:
    """Test stand-in for the billing middleware: resolves the identity and publishes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        settings = BillingSettings()
        self.resolve_org = default_org_resolver(settings)
        self.resolve_user = default_user_resolver(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            org_id = await call_resolver(self.resolve_org, scope)
            user_id = await call_resolver(self.resolve_user, scope)
            scope[SCOPE_KEY] = {"org_id": org_id, "user_id": user_id}
        await self.app(scope, receive, send)


async def test_end_to_end_with_starlette_authentication() -> None:
    """Behind AuthenticationMiddleware the org comes from request.user and reaches the endpoint."""

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"org": get_current_org(request), "user": get_current_user(request)})

    app = Starlette(
        routes=[Route("/whoami", whoami)],
        middleware=[Middleware(AuthenticationMiddleware, backend=TokenBackend()), Middleware(ResolvingMiddleware)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        known = await client.get("/whoami", headers={"x-test-user": "ann"})
        anonymous = await client.get("/whoami")
    assert {"org": "org-of-ann", "user": "ann"} == known.json()
    assert {"org": None, "user": None} == anonymous.json()


# -- default_identity: the middleware's one-pass version of the default resolvers ----------------------------------

_IDENTITY_SCOPES = [
    make_scope({"X-Org-Id": "acme", "X-User-Id": "ada"}),
    make_scope({"X-Org-Id": " acme ", "X-Other": "x"}),
    make_scope(),
    make_scope({"X-User-Id": "ada"}),
    make_scope({"X-User-Id": "ada"}, state={"org_id": "from_state"}),
    make_scope({"X-Org-Id": "acme", "X-User-Id": "ada"}, state={"org_id": "s_org", "user_id": "s_user"}),
    make_scope([("X-Org-Id", "acme"), ("X-Org-Id", "other")]),
    make_scope([("X-Org-Id", "acme"), ("X-Org-Id", "acme"), ("X-User-Id", "a"), ("X-User-Id", "b")]),
    make_scope({"X-Org-Id": "ac\nme", "X-User-Id": "ada"}),
    make_scope({"X-Org-Id": "a" * 256}),
    make_scope({"X-Org-Id": "acme", "X-User-Id": "   "}, state={}),
    make_scope({"X-Org-Id": "acme"}, state={"org_id": 42, "user_id": True}),
    # another header repeated (read by one pass rather than a dict of them), and headers as a tuple
    make_scope([("Accept", "a"), ("X-Org-Id", "acme"), ("Accept", "b"), ("X-User-Id", "ada")]),
    {**make_scope(), "headers": ((b"x-org-id", b"acme"), (b"x-user-id", b"ada"))},
    # joined by a proxy from repeated headers: different ids are ambiguous, one id repeated is that id
    make_scope({"X-Org-Id": "acme, other", "X-User-Id": "ada"}),
    make_scope({"X-Org-Id": "acme, acme", "X-User-Id": "ada,bob"}),
    make_scope({"X-Org-Id": "acme,", "X-User-Id": " ada , ada "}),
]


@pytest.mark.parametrize("org_header, user_header", [("X-Org-Id", "X-User-Id"), ("X-Org-Id", None), (None, None)])
@pytest.mark.parametrize("scope", _IDENTITY_SCOPES)
def test_default_identity_matches_the_default_resolvers(
    scope: dict[str, Any], org_header: str | None, user_header: str | None
) -> None:
    """Same org and user as default_org_resolver/default_user_resolver (the user only with an org)."""
    settings = BillingSettings(api_key="k", org_header=org_header, user_header=user_header)
    org = resolve_now(default_org_resolver(settings), scope)
    user = resolve_now(default_user_resolver(settings), scope) if org is not None else None
    assert default_identity(settings)(scope) == (org, user)


def test_default_identity_with_one_header_for_org_and_user() -> None:
    settings = BillingSettings(api_key="k", org_header="X-Tenant", user_header="x-tenant")
    assert default_identity(settings)(make_scope({"X-Tenant": "acme"})) == ("acme", "acme")


def test_default_identity_leaves_unusual_scopes_to_the_resolvers() -> None:
    """An authenticated user or a state object: None, so the middleware runs the resolvers themselves."""
    settings = BillingSettings(api_key="k", org_header="X-Org-Id")
    identify = default_identity(settings)
    assert identify(make_scope({"X-Org-Id": "acme"}, user=SimpleUser("ada"))) is None
    assert identify(make_scope({"X-Org-Id": "acme"}, state=State({"org_id": "s"}))) is None
