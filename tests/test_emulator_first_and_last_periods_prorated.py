"""Review of the emulator's plan fee for a partial period (FakeLago, lago-api ``Fees::SubscriptionService``).

Covers what the emulator billed differently from lago-api for a plan paid in arrears:

* the first period of a calendar subscription started mid-period (``first_subscription_amount``): the days from the
  local start of the day it started (``DatesService#from_datetime``, ``started_at.beginning_of_day`` in the customer's
  time zone) to the period's end, ``(to + 1 day - from) / 1 day`` floored, times ``amount / period days``, rounded
  (the emulator billed the full fee); weekly, monthly, quarterly and yearly periods; the subscription fee's
  ``from_date`` is that day's start;
* a subscription upgraded mid-period: the new plan's first period bills the days from the upgrade
  (``upgraded_amount``), the replaced one the days up to the upgrade (``terminated_amount``);
* a termination mid-period (``terminated_amount``): ``(terminated_at - from) / 1 day`` ceiled days (the emulator
  billed the full fee), the fee's ``to_date`` being ``terminated_at``;
* what stays whole: anniversary periods, periods after the first, a subscription started on the period's first day,
  one backdated before the period it is first billed for (``started_in_past?``), a downgrade's new plan (it starts on
  the period's first day).

Amounts are worked out by hand in each docstring; invoices are read through ``GET /invoices`` and validated against
Lago's OpenAPI spec.
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


def _fake(clock: Clock, start: datetime, *, amount: int = 3100, customer: dict[str, Any] | None = None,
          sub: dict[str, Any] | None = None, **plan: Any) -> FakeLago:  # fmt: skip
    """A subscription ``sub`` of customer ``org`` from ``start`` on plan ``p`` (monthly, in arrears by default)."""
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_plan("p", **({"amount_cents": amount} | plan))
    if customer:
        fake.add_customer("org", **customer)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=start.isoformat(), **(sub or {}))
    return fake


async def _invoices(fake: FakeLago) -> list[dict[str, Any]]:
    """The customer's invoices, oldest first, as ``GET /invoices`` answers (validated against the spec), each with its
    fees (``GET /invoices/{id}``)."""
    async with fake.client() as client:
        response = await client.get("/api/v1/invoices", params={"external_customer_id": "org"})
        assert response.status_code == 200, response.text
        assert_response_matches(response)
        listed = response.json()["invoices"]
        invoices = []
        for item in listed:
            one = await client.get(f"/api/v1/invoices/{item['lago_id']}")
            assert one.status_code == 200, one.text
            assert_response_matches(one)
            invoices.append(one.json()["invoice"])
    return sorted(invoices, key=lambda i: i["created_at"])


def _plan_fees(invoices: list[dict[str, Any]]) -> list[int]:
    return [f["amount_cents"] for i in invoices for f in i["fees"] if f["item"]["type"] == "subscription"]


async def test_calendar_month_started_mid_period_bills_its_days() -> None:
    """3100 a month (100 a day in March), started 10 March 00:00 UTC, in arrears: the 1 April invoice bills 10-31
    March, ``(31 Mar 23:59:59 + 1 day - 10 Mar 00:00)`` floored = 22 days x 100 = 2200 (the emulator: 3100), its
    subscription fee running from 10 March; the 1 May invoice the whole of April, 3100."""
    start = datetime(2026, 3, 10, tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start)
    clock.now = datetime(2026, 5, 1, 0, 0, 1, tzinfo=UTC)
    invoices = await _invoices(fake)
    assert [i["fees_amount_cents"] for i in invoices] == [2200, 3100]
    first_fee = next(f for f in invoices[0]["fees"] if f["item"]["type"] == "subscription")
    assert (first_fee["from_date"], first_fee["to_date"]) == ("2026-03-10T00:00:00Z", "2026-03-31T23:59:59Z")


async def test_the_day_it_started_counts_whole_in_the_customers_time_zone() -> None:
    """Started 10 March 02:00Z, which is 9 March 22:00 (EDT since 8 March) for a customer in America/New_York: Lago
    counts from the local start of 9 March (04:00Z), so 9-31 March, 23 days x 100 = 2300 (the emulator: 3100)."""
    start = datetime(2026, 3, 10, 2, tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start, customer={"timezone": "America/New_York"})
    clock.now = datetime(2026, 4, 2, tzinfo=UTC)
    invoices = await _invoices(fake)
    assert [i["fees_amount_cents"] for i in invoices] == [2300]
    assert invoices[0]["fees"][0]["from_date"] == "2026-03-09T04:00:00Z"


async def test_started_late_in_its_first_day_still_counts_that_day() -> None:
    """Started 10 March 23:30 UTC: still 22 days (10-31 March), 2200, not 21."""
    start = datetime(2026, 3, 10, 23, 30, tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start)
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [2200]


@pytest.mark.parametrize(
    ("interval", "amount", "start", "first_close", "second_close", "expected"),
    [
        # a week runs Monday to Sunday: Wednesday 11 March 2026 to Sunday 15 March is 5 days of 7, 700 x 5 / 7 = 500
        ("weekly", 700, datetime(2026, 3, 11), datetime(2026, 3, 16), datetime(2026, 3, 23), [500, 700]),
        # Q1 2026 is 31 + 28 + 31 = 90 days; 15 February to 31 March is 14 + 31 = 45 days, 9000 x 45 / 90 = 4500
        ("quarterly", 9000, datetime(2026, 2, 15), datetime(2026, 4, 1), datetime(2026, 7, 1), [4500, 9000]),
        # 2026 has 365 days; 15 March to 31 December is 365 - (31 + 28 + 14) = 292 days, 36500 x 292 / 365 = 29200
        ("yearly", 36500, datetime(2026, 3, 15), datetime(2027, 1, 1), datetime(2028, 1, 1), [29200, 36500]),
    ],
)
async def test_every_calendar_interval_prorates_its_first_period(
    interval: str,
    amount: int,
    start: datetime,
    first_close: datetime,
    second_close: datetime,
    expected: list[int],
) -> None:
    """The first period of a weekly, quarterly or yearly calendar plan started mid-period bills its days (the
    emulator: the full fee); the next one is whole."""
    start = start.replace(tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start, amount=amount, interval=interval)
    clock.now = first_close.replace(second=1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == expected[:1]
    clock.now = second_close.replace(second=1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == expected


async def test_anniversary_periods_are_whole() -> None:
    """Anniversary billing, started 10 March 14:00: the periods run 10 March - 9 April and 10 April - 9 May, both
    billed whole, 3100 each."""
    start = datetime(2026, 3, 10, 14, tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start, sub={"billing_time": "anniversary"})
    clock.now = datetime(2026, 5, 10, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [3100, 3100]


async def test_a_subscription_started_on_the_periods_first_day_bills_the_full_fee() -> None:
    """Started 1 March 09:30: the whole of March is billed, 3100."""
    start = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    clock = Clock(start)
    fake = _fake(clock, start)
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [3100]


async def test_backdated_within_the_period_prorates_before_it_bills_whole() -> None:
    """Created 20 March with ``subscription_at`` 10 March: it started in the past, but within March, so Lago's
    ``first_subscription_amount`` bills 10-31 March, 2200. Created 5 April with ``subscription_at`` 10 March: its first
    invoice (April's, the period it was created in) is whole, 3100 (``started_at < previous_beginning_of_period``)."""
    clock = Clock(datetime(2026, 3, 20, tzinfo=UTC))
    fake = _fake(clock, datetime(2026, 3, 10, tzinfo=UTC))
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [2200]

    clock = Clock(datetime(2026, 4, 5, tzinfo=UTC))
    fake = _fake(clock, datetime(2026, 3, 10, tzinfo=UTC))
    clock.now = datetime(2026, 5, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [3100]


async def test_termination_mid_period_bills_the_days_used() -> None:
    """Started 1 March, terminated 20 March 12:00: ``(terminated_at - 1 Mar 00:00) / 1 day`` = 19.5, ceiled to 20
    days x 100 = 2000 (the emulator: 3100); the fee runs to ``terminated_at``."""
    clock = Clock(datetime(2026, 3, 1, tzinfo=UTC))
    fake = _fake(clock, datetime(2026, 3, 1, tzinfo=UTC))
    clock.now = datetime(2026, 3, 20, 12, tzinfo=UTC)
    async with fake.client() as client:
        assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 200
    invoices = await _invoices(fake)
    assert [i["fees_amount_cents"] for i in invoices] == [2000]
    fee = invoices[0]["fees"][0]
    assert (fee["from_date"], fee["to_date"]) == ("2026-03-01T00:00:00Z", "2026-03-20T12:00:00Z")


async def test_termination_in_the_first_period_counts_from_the_start() -> None:
    """Started 10 March 15:00, terminated 20 March 12:00: from the start of 10 March, 10.5 days ceiled to 11 x 100 =
    1100 (the emulator: 3100)."""
    clock = Clock(datetime(2026, 3, 10, 15, tzinfo=UTC))
    fake = _fake(clock, datetime(2026, 3, 10, 15, tzinfo=UTC))
    clock.now = datetime(2026, 3, 20, 12, tzinfo=UTC)
    async with fake.client() as client:
        assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 200
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [1100]


async def test_ending_at_on_the_periods_end_bills_no_extra_period() -> None:
    """Started 1 March with ``ending_at`` 1 April 00:00: March is billed whole (3100) and the termination at 1 April
    00:00 bills no day of April (the emulator billed April's 3100 too)."""
    clock = Clock(datetime(2026, 3, 1, tzinfo=UTC))
    fake = _fake(clock, datetime(2026, 3, 1, tzinfo=UTC), sub={"ending_at": "2026-04-01T00:00:00Z"})
    clock.now = datetime(2026, 4, 2, tzinfo=UTC)
    invoices = await _invoices(fake)
    assert sum(i["fees_amount_cents"] for i in invoices) == 3100
    assert _plan_fees(invoices) in ([3100], [3100, 0])


async def test_upgrade_mid_period_bills_each_plan_its_days() -> None:
    """On 3100 a month from 1 March, upgraded on 15 March 12:00 to 6200 a month (200 a day in March): the replaced
    subscription is billed at once for 1 March to the upgrade, 14.5 days ceiled to 15 x 100 = 1500; the new one's
    first invoice (1 April) for 15-31 March, 17 days x 200 = 3400; April whole, 6200 (the emulator: 3100, 6200,
    6200)."""
    clock = Clock(datetime(2026, 3, 1, tzinfo=UTC))
    fake = _fake(clock, datetime(2026, 3, 1, tzinfo=UTC))
    fake.add_plan("big", amount_cents=6200)
    clock.now = datetime(2026, 3, 15, 12, tzinfo=UTC)
    fake.add_subscription("org", "big", external_id="sub")
    clock.now = datetime(2026, 5, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [1500, 3400, 6200]


async def test_downgrade_bills_the_old_plans_first_days_and_the_new_plan_whole() -> None:
    """On 6200 a month from 10 March, downgraded on 20 March to 3100 (switching on 1 April): March bills 10-31, 22
    days x 200 = 4400 (the emulator: 6200); the new plan starts on 1 April, April is whole, 3100."""
    clock = Clock(datetime(2026, 3, 10, tzinfo=UTC))
    fake = _fake(clock, datetime(2026, 3, 10, tzinfo=UTC), amount=6200)
    fake.add_plan("small", amount_cents=3100)
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    fake.add_subscription("org", "small", external_id="sub")
    clock.now = datetime(2026, 5, 1, 0, 0, 1, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await _invoices(fake)] == [4400, 3100]
