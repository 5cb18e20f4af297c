"""Every LagoClient method against the Lago emulator (in process, no network)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest

from lago_org_billing import (
    LagoAuthenticationError,
    LagoClient,
    LagoNotFoundError,
    LagoValidationError,
)
from lago_org_billing._settings import BillingSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def seeded(fake_lago: Any) -> Any:
    """An emulator with an api_call metric (sum of total_tokens) and two plans."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.001"}}
    fake_lago.add_plan("starter", amount_cents=1000, interval="monthly", charges=[charge])
    fake_lago.add_plan("pro", amount_cents=5000, interval="monthly", charges=[charge])
    return fake_lago


async def test_health(lago_client: LagoClient) -> None:
    """/health answers Success outside /api/v1."""
    assert (await lago_client.health())["message"] == "Success"


async def test_wrong_api_key_is_an_authentication_error(fake_lago: Any) -> None:
    """A wrong key is a 401 LagoAuthenticationError that points at LAGO_API_KEY."""
    settings = BillingSettings(api_url=fake_lago.base_url, api_key="wrong")
    async with LagoClient(settings, transport=fake_lago.transport()) as lago:
        with pytest.raises(LagoAuthenticationError, match="LAGO_API_KEY"):
            await lago.get_customer("org_1")


async def test_customers_crud(lago_client: LagoClient) -> None:
    """Upsert, get, update, list, iterate and delete customers."""
    created = await lago_client.upsert_customer({"external_id": "org_1", "name": "Acme", "email": "a@acme.test"})
    assert created["external_id"] == "org_1"
    assert (await lago_client.get_customer("org_1"))["name"] == "Acme"
    updated = await lago_client.update_customer("org_1", name="Acme Inc")
    assert updated["name"] == "Acme Inc" and updated["email"] == "a@acme.test"
    for i in range(5):
        await lago_client.upsert_customer({"external_id": f"org_x{i}", "name": f"X{i}"})
    page = await lago_client.list_customers(per_page=2)
    assert page.total_count == 6 and len(page.items) == 2 and page.next_page == 2
    ids = [c["external_id"] async for c in lago_client.iter_customers(per_page=4)]
    assert sorted(ids) == sorted(["org_1"] + [f"org_x{i}" for i in range(5)])
    await lago_client.delete_customer("org_1")
    with pytest.raises(LagoNotFoundError) as info:
        await lago_client.get_customer("org_1")
    assert info.value.code == "customer_not_found"


async def test_subscription_lifecycle(seeded: Any, lago_client: LagoClient) -> None:
    """Create (auto-creating the customer), idempotent re-create, upgrade, downgrade, list, terminate."""
    sub = await lago_client.create_subscription(external_customer_id="org_1", plan_code="starter", external_id="org_1")
    assert sub["status"] == "active" and sub["plan_code"] == "starter"
    assert (await lago_client.get_customer("org_1"))["external_id"] == "org_1"
    again = await lago_client.create_subscription(
        external_customer_id="org_1", plan_code="starter", external_id="org_1"
    )
    assert again["lago_id"] == sub["lago_id"]
    upgraded = await lago_client.create_subscription(external_customer_id="org_1", plan_code="pro", external_id="org_1")
    assert upgraded["plan_code"] == "pro" and upgraded["lago_id"] != sub["lago_id"]
    downgraded = await lago_client.create_subscription(
        external_customer_id="org_1", plan_code="starter", external_id="org_1"
    )
    assert downgraded["plan_code"] == "pro" and downgraded["next_plan_code"] == "starter"
    current = await lago_client.get_subscription("org_1")
    assert current["plan_code"] == "pro"
    renamed = await lago_client.update_subscription("org_1", name="Main")
    assert renamed["name"] == "Main"
    active = await lago_client.list_subscriptions(external_customer_id="org_1")
    assert [s["plan_code"] for s in active.items] == ["pro"]
    every = [s async for s in lago_client.iter_subscriptions(statuses=["active", "terminated", "pending"])]
    assert {s["status"] for s in every} >= {"active", "terminated"}
    terminated = await lago_client.terminate_subscription("org_1", on_termination_invoice="skip")
    assert terminated["status"] == "terminated"
    with pytest.raises(LagoNotFoundError):
        await lago_client.get_subscription("org_1")
    assert (await lago_client.get_subscription("org_1", status="terminated"))["status"] == "terminated"


async def test_unknown_plan_is_not_found(seeded: Any, lago_client: LagoClient) -> None:
    """An unknown plan code is Lago's plan_not_found."""
    with pytest.raises(LagoNotFoundError) as info:
        await lago_client.create_subscription(external_customer_id="org_1", plan_code="nope", external_id="org_1")
    assert info.value.code == "plan_not_found"


