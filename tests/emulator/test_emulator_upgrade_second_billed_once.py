"""The emulator bills each event of an upgrade's second once (found through the demo's quota scene).

The demo's org_tiny makes its 5 free calls, is refused twice, upgrades to starter, and makes call 8, all within the
same second. The emulator then counts the 5 free-plan calls in the *starter* subscription's usage too (``curl
.../customers/org_tiny/current_usage?external_subscription_id=org_tiny`` after ``demo --serve``: ``events_count`` 6),
although the free subscription's termination invoice has already billed them. lago-api bounds a subscription's
charges by the exact ``started_at`` / ``terminated_at`` (``DatesService#charges_from_datetime`` / ``
charges_to_datetime``, microseconds in the database); the emulator keeps both to the second (``iso``) and so gives
every event of the upgrade's second to both subscriptions: billed twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from _openapi import assert_response_matches
from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = timezone.utc
#: 12:00:00.300 on 15 March: an event on the free plan, then the upgrade at .600, then an event on the new plan at .800
BEFORE = datetime(2026, 3, 15, 12, 0, 0, 300_000, tzinfo=UTC)
UPGRADE = BEFORE + timedelta(milliseconds=300)
AFTER = BEFORE + timedelta(milliseconds=500)


def _fake(clock: Clock) -> FakeLago:
    """Plans ``free`` and ``starter`` (in arrears), each charging 1 USD per token of ``api_call``; ``org``
    on ``free`` (external id ``sub``) from 1 March."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}
    fake.add_plan("free", amount_cents=0, charges=[charge])
    fake.add_plan("starter", amount_cents=2000, charges=[charge])
    fake.add_subscription("org", "free", external_id="sub")
    return fake


async def _event(client: Any, clock: Clock, transaction_id: str, at: datetime, tokens: int) -> None:
    clock.now = at
    event = {
        "transaction_id": transaction_id,
        "external_subscription_id": "sub",
        "code": "api_call",
        "timestamp": at.timestamp(),
        "properties": {"total_tokens": tokens},
    }
    response = await client.post("/api/v1/events", json={"event": event})
    assert response.status_code == 200, response.text


async def _upgrade_within_one_second(clock: Clock, client: Any) -> None:
    """10 tokens on ``free`` at .300, the upgrade to ``starter`` at .600, 1000 tokens on ``starter`` at .800."""
    await _event(client, clock, "on-free", BEFORE, 10)
    clock.now = UPGRADE
    body = {"subscription": {"external_customer_id": "org", "plan_code": "starter", "external_id": "sub"}}
    response = await client.post("/api/v1/subscriptions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["subscription"]["plan_code"] == "starter"
    await _event(client, clock, "on-starter", AFTER, 1000)


async def test_upgrade_new_subscription_usage_leaves_out_the_events_before_the_upgrade_in_its_second() -> None:
    """The starter subscription's current usage counts only the event sent after the upgrade (1 event, 1000
    tokens); the emulator counted the free plan's event of the same second too (2 events, 1010)."""
    clock = Clock(datetime(2026, 3, 1, tzinfo=UTC))
    fake = _fake(clock)
    async with fake.client() as client:
        await _upgrade_within_one_second(clock, client)
        response = await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
        assert response.status_code == 200, response.text
        assert_response_matches(response)
    charge = response.json()["customer_usage"]["charges_usage"][0]
    assert (charge["events_count"], charge["units"]) == (1, "1000.0")


async def test_upgrade_bills_each_event_of_the_upgrade_second_on_one_invoice_only() -> None:
    """Over the free plan's termination invoice and the starter plan's March invoice, the 10 tokens sent before the
    upgrade and the 1000 sent after it are billed once each: 1010 units of charges in all (the emulator: 1020, the
    10 tokens on both invoices)."""
    clock = Clock(datetime(2026, 3, 1, tzinfo=UTC))
    fake = _fake(clock)
    async with fake.client() as client:
        await _upgrade_within_one_second(clock, client)
        clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
        listed = await client.get("/api/v1/invoices", params={"external_customer_id": "org"})
        assert listed.status_code == 200, listed.text
        charges = []
        for item in listed.json()["invoices"]:
            one = await client.get(f"/api/v1/invoices/{item['lago_id']}")
            assert one.status_code == 200, one.text
            charges += [f for f in one.json()["invoice"]["fees"] if f["item"]["type"] == "charge"]
    assert sorted(float(f["units"]) for f in charges) == [10.0, 1000.0]
    assert sum(int(f["events_count"]) for f in charges) == 2
