"""Review of ``from_jwt_claim`` (JWT identity), second round: what is unsafe at configuration time.

Covers: ``jwks_refresh_interval`` below 1 s (a flood of random kids then fetched the JWKS once per request) and
``jwks_max_age`` that is not finite, positive seconds at least the refresh interval, refused up front; weak keys
(an HMAC secret shorter than RFC 7518 3.2 asks for its algorithm, an RSA key under 2048 bits) logged once at build
time with the fix, and PyJWT's per-decode ``InsecureKeyLengthWarning`` never turned into a refused token (an
unresolved request) under ``-W error``; RSA keys under 2048 bits in a JWKS skipped, one WARNING per fetch; and the
opt-in ``require=`` (claims a token must carry, e.g. ``exp``) validated at build time and applied with ``key=`` and
``jwks_url=`` alike, including when another resolver with other settings already verified the same token. Real
Starlette apps behind ``OrgBillingMiddleware`` billing on the Lago emulator; the JWKS is served by an
``httpx.MockTransport`` client; the JWKS clock is patched (no sleeps).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import test_identity_edges as _identity_edges
import test_identity_jwks as _jwks_tests
from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, get_current_org, resolve_now

pytestmark = pytest.mark.anyio

# the JWKS cache's hand-moved clock and the identity warnings reset around each test, as in test_identity_jwks
Clock = _jwks_tests.Clock
clock = _jwks_tests.clock
_reset_identity_warnings = _jwks_tests._reset_identity_warnings

URL = "https://issuer.test/.well-known/jwks.json"
STRONG_SECRET = "a-review-secret-long-enough-for-hs256-and-hs384-and-hs512-0123456789"


@pytest.fixture(scope="module")
def strong_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def weak_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hmac_token(secret: bytes, claims: dict[str, Any], alg: str = "HS256") -> str:
    """A token signed by hand (PyJWT itself warns, or errs under ``-W error``, signing with a short secret)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header = json.dumps({"alg": alg, "typ": "JWT"}).encode()
    signing_input = _b64url(header) + b"." + _b64url(json.dumps(claims).encode())
    return (signing_input + b"." + _b64url(hmac.new(secret, signing_input, digest).digest())).decode("ascii")


def rsa_token(private: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str | None = None) -> str:
    with warnings.catch_warnings():  # (PyJWT warns signing with a key under 2048 bits)
        warnings.simplefilter("ignore")
        return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid} if kid else None)


