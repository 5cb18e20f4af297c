"""Identity resolution reviewed as a demanding user meets it.

- ``from_jwt_claim`` given the issuer's public key in the shapes people paste it in (a PEM whose newlines an env
  var turned into literal ``\\n`` or into spaces, a JWK / JWKS JSON from the issuer's ``jwks_uri``): with the PyJWT
  versions ``pyproject`` allows (>= 2.8, whose HMAC ``prepare_key`` refuses only a well-formed PEM or an ssh key),
  the key was taken as an HMAC *secret* and anyone who read the public key could mint tokens for any org; a key
  both HMAC and RSA could load made every HS256 token raise inside the resolver instead of resolving to ``None``.
- A claim nested in an object (Clerk's session tokens: ``{"o": {"id": "org_..."}}``) could not be read at all.
- Identity headers with non-ASCII ids: UTF-8 bytes were read as Latin-1, so ``X-Org-Id: société`` was billed to
  the org ``sociÃ©tÃ©`` (and ``東京`` was unresolved), never to the org ``request.state`` or the migration names.
- A custom resolver returning something that is not an id (``bytes`` read straight from ``scope["headers"]``, a
  ``(org, user)`` tuple) left every request silently unresolved: now it is said once, with what to return; so is a
  ``membership_check`` answering something other than ``True``/``False`` (``None`` from a forgotten ``return``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Iterator
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

from lago_org_billing import ConfigurationError, OrgBillingMiddleware
from lago_org_billing._identity import (
    call_resolver,
    default_identity,
    first_of,
    from_header,
    from_jwt_claim,
    get_current_org,
    reset_warnings,
)
from lago_org_billing._settings import BillingSettings

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(private: rsa.RSAPrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hs256_forgery(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token signed by hand with ``secret``, as an attacker would (no PyJWT key checks)."""
    signing_input = _b64url(b'{"alg":"HS256","typ":"JWT"}') + b"." + _b64url(json.dumps(claims).encode())
    signature = _b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode("ascii")


def scope_with(headers: list[tuple[bytes, bytes]], **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": headers, **extra}


def bearer_scope(token: str) -> dict[str, Any]:
    return scope_with([(b"authorization", b"Bearer " + token.encode("ascii"))])


_PYJWT_28_PEM = re.compile(rb"----[- ]BEGIN [A-Z0-9 ]+[- ]----\r?\n.+?\r?\n----[- ]END [A-Z0-9 ]+[- ]----", re.DOTALL)


@pytest.fixture
def pyjwt_28_hmac(monkeypatch: pytest.MonkeyPatch) -> None:
    """HMAC keys prepared as PyJWT 2.8 (the oldest version ``pyproject`` accepts) prepares them: only a PEM with
    real line breaks or an ssh key is refused as a secret; a JWK JSON or a PEM flattened by an env var is a secret.
    (Checked against a real PyJWT 2.8.0 too; the installed PyJWT refuses more, which hid the hole.)"""

    def prepare_key(self: Any, key: str | bytes) -> bytes:
        key_bytes = key.encode("utf-8") if isinstance(key, str) else key
        if not isinstance(key_bytes, bytes):
            raise TypeError("Expected a string value")
        if _PYJWT_28_PEM.search(key_bytes) or key_bytes.startswith((b"ssh-rsa", b"ssh-ed25519", b"ecdsa-sha2-")):
            raise jwt.InvalidKeyError("The specified key is an asymmetric key or x509 certificate")
        return key_bytes

    monkeypatch.setattr(jwt.algorithms.HMACAlgorithm, "prepare_key", prepare_key)


# ------------------------------------------------------------------- public keys in pasted shapes: alg confusion


def _pasted_shapes(private: rsa.RSAPrivateKey) -> dict[str, str]:
    pem = _public_pem(private)
    return {
        "pem-escaped-newlines": pem.replace("\n", "\\n"),  # LAGO-style .env / Kubernetes secret written by hand
        "jwk-json": jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()),  # one key of the issuer's jwks_uri
    }


