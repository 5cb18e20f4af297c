"""The emulator's plan_overrides over a subscription's life, and the webhook receiver's public key decoding.

Each test names what a user would see go wrong.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.routing import Route

from _pinned_clock import NOW, Clock
from lago_org_billing import BillingSettings, ConfigurationError, LagoClient
from lago_org_billing._migration import PlanCatalog
from lago_org_billing._webhooks import LagoWebhooks, WebhookEvent
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake() -> FakeLago:
    fake = FakeLago(api_key="k", clock=Clock(NOW))
    fake.add_billable_metric("api_call")
    fake.add_feature("api_quota", privileges=[{"code": "max_api_calls", "value_type": "integer"}])
    fake.add_plan(
        "pro",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "properties": {"amount": "0.01"}}],
        entitlements={"api_quota": {"max_api_calls": 7}},
    )
    fake.add_customer("org", name="Org", currency="USD")
    return fake


async def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


# --- DELETE /plans/{code}: the override plans' subscriptions end with their parent --------------------------------


async def test_deleting_a_plan_ends_the_subscriptions_of_its_override_plans(fake: FakeLago) -> None:
    """Lago's ``Plans::DestroyJob`` destroys the plan's children first (``plan.children.each { DestroyService }``):
    their active subscriptions are terminated (and invoiced), their pending ones canceled. The emulator only looked at
    subscriptions whose plan *is* the deleted one, so an org with a negotiated price (``plan_overrides``) stayed
    active and billable on a plan that no longer exists, and a test of "retiring a plan cuts everyone off" passed
    for list-price orgs only."""
    fake.add_subscription("org", "pro", external_id="sub", plan_overrides={"amount_cents": 500})
    fake.add_customer("late")
    fake.add_subscription(
        "late", "pro", external_id="later", subscription_at="2026-04-01T00:00:00Z", plan_overrides={"amount_cents": 700}
    )
    async with fake.client() as client:
        await _ok(await client.delete("/api/v1/plans/pro"))
        assert (await client.get("/api/v1/subscriptions/sub")).status_code == 404
        ended = await _ok(await client.get("/api/v1/subscriptions/sub", params={"status": "terminated"}))
        assert ended["subscription"]["terminated_at"] == "2026-03-15T12:00:00Z"
        canceled = await _ok(await client.get("/api/v1/subscriptions/later", params={"status": "canceled"}))
        assert canceled["subscription"]["plan_amount_cents"] == 700
    (invoice,) = fake.invoices
    # billed at its own price, as it ends: started and terminated on 15 March, one day of 500 / 31 = 16.1, 16 cents
    # (Fees::SubscriptionService#terminated_amount; the list price would give 1000 / 31, 32)
    assert invoice["total_amount_cents"] == 16
    terminated = [
        w["subscription"]["external_id"]
        for w in fake.emitted_webhooks
        if w["webhook_type"] == "subscription.terminated"
    ]
    assert terminated == ["sub"]  # (a pending one is canceled with mark_as_canceled!, no webhook)


# --- PUT /subscriptions/{id} with plan_overrides ------------------------------------------------------------------


async def test_put_plan_overrides_gives_an_existing_subscription_its_own_price(fake: FakeLago) -> None:
    """``PUT /subscriptions/{id} {"plan_overrides": ...}`` (lago-api ``Subscriptions::UpdateService#
    handle_plan_override``: ``Plans::OverrideService`` the first time, ``Plans::UpdateService`` on that override plan
    afterwards) answered 200 and changed nothing: the subscription kept the list price and its usage was billed at
    the plan's charge price, and the migration's check for a donor paying a price of its own found none."""
    fake.add_subscription("org", "pro", external_id="sub")
    async with fake.client() as client:
        plan = (await _ok(await client.get("/api/v1/plans/pro")))["plan"]
        charge_id = plan["charges"][0]["lago_id"]
        body = {"subscription": {"plan_overrides": {"charges": [{"id": charge_id, "properties": {"amount": "0.05"}}]}}}
        sub = (await _ok(await client.put("/api/v1/subscriptions/sub", json=body)))["subscription"]
        assert sub["plan_code"] == "pro" and sub["plan"]["lago_id"] != plan["lago_id"]
        assert sub["plan"]["charges"][0]["properties"]["amount"] == "0.05"
        assert sub["entitlements"][0]["privileges"][0]["value"] == 7  # still the parent plan's entitlements
        events = [{"transaction_id": f"t{i}", "external_subscription_id": "sub", "code": "api_call"} for i in range(3)]
        await _ok(await client.post("/api/v1/events/batch", json={"events": events}))
        usage = await _ok(
            await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
        )
        assert usage["customer_usage"]["amount_cents"] == 15  # 3 x 0.05 USD, not 3 x 0.01
        listed = await _ok(await client.get("/api/v1/plans"))
        assert [p["lago_id"] for p in listed["plans"]] == [plan["lago_id"]]

        # a second PUT updates that override plan (Plans::UpdateService on the child): no new plan, charges kept
        again = {"subscription": {"plan_overrides": {"amount_cents": 400}}}
        updated = (await _ok(await client.put("/api/v1/subscriptions/sub", json=again)))["subscription"]
        assert updated["plan"]["lago_id"] == sub["plan"]["lago_id"]
        assert updated["plan_amount_cents"] == 400 and updated["plan"]["charges"][0]["properties"]["amount"] == "0.05"
        assert (await _ok(await client.get("/api/v1/plans/pro")))["plan"]["amount_cents"] == 1000

        settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
        async with LagoClient(settings, transport=fake.transport()) as lago:
            listed_sub = (await _ok(await client.get("/api/v1/subscriptions")))["subscriptions"][0]
            assert await PlanCatalog(lago).own_price(listed_sub) is not None


async def test_put_plan_overrides_with_a_bad_amount_is_refused(fake: FakeLago) -> None:
    """An override Lago cannot save is a 422 naming the field, and the subscription keeps its plan."""
    fake.add_subscription("org", "pro", external_id="sub")
    body = {"subscription": {"plan_overrides": {"amount_cents": -1}}}
    async with fake.client() as client:
        response = await client.put("/api/v1/subscriptions/sub", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error_details"] == {"amount_cents": ["value_is_invalid"]}
        current = await _ok(await client.get("/api/v1/subscriptions/sub"))
        plan = await _ok(await client.get("/api/v1/plans/pro"))
    assert current["subscription"]["plan"]["lago_id"] == plan["plan"]["lago_id"]


async def test_a_snapshot_shows_a_change_to_an_override_plan(fake: FakeLago) -> None:
    """``snapshot()`` is "the whole Lago state", which tests compare to assert that nothing changed (a dry run):
    the override plans a subscription is priced by were missing from it, so changing one went unseen."""
    fake.add_subscription("org", "pro", external_id="sub", plan_overrides={"amount_cents": 500})
    before = fake.snapshot()
    async with fake.client() as client:
        body = {"subscription": {"plan_overrides": {"amount_cents": 400}}}
        await _ok(await client.put("/api/v1/subscriptions/sub", json=body))
    assert fake.snapshot() != before


# --- LagoWebhooks: the public key --------------------------------------------------------------------------------

LAGO_URL = "http://lago.test"
PATH = "/webhooks/lago"
BODY = json.dumps(
    {
        "webhook_type": "subscription.started",
        "object_type": "subscription",
        "organization_id": "lago-org",
        "subscription": {"external_id": "org_acme", "external_customer_id": "org_acme", "status": "active"},
    },
    separators=(",", ":"),
).encode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _ruby_base64(data: bytes) -> str:
    text = base64.b64encode(data).decode()
    return "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))


def _headers(key: rsa.RSAPrivateKey) -> dict[str, str]:
    token = jwt.encode({"data": BODY.decode(), "iss": LAGO_URL}, key, algorithm="RS256")
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": token,
        "X-Lago-Signature-Algorithm": "jwt",
        "X-Lago-Unique-Key": str(uuid.uuid4()),
    }


async def _deliver(receiver: LagoWebhooks, key: rsa.RSAPrivateKey) -> httpx.Response:
    app = Starlette(routes=[Route(PATH, receiver, methods=["POST"])])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.post(PATH, content=BODY, headers=_headers(key))


def test_a_public_key_that_is_not_rsa_is_refused_when_the_receiver_is_made() -> None:
    """Lago signs RS256. ``LagoWebhooks(public_key=<an EC key>)`` was accepted ("one that is no public key is a
    ConfigurationError here"), then every webhook was a 500 (PyJWT's TypeError "Expecting a PEM-formatted key."):
    Lago gave up on each after 3 attempts, and the quota cache was never invalidated."""
    ec_pem = _public_pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigurationError, match="RSA"):
        LagoWebhooks(BillingSettings(api_url=LAGO_URL), public_key=ec_pem)


async def test_a_fetched_public_key_that_is_not_rsa_is_a_503_not_a_500(rsa_key: rsa.RSAPrivateKey) -> None:
    """The key fetched from Lago (``GET /webhooks/json_public_key``) goes through the same check: a key Lago cannot
    sign RS256 with (a wrong LAGO_API_URL answering another service's key) is "key unavailable" (503, retried, and
    logged as such), not an unhandled TypeError on every webhook."""
    ec_pem = _public_pem(ec.generate_private_key(ec.SECP256R1()))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"webhook": {"public_key": _ruby_base64(ec_pem)}})

    settings = BillingSettings(api_url=LAGO_URL, api_key="secret", max_retries=0)
    events: list[WebhookEvent] = []

    async def record(event: WebhookEvent) -> None:
        events.append(event)

    receiver = LagoWebhooks(client=LagoClient(settings, transport=httpx.MockTransport(handler)), handlers={"*": record})
    response = await _deliver(receiver, rsa_key)
    assert response.status_code == 503, response.text
    assert events == []


@pytest.mark.parametrize(
    "shape",
    ["base64 in double quotes", "base64 in single quotes", "PEM with escaped newlines", "base64 with escaped newlines"],
)
async def test_a_public_key_read_from_an_environment_variable(rsa_key: rsa.RSAPrivateKey, shape: str) -> None:
    """A key kept in an environment variable arrives as written there: in quotes (a Docker ``--env-file`` keeps them)
    or on one line with ``\\n`` escapes (a PEM in a one-line variable). ``LagoWebhooks(public_key=os.environ[...])``
    refused those at start-up as "not Lago's webhook public key", although the key was right."""
    pem = _public_pem(rsa_key)
    encoded = _ruby_base64(pem)
    value = {
        "base64 in double quotes": f'"{encoded.strip()}"\n',
        "base64 in single quotes": f"'{encoded.strip()}'",
        "PEM with escaped newlines": pem.decode().replace("\n", "\\n"),
        "base64 with escaped newlines": encoded.replace("\n", "\\n"),
    }[shape]
    receiver = LagoWebhooks(BillingSettings(api_url=LAGO_URL), public_key=value)
    assert (await _deliver(receiver, rsa_key)).status_code == 200
    assert receiver.stats["key_fetches"] == 0
