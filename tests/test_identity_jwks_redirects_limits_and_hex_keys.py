"""Security review of ``from_jwt_claim`` (``key=`` and ``jwks_url=``): an attacker's tokens and a hostile or broken
JWKS endpoint.

Defects found (each test failed before its fix):

- a token whose header is JSON nested a few thousand levels deep made the JWKS resolver raise ``RecursionError``:
  any anonymous client wrote an ERROR traceback telling the operator to "fix the resolver";
- a ``jwks_client`` that follows redirects (``httpx.AsyncClient(follow_redirects=True)``) followed the JWKS URL's
  redirect to plain http or to another host, whose keys then verified tokens for any org;
- a JWKS endpoint that never finishes its answer (a hang, or a slow drip that keeps every read under httpx's
  per-read timeout) held the request that fetched it without bound;
- the JWKS answer was read whole into memory, whatever its size (or its gzip expansion);
- an unknown ``kid`` of kilobytes was written whole into the WARNING log.

And guards on what already held: ``alg: none``, algorithm confusion (an HS256 token signed with the RSA public key,
duplicated ``alg`` members), ``jku`` / ``x5u`` / ``jwk`` / ``x5c`` headers never fetched nor trusted, ``kid`` values
that are not strings or look like paths and URLs, odd ``exp`` / ``nbf`` / ``iat`` values, a missing ``aud`` or
``iss`` when configured, an HTML answer, and rotation under a flood of random kids through a real Starlette JWKS app.

The JWKS is served by a Starlette app through ``httpx.ASGITransport`` or by an ``httpx.MockTransport`` (to count
how much of an answer is read); the cache's clock is patched; no sleeps, no network.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

import test_identity_jwks as _jwks_tests
from lago_org_billing import _jwks
from lago_org_billing._identity import from_jwt_claim, resolve_now

pytestmark = pytest.mark.anyio

# the JWKS cache's hand-moved clock and the identity warnings reset around each test, as in test_identity_jwks
Clock = _jwks_tests.Clock
clock = _jwks_tests.clock
_reset_identity_warnings = _jwks_tests._reset_identity_warnings

_urls = itertools.count()


def new_url() -> str:
    return f"https://idp{next(_urls)}.review.test/.well-known/jwks.json"


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def jwk_of(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk["kid"] = kid
    return jwk


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(private: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str | None = "k0", **header: Any) -> str:
    headers = {**({"kid": kid} if kid is not None else {}), **header}
    return jwt.encode(claims, private, algorithm="RS256", headers=headers or None)


def raw_token(header: bytes, payload: bytes, sign_with: Any) -> str:
    """A token with exactly these header and payload bytes: ``sign_with`` is an RSA private key (RS256), HMAC secret
    bytes (HS256), or ``None`` (an empty signature)."""
    signing_input = f"{b64(header)}.{b64(payload)}".encode("ascii")
    if sign_with is None:
        signature = b""
    elif isinstance(sign_with, bytes):
        signature = hmac.new(sign_with, signing_input, hashlib.sha256).digest()
    else:
        signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(signing_input, sign_with)
    return f"{signing_input.decode('ascii')}.{b64(signature)}"


def scope_with(token: str) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": [(b"authorization", f"Bearer {token}".encode())]}


async def resolve(resolver: Any, token: str) -> str | None:
    result = resolve_now(resolver, scope_with(token))
    if result is None or isinstance(result, str):
        return result
    with anyio.fail_after(10):  # a guard against a hang (this takes milliseconds)
        return await result


class JwksApp:
    """The issuer: a Starlette app serving its JWKS, and what it was asked."""

    def __init__(self, served: list[dict[str, Any]]) -> None:
        self.served = served
        self.requests: list[str] = []
        self.app = Starlette(
            routes=[
                Route("/.well-known/jwks.json", self.jwks),
                Route("/moved", self.moved),
                Route("/attacker.json", self.attacker),
                Route("/page", self.page),
            ]
        )
        self.attacker_keys: list[dict[str, Any]] = []

    async def jwks(self, request: Request) -> Response:
        self.requests.append(str(request.url))
        return JSONResponse({"keys": self.served})

    async def moved(self, request: Request) -> Response:
        self.requests.append(str(request.url))
        return RedirectResponse(request.query_params["to"], status_code=302)

    async def attacker(self, request: Request) -> Response:
        self.requests.append(str(request.url))
        return JSONResponse({"keys": self.attacker_keys})

    async def page(self, request: Request) -> Response:
        self.requests.append(str(request.url))
        return HTMLResponse("<html><body>Sign in</body></html>")

    def client(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), **options)


@pytest.fixture
async def issuer(keys: list[rsa.RSAPrivateKey]) -> AsyncIterator[JwksApp]:
    yield JwksApp([jwk_of(keys[0], "k0")])


def warnings_of(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# ----------------------------------------------------------------------------------------------- defects


async def test_a_deeply_nested_token_header_is_a_quiet_refusal(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can send it: it was a RecursionError out of the resolver, an ERROR traceback saying "fix the
    resolver". Now a malformed token like any other (no fetch, no ERROR), as PyJWT itself treats it with ``key=``."""
    async with issuer.client() as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        for header in (b"[" * 20_000, b'{"alg":"RS256","kid":"k0","x":' + b"[" * 20_000 + b"]" * 20_000 + b"}"):
            assert await resolve(resolver, raw_token(header, b'{"org_id":"org_b"}', keys[1])) is None
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], warnings_of(caplog, logging.ERROR)
        assert issuer.requests == []
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) == "org_a"


