"""Webhook ordering and staleness, as Lago delivers them (at least once, retried, not in order): a terminated
before the started it follows, webhooks for orgs never seen, a burst for one org, invalidations that fail (answered
so that Lago retries, without a log line per webhook), webhook types nobody handles (200, logged once per type),
plan changes without a fleet-wide invalidation, and a receiver that holds an HMAC key taking the JWT webhooks of its
own organization too (an endpoint switched from JWT to HMAC loses none while both are configured)."""

from __future__ import annotations

import json
import logging
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

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._webhooks import LagoWebhooks, sign_hmac
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

HMAC_KEY = "7e0c1d2a-review-order-hmac"
LAGO_URL = "http://lago.order"
LAGO_ORG = "lago-org-order"
PATH = "/webhooks/lago"
SETTINGS = BillingSettings(api_url=LAGO_URL, api_key="order-api-key", max_retries=0)
LIMITS = {"starter": {"max_api_calls": 3}, "pro": {"max_api_calls": 100}}
LOGGER = "lago_org_billing.webhooks"


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
    clients: dict[int, httpx.AsyncClient] = {}

    async def send(receiver: LagoWebhooks, body: bytes, headers: dict[str, str]) -> httpx.Response:
        client = clients.get(id(receiver))
        if client is None:
            app = Starlette(routes=[Route(PATH, receiver, methods=["POST"])])
            client = clients[id(receiver)] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app"
            )
        return await client.post(PATH, content=body, headers=headers)

    yield send
    for client in clients.values():
        await client.aclose()


def envelope(webhook_type: str, object_type: str, obj: dict[str, Any], organization_id: str = LAGO_ORG) -> bytes:
    payload = {"webhook_type": webhook_type, "object_type": object_type, "organization_id": organization_id}
    payload[object_type] = obj
    return json.dumps(payload, separators=(",", ":")).encode()


def sub_body(webhook_type: str, org: str, plan: str = "pro", **fields: Any) -> bytes:
    obj = {"external_id": org, "external_customer_id": org, "plan_code": plan, "status": "active", **fields}
    return envelope(webhook_type, "subscription", obj)


def hmac_headers(body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": sign_hmac(body, HMAC_KEY),
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Unique-Key": str(uuid.uuid4()),
    }


def jwt_headers(body: bytes, private: bytes) -> dict[str, str]:
    token = jwt.encode({"data": body.decode(), "iss": LAGO_URL}, private, algorithm="RS256")
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": token,
        "X-Lago-Signature-Algorithm": "jwt",
        "X-Lago-Unique-Key": str(uuid.uuid4()),
    }


def hmac_receiver(**options: Any) -> LagoWebhooks:
    return LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), **options)


def records_of(caplog: pytest.LogCaptureFixture, level: int, text: str = "") -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= level and text in r.getMessage()]


def make_fake() -> FakeLago:
    fake = FakeLago(api_key="test-api-key")
    fake.add_billable_metric("api_call")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.01"}}
    for code, amount in (("starter", 1000), ("pro", 5000)):
        fake.add_plan(code, amount_cents=amount, charges=[charge])
    return fake


def settings_for(fake: FakeLago) -> BillingSettings:
    return BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        max_retries=0,
        usage_cache_ttl=3600,
        plan_limits=LIMITS,
        webhook_hmac_key=HMAC_KEY,
    )


def limit_of(decision: Any) -> bytes:
    value: bytes = dict(decision.headers)[b"ratelimit-limit"]
    return value


def lago_reads(fake: FakeLago) -> int:
    return sum(1 for r in fake.requests if r.method == "GET")


# ------------------------------------------------------------------------------ ordering, end to end


