"""Identity edges (who a request is billed to): an org the app's auth sets while it runs, require_quota's org changed
by the app, scope["state"] objects, async resolvers dropped by get_current_org, JWT keys and options that could
never verify a token, header names that can never match, the 401 challenge."""

from __future__ import annotations

import gc
import types
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware, require_quota
from lago_org_billing._identity import (
    first_of,
    from_header,
    from_jwt_claim,
    from_state,
    get_current_org,
    reset_warnings,
    resolve_now,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    """The emulator with orgs ``org_a`` and ``org_b`` on a plan billing ``api_call``."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan(
        "starter",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}],
    )
    for org in ("org_a", "org_b"):
        fake_lago.add_subscription(org, "starter", external_id=org)
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


@pytest.fixture
async def make_middleware(
    fake_lago: Any, settings: BillingSettings
) -> AsyncIterator[Callable[..., OrgBillingMiddleware]]:
    made: list[OrgBillingMiddleware] = []

    def make(app: Any, **kwargs: Any) -> OrgBillingMiddleware:
        kwargs.setdefault("settings", settings)
        middleware = OrgBillingMiddleware(app, transport=fake_lago.transport(), **kwargs)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        await middleware.aclose()


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def billed(fake_lago: Any) -> list[str]:
    return [event["external_subscription_id"] for event in fake_lago.events]


# ------------------------------------------------------------------ which org is billed when the app sets it late


async def test_header_org_does_not_override_the_org_auth_sets_in_a_dependency(
    fake_lago: Any, settings: BillingSettings, make_middleware: Callable[..., OrgBillingMiddleware]
) -> None:
    """README: the org comes from ``request.state.org_id`` (your auth layer), *else* ``request.user.org_id``, *else*
    the opt-in ``LAGO_ORG_HEADER``; the README also documents auth in a FastAPI dependency (``require_quota``). With
    both, a client authenticated as ``org_b`` that sends ``X-Org-Id: org_a`` is billed (and gated) as ``org_a``:
    the header, resolved before the app ran, wins over the authenticated org the app set in ``request.state``, and
    ``get_current_org()`` tells the app ``org_a``.

    Observed: billed ``org_a``. Expected: ``org_b`` (the documented precedence: state before header)."""
    fastapi = pytest.importorskip("fastapi")

    def authenticate(request: Request) -> None:
        request.state.org_id = "org_b"  # the caller's verified org

    app = fastapi.FastAPI()

    @app.get("/v1/whoami", dependencies=[fastapi.Depends(authenticate)])
    async def whoami(request: Request) -> dict[str, Any]:
        return {"org": get_current_org(request)}

    middleware = make_middleware(app, settings=settings.replace(org_header="X-Org-Id"), quota=None)
    async with client_for(middleware) as client:
        response = await client.get("/v1/whoami", headers={"X-Org-Id": "org_a"})
    assert response.status_code == 200
    assert await middleware.pipeline.flush(5)
    assert billed(fake_lago) == ["org_b"]
    assert response.json() == {"org": "org_b"}


async def test_org_gated_by_require_quota_is_the_org_billed(
    fake_lago: Any, settings: BillingSettings, make_middleware: Callable[..., OrgBillingMiddleware]
) -> None:
    """``require_quota()`` reserves a call for ``org_a`` (and ``get_current_org()`` says ``org_a``); the endpoint then
    changes ``request.state.org_id`` (acting for another org). The middleware re-resolves when the app answers and
    bills ``org_b``, ungated, while ``org_a``'s reserved call is never settled: with a 1-call limit, ``org_a``'s next
    request is refused 429 though it was billed nothing.

    Observed: billed ``["org_b", ...]`` and the second request 429. Expected: the request is billed to the org it
    was gated (and published) as, and ``org_a``'s next call is allowed - or at least its reservation is released."""
    fastapi = pytest.importorskip("fastapi")

    def authenticate(request: Request) -> None:
        request.state.org_id = "org_a"

    app = fastapi.FastAPI()

    @app.get("/v1/act", dependencies=[fastapi.Depends(authenticate), fastapi.Depends(require_quota)])
    async def act(request: Request, switch: int = 0) -> dict[str, Any]:
        seen = get_current_org(request)
        if switch:
            request.state.org_id = "org_b"
        return {"org": seen}

    strict = settings.replace(quota_mode="enforce", plan_limits={"starter": {"max_api_calls": 1}})
    middleware = make_middleware(app, settings=strict)
    async with client_for(middleware) as client:
        first = await client.get("/v1/act?switch=1")
        assert first.json() == {"org": "org_a"}
        assert await middleware.pipeline.flush(5)
        second = await client.get("/v1/act")
    assert await middleware.pipeline.flush(5)
    if billed(fake_lago)[0] == "org_a":  # billed to the org it was gated and published as: its one call is used
        assert second.status_code == 429
    else:  # billed to the late org: org_a's reserved call must have been released, its call allowed
        assert (billed(fake_lago), second.status_code) == (["org_b", "org_a"], 200)


# ------------------------------------------------------------------------------------- scope["state"] objects


class ClassicState:
    """Starlette's ``State`` as it is up to at least 0.37 (the lowest version supported): attribute access only."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        super().__setattr__("_state", {} if state is None else state)

    def __setattr__(self, key: str, value: Any) -> None:
        self._state[key] = value

    def __getattr__(self, key: str) -> Any:
        try:
            return self._state[key]
        except KeyError:
            raise AttributeError(key) from None


class SetState:
    """An auth middleware that puts the caller's org in ``scope["state"]`` as an object (or read-only mapping)."""

    def __init__(self, app: Any, make: Callable[[], Any]) -> None:
        self.app = app
        self.make = make

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["state"] = self.make()
        await self.app(scope, receive, send)


@pytest.mark.parametrize(
    "make_state",
    [
        pytest.param(lambda: ClassicState({"org_id": "org_a"}), id="classic-starlette-State"),
        pytest.param(lambda: types.SimpleNamespace(org_id="org_a"), id="attribute-object"),
        pytest.param(lambda: types.MappingProxyType({"org_id": "org_a"}), id="read-only-mapping"),
    ],
)
async def test_state_object_in_scope_is_billed_not_a_500(
    fake_lago: Any, make_middleware: Callable[..., OrgBillingMiddleware], make_state: Callable[[], Any]
) -> None:
    """``from_state`` documents and tests non-dict states (``State`` objects read with ``getattr``, mappings), and
    ``default_identity`` hands "an unusual state" over to the resolvers. They resolve ``org_a``; then
    ``publish_identity`` does ``state["billing_org_id"] = ...`` on that object: TypeError, every request a 500.

    Observed: 500 (TypeError: ... does not support item assignment). Expected: 200, billed to ``org_a``."""

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    inner = Starlette(routes=[Route("/v1/ok", ok)])
    middleware = make_middleware(inner, quota=None)
    app = SetState(middleware, make_state)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/v1/ok")
    assert response.status_code == 200
    assert await middleware.pipeline.flush(5)
    assert billed(fake_lago) == ["org_a"]


# ----------------------------------------------------------------------- get_current_org with an async resolver


async def test_get_current_org_with_a_first_of_holding_an_async_resolver_leaves_no_unawaited_coroutine(
    fake_lago: Any, make_middleware: Callable[..., OrgBillingMiddleware]
) -> None:
    """``first_of(from_state(), from_header(..., membership_check=...))`` is the documented way to add a checked
    header; ``first_of`` is a plain function, so the middleware counts its resolvers as synchronous and lets
    ``get_current_org()`` re-run them during an unresolved request. The resolver then returns a coroutine, which
    ``_resolve_now`` closes unstarted: "coroutine ... was never awaited" RuntimeWarnings (unraisable, from the
    finalizer) for ``first_of.resume`` and the membership-checked header resolver. Under pytest's common
    ``filterwarnings = error`` a user's test of such an endpoint fails.

    Observed: two "was never awaited" RuntimeWarnings. Expected: none (the awaitable discarded quietly, or the
    resolver treated as async)."""

    async def member(scope: Any, org_id: str) -> bool:
        return False

    async def whoami(request: Request) -> Response:
        return JSONResponse({"org": get_current_org(request)})

    resolver = first_of(from_state(), from_header("X-Org-Id", membership_check=member))
    middleware = make_middleware(Starlette(routes=[Route("/whoami", whoami)]), quota=None, resolve_org=resolver)
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with client_for(middleware) as client:
            response = await client.get("/whoami", headers={"X-Org-Id": "org_a"})
        for _ in range(3):  # a recorded warning holds its coroutine (source=): drop it here, so that it is
            gc.collect()  # finalized inside this block, not as an unraisable error of a later test
            messages += [str(w.message) for w in caught]
            caught.clear()
    assert response.status_code == 200
    assert [message for message in messages if "never awaited" in message] == []


# ---------------------------------------------------------------------------------------------- from_jwt_claim


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_private() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_public(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _scope_with(token: str) -> dict[str, Any]:
    return {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}


def _works_or_refused_at_configuration(build: Callable[[], Any], token: str) -> None:
    """Either ``from_jwt_claim`` refuses the configuration with a ConfigurationError, or a valid token resolves."""
    try:
        resolver = build()
    except ConfigurationError:
        return
    assert resolve_now(resolver, _scope_with(token)) == "acme"


def test_jwt_ec_key_with_the_default_algorithms_is_a_configuration_error(ec_private: Any) -> None:
    """The docstring: "Algorithms that do not fit the key are dropped", and none fitting is a ConfigurationError.
    Only HMAC-vs-PEM is checked: an EC public key with the default ``("HS256", "RS256")`` keeps RS256, which can
    never verify with it. Every valid ES256 token is then unresolved (served unbilled, or 401 with reject), said
    only at DEBUG ("The specified alg value is not allowed").

    Observed: accepted, every token ``None``. Expected: ConfigurationError naming ES256."""
    with pytest.raises(ConfigurationError):
        from_jwt_claim(key=_pem_public(ec_private))


def test_jwt_certificate_pem_key_verifies_or_is_refused(rsa_private: Any) -> None:
    """Identity providers (Auth0's "signing certificate", Keycloak/ADFS x5c) hand out the RS256 key as an X.509
    certificate PEM. It passes the PEM check, then PyJWT cannot load it: every token unresolved, DEBUG only.

    Observed: accepted, a valid token resolves to ``None``. Expected: it verifies (load the certificate's public
    key) or ConfigurationError at construction."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_private.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1))
        .not_valid_after(dt.datetime(2040, 1, 1))
        .sign(rsa_private, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    token = jwt.encode({"org_id": "acme"}, rsa_private, algorithm="RS256")
    _works_or_refused_at_configuration(lambda: from_jwt_claim(key=pem), token)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"algorithms": "RS256"}, id="algorithms-as-a-string"),
        pytest.param({"algorithms": ("RS265",)}, id="unknown-algorithm-name"),
        pytest.param({"issuer": ["https://idp.test", "https://other.test"]}, id="issuer-list"),
    ],
)
def test_jwt_configuration_mistakes_are_refused_up_front(rsa_private: Any, options: dict[str, Any]) -> None:
    """Configurations that cannot verify anything are accepted, then every request is unresolved:
    ``algorithms="RS256"`` is iterated as characters ``R, S, 2, 5, 6``; an unknown name (typo) is kept; an
    ``issuer`` list (PyJWT accepts a container) makes the per-request cache key unhashable: TypeError in every
    request, logged as a resolver failure.

    Observed: accepted, a valid token resolves to ``None``. Expected: ConfigurationError at construction (or, for
    the issuer list, the token resolves)."""
    token = jwt.encode({"org_id": "acme", "iss": "https://idp.test"}, rsa_private, algorithm="RS256")
    _works_or_refused_at_configuration(lambda: from_jwt_claim(key=_pem_public(rsa_private), **options), token)


def test_jwt_private_key_given_as_the_verification_key(rsa_private: Any) -> None:
    """Given the PEM *private* key (a common slip in one-service setups), the PEM check passes and every token's
    verification raises AttributeError inside PyJWT ('RSA' object has no attribute 'verify'): each request
    unresolved, logged as a crashing resolver.

    Observed: accepted, a valid token resolves to ``None``. Expected: verifies with its public half, or
    ConfigurationError at construction."""
    pem = rsa_private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    token = jwt.encode({"org_id": "acme"}, rsa_private, algorithm="RS256")
    _works_or_refused_at_configuration(lambda: from_jwt_claim(key=pem), token)


# ------------------------------------------------------------------------------------------ header name checks


@pytest.mark.parametrize("name", ["X-Org-Id:", "X Org Id"])
def test_from_header_refuses_a_name_that_can_never_match(name: str) -> None:
    """``LAGO_ORG_HEADER`` refuses such names (CHANGELOG: "``X-Org-Id:`` never matched, silently"), but
    ``from_header()`` - the way to add a membership check - takes them: the resolver never finds the header.

    Observed: accepted. Expected: ConfigurationError, as for the setting."""
    with pytest.raises(ConfigurationError):
        from_header(name)


def test_from_jwt_claim_header_name_is_normalised_like_from_header() -> None:
    """``from_header(" X-Org-Id ")`` strips the name; ``from_jwt_claim(header=" Authorization ")`` does not, and
    silently never finds the token.

    Observed: ``None``. Expected: the token resolves (or ConfigurationError)."""
    secret = "test-secret-that-is-long-enough-for-hs256"
    token = jwt.encode({"org_id": "acme"}, secret, algorithm="HS256")
    _works_or_refused_at_configuration(lambda: from_jwt_claim(key=secret, header=" Authorization "), token)


# ------------------------------------------------------------------------------------------- the reject answer


async def test_unresolved_401_carries_a_www_authenticate_challenge(
    fake_lago: Any, make_middleware: Callable[..., OrgBillingMiddleware]
) -> None:
    """``on_unresolved="reject"`` answers 401 by default (``LAGO_UNRESOLVED_STATUS``). RFC 9110 15.5.2: a 401 MUST
    carry a ``WWW-Authenticate`` challenge; without one, clients and proxies that follow the RFC (retrying with
    credentials, surfacing the scheme) misbehave, and some HTTP stacks treat the answer as malformed.

    Observed: no ``WWW-Authenticate``. Expected: one (e.g. ``Bearer``), or 403 as the default."""

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    middleware = make_middleware(Starlette(routes=[Route("/v1/ok", ok)]), quota=None, on_unresolved="reject")
    async with client_for(middleware) as client:
        response = await client.get("/v1/ok")
    assert response.status_code in (401, 403)
    assert response.headers["content-type"].startswith("application/problem+json")
    if response.status_code == 401:
        assert "www-authenticate" in response.headers
    assert await middleware.pipeline.flush(5)
    assert fake_lago.events == [] and middleware.stats["unresolved"] == 1


# ----------------------------------------------------------------------------- the fixes, pinned down more tightly


def test_publish_identity_into_state_objects_sets_attributes_or_skips() -> None:
    """Objects get attributes (read back like ``request.state.billing_org_id``), mappings items; a state that takes
    neither is left alone without raising, the billing dict still has the identity."""
    from lago_org_billing._identity import publish_identity

    for state in (ClassicState(), types.SimpleNamespace()):
        billing: dict[str, Any] = {}
        publish_identity({"state": state}, billing, "org_a", "u1")
        assert (state.billing_org_id, state.billing_user_id) == ("org_a", "u1")
        assert billing == {"org_id": "org_a", "user_id": "u1"}
    read_only = types.MappingProxyType({"org_id": "org_a"})
    billing = {}
    publish_identity({"state": read_only}, billing, "org_a", None)
    assert dict(read_only) == {"org_id": "org_a"} and billing["org_id"] == "org_a"
    scope: dict[str, Any] = {"state": None}
    publish_identity(scope, {}, "org_a", None)
    assert scope["state"] == {"billing_org_id": "org_a", "billing_user_id": None}


async def test_an_async_resolver_result_dropped_unawaited_is_quiet_and_awaited_once() -> None:
    """What :func:`resolve_now` returns for an async resolver closes the resolver's coroutine when dropped; awaited,
    it gives the id, and it cannot be awaited twice (as a coroutine cannot)."""

    async def org(scope: Any) -> str:
        return " org_a "

    resolver = first_of(from_state(), org)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pending = resolve_now(resolver, {"type": "http", "headers": []})
        assert not isinstance(pending, str) and pending is not None
        del pending
        gc.collect()
        messages = [str(w.message) for w in caught]
        caught.clear()
    assert [message for message in messages if "never awaited" in message] == []
    pending = resolve_now(resolver, {"type": "http", "headers": []})
    assert not isinstance(pending, str) and pending is not None
    assert await pending == "org_a"
    with pytest.raises(RuntimeError):
        await pending


def test_jwt_certificate_key_is_loaded_and_issuer_lists_are_accepted(rsa_private: Any, ec_private: Any) -> None:
    """A certificate PEM verifies with its public key; a list of issuers accepts any of them and no other."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    for private, algorithm in ((rsa_private, "RS256"), (ec_private, "ES256")):
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(1)
            .not_valid_before(dt.datetime(2020, 1, 1))
            .not_valid_after(dt.datetime(2040, 1, 1))
            .sign(private, hashes.SHA256())
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        resolver = from_jwt_claim(key=pem, algorithms=[algorithm], issuer=["https://a.test", "https://b.test"])
        for issuer, expected in (("https://b.test", "acme"), ("https://c.test", None)):
            token = jwt.encode({"org_id": "acme", "iss": issuer}, private, algorithm=algorithm)
            assert resolve_now(resolver, _scope_with(token)) == expected


def test_jwt_key_mistakes_say_what_to_pass(rsa_private: Any, ec_private: Any) -> None:
    """The errors name the fix: the fitting algorithms, or the public key instead of the private one."""
    with pytest.raises(ConfigurationError, match=r"ES256"):
        from_jwt_claim(key=_pem_public(ec_private))
    private_pem = rsa_private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigurationError, match="PUBLIC key"):
        from_jwt_claim(key=private_pem)
    with pytest.raises(ConfigurationError, match="none"):
        from_jwt_claim(key=_pem_public(rsa_private), algorithms=["RS256", "None"])
    with pytest.raises(ConfigurationError, match="issuer"):
        from_jwt_claim(key=_pem_public(rsa_private), issuer=[b"https://idp.test"])  # type: ignore[list-item]
    token = jwt.encode({"org_id": "acme"}, rsa_private, algorithm="RS256")  # the default algorithms still work
    assert resolve_now(from_jwt_claim(key=_pem_public(rsa_private)), _scope_with(token)) == "acme"


def test_header_names_are_stripped_and_still_match() -> None:
    """A valid name with surrounding blanks is accepted and matches, in both resolvers."""
    assert resolve_now(from_header(" X-Org-Id "), {"headers": [(b"x-org-id", b"org_a")]}) == "org_a"
    secret = "test-secret-that-is-long-enough-for-hs256"
    token = jwt.encode({"org_id": "acme"}, secret, algorithm="HS256")
    assert resolve_now(from_jwt_claim(key=secret, header=" Authorization "), _scope_with(token)) == "acme"