@pytest.mark.parametrize("target", ["http://idp.review.test/attacker.json", "https://evil.review.test/attacker.json"])
async def test_a_redirect_is_never_followed_even_by_a_client_that_follows_them(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    """``jwks_url`` must be https; a redirect to plain http (anyone on the path answers it) or to another host was
    followed by a ``jwks_client`` with ``follow_redirects=True``, and the keys found there verified a forged token.
    Refused as the built-in client refuses it: a failed fetch saying where it points."""
    issuer.attacker_keys = [jwk_of(keys[1], "k0")]
    async with issuer.client(follow_redirects=True) as client:
        url = f"https://idp.review.test/moved?to={target}"
        resolver = from_jwt_claim("org_id", jwks_url=url, jwks_client=client)
        assert await resolve(resolver, sign(keys[1], {"org_id": "org_victim"})) is None
    assert not any(asked.partition("?")[0].endswith("/attacker.json") for asked in issuer.requests), issuer.requests
    assert any(target in said and "jwks_url" in said for said in warnings_of(caplog))


class Hanging(httpx.AsyncByteStream):
    """A body that starts and never ends (a stalled or slow-drip server: httpx's per-read timeout never fires)."""

    def __init__(self) -> None:
        self.never = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"keys": ['
        await self.never.wait()


async def test_a_jwks_endpoint_that_never_finishes_does_not_hold_the_request(
    keys: list[rsa.RSAPrivateKey], clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fetch has an overall deadline (``_jwks._DEADLINE``, shortened here): past it, the fetch is a failure
    like any other, logged, and not retried before the refresh interval (not once per waiting request)."""
    monkeypatch.setattr(_jwks, "_DEADLINE", 0.05, raising=False)
    fetches: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(request)
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=Hanging())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) is None
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) is None
    assert len(fetches) == 1
    said = warnings_of(caplog)
    assert any("fetch the JWKS" in line and "s" in line for line in said), said


class Counted(httpx.AsyncByteStream):
    """A JWKS followed by ``chunks`` blocks of 64 KiB of blanks (valid JSON, absurdly large); counts what was read."""

    def __init__(self, head: bytes, chunks: int) -> None:
        self.head = head
        self.chunks = chunks
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        for _ in range(self.chunks):
            self.read += 1
            yield b" " * 65_536


async def test_an_oversized_jwks_is_refused_without_reading_it_whole(
    keys: list[rsa.RSAPrivateKey], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A real JWKS is a few KB. 16 MiB was read whole into memory (and would have been 16 GB)."""
    body = Counted(json.dumps({"keys": [jwk_of(keys[0], "k0")]}).encode(), chunks=256)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) is None
    assert body.read <= 32, body.read  # stopped at the cap (1 MiB), not at the end
    assert any("larger than" in line for line in warnings_of(caplog)), warnings_of(caplog)


async def test_a_gzip_bomb_jwks_is_refused(keys: list[rsa.RSAPrivateKey], clock: Clock) -> None:
    """16 KB on the wire, 16 MiB once httpx decompressed it: the cap is on what is decoded."""
    bomb = gzip.compress(json.dumps({"keys": [jwk_of(keys[0], "k0")]}).encode() + b" " * (16 << 20))
    assert len(bomb) < 100_000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "application/json", "content-encoding": "gzip"}, content=bomb
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) is None