async def test_terminated_before_started_burst_and_unknown_orgs_follow_lago_not_the_order(post: Any) -> None:
    """An upgrade's webhooks delivered in reverse (the new subscription's started first, then the old one's
    terminated, then a retry of an older updated): the org ends on what Lago holds now (pro), not on the last
    payload. Webhooks for an org never seen are answered 200 and leave nothing behind. A burst of 1,000 webhooks for
    one org makes no read of Lago: the org's next request makes one refresh."""
    fake = make_fake()
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter")
    settings = settings_for(fake)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        receiver = LagoWebhooks(settings, client=lago, invalidate=gate)
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            assert limit_of(await gate.check("org_a")) == b"3"
            await lago.create_subscription(external_customer_id="org_a", plan_code="pro", external_id="org_a")
            for body in (
                sub_body("subscription.started", "org_a", "pro", previous_plan_code="starter"),
                sub_body("subscription.terminated", "org_a", "starter", status="terminated", next_plan_code="pro"),
                sub_body("subscription.updated", "org_a", "starter"),  # an old one, retried last
            ):
                assert (await post(receiver, body, hmac_headers(body))).status_code == 200
            assert limit_of(await gate.check("org_a")) == b"100"

            unknown = sub_body("subscription.terminated", "org_never_seen", "starter", status="terminated")
            answer = await post(receiver, unknown, hmac_headers(unknown))
            assert (answer.status_code, answer.json()["status"]) == (200, "processed")

            before = lago_reads(fake)
            body = envelope("alert.triggered", "triggered_alert", {"external_customer_id": "org_a"})
            async with anyio.create_task_group() as burst:
                for _ in range(1000):
                    burst.start_soon(post, receiver, body, hmac_headers(body))
            assert lago_reads(fake) == before  # the webhooks read nothing of Lago
            assert receiver.stats["invalidations"] == 1004
            assert limit_of(await gate.check("org_a")) == b"100"
            assert lago_reads(fake) - before <= 3  # one refresh (its subscription and usage reads)
            await gate.aclose()
            tg.cancel_scope.cancel()


# ------------------------------------------------------------------------- failures: retried, not flooding


