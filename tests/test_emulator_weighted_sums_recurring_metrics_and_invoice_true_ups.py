"""Review of the emulator's billing arithmetic against lago-api's (FakeLago current usage and period invoices).

Covers what the emulator computed differently from Lago:

* ``weighted_sum_agg`` (``Events::Stores::Postgres::WeightedSumQuery``): the running total of the events' values
  weighted by how long it held over the charges period (the emulator summed the values, as ``sum_agg``);
  ``total_aggregated_units`` is the period's plain sum (``result.variation``);
* recurring metrics (``SumService`` / ``WeightedSumService`` with ``recurring``): the value carries over from the
  previous periods (the emulator started each period from 0);
* period-end invoices (``Invoices::CalculateFeesService#charges``): pay-in-advance charges (billed as the events
  come) and non-invoiceable charges are left out (the emulator billed them again at the period's end);
* ``min_amount_cents`` (``Fees::CreateTrueUpService``): an invoice bills at least the charge's minimum, prorated by
  the days billed (truncated to the cent) on a termination invoice; current usage stays uncorrected;
* what the emulator cannot compute is refused at plan creation with a 422 rather than billed as something else:
  ``prorated`` charges and charges on a ``custom_agg`` metric (its expression is not evaluated).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from _openapi import assert_response_matches
from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = timezone.utc
MARCH = datetime(2026, 3, 1, tzinfo=UTC)


def _fake(clock: Clock, charges: list[dict[str, Any]], *, amount_cents: int = 0, **metric: Any) -> FakeLago:
    """A subscription ``sub`` of customer ``org`` started at 2026-03-01 00:00 UTC on a monthly plan."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_billable_metric("m", **({"aggregation_type": "sum_agg", "field_name": "v"} | metric))
    fake.add_plan("p", amount_cents=amount_cents, charges=charges)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    return fake


async def _send(fake: FakeLago, *events: tuple[str, Any, datetime], code: str = "m") -> None:
    async with fake.client() as client:
        body = {
            "events": [
                {
                    "transaction_id": tid,
                    "external_subscription_id": "sub",
                    "code": code,
                    "timestamp": at.timestamp(),
                    "properties": {"v": value},
                }
                for tid, value, at in events
            ]
        }
        response = await client.post("/api/v1/events/batch", json=body)
        assert response.status_code == 200, response.text


async def _current_usage(fake: FakeLago) -> dict[str, Any]:
    async with fake.client() as client:
        response = await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    usage: dict[str, Any] = response.json()["customer_usage"]
    return usage


STANDARD = {"billable_metric_code": "m", "charge_model": "standard", "properties": {"amount": "1"}}


async def test_weighted_sum_weighs_the_running_total_by_time() -> None:
    """March (31 days = 2,678,400 s, to 23:59:59.999999): +10 on the 11th, -4 on the 21st. The running total is 0
    for 10 days, 10 for 10 days, 6 for 11 days less 1 microsecond. Each product is divided by 2678400 as PostgreSQL
    divides numerics (16 significant digits): 8640000.000000 / 2678400 = 3.2258064516129032, 5702399.999994 /
    2678400 = 2.1290322580622760; summed, 5.3548387096751792 units (``ceil(20)`` changes nothing); at 1.00 a unit,
    535 cents (the emulator summed the values: 6 units, 600 cents). ``total_aggregated_units`` is the plain sum, 6.
    The March invoice issued on 1 April bills the same 535 cents."""
    clock = Clock(MARCH)
    fake = _fake(clock, [STANDARD], aggregation_type="weighted_sum_agg")
    clock.now = datetime(2026, 3, 25, tzinfo=UTC)
    await _send(fake, ("a", 10, datetime(2026, 3, 11, tzinfo=UTC)), ("b", -4, datetime(2026, 3, 21, tzinfo=UTC)))
    usage = (await _current_usage(fake))["charges_usage"][0]
    assert usage["units"] == "5.3548387096751792"
    assert usage["total_aggregated_units"] == "6.0"
    assert usage["amount_cents"] == 535
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    (invoice,) = fake.invoices
    assert invoice["fees_amount_cents"] == 535


async def test_recurring_sum_carries_over_to_the_next_period() -> None:
    """A recurring ``sum_agg`` (seats): +5 in March, +2 in April. April's usage is 7 seats (the March ones still
    count), at 10.00 a seat 7000 cents (the emulator counted April's 2: 2000)."""
    clock = Clock(MARCH)
    fake = _fake(clock, [{**STANDARD, "properties": {"amount": "10"}}], recurring=True)
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    await _send(fake, ("a", 5, datetime(2026, 3, 10, tzinfo=UTC)))
    clock.now = datetime(2026, 4, 20, tzinfo=UTC)
    await _send(fake, ("b", 2, datetime(2026, 4, 10, tzinfo=UTC)))
    usage = (await _current_usage(fake))["charges_usage"][0]
    assert (usage["units"], usage["amount_cents"]) == ("7.0", 7000)


