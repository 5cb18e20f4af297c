"""The webhook receiver as a real Lago instance drives it: both signature schemes, Lago's retries and
their dedupe, out-of-order deliveries, which webhook types invalidate which org's quota state, status codes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import needs_redis
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._webhooks import LagoWebhooks, RedisDedupe, WebhookEvent, sign_hmac
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._webhooks import WebhookDispatcher

pytestmark = pytest.mark.anyio

HMAC_KEY = "5d1c0f7e-review-webhooks-hmac"
LAGO_URL = "http://lago.review"
PATH = "/webhooks/lago"
SETTINGS = BillingSettings(api_url=LAGO_URL, api_key="review-api-key", max_retries=0)
LIMITS = {"starter": {"max_api_calls": 3}, "pro": {"max_api_calls": 100}}


def _pem_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.fixture(scope="module")
def pems() -> tuple[bytes, bytes]:
    return _pem_pair()


class Recorder:
    def __init__(self) -> None:
        self.events: list[WebhookEvent] = []
        self.invalidated: list[str] = []
        self.all = 0

    async def handler(self, event: WebhookEvent) -> None:
        self.events.append(event)

    async def invalidate(self, org_id: str) -> None:
        self.invalidated.append(org_id)

    async def invalidate_all(self) -> None:
        self.all += 1


def app_for(receiver: LagoWebhooks) -> Starlette:
    return Starlette(routes=[Route(PATH, receiver, methods=["POST"])])


@pytest.fixture
async def post() -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def send(receiver: LagoWebhooks, body: Any, headers: dict[str, str]) -> httpx.Response:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app_for(receiver)), base_url="http://app")
        clients.append(client)
        return await client.post(PATH, content=body, headers=headers)

    yield send
    for client in clients:
        await client.aclose()


def envelope(webhook_type: str, object_type: str, obj: dict[str, Any], **extra: Any) -> bytes:
    payload = {
        "webhook_type": webhook_type,
        "object_type": object_type,
        "organization_id": "lago-org",
        object_type: obj,
    }
    payload.update(extra)
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def hmac_headers(body: bytes, unique_key: str | None = None, key: str = HMAC_KEY) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": sign_hmac(body, key),
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
    }


def jwt_headers(body: bytes, private: bytes, unique_key: str | None = None, **claims: Any) -> dict[str, str]:
    token = jwt.encode({"data": body.decode(), "iss": LAGO_URL, **claims}, private, algorithm="RS256")
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": token,
        "X-Lago-Signature-Algorithm": "jwt",
        "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
    }


def hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 JWT (PyJWT refuses to make one with a PEM key: the classic key-confusion forgery)."""
    import base64
    import hashlib
    import hmac

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = part(b'{"alg":"HS256","typ":"JWT"}') + b"." + part(json.dumps(claims).encode())
    return (signing + b"." + part(hmac.new(secret, signing, hashlib.sha256).digest())).decode()


def hmac_receiver(rec: Recorder, **options: Any) -> LagoWebhooks:
    options.setdefault("invalidate", rec)
    return LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"*": rec.handler}, **options)


def sub_body(webhook_type: str, org: str, plan: str = "pro", **fields: Any) -> bytes:
    return envelope(
        webhook_type,
        "subscription",
        {"external_id": org, "external_customer_id": org, "plan_code": plan, "status": "active", **fields},
    )


def make_fake() -> FakeLago:
    fake = FakeLago(api_key="test-api-key")
    fake.add_billable_metric("api_call")
    fake.add_feature("api_quota", privileges=[{"code": "max_api_calls", "value_type": "integer"}])
    for code, amount in (("starter", 1000), ("pro", 5000)):
        fake.add_plan(code, amount_cents=amount, charges=[CHARGE])
    return fake


CHARGE = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.01"}}


def settings_for(fake: FakeLago) -> BillingSettings:
    return BillingSettings(
        api_url=fake.base_url, api_key=fake.api_key, max_retries=0, usage_cache_ttl=3600, plan_limits=LIMITS
    )


def dispatcher_of(fake: FakeLago) -> WebhookDispatcher:
    dispatcher = fake.webhook_dispatcher
    assert isinstance(dispatcher, WebhookDispatcher)
    return dispatcher


def limit_of(decision: Any) -> bytes:
    value: bytes = dict(decision.headers)[b"ratelimit-limit"]
    return value


# --------------------------------------------------------------------------------------- signatures: JWT


