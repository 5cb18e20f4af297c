"""Identity resolution as an attacker sees it: ``from_jwt_claim`` given the issuer's public key as bare
base64 (Keycloak's "Public key" / "Certificate" buttons, a JWKS ``x5c`` entry), which was taken as an HMAC secret
and let anyone who read the public key mint tokens for any org; ``leeway`` and ``claim`` values that disable the
expiry check or fail every request instead of being refused up front; ``from_user`` users whose
``is_authenticated`` is a method or a mapping item (unauthenticated users billed to the org they name)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import math
import types
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, from_user, get_current_org, reset_warnings, resolve_now

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


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
        kwargs.setdefault("quota", None)
        middleware = OrgBillingMiddleware(app, transport=fake_lago.transport(), **kwargs)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        await middleware.aclose()


async def whoami(request: Request) -> Response:
    return JSONResponse({"org": get_current_org(request)})


def billed(fake_lago: Any) -> list[str]:
    return [event["external_subscription_id"] for event in fake_lago.events]


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hs256_forgery(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token signed with ``secret``, made by hand as an attacker would (PyJWT refuses to sign with a key
    that looks like a public key; the attacker does not use PyJWT)."""
    signing_input = _b64url(b'{"alg":"HS256","typ":"JWT"}') + b"." + _b64url(json.dumps(claims).encode())
    signature = _b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode("ascii")


def _certificate_der(private: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def _bare_public_key(private: rsa.RSAPrivateKey) -> str:
    """The public key as Keycloak's realm "Public key" button shows it: base64 DER, no PEM armour."""
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


# ------------------------------------------------------------- the public key as bare base64: alg confusion


@pytest.mark.parametrize("form", ["public-key", "certificate", "public-key-bytes", "certificate-wrapped"])
async def test_bare_base64_public_key_is_not_an_hmac_secret_anyone_can_sign_with(
    fake_lago: Any, make_middleware: Callable[..., OrgBillingMiddleware], rsa_private: rsa.RSAPrivateKey, form: str
) -> None:
    """Keycloak shows a realm's public key and certificate as bare base64 (no ``-----BEGIN...`` lines), and JWKS
    ``x5c`` entries are the same. ``from_jwt_claim(key=that)`` with the default ``algorithms=("HS256", "RS256")``
    could not load it as an RSA key, but took it as an HMAC *secret*: HS256 was kept, RS256 dropped, and no error.
    The key is public, so anyone could sign an HS256 token naming any org and be billed (and gated) as it.

    Observed: a forged HS256 token billed to ``org_b``; the IdP's real RS256 token unresolved. Expected: the key is
    loaded as the public key it is: the forgery is unresolved, the real token billed."""
    if form.startswith("public-key"):
        key: str | bytes = _bare_public_key(rsa_private)
    else:
        key = base64.b64encode(_certificate_der(rsa_private)).decode("ascii")
        if form == "certificate-wrapped":  # as copied from a file wrapped at 64 columns
            key = "\n".join(key[i : i + 64] for i in range(0, len(key), 64)) + "\n"
    if form.endswith("bytes"):
        key = key.encode("ascii")
    secret = key if isinstance(key, bytes) else key.encode("ascii")
    forged = hs256_forgery(secret, {"org_id": "org_b"})
    real = jwt.encode({"org_id": "org_a"}, rsa_private, algorithm="RS256")

    middleware = make_middleware(Starlette(routes=[Route("/v1/whoami", whoami)]), resolve_org=from_jwt_claim(key=key))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
        attack = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {forged}"})
        genuine = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {real}"})
    assert await middleware.pipeline.flush(5)
    assert (attack.status_code, attack.json()) == (200, {"org": None})
    assert (genuine.status_code, genuine.json()) == (200, {"org": "org_a"})
    assert billed(fake_lago) == ["org_a"]


def test_bare_base64_public_key_with_only_hmac_algorithms_is_refused(rsa_private: rsa.RSAPrivateKey) -> None:
    """``algorithms=["HS256"]`` with the issuer's bare base64 public key is the same attack spelled out: refused,
    saying which algorithms the key fits."""
    with pytest.raises(ConfigurationError, match=r"RS256"):
        from_jwt_claim(key=_bare_public_key(rsa_private), algorithms=["HS256"])


def test_bare_base64_ec_key_loads_for_its_algorithm() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    resolver = from_jwt_claim(key=base64.b64encode(der).decode("ascii"), algorithms=["ES256", "HS256"])
    token = jwt.encode({"org_id": "acme"}, private, algorithm="ES256")
    forged = hs256_forgery(base64.b64encode(der), {"org_id": "acme"})
    assert (
        resolve_now(resolver, {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}) == "acme"
    )
    assert resolve_now(resolver, {"type": "http", "headers": [(b"authorization", f"Bearer {forged}".encode())]}) is None


def test_an_hmac_secret_that_happens_to_be_base64_is_still_a_secret() -> None:
    """A random secret written as base64 (``openssl rand -base64 48``) is no public key: it stays an HMAC secret."""
    secret = base64.b64encode(bytes(range(48))).decode("ascii")
    token = jwt.encode({"org_id": "acme"}, secret, algorithm="HS256")
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    assert resolve_now(from_jwt_claim(key=secret), scope) == "acme"


# ------------------------------------------------------------------ options that disable a check or fail every request


def test_nan_leeway_no_longer_lets_expired_tokens_through() -> None:
    """``leeway=float("nan")`` (e.g. parsed from an unset env var) made every comparison false: an expired token
    (``exp`` in 1970) resolved its org forever. Now refused up front."""
    secret = "s" * 40
    token = jwt.encode({"org_id": "acme", "exp": 1}, secret, algorithm="HS256")
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    try:
        resolver = from_jwt_claim(key=secret, leeway=math.nan)
    except ConfigurationError:
        return
    assert resolve_now(resolver, scope) is None  # pragma: no cover - the expired token must not resolve


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"leeway": math.nan}, id="leeway-nan"),
        pytest.param({"leeway": math.inf}, id="leeway-inf"),
        pytest.param({"leeway": -30}, id="leeway-negative"),
        pytest.param({"leeway": "30"}, id="leeway-str"),
        pytest.param({"leeway": True}, id="leeway-bool"),
        pytest.param({"leeway": dt.timedelta(seconds=-1)}, id="leeway-negative-timedelta"),
        pytest.param({"claim": ["org_id"]}, id="claim-list"),
        pytest.param({"claim": b"org_id"}, id="claim-bytes"),
    ],
)
def test_jwt_options_that_break_every_request_are_configuration_errors(options: dict[str, Any]) -> None:
    """A ``leeway`` that is not a finite number of seconds >= 0 (or a timedelta), or a ``claim`` that is not a
    str, was accepted: each request then raised inside the resolver (logged, unresolved) or, for NaN/inf, the
    expiry check was off. The docstring promises a ConfigurationError for what could never verify a token."""
    with pytest.raises(ConfigurationError):
        from_jwt_claim(key="s" * 40, **options)