async def test_a_huge_unknown_kid_is_not_written_whole_to_the_log(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lago_org_billing.identity")
    async with issuer.client() as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) == "org_a"
        for n in range(2):
            assert await resolve(resolver, sign(keys[1], {"org_id": "org_b"}, kid=f"{n}" + "A" * 8_000)) is None
    lines = [r.getMessage() for r in caplog.records if "AAAA" in r.getMessage()]
    assert lines and all(len(line) < 1_000 for line in lines), [len(line) for line in lines]


# ----------------------------------------------------------------------------------------------- guards


async def test_alg_none_and_algorithm_confusion_are_refused_without_a_fetch(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    pem = keys[0].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    payload = b'{"org_id":"org_b"}'
    forged = [
        raw_token(b'{"alg":"none","kid":"k0"}', payload, None),
        raw_token(b'{"alg":"None","kid":"k0"}', payload, None),
        raw_token(b'{"alg":"HS256","kid":"k0"}', payload, pem),
        # duplicated members: every parser here keeps the last one (HS256), which is never allowed with a JWKS
        raw_token(b'{"alg":"RS256","kid":"k0","alg":"HS256"}', payload, pem),
    ]
    async with issuer.client() as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        for token in forged:
            assert await resolve(resolver, token) is None
        assert issuer.requests == []  # refused on the header alone
        # the other way round: both the lookup and PyJWT read the last alg (RS256), the genuine signature verifies
        genuine = raw_token(b'{"alg":"HS256","kid":"k0","alg":"RS256"}', b'{"org_id":"org_a"}', keys[0])
        assert await resolve(resolver, genuine) == "org_a"
    with pytest.raises(Exception, match="none"):
        from_jwt_claim("org_id", jwks_url=new_url(), algorithms=["none"])
    keyed = from_jwt_claim("org_id", key=pem.decode())
    for token in forged:
        assert keyed(scope_with(token)) is None


async def test_jku_x5u_jwk_and_x5c_headers_are_never_fetched_nor_trusted(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    issuer.attacker_keys = [jwk_of(keys[1], "k0")]
    attacker_url = "https://idp.review.test/attacker.json"
    attacker_cert = base64.b64encode(
        keys[1].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    async with issuer.client() as client:
        resolver = from_jwt_claim(
            "org_id", jwks_url="https://idp.review.test/.well-known/jwks.json", jwks_client=client
        )
        claims = {"org_id": "org_victim"}
        for kid in ("k0", None, "attacker"):
            for extra in (
                {"jku": attacker_url},
                {"x5u": attacker_url},
                {"jwk": jwk_of(keys[1], "k0")},
                {"x5c": [attacker_cert]},
            ):
                assert await resolve(resolver, sign(keys[1], claims, kid=kid, **extra)) is None
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"}, jku=attacker_url)) == "org_a"
    assert issuer.requests == ["https://idp.review.test/.well-known/jwks.json"]


async def test_kids_that_are_not_strings_or_look_like_paths_and_urls_are_only_names(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    async with issuer.client() as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) == "org_a"
        for kid in ("../../../../etc/passwd", "https://evil.review.test/key.pem", "k0\x00", "k0 ", "K0"):
            assert await resolve(resolver, sign(keys[1], {"org_id": "org_b"}, kid=kid)) is None
        for kid_json in (b"0", b"true", b'["k0"]', b'{"k0":1}', b"null"):
            header = b'{"alg":"RS256","kid":' + kid_json + b"}"
            # (the genuine signature: refused for the kid alone; PyJWT refuses a null kid too)
            assert await resolve(resolver, raw_token(header, b'{"org_id":"org_a"}', keys[0])) is None
    assert len(issuer.requests) == 1  # fetched less than the interval ago: the unknown kids fetch nothing


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"exp": "4102444800"}, "org_a"),  # a string of digits: PyJWT reads it as the number
        ({"exp": "tomorrow"}, None),
        ({"exp": True}, None),  # 1: expired in 1970
        ({"exp": 1e400}, None),  # JSON infinity
        ({"exp": 4102444800.5}, "org_a"),
        ({"exp": 10**40}, "org_a"),
        ({"nbf": 10**40}, None),
        ({"nbf": "soon"}, None),
        ({"iat": 10**40}, None),  # issued in the far future
        ({"iat": "then"}, None),
        ({"exp": None}, None),
    ],
)
async def test_exp_nbf_and_iat_of_odd_types(
    issuer: JwksApp,
    keys: list[rsa.RSAPrivateKey],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    claims: dict[str, Any],
    expected: str | None,
) -> None:
    async with issuer.client() as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client)
        token = raw_token(b'{"alg":"RS256","kid":"k0"}', json.dumps({"org_id": "org_a", **claims}).encode(), keys[0])
        assert await resolve(resolver, token) == expected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_audience_and_issuer_when_configured_are_required(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    good = {"org_id": "org_a", "aud": "api", "iss": "https://idp.review.test/", "exp": int(time.time()) + 600}
    async with issuer.client() as client:
        for issuers in ("https://idp.review.test/", ["https://idp.review.test/", "https://other.review.test/"]):
            resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client, audience="api", issuer=issuers)
            assert await resolve(resolver, sign(keys[0], good)) == "org_a"
            for wrong in (
                {"aud": None},
                {"iss": None},
                {"aud": "other"},
                {"aud": ["other", "more"]},
                {"iss": "https://idp.review.test"},
                {"iss": ["https://idp.review.test/"]},
            ):
                claims = {k: v for k, v in {**good, **wrong}.items() if v is not None}
                token = raw_token(b'{"alg":"RS256","kid":"k0"}', json.dumps(claims).encode(), keys[0])
                assert await resolve(resolver, token) is None, wrong