async def test_recurring_weighted_sum_starts_from_the_previous_total() -> None:
    """A recurring ``weighted_sum_agg``: +6 on 1 March 00:00. In April (30 days) without events the total 6 holds
    for the whole period less 1 microsecond: 6 x 2591999.999999 / 2592000, to 16 significant digits as PostgreSQL
    divides: 5.9999999999976852 units, 600 cents at 1.00 (the emulator: 0 units)."""
    clock = Clock(MARCH)
    fake = _fake(clock, [STANDARD], aggregation_type="weighted_sum_agg", recurring=True)
    clock.now = datetime(2026, 3, 2, tzinfo=UTC)
    await _send(fake, ("a", 6, MARCH))
    clock.now = datetime(2026, 4, 15, tzinfo=UTC)
    usage = (await _current_usage(fake))["charges_usage"][0]
    assert (usage["units"], usage["amount_cents"]) == ("5.9999999999976852", 600)


async def test_period_invoice_leaves_out_pay_in_advance_and_non_invoiceable_charges() -> None:
    """Three events, three charges at 1.00 an event (count): one in arrears, one paid in advance, one not
    invoiceable. Lago's period-end invoice bills the arrears charge only, 300 cents, plus the 1000-cent plan fee:
    1300 (the emulator billed all three: 1900)."""
    clock = Clock(MARCH)
    count = {"charge_model": "standard", "billable_metric_code": "m", "properties": {"amount": "1"}}
    fake = _fake(
        clock,
        [count, {**count, "pay_in_advance": True}, {**count, "invoiceable": False}],
        amount_cents=1000,
        aggregation_type="count_agg",
        field_name=None,
    )
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    await _send(fake, *((f"t{i}", 1, datetime(2026, 3, 10 + i, tzinfo=UTC)) for i in range(3)))
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    (invoice,) = fake.invoices
    assert invoice["fees_amount_cents"] == 1300
    (period,) = fake.past_usage("org", "sub")["usage_periods"]
    assert [c["amount_cents"] for c in period["charges_usage"]] == [300]


async def test_min_amount_cents_trues_up_the_invoice_not_the_current_usage() -> None:
    """A charge with ``min_amount_cents`` 1000 and 300 cents of usage (3 units at 1.00): current usage says 300,
    the March invoice bills 1000 (a 700-cent true-up fee; the emulator billed 300)."""
    clock = Clock(MARCH)
    fake = _fake(clock, [{**STANDARD, "min_amount_cents": 1000}])
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    await _send(fake, ("a", 3, datetime(2026, 3, 10, tzinfo=UTC)))
    assert (await _current_usage(fake))["amount_cents"] == 300
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    (invoice,) = fake.invoices
    assert invoice["fees_amount_cents"] == 1000


async def test_min_amount_cents_is_prorated_on_a_termination_invoice() -> None:
    """Terminated on 16 March 12:00: the charges period ran 15.5 days, ceiled to 16; the minimum is 1000 / 31 a day,
    x 16 = 516.129..., so the true-up is 516.129 - 300 = 216.129, truncated to 216 cents: 516 in all (the emulator:
    300)."""
    clock = Clock(MARCH)
    fake = _fake(clock, [{**STANDARD, "min_amount_cents": 1000}])
    clock.now = datetime(2026, 3, 16, 12, tzinfo=UTC)
    await _send(fake, ("a", 3, datetime(2026, 3, 10, tzinfo=UTC)))
    async with fake.client() as client:
        response = await client.delete("/api/v1/subscriptions/sub")
        assert response.status_code == 200, response.text
    (invoice,) = fake.invoices
    assert invoice["fees_amount_cents"] == 516


@pytest.mark.parametrize(
    ("metric", "charge", "field"),
    [
        ({"recurring": True}, {"prorated": True}, "prorated"),
        ({"aggregation_type": "custom_agg", "expression": "event.properties.v * 2"}, {}, "billable_metric"),
    ],
)
async def test_what_the_emulator_cannot_compute_is_refused_at_plan_creation(
    metric: dict[str, Any], charge: dict[str, Any], field: str
) -> None:
    """A prorated charge (the emulator does not prorate) and a charge on a ``custom_agg`` metric (its expression is
    not evaluated) are refused with ``422 validation_errors`` naming the field, instead of billed unprorated or as a
    plain sum."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=Clock(MARCH))
    fake.add_billable_metric("m", **({"aggregation_type": "sum_agg", "field_name": "v"} | metric))
    async with fake.client() as client:
        response = await client.post(
            "/api/v1/plans",
            json={
                "plan": {
                    "code": "p",
                    "name": "p",
                    "interval": "monthly",
                    "amount_cents": 0,
                    "amount_currency": "USD",
                    "charges": [{**STANDARD, **charge}],
                }
            },
        )
    assert response.status_code == 422, response.text
    assert_response_matches(response)
    body = response.json()
    assert body["code"] == "validation_errors"
    assert field in body["error_details"]
    assert fake.store.plans == {}
