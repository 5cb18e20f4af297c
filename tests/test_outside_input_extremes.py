"""Input from outside the process at the extremes CPython reads it to: a Lago (or proxy) 429 whose ``Retry-After`` or
``X-RateLimit-Reset`` is ``inf``, ``1e999`` or a Unix time, relayed by the billing routes and held by the migration's
call counter; a JWT whose header is JSON nested deeper than the parser goes (PyJWT before 2.14 lets the parser's
``RecursionError`` out of ``jwt.decode`` and ``jwt.get_unverified_header``), sent to the webhook receiver and to
``from_jwt_claim(key=...)``."""

from __future__ import annotations

import base64
import logging
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, LagoClient, OrgBilling, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, get_current_org, reset_warnings
from lago_org_billing._migration import CallCounter
from lago_org_billing._routes import billing_routes
from lago_org_billing._webhooks import LagoWebhooks, WebhookEvent
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "outside-input-key"


class Throttling(httpx.AsyncBaseTransport):
    """The emulator behind a proxy that, once ``headers`` is set, answers every call 429 with those headers."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.headers: dict[str, str] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.headers is not None:
            body = {"status": 429, "error": "Too Many Requests", "code": "too_many_requests"}
            return httpx.Response(429, headers=self.headers, json=body)
        return await self.inner.handle_async_request(request)


# ------------------------------------------------------------------------------------------ routes: 429 relayed


@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": "inf"}, {"Retry-After": "Infinity"}, {"X-RateLimit-Reset": "1e999"}],
    ids=["retry-after-inf", "retry-after-infinity", "reset-1e999"],
)
async def test_routes_answer_429_when_lago_asks_an_infinite_wait(headers: dict[str, str]) -> None:
    """A 429 whose wait reads as infinite is answered 429 with a whole-number Retry-After, not a 500 (math.ceil(inf)
    raised OverflowError in the routes' error mapping)."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_plan("starter", amount_cents=1000)
    proxy = Throttling(fake.transport())
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=proxy) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=lambda request, org_id: True)
        app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            body = {"org_name": "Acme", "plan_code": "starter", "email": "billing@acme.test", "user_id": "ada"}
            assert (await client.post("/billing/organizations/org_acme/setup", json=body)).status_code == 200
            proxy.headers = headers
            response = await client.get("/billing/organizations/org_acme/subscription")
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"].isdigit() and int(response.headers["retry-after"]) >= 1
    assert response.json()["detail"] == "Lago is throttling requests; retry later."


# ------------------------------------------------------------------------------------ migration: 429 held once


class OnceThrottled(httpx.AsyncBaseTransport):
    """Lago answering the first call 429 with ``X-RateLimit-Reset: reset``, the others 200."""

    def __init__(self, reset: str) -> None:
        self.reset = reset
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls == 1:
            return httpx.Response(429, headers={"X-RateLimit-Reset": self.reset}, json={"status": 429})
        return httpx.Response(200, json={"customers": []})


@pytest.mark.parametrize("reset", ["inf", "1e999", "unix-time"])
async def test_migration_is_not_held_for_ever_by_an_unreadable_rate_limit_reset(reset: str) -> None:
    """A 429 whose X-RateLimit-Reset is infinite, or a proxy's Unix time of the reset (read as seconds to wait by the
    client, not by the migration's call counter), does not hold every later call of the run (each one timed out,
    every org after it failed) nor report an infinite or decades-long wait."""
    value = str(int(time.time()) + 2) if reset == "unix-time" else reset
    counter = CallCounter(OnceThrottled(value))
    waits: list[float] = []
    counter.on_rate_limit = waits.append
    request = httpx.Request("GET", "http://lago.test/api/v1/customers")
    assert (await counter.handle_async_request(request)).status_code == 429
    assert counter.stats.rate_limited == 1
    assert math.isfinite(counter.stats.rate_limit_wait_s) and counter.stats.rate_limit_wait_s <= 60
    assert len(waits) == 1 and math.isfinite(waits[0]) and waits[0] <= 60
    with anyio.fail_after(60):  # (a bound so that a held call fails the test rather than hang it)
        assert (await counter.handle_async_request(request)).status_code == 200