async def test_an_html_answer_is_a_failed_fetch_saying_so(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async with issuer.client() as client:
        resolver = from_jwt_claim("org_id", jwks_url="https://idp.review.test/page", jwks_client=client)
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) is None
    assert any("not JSON" in line for line in warnings_of(caplog)), warnings_of(caplog)


async def test_rotation_through_a_flood_of_random_kids(
    issuer: JwksApp, keys: list[rsa.RSAPrivateKey], clock: Clock
) -> None:
    """The issuer rotates while attackers send random kids: the set is fetched at most once per interval, and the
    new kid verifies once the interval has passed."""
    async with issuer.client() as client:
        resolver = from_jwt_claim("org_id", jwks_url=new_url(), jwks_client=client, jwks_refresh_interval=30)
        assert await resolve(resolver, sign(keys[0], {"org_id": "org_a"})) == "org_a"
        for n in range(300):
            assert await resolve(resolver, sign(keys[1], {"org_id": "org_b"}, kid=f"random-{n}")) is None
        assert len(issuer.requests) == 1  # the set was fetched less than the interval ago: not once more
        issuer.served = [jwk_of(keys[0], "k0"), jwk_of(keys[1], "k1")]
        assert await resolve(resolver, sign(keys[1], {"org_id": "org_b"}, kid="k1")) is None  # still rate limited
        clock.now += 30
        assert await resolve(resolver, sign(keys[1], {"org_id": "org_b"}, kid="k1")) == "org_b"
        assert await resolve(resolver, sign(keys[1], {"org_id": "org_b"}, kid="random-x")) is None
        assert len(issuer.requests) == 2


@pytest.mark.parametrize("wrapped", [False, True], ids=["one-line", "xxd-wrapped"])
def test_a_public_key_in_hex_is_not_an_hmac_secret(keys: list[rsa.RSAPrivateKey], wrapped: bool) -> None:
    """The public key's DER in hex (``xxd -p``, a keystore or HSM export) was taken as an HMAC secret with the default
    ``algorithms=("HS256", "RS256")``: anyone who read the public key signed HS256 tokens for any org, and the
    issuer's real tokens were refused. It is loaded as the public key it is, as bare base64 DER already was."""
    der = keys[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = der.hex()
    if wrapped:
        key = "\n".join(key[i : i + 60] for i in range(0, len(key), 60)) + "\n"
    resolver = from_jwt_claim("org_id", key=key)
    forged = raw_token(b'{"alg":"HS256","typ":"JWT"}', b'{"org_id":"org_b"}', key.encode("ascii"))
    assert resolver(scope_with(forged)) is None
    assert resolver(scope_with(sign(keys[0], {"org_id": "org_a"}, kid=None))) == "org_a"
    random_hex_secret = hashlib.sha256(b"an HMAC secret from openssl rand -hex 32").hexdigest()
    hs = raw_token(b'{"alg":"HS256","typ":"JWT"}', b'{"org_id":"org_c"}', random_hex_secret.encode())
    assert from_jwt_claim("org_id", key=random_hex_secret)(scope_with(hs)) == "org_c"  # a hex secret stays a secret