async def test_jwt_signature_checks_as_lago_signs(post: Any, pems: tuple[bytes, bytes]) -> None:
    """Lago's JWT (RS256, ``data`` = the raw body, no exp) verifies whatever the header names' case and a non-ASCII
    body; a re-serialised body, another algorithm, an expired or not-yet-valid token are refused (401)."""
    private, public = pems
    rec = Recorder()
    receiver = LagoWebhooks(
        SETTINGS, public_key=public, invalidate=rec, handlers={"*": rec.handler}, organization_id="lago-org"
    )
    body = sub_body("subscription.updated", "acme.eu/team-ü", name="Ünïcødé \u2014 日本 \u2028 <&>")
    upper = {name.upper(): value for name, value in jwt_headers(body, private).items()}
    assert (await post(receiver, body, upper)).status_code == 200
    lower = {name.lower(): value for name, value in jwt_headers(body, private).items()}
    assert (await post(receiver, body, lower)).status_code == 200
    assert rec.invalidated == ["acme.eu/team-ü", "acme.eu/team-ü"]

    escaped = json.dumps(json.loads(body), separators=(",", ":")).encode()  # \u-escaped: same JSON, other bytes
    spaced = json.dumps(json.loads(body), ensure_ascii=False).encode()
    hs256 = hs256_with(public, {"data": body.decode(), "iss": LAGO_URL})  # the public key as an HMAC secret
    refused = [
        (escaped, jwt_headers(body, private)),
        (spaced, jwt_headers(body, private)),
        (body, jwt_headers(body, private, exp=1)),
        (body, jwt_headers(body, private, nbf=4102444800)),
        (body, {"X-Lago-Signature": hs256, "X-Lago-Unique-Key": "hs256"}),
        (body, hmac_headers(body)),  # an HMAC delivery to a JWT receiver
    ]
    for sent, headers in refused:
        response = await post(receiver, sent, headers)
        assert response.status_code == 401, response.text
    assert len(rec.events) == 2


# -------------------------------------------------------------------------------------- signatures: HMAC


async def test_hmac_over_raw_bytes_whatever_the_header_case(post: Any) -> None:
    """HMAC-SHA256 over the raw body bytes (UTF-8, non-ASCII kept), base64: verified in any header case; the
    same JSON re-serialised, or signed with the API key instead of the HMAC token, is 401."""
    rec = Recorder()
    receiver = hmac_receiver(rec)
    body = sub_body("subscription.started", "acme.com/eu", name="Zürich 東京")
    headers = {name.lower(): value for name, value in hmac_headers(body).items()}
    assert (await post(receiver, body, headers)).json()["status"] == "processed"
    assert rec.invalidated == ["acme.com/eu"]
    reserialised = json.dumps(json.loads(body)).encode()
    assert (await post(receiver, reserialised, hmac_headers(body))).status_code == 401
    assert (await post(receiver, body, hmac_headers(body, key=SETTINGS.api_key or ""))).status_code == 401
    assert len(rec.events) == 1


# ------------------------------------------------------------------------------------------ answers


async def test_answers_lago_needs(post: Any) -> None:
    """2xx for what must not be retried (an ignored type, a duplicate), 400 for a signed non-webhook, 413 for a
    body over the cap even when streamed without Content-Length (read no further), 401 unsigned."""
    rec = Recorder()
    receiver = hmac_receiver(rec, max_body_size=64 * 1024)
    wallet = envelope("wallet.depleted_ongoing_balance", "wallet", {"external_customer_id": "org_a"})
    assert (await post(LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY)), wallet, hmac_headers(wallet))).json()[
        "status"
    ] == "ignored"
    for bad in (b"{not json", b"[1]", b'{"object_type":"customer"}', b"\xff\xfe"):
        assert (await post(receiver, bad, hmac_headers(bad))).status_code == 400
    chunks_read = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal chunks_read
        for _ in range(1000):
            chunks_read += 1
            yield b"x" * 16 * 1024

    assert (await post(receiver, stream(), {"X-Lago-Signature": "x"})).status_code == 413
    assert chunks_read < 10
    assert (await post(receiver, wallet, {"X-Lago-Unique-Key": "u"})).status_code == 401
    assert rec.events == []


# -------------------------------------------------------------------------------------------- dedupe


