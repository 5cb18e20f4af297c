"""Emulator fidelity: what a user's code could rely on in FakeLago must be what Lago does (webhook bodies, termination
and upgrade invoices, customer deletion)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from _openapi import SPEC_PATH, fix_spec
from _pinned_clock import NOW, Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@functools.lru_cache(maxsize=1)
def _webhook_schemas() -> tuple[Registry, dict[str, str]]:
    """The spec's webhook request bodies, by ``webhook_type``, resolvable as ``urn:lago-spec#/webhooks/...``."""
    with SPEC_PATH.open("rb") as file:
        spec = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    fix_spec(spec)
    registry: Registry = Registry().with_resource("urn:lago-spec", DRAFT202012.create_resource(spec))
    by_type: dict[str, str] = {}
    for name, item in spec["webhooks"].items():
        schema = item["post"]["requestBody"]["content"]["application/json"]["schema"]
        by_type[schema["properties"]["webhook_type"]["enum"][0]] = name
    return registry, by_type


def webhook_errors(envelope: dict[str, Any]) -> list[str]:
    """Where ``envelope`` (a webhook body) breaks the spec's schema for its ``webhook_type``."""
    registry, by_type = _webhook_schemas()
    name = by_type[envelope["webhook_type"]]
    ref = f"urn:lago-spec#/webhooks/{name}/post/requestBody/content/application~1json/schema"
    validator = jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)
    return [f"{envelope['webhook_type']} {list(e.path)}: {e.message[:120]}" for e in validator.iter_errors(envelope)]


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_billable_metric("api_call")
    fake.add_plan(
        "starter", amount_cents=0, charges=[{"billable_metric_code": "api_call", "properties": {"amount": "2"}}]
    )
    fake.add_plan("pro", amount_cents=5000)
    fake.add_plan("free", amount_cents=0)
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    async with fake.client() as c:
        yield c


