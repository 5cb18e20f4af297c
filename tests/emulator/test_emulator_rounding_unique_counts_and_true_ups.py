"""The emulator's usage and invoice arithmetic against lago-api (getlago/lago-api).

Each test states what Lago computes, citing the lago-api file the rule is read from (where the emulator computed
something else, a user's test passing on the emulator then failed against Lago):

* a billable metric's ``rounding_function`` / ``rounding_precision``
  (``BillableMetrics::Aggregations::BaseService#apply_rounding`` and ``ApplyRoundingService``): the aggregated units
  of each bucket are rounded (``ceil`` / ``floor`` / ``round``, at ``rounding_precision`` digits, default 0) before
  the charge model prices them. The emulator stored both fields and ignored them;
* a ``unique_count_agg`` charge's ``events_count`` (``UniqueCountService#compute_aggregation``:
  ``result.count = result.aggregation``; ``ChargeModels::BaseService#apply``: ``result.count =
  aggregation_result.count``; ``Fees::ChargeService#init_fee``: ``events_count: amount_result.count``) is the number
  of unique values, and so is the event count a percentage charge's ``fixed_amount`` is paid for
  (``PercentageService#compute_fixed_amount``). The emulator counted the events;
* the true-up fee of a charge under its ``min_amount_cents`` (``Fees::CreateTrueUpService#call``:
  ``amount_cents = (prorated_min_amount_cents - used_amount_cents).round``) is rounded half up to the cent. The
  emulator truncated it.
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
STANDARD = {"billable_metric_code": "m", "charge_model": "standard", "properties": {"amount": "1"}}


def _fake(clock: Clock, charges: list[dict[str, Any]], **metric: Any) -> FakeLago:
    """A subscription ``sub`` of customer ``org`` started at 2026-03-01 00:00 UTC on a monthly plan (no plan fee)
    charging metric ``m`` (default: ``sum_agg`` of ``v``)."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_billable_metric("m", **({"aggregation_type": "sum_agg", "field_name": "v"} | metric))
    fake.add_plan("p", amount_cents=0, charges=charges)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    return fake


async def _send(fake: FakeLago, *events: tuple[str, dict[str, Any], datetime]) -> None:
    async with fake.client() as client:
        body = {
            "events": [
                {
                    "transaction_id": tid,
                    "external_subscription_id": "sub",
                    "code": "m",
                    "timestamp": at.timestamp(),
                    "properties": properties,
                }
                for tid, properties, at in events
            ]
        }
        response = await client.post("/api/v1/events/batch", json=body)
        assert response.status_code == 200, response.text


async def _charge_usage(fake: FakeLago) -> dict[str, Any]:
    async with fake.client() as client:
        response = await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    (usage,) = response.json()["customer_usage"]["charges_usage"]
    return dict(usage)


# Billable metric rounding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounding", "values", "units", "amount_cents"),
    [
        # 0.75 + 0.75 = 1.5 GB: ceil bills 2 units, floor 1, round 2 (half away from zero)
        ({"rounding_function": "ceil"}, ["0.75", "0.75"], "2.0", 200),
        ({"rounding_function": "floor"}, ["0.75", "0.75"], "1.0", 100),
        ({"rounding_function": "round"}, ["0.75", "0.75"], "2.0", 200),
        # rounding_precision: 1.231 + 1.001 = 2.232, ceil at 2 digits = 2.24 (224 cents at 1.00 a unit, not 223)
        ({"rounding_function": "ceil", "rounding_precision": 2}, ["1.231", "1.001"], "2.24", 224),
    ],
)
async def test_metric_rounding_function_rounds_the_aggregated_units_before_pricing(
    rounding: dict[str, Any], values: list[str], units: str, amount_cents: int
) -> None:
    """A ``sum_agg`` metric with ``rounding_function`` (Lago's "round usage" option: ``ceil`` to bill whole GB,
    ``floor``, ``round``, at ``rounding_precision`` digits): lago-api ``BillableMetrics::Aggregations::BaseService
    #aggregate`` calls ``apply_rounding(result)`` on every aggregation, so current usage and the invoice price the
    rounded units. The emulator keeps the fields (``GET /billable_metrics`` shows them) but prices the raw sum:
    1.5 units and 150 cents where Lago says 2.0 and 200 (ceil)."""
    clock = Clock(MARCH)
    fake = _fake(clock, [STANDARD], **rounding)
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    await _send(fake, *((f"t{i}", {"v": v}, datetime(2026, 3, 10 + i, tzinfo=UTC)) for i, v in enumerate(values)))
    usage = await _charge_usage(fake)
    assert (usage["units"], usage["amount_cents"]) == (units, amount_cents)
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    (invoice,) = fake.invoices
    assert invoice["fees_amount_cents"] == amount_cents


