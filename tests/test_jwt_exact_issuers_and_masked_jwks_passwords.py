"""``from_jwt_claim(issuer=...)`` under every PyJWT the package allows (``pyjwt>=2.8``), and a ``jwks_url`` holding a
password as the logs and errors show it.

Covers: with one configured issuer, a verified token is accepted only when its ``iss`` is exactly that issuer, with
``key=`` and ``jwks_url=`` alike, also when PyJWT's own issuer check is the one of PyJWT 2.10.0 (CVE-2024-53861: a
string ``issuer=`` read as a sequence, so an ``iss`` it contains, ``""`` or a prefix of it, was accepted); an ``iss``
that is not a string is a quiet refusal (2.10.0 raised ``TypeError``: an ERROR traceback, not a refusal); a token
without ``iss`` is refused as missing it; a list of issuers still accepts each of them, exactly.

PyJWT 2.10.0's ``_validate_iss`` is reproduced below as it was released (checked against the real 2.10.0 wheel too);
the installed PyJWT checks issuers exactly, which hid the hole.

A ``jwks_url`` of a key set behind Basic auth (``https://user:password@host/...``, which httpx sends) is fetched with
it, and its password is masked in every log line about the key set (a failed fetch, a fetch again, a refused kid) and in
the ``ConfigurationError`` of a URL refused at startup.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Container, Iterator, Sequence
from typing import Any

import httpx
import jwt
import jwt.api_jws
import jwt.api_jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from lago_org_billing._identity import call_resolver, from_jwt_claim, reset_warnings

pytestmark = pytest.mark.anyio

SECRET = "an-hmac-secret-of-at-least-32-bytes-for-hs256!"
ISSUER = "https://auth.example.com/"
JWKS_URL = "https://auth.example.com/.well-known/jwks.json"


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(params=["installed", "2.10.0"])
def pyjwt_issuer_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """PyJWT's issuer check as installed, or as PyJWT 2.10.0 released it."""
    if request.param == "2.10.0":

        def validate_iss_2_10_0(self: Any, payload: dict[str, Any], issuer: Any) -> None:
            if issuer is None:
                return
            if "iss" not in payload:
                raise jwt.MissingRequiredClaimError("iss")
            if isinstance(issuer, Sequence):  # (a str is a Sequence: `in` is a substring test)
                if payload["iss"] not in issuer:
                    raise jwt.InvalidIssuerError("Invalid issuer")
            elif payload["iss"] != issuer:
                raise jwt.InvalidIssuerError("Invalid issuer")

        monkeypatch.setattr(jwt.api_jwt.PyJWT, "_validate_iss", validate_iss_2_10_0)
    return str(request.param)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _signed(claims: dict[str, Any], key: Any, algorithm: str, kid: str | None = None) -> str:
    """A token signed whatever its claims (``jwt.encode`` refuses an ``iss`` that is no string; an issuer may not)."""
    payload = json.dumps(claims).encode()
    headers = {"kid": kid} if kid is not None else None
    return jwt.api_jws.PyJWS().encode(payload, key, algorithm, headers=headers)


def _scope(token: str) -> dict[str, Any]:
    return {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}