def public_pem(private: rsa.RSAPrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk["kid"] = kid
    return jwk


def scope_with(token: str) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": [(b"authorization", f"Bearer {token}".encode())]}


async def resolve(resolver: Any, token: str, scope: dict[str, Any] | None = None) -> str | None:
    result = resolve_now(resolver, scope if scope is not None else scope_with(token))
    if result is None or isinstance(result, str):
        return result
    return await result


class Issuer:
    """A JWKS endpoint behind an ``httpx.MockTransport``: the keys it serves and how often it was asked."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.fetches = 0
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        return httpx.Response(200, json={"keys": self.keys})


@pytest.fixture
async def make_issuer() -> AsyncIterator[Callable[[list[dict[str, Any]]], Issuer]]:
    made: list[Issuer] = []

    def make(keys: list[dict[str, Any]]) -> Issuer:
        made.append(Issuer(keys))
        return made[-1]

    yield make
    for issuer in made:
        await issuer.client.aclose()


#: The emulator with orgs ``org_a`` and ``org_b`` on a plan billing ``api_call`` (test_identity_edges' fixture).
settings = _identity_edges.settings


async def whoami(request: Request) -> Response:
    return JSONResponse({"org": get_current_org(request)})


def jwt_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "lago_org_billing.identity" and r.levelno >= logging.WARNING
    ]


# ------------------------------------------------------------------------------ 1. JWKS intervals at configuration


@pytest.mark.parametrize("interval", [0, 0.0, 0.5, 1e-9])
def test_refresh_interval_below_one_second_is_refused(interval: float) -> None:
    """``jwks_refresh_interval=0`` was accepted: every token with an unknown (random) kid then fetched the JWKS,
    so anyone could make the app hammer the issuer (and wait on it) once per request."""
    with pytest.raises(ConfigurationError, match=r"jwks_refresh_interval.*at least 1") as raised:
        from_jwt_claim("org_id", jwks_url=URL, jwks_refresh_interval=interval)
    assert "kid" in str(raised.value)  # says why


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("jwks_refresh_interval", math.nan),
        ("jwks_refresh_interval", math.inf),
        ("jwks_refresh_interval", True),
        ("jwks_refresh_interval", "60"),
        ("jwks_max_age", math.nan),
        ("jwks_max_age", math.inf),
        ("jwks_max_age", True),
        ("jwks_max_age", "3600"),
        ("jwks_max_age", -1),
        ("jwks_max_age", 0),
    ],
)
def test_interval_that_is_not_finite_seconds_is_refused(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        from_jwt_claim("org_id", jwks_url=URL, **{option: value})


def test_max_age_shorter_than_the_refresh_interval_is_refused() -> None:
    """``jwks_max_age=30`` with the default 60 s interval cannot be honoured (the set is never fetched more often
    than the interval): say so rather than silently keep keys twice as long as asked."""
    with pytest.raises(ConfigurationError, match=r"jwks_max_age.*jwks_refresh_interval"):
        from_jwt_claim("org_id", jwks_url=URL, jwks_max_age=30)


def test_sane_intervals_are_still_accepted() -> None:
    assert callable(from_jwt_claim("org_id", jwks_url=URL, jwks_refresh_interval=1, jwks_max_age=1))
    assert callable(from_jwt_claim("org_id", jwks_url=URL, jwks_refresh_interval=5.5, jwks_max_age=600))


# ------------------------------------------------------------------------------ 2. weak keys


@pytest.mark.parametrize(("alg", "length", "needed"), [("HS256", 16, 32), ("HS384", 40, 48), ("HS512", 50, 64)])
def test_short_hmac_secret_is_logged_once_at_build_time(
    caplog: pytest.LogCaptureFixture, alg: str, length: int, needed: int
) -> None:
    secret = "k" * length
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        from_jwt_claim("org_id", key=secret, algorithms=[alg])
        from_jwt_claim("sub", key=secret, algorithms=[alg])  # the user resolver, same key: not said again
    said = jwt_warnings(caplog)
    assert len(said) == 1, said
    assert f"{length} bytes" in said[0] and f"{needed}" in said[0] and alg in said[0] and "RFC 7518" in said[0]
    assert secret not in caplog.text  # the secret itself is never logged


def test_long_enough_secret_and_strong_rsa_key_say_nothing(
    caplog: pytest.LogCaptureFixture, strong_rsa: rsa.RSAPrivateKey
) -> None:
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        from_jwt_claim("org_id", key="k" * 32, algorithms=["HS256"])
        from_jwt_claim("org_id", key=STRONG_SECRET, algorithms=["HS256", "HS384", "HS512"])
        from_jwt_claim("org_id", key=public_pem(strong_rsa))
    assert jwt_warnings(caplog) == []


def test_rsa_key_under_2048_bits_is_logged_at_build_time(
    caplog: pytest.LogCaptureFixture, weak_rsa: rsa.RSAPrivateKey
) -> None:
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        from_jwt_claim("org_id", key=public_pem(weak_rsa))
    said = jwt_warnings(caplog)
    assert len(said) == 1, said
    assert "1024" in said[0] and "2048" in said[0]


@pytest.mark.parametrize("kind", ["short-secret", "rsa-1024"])
async def test_weak_key_token_is_billed_even_when_warnings_are_errors(
    fake_lago: Any,
    settings: BillingSettings,
    weak_rsa: rsa.RSAPrivateKey,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PyJWT >= 2.11 issues an ``InsecureKeyLengthWarning`` on each decode with a weak key. Under ``-W error`` (or
    pytest's ``filterwarnings = error``) it was raised out of the resolver: every genuine token unresolved (an
    ERROR logged), the request served unbilled or refused by the unresolved-org policy. The weakness is said once
    at configuration; a warning filter must not change what a request resolves to."""
    if kind == "short-secret":
        key: str | bytes = "short-secret-16b"
        token = hmac_token(b"short-secret-16b", {"org_id": "org_a"})
    else:
        key = public_pem(weak_rsa)
        token = rsa_token(weak_rsa, {"org_id": "org_a"})
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/whoami", whoami)]),
        settings=settings,
        quota=None,
        transport=fake_lago.transport(),
        resolve_org=from_jwt_claim("org_id", key=key),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
                answers = [
                    await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"}) for _ in range(2)
                ]
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"org": "org_a"})] * 2
    assert [e["external_subscription_id"] for e in fake_lago.events] == ["org_a", "org_a"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_weak_rsa_key_in_a_jwks_is_skipped_with_one_warning_per_fetch(
    make_issuer: Callable[..., Issuer],
    strong_rsa: rsa.RSAPrivateKey,
    weak_rsa: rsa.RSAPrivateKey,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 1024-bit RSA key in the issuer's JWKS verified tokens (factoring one is within reach of a determined
    attacker, who could then sign for any org). Now skipped, said at WARNING once per fetch; the other keys work."""
    issuer = make_issuer([public_jwk(weak_rsa, "weak"), public_jwk(strong_rsa, "strong")])
    resolver = from_jwt_claim("org_id", jwks_url=URL, jwks_client=issuer.client)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        assert await resolve(resolver, rsa_token(strong_rsa, {"org_id": "org_a"}, "strong")) == "org_a"
        assert await resolve(resolver, rsa_token(weak_rsa, {"org_id": "org_b"}, "weak")) is None
        weak_said = [m for m in jwt_warnings(caplog) if "1024" in m]
        assert len(weak_said) == 1, jwt_warnings(caplog)
        assert "'weak'" in weak_said[0] and "2048" in weak_said[0] and URL in weak_said[0]
        clock.now += 3_601  # stale: fetched again, said again
        assert await resolve(resolver, rsa_token(strong_rsa, {"org_id": "org_a"}, "strong")) == "org_a"
    assert issuer.fetches == 2
    assert len([m for m in jwt_warnings(caplog) if "1024" in m]) == 2


async def test_jwks_of_weak_keys_only_says_why_nothing_verifies(
    make_issuer: Callable[..., Issuer], weak_rsa: rsa.RSAPrivateKey, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = make_issuer([public_jwk(weak_rsa, "weak")])
    resolver = from_jwt_claim("org_id", jwks_url=URL, jwks_client=issuer.client)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        assert await resolve(resolver, rsa_token(weak_rsa, {"org_id": "org_a"}, "weak")) is None
    failed = [m for m in jwt_warnings(caplog) if "Could not fetch" in m]
    assert len(failed) == 1 and "2048" in failed[0], jwt_warnings(caplog)


# ------------------------------------------------------------------------------ 3. require=


@pytest.mark.parametrize("require", ["exp", b"exp", ["exp", ""], [1], ("exp", None), 3])
def test_require_that_is_not_a_list_of_claim_names_is_refused(require: Any) -> None:
    """``require="exp"`` reads as the claims ``e``, ``x`` and ``p`` to PyJWT (every token refused): a list of
    names is needed; anything else is a ConfigurationError saying so."""
    with pytest.raises(ConfigurationError, match=r"require"):
        from_jwt_claim("org_id", key=STRONG_SECRET, require=require)
    with pytest.raises(ConfigurationError, match=r"require"):
        from_jwt_claim("org_id", jwks_url=URL, require=require)


def test_require_exp_refuses_tokens_that_never_expire_with_key(caplog: pytest.LogCaptureFixture) -> None:
    secret = STRONG_SECRET.encode()
    forever = hmac_token(secret, {"org_id": "org_a"})
    expiring = hmac_token(secret, {"org_id": "org_a", "exp": 10**10})
    assert resolve_now(from_jwt_claim(key=STRONG_SECRET), scope_with(forever)) == "org_a"  # default: unchanged
    strict = from_jwt_claim(key=STRONG_SECRET, require=("exp",))
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        assert resolve_now(strict, scope_with(forever)) is None
    assert resolve_now(strict, scope_with(expiring)) == "org_a"
    said = jwt_warnings(caplog)
    assert len(said) == 1 and "exp" in said[0] and "require" in said[0], said


async def test_require_exp_applies_with_jwks_url(
    make_issuer: Callable[..., Issuer], strong_rsa: rsa.RSAPrivateKey, clock: Clock
) -> None:
    issuer = make_issuer([public_jwk(strong_rsa, "k0")])
    strict = from_jwt_claim("org_id", jwks_url=URL, jwks_client=issuer.client, require=["exp", "iat"])
    lax = from_jwt_claim("org_id", jwks_url=URL, jwks_client=issuer.client)
    forever = rsa_token(strong_rsa, {"org_id": "org_a", "iat": 1}, "k0")
    complete = rsa_token(strong_rsa, {"org_id": "org_a", "iat": 1, "exp": 10**10}, "k0")
    assert await resolve(strict, forever) is None
    assert await resolve(strict, complete) == "org_a"
    assert await resolve(lax, forever) == "org_a"


@pytest.mark.parametrize("mode", ["key", "jwks_url"])
async def test_require_is_not_bypassed_by_claims_another_resolver_verified(
    mode: str, make_issuer: Callable[..., Issuer], strong_rsa: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """The verified claims are cached in the scope for resolvers with the same settings: a lax resolver (the user,
    no ``require``) running first must not let a strict one (the org) read a token without ``exp``."""
    if mode == "key":
        options: dict[str, Any] = {"key": STRONG_SECRET}
        token = hmac_token(STRONG_SECRET.encode(), {"org_id": "org_a", "sub": "u1"})
    else:
        issuer = make_issuer([public_jwk(strong_rsa, "k0")])
        options = {"jwks_url": URL, "jwks_client": issuer.client}
        token = rsa_token(strong_rsa, {"org_id": "org_a", "sub": "u1"}, "k0")
    lax_user = from_jwt_claim("sub", **options)
    strict_org = from_jwt_claim("org_id", require=["exp"], **options)
    scope = scope_with(token)
    assert await resolve(lax_user, token, scope) == "u1"
    assert await resolve(strict_org, token, scope) is None


async def test_require_exp_through_the_middleware(fake_lago: Any, settings: BillingSettings) -> None:
    secret = STRONG_SECRET.encode()
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/whoami", whoami)]),
        settings=settings,
        quota=None,
        transport=fake_lago.transport(),
        resolve_org=from_jwt_claim("org_id", key=STRONG_SECRET, require=["exp"]),
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            forever = await client.get(
                "/v1/whoami", headers={"Authorization": f"Bearer {hmac_token(secret, {'org_id': 'org_b'})}"}
            )
            expiring = hmac_token(secret, {"org_id": "org_a", "exp": 10**10})
            good = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {expiring}"})
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert forever.json() == {"org": None}
    assert good.json() == {"org": "org_a"}
    assert [e["external_subscription_id"] for e in fake_lago.events] == ["org_a"]
