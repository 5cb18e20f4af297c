"""``POST .../usage/record`` refuses what Lago would store and never bill (an ``event_code`` its plan has no charge
for); an event dated before the org's subscription started is the same (Lago ignores events before ``started_at``), and
was answered 201 "recorded": refused with a 422 naming the start, nothing sent. Found by an audit of the routes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from lago_org_billing import BillingSettings, LagoClient, OrgBilling, billing_routes
from lago_org_billing._ids import parse_time
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.timezone.utc)


async def _record(timestamps: list[Any]) -> tuple[FakeLago, list[httpx.Response], float]:
    fake = FakeLago(api_key="k", clock=lambda: NOW)
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "tokens", "properties": {"amount": "1"}}
    fake.add_plan("starter", amount_cents=0, charges=[charge])
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    answers = []
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=lambda request, org_id: True)
        app = Starlette(routes=[Mount("/billing", app=router)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            base = "/billing/organizations/org_a"
            setup = await client.post(f"{base}/setup", json={"org_name": "A", "plan_code": "starter"})
            assert setup.status_code == 200, setup.text
            for timestamp in timestamps:
                body: dict[str, Any] = {"event_code": "tokens", "properties": {"total_tokens": 10}}
                if timestamp is not None:
                    body["timestamp"] = timestamp
                answers.append(await client.post(f"{base}/usage/record", json=body))
    started = parse_time(fake.subscriptions[0]["started_at"])
    assert started is not None
    return fake, answers, started.timestamp()


@pytest.mark.parametrize("timestamp", [1_600_000_000, "1600000000.5", 0, NOW.timestamp() - 1])
async def test_an_event_dated_before_the_subscription_started_is_refused(timestamp: Any) -> None:
    fake, (answer,), _ = await _record([timestamp])
    assert answer.status_code == 422, answer.text
    assert "subscription started" in answer.text and "never bill" in answer.text, answer.text
    assert fake.events == []  # nothing sent


async def test_events_from_the_start_on_or_undated_are_recorded() -> None:
    start = NOW.timestamp()
    fake, answers, started = await _record([None, start, start + 0.0005, start + 60, f"{start + 61:.3f}"])
    assert started == start
    assert [answer.status_code for answer in answers] == [201] * 5, [a.text for a in answers]
    assert len(fake.events) == 5


async def test_a_timestamp_that_is_no_time_is_still_said_so() -> None:
    _, (answer,), _ = await _record(["yesterday"])
    assert answer.status_code == 422 and "is not a number of Unix seconds" in answer.text, answer.text
