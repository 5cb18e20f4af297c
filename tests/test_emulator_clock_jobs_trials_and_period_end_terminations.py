"""Review of the emulator's timing of plan changes, period ends and trials, as lago-api does them.

Covers:

* the clock jobs (``clock.rb``): ``Clock::SubscriptionsBillerJob`` runs hourly at minute 10 (UTC) and applies a
  pending downgrade then (``TerminateJob`` with the biller's time: the old subscription's ``terminated_at`` and the new
  one's ``started_at`` are that run, 00:10 for a UTC customer's month, not the boundary) and issues period-end
  invoices then; ``Clock::TerminateEndedSubscriptionsJob`` runs hourly at minute 5 and terminates the subscriptions
  whose ``ending_at`` falls on that (local) day; ``clock_job_delay`` (Sidekiq's queue) delays what is seen, not the
  dates; ``clock_jobs="boundary"`` keeps the idealised timing;
* a trial counts from the first subscription's start (``Subscription#initial_started_at``): an upgrade or a
  downgrade does not restart it;
* a subscription ending with its period: its termination bills that period (``termination_boundaries``), not the next
  one's fee in advance with a credit note, nor a second, empty invoice; a downgraded plan paid in advance is not billed
  the next period either; a zero-amount invoice of a customer with ``finalize_zero_amount_invoice: skip`` is closed.

Every answer read is validated against Lago's OpenAPI spec.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from _openapi import assert_response_matches
from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._util import FakeLagoError

pytestmark = pytest.mark.anyio

UTC = timezone.utc
MARCH = datetime(2026, 3, 1, tzinfo=UTC)
APRIL = datetime(2026, 4, 1, tzinfo=UTC)


async def get(fake: FakeLago, path: str, expect: int = 200, **params: Any) -> Any:
    async with fake.client() as client:
        response = await client.get(f"/api/v1{path}", params=params)
    assert response.status_code == expect, response.text
    if expect == 200:
        assert_response_matches(response)
    return response.json()


async def subscription(fake: FakeLago, status: str = "active") -> Any:
    return (await get(fake, "/subscriptions/sub", status=status))["subscription"]


async def invoices(fake: FakeLago) -> list[dict[str, Any]]:
    """The customer's invoices as ``GET /invoices`` then ``GET /invoices/{id}`` answer them, oldest first."""
    listed = (await get(fake, "/invoices", external_customer_id="org"))["invoices"]
    found = [(await get(fake, f"/invoices/{i['lago_id']}"))["invoice"] for i in listed]
    return sorted(found, key=lambda i: (i["created_at"], i["sequential_id"]))


def plan_fees(invoice: dict[str, Any]) -> list[tuple[str, int]]:
    return [(f["item"]["code"], f["amount_cents"]) for f in invoice["fees"] if f["item"]["type"] == "subscription"]


def downgraded(clock: Clock, **options: Any) -> FakeLago:
    """``org`` on pro (6200 a month, in arrears) from 1 March, downgraded on 20 March to starter (3100)."""
    fake = FakeLago(api_key="k", clock=clock, **options)
    fake.add_plan("pro", amount_cents=6200)
    fake.add_plan("starter", amount_cents=3100)
    fake.add_subscription("org", "pro", external_id="sub", subscription_at=MARCH.isoformat())
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    fake.add_subscription("org", "starter", external_id="sub")
    return fake


# ----------------------------------------------------------------------------------- 1. the clock jobs' timing


async def test_a_downgrade_applies_at_the_billers_run_not_at_the_boundary() -> None:
    """Until 00:10 on 1 April Lago still has pro active (its current period April); the biller's run at 00:10
    terminates it and starts starter then: both dates are 00:10. The emulator switched at 00:00:00."""
    clock = Clock(MARCH)
    fake = downgraded(clock)
    for moment in (APRIL + timedelta(seconds=1), APRIL + timedelta(minutes=9, seconds=59)):
        clock.now = moment
        sub = await subscription(fake)
        assert (sub["plan_code"], sub["next_plan_code"]) == ("pro", "starter")
        assert sub["current_billing_period_started_at"] == "2026-04-01T00:00:00Z"
    clock.now = APRIL + timedelta(minutes=10)
    sub = await subscription(fake)
    old = await subscription(fake, "terminated")
    assert (sub["plan_code"], sub["started_at"], sub["previous_plan_code"]) == (
        "starter",
        "2026-04-01T00:10:00Z",
        "pro",
    )
    assert (old["plan_code"], old["terminated_at"]) == ("pro", "2026-04-01T00:10:00Z")
    kinds = [w["webhook_type"] for w in fake.emitted_webhooks if w["webhook_type"].startswith("subscription.")]
    assert kinds[-2:] == ["subscription.terminated", "subscription.started"]


