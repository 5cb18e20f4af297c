"""Review of the Lago emulator: past usage, period-end invoices, percentage and graduated percentage charges.

Covers what the emulator answered differently from Lago (lago-api ``PastUsageQuery``, ``usage_controller#past``,
``V1::Customers::PastUsageSerializer``, ``ChargeModels::PercentageService``, ``GraduatedPercentageService``,
``Charges::Validators::*``):

* ``GET /customers/{id}/past_usage`` (404 before): one usage period per invoiced period of the subscription, newest
  first, built from the invoices (their amounts and the charge fees frozen at invoicing), paginated as Kaminari does
  it (``periods_count`` is the page's limit); ``422 value_is_mandatory`` without ``external_subscription_id``,
  ``404 billable_metric_not_found`` for an unknown ``billable_metric_code``, an empty list (not a 404) for an unknown
  customer or subscription, as lago-api answers;
* the end of a billing period issues the period's invoice (``invoice.created``), as Lago's biller job does;
* percentage charges: free units per events / per total aggregation, and per-transaction min/max amounts;
* graduated percentage charges (billed 0 before), in current usage and on invoices;
* percentage / graduated percentage properties validated as lago-api does (``422 {"properties": [...]}``), and an
  unknown ``charge_model`` still refused with ``422``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from _openapi import assert_response_matches
from _pinned_clock import NOW, Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = timezone.utc


def _event(tid: str, value: Any, at: datetime, *, code: str = "tx", sub: str = "sub") -> dict[str, Any]:
    return {
        "transaction_id": tid,
        "external_subscription_id": sub,
        "code": code,
        "timestamp": at.timestamp(),
        "properties": {"amount": value},
    }


async def _send(fake: FakeLago, events: list[dict[str, Any]]) -> None:
    async with fake.client() as client:
        response = await client.post("/api/v1/events/batch", json={"events": events})
        assert response.status_code == 200, response.text


def _percentage_fake(clock: Clock, properties: dict[str, Any], model: str = "percentage") -> FakeLago:
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_billable_metric("tx", aggregation_type="sum_agg", field_name="amount")
    fake.add_plan("pct", charges=[{"billable_metric_code": "tx", "charge_model": model, "properties": properties}])
    fake.add_subscription("org", "pct", external_id="sub")
    return fake


async def _amount(fake: FakeLago, values: list[Any]) -> int:
    await _send(fake, [_event(f"t{i}", v, NOW + timedelta(minutes=i + 1)) for i, v in enumerate(values)])
    return int(fake.usage("org", "sub")["customer_usage"]["charges_usage"][0]["amount_cents"])


# Percentage ------------------------------------------------------------------------------------------------------


async def test_percentage_free_units_per_events(clock: Clock) -> None:
    """The first ``free_units_per_events`` events are free, of the rate and of the fixed fee: 2 % of the third
    event's 300 plus one fixed fee of 0.50 (the emulator billed 2 % of 600 plus three fixed fees: 13.50)."""
    fake = _percentage_fake(clock, {"rate": "2", "fixed_amount": "0.5", "free_units_per_events": 2})
    assert await _amount(fake, [100, 200, 300]) == 650


async def test_percentage_free_units_per_total_aggregation(clock: Clock) -> None:
    """The first 250 of the summed amount are free; the fixed fee is waived for the events whose running total stays
    under 250 (one here): 2 % of 350 plus two fixed fees of 0.50."""
    fake = _percentage_fake(clock, {"rate": "2", "fixed_amount": "0.5", "free_units_per_total_aggregation": "250"})
    assert await _amount(fake, [100, 200, 300]) == 800


async def test_percentage_per_transaction_min_and_max(clock: Clock) -> None:
    """Each event is billed on its own, between the min and the max: 1 % of 50 is raised to 1.00, 1 % of 500 capped
    at 2.00, 1 % of 150 stays 1.50."""
    fake = _percentage_fake(clock, {"rate": "1", "per_transaction_min_amount": "1", "per_transaction_max_amount": "2"})
    assert await _amount(fake, [50, 150, 500]) == 450


async def test_percentage_min_max_with_a_free_event(clock: Clock) -> None:
    """With per-transaction bounds, a free event is billed nothing (not even the minimum)."""
    fake = _percentage_fake(
        clock,
        {"rate": "1", "free_units_per_events": 1, "per_transaction_min_amount": "1", "per_transaction_max_amount": "2"},
    )
    assert await _amount(fake, [50, 150, 500]) == 350