async def test_a_failing_invalidation_is_retried_by_lago_without_an_error_logged_per_webhook(
    post: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate's store down (Redis failing over): every webhook is answered 500 so that Lago sends it again, but
    the same outage is not logged as an ERROR with a traceback for each of a burst of webhooks (and each of Lago's
    3 attempts): once, the rest at DEBUG."""

    async def broken(org_id: str) -> None:
        raise ConnectionError("Error 111 connecting to redis: Connection refused.")

    receiver = hmac_receiver(invalidate=broken)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    answers = []
    for index in range(30):
        body = sub_body("subscription.updated", f"org_{index}")
        answers.append(await post(receiver, body, hmac_headers(body)))
    assert {a.status_code for a in answers} == {500}
    assert receiver.stats["failed"] == 30
    loud = records_of(caplog, logging.WARNING)
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert "Connection refused" in loud[0].getMessage()
    assert "LAGO_REDIS_URL" in loud[0].getMessage()


# ---------------------------------------------------------------------------------- unhandled types


async def test_types_nobody_handles_are_answered_200_and_logged_once_per_type(
    post: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook type this receiver neither handles nor acts on (Lago adds types; a handler registered under a
    misspelt type) is answered 200 'ignored', and said once per type: nothing told the user that every
    invoice.created went nowhere."""
    receiver = hmac_receiver(handlers={"invoice.create": lambda event: None})  # (misspelt)
    caplog.set_level(logging.INFO, logger=LOGGER)
    for webhook_type in ["invoice.created", "order_form.signed", "invoice.created", "order_form.signed"] * 2:
        body = envelope(webhook_type, "invoice", {"lago_id": "x", "external_customer_id": "org_a"})
        answer = await post(receiver, body, hmac_headers(body))
        assert (answer.status_code, answer.json()["status"]) == (200, "ignored")
    assert receiver.stats["ignored"] == 8
    for webhook_type in ("invoice.created", "order_form.signed"):
        said = records_of(caplog, logging.INFO, repr(webhook_type))
        assert len(said) == 1, [r.getMessage() for r in said]


async def test_a_subscription_webhook_with_no_gate_to_invalidate_says_so_once(
    post: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver served apart from the middleware, given no invalidate=: subscription webhooks changed nothing,
    silently (the org kept its cached plan until LAGO_QUOTA_PLAN_TTL). Said once, with what to pass."""
    receiver = hmac_receiver()
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(3):
        body = sub_body("subscription.started", "org_a")
        assert (await post(receiver, body, hmac_headers(body))).json()["status"] == "ignored"
    said = records_of(caplog, logging.INFO, "subscription.started")
    assert len(said) == 1 and "invalidate=" in said[0].getMessage()


async def test_plan_updated_without_a_fleet_wide_invalidation_is_said_once(
    post: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """invalidate= a function (no invalidate_all): each plan.updated logged the same line again."""

    async def invalidate(org_id: str) -> None:
        return None

    receiver = hmac_receiver(invalidate=invalidate)
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(5):
        body = envelope("plan.updated", "plan", {"code": "pro"})
        assert (await post(receiver, body, hmac_headers(body))).status_code == 200
    assert len(records_of(caplog, logging.INFO, "plan.updated")) == 1


# ----------------------------------------------------------------------------------- both signatures


async def test_an_hmac_receiver_of_a_known_organization_takes_its_jwt_webhooks_too(
    post: Any, pems: tuple[bytes, bytes]
) -> None:
    """Switching a Lago endpoint from JWT (Lago's default) to HMAC: the HMAC key deployed first, every JWT webhook
    until the switch in Lago was refused 401 (lost after Lago's 3 attempts); switched first, every HMAC one. With the
    HMAC key, LAGO_ORGANIZATION_ID and a way to Lago's public key configured, both are taken; a JWT webhook of another
    organization (on a shared Lago instance) is still refused, and so is JWT without LAGO_ORGANIZATION_ID."""
    private, public = pems
    invalidated: list[str] = []

    async def invalidate(org_id: str) -> None:
        invalidated.append(org_id)

    receiver = hmac_receiver(invalidate=invalidate, public_key=public, organization_id=LAGO_ORG)
    assert receiver.mode == "hmac"
    body = sub_body("subscription.started", "org_a")
    by_jwt = await post(receiver, body, jwt_headers(body, private))
    assert (by_jwt.status_code, by_jwt.json()["status"]) == (200, "processed")
    by_hmac = await post(receiver, body, hmac_headers(body))
    assert (by_hmac.status_code, by_hmac.json()["status"]) == (200, "processed")
    assert invalidated == ["org_a", "org_a"]

    tampered = sub_body("subscription.started", "org_b")  # another body under org_a's token
    refused = await post(receiver, tampered, jwt_headers(body, private))
    assert (refused.status_code, refused.json()["status"]) == (401, "invalid_signature")
    other = envelope("subscription.started", "subscription", {"external_customer_id": "org_a"}, "another-lago-org")
    refused = await post(receiver, other, jwt_headers(other, private))
    assert (refused.status_code, refused.json()["status"]) == (401, "wrong_organization")

    without_org = hmac_receiver(invalidate=invalidate, public_key=public)
    refused = await post(without_org, body, jwt_headers(body, private))
    assert (refused.status_code, refused.json()["status"]) == (401, "wrong_algorithm")
    assert invalidated == ["org_a", "org_a"]


async def test_a_usage_alert_webhook_keeps_the_org_decided_while_lagos_api_is_down(post: Callable[..., Any]) -> None:
    """org_a read (starter, 3 calls); Lago's API goes down while its webhook workers still send an ``alert.triggered``.
    The receiver dropped the org's snapshot: its next request waited for a read that failed and got the fail policy
    (503 with ``LAGO_FAIL_OPEN=false``) while the snapshot could decide. It now tells the gate the webhook's type,
    which marks the snapshot due for usage webhooks: decided on it, refreshed once Lago answers. A
    ``subscription.terminated`` still drops it (a terminated subscription is never served as active)."""
    fake = make_fake()
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter")
    settings = settings_for(fake).replace(fail_open=False)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        receiver = LagoWebhooks(settings, client=lago, invalidate=gate)
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            assert limit_of(await gate.check("org_a")) == b"3"
            fake.inject_fault(status=503, count=100)
            alert = envelope("alert.triggered", "alert", {"external_subscription_id": "org_a", "code": "calls"})
            assert (await post(receiver, alert, hmac_headers(alert))).status_code == 200
            decision = await gate.check("org_a")
            assert (decision.allowed, decision.status, limit_of(decision)) == (True, None, b"3")
            terminated = sub_body("subscription.terminated", "org_a", "starter", status="terminated")
            assert (await post(receiver, terminated, hmac_headers(terminated))).status_code == 200
            decision = await gate.check("org_a")
            assert (decision.allowed, decision.status) == (False, 503)
            tg.cancel_scope.cancel()
        await gate.aclose()