async def test_the_period_end_invoice_is_issued_at_the_billers_run() -> None:
    """A plan in arrears: March's invoice does not exist at 00:00:01 on 1 April, it is issued by the 00:10 run, dated
    then. A customer in Asia/Kolkata (+05:30): its April starts at 18:30 UTC on 31 March, the first run after it is
    19:10 UTC (00:40 local)."""
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("p", amount_cents=3100)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    clock.now = APRIL + timedelta(seconds=1)
    assert [i["created_at"] for i in await invoices(fake)] == []
    clock.now = APRIL + timedelta(minutes=10)
    issued = await invoices(fake)
    assert [(i["created_at"], i["issuing_date"], plan_fees(i)) for i in issued] == [
        ("2026-04-01T00:10:00Z", "2026-04-01", [("p", 3100)])
    ]

    clock = Clock(datetime(2026, 2, 28, 18, 30, tzinfo=UTC))
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("p", amount_cents=3100)
    fake.add_customer("org", timezone="Asia/Kolkata")
    fake.add_subscription("org", "p", external_id="sub")
    clock.now = datetime(2026, 3, 31, 19, 9, 59, tzinfo=UTC)
    assert await invoices(fake) == []
    clock.now = datetime(2026, 3, 31, 19, 10, tzinfo=UTC)
    assert [(i["created_at"], i["issuing_date"]) for i in await invoices(fake)] == [
        ("2026-03-31T19:10:00Z", "2026-04-01")
    ]


async def test_a_queued_clock_job_is_seen_later_with_the_billers_dates() -> None:
    """``clock_job_delay=600``: the job enqueued at 00:10 runs at 00:20; until then pro is active, then starter is,
    started at the biller's time (``TerminateJob.perform_later(subscription, today.to_i)``)."""
    clock = Clock(MARCH)
    fake = downgraded(clock, clock_job_delay=600)
    clock.now = APRIL + timedelta(minutes=19, seconds=59)
    assert (await subscription(fake))["plan_code"] == "pro"
    clock.now = APRIL + timedelta(minutes=20)
    sub = await subscription(fake)
    assert (sub["plan_code"], sub["started_at"]) == ("starter", "2026-04-01T00:10:00Z")


async def test_ending_at_terminates_at_the_minute_5_job_of_its_day() -> None:
    """``TerminateEndedSubscriptionsJob`` (hourly at minute 5) terminates the subscriptions whose ``ending_at`` is
    today: one ending at 18:00 on 15 April is terminated by the 00:05 run that day, ``terminated_at`` 00:05."""
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("p", amount_cents=3000)
    fake.add_subscription(
        "org", "p", external_id="sub", subscription_at=MARCH.isoformat(), ending_at="2026-04-15T18:00:00Z"
    )
    clock.now = datetime(2026, 4, 15, 0, 4, 59, tzinfo=UTC)
    assert (await subscription(fake))["status"] == "active"
    clock.now = datetime(2026, 4, 15, 0, 5, tzinfo=UTC)
    ended = await subscription(fake, "terminated")
    assert ended["terminated_at"] == "2026-04-15T00:05:00Z"
    await get(fake, "/subscriptions/sub", 404)


async def test_the_boundary_option_keeps_the_idealised_timing() -> None:
    """``clock_jobs="boundary"``: the downgrade switches at 00:00:00 and the invoice is dated then; a delay with it,
    or an unknown value, is refused with what to do."""
    clock = Clock(MARCH)
    fake = downgraded(clock, clock_jobs="boundary")
    clock.now = APRIL
    sub = await subscription(fake)
    assert (sub["plan_code"], sub["started_at"]) == ("starter", "2026-04-01T00:00:00Z")
    assert [i["created_at"] for i in await invoices(fake)] == ["2026-04-01T00:00:00Z"]
    with pytest.raises(FakeLagoError, match="clock_jobs must be one of"):
        FakeLago(clock_jobs="hourly")
    with pytest.raises(FakeLagoError, match="clock_jobs='lago'"):
        FakeLago(clock_jobs="boundary", clock_job_delay=60)