async def subscribe(client: httpx.AsyncClient, plan: str) -> dict[str, Any]:
    body = {"subscription": {"external_customer_id": "org", "plan_code": plan, "external_id": "sub"}}
    response = await client.post("/api/v1/subscriptions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["subscription"]  # type: ignore[no-any-return]


async def event(client: httpx.AsyncClient, tx: str, timestamp: float) -> None:
    body = {
        "event": {"transaction_id": tx, "external_subscription_id": "sub", "code": "api_call", "timestamp": timestamp}
    }
    response = await client.post("/api/v1/events", json=body)
    assert response.status_code == 200, response.text


async def test_subscription_webhooks_embed_the_customer(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Lago's subscription webhooks serialize the subscription with ``includes: %i[plan customer]`` (lago-api
    ``Webhooks::Subscriptions::Started/Updated/TerminatedService``; the spec's ``SubscriptionWithCustomerObject``
    requires ``customer``): a handler reading ``subscription["customer"]`` must work against the emulator too."""
    await client.post("/api/v1/customers", json={"customer": {"external_id": "org", "email": "a@b.test"}})
    await subscribe(client, "starter")
    await subscribe(client, "pro")  # upgrade: terminated + started
    await subscribe(client, "free")  # downgrade: updated
    await client.put("/api/v1/subscriptions/sub", json={"subscription": {"name": "renamed"}})
    await client.delete("/api/v1/subscriptions/sub", params={"status": "pending"})  # cancel: terminated + updated
    await client.delete("/api/v1/subscriptions/sub")
    sent = [w for w in fake.emitted_webhooks if w["object_type"] == "subscription"]
    assert {w["webhook_type"] for w in sent} == {
        "subscription.started",
        "subscription.terminated",
        "subscription.updated",
    }
    for webhook in sent:
        assert webhook["subscription"]["customer"]["external_id"] == "org"
        assert webhook["subscription"]["customer"]["email"] == "a@b.test"
    assert [error for w in fake.emitted_webhooks for error in webhook_errors(w)] == []


async def test_upgrade_invoices_the_replaced_subscription(
    client: httpx.AsyncClient, fake: FakeLago, clock: Clock
) -> None:
    """lago-api ``PlanUpgradeService#bill_subscriptions``: the terminated record is billed at once
    (``BillSubscriptionJob ... invoicing_reason: :upgrading``, whatever its ``on_termination_invoice``), so its
    usage so far lands on an invoice (``invoice.created``); the emulator left the usage unbilled."""
    await subscribe(client, "starter")
    clock.now = NOW + timedelta(hours=1)
    await event(client, "t1", NOW.timestamp() + 60)
    await subscribe(client, "pro")
    invoices = (await client.get("/api/v1/invoices", params={"external_customer_id": "org"})).json()["invoices"]
    assert [(i["invoice_type"], i["fees_amount_cents"]) for i in invoices] == [("subscription", 200)]
    types = [
        w["webhook_type"] for w in fake.emitted_webhooks if w["webhook_type"].startswith(("subscription", "invoice"))
    ]
    assert types == ["subscription.started", "subscription.terminated", "subscription.started", "invoice.created"]


async def test_termination_invoice_leaves_out_events_after_the_termination(
    client: httpx.AsyncClient, fake: FakeLago, clock: Clock
) -> None:
    """A termination invoice covers the period up to ``terminated_at``: an event timestamped later in the period is
    not billed (lago-api.md §4, "ignored in a termination invoice if the subscription ends before them")."""
    await subscribe(client, "starter")
    clock.now = NOW + timedelta(hours=1)
    await event(client, "before", NOW.timestamp() + 60)
    await event(client, "after", NOW.timestamp() + 7200)  # after the termination, still in March
    assert fake.usage("org", "sub")["customer_usage"]["amount_cents"] == 400
    await client.delete("/api/v1/subscriptions/sub")
    invoices = (await client.get("/api/v1/invoices", params={"external_customer_id": "org"})).json()["invoices"]
    assert [i["fees_amount_cents"] for i in invoices] == [200]


async def test_deleting_a_customer_bills_its_subscriptions_and_cancels_pending_ones_quietly(
    client: httpx.AsyncClient, fake: FakeLago, clock: Clock
) -> None:
    """lago-api ``Customers::TerminateRelationsService``: each active subscription goes through
    ``Subscriptions::TerminateService`` (``subscription.terminated`` and, per its ``on_termination_invoice``, the
    termination invoice); pending ones get ``mark_as_canceled!``, which sends no webhook. The emulator terminated
    without an invoice (the period's usage unbilled) and sent ``subscription.terminated`` for a pending one."""
    await subscribe(client, "starter")
    later = {"subscription": {"external_customer_id": "org", "plan_code": "pro", "external_id": "later",
                              "subscription_at": "2026-05-01T00:00:00Z"}}  # fmt: skip
    assert (await client.post("/api/v1/subscriptions", json=later)).json()["subscription"]["status"] == "pending"
    clock.now = NOW + timedelta(hours=1)
    await event(client, "t1", NOW.timestamp() + 60)
    fake.emitted_webhooks.clear()
    assert (await client.delete("/api/v1/customers/org")).status_code == 200
    assert sorted((s["external_id"], s["status"]) for s in fake.subscriptions) == [
        ("later", "canceled"),
        ("sub", "terminated"),
    ]
    assert [i["fees_amount_cents"] for i in fake.invoices] == [200]
    sent = [(w["webhook_type"], w[w["object_type"]].get("external_id")) for w in fake.emitted_webhooks]
    assert sent == [("subscription.terminated", "sub"), ("invoice.created", None)]


async def test_usage_amounts_are_in_the_currencys_subunits(fake: FakeLago) -> None:
    """Lago's ``amount_cents`` count the currency's subunits (the Money gem's ``subunit_to_unit``): ¥3 a call, 4 calls
    is 12 (a yen has no subunit), not 1,200 as 100 subunits per unit would make it."""
    fake.add_plan(
        "yen",
        amount_cents=0,
        amount_currency="JPY",
        charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "3"}}],
    )
    fake.add_subscription("org_jp", "yen", external_id="org_jp")
    async with fake.client() as http:
        for i in range(4):
            answer = await http.post(
                "/api/v1/events",
                json={"event": {"transaction_id": f"jp{i}", "external_subscription_id": "org_jp", "code": "api_call"}},
            )
            assert answer.status_code == 200, answer.text
        usage = (
            await http.get("/api/v1/customers/org_jp/current_usage", params={"external_subscription_id": "org_jp"})
        ).json()["customer_usage"]
    assert (usage["currency"], usage["amount_cents"]) == ("JPY", 12)
