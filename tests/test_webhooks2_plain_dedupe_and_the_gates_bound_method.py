"""Second review of the webhook receiver: a ``dedupe=`` of plain (sync) methods, and the quota gate's own
``invalidate`` method given as ``invalidate=`` (``LagoWebhooks(invalidate=gate.invalidate)``).

* A dedupe whose ``claim``/``complete``/``release`` are plain methods (a store of one's own over a sync database
  client) was accepted, then every ``await`` of its answer raised ``TypeError``: each delivery ran without dedupe
  (Lago's retries and resends ran the handlers again), logged as "Webhook dedupe unavailable (check Redis,
  LAGO_REDIS_URL)" with no Redis in use. They are called as they are now, as ``invalidate=`` is.
* ``invalidate=gate.invalidate`` is "an async function of the org id", as the README offers, and the natural way to
  write it; but the receiver then called it with the org id only: a usage webhook (``alert.triggered``) dropped the
  org's snapshot instead of marking it due (with Lago's API down, the org's next request got the fail policy, 503,
  the bug the gate fixed for ``invalidate=gate``), and ``plan.updated``/``feature.*`` found no ``invalidate_all``: every
  org kept its old limits up to ``LAGO_QUOTA_PLAN_TTL``, said once at INFO. The gate's bound method now stands for
  the gate.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._webhooks import DedupeState, LagoWebhooks, WebhookEvent, sign_hmac
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

HMAC_KEY = "5f1d9c1e-webhooks2-hmac"
LAGO_URL = "http://lago.webhooks2"
PATH = "/webhooks/lago"
SETTINGS = BillingSettings(api_url=LAGO_URL, api_key="webhooks2-api-key", max_retries=0, webhook_hmac_key=HMAC_KEY)
LIMITS = {"starter": {"max_api_calls": 3}, "pro": {"max_api_calls": 100}}


@pytest.fixture
async def post() -> AsyncIterator[Callable[..., Any]]:
    clients: dict[int, httpx.AsyncClient] = {}

    async def send(receiver: LagoWebhooks, body: bytes, key: str | None = None) -> httpx.Response:
        client = clients.get(id(receiver))
        if client is None:
            app = Starlette(routes=[Route(PATH, receiver, methods=["POST"])])
            client = clients[id(receiver)] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app"
            )
        headers = {
            "Content-Type": "application/json",
            "X-Lago-Signature": sign_hmac(body, HMAC_KEY),
            "X-Lago-Signature-Algorithm": "hmac",
            "X-Lago-Unique-Key": key or str(uuid.uuid4()),
        }
        return await client.post(PATH, content=body, headers=headers)

    yield send
    for client in clients.values():
        await client.aclose()


def envelope(webhook_type: str, object_type: str, obj: dict[str, Any]) -> bytes:
    payload = {
        "webhook_type": webhook_type,
        "object_type": object_type,
        "organization_id": "lago-org",
        object_type: obj,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------ a dedupe of plain methods


class PlainDedupe:
    """A dedupe over a synchronous store (a dict here; a sync database client in an app)."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.extended = anyio.Event()

    def claim(self, key: str) -> DedupeState:
        state = self.keys.get(key)
        if state == "done":
            return "done"
        if state == "processing":
            return "processing"
        self.keys[key] = "processing"
        return "new"

    def extend(self, key: str) -> None:
        self.extended.set()

    def complete(self, key: str) -> None:
        self.keys[key] = "done"

    def release(self, key: str) -> None:
        self.keys.pop(key, None)