async def test_percentage_without_free_units_keeps_rate_and_fixed_fee(clock: Clock) -> None:
    fake = _percentage_fake(clock, {"rate": "10", "fixed_amount": "0.3"})
    assert await _amount(fake, ["60.25", "40.25"]) == 1005 + 60


# Graduated percentage --------------------------------------------------------------------------------------------

RANGES = [
    {"from_value": 0, "to_value": 1000, "rate": "1", "flat_amount": "1"},
    {"from_value": 1001, "to_value": None, "rate": "0.5", "flat_amount": "0"},
]


async def test_graduated_percentage_ranges(clock: Clock) -> None:
    """1 % of the first 1000 plus a flat 1.00, then 0.5 % of the next 2000: 21.00 (the emulator billed 0)."""
    fake = _percentage_fake(clock, {"graduated_percentage_ranges": RANGES}, model="graduated_percentage")
    assert await _amount(fake, [1000, 2000]) == 2100


async def test_graduated_percentage_inside_the_first_range_and_without_units(clock: Clock) -> None:
    fake = _percentage_fake(clock, {"graduated_percentage_ranges": RANGES}, model="graduated_percentage")
    usage = fake.usage("org", "sub")["customer_usage"]["charges_usage"][0]
    assert usage["amount_cents"] == 100  # no units: the first range's flat amount all the same (lago-api#5760)
    assert await _amount(fake, [500]) == 500 + 100


async def test_graduated_percentage_on_the_termination_invoice(clock: Clock) -> None:
    fake = _percentage_fake(clock, {"graduated_percentage_ranges": RANGES}, model="graduated_percentage")
    await _send(fake, [_event("a", 3000, NOW + timedelta(minutes=1))])
    clock.now = NOW + timedelta(hours=1)
    async with fake.client() as client:
        assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 200
    assert [i["fees_amount_cents"] for i in fake.invoices] == [2100]


# Plan validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "properties", "codes"),
    [
        ("percentage", {}, ["invalid_rate"]),
        ("percentage", {"rate": "-1"}, ["invalid_rate"]),
        ("percentage", {"rate": "1", "fixed_amount": "x"}, ["invalid_fixed_amount"]),
        ("percentage", {"rate": "1", "free_units_per_events": "2"}, ["invalid_free_units_per_events"]),
        (
            "percentage",
            {"rate": "1", "per_transaction_min_amount": "5", "per_transaction_max_amount": "2"},
            ["per_transaction_max_lower_than_per_transaction_min"],
        ),
        ("graduated_percentage", {}, ["missing_graduated_percentage_ranges"]),
        (
            "graduated_percentage",
            {"graduated_percentage_ranges": [{"from_value": 0, "to_value": None, "rate": "x", "flat_amount": "0"}]},
            ["invalid_rate"],
        ),
        (
            "graduated_percentage",
            {"graduated_percentage_ranges": [{"from_value": 5, "to_value": None, "rate": "1", "flat_amount": "0"}]},
            ["invalid_graduated_percentage_ranges"],
        ),
    ],
)
async def test_percentage_properties_are_validated(model: str, properties: dict[str, Any], codes: list[str]) -> None:
    fake = FakeLago(clock_jobs="boundary", api_key="k")
    fake.add_billable_metric("tx", aggregation_type="sum_agg", field_name="amount")
    plan = {
        "code": "p",
        "name": "p",
        "interval": "monthly",
        "amount_cents": 0,
        "amount_currency": "USD",
        "charges": [{"billable_metric_code": "tx", "charge_model": model, "properties": properties}],
    }
    async with fake.client() as client:
        response = await client.post("/api/v1/plans", json={"plan": plan})
    assert response.status_code == 422
    assert response.json() == {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {"properties": codes},
    }
    assert_response_matches(response)


async def test_unknown_charge_model_is_refused() -> None:
    fake = FakeLago(clock_jobs="boundary", api_key="k")
    fake.add_billable_metric("tx")
    plan = {
        "code": "p",
        "name": "p",
        "interval": "monthly",
        "amount_cents": 0,
        "amount_currency": "USD",
        "charges": [{"billable_metric_code": "tx", "charge_model": "tiered_magic", "properties": {}}],
    }
    async with fake.client() as client:
        response = await client.post("/api/v1/plans", json={"plan": plan})
    assert response.status_code == 422
    assert response.json()["code"] == "validation_errors"
    assert response.json()["error_details"] == {"charge_model": ["value_is_invalid"]}