async def test_a_retry_concurrent_with_its_first_attempt_on_another_worker_is_409_then_duplicate(
    post: Any, redis_url: str
) -> None:
    """Two workers sharing Redis: Lago's retry reaching worker B while worker A still runs the first attempt is 409
    (Lago retries again), then a duplicate (200) once A is done; a worker started afterwards (a restart) still
    knows it. The handler ran once."""
    prefix = f"review:{uuid.uuid4().hex}:"
    entered, release = anyio.Event(), anyio.Event()
    runs: list[str] = []

    async def slow(event: WebhookEvent) -> None:
        runs.append(event.unique_key or "")
        entered.set()
        await release.wait()

    def worker() -> LagoWebhooks:
        return LagoWebhooks(
            SETTINGS.replace(webhook_hmac_key=HMAC_KEY),
            dedupe=RedisDedupe(redis_url, prefix=prefix),
            handlers={"subscription.started": slow},
        )

    a, b = worker(), worker()
    body = sub_body("subscription.started", "org_a")
    headers = hmac_headers(body, unique_key=str(uuid.uuid4()))
    first: list[httpx.Response] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def attempt() -> None:
                first.append(await post(a, body, headers))

            tg.start_soon(attempt)
            await entered.wait()
            assert (await post(b, body, headers)).status_code == 409
            release.set()
    assert first[0].json()["status"] == "processed"
    assert (await post(b, body, headers)).json()["status"] == "duplicate"
    restarted = worker()
    assert (await post(restarted, body, headers)).json()["status"] == "duplicate"
    assert len(runs) == 1
    for receiver in (a, b, restarted):
        assert isinstance(receiver._dedupe, RedisDedupe)
        await receiver._dedupe.aclose()


# ------------------------------------------------------------------------------ quota state, end to end


async def test_an_older_delivery_after_a_newer_one_does_not_roll_the_plan_back() -> None:
    """An upgrade's webhooks, then an older subscription.updated (the starter one) arriving last: the gate re-reads
    Lago rather than trusting the payload, so the org keeps pro's limit. A user's handler raising on the first
    attempt still let the invalidation happen (and Lago's retry runs it again)."""
    fake = make_fake()
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter")
    settings = settings_for(fake)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        failures = [RuntimeError("the user's handler broke")]

        async def flaky(event: WebhookEvent) -> None:
            if failures:
                raise failures.pop()

        receiver = LagoWebhooks(client=lago, invalidate=gate, handlers={"subscription.started": flaky})
        dispatcher = dispatcher_of(fake)
        dispatcher.configure(app=app_for(receiver))
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            assert limit_of(await gate.check("org_a")) == b"3"
            await lago.update_subscription("org_a", name="old")  # an older subscription.updated (starter)
            [stale] = await dispatcher.deliver_pending()
            await lago.create_subscription(external_customer_id="org_a", plan_code="pro", external_id="org_a")
            upgrade = await dispatcher.deliver_pending()
            assert [(d.webhook_type, d.history) for d in upgrade][:2] == [
                ("subscription.terminated", [200]),
                ("subscription.started", [500, 200]),
            ]
            assert limit_of(await gate.check("org_a")) == b"100"
            again = dispatcher.emit(stale.webhook_type, stale.object_type, stale.payload["subscription"])
            assert again is not None and "starter" in again.body.decode()
            [late] = await dispatcher.deliver_pending()
            assert late.history == [200]
            assert limit_of(await gate.check("org_a")) == b"100"
            await gate.aclose()
            tg.cancel_scope.cancel()


async def test_which_types_invalidate_which_org(post: Any) -> None:
    """subscription.*, alert.triggered and usage thresholds invalidate the org they name (its customer
    external_id, dots and slashes kept); plan/feature changes every org; customer, invoice, wallet, credit note
    and payment webhooks nothing (the gate reads no wallet, invoice or customer data)."""
    rec = Recorder()
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), invalidate=rec)
    org = "acme.com/eu:1"
    per_org = [
        *(
            sub_body(t, org)
            for t in (
                "subscription.started",
                "subscription.updated",
                "subscription.terminated",
                "subscription.canceled",
                "subscription.incomplete",
                "subscription.trial_ended",
                "subscription.usage_threshold_reached",
            )
        ),
        envelope("alert.triggered", "triggered_alert", {"external_customer_id": org, "external_subscription_id": org}),
    ]
    org_wide = [
        envelope(t, t.split(".")[0], {"code": "x"}) for t in ("plan.updated", "plan.deleted", "feature.updated")
    ]
    neither = [
        envelope("customer.updated", "customer", {"external_id": org}),
        envelope("invoice.created", "invoice", {"customer": {"external_id": org}}),
        envelope("wallet.depleted_ongoing_balance", "wallet", {"external_customer_id": org}),
        envelope("credit_note.created", "credit_note", {"customer": {"external_id": org}}),
        envelope("wallet_transaction.created", "wallet_transaction", {"external_customer_id": org}),
    ]
    for body in [*per_org, *org_wide, *neither]:
        assert (await post(receiver, body, hmac_headers(body))).status_code == 200
    assert rec.invalidated == [org] * len(per_org)
    assert rec.all == len(org_wide)


# ----------------------------------------------------------------------------------------------- findings