@pytest.mark.parametrize("shape", ["pem-escaped-newlines", "jwk-json"])
async def test_public_key_in_a_pasted_shape_is_not_an_hmac_secret(
    fake_lago: Any, pyjwt_28_hmac: None, rsa_private: rsa.RSAPrivateKey, shape: str
) -> None:
    """Observed (PyJWT 2.8): ``from_jwt_claim(key=<public key>)`` with the default ``("HS256", "RS256")`` kept HS256
    only, with the public text as the secret: an HS256 token forged with it was billed to ``org_b``, and the issuer's
    real RS256 tokens were unresolved. Expected: the key is loaded as the public key it is (RS256), the forgery is
    unresolved."""
    fake_lago.add_plan("starter", amount_cents=0)
    for org in ("org_a", "org_b"):
        fake_lago.add_subscription(org, "starter", external_id=org)
    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, quota_mode="off", retry_backoff=0.001
    )
    key = _pasted_shapes(rsa_private)[shape]
    forged = hs256_forgery(key.encode("utf-8"), {"org_id": "org_b"})
    real = jwt.encode({"org_id": "org_a"}, rsa_private, algorithm="RS256")

    async def whoami(request: Request) -> Response:
        return JSONResponse({"org": get_current_org(request)})

    app = Starlette(routes=[Route("/v1/whoami", whoami)])
    middleware = OrgBillingMiddleware(
        app, settings=settings, transport=fake_lago.transport(), resolve_org=from_jwt_claim(key=key)
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            attack = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {forged}"})
            genuine = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {real}"})
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert attack.json() == {"org": None}
    assert genuine.json() == {"org": "org_a"}
    assert [event["external_subscription_id"] for event in fake_lago.events] == ["org_a"]


def test_pem_with_escaped_newlines_loads_with_the_installed_pyjwt_too(rsa_private: rsa.RSAPrivateKey) -> None:
    """With the installed PyJWT the same key was a ConfigurationError ("a key PyJWT cannot load"), though it is an
    unambiguous PEM: it verifies the issuer's tokens now."""
    resolve = from_jwt_claim(key=_public_pem(rsa_private).replace("\n", "\\n"))
    assert resolve(bearer_scope(jwt.encode({"org_id": "org_a"}, rsa_private, algorithm="RS256"))) == "org_a"


def test_a_jwks_with_several_keys_is_refused_saying_to_pass_one(rsa_private: rsa.RSAPrivateKey) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_private.public_key()))
    jwks = json.dumps({"keys": [jwk, {**jwk, "kid": "next"}]})
    with pytest.raises(ConfigurationError, match="one key"):
        from_jwt_claim(key=jwks)


def test_a_private_jwk_is_refused(rsa_private: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigurationError, match="PUBLIC key"):
        from_jwt_claim(key=jwt.algorithms.RSAAlgorithm.to_jwk(rsa_private))


def test_an_oct_jwk_verifies_with_its_secret_not_its_json() -> None:
    """A symmetric JWK holds the secret base64url-encoded in ``k``: tokens are signed with those bytes."""
    secret = b"an-hmac-secret-that-is-long-enough-for-hs256"
    jwk = json.dumps({"kty": "oct", "k": _b64url(secret).decode("ascii")})
    resolve = from_jwt_claim(key=jwk, algorithms=["HS256"])
    assert resolve(bearer_scope(jwt.encode({"org_id": "org_a"}, secret, algorithm="HS256"))) == "org_a"
    assert resolve(bearer_scope(hs256_forgery(jwk.encode("ascii"), {"org_id": "org_b"}))) is None


def test_a_key_both_hmac_and_rsa_load_is_only_a_public_key(
    pyjwt_28_hmac: None, rsa_private: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """A PEM whose newlines became spaces (docker-compose, some CI secret stores): PyJWT 2.8 takes it as an HMAC
    secret and cryptography loads it as an RSA key, so both algorithms were kept with the RSA key object: every
    HS256 token then raised TypeError inside the resolver (logged at ERROR as a resolver bug, and in a first_of
    chain the later resolvers never ran). Expected: RS256 only; an HS256 token is an ordinary refusal."""
    key = _public_pem(rsa_private).replace("\n", " ")
    resolve = from_jwt_claim(key=key)
    forged = hs256_forgery(key.encode("ascii"), {"org_id": "org_b"})
    assert resolve(bearer_scope(forged)) is None
    assert resolve(bearer_scope(jwt.encode({"org_id": "org_a"}, rsa_private, algorithm="RS256"))) == "org_a"


# ------------------------------------------------------------------------------------------------ nested claims


SECRET = "test-secret-that-is-long-enough-for-hs256"


def test_a_claim_nested_in_an_object_is_read_with_a_dotted_path() -> None:
    """Clerk's session tokens (v2) carry the org as ``{"o": {"id": "org_..."}}``; there was no way to read it."""
    token = jwt.encode({"sub": "user_1", "o": {"id": "org_a", "rol": "admin"}}, SECRET, algorithm="HS256")
    assert from_jwt_claim("o.id", key=SECRET)(bearer_scope(token)) == "org_a"
    assert from_jwt_claim("o.rol.x", key=SECRET)(bearer_scope(token)) is None
    assert from_jwt_claim("o", key=SECRET)(bearer_scope(token)) is None  # an object is not an id


def test_a_claim_whose_name_has_dots_is_still_read_as_it_is() -> None:
    """Auth0's namespaced claims are URLs (``https://example.com/org_id``): the literal name comes first."""
    claims = {"https://example.com/org_id": "org_a", "a.b": "org_literal", "a": {"b": "org_nested"}}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert from_jwt_claim("https://example.com/org_id", key=SECRET)(bearer_scope(token)) == "org_a"
    assert from_jwt_claim("a.b", key=SECRET)(bearer_scope(token)) == "org_literal"


# ------------------------------------------------------------------------------------------ non-ASCII header ids


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("société".encode(), "société"),  # UTF-8, as curl, httpx and most servers-to-server clients send it
        ("東京-tenant".encode(), "東京-tenant"),  # UTF-8 with bytes that read as Latin-1 control characters
        ("société".encode("latin-1"), "société"),  # Latin-1, as a browser's fetch() sends it (not valid UTF-8)
        (b"org_a", "org_a"),
    ],
)
async def test_non_ascii_header_ids_are_the_ids_the_client_meant(raw: bytes, expected: str) -> None:
    """Observed: UTF-8 ``société`` resolved to ``sociÃ©tÃ©`` (another customer than the one the app's auth or the
    migration names), ``東京-tenant`` to ``None``. The default hot path and ``from_header`` agree."""
    scope = scope_with([(b"x-org-id", raw), (b"x-user-id", raw)])
    assert await call_resolver(from_header("X-Org-Id"), scope) == expected
    identify = default_identity(BillingSettings(org_header="X-Org-Id", user_header="X-User-Id"))
    assert identify(scope) == (expected, expected)
    assert identify(scope) == (expected, expected)  # (and once remembered)