# unique_count_agg ------------------------------------------------------------------------------------------------

#: Seats alice, alice, bob: three events, two unique values.
SEATS = (
    ("a1", {"seat": "alice"}, datetime(2026, 3, 10, tzinfo=UTC)),
    ("a2", {"seat": "alice"}, datetime(2026, 3, 11, tzinfo=UTC)),
    ("b1", {"seat": "bob"}, datetime(2026, 3, 12, tzinfo=UTC)),
)


async def test_unique_count_events_count_is_the_number_of_unique_values() -> None:
    """Seats: alice, alice, bob (three events, two unique values). lago-api ``UniqueCountService`` sets
    ``result.count = result.aggregation``, which ``ChargeModels::BaseService#apply`` passes on as the fee's
    ``events_count``: current usage says ``units`` 2.0 and ``events_count`` 2 (the emulator counted 3)."""
    clock = Clock(MARCH)
    fake = _fake(clock, [STANDARD], aggregation_type="unique_count_agg", field_name="seat")
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    await _send(fake, *SEATS)
    usage = await _charge_usage(fake)
    assert (usage["units"], usage["events_count"], usage["amount_cents"]) == ("2.0", 2, 200)


async def test_unique_count_percentage_fixed_amount_is_paid_per_unique_value() -> None:
    """A percentage charge (rate 0, ``fixed_amount`` 1.00) on the same unique count: lago-api
    ``PercentageService#compute_fixed_amount`` bills ``(aggregation_result.count - free_units_count) * fixed_amount``,
    the count being the unique count: 2 x 1.00 = 200 cents (the emulator billed one fixed amount per event: 300)."""
    clock = Clock(MARCH)
    percentage = {
        "billable_metric_code": "m",
        "charge_model": "percentage",
        "properties": {"rate": "0", "fixed_amount": "1"},
    }
    fake = _fake(clock, [percentage], aggregation_type="unique_count_agg", field_name="seat")
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    await _send(fake, *SEATS)
    usage = await _charge_usage(fake)
    assert usage["amount_cents"] == 200


async def test_min_amount_true_up_on_termination_is_rounded_to_the_cent_not_truncated() -> None:
    """``min_amount_cents`` 1000 on a 31-day March, 300 cents used (3 units at 1.00), terminated on 11 March 12:00:
    10.5 days ceiled to 11, the prorated minimum ``1000.fdiv(31) * 11`` = 354.838...; lago-api
    ``Fees::CreateTrueUpService#call`` bills ``(prorated_min_amount_cents - used_amount_cents).round`` = 54.838...
    rounded = 55 cents: the termination invoice is 355 (the emulator truncates: 54, 354)."""
    clock = Clock(MARCH)
    fake = _fake(clock, [{**STANDARD, "min_amount_cents": 1000}])
    clock.now = datetime(2026, 3, 11, 12, tzinfo=UTC)
    await _send(fake, ("a", {"v": 3}, datetime(2026, 3, 5, tzinfo=UTC)))
    async with fake.client() as client:
        response = await client.delete("/api/v1/subscriptions/sub")
        assert response.status_code == 200, response.text
        (listed,) = fake.invoices
        response = await client.get(f"/api/v1/invoices/{listed['lago_id']}")
        assert response.status_code == 200, response.text
    invoice = response.json()["invoice"]
    true_up = [f for f in invoice["fees"] if f["lago_true_up_parent_fee_id"] is not None]
    assert [f["amount_cents"] for f in true_up] == [55]
    assert invoice["fees_amount_cents"] == 355