async def test_events_single_batch_get_and_usage(seeded: Any, lago_client: LagoClient) -> None:
    """Events are ingested singly and in batches, fetched back, and summed in current usage."""
    await lago_client.create_subscription(external_customer_id="org_1", plan_code="starter", external_id="org_1")
    now = dt.datetime.now(dt.timezone.utc)
    event = await lago_client.create_event(
        {
            "transaction_id": "tx_1",
            "external_subscription_id": "org_1",
            "code": "api_call",
            "timestamp": now,
            "properties": {"total_tokens": 10},
        }
    )
    assert event["transaction_id"] == "tx_1"
    batch = await lago_client.create_events(
        [
            {
                "transaction_id": f"tx_b{i}",
                "external_subscription_id": "org_1",
                "code": "api_call",
                "properties": {"total_tokens": 5},
            }
            for i in range(3)
        ]
    )
    assert len(batch) == 3
    assert (await lago_client.get_event("tx_b1"))["transaction_id"] == "tx_b1"
    usage = await lago_client.get_current_usage("org_1", "org_1", billable_metric_code="api_call")
    charge = usage["charges_usage"][0]
    assert charge["units"] in ("25.0", "25")
    assert charge["events_count"] == 4


async def test_duplicate_batch_is_duplicate_only(seeded: Any, lago_client: LagoClient) -> None:
    """Re-sending a batch to the Postgres store is a 422 whose errors are all duplicates."""
    events = [
        {"transaction_id": f"tx_{i}", "external_subscription_id": "org_1", "code": "api_call", "timestamp": 1.5e9}
        for i in range(2)
    ]
    await lago_client.create_events(events)
    with pytest.raises(LagoValidationError) as info:
        await lago_client.create_events(events)
    assert info.value.is_duplicate_only
    assert set(info.value.failed_indexes()) == {0, 1}


async def test_metrics_plans_features_entitlements(fake_lago: Any, lago_client: LagoClient) -> None:
    """Billable metrics, plans, features and entitlements round-trip."""
    metric = await lago_client.create_billable_metric(
        {"name": "Calls", "code": "calls", "aggregation_type": "count_agg"}
    )
    assert (await lago_client.get_billable_metric("calls"))["lago_id"] == metric["lago_id"]
    plan = await lago_client.create_plan(
        {
            "name": "Team",
            "code": "team",
            "interval": "monthly",
            "amount_cents": 2000,
            "amount_currency": "USD",
            "pay_in_advance": False,
            "charges": [
                {"billable_metric_id": metric["lago_id"], "charge_model": "standard", "properties": {"amount": "1"}}
            ],
        }
    )
    assert (await lago_client.get_plan("team"))["lago_id"] == plan["lago_id"]
    await lago_client.create_feature(
        {
            "code": "api_quota",
            "name": "API quota",
            "privileges": [{"code": "max_api_calls", "value_type": "integer"}],
        }
    )
    await lago_client.set_plan_entitlements("team", {"api_quota": {"max_api_calls": 300}})
    await lago_client.create_subscription(external_customer_id="org_1", plan_code="team", external_id="org_1")
    entitlements = await lago_client.get_subscription_entitlements("org_1")
    privilege = entitlements[0]["privileges"][0]
    assert privilege["code"] == "max_api_calls" and privilege["value"] == 300
    overridden = await lago_client.update_subscription_entitlements("org_1", {"api_quota": {"max_api_calls": 900}})
    assert overridden[0]["privileges"][0]["value"] == 900
    assert [feature["code"] for feature in (await lago_client.list_features()).items] == ["api_quota"]
    await lago_client.create_subscription(
        external_customer_id="org_1", plan_code="team", external_id="org_2", subscription_at="2099-01-01T00:00:00Z"
    )
    await lago_client.update_subscription_entitlements("org_2", {"api_quota": {"max_api_calls": 50}}, status="pending")
    pending = await lago_client.get_subscription_entitlements("org_2", status="pending")
    assert pending[0]["privileges"][0]["value"] == 50


async def test_invoices_are_paginated(fake_lago: Any, lago_client: LagoClient) -> None:
    """Invoices are listed page by page and iterated across pages."""
    fake_lago.add_customer("org_1", name="Acme")
    for _ in range(5):
        fake_lago.add_invoice("org_1")
    fake_lago.add_customer("org_2", name="Other")
    fake_lago.add_invoice("org_2")
    page = await lago_client.list_invoices(external_customer_id="org_1", per_page=2)
    assert page.total_count == 5 and page.total_pages == 3
    assert len([i async for i in lago_client.iter_invoices(external_customer_id="org_1", per_page=2)]) == 5


async def test_webhook_public_key_is_pem(lago_client: LagoClient) -> None:
    """The webhook public key decodes to a PEM public key."""
    pem = await lago_client.get_webhook_public_key()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert base64.b64encode(pem)  # round-trips as bytes
