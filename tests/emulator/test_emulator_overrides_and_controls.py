"""FakeLago where a user's test suite relies on it speaking Lago's API.

Each test names what a user would see go wrong; responses are validated against Lago's OpenAPI spec too.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from _openapi import assert_response_matches
from _pinned_clock import NOW, Clock
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
    )
    fake.add_customer("org", name="Org", currency="USD")
    return fake


def _flat_plan_entitlements(data: Any) -> Any:
    """``data`` without the entitlements embedded in plans: the spec wraps each of ``PlanObject.entitlements`` in
    ``{"entitlement": ...}``, Lago's PlanSerializer (and the emulator) renders them flat."""
    if isinstance(data, dict):
        return {
            k: [] if k == "entitlements" and "interval" in data else _flat_plan_entitlements(v) for k, v in data.items()
        }
    if isinstance(data, list):
        return [_flat_plan_entitlements(v) for v in data]
    return data


def _matches_spec(response: httpx.Response) -> None:
    body = _flat_plan_entitlements(response.json())
    assert_response_matches(httpx.Response(response.status_code, json=body, request=response.request))


async def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    _matches_spec(response)
    return response.json()


# --- plan_overrides: a negotiated price must be what the emulator bills ------------------------------------------


async def test_plan_overrides_give_the_subscription_its_own_price(fake: FakeLago) -> None:
    """``POST /subscriptions {"plan_overrides": {...}}`` (Lago: ``Plans::OverrideService``, a child plan with the
    parent's code) was silently ignored: the subscription answered the plan's list price and usage was billed at the
    plan's charge price, so a test of a negotiated-price flow passed against wrong numbers."""
    async with fake.client() as client:
        plan = (await _ok(await client.get("/api/v1/plans/pro")))["plan"]
        charge_id = plan["charges"][0]["lago_id"]
        await _ok(
            await client.post(
                "/api/v1/plans/pro/entitlements", json={"entitlements": {"api_quota": {"max_api_calls": 7}}}
            )
        )
        body = {
            "subscription": {
                "external_customer_id": "org",
                "plan_code": "pro",
                "external_id": "sub",
                "plan_overrides": {
                    "amount_cents": 500,
                    "name": "Pro (negotiated)",
                    "charges": [{"id": charge_id, "properties": {"amount": "0.05"}}],
                },
            }
        }
        sub = (await _ok(await client.post("/api/v1/subscriptions", json=body)))["subscription"]
        assert sub["plan_code"] == "pro" and sub["plan_amount_cents"] == 500
        assert sub["plan"]["code"] == "pro" and sub["plan"]["lago_id"] != plan["lago_id"]
        assert sub["plan"]["name"] == "Pro (negotiated)" and sub["plan"]["amount_cents"] == 500
        assert sub["plan"]["charges"][0]["properties"]["amount"] == "0.05"
        # the subscription's entitlements are its parent plan's (SubscriptionEntitlement.for_subscription)
        assert sub["entitlements"][0]["privileges"][0]["value"] == 7

        events = [{"transaction_id": f"t{i}", "external_subscription_id": "sub", "code": "api_call"} for i in range(3)]
        await _ok(await client.post("/api/v1/events/batch", json={"events": events}))
        usage = await _ok(
            await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
        )
        assert usage["customer_usage"]["amount_cents"] == 15  # 3 x 0.05 USD, not 3 x 0.01

        # the plan itself is untouched and the override plan is not listed as a plan of its own
        again = (await _ok(await client.get("/api/v1/plans/pro")))["plan"]
        assert again["amount_cents"] == 1000 and again["charges"][0]["properties"]["amount"] == "0.01"
        listed = await _ok(await client.get("/api/v1/plans"))
        assert [p["lago_id"] for p in listed["plans"]] == [plan["lago_id"]]
        # a subscription list filtered by the plan's code finds it (SubscriptionsQuery joins plans on code)
        by_plan = await _ok(await client.get("/api/v1/subscriptions", params={"plan_code": "pro"}))
        assert [s["external_id"] for s in by_plan["subscriptions"]] == ["sub"]

        # terminated: invoiced at the negotiated price, not the plan's (1000 / 31 + 3 = 35): started and terminated on
        # 15 March, one day of 500 / 31, 16 (Fees::SubscriptionService#terminated_amount), + 15
        await _ok(await client.delete("/api/v1/subscriptions/sub"))
    (invoice,) = fake.invoices
    assert invoice["total_amount_cents"] == 31


