"""FakeLago subscriptions: create, idempotency, upgrade, downgrade, terminate, cancel, time-driven changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """An emulator with a cheap (starter) and an expensive (pro, yearly) plan."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", amount_cents=1000, charges=[{"billable_metric_code": "api_call"}])
    fake.add_plan("pro", amount_cents=20000, interval="yearly")
    fake.add_plan("free", amount_cents=0)
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated raw client."""
    async with fake.client() as c:
        yield c


def sub_webhooks(fake: FakeLago) -> list[str]:
    return [w["webhook_type"] for w in fake.emitted_webhooks if w["object_type"] == "subscription"]


async def subscribe(
    client: httpx.AsyncClient, plan: str, *, customer: str = "org", ext: str = "sub", **extra: Any
) -> httpx.Response:
    body = {"subscription": {"external_customer_id": customer, "plan_code": plan, "external_id": ext, **extra}}
    return await client.post("/api/v1/subscriptions", json=body)


async def test_create_auto_creates_customer_and_is_idempotent(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """An unknown customer is created; re-posting the same plan returns the same subscription."""
    r = await subscribe(client, "starter")
    assert r.status_code == 200
    sub = r.json()["subscription"]
    assert (sub["status"], sub["plan_code"], sub["billing_time"]) == ("active", "starter", "calendar")
    assert sub["plan"]["code"] == "starter"
    assert sub["entitlements"] == []
    # DatesService#charges_from_datetime: the period's start, clamped to the exact started_at (now)
    assert sub["current_billing_period_started_at"] == "2026-03-15T12:00:00Z"
    assert sub["current_billing_period_ending_at"] == "2026-03-31T23:59:59Z"
    assert (await client.get("/api/v1/customers/org")).json()["customer"]["lago_id"] == sub["lago_customer_id"]
    again = (await subscribe(client, "starter")).json()["subscription"]
    assert again["lago_id"] == sub["lago_id"]
    assert len(fake.subscriptions) == 1
    assert sub_webhooks(fake) == ["subscription.started"]


async def test_create_errors(client: httpx.AsyncClient) -> None:
    """Unknown plan is 404; bad billing_time and a missing external_id are 422."""
    r = await subscribe(client, "ghost")
    assert (r.status_code, r.json()["code"]) == (404, "plan_not_found")
    r = await subscribe(client, "starter", billing_time="weekly")
    assert r.json()["error_details"] == {"billing_time": ["value_is_invalid"]}
    r = await client.post(
        "/api/v1/subscriptions", json={"subscription": {"external_customer_id": "o", "plan_code": "starter"}}
    )
    assert r.json()["error_details"] == {"external_id": ["value_is_mandatory"]}


async def test_external_id_active_on_another_customer_is_422(client: httpx.AsyncClient) -> None:
    """Moving a subscription to another customer is refused until it is terminated."""
    assert (await subscribe(client, "starter", customer="a")).status_code == 200
    r = await subscribe(client, "starter", customer="b")
    assert r.status_code == 422
    assert r.json()["error_details"] == {"external_id": ["value_already_exist"]}
    assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 200
    r = await subscribe(client, "starter", customer="b")
    assert r.json()["subscription"]["external_customer_id"] == "b"


async def test_upgrade_creates_new_record(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """A plan with a higher yearly amount replaces the subscription immediately."""
    old = (await subscribe(client, "starter")).json()["subscription"]
    new = (await subscribe(client, "pro")).json()["subscription"]
    assert new["lago_id"] != old["lago_id"]
    assert (new["status"], new["plan_code"], new["previous_plan_code"]) == ("active", "pro", "starter")
    terminated = (await client.get("/api/v1/subscriptions/sub", params={"status": "terminated"})).json()["subscription"]
    assert terminated["lago_id"] == old["lago_id"]
    assert terminated["next_plan_code"] == "pro"
    assert terminated["terminated_at"] is not None
    assert sub_webhooks(fake) == ["subscription.started", "subscription.terminated", "subscription.started"]


async def test_downgrade_is_pending_until_period_end(client: httpx.AsyncClient, fake: FakeLago, clock: Clock) -> None:
    """A cheaper plan is scheduled: current shows next_plan_code until the period ends, then switches."""
    current = (await subscribe(client, "starter")).json()["subscription"]
    r = await subscribe(client, "free")
    shown = r.json()["subscription"]
    assert shown["lago_id"] == current["lago_id"]
    assert (shown["status"], shown["plan_code"], shown["next_plan_code"]) == ("active", "starter", "free")
    assert shown["downgrade_plan_date"] == "2026-04-01"
    pending = (await client.get("/api/v1/subscriptions/sub", params={"status": "pending"})).json()["subscription"]
    assert (pending["plan_code"], pending["previous_plan_code"]) == ("free", "starter")
    assert fake.emitted_webhooks[-1]["webhook_type"] == "subscription.updated"
    clock.now = datetime(2026, 4, 1, 0, 30, tzinfo=timezone.utc)
    active = (await client.get("/api/v1/subscriptions/sub")).json()["subscription"]
    assert (active["plan_code"], active["lago_id"]) == ("free", pending["lago_id"])
    assert active["started_at"] == "2026-04-01T00:00:00Z"


async def test_terminate_and_cancel(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """DELETE terminates the active record; status=pending cancels a scheduled one."""
    await subscribe(client, "starter")
    await subscribe(client, "free")
    r = await client.delete("/api/v1/subscriptions/sub", params={"status": "pending"})
    canceled = r.json()["subscription"]
    assert (canceled["status"], canceled["plan_code"]) == ("canceled", "free")
    assert canceled["canceled_at"] is not None
    current = (await client.get("/api/v1/subscriptions/sub")).json()["subscription"]
    assert current["next_plan_code"] is None
    r = await client.delete("/api/v1/subscriptions/sub", params={"on_termination_invoice": "skip"})
    terminated = r.json()["subscription"]
    assert (terminated["status"], terminated["on_termination_invoice"]) == ("terminated", "skip")
    assert fake.invoices == []
    assert (await client.get("/api/v1/subscriptions/sub")).json()["code"] == "subscription_not_found"
    assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 404
    assert sub_webhooks(fake).count("subscription.terminated") == 2


async def test_termination_invoice_generated(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """on_termination_invoice=generate (the default) leaves an invoice for the customer."""
    fake.add_plan(
        "metered", amount_cents=0, charges=[{"billable_metric_code": "api_call", "properties": {"amount": "2"}}]
    )
    await subscribe(client, "metered")
    await client.post(
        "/api/v1/events", json={"event": {"transaction_id": "t", "external_subscription_id": "sub", "code": "api_call"}}
    )
    await client.delete("/api/v1/subscriptions/sub")
    invoices = (await client.get("/api/v1/invoices", params={"external_customer_id": "org"})).json()["invoices"]
    assert [i["total_amount_cents"] for i in invoices] == [200]
    assert "invoice.created" in [w["webhook_type"] for w in fake.emitted_webhooks]


async def test_list_subscriptions_filters(client: httpx.AsyncClient) -> None:
    """Without status[] only active subscriptions are listed; filters and customer route work."""
    await subscribe(client, "starter", customer="a", ext="s1")
    await subscribe(client, "starter", customer="b", ext="s2")
    await client.delete("/api/v1/subscriptions/s2")
    r = await client.get("/api/v1/subscriptions")
    assert [s["external_id"] for s in r.json()["subscriptions"]] == ["s1"]
    r = await client.get("/api/v1/subscriptions", params={"status[]": ["active", "terminated"]})
    assert sorted(s["external_id"] for s in r.json()["subscriptions"]) == ["s1", "s2"]
    r = await client.get("/api/v1/subscriptions", params={"external_customer_id": "b", "status[]": "terminated"})
    assert [s["external_id"] for s in r.json()["subscriptions"]] == ["s2"]
    r = await client.get("/api/v1/subscriptions", params={"plan_code": "pro"})
    assert r.json()["meta"]["total_count"] == 0
    r = await client.get("/api/v1/customers/a/subscriptions")
    assert [s["external_id"] for s in r.json()["subscriptions"]] == ["s1"]
    assert (await client.get("/api/v1/customers/ghost/subscriptions")).json()["code"] == "customer_not_found"


async def test_update_subscription(client: httpx.AsyncClient, clock: Clock) -> None:
    """PUT changes the name and ending_at, not the plan; reaching ending_at terminates it."""
    await subscribe(client, "starter")
    ending = (clock.now + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"subscription": {"name": "Main", "ending_at": ending, "plan_code": "pro"}}
    r = await client.put("/api/v1/subscriptions/sub", json=body)
    sub = r.json()["subscription"]
    assert (sub["name"], sub["ending_at"], sub["plan_code"]) == ("Main", ending, "starter")
    r = await client.put("/api/v1/subscriptions/sub", json={"subscription": {"ending_at": "not a date"}})
    assert r.json()["error_details"] == {"ending_at": ["invalid_date"]}
    assert (await client.put("/api/v1/subscriptions/ghost", json={"subscription": {"name": "x"}})).status_code == 404
    clock.now += timedelta(days=4)
    assert (await client.get("/api/v1/subscriptions/sub")).status_code == 404
    terminated = (await client.get("/api/v1/subscriptions/sub", params={"status": "terminated"})).json()
    assert terminated["subscription"]["terminated_at"] == ending


async def test_future_subscription_is_pending_then_starts(client: httpx.AsyncClient, clock: Clock) -> None:
    """subscription_at in the future gives a pending subscription that starts on that date."""
    r = await subscribe(client, "starter", subscription_at="2026-03-20T00:00:00Z", billing_time="anniversary")
    sub = r.json()["subscription"]
    assert (sub["status"], sub["started_at"]) == ("pending", None)
    clock.now = datetime(2026, 3, 21, tzinfo=timezone.utc)
    sub = (await client.get("/api/v1/subscriptions/sub")).json()["subscription"]
    assert (sub["status"], sub["started_at"]) == ("active", "2026-03-20T00:00:00Z")
    assert sub["current_billing_period_ending_at"] == "2026-04-19T23:59:59Z"


async def test_deleting_customer_terminates_subscriptions(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """DELETE /customers terminates the customer's active subscriptions."""
    await subscribe(client, "starter")
    await client.delete("/api/v1/customers/org")
    assert [s["status"] for s in fake.subscriptions] == ["terminated"]
