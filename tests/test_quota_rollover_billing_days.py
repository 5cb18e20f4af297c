"""Review of the quota gate's dates: the next period's estimated end at a rollover (``next_period_end``) and the
``RateLimit-Reset`` / ``Retry-After`` given on it.

Covers what the earlier tests (tests/test_quota_rollover.py: every billing day on whole periods in nine zones) did
not: an anniversary subscription whose period does not start on its billing day (its first period starts at the
exact ``started_at``, an upgrade's at the upgrade), billing days 29-31 ending on a short month's last day; zones
at the edges of the UTC offsets (Chatham's +13:45 summer, American Samoa's -11), checked against the emulator's
period arithmetic; the memory and Redis backends on the same cases.

A settable clock shared by the gate and the emulator; counts and headers only, no sleeps as synchronisation.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._periods import next_period_end
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._snapshots import Snapshot
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._util import billing_period

pytestmark = pytest.mark.anyio


UTC = dt.timezone.utc


_OPEN: list[QuotaGate] = []


@pytest.fixture(autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


def headers(decision: QuotaDecision) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in decision.headers}


async def settled(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


def gate_for(lago: LagoClient, clock: Clock, redis: str | None, **config: Any) -> QuotaGate:
    settings = lago.settings.replace(redis_url=redis) if redis else lago.settings
    if redis:
        config["redis_prefix"] = f"dates:{uuid.uuid4().hex[:8]}:"
    gate = QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)
    _OPEN.append(gate)
    return gate


async def reset_after_the_boundary(fake: FakeLago, clock: Clock, redis: str | None, boundary: dt.datetime) -> int:
    """The ``RateLimit-Reset`` of the first request a second after ``boundary``: decided on the provisional snapshot
    of the next period (no Lago read meanwhile), after one read of the period ending there."""
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, plan_limits={})
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = gate_for(lago, clock, redis, cold_timeout=0.5)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            assert (await gate.check("org_a")).allowed
            await settled(gate)
            snap = await gate.backend.load("org_a")
            assert snap is not None and snap.period_end == boundary.timestamp()
            clock.at = boundary + dt.timedelta(seconds=1)
            reads = len(fake.requests)
            decision = await gate.check("org_a")
            assert decision.allowed and len(fake.requests) == reads  # (the provisional snapshot: no read)
            tasks.cancel_scope.cancel()
    return int(headers(decision)["ratelimit-reset"])


async def test_a_first_period_begun_in_the_afternoon_on_day_31_rolls_over_to_the_31st(redis: str | None) -> None:
    """Subscribed on 31 January at 15:00 (anniversary, day 31): the first period starts at that exact time and ends
    on 28 February; the next one ends on 31 March. The estimate took the billing day from the start taken for a
    local midnight (15:00 UTC read as 00:00 on 1 February at UTC+9), so the provisional period ended on 28 March:
    ``RateLimit-Reset`` three days short."""
    clock = Clock(dt.datetime(2026, 1, 31, 15, 0, tzinfo=UTC))
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter", billing_time="anniversary", subscription_at="2026-01-31T15:00:00Z")
    clock.at = dt.datetime(2026, 2, 27, 23, 0, tzinfo=UTC)
    feb_28 = dt.datetime(2026, 2, 28, tzinfo=UTC)
    reset = await reset_after_the_boundary(fake, clock, redis, feb_28)
    assert reset == int(dt.datetime(2026, 3, 31, tzinfo=UTC).timestamp() - clock.time())


async def test_a_period_begun_by_an_upgrade_rolls_over_to_the_billing_day(redis: str | None) -> None:
    """Anniversary day 30, upgraded on 10 February at noon: the new subscription's period runs from then to 28
    February (its billing day kept), the next one to 30 March, not to 28 March (the day of the period's end, the
    upgrade's day being earlier)."""
    clock = Clock(dt.datetime(2026, 1, 30, 0, 0, tzinfo=UTC))
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter", billing_time="anniversary", subscription_at="2026-01-30T00:00:00Z")
    clock.at = dt.datetime(2026, 2, 10, 12, 0, tzinfo=UTC)
    fake.add_subscription("org_a", "pro")  # (an upgrade: effective at once)
    clock.at = dt.datetime(2026, 2, 27, 23, 0, tzinfo=UTC)
    reset = await reset_after_the_boundary(fake, clock, redis, dt.datetime(2026, 2, 28, tzinfo=UTC))
    assert reset == int(dt.datetime(2026, 3, 30, tzinfo=UTC).timestamp() - clock.time())


def lagos_periods(zone: str, interval: str, billing_time: str, anchor: dt.datetime) -> list[tuple[Any, ...]]:
    """(start, end, the following period's end, whether both ends share a UTC offset) of consecutive periods, by the
    emulator's arithmetic (lago-api's ``DatesService``)."""
    tz = ZoneInfo(zone)
    out = []
    at = anchor
    for _ in range(15 if interval == "monthly" else 6):
        start, last = billing_period(interval, billing_time, anchor, at, tz)
        end = last + dt.timedelta(seconds=1)
        following = billing_period(interval, billing_time, anchor, end, tz)[1] + dt.timedelta(seconds=1)
        same_offset = end.astimezone(tz).utcoffset() == following.astimezone(tz).utcoffset()
        out.append((start.timestamp(), end.timestamp(), following.timestamp(), same_offset))
        at = end
    return out


@pytest.mark.parametrize("zone", ["Pacific/Chatham", "Asia/Kolkata", "America/St_Johns", "Europe/Paris"])
@pytest.mark.parametrize("billing_time", ["calendar", "anniversary"])
@pytest.mark.parametrize("interval", ["monthly", "quarterly", "semiannual"])
async def test_the_estimate_is_lagos_next_period_in_half_hour_zones_and_on_double_clipped_days(
    zone: str, billing_time: str, interval: str
) -> None:
    """Half-hour zones (India, Newfoundland), Chatham's +13:45 summer (read as -10:15: every calendar month there
    estimated to end a day early), and billing day 31 on a quarterly plan subscribed in August (Nov 30 to Feb 28:
    both ends clipped, the next end is May 31, not May 30): with the subscription's date known, every estimate is
    Lago's next period end, or an hour off across a DST change (subscribed at midnight or in the day; not
    within an hour before or after a local midnight, whose day a DST change since makes uncertain)."""
    tz = ZoneInfo(zone)
    checked = 0
    for month in (1, 8):
        for anchor_day in (1, 15, 28, 29, 30, 31):
            for hour in (0, 9, 15):
                anchor = dt.datetime(2027, month, anchor_day, hour, tzinfo=tz)
                if hour == 0 and anchor.utcoffset() != dt.datetime(2027, 2, 1, tzinfo=tz).utcoffset():
                    continue  # (a summer midnight read in winter is 23:00 the day before: its day is uncertain)
                for start, end, following, same_offset in lagos_periods(zone, interval, billing_time, anchor):
                    snap = Snapshot(
                        active=True,
                        interval=interval,
                        period_start=start,
                        period_end=end,
                        anchor=anchor.timestamp() if billing_time == "anniversary" else 0.0,
                    )
                    estimate = next_period_end(snap)
                    where = (month, anchor_day, hour, dt.datetime.fromtimestamp(end, UTC))
                    if same_offset:
                        assert estimate == following, where
                        checked += 1
                    else:
                        assert abs(estimate - following) == 3600, where
    assert checked >= 40 or interval == "semiannual"  # (a half-year always crosses a DST change there)
