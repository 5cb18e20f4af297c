"""Review of the quota gate's billing periods against Lago's, at the edges of the UTC offsets.

Lago's periods start at the customer's local midnight. The gate takes every period from Lago (``current_usage``'s
``from_datetime``/``to_datetime``); the one date it works out itself is the end of the next period, when a request
past a period's end is decided at once on a provisional snapshot of the next period (``next_period_end``), until
Lago is read. It reads the customer's zone from the period's bounds, and a midnight at 10:00Z is both UTC-10's
(Hawaii) and UTC+14's (Kiritimati), one at 11:00Z both UTC+13's (Tonga, New Zealand's summer) and UTC-11's (American
Samoa): taken in the wrong one, a quarter of a Kiritimati customer ending on Oct 1 was estimated to end on Dec 31,
and an American Samoa customer billed on the 29th was given Mar 31 for a period ending Mar 29 (``RateLimit-Reset``,
``Retry-After`` and the problem's "resets at" off by one to three days). Now the zone that puts the end on its
billing day (the 1st with calendar billing; the anniversary's day, or a short month's last) is taken.

Checked through a gate on the emulator (its period arithmetic is lago-api's ``DatesService``), settable clock shared
by both, no sleeps as synchronisation; and the estimate against the emulator's arithmetic over whole years in the
zones at both edges.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from zoneinfo import ZoneInfo

import anyio
import pytest

from _quota_app import Clock
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._periods import CALENDAR_ANCHOR, next_period_end
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._snapshots import Snapshot
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._accepted import TIMEZONES
from lago_org_billing.testing._util import billing_period

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc


def _lago(clock: Clock, zone: str, interval: str, billing_time: str) -> FakeLago:
    """A customer ``org_1`` in ``zone`` on a plan of ``interval`` allowing 3 calls per period."""
    fake = FakeLago(api_key="k", clock=clock.now)
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_feature("api_quota", privileges=[{"code": "max_api_calls", "value_type": "integer"}])
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0"}}
    fake.add_plan(
        "basic",
        amount_cents=1_000,
        interval=interval,
        charges=[charge],
        entitlements={"api_quota": {"max_api_calls": 3}},
    )
    if zone in TIMEZONES:
        fake.add_customer("org_1", timezone=zone)
    else:  # (Pacific/Kiritimati: Lago takes no UTC+14 zone; set behind the API, as a Lago with a longer list would)
        customer = fake.add_customer("org_1")
        stored = next(c for c in fake.store.customers if c["lago_id"] == customer["lago_id"])
        stored["fields"]["timezone"] = zone
    fake.add_subscription("org_1", "basic", billing_time=billing_time)
    return fake


@contextlib.asynccontextmanager
async def _gate(fake: FakeLago, clock: Clock) -> AsyncIterator[QuotaGate]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            try:
                yield gate
            finally:
                tasks.cancel_scope.cancel()
        await gate.aclose()


def _reset(decision: QuotaDecision) -> int:
    return int(dict(decision.headers)[b"ratelimit-reset"])


async def _reset_after_the_boundary(fake: FakeLago, clock: Clock, boundary: dt.datetime) -> tuple[int, int]:
    """``RateLimit-Reset`` of the first request a second after ``boundary`` (decided on the provisional snapshot),
    and the seconds from then to the end of the period Lago has then."""
    async with _gate(fake, clock) as gate:
        clock.at = boundary - dt.timedelta(minutes=1)
        assert (await gate.check("org_1")).allowed  # the period ending at the boundary, read from Lago
        clock.at = boundary + dt.timedelta(seconds=1)
        lago_reads = len(fake.requests)
        decision = await gate.check("org_1")
        assert decision.allowed
        assert len(fake.requests) == lago_reads  # decided at once (the provisional snapshot), not after a Lago read
        # ("Z" spelt as an offset: Python 3.10's fromisoformat reads no "Z")
        lago_end = dt.datetime.fromisoformat(
            fake.subscriptions[0]["current_billing_period_ending_at"].replace("Z", "+00:00")
        )
        return _reset(decision), round(lago_end.timestamp() + 1 - clock.time())


async def test_a_kiritimati_quarter_rolls_over_to_lagos_next_quarter_end() -> None:
    """Calendar billing, quarterly, a customer in Pacific/Kiritimati (UTC+14): its Q3 ends on Oct 1 00:00+14
    (10:00Z on Sep 30, a midnight of UTC-10 too). The next quarter ends on Jan 1 00:00+14; it was estimated to end on
    Dec 31 (the end read as Sep 30 in UTC-10, the last day of a 30-day month: Dec 30 there), a day early."""
    zone = ZoneInfo("Pacific/Kiritimati")
    clock = Clock(dt.datetime(2026, 7, 5, 12, tzinfo=zone))
    fake = _lago(clock, "Pacific/Kiritimati", "quarterly", "calendar")
    reset, lago = await _reset_after_the_boundary(fake, clock, dt.datetime(2026, 10, 1, tzinfo=zone))
    assert lago == round(dt.datetime(2027, 1, 1, tzinfo=zone).timestamp() - clock.time())
    assert reset == lago


async def test_an_american_samoa_anniversary_on_the_29th_rolls_over_to_lagos_next_end() -> None:
    """Anniversary billing on the 29th, monthly, a customer in Pacific/Pago_Pago (UTC-11): February's period ends on
    Feb 28 (clipped) at 00:00-11, 11:00Z, a midnight of UTC+13 too. The next period ends on Mar 29; it was estimated
    to end on Mar 31 (the end read as Mar 1 in UTC+13, the anchor as the 30th: Mar 30 there), two days late."""
    zone = ZoneInfo("Pacific/Pago_Pago")
    clock = Clock(dt.datetime(2026, 1, 29, 9, tzinfo=zone))
    fake = _lago(clock, "Pacific/Pago_Pago", "monthly", "anniversary")
    reset, lago = await _reset_after_the_boundary(fake, clock, dt.datetime(2026, 2, 28, tzinfo=zone))
    assert lago == round(dt.datetime(2026, 3, 29, tzinfo=zone).timestamp() - clock.time())
    assert reset == lago


def _estimates(zone: str, interval: str, billing_time: str, anchor_days: tuple[int, ...]) -> list[tuple[str, float]]:
    """(period, estimate - Lago's next end in seconds) for each period of a year and a half from each anchor day."""
    tz = ZoneInfo(zone)
    found = []
    for day in anchor_days:
        anchor = dt.datetime(2027, 1, day, 9, tzinfo=tz)
        at = anchor
        for _ in range(18 if interval == "monthly" else 6):
            start, last = billing_period(interval, billing_time, anchor, at, tz)
            end = last + dt.timedelta(seconds=1)
            following = billing_period(interval, billing_time, anchor, end, tz)[1] + dt.timedelta(seconds=1)
            snap = Snapshot(
                active=True,
                interval=interval,
                period_start=start.timestamp(),
                period_end=end.timestamp(),
                anchor=anchor.timestamp() if billing_time == "anniversary" else CALENDAR_ANCHOR,
            )
            off = next_period_end(snap) - following.timestamp()
            if end.astimezone(tz).utcoffset() != following.astimezone(tz).utcoffset():
                off = 0.0 if abs(off) == 3600 else off  # (an hour off across a DST change: read from Lago at once)
            found.append((f"day {day}: {end.astimezone(tz)} -> {following.astimezone(tz)}", off))
            at = end
    return found


@pytest.mark.parametrize(
    "zone",
    [
        "Pacific/Kiritimati",  # UTC+14 (midnights of UTC-10)
        "Pacific/Pago_Pago",  # UTC-11 (midnights of UTC+13)
        "Pacific/Niue",  # UTC-11
        "Pacific/Honolulu",  # UTC-10 (midnights of UTC+14)
        "Pacific/Tongatapu",  # UTC+13 (midnights of UTC-11)
        "Pacific/Auckland",  # UTC+13 in summer, +12 in winter
        "Pacific/Apia",  # UTC+13
    ],
)
@pytest.mark.parametrize("interval", ["monthly", "quarterly", "semiannual", "yearly"])
async def test_a_calendar_estimate_is_lagos_next_end_at_both_edges_of_the_offsets(zone: str, interval: str) -> None:
    """Calendar periods end on the 1st: the estimate is Lago's next end in every zone sharing its midnights with a
    zone a day apart, on both sides (an hour off only across a DST change)."""
    wrong = [(period, off / 3600) for period, off in _estimates(zone, interval, "calendar", (1,)) if off]
    assert not wrong


@pytest.mark.parametrize("zone", ["Pacific/Honolulu", "Pacific/Tongatapu", "Pacific/Auckland", "Pacific/Apia"])
@pytest.mark.parametrize("interval", ["monthly", "quarterly", "yearly"])
async def test_anniversary_estimates_in_the_zones_taken_by_default_stay_lagos(zone: str, interval: str) -> None:
    """The zones the end's midnight is read in by default (Hawaii's UTC-10, UTC+13) keep their estimates on every
    billing day, short months included: the zone a day apart is only taken when it alone fits the billing day."""
    days = (1, 2, 15, 28, 29, 30, 31)
    wrong = [(period, off / 3600) for period, off in _estimates(zone, interval, "anniversary", days) if off]
    assert not wrong