# Past usage ------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_billable_metric("api_call")
    fake.add_billable_metric("tx", aggregation_type="sum_agg", field_name="amount")
    fake.add_plan(
        "starter",
        amount_cents=1000,
        charges=[
            {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.01"}},
            {"billable_metric_code": "tx", "charge_model": "percentage", "properties": {"rate": "1"}},
        ],
    )
    fake.add_subscription("org", "starter", external_id="sub", subscription_at="2026-03-01T00:00:00Z")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    async with fake.client() as c:
        yield c


async def _three_periods(fake: FakeLago, clock: Clock) -> None:
    """March: 3 calls and 500 of tx; April: 5 calls; May: 1 call, then terminated on 10 May."""
    march = [_event(f"m{i}", None, NOW + timedelta(hours=i), code="api_call") for i in range(3)]
    march.append(_event("mt", 500, NOW, code="tx"))
    await _send(fake, march)
    clock.now = datetime(2026, 4, 10, tzinfo=UTC)
    await _send(fake, [_event(f"a{i}", None, clock.now, code="api_call") for i in range(5)])
    clock.now = datetime(2026, 5, 10, tzinfo=UTC)
    await _send(fake, [_event("y0", None, clock.now - timedelta(hours=1), code="api_call")])
    async with fake.client() as client:
        assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 200


async def test_the_end_of_a_period_issues_its_invoice(fake: FakeLago, clock: Clock) -> None:
    await _send(fake, [_event(f"m{i}", None, NOW, code="api_call") for i in range(3)])
    assert fake.invoices == []
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    fake.catch_up()
    [invoice] = fake.invoices
    assert (invoice["issuing_date"], invoice["fees_amount_cents"], invoice["invoice_type"]) == (
        "2026-04-01",
        1003,
        "subscription",
    )
    assert [w["webhook_type"] for w in fake.emitted_webhooks].count("invoice.created") == 1
    clock.now = datetime(2026, 4, 20, tzinfo=UTC)
    fake.catch_up()
    assert len(fake.invoices) == 1  # April is billed on 1 May


async def test_past_usage_lists_the_invoiced_periods(fake: FakeLago, clock: Clock, client: httpx.AsyncClient) -> None:
    await _three_periods(fake, clock)
    response = await client.get("/api/v1/customers/org/past_usage", params={"external_subscription_id": "sub"})
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    body = response.json()
    periods = body["usage_periods"]
    assert [(p["from_datetime"], p["to_datetime"]) for p in periods] == [
        ("2026-05-01T00:00:00Z", "2026-05-10T00:00:00Z"),
        ("2026-04-01T00:00:00Z", "2026-04-30T23:59:59Z"),
        ("2026-03-01T00:00:00Z", "2026-03-31T23:59:59Z"),
    ]
    assert [p["issuing_date"] for p in periods] == ["2026-05-10", "2026-05-01", "2026-04-01"]
    # amount_cents is the invoice's fees amount (the plan's fee too), the charges are the invoice's charge fees
    # (May, terminated on 10 May 00:00: 9 days of the plan's 1000 / 31, 290, ``terminated_amount``)
    assert [p["amount_cents"] for p in periods] == [291, 1005, 1503]
    assert [p["total_amount_cents"] for p in periods] == [291, 1005, 1503]
    invoice_ids = {i["lago_id"] for i in fake.invoices}
    assert {p["lago_invoice_id"] for p in periods} == invoice_ids
    march = periods[2]["charges_usage"]
    assert [(c["billable_metric"]["code"], c["units"], c["amount_cents"]) for c in march] == [
        ("api_call", "3.0", 3),
        ("tx", "500.0", 500),
    ]
    assert march[1]["charge"]["charge_model"] == "percentage"
    assert body["meta"] == {"current_page": 1, "next_page": None, "prev_page": None, "total_pages": 1, "total_count": 3}


async def test_past_usage_is_frozen_at_invoicing(fake: FakeLago, clock: Clock, client: httpx.AsyncClient) -> None:
    """An event sent late for an invoiced period changes neither the invoice nor its past usage."""
    await _send(fake, [_event("m0", None, NOW, code="api_call")])
    clock.now = datetime(2026, 4, 2, tzinfo=UTC)
    await _send(fake, [_event("late", None, NOW, code="api_call")])
    response = await client.get("/api/v1/customers/org/past_usage", params={"external_subscription_id": "sub"})
    [period] = response.json()["usage_periods"]
    assert period["charges_usage"][0]["units"] == "1.0"
    assert period["amount_cents"] == 1001


async def test_past_usage_filters_and_pages(fake: FakeLago, clock: Clock, client: httpx.AsyncClient) -> None:
    await _three_periods(fake, clock)
    url = "/api/v1/customers/org/past_usage"

    metric = await client.get(url, params={"external_subscription_id": "sub", "billable_metric_code": "tx"})
    assert metric.status_code == 200
    assert [[c["billable_metric"]["code"] for c in p["charges_usage"]] for p in metric.json()["usage_periods"]] == [
        ["tx"]
    ] * 3

    page = await client.get(url, params={"external_subscription_id": "sub", "per_page": 2, "page": 2})
    assert [p["issuing_date"] for p in page.json()["usage_periods"]] == ["2026-04-01"]
    assert page.json()["meta"] == {
        "current_page": 2,
        "next_page": None,
        "prev_page": 1,
        "total_pages": 2,
        "total_count": 3,
    }
    assert_response_matches(page)

    # PastUsageQuery: paginate, then limit(periods_count): periods_count is the page's size
    last = await client.get(url, params={"external_subscription_id": "sub", "periods_count": 2})
    assert [p["issuing_date"] for p in last.json()["usage_periods"]] == ["2026-05-10", "2026-05-01"]
    assert last.json()["meta"] == {
        "current_page": 1,
        "next_page": 2,
        "prev_page": None,
        "total_pages": 2,
        "total_count": 3,
    }


async def test_past_usage_errors_as_lago(fake: FakeLago, clock: Clock, client: httpx.AsyncClient) -> None:
    await _three_periods(fake, clock)
    url = "/api/v1/customers/org/past_usage"

    missing = await client.get(url)
    assert missing.status_code == 422
    assert missing.json() == {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {"external_subscription_id": ["value_is_mandatory"]},
    }
    assert_response_matches(missing)

    unknown_metric = await client.get(url, params={"external_subscription_id": "sub", "billable_metric_code": "nope"})
    assert unknown_metric.status_code == 404
    assert unknown_metric.json() == {"status": 404, "error": "Not Found", "code": "billable_metric_not_found"}

    empty_meta = {"current_page": 0, "next_page": None, "prev_page": None, "total_pages": 0, "total_count": 0}
    # PastUsageQuery joins the customer and the subscription: unknown ones give an empty list, not a 404
    for path, sub in ((url, "other"), ("/api/v1/customers/nobody/past_usage", "sub")):
        empty = await client.get(path, params={"external_subscription_id": sub})
        assert (empty.status_code, empty.json()) == (200, {"usage_periods": [], "meta": empty_meta})

    unauthorized = await client.get(
        url, params={"external_subscription_id": "sub"}, headers={"Authorization": "Bearer x"}
    )
    assert unauthorized.status_code == 401


async def test_past_usage_of_an_upgraded_subscription(fake: FakeLago, clock: Clock, client: httpx.AsyncClient) -> None:
    """An upgrade bills the replaced subscription at once; both subscriptions (same external id) are listed."""
    fake.add_plan(
        "pro", amount_cents=5000, charges=[{"billable_metric_code": "api_call", "properties": {"amount": "1"}}]
    )
    await _send(fake, [_event("m0", None, NOW, code="api_call")])
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    fake.add_subscription("org", "pro", external_id="sub")
    await _send(fake, [_event("m1", None, clock.now, code="api_call")])
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    response = await client.get("/api/v1/customers/org/past_usage", params={"external_subscription_id": "sub"})
    periods = response.json()["usage_periods"]
    # each plan billed for its days (Fees::SubscriptionService): the new one 20-31 March, 12 days of 5000 / 31, 1935
    # (upgraded_amount), + 100; the replaced one 1-20 March, 19 days of 1000 / 31, 613 (terminated_amount), + 1
    assert [(p["from_datetime"], p["to_datetime"], p["amount_cents"]) for p in periods] == [
        ("2026-03-20T00:00:00Z", "2026-03-31T23:59:59Z", 2035),
        ("2026-03-01T00:00:00Z", "2026-03-20T00:00:00Z", 614),
    ]
    assert_response_matches(response)


async def test_python_helper_and_served_path_with_a_dot(
    fake: FakeLago, clock: Clock, client: httpx.AsyncClient
) -> None:
    await _three_periods(fake, clock)
    body = fake.past_usage("org", "sub", periods_count=1)
    assert [p["issuing_date"] for p in body["usage_periods"]] == ["2026-05-10"]
    dotted = await client.get("/api/v1/customers/org.com/past_usage", params={"external_subscription_id": "sub"})
    assert dotted.status_code == 404
