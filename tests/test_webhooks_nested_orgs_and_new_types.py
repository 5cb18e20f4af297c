"""Review of the webhook receiver against Lago's deliveries as Lago sends them.

Covers: the org of webhooks whose object names it only through a nested object (``event.error`` ->
``event.external_subscription_id``, ``wallet_transaction.*`` -> ``wallet.external_customer_id``,
``payment_receipt.*`` -> ``payment.external_customer_id``, ``invoice.payment_dispute_lost`` ->
``invoice.customer.external_id``, as lago-api's serializers build them), in both signature modes; every
``subscription.*`` type Lago sends (newer ones included) invalidating the org's cached quota state; a signed body
nested too deep for the JSON parser answered 400, not 500; retries deduplicated while a new delivery of the same
body runs again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import BillingSettings
from lago_org_billing._webhooks import LagoWebhooks, WebhookEvent, resolve_org, sign_hmac

pytestmark = pytest.mark.anyio

HMAC_KEY = "0b0e7a52-zz-review-webhooks"
LAGO_URL = "http://lago.zz-review"
PATH = "/webhooks/lago"
SETTINGS = BillingSettings(api_url=LAGO_URL, api_key="zz-review-key", max_retries=0)
LAGO_ORG = "6d2c8c1e-0000-4000-8000-00000000beef"


class Recorder:
    def __init__(self) -> None:
        self.events: list[WebhookEvent] = []
        self.invalidated: list[str] = []

    async def handler(self, event: WebhookEvent) -> None:
        self.events.append(event)

    async def invalidate(self, org_id: str) -> None:
        self.invalidated.append(org_id)

    async def invalidate_all(self) -> None:
        return None


@pytest.fixture(scope="module")
def pems() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.fixture
async def post() -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def send(receiver: LagoWebhooks, body: bytes, headers: dict[str, str]) -> httpx.Response:
        app = Starlette(routes=[Route(PATH, receiver, methods=["POST"])])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is seen as Lago sees it: 500
        client = httpx.AsyncClient(transport=transport, base_url="http://app")
        clients.append(client)
        return await client.post(PATH, content=body, headers=headers)

    yield send
    for client in clients:
        await client.aclose()


def envelope(webhook_type: str, object_type: str, obj: dict[str, Any]) -> bytes:
    # key order and separators as lago-api's ``payload.to_json`` writes them
    payload = {"webhook_type": webhook_type, "object_type": object_type, "organization_id": LAGO_ORG, object_type: obj}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def hmac_headers(body: bytes, unique_key: str | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": sign_hmac(body, HMAC_KEY),
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
    }


def jwt_headers(body: bytes, private: bytes, unique_key: str | None = None) -> dict[str, str]:
    token = jwt.encode({"data": body.decode(), "iss": LAGO_URL}, private, algorithm="RS256")
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": token,
        "X-Lago-Signature-Algorithm": "jwt",
        "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
    }


def hmac_receiver(rec: Recorder, template: str = "{org_id}") -> LagoWebhooks:
    settings = SETTINGS.replace(webhook_hmac_key=HMAC_KEY, subscription_id_template=template)
    return LagoWebhooks(settings, invalidate=rec, handlers={"*": rec.handler}, organization_id=LAGO_ORG)


# Objects as lago-api serializes them, where the org is only reachable through a nested object.
# ``event.error``: V1::EventErrorSerializer = {status, error, message, event: V1::EventSerializer} (no customer id).
EVENT_ERROR = {
    "status": 422,
    "error": "Unprocessable entity",
    "message": '{"transaction_id":["value_already_exist"]}',
    "event": {
        "lago_id": "9c4c7d3e-0000-4000-8000-000000000001",
        "transaction_id": "tx-1",
        "lago_customer_id": "9c4c7d3e-0000-4000-8000-000000000002",
        "code": "api_call",
        "timestamp": "2026-03-01T10:00:00.000Z",
        "properties": {},
        "lago_subscription_id": "9c4c7d3e-0000-4000-8000-000000000003",
        "external_subscription_id": "sub_acme",
        "created_at": "2026-03-01T10:00:01Z",
    },
}
# ``wallet_transaction.*``: WalletTransactionObjectExtended = the transaction + ``wallet`` (WalletObject).
WALLET_TRANSACTION = {
    "lago_id": "9c4c7d3e-0000-4000-8000-000000000010",
    "lago_wallet_id": "9c4c7d3e-0000-4000-8000-000000000011",
    "status": "settled",
    "transaction_status": "purchased",
    "transaction_type": "inbound",
    "amount": "10.0",
    "credit_amount": "10.0",
    "wallet": {
        "lago_id": "9c4c7d3e-0000-4000-8000-000000000011",
        "lago_customer_id": "9c4c7d3e-0000-4000-8000-000000000002",
        "external_customer_id": "acme",
        "status": "active",
        "currency": "USD",
    },
}
# ``payment_receipt.*``: V1::PaymentReceiptSerializer = {lago_id, number, payment: V1::PaymentSerializer, created_at}.
PAYMENT_RECEIPT = {
    "lago_id": "9c4c7d3e-0000-4000-8000-000000000020",
    "number": "RCPT-001",
    "payment": {
        "lago_id": "9c4c7d3e-0000-4000-8000-000000000021",
        "lago_customer_id": "9c4c7d3e-0000-4000-8000-000000000002",
        "external_customer_id": "acme",
        "invoice_ids": ["9c4c7d3e-0000-4000-8000-000000000022"],
        "amount_cents": 1000,
    },
    "created_at": "2026-03-01T10:00:00Z",
}
# ``invoice.payment_dispute_lost``: V1::Invoices::PaymentDisputeLostSerializer = {invoice: (includes customer),
# provider_error}.
DISPUTE_LOST = {
    "invoice": {
        "lago_id": "9c4c7d3e-0000-4000-8000-000000000022",
        "number": "INV-001",
        "status": "finalized",
        "customer": {"lago_id": "9c4c7d3e-0000-4000-8000-000000000002", "external_id": "acme"},
    },
    "provider_error": {"message": "lost"},
}
NESTED = [
    ("event.error", "event_error", EVENT_ERROR),
    ("wallet_transaction.created", "wallet_transaction", WALLET_TRANSACTION),
    ("wallet_transaction.updated", "wallet_transaction", WALLET_TRANSACTION),
    ("payment_receipt.created", "payment_receipt", PAYMENT_RECEIPT),
    ("invoice.payment_dispute_lost", "payment_dispute_lost", DISPUTE_LOST),
]


@pytest.mark.parametrize(("webhook_type", "object_type", "obj"), NESTED, ids=[n[0] for n in NESTED])
async def test_org_reached_through_nested_objects_hmac(
    post: Any, webhook_type: str, object_type: str, obj: dict[str, Any]
) -> None:
    """A handler of ``event.error`` (warn the org its events were rejected), of wallet transactions, payment receipts
    or a lost dispute got ``event.org_id = None``: Lago names the org only inside a nested object there."""
    rec = Recorder()
    receiver = hmac_receiver(rec, template="sub_{org_id}")
    body = envelope(webhook_type, object_type, obj)
    response = await post(receiver, body, hmac_headers(body))
    assert (response.status_code, response.json()["status"]) == (200, "processed")
    assert [(e.webhook_type, e.org_id) for e in rec.events] == [(webhook_type, "acme")]
    assert response.json()["org_id"] == "acme"
    assert rec.invalidated == []  # none of these changes the quota state


async def test_org_reached_through_nested_objects_jwt(post: Any, pems: tuple[bytes, bytes]) -> None:
    """The same in JWT mode (Lago's default), body signed as Lago signs it (``data`` = the raw body)."""
    private, public = pems
    rec = Recorder()
    receiver = LagoWebhooks(
        SETTINGS.replace(subscription_id_template="sub_{org_id}"),
        public_key=public,
        invalidate=rec,
        handlers={"*": rec.handler},
        organization_id=LAGO_ORG,
    )
    for webhook_type, object_type, obj in NESTED:
        body = envelope(webhook_type, object_type, obj)
        response = await post(receiver, body, jwt_headers(body, private))
        assert response.status_code == 200, response.text
    assert [e.org_id for e in rec.events] == ["acme"] * len(NESTED)


def test_resolve_org_nested_keeps_direct_ids_first() -> None:
    """A direct id wins over a nested one; a nested subscription goes through the template; nothing -> None."""

    def org(object_type: str, obj: dict[str, Any], template: str = "{org_id}") -> str | None:
        return resolve_org({"webhook_type": "x", "object_type": object_type, object_type: obj}, template)

    assert org("payment", {"external_customer_id": "a", "invoice": {"customer": {"external_id": "b"}}}) == "a"
    assert org("x", {"subscription": {"external_id": "s_c"}}, "s_{org_id}") == "c"
    assert org("x", {"subscription": {"external_id": "other"}}, "s_{org_id}") is None
    assert org("event_error", {"event": {"code": "c"}}) is None
    assert org("event_error", {"event": "not an object"}) is None


NEWER_SUBSCRIPTION_TYPES = [
    "subscription.activating",
    "subscription.activation_failed",
    "subscription.termination_alert",
]


@pytest.mark.parametrize("webhook_type", NEWER_SUBSCRIPTION_TYPES)
async def test_every_subscription_type_invalidates_the_org(post: Any, webhook_type: str) -> None:
    """The receiver promises that ``subscription.*`` invalidates the org, but matched a fixed list: the types newer
    Lago sends when a subscription gated on a payment starts activating or fails to (lago-api
    ``Webhooks::Subscriptions::ActivatingService``/``ActivationFailedService``: the subscription is terminated)
    left the org's cached plan in place until ``LAGO_QUOTA_PLAN_TTL``."""
    rec = Recorder()
    receiver = hmac_receiver(rec)
    obj = {"external_id": "acme", "external_customer_id": "acme", "plan_code": "pro", "status": "terminated"}
    body = envelope(webhook_type, "subscription", obj)
    response = await post(receiver, body, hmac_headers(body))
    assert (response.status_code, response.json()["status"]) == (200, "processed")
    assert rec.invalidated == ["acme"]


async def test_signed_body_nested_too_deep_is_a_400_not_a_500(post: Any) -> None:
    """A signed body the JSON parser cannot take (nesting past the recursion limit) raised RecursionError out of the
    receiver: a 500 and a traceback, instead of the 400 'not a Lago webhook' any other unparsable body gets."""
    rec = Recorder()
    receiver = hmac_receiver(rec)
    for body in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"webhook_type":"invoice.created","object_type":"invoice","invoice":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ):
        response = await post(receiver, body, hmac_headers(body))
        assert (response.status_code, response.json()["status"]) == (400, "not_a_webhook")
    assert rec.events == []


async def test_retries_deduped_but_a_new_delivery_of_the_same_body_runs(post: Any) -> None:
    """Lago's retries (same X-Lago-Unique-Key) run once; the same body under a new key (the subscription changed
    back) runs again and invalidates again."""
    rec = Recorder()
    receiver = hmac_receiver(rec)
    body = envelope("subscription.updated", "subscription", {"external_id": "acme", "external_customer_id": "acme"})
    key = str(uuid.uuid4())
    statuses = [(await post(receiver, body, hmac_headers(body, key))).json()["status"] for _ in range(3)]
    assert statuses == ["processed", "duplicate", "duplicate"]
    assert (await post(receiver, body, hmac_headers(body))).json()["status"] == "processed"
    assert rec.invalidated == ["acme", "acme"]