def _resolvers(rsa_key: rsa.RSAPrivateKey, issuer: str | Container[str]) -> dict[str, tuple[Any, Any]]:
    """``key=`` and ``jwks_url=`` resolvers for ``issuer``, each with a function signing claims for it."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk["kid"] = "k1"
    body = json.dumps({"keys": [jwk]}).encode()
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body)))
    return {
        "key": (
            from_jwt_claim("org_id", key=SECRET, algorithms=["HS256"], issuer=issuer),  # type: ignore[arg-type]
            lambda claims: _signed(claims, SECRET, "HS256"),
        ),
        "jwks_url": (
            from_jwt_claim(
                "org_id",
                jwks_url=JWKS_URL,
                jwks_client=client,
                algorithms=["RS256"],
                issuer=issuer,  # type: ignore[arg-type]
            ),
            lambda claims: _signed(claims, rsa_key, "RS256", kid="k1"),
        ),
    }


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("source", ["key", "jwks_url"])
async def test_one_issuer_accepts_exactly_that_iss(
    pyjwt_issuer_check: str, rsa_key: rsa.RSAPrivateKey, source: str, caplog: pytest.LogCaptureFixture
) -> None:
    resolver, sign = _resolvers(rsa_key, ISSUER)[source]
    assert await call_resolver(resolver, _scope(sign({"org_id": "org_a", "iss": ISSUER}))) == "org_a"
    caplog.set_level(logging.DEBUG, logger="lago_org_billing.identity")
    # an iss the configured issuer contains (another issuer, or a blank one) is not that issuer
    for iss in ("", "https://auth.example", "example.com", "/"):
        assert await call_resolver(resolver, _scope(sign({"org_id": "org_b", "iss": iss}))) is None, iss
    # an iss that is not a string: refused, not an error of the resolver
    for iss in ([ISSUER], {"url": ISSUER}, 1, None):
        assert await call_resolver(resolver, _scope(sign({"org_id": "org_c", "iss": iss}))) is None, iss
    assert await call_resolver(resolver, _scope(sign({"org_id": "org_d"}))) is None
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    said = [record.getMessage() for record in caplog.records]
    assert any("check from_jwt_claim(issuer=...)" in message for message in said)
    assert any('missing the "iss" claim' in message for message in said)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("source", ["key", "jwks_url"])
async def test_a_list_of_issuers_accepts_each_exactly(
    pyjwt_issuer_check: str, rsa_key: rsa.RSAPrivateKey, source: str
) -> None:
    other = "https://login.example.org"
    resolver, sign = _resolvers(rsa_key, [ISSUER, other])[source]
    assert await call_resolver(resolver, _scope(sign({"org_id": "org_a", "iss": ISSUER}))) == "org_a"
    assert await call_resolver(resolver, _scope(sign({"org_id": "org_b", "iss": other}))) == "org_b"
    for iss in ("", "https://login.example", [other], None):
        assert await call_resolver(resolver, _scope(sign({"org_id": "org_c", "iss": iss}))) is None, iss
    assert await call_resolver(resolver, _scope(sign({"org_id": "org_d"}))) is None


# ------------------------------------------------------------------- a jwks_url with a password, as logs show it

PASSWORD = "s3cr3t-jwks-pw"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_jwks_url_password_is_sent_but_never_logged(
    rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [5_000.0]
    monkeypatch.setattr("lago_org_billing._jwks._clock", lambda: now[0])
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk["kid"] = "k1"
    answers = [httpx.Response(503), httpx.Response(200, json={"keys": [jwk]})]
    authorizations: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        authorizations.append(request.headers.get("authorization"))
        return answers.pop(0)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    url = f"https://jwks-reader:{PASSWORD}@idp.internal.example/jwks.json"
    resolver = from_jwt_claim("org_id", jwks_url=url, jwks_client=client, algorithms=["RS256"])
    caplog.set_level(logging.DEBUG, logger="lago_org_billing.identity")
    token = _signed({"org_id": "org_a"}, rsa_key, "RS256", kid="k1")
    assert await call_resolver(resolver, _scope(token)) is None  # the fetch failed: logged
    now[0] += 120
    assert await call_resolver(resolver, _scope(token)) == "org_a"  # fetched again: logged
    unknown = _signed({"org_id": "org_b"}, rsa_key, "RS256", kid="k2")
    assert await call_resolver(resolver, _scope(unknown)) is None  # a kid not in the set: logged
    assert authorizations and all(value is not None and value.startswith("Basic ") for value in authorizations)
    said = [record.getMessage() for record in caplog.records if record.name == "lago_org_billing.identity"]
    assert any("Could not fetch the JWKS at https://jwks-reader:***@idp.internal.example/jwks.json" in m for m in said)
    assert any("fetched again after 1 failed attempt(s)" in message for message in said)
    assert any("'k2'" in message for message in said)
    assert not [message for message in said if PASSWORD in message]


def test_a_refused_jwks_url_is_said_with_its_password_masked() -> None:
    from lago_org_billing import ConfigurationError

    for url in (f"http://reader:{PASSWORD}@idp.example.com/jwks.json", f"https://reader:{PASSWORD}@idp.example.com:0/"):
        with pytest.raises(ConfigurationError) as refused:
            from_jwt_claim("org_id", jwks_url=url, algorithms=["RS256"])
        assert PASSWORD not in str(refused.value)
        assert "reader:***@idp.example.com" in str(refused.value)