async def test_a_dedupe_of_plain_methods_deduplicates_lagos_retries(
    post: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A delivery sent twice (Lago's retry after a lost answer) runs its handler once, and a failed one is released
    so that the retry runs it; nothing blames Redis. Before: both ran (``processed`` twice), logged as the dedupe
    being unavailable."""
    runs: list[str] = []
    failing = {"fail": True}

    async def handler(event: WebhookEvent) -> None:
        runs.append(event.webhook_type)
        if event.webhook_type == "invoice.voided" and failing.pop("fail", False):
            raise RuntimeError("the first attempt fails")

    dedupe = PlainDedupe()
    receiver = LagoWebhooks(SETTINGS, dedupe=dedupe, handlers={"*": handler})
    body = envelope("invoice.created", "invoice", {"lago_id": "inv_1", "customer": {"external_id": "org_a"}})
    answers = [(await post(receiver, body, "key-1")).json()["status"] for _ in range(2)]
    assert answers == ["processed", "duplicate"]
    assert runs == ["invoice.created"]
    assert dedupe.keys == {"key-1": "done"}

    voided = envelope("invoice.voided", "invoice", {"lago_id": "inv_1", "customer": {"external_id": "org_a"}})
    first = await post(receiver, voided, "key-2")
    assert (first.status_code, first.json()["status"]) == (500, "handler_failed")
    assert "key-2" not in dedupe.keys  # released: Lago's retry runs it
    answers = [(await post(receiver, voided, "key-2")).json()["status"] for _ in range(2)]
    assert answers == ["processed", "duplicate"]
    assert runs == ["invoice.created", "invoice.voided", "invoice.voided"]
    assert not [r for r in caplog.records if "dedupe" in r.getMessage().lower()]
    assert receiver.stats["duplicates"] == 2


async def test_a_plain_dedupe_s_claim_is_renewed_while_a_handler_runs(post: Callable[..., Any]) -> None:
    """``extend`` of a plain dedupe renews the claim while a slow handler runs (before: a ``TypeError`` logged as
    the dedupe store failing, every renewal)."""
    dedupe = PlainDedupe()
    dedupe.processing_ttl = 0.3  # type: ignore[attr-defined]  # (renewed every 0.1 s)

    async def handler(event: WebhookEvent) -> None:
        await dedupe.extended.wait()  # (the handler runs until its claim was renewed)

    receiver = LagoWebhooks(SETTINGS, dedupe=dedupe, handlers={"invoice.created": handler})
    body = envelope("invoice.created", "invoice", {"customer": {"external_id": "org_a"}})
    with anyio.fail_after(10):
        answer = await post(receiver, body, "key-slow")
    assert answer.json()["status"] == "processed"
    assert dedupe.keys == {"key-slow": "done"}


# --------------------------------------------------------------------- invalidate=gate.invalidate


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
        fail_open=False,
    )


def limit_of(decision: Any) -> bytes:
    value: bytes = dict(decision.headers)[b"ratelimit-limit"]
    return value


async def test_the_gates_invalidate_method_given_as_invalidate_keeps_a_usage_alert_decided_while_lago_is_down(
    post: Callable[..., Any],
) -> None:
    """As with ``invalidate=gate``: an ``alert.triggered`` while Lago's API is down marks the org's snapshot due, and
    its next request is decided on it (before: dropped, answered 503 by the fail policy)."""
    fake = make_fake()
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter")
    settings = settings_for(fake)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        receiver = LagoWebhooks(settings, client=lago, invalidate=gate.invalidate)
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            assert limit_of(await gate.check("org_a")) == b"3"
            fake.inject_fault(status=503, count=100)
            alert = envelope("alert.triggered", "triggered_alert", {"external_customer_id": "org_a", "code": "calls"})
            assert (await post(receiver, alert)).status_code == 200
            decision = await gate.check("org_a")
            assert (decision.allowed, decision.status, limit_of(decision)) == (True, None, b"3")
            tg.cancel_scope.cancel()
        await gate.aclose()


async def test_the_gates_invalidate_method_given_as_invalidate_applies_plan_updated_to_every_org(
    post: Callable[..., Any],
) -> None:
    """An org blocked on its plan's limit (2 calls); the plan is raised to 50 in Lago, whose ``plan.updated`` reaches
    the gate's ``invalidate_all``: the org's next request is allowed. Before: "invalidate= has no invalidate_all()"
    (said once, at INFO), answered ``ignored``, and the org stayed blocked on its cached plan."""
    fake = make_fake()
    fake.add_feature("api_quota", privileges=[{"code": "max_api_calls", "value_type": "integer"}])
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.01"}}
    fake.add_plan("team", amount_cents=1000, charges=[charge], entitlements={"api_quota": {"max_api_calls": 2}})
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "team")
    settings = settings_for(fake)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        receiver = LagoWebhooks(settings, client=lago, invalidate=gate.invalidate)
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            for _ in range(2):
                decision = await gate.check("org_a")
                gate.settle("org_a", decision, tokens=0, billed=True)
            assert not (await gate.check("org_a")).allowed
            await lago.set_plan_entitlements("team", {"api_quota": {"max_api_calls": 50}})
            plan = envelope("plan.updated", "plan", {"code": "team", "lago_id": "plan_team"})
            answer = await post(receiver, plan)
            assert (answer.status_code, answer.json()["status"]) == (200, "processed")
            after = await gate.check("org_a")
            tg.cancel_scope.cancel()
        await gate.aclose()
    assert after.allowed, dict(after.headers)
    assert receiver.stats["invalidations"] == 1