# ------------------------------------------------------------------------------------ 2. trials on plan changes


async def test_an_upgrade_does_not_restart_the_trial() -> None:
    """a (10-day trial) from 1 March, upgraded to b (10-day trial, 2000 in arrears) on 20 March, after the trial
    ended on 11 March: b is not in a trial (``trial_end_datetime`` = ``initial_started_at`` + 10 days, 11 March), so its
    first period bills 20-31 March, 12 days x 2000 / 31 = 774 (the emulator restarted it: from 30 March, 129)."""
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("a", amount_cents=1000, trial_period=10)
    fake.add_plan("b", amount_cents=2000, trial_period=10)
    fake.add_subscription("org", "a", external_id="sub")
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    fake.add_subscription("org", "b", external_id="sub")
    sub = await subscription(fake)
    assert (sub["plan_code"], sub["trial_ended_at"]) == ("b", "2026-03-11T00:00:00Z")
    clock.now = APRIL + timedelta(minutes=10)
    assert [plan_fees(i) for i in await invoices(fake)][-1] == [("b", 774)]


async def test_an_upgrade_within_the_trial_keeps_its_end() -> None:
    """Upgraded on 5 March, within the trial begun on 1 March: the trial still ends on 11 March, not 15 March."""
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("a", amount_cents=1000, trial_period=10)
    fake.add_plan("b", amount_cents=2000, trial_period=10)
    fake.add_subscription("org", "a", external_id="sub")
    clock.now = datetime(2026, 3, 5, tzinfo=UTC)
    fake.add_subscription("org", "b", external_id="sub")
    clock.now = datetime(2026, 3, 12, tzinfo=UTC)
    assert (await subscription(fake))["trial_ended_at"] == "2026-03-11T00:00:00Z"
    ended = [w for w in fake.emitted_webhooks if w["webhook_type"] == "subscription.trial_ended"]
    assert [w["subscription"]["plan_code"] for w in ended] == ["b"]


# ------------------------------------------------------------------------------------ 3. ending with the period


def in_advance(clock: Clock, **customer: Any) -> FakeLago:
    """``org`` on adv (3100 a month paid in advance, 1 cent a call) from 1 March; 5 calls in March."""
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_billable_metric("calls")
    fake.add_plan(
        "adv",
        amount_cents=3100,
        pay_in_advance=True,
        charges=[{"billable_metric_code": "calls", "charge_model": "standard", "properties": {"amount": "0.01"}}],
    )
    if customer:
        fake.add_customer("org", **customer)
    fake.add_subscription("org", "adv", external_id="sub", subscription_at=MARCH.isoformat())
    return fake


def send_calls(fake: FakeLago, count: int) -> None:
    for n in range(count):
        fake.store.create_event(
            {"event": {"transaction_id": f"tx{n}", "external_subscription_id": "sub", "code": "calls"}}
        )


async def test_paid_in_advance_and_ending_with_its_period_is_not_billed_the_next_one() -> None:
    """``ending_at`` 1 April 00:00: Lago's 00:05 job terminates it before the biller's run, and the termination
    invoice bills March (its 5 calls, 5 cents), not April's fee. The emulator billed April's 3100 at the boundary,
    credited 2997 of it back, and issued a third, empty invoice."""
    clock = Clock(MARCH)
    fake = in_advance(clock)
    fake.store.update_subscription("sub", None, {"subscription": {"ending_at": APRIL.isoformat()}})
    clock.now = datetime(2026, 3, 10, tzinfo=UTC)
    send_calls(fake, 5)
    clock.now = datetime(2026, 4, 2, tzinfo=UTC)
    issued = await invoices(fake)
    assert [(i["fees_amount_cents"], plan_fees(i)) for i in issued] == [(3100, [("adv", 3100)]), (5, [])]
    assert issued[-1]["created_at"] == "2026-04-01T00:05:00Z"
    assert (await get(fake, "/credit_notes", external_customer_id="org"))["credit_notes"] == []


