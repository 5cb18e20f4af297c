"""``from_jwt_claim(jwks_url=...)``: tokens verified against the issuer's published JWKS (Auth0, Clerk, Cognito,
Keycloak, Okta), keys picked by ``kid`` and fetched asynchronously with httpx.

Covers: the configuration (exactly one of ``key=`` / ``jwks_url=``, https only but for loopback, HMAC-only
``algorithms`` refused, a sync ``httpx.Client`` refused); verification by ``kid``; key rotation (a new kid: one
refetch); a flood of unknown kids (at most one fetch per ``jwks_refresh_interval``); a failed fetch keeping the
cached keys (logged once per burst); the ``jwks_max_age`` refresh; concurrent cold requests sharing one fetch;
expired, badly signed, HS256 (algorithm confusion) and kid-less tokens; unusable JWKS entries skipped; the claims
cache, nested claims, leeway, audience and issuer as with ``key=``; the warm path synchronous (no awaitable); and a
real Starlette app behind ``OrgBillingMiddleware`` billing the claimed org on the emulator. The JWKS is served by an
``httpx.MockTransport`` client (``jwks_client=``) or, for the built-in client, by pytest-httpx. Time is a patched
clock: no sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pytest_httpx import HTTPXMock
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, get_current_org, get_current_user, reset_warnings, resolve_now

pytestmark = pytest.mark.anyio

URL = "https://issuer.test/.well-known/jwks.json"
_urls = itertools.count()


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


class Clock:
    """The JWKS cache's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("lago_org_billing._jwks._clock", fake)
    return fake


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    if isinstance(private, rsa.RSAPrivateKey):
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