# -------------------------------------------------------------------------------- JWT headers nested too deeply


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


#: A token whose header is JSON nested 100,000 deep: anyone can send it, no key needed.
DEEP_TOKEN = ".".join((_segment(b"[" * 100_000 + b"]" * 100_000), _segment(b"{}"), _segment(b"signature")))


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


async def test_webhook_signed_with_a_deeply_nested_jwt_is_refused_401() -> None:
    """A webhook whose X-Lago-Signature is a JWT with a header nested too deeply is refused 401 invalid_signature,
    not answered 500 (PyJWT < 2.14 let json's RecursionError out of get_unverified_header)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    handled: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        handled.append(event)

    receiver = LagoWebhooks(
        BillingSettings(api_url="http://lago.test"), public_key=public.decode(), handlers={"*": handler}
    )
    app = Starlette(routes=[Route("/webhooks/lago", receiver, methods=["POST"])])
    headers = {
        "Content-Type": "application/json",
        "X-Lago-Signature": DEEP_TOKEN,
        "X-Lago-Signature-Algorithm": "jwt",
        "X-Lago-Unique-Key": "deep-1",
    }
    body = b'{"webhook_type":"subscription.started","object_type":"subscription","subscription":{}}'
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await client.post("/webhooks/lago", content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["status"] == "invalid_signature"
    assert handled == []


async def test_webhook_jwt_headers_nested_to_the_parsers_limit_are_refused_401() -> None:
    """Headers nested around the recursion limit, where json may read one in the first look at the header and fail
    in the verification a few frames deeper, are each refused 401, never answered 500 (PyJWT < 2.14)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    receiver = LagoWebhooks(BillingSettings(api_url="http://lago.test"), public_key=public.decode())
    app = Starlette(routes=[Route("/webhooks/lago", receiver, methods=["POST"])])
    limit = sys.getrecursionlimit()
    statuses: dict[int, int] = {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for depth in range(limit - 80, limit + 10):
            header = b'{"alg":"RS256","x":' + b"[" * depth + b"]" * depth + b"}"
            token = ".".join((_segment(header), _segment(b"{}"), _segment(b"signature")))
            headers = {"X-Lago-Signature": token, "X-Lago-Signature-Algorithm": "jwt"}
            response = await client.post("/webhooks/lago", content=b'{"webhook_type":"x"}', headers=headers)
            statuses[depth] = response.status_code
    assert {depth: status for depth, status in statuses.items() if status != 401} == {}


async def whoami(request: Request) -> Response:
    return JSONResponse({"org": get_current_org(request)})


async def test_bearer_jwt_nested_too_deeply_is_a_refused_token_not_a_broken_resolver(
    fake_lago: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """from_jwt_claim(key=...) refuses a bearer token whose header is nested too deeply as any malformed token
    (unresolved, said as a refused token); it did not log an ERROR with a traceback telling to "fix the resolver"
    (PyJWT < 2.14 let json's RecursionError out of jwt.decode). A good token still resolves."""
    fake_lago.add_billable_metric("api_call")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)
    secret = "an-hmac-secret-of-thirty-two-bytes!"
    app = Starlette(routes=[Route("/v1/whoami", whoami)])
    middleware = OrgBillingMiddleware(
        app,
        settings=settings,
        quota=None,
        transport=fake_lago.transport(),
        resolve_org=from_jwt_claim(key=secret, algorithms=["HS256"]),
    )
    good = jwt.encode({"org_id": "org_a"}, secret, algorithm="HS256")
    try:
        with caplog.at_level(logging.DEBUG, logger="lago_org_billing"):
            transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                deep = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {DEEP_TOKEN}"})
                genuine = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {good}"})
    finally:
        await middleware.aclose()
    assert (deep.status_code, deep.json()) == (200, {"org": None})
    assert (genuine.status_code, genuine.json()) == (200, {"org": "org_a"})
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
    assert any("refused by from_jwt_claim" in record.getMessage() for record in caplog.records)