async def test_a_utf8_org_header_is_billed_to_that_org(fake_lago: Any, header_settings: BillingSettings) -> None:
    fake_lago.add_subscription("société", "starter", external_id="société")

    async def whoami(request: Request) -> Response:
        return JSONResponse({"org": get_current_org(request)})

    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/whoami", whoami)]), settings=header_settings, transport=fake_lago.transport()
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.get("/v1/whoami", headers={"X-Org-Id": "société".encode()})
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert response.json() == {"org": "société"}
    assert [event["external_subscription_id"] for event in fake_lago.events] == ["société"]


# ------------------------------------------------------------------------- custom resolvers returning non-ids


def _bytes_resolver(scope: Any) -> Any:
    return dict(scope["headers"]).get(b"x-tenant")  # bytes: the usual slip


def _pair_resolver(scope: Any) -> Any:
    return ("org_a", "user_1")


async def _async_bytes_resolver(scope: Any) -> Any:
    return b"org_a"


@pytest.mark.parametrize(
    ("resolver", "kind"),
    [(_bytes_resolver, "bytes"), (_pair_resolver, "tuple"), (_async_bytes_resolver, "bytes")],
)
async def test_a_resolver_returning_a_non_id_is_said_once(
    resolver: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Observed: unresolved, with nothing logged (with ``LAGO_ON_UNRESOLVED=allow``, every request served unbilled).
    Expected: still unresolved (no guessing at an encoding or which element), said once at WARNING with the fix."""
    scope = scope_with([(b"x-tenant", b"org_a")])
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        assert await call_resolver(resolver, scope) is None
        assert await call_resolver(resolver, scope) is None
        assert await call_resolver(first_of(resolver), scope) is None
    said = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(said) == 1, said
    message = said[0].getMessage()
    assert resolver.__name__ in message and kind in message and "str" in message


async def test_resolvers_returning_ids_or_none_stay_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing.identity"):
        for value in (None, "", "  ", 42, False, "x" * 300):
            await call_resolver(lambda scope, value=value: value, scope_with([]))
    assert caplog.records == []


@pytest.mark.parametrize("answer", [None, "yes", 1])
async def test_a_membership_check_answering_a_non_bool_is_said_once(
    answer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A check that forgot its ``return`` (``None``) or returns a row or ``1`` rejects every org (it must say
    ``True``), which was logged at DEBUG only: every header-named request unresolved without a word."""

    def member_check(scope: Any, org_id: str) -> Any:
        return answer

    resolver = from_header("X-Org-Id", membership_check=member_check)
    scope = scope_with([(b"x-org-id", b"org_a")])
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.identity"):
        assert await call_resolver(resolver, scope) is None
        assert await call_resolver(resolver, scope) is None
    said = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(said) == 1 and "member_check" in said[0] and "True" in said[0], said


async def test_a_membership_check_saying_false_stays_quiet(caplog: pytest.LogCaptureFixture) -> None:
    resolver = from_header("X-Org-Id", membership_check=lambda scope, org_id: False)
    with caplog.at_level(logging.INFO, logger="lago_org_billing.identity"):
        assert await call_resolver(resolver, scope_with([(b"x-org-id", b"org_a")])) is None
    assert caplog.records == []