async def test_plan_overrides_with_a_bad_amount_are_refused(fake: FakeLago) -> None:
    """An override Lago cannot save (a negative amount) is a 422 naming the field, and nothing is created."""
    body = {
        "subscription": {
            "external_customer_id": "org",
            "plan_code": "pro",
            "external_id": "sub",
            "plan_overrides": {"amount_cents": -1},
        }
    }
    async with fake.client() as client:
        response = await client.post("/api/v1/subscriptions", json=body)
    assert response.status_code == 422, response.text
    _matches_spec(response)
    assert response.json()["error_details"] == {"amount_cents": ["value_is_invalid"]}
    assert fake.subscriptions == []


async def test_an_override_plan_is_compared_at_its_own_price(fake: FakeLago) -> None:
    """Lago compares the *overridden* amount when the external_id already has a subscription (create_service sets
    ``plan.amount_cents`` from the overrides before ``upgrade?``): moving to a plan listed higher but negotiated lower
    is a downgrade at the end of the period, not an upgrade billed at once. The same plan again, overrides or not, is
    the current subscription unchanged (``plan.id == current_subscription.plan.id``)."""
    fake.add_plan("team", amount_cents=5000)
    fake.add_subscription("org", "pro", external_id="sub")
    same = {
        "external_customer_id": "org",
        "plan_code": "pro",
        "external_id": "sub",
        "plan_overrides": {"amount_cents": 1},
    }
    team = {**same, "plan_code": "team", "plan_overrides": {"amount_cents": 100}}
    async with fake.client() as client:
        unchanged = (await _ok(await client.post("/api/v1/subscriptions", json={"subscription": same})))["subscription"]
        assert unchanged["plan_amount_cents"] == 1000 and unchanged["next_plan_code"] is None
        sub = (await _ok(await client.post("/api/v1/subscriptions", json={"subscription": team})))["subscription"]
        assert sub["status"] == "active" and sub["plan_code"] == "pro"  # the current one, still
        assert sub["next_plan_code"] == "team" and sub["downgrade_plan_date"] == "2026-04-01"
        pending = await _ok(await client.get("/api/v1/subscriptions/sub", params={"status": "pending"}))
        assert pending["subscription"]["plan_code"] == "team" and pending["subscription"]["plan_amount_cents"] == 100
    assert fake.invoices == []  # nothing billed: no upgrade happened


# --- webhooks: billable_metric.created ----------------------------------------------------------------------------


async def test_creating_a_billable_metric_sends_billable_metric_created(fake: FakeLago) -> None:
    """Lago sends ``billable_metric.created`` (SendWebhookJob WEBHOOK_SERVICES, the spec's webhook) as it sends
    ``plan.created`` and ``feature.created``; the emulator sent only ``.updated`` and ``.deleted``."""
    metric = {"billable_metric": {"name": "Tokens", "code": "tokens", "aggregation_type": "sum_agg", "field_name": "t"}}
    async with fake.client() as client:
        created = (await _ok(await client.post("/api/v1/billable_metrics", json=metric)))["billable_metric"]
    sent = [w for w in fake.emitted_webhooks if w["webhook_type"] == "billable_metric.created"]
    assert [w["billable_metric"]["code"] for w in sent] == ["api_call", "tokens"]
    assert sent[-1]["billable_metric"] == created


# --- control API: faults never block the emulator's own controls -------------------------------------------------


async def test_a_fault_on_every_path_does_not_block_reset(fake: FakeLago) -> None:
    """``POST /_emulator/faults {"status": 503, "path": "/"}`` (fault everything, /health included) also answered
    ``/_emulator/reset`` and ``/_emulator/state`` with the 503: the documented way to start over failed, and the fault
    (which reset clears) stayed."""
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        added = await client.post("/_emulator/faults", json={"status": 503, "path": "/"})
        assert added.status_code == 201
        assert (await client.get("/health")).status_code == 503  # what was asked
        assert (await client.get("/_emulator/state")).status_code == 200
        reset = await client.post("/_emulator/reset")
        assert reset.status_code == 200, reset.text
        assert (await client.get("/_emulator/faults")).json() == {"faults": []}
        assert (await client.get("/health")).status_code == 200


async def test_a_dropped_connection_is_logged_without_a_status(fake: FakeLago) -> None:
    """``RequestRecord.status`` is "0 when no response was sent", as the served emulator logs a dropped connection;
    in process (``fake.transport()``) the drop was logged as a 502 Lago never sent, so a test asserting what Lago
    answered ("a 502, then a 200") passed against a response no client saw."""
    fake.inject_fault(drop=True, count=1)  # type: ignore[attr-defined]
    async with fake.client() as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/api/v1/customers")
        assert (await client.get("/api/v1/customers")).status_code == 200
    assert [r.status for r in fake.requests] == [0, 200]
