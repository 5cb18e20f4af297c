"""Review of the emulator's billing arithmetic, second round (FakeLago plan fees, charge properties, invoice fees).

Covers what the emulator billed differently from lago-api:

* a plan's ``trial_period`` (``Fees::SubscriptionService#first_subscription_amount``): the plan fee is billed from
  the trial's end, prorated for the first period (``days_to_bill * amount / period days``, rounded), and the
  subscription's ``trial_ended_at`` is set once the trial is over (the emulator billed the whole fee, and
  ``trial_ended_at`` stayed null);
* a pay-in-advance plan (``Subscriptions::CreateService``: ``BillSubscriptionJob`` on the start): its first
  period's fee is invoiced when the subscription starts, prorated for a calendar subscription started mid-period
  (the emulator issued nothing until the period's end);
* charge properties Lago's validators refuse (``Charges::Validators::PackageService``: ``package_size`` and
  ``free_units`` must be Integers; ``Validators::RangeBoundsValidator``: range bounds Lago cannot bill) are a
  ``422 validation_errors`` on ``properties`` at plan creation (the emulator accepted them and answered the usage
  with a 500, ``int("10.0")``);
* an invoice's ``fees`` (``V1::FeeSerializer``): the subscription fee, each charge's fee, and a true-up fee, their
  amounts summing to ``fees_amount_cents`` (the list was empty).
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


def _fake(clock: Clock, start: datetime, *, charges: list[dict[str, Any]] | None = None, **plan: Any) -> FakeLago:
    """A subscription ``sub`` of customer ``org`` started at ``start`` on a monthly calendar plan ``p``."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_billable_metric("m", aggregation_type="sum_agg", field_name="v")
    fake.add_plan("p", **({"amount_cents": 3100, "charges": charges or []} | plan))
    fake.add_subscription("org", "p", external_id="sub", subscription_at=start.isoformat())
    return fake


async def _get(fake: FakeLago, path: str) -> dict[str, Any]:
    async with fake.client() as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    body: dict[str, Any] = response.json()
    return body


async def test_trial_period_bills_the_plan_fee_from_the_trial_end() -> None:
    """3100 cents a month (100 a day in March), a 10-day trial from 1 March 00:00: it ends 11 March 00:00. The
    March invoice bills ``(31 Mar 23:59:59 + 1 day - 11 Mar 00:00)`` floored to days, 21 days x 100 = 2100 cents
    (the emulator: 3100); April's bills the full 3100. ``trial_ended_at`` is null on 10 March, then
    ``2026-03-11T00:00:00Z``."""
    clock = Clock(MARCH)
    fake = _fake(clock, MARCH, trial_period=10)
    clock.now = datetime(2026, 3, 10, tzinfo=UTC)
    assert (await _get(fake, "/api/v1/subscriptions/sub"))["subscription"]["trial_ended_at"] is None
    clock.now = datetime(2026, 3, 12, tzinfo=UTC)
    sub = (await _get(fake, "/api/v1/subscriptions/sub"))["subscription"]
    assert sub["trial_ended_at"] == "2026-03-11T00:00:00Z"
    clock.now = datetime(2026, 5, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in fake.invoices] == [2100, 3100]


async def test_trial_covering_the_whole_period_bills_no_plan_fee() -> None:
    """A 40-day trial from 1 March covers March: the March invoice bills no plan fee (0, the emulator 3100); it
    ends 10 April 00:00, so April (30 days, 3100 / 30 a day) bills 21 days: 2170 cents."""
    clock = Clock(MARCH)
    fake = _fake(clock, MARCH, trial_period=40)
    clock.now = datetime(2026, 5, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in fake.invoices] == [0, 2170]


async def test_pay_in_advance_plan_invoices_its_first_period_at_the_start() -> None:
    """A pay-in-advance plan at 3100 a month, subscribed on 10 March (calendar): the invoice issued at the start
    bills 10-31 March, 22 days x 100 = 2200 cents (the emulator issued none). On 1 April, April's fee in advance:
    3100."""
    start = datetime(2026, 3, 10, tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start, pay_in_advance=True)
    (invoice,) = fake.invoices
    assert invoice["fees_amount_cents"] == 2200
    assert invoice["issuing_date"] == "2026-03-10"
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in fake.invoices] == [2200, 3100]