async def test_deleted_before_the_billers_run_bills_the_period_that_ended() -> None:
    """``DELETE`` at 00:03 on 1 April, before the biller's run: the termination invoice bills March (5 cents) and no
    April fee, and no credit note is due (April was never billed)."""
    clock = Clock(MARCH)
    fake = in_advance(clock)
    clock.now = datetime(2026, 3, 10, tzinfo=UTC)
    send_calls(fake, 5)
    clock.now = APRIL + timedelta(minutes=3)
    async with fake.client() as client:
        response = await client.delete("/api/v1/subscriptions/sub")
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    clock.now = APRIL + timedelta(hours=2)
    issued = await invoices(fake)
    assert [(i["fees_amount_cents"], i["created_at"]) for i in issued] == [
        (3100, "2026-03-01T00:00:00Z"),
        (5, "2026-04-01T00:03:00Z"),
    ]
    assert (await get(fake, "/credit_notes", external_customer_id="org"))["credit_notes"] == []


async def test_in_arrears_and_ending_with_its_period_gets_one_invoice() -> None:
    """In arrears, ``ending_at`` 1 April 00:00: one termination invoice bills March's fee (3100) and nothing else; the
    emulator issued March's invoice and then an empty one."""
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("p", amount_cents=3100)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat(), ending_at=APRIL.isoformat())
    clock.now = datetime(2026, 4, 2, tzinfo=UTC)
    assert [(i["fees_amount_cents"], plan_fees(i)) for i in await invoices(fake)] == [(3100, [("p", 3100)])]


async def test_a_zero_invoice_is_closed_when_the_customer_skips_them() -> None:
    """``finalize_zero_amount_invoice: skip``: the zero-amount termination invoice is ``closed``: no
    ``invoice.created``, not listed, 404 when read (``invoices.visible``)."""
    clock = Clock(MARCH)
    fake = in_advance(clock, finalize_zero_amount_invoice="skip")
    fake.store.update_subscription("sub", None, {"subscription": {"ending_at": APRIL.isoformat()}})
    clock.now = datetime(2026, 4, 2, tzinfo=UTC)
    assert [i["fees_amount_cents"] for i in await invoices(fake)] == [3100]
    created = [w for w in fake.emitted_webhooks if w["webhook_type"] == "invoice.created"]
    assert [w["invoice"]["fees_amount_cents"] for w in created] == [3100]
    closed = [i for i in fake.invoices if i["status"] == "closed"]
    assert [i["fees_amount_cents"] for i in closed] == [0]
    await get(fake, f"/invoices/{closed[0]['lago_id']}", 404)


async def test_a_downgrade_of_a_plan_paid_in_advance_bills_only_the_new_plans_period() -> None:
    """big (6200 in advance) downgraded to small (3100 in advance): the biller's run bills, on one invoice, big's
    March charges and small's April fee; big's April fee is not billed (the emulator billed it, 6200, on its own
    invoice before the switch's)."""
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("big", amount_cents=6200, pay_in_advance=True)
    fake.add_plan("small", amount_cents=3100, pay_in_advance=True)
    fake.add_subscription("org", "big", external_id="sub", subscription_at=MARCH.isoformat())
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    fake.add_subscription("org", "small", external_id="sub")
    clock.now = APRIL + timedelta(hours=1)
    issued = await invoices(fake)
    assert [(i["created_at"], plan_fees(i)) for i in issued] == [
        ("2026-03-01T00:00:00Z", [("big", 6200)]),
        ("2026-04-01T00:10:00Z", [("small", 3100)]),
    ]


async def test_a_downgrade_does_not_give_the_new_plan_a_trial() -> None:
    """t (7-day trial, 3100 in advance) from 1 March, downgraded to s (7-day trial, 1550 in advance): s starts on
    1 April out of any trial (it ended on 8 March), so April's fee is billed at the switch (the emulator started a
    new trial and billed it on 8 April)."""
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_plan("t", amount_cents=3100, pay_in_advance=True, trial_period=7)
    fake.add_plan("s", amount_cents=1550, pay_in_advance=True, trial_period=7)
    fake.add_subscription("org", "t", external_id="sub", subscription_at=MARCH.isoformat())
    clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    fake.add_subscription("org", "s", external_id="sub")
    clock.now = APRIL + timedelta(hours=1)
    issued = await invoices(fake)
    assert plan_fees(issued[-1]) == [("s", 1550)]
    assert (await subscription(fake))["trial_ended_at"] == "2026-03-08T00:00:00Z"