def test_valid_leeways_still_accepted() -> None:
    secret = "s" * 40
    token = jwt.encode({"org_id": "acme", "exp": 10**10}, secret, algorithm="HS256")
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    for leeway in (0, 30, 1.5, dt.timedelta(seconds=10)):
        assert resolve_now(from_jwt_claim(key=secret, leeway=leeway), scope) == "acme"


# ------------------------------------------------------------------------ from_user: who counts as authenticated


class LegacyUser:
    """A user class whose ``is_authenticated`` is a method (Django < 1.10 style, Flask-Login < 0.3)."""

    def __init__(self, authenticated: bool) -> None:
        self._authenticated = authenticated
        self.org_id = "org_b"

    def is_authenticated(self) -> bool:
        return self._authenticated


class SetUser:
    """An auth middleware that puts ``make()`` in ``scope["user"]``."""

    def __init__(self, app: Any, make: Callable[[], Any]) -> None:
        self.app = app
        self.make = make

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["user"] = self.make()
        await self.app(scope, receive, send)


@pytest.mark.parametrize(
    "make_user",
    [
        pytest.param(lambda: LegacyUser(False), id="is_authenticated-method"),
        pytest.param(lambda: {"is_authenticated": False, "org_id": "org_b"}, id="mapping-user"),
        pytest.param(lambda: types.MappingProxyType({"is_authenticated": False, "org_id": "org_b"}), id="proxy"),
    ],
)
async def test_unauthenticated_users_are_not_billed_to_the_org_they_name(
    fake_lago: Any, make_middleware: Callable[..., OrgBillingMiddleware], make_user: Callable[[], Any]
) -> None:
    """``from_user`` documents that users whose ``is_authenticated`` is false resolve to None. A user whose
    ``is_authenticated`` is a method returning False (a bound method is truthy) and a mapping user with
    ``"is_authenticated": False`` were both billed to the org they named.

    Observed: 200 billed to ``org_b``. Expected: unresolved (not billed)."""
    middleware = make_middleware(Starlette(routes=[Route("/v1/whoami", whoami)]))
    app = SetUser(middleware, make_user)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/v1/whoami")
    assert await middleware.pipeline.flush(5)
    assert (response.status_code, response.json()) == (200, {"org": None})
    assert billed(fake_lago) == []


@pytest.mark.parametrize(
    "user",
    [
        pytest.param(LegacyUser(True), id="is_authenticated-method"),
        pytest.param({"is_authenticated": True, "org_id": "org_b"}, id="mapping-user"),
        pytest.param({"org_id": "org_b"}, id="mapping-user-without-flag"),
    ],
)
def test_authenticated_users_still_resolve(user: Any) -> None:
    assert resolve_now(from_user(), {"type": "http", "user": user}) == "org_b"


def test_is_authenticated_method_that_raises_is_unresolved() -> None:
    class Broken:
        org_id = "org_b"

        def is_authenticated(self) -> bool:
            raise RuntimeError("session store down")

    assert resolve_now(from_user(), {"type": "http", "user": Broken()}) is None