@pytest.mark.parametrize("form", ["base64", "ruby_base64"])
async def test_public_key_kept_as_lago_serves_it_verifies(post: Any, pems: tuple[bytes, bytes], form: str) -> None:
    """Lago serves its public key base64-encoded (``GET /webhooks/public_key``, ``json_public_key``; Ruby's
    Base64.encode64 adds a newline every 60 characters) and its docs say to keep it: passed as kept,
    ``LagoWebhooks(public_key=...)`` crashed on every webhook (an unhandled LagoIntegrationError, a 500), so every
    delivery failed until Lago gave up."""
    import base64

    private, public = pems
    encoded = base64.b64encode(public).decode()
    kept = encoded if form == "base64" else "".join(encoded[i : i + 60] + "\n" for i in range(0, len(encoded), 60))
    rec = Recorder()
    receiver = LagoWebhooks(SETTINGS, public_key=kept, invalidate=rec, organization_id="lago-org")
    body = sub_body("subscription.updated", "org_a")
    response = await post(receiver, body, jwt_headers(body, private))
    assert (response.status_code, response.json()["status"]) == (200, "processed")
    assert rec.invalidated == ["org_a"]
    assert receiver.stats["key_fetches"] == 0


def test_a_public_key_that_is_no_key_is_refused_when_the_receiver_is_made() -> None:
    """A static key that is not a public key (a truncated paste, the private key's path...) is a ConfigurationError
    at construction, at deploy time, rather than a 500 on every webhook once Lago sends them."""
    from lago_org_billing import ConfigurationError

    with pytest.raises(ConfigurationError, match="public_key"):
        LagoWebhooks(SETTINGS, public_key="-----BEGIN PUBLIC KEY-----\nMIIBIjANBg\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigurationError, match="public_key"):
        LagoWebhooks(SETTINGS, public_key="not a key")


@pytest.mark.parametrize("merge", [False, True])
async def test_the_emulator_sends_plan_updated_when_a_plans_entitlements_are_set(merge: bool) -> None:
    """Lago's ``Entitlement::PlanEntitlementsUpdateService`` (POST and PATCH /plans/{code}/entitlements) sends
    ``plan.updated`` after commit, "even if no changes were made"; the emulator sends it when an entitlement is
    removed but not when one is set, so an app tested against it never sees the webhook that raises a plan's limits
    for every org on it."""
    fake = make_fake()
    settings = settings_for(fake)
    receiver = LagoWebhooks(settings.replace(webhook_hmac_key=HMAC_KEY))
    dispatcher = dispatcher_of(fake)
    dispatcher.configure(app=app_for(receiver), signature="hmac", hmac_key=HMAC_KEY)
    async with fake.client() as http:
        method = "PATCH" if merge else "POST"
        response = await http.request(
            method, "/api/v1/plans/starter/entitlements", json={"entitlements": {"api_quota": {"max_api_calls": 9}}}
        )
        assert response.status_code == 200, response.text
    assert [d.webhook_type for d in await dispatcher.deliver_pending()] == ["plan.updated"]


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=needs_redis)])
async def test_a_plan_updated_raising_the_limit_does_not_answer_a_blocked_org_429_for_days(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """An org at its plan's limit (2 calls) whose plan is raised to 50: after ``plan.updated`` (delivered, 200),
    the next request was still 429 with ``Retry-After`` = seconds to the period end (days: a client that honours it
    stops for days), from the snapshot the webhook made due. A request blocked on such a snapshot now waits for its
    refresh (at most LAGO_QUOTA_COLD_TIMEOUT), as a ``subscription.*`` webhook's next request does."""
    fake = make_fake()
    fake.add_plan("team", amount_cents=1000, charges=[CHARGE], entitlements={"api_quota": {"max_api_calls": 2}})
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "team")
    settings = settings_for(fake)
    config = QuotaConfig()
    if backend == "redis":
        settings = settings.replace(redis_url=request.getfixturevalue("redis_url"))
        config = QuotaConfig(redis_prefix=f"replan:{uuid.uuid4().hex[:8]}:")
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=config)
        receiver = LagoWebhooks(client=lago, invalidate=gate)
        dispatcher = dispatcher_of(fake)
        dispatcher.configure(app=app_for(receiver))
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            for _ in range(2):
                decision = await gate.check("org_a")
                gate.settle("org_a", decision, tokens=0, billed=True)
            blocked = await gate.check("org_a")
            assert not blocked.allowed and int(dict(blocked.headers)[b"retry-after"]) > 3600
            await lago.set_plan_entitlements("team", {"api_quota": {"max_api_calls": 50}})
            [delivery] = [d for d in await dispatcher.deliver_pending() if d.webhook_type == "plan.updated"]
            assert delivery.history == [200]
            after = await gate.check("org_a")
            tg.cancel_scope.cancel()
        await gate.aclose()
        await receiver.aclose()
    assert after.allowed, dict(after.headers)