async def test_pay_in_advance_plan_with_a_trial_bills_from_the_trial_end() -> None:
    """Pay in advance, a 5-day trial from 10 March: nothing is billed until the trial ends (as Lago's
    FreeTrialBillingService), then the rest of March from 15 March, 17 days x 100 = 1700."""
    start = datetime(2026, 3, 10, tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start, pay_in_advance=True, trial_period=5)
    assert fake.invoices == []
    clock.now = datetime(2026, 3, 15, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in fake.invoices] == [1700]


async def test_anniversary_pay_in_advance_plan_bills_a_full_first_period() -> None:
    """On an anniversary subscription the first period is a whole one: the start invoice bills the full 3100."""
    start = datetime(2026, 3, 10, tzinfo=UTC)
    clock = Clock(start)
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_plan("p", amount_cents=3100, pay_in_advance=True)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=start.isoformat(), billing_time="anniversary")
    assert [i["fees_amount_cents"] for i in fake.invoices] == [3100]


@pytest.mark.parametrize(
    ("model", "properties", "code"),
    [
        ("package", {"amount": "1", "package_size": "10.0", "free_units": 0}, "invalid_package_size"),
        ("package", {"amount": "1", "package_size": 10.0, "free_units": 0}, "invalid_package_size"),
        ("package", {"amount": "1", "package_size": 0, "free_units": 0}, "invalid_package_size"),
        ("package", {"amount": "1", "package_size": 10, "free_units": "1.5"}, "invalid_free_units"),
        ("package", {"amount": "x", "package_size": 10, "free_units": 0}, "invalid_amount"),
        (
            "graduated",
            {
                "graduated_ranges": [
                    {"from_value": 0, "to_value": "10.0", "per_unit_amount": "1", "flat_amount": "0"},
                    {"from_value": 11, "to_value": None, "per_unit_amount": "1", "flat_amount": "0"},
                ]
            },
            "invalid_graduated_ranges",
        ),
        (
            "volume",
            {
                "volume_ranges": [
                    {"from_value": "0", "to_value": 10, "per_unit_amount": "1", "flat_amount": "0"},
                    {"from_value": 11, "to_value": None, "per_unit_amount": "1", "flat_amount": "0"},
                ]
            },
            "invalid_volume_ranges",
        ),
        ("graduated", {"graduated_ranges": []}, "missing_graduated_ranges"),
    ],
)
async def test_charge_properties_lago_refuses_are_a_422(model: str, properties: dict[str, Any], code: str) -> None:
    """Lago's validators want Integer ``package_size`` (> 0) and ``free_units`` (>= 0), a decimal ``amount`` and
    numeric range bounds: anything else is ``422 validation_errors`` with ``{"properties": [code]}`` (the emulator
    created the plan and its usage raised, ``int("10.0")``, a 500)."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=Clock(MARCH))
    fake.add_billable_metric("m", aggregation_type="sum_agg", field_name="v")
    charge = {"billable_metric_code": "m", "charge_model": model, "properties": properties}
    plan = {"code": "p", "name": "p", "interval": "monthly", "amount_cents": 0, "charges": [charge]}
    async with fake.client() as client:
        response = await client.post("/api/v1/plans", json={"plan": plan})
    assert response.status_code == 422, response.text
    assert_response_matches(response)
    body = response.json()
    assert body["code"] == "validation_errors"
    assert code in body["error_details"]["properties"]
    assert fake.store.plans == {}


async def test_float_range_bounds_are_billed_as_lago_bills_them() -> None:
    """JSON numbers ``10.0`` as graduated bounds are valid (``BigDecimal("10.0") == 10``): 15 units, the first 10 at
    1.00 and 5 at 2.00, 2000 cents."""
    clock = Clock(MARCH)
    ranges = [
        {"from_value": 0.0, "to_value": 10.0, "per_unit_amount": "1", "flat_amount": "0"},
        {"from_value": 11.0, "to_value": None, "per_unit_amount": "2", "flat_amount": "0"},
    ]
    charge = {"billable_metric_code": "m", "charge_model": "graduated", "properties": {"graduated_ranges": ranges}}
    fake = _fake(clock, MARCH, charges=[charge], amount_cents=0)
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    async with fake.client() as client:
        event = {"transaction_id": "a", "external_subscription_id": "sub", "code": "m", "properties": {"v": 15}}
        assert (await client.post("/api/v1/events", json={"event": event})).status_code == 200
    usage = await _get(fake, "/api/v1/customers/org/current_usage?external_subscription_id=sub")
    assert usage["customer_usage"]["amount_cents"] == 2000


async def test_invoice_lists_its_fees_summing_to_its_total() -> None:
    """March: a 1000-cent plan fee, 3 units at 1.00 (300 cents) under a 1000-cent minimum (a 700-cent true-up).
    The invoice (``GET /invoices/{id}``, valid against the spec) lists a ``subscription`` fee of 1000 with
    ``amount_details.plan_amount_cents``, a ``charge`` fee of 300 for ``units`` "3.0", and a true-up fee of 700
    whose ``lago_true_up_parent_fee_id`` is the charge fee; they sum to ``fees_amount_cents`` 2000 (the emulator:
    no fees)."""
    clock = Clock(MARCH)
    fake = _fake(clock, MARCH, charges=[{**STANDARD, "min_amount_cents": 1000}], amount_cents=1000)
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    async with fake.client() as client:
        event = {"transaction_id": "a", "external_subscription_id": "sub", "code": "m", "properties": {"v": 3}}
        assert (await client.post("/api/v1/events", json={"event": event})).status_code == 200
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    (listed,) = fake.invoices
    invoice = (await _get(fake, f"/api/v1/invoices/{listed['lago_id']}"))["invoice"]
    fees = invoice["fees"]
    assert [(f["item"]["type"], f["amount_cents"]) for f in fees] == [
        ("subscription", 1000),
        ("charge", 300),
        ("charge", 700),
    ]
    subscription_fee, charge_fee, true_up = fees
    assert subscription_fee["amount_details"] == {"plan_amount_cents": 1000}
    assert subscription_fee["item"]["item_type"] == "Subscription"
    assert charge_fee["units"] == "3.0"
    assert charge_fee["item"]["item_type"] == "BillableMetric"
    assert charge_fee["item"]["code"] == "m"
    assert charge_fee["lago_true_up_fee_id"] == true_up["lago_id"]
    assert true_up["lago_true_up_parent_fee_id"] == charge_fee["lago_id"]
    assert all(f["lago_invoice_id"] == invoice["lago_id"] for f in fees)
    assert sum(f["amount_cents"] for f in fees) == invoice["fees_amount_cents"] == 2000


async def test_package_fee_details_what_it_billed() -> None:
    """Package of 10 units at 5.00 with 5 free units, 27 units: 22 paid, 3 packages, 1500 cents; the fee's
    ``amount_details`` say so (``ChargeModels::PackageService#amount_details``)."""
    clock = Clock(MARCH)
    props = {"amount": "5", "package_size": 10, "free_units": 5}
    charge = {"billable_metric_code": "m", "charge_model": "package", "properties": props}
    fake = _fake(clock, MARCH, charges=[charge], amount_cents=0)
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    async with fake.client() as client:
        event = {"transaction_id": "a", "external_subscription_id": "sub", "code": "m", "properties": {"v": 27}}
        assert (await client.post("/api/v1/events", json={"event": event})).status_code == 200
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    (listed,) = fake.invoices
    invoice = (await _get(fake, f"/api/v1/invoices/{listed['lago_id']}"))["invoice"]
    (fee,) = [f for f in invoice["fees"] if f["item"]["type"] == "charge"]
    assert fee["amount_cents"] == 1500
    assert fee["amount_details"] == {
        "free_units": "5.0",
        "paid_units": "22.0",
        "per_package_size": 10,
        "per_package_unit_amount": "5.0",
    }