class Issuer:
    """An IdP's JWKS endpoint behind an ``httpx.MockTransport``: the keys it serves, how often it was asked, and
    a gate that holds the answers (concurrent requests) or a failure to answer with."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.fetches = 0
        self.fail: int | Exception | None = None
        self.gate: anyio.Event | None = None
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.fail, Exception):
            raise self.fail
        if isinstance(self.fail, int):
            return httpx.Response(self.fail, text="upstream unavailable")
        return httpx.Response(200, json={"keys": self.keys})


@pytest.fixture
async def make_issuer() -> AsyncIterator[Callable[[list[dict[str, Any]]], Issuer]]:
    made: list[Issuer] = []

    def make(keys: list[dict[str, Any]]) -> Issuer:
        issuer = Issuer(keys)
        made.append(issuer)
        return issuer

    yield make
    for issuer in made:
        await issuer.client.aclose()


def scope_with(token: str | None) -> dict[str, Any]:
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    return {"type": "http", "method": "GET", "path": "/", "headers": headers}


async def resolve(resolver: Any, token: str | None, scope: dict[str, Any] | None = None) -> str | None:
    """What the middleware does with a resolver: take its id, or await the awaitable it returns."""
    result = resolve_now(resolver, scope if scope is not None else scope_with(token))
    if result is None or isinstance(result, str):
        return result
    return await result


def sign(private: Any, claims: dict[str, Any], kid: str | None, algorithm: str = "RS256") -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, private, algorithm=algorithm, headers=headers)


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hs256_forgery(secret: bytes, claims: dict[str, Any], kid: str) -> str:
    """An HS256 token signed with public text as the secret, made by hand (PyJWT refuses to sign with it)."""
    header = json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()
    signing_input = _b64url(header) + b"." + _b64url(json.dumps(claims).encode())
    signature = _b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode("ascii")


def jwks_resolver(idp: Issuer, claim: str = "org_id", **options: Any) -> Any:
    return from_jwt_claim(claim, jwks_url=URL, jwks_client=idp.client, **options)


# ----------------------------------------------------------------------------------------------- configuration


def test_key_and_jwks_url_are_exclusive_and_one_is_needed() -> None:
    with pytest.raises(ConfigurationError, match=r"exactly one of key=.*jwks_url="):
        from_jwt_claim("org_id", key="secret", jwks_url=URL)
    with pytest.raises(ConfigurationError, match=r"exactly one of key=.*jwks_url="):
        from_jwt_claim("org_id")


@pytest.mark.parametrize(
    "url",
    ["http://issuer.test/jwks.json", "http://10.0.0.1/jwks", "http://[::ffff:10.0.0.1]/jwks", "ftp://issuer.test/jwks"],
)
def test_jwks_url_must_be_https_unless_loopback(url: str) -> None:
    with pytest.raises(ConfigurationError, match="https") as raised:
        from_jwt_claim("org_id", jwks_url=url)
    if url.startswith("http:"):
        assert "sign tokens for any org" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/jwks.json",
        "http://localhost/jwks",
        "http://[::1]/jwks",
        # (127.0.0.1 written as an IPv4-mapped IPv6 address: a loopback host on every Python, where 3.10's and 3.11's
        # ``is_loopback`` is false of it, 3.13's true)
        "http://[::ffff:127.0.0.1]:8080/jwks",
    ],
)
def test_http_jwks_url_on_loopback_is_accepted(url: str) -> None:
    assert callable(from_jwt_claim("org_id", jwks_url=url))


@pytest.mark.parametrize("url", ["", "https://", "issuer.test/jwks.json", 42])
def test_jwks_url_that_is_no_url_is_refused(url: Any) -> None:
    with pytest.raises(ConfigurationError, match="jwks_url"):
        from_jwt_claim("org_id", jwks_url=url)


def test_jwks_with_hmac_algorithms_only_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="HMAC"):
        from_jwt_claim("org_id", jwks_url=URL, algorithms=["HS256", "HS512"])


def test_jwks_refuses_none_and_unknown_algorithms_as_key_does() -> None:
    with pytest.raises(ConfigurationError, match="none"):
        from_jwt_claim("org_id", jwks_url=URL, algorithms=["none", "RS256"])
    with pytest.raises(ConfigurationError, match="unknown JWT algorithm"):
        from_jwt_claim("org_id", jwks_url=URL, algorithms=["RS257"])


def test_jwks_client_must_be_an_async_client() -> None:
    with httpx.Client() as client, pytest.raises(ConfigurationError, match="AsyncClient"):
        from_jwt_claim("org_id", jwks_url=URL, jwks_client=client)  # type: ignore[arg-type]


async def test_jwks_client_without_jwks_url_is_refused() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(ConfigurationError, match="jwks_url"):
            from_jwt_claim("org_id", key="secret", jwks_client=client)


@pytest.mark.parametrize(("option", "value"), [("jwks_refresh_interval", -1), ("jwks_max_age", 0.0)])
def test_jwks_intervals_must_be_positive_seconds(option: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=option):
        options: dict[str, Any] = {option: value}
        from_jwt_claim("org_id", jwks_url=URL, **options)


# ----------------------------------------------------------------------------------------------- verification


async def test_token_verified_with_the_key_its_kid_names(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0", alg="RS256", use="sig"), public_jwk(rsa_keys[1], "k1")])
    resolver = jwks_resolver(issuer)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "k0")) == "org_a"
    assert await resolve(resolver, sign(rsa_keys[1], {"org_id": "org_b"}, "k1")) == "org_b"
    assert issuer.fetches == 1


async def test_warm_cache_answers_synchronously(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    """Cold: an awaitable (the fetch). Warm: the id itself, as cheap as ``key=`` (no coroutine per request)."""
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    resolver = jwks_resolver(issuer)
    token = sign(rsa_keys[0], {"org_id": "org_a"}, "k0")
    cold = resolver(scope_with(token))
    assert not isinstance(cold, str) and cold is not None
    assert await cold == "org_a"
    assert resolver(scope_with(sign(rsa_keys[0], {"org_id": "org_b"}, "k0"))) == "org_b"
    clock.now += 3_000  # still under the max age (an hour)
    assert resolver(scope_with(token)) == "org_a"
    assert issuer.fetches == 1


async def test_rotation_new_kid_is_fetched_once_and_verifies(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "old")])
    resolver = jwks_resolver(issuer)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "old")) == "org_a"
    issuer.keys = [public_jwk(rsa_keys[0], "old"), public_jwk(rsa_keys[1], "new")]  # the IdP rotates
    clock.now += 61
    rotated = sign(rsa_keys[1], {"org_id": "org_b"}, "new")
    assert await resolve(resolver, rotated) == "org_b"
    assert await resolve(resolver, rotated) == "org_b"
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "old")) == "org_a"
    assert issuer.fetches == 2
    issuer.keys = [public_jwk(rsa_keys[1], "new")]  # the old key retired: gone at the next fetch
    clock.now += 3_601
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "old")) is None
    assert issuer.fetches == 3


async def test_unknown_kid_flood_fetches_at_most_once_per_interval(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    resolver = jwks_resolver(issuer, jwks_refresh_interval=60)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "k0")) == "org_a"
    for n in range(200):
        clock.now += 0.25
        assert await resolve(resolver, sign(rsa_keys[2], {"org_id": "org_b"}, f"attacker-{n}")) is None
    assert issuer.fetches == 1  # 50 s of unknown kids: the last fetch was under a minute ago
    clock.now += 10
    for n in range(200):
        assert await resolve(resolver, sign(rsa_keys[2], {"org_id": "org_b"}, f"again-{n}")) is None
    assert issuer.fetches == 2  # the interval passed: one more fetch, then none
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "k0")) == "org_a"


async def test_fetch_failure_keeps_cached_keys_and_is_logged_once_per_burst(
    make_issuer: Callable[..., Issuer],
    rsa_keys: list[rsa.RSAPrivateKey],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    resolver = jwks_resolver(issuer)
    token = sign(rsa_keys[0], {"org_id": "org_a", "exp": 10**10}, "k0")
    assert await resolve(resolver, token) == "org_a"
    caplog.set_level(logging.DEBUG, logger="lago_org_billing.identity")
    issuer.fail = 503
    for failure in (503, httpx.ConnectError("connection refused"), 500):
        issuer.fail = failure
        clock.now += 3_601  # past the max age: refetched when next used, and the fetch fails
        assert await resolve(resolver, token) == "org_a"  # the cached key still verifies
        assert await resolve(resolver, sign(rsa_keys[1], {"org_id": "org_b"}, "k-new")) is None
    assert issuer.fetches == 4
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "fetch the JWKS" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert URL in warnings[0].getMessage() and "503" in warnings[0].getMessage()
    issuer.fail = None  # recovered: said at INFO, and the next failure is a new burst
    clock.now += 3_601
    assert await resolve(resolver, token) == "org_a"
    assert any("fetched again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    issuer.fail = 502
    clock.now += 3_601
    assert await resolve(resolver, token) == "org_a"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "fetch the JWKS" in r.getMessage()]
    assert len(warnings) == 2


async def test_cold_fetch_failure_leaves_unresolved_then_retries_after_interval(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    issuer.fail = 500
    resolver = jwks_resolver(issuer, jwks_refresh_interval=5)
    token = sign(rsa_keys[0], {"org_id": "org_a"}, "k0")
    assert await resolve(resolver, token) is None
    assert resolver(scope_with(token)) is None  # no fetch per request while the issuer is down
    assert issuer.fetches == 1
    issuer.fail = None
    clock.now += 5
    assert await resolve(resolver, token) == "org_a"
    assert issuer.fetches == 2


async def test_concurrent_cold_requests_share_one_fetch(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    issuer.gate = anyio.Event()
    resolver = jwks_resolver(issuer)
    results: dict[int, str | None] = {}

    async def one(n: int) -> None:
        results[n] = await resolve(resolver, sign(rsa_keys[0], {"org_id": f"org_{n}"}, "k0"))

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(one, n)
        await anyio.wait_all_tasks_blocked()
        issuer.gate.set()
    assert results == {n: f"org_{n}" for n in range(20)}
    assert issuer.fetches == 1


async def test_cancelled_fetching_request_hands_the_fetch_on(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    """The request that started the shared fetch goes away (client disconnected): one waiting for it gets the keys of
    that same fetch (no second fetch); it does not hang nor give up."""
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    issuer.gate = anyio.Event()
    resolver = jwks_resolver(issuer)
    results: list[str | None] = []

    async def one(org: str) -> None:
        results.append(await resolve(resolver, sign(rsa_keys[0], {"org_id": org}, "k0")))

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as first:
            first.start_soon(one, "org_first")
            await anyio.wait_all_tasks_blocked()
            outer.start_soon(one, "org_second")
            await anyio.wait_all_tasks_blocked()
            first.cancel_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        issuer.gate.set()
    assert results == ["org_second"]
    assert issuer.fetches == 1


async def test_expired_badly_signed_and_malformed_tokens_are_none(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    resolver = jwks_resolver(issuer)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "k0")) == "org_a"
    expired = sign(rsa_keys[0], {"org_id": "org_a", "exp": int(time.time()) - 600}, "k0")
    forged = sign(rsa_keys[1], {"org_id": "org_b"}, "k0")  # the right kid, another key
    for token in (expired, forged, "not.a.jwt", "garbage", forged.rsplit(".", 1)[0] + ".AAAA"):
        assert await resolve(resolver, token) is None
    assert await resolve(resolver, None) is None
    assert issuer.fetches == 1


async def test_hs256_token_against_rsa_jwks_is_refused(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    """Algorithm confusion: the attacker signs HS256 with the public key (as PEM, or the JWKS JSON itself) as the
    HMAC secret, under the real kid. Refused, with the default ``algorithms=("HS256", "RS256")`` too."""
    jwk = public_jwk(rsa_keys[0], "k0")
    issuer = make_issuer([jwk])
    pem = (
        rsa_keys[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    resolver = jwks_resolver(issuer)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "k0")) == "org_a"
    for secret in (pem, json.dumps(jwk).encode(), json.dumps({"keys": [jwk]}).encode(), jwk["n"].encode()):
        assert await resolve(resolver, hs256_forgery(secret, {"org_id": "org_b"}, "k0")) is None
    assert issuer.fetches == 1


async def test_symmetric_private_encryption_and_unknown_keys_in_the_set_are_skipped(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    """A published ``oct`` key is a secret anyone can read (never an HMAC key), a private JWK is skipped, as are
    ``use: enc`` keys (Keycloak publishes its RSA-OAEP key in the same set), keys whose ``alg`` is not allowed
    and kinds PyJWT does not know."""
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_keys[1]))
    private_jwk["kid"] = "private"
    secret = b"published-secret-0123456789abcdef"
    issuer = make_issuer(
        [
            {"kty": "oct", "kid": "oct", "k": _b64url(secret).decode()},
            private_jwk,
            public_jwk(rsa_keys[2], "enc", use="enc", alg="RSA-OAEP"),
            public_jwk(rsa_keys[2], "ps", alg="PS256"),
            {"kty": "XYZ", "kid": "odd", "x": "AAAA"},
            "not a key",
            public_jwk(rsa_keys[0], "good"),
        ]
    )
    resolver = jwks_resolver(issuer)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "good")) == "org_a"
    hs = jwt.encode({"org_id": "org_b"}, secret, algorithm="HS256", headers={"kid": "oct"})
    assert await resolve(resolver, hs) is None
    assert await resolve(resolver, sign(rsa_keys[1], {"org_id": "org_b"}, "private")) is None
    assert await resolve(resolver, sign(rsa_keys[2], {"org_id": "org_b"}, "enc")) is None
    assert await resolve(resolver, sign(rsa_keys[2], {"org_id": "org_b"}, "ps")) is None  # alg PS256 not allowed
    assert issuer.fetches == 1


async def test_jwks_with_no_usable_key_is_a_failed_fetch_saying_why(
    make_issuer: Callable[..., Issuer],
    rsa_keys: list[rsa.RSAPrivateKey],
    ec_key: ec.EllipticCurvePrivateKey,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An EC-only JWKS with the default algorithms (RS256): nothing can verify; the warning says what to pass. An
    ES256 token is refused before any fetch (its alg is not allowed)."""
    issuer = make_issuer([public_jwk(ec_key, "ec")])
    resolver = jwks_resolver(issuer)
    assert await resolve(resolver, sign(ec_key, {"org_id": "org_a"}, "ec", "ES256")) is None
    assert issuer.fetches == 0
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "ec")) is None
    assert issuer.fetches == 1
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "no key usable" in message and "algorithms=" in message and "EC P-256" in message
    es = from_jwt_claim("org_id", jwks_url=URL + "?es", jwks_client=issuer.client, algorithms=["ES256", "RS256"])
    assert await resolve(es, sign(ec_key, {"org_id": "org_a"}, "ec", "ES256")) == "org_a"
    # an RS256 token naming the EC key's kid: that kid has no RS256 key
    assert await resolve(es, sign(rsa_keys[0], {"org_id": "org_b"}, "ec")) is None
    assert issuer.fetches == 2


async def test_token_without_kid_uses_the_only_key(
    make_issuer: Callable[..., Issuer], rsa_keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    one = make_issuer([public_jwk(rsa_keys[0], "k0"), public_jwk(rsa_keys[2], "enc", use="enc")])
    resolver = jwks_resolver(one)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, None)) == "org_a"
    two = make_issuer([public_jwk(rsa_keys[0], "k0"), public_jwk(rsa_keys[1], "k1")])
    ambiguous = from_jwt_claim("org_id", jwks_url=URL + "?two", jwks_client=two.client)
    assert await resolve(ambiguous, sign(rsa_keys[0], {"org_id": "org_a"}, None)) is None


async def test_claims_cache_nested_claims_leeway_audience_and_issuer_as_with_key(
    make_issuer: Callable[..., Issuer],
    rsa_keys: list[rsa.RSAPrivateKey],
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    options: dict[str, Any] = {"audience": "api", "issuer": ["https://idp.test/", "https://other.test/"], "leeway": 30}
    org = jwks_resolver(issuer, "o.id", **options)
    user = jwks_resolver(issuer, "sub", **options)
    now = int(time.time())
    claims = {"o": {"id": "org_a"}, "sub": "user_1", "aud": "api", "iss": "https://idp.test/", "exp": now - 10}
    token = sign(rsa_keys[0], claims, "k0")
    scope = scope_with(token)
    assert await resolve(org, token, scope) == "org_a"  # expired 10 s ago: within the leeway
    calls: list[Any] = []
    original = jwt.decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", spy)
    assert await resolve(user, token, scope) == "user_1"  # the same token: verified once per request
    monkeypatch.setattr(jwt, "decode", original)
    assert calls == []
    assert issuer.fetches == 1  # the org and user resolvers share the key set
    cache = scope["lago_org_billing.jwt_claims"]
    assert all(URL not in repr(k) and "keys" not in repr(k) for k in cache)
    for wrong in ({"aud": "other"}, {"iss": "https://evil.test/"}, {"exp": now - 60}):
        assert await resolve(org, sign(rsa_keys[0], {**claims, **wrong}, "k0")) is None


async def test_builtin_client_fetches_with_httpx(
    httpx_mock: HTTPXMock, rsa_keys: list[rsa.RSAPrivateKey], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ``jwks_client``, the resolver makes its own (async) httpx request; a redirect is a failure saying
    where it points, not followed."""
    url = f"https://idp{next(_urls)}.test/.well-known/jwks.json"
    httpx_mock.add_response(url=url, json={"keys": [public_jwk(rsa_keys[0], "k0")]})
    resolver = from_jwt_claim("org_id", jwks_url=url)
    assert await resolve(resolver, sign(rsa_keys[0], {"org_id": "org_a"}, "k0")) == "org_a"
    assert len(httpx_mock.get_requests()) == 1
    moved = f"https://idp{next(_urls)}.test/jwks"
    httpx_mock.add_response(url=moved, status_code=301, headers={"Location": "https://elsewhere.test/jwks"})
    assert await resolve(from_jwt_claim("org_id", jwks_url=moved), sign(rsa_keys[0], {"org_id": "a"}, "k0")) is None
    assert any("elsewhere.test" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ----------------------------------------------------------------------------------------------- through the middleware


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan(
        "starter",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}],
    )
    for org in ("org_a", "org_b"):
        fake_lago.add_subscription(org, "starter", external_id=org)
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


def waiting_for_fetch(issuer: Issuer) -> int:
    """How many requests wait for the JWKS fetch in flight of ``issuer``'s key set."""
    from lago_org_billing import _identity

    for keys in list(_identity._jwks_sets.values()):
        if keys._client is issuer.client and keys._in_flight is not None:
            return int(keys._in_flight.statistics().tasks_waiting)
    return 0


async def whoami(request: Request) -> Response:
    return JSONResponse({"org": get_current_org(request), "user": get_current_user(request)})


async def test_middleware_bills_the_org_claimed_in_a_jwks_verified_token(
    fake_lago: Any,
    settings: BillingSettings,
    make_issuer: Callable[..., Issuer],
    rsa_keys: list[rsa.RSAPrivateKey],
    clock: Clock,
) -> None:
    issuer = make_issuer([public_jwk(rsa_keys[0], "k0")])
    issuer.gate = anyio.Event()
    app = Starlette(routes=[Route("/v1/whoami", whoami)])
    middleware = OrgBillingMiddleware(
        app,
        settings=settings,
        quota=None,
        transport=fake_lago.transport(),
        resolve_org=from_jwt_claim("org_id", jwks_url=URL, jwks_client=issuer.client, audience="api"),
        resolve_user=from_jwt_claim("sub", jwks_url=URL, jwks_client=issuer.client, audience="api"),
    )
    token = sign(rsa_keys[0], {"org_id": "org_a", "sub": "u1", "aud": "api"}, "k0")
    forged = sign(rsa_keys[1], {"org_id": "org_b", "sub": "u2", "aud": "api"}, "k0")
    answers: list[httpx.Response] = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:

            async def get(bearer: str) -> None:
                answers.append(await client.get("/v1/whoami", headers={"Authorization": f"Bearer {bearer}"}))

            with anyio.fail_after(10):  # (a guard: this takes milliseconds)
                async with anyio.create_task_group() as tg:  # two cold requests at once: one fetch
                    tg.start_soon(get, token)
                    tg.start_soon(get, forged)
                    # (not wait_all_tasks_blocked(): the delivery pipeline's timers keep waking its tasks)
                    while not issuer.fetches or waiting_for_fetch(issuer) < 1:
                        await anyio.lowlevel.checkpoint()
                    issuer.gate.set()
            assert sorted(a.json()["org"] or "" for a in answers) == ["", "org_a"]
            warm = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
            assert warm.json() == {"org": "org_a", "user": "u1"}
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert issuer.fetches == 1
    assert [e["external_subscription_id"] for e in fake_lago.events] == ["org_a", "org_a"]
