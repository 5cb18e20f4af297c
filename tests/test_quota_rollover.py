"""Quota gating at the billing-period boundary.

At a calendar boundary (00:00 on the 1st in each customer's time zone) every cached org's snapshot ends at the same
instant. The gate treated a snapshot whose period is over as missing: each org's next request waited up to
``cold_timeout`` for an urgent Lago read, and with thousands of active orgs most of them timed out into
``LAGO_FAIL_OPEN`` (no limit at all) or, fail-closed, 503, every month. Now a snapshot whose subscription is known to
go on is rolled over at once into a provisional snapshot of the next period (usage base 0, this deployment's records
since the boundary counted), replaced by a normal paced refresh. A subscription ending at the boundary, or a pending
downgrade switching there, is not passed provisionally.

Also: due refreshes get a share of the refresh slots while cold ones (a flood of made-up org ids) keep waiting.

Counts only (cold waits, Lago reads, decisions), a settable clock, no sleeps as synchronisation.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _quota_app import Clock, needs_redis, seed, subscription_answer
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import LagoNotFoundError, LagoUnavailableError
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._snapshots import Snapshot
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


UTC = dt.timezone.utc
APRIL = dt.datetime(2026, 4, 1, tzinfo=UTC)
PERIODS = {
    "march": ("2026-03-01T00:00:00Z", "2026-03-31T23:59:59Z"),
    "april": ("2026-04-01T00:00:00Z", "2026-04-30T23:59:59Z"),
    "may": ("2026-05-01T00:00:00Z", "2026-05-31T23:59:59Z"),
}
MAY = dt.datetime(2026, 5, 1, tzinfo=UTC).timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(APRIL - dt.timedelta(minutes=1))


_OPEN: list[QuotaGate] = []


@pytest.fixture(autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


class PeriodLago:
    """Lago's two reads, with the period of the gate's clock at the time a read begins; ``hold`` (when set to an
    unset event) keeps reads from answering; ``down``: every read fails; counts reads begun and answered."""

    def __init__(self, clock: Clock, limit: int = 10) -> None:
        self.clock = clock
        self.limit = limit
        self.begun: list[tuple[str, str]] = []
        self.answered: list[tuple[str, str]] = []
        self.hold: anyio.Event | None = None
        self.down = False
        self.usage: dict[tuple[str, str], int] = {}  # (org, period) -> calls Lago counted
        self.subscription: dict[str, dict[str, Any]] = {}  # org -> fields overriding the subscription's
        self.missing: set[str] = set()  # orgs without a subscription (made-up ids)

    def _period(self) -> str:
        return "march" if self.clock.at < APRIL else "april" if self.clock.at.timestamp() < MAY else "may"

    async def _enter(self, kind: str, org: str) -> str:
        period = self._period()
        self.begun.append((kind, org))
        if self.hold is not None:
            await self.hold.wait()
        for _ in range(2):
            await anyio.lowlevel.checkpoint()
        if self.down:
            raise LagoUnavailableError("Lago is down (test)")
        self.answered.append((kind, org))
        return period

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        period = await self._enter("sub", external_id)
        if external_id in self.missing:
            raise LagoNotFoundError("subscription not found", status=404, code="subscription_not_found")
        start, end = PERIODS[period]
        privileges = [{"code": "max_api_calls", "value": self.limit}]
        return subscription_answer(external_id, (start, end), privileges, **self.subscription.get(external_id, {}))

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        period = await self._enter("usage", subscription)
        start, end = PERIODS[period]
        calls = self.usage.get((subscription, period), 0)
        return {
            "from_datetime": start,
            "to_datetime": end,
            "charges_usage": [
                {
                    "billable_metric": {"code": "api_call", "aggregation_type": "sum_agg"},
                    "events_count": calls,
                    "units": "0",
                }
            ],
        }


def stub_gate(lago: PeriodLago, clock: Clock, redis: str | None = None, **config: Any) -> QuotaGate:
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=redis)
    if redis:
        config.setdefault("redis_prefix", f"rollover:{uuid.uuid4().hex[:8]}:")
    gate = QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]
    _OPEN.append(gate)
    return gate


def headers(decision: QuotaDecision) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in decision.headers}


async def settled(*gates: QuotaGate) -> None:
    for gate in gates:
        while gate._refreshing:
            for event in list(gate._refreshing.values()):
                await event.wait()


async def stored(gate: QuotaGate, org: str) -> Snapshot:
    snap = await gate.backend.load(org)
    assert snap is not None
    return snap


# ------------------------------------------------------------------------------- 1. the boundary, many orgs


async def test_at_the_boundary_every_org_is_decided_at_once_with_the_new_periods_limits(
    clock: Clock, redis: str | None
) -> None:
    """40 orgs, each at its limit (10 calls) in March. At 00:00:02 on 1 April, with Lago's reads held: every org's
    request is decided at once from a provisional April snapshot (no cold wait, no fail-open, no Lago read answered),
    allowed with April's numbers (RateLimit-Remaining 9, reset at 1 May), and April's limit applies to what is counted
    since the boundary. Then Lago answers: one paced usage read per org (no subscription read: the plan part is
    fresh) replaces each provisional snapshot with Lago's (April's usage counted elsewhere: 4)."""
    orgs = [f"org_{i}" for i in range(40)]
    lago = PeriodLago(clock, limit=10)
    gate = stub_gate(lago, clock, redis, cold_timeout=0.5)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        for org in orgs:  # March: 10 of 10 used
            for _ in range(10):
                assert (await gate.check(org)).allowed
            assert not (await gate.check(org)).allowed
        await settled(gate)
        clock.at = APRIL + dt.timedelta(seconds=2)
        lago.hold = anyio.Event()
        answered = len(lago.answered)
        waits, fail_open, fail_closed = gate.stats["cold_waits"], gate.stats["fail_open"], gate.stats["fail_closed"]
        decisions: dict[str, QuotaDecision] = {}

        async def one(org: str) -> None:
            decisions[org] = await gate.check(org)

        async with anyio.create_task_group() as burst:
            for org in orgs:
                burst.start_soon(one, org)
        assert (gate.stats["cold_waits"] - waits, gate.stats["fail_open"] - fail_open) == (0, 0)
        assert gate.stats["fail_closed"] == fail_closed
        assert len(lago.answered) == answered  # decided without any Lago answer
        reset = str(int(MAY - clock.time()))
        for org in orgs:
            decision = decisions[org]
            assert decision.allowed, (org, decision.problem)
            assert headers(decision) == {"ratelimit-limit": "10", "ratelimit-remaining": "9", "ratelimit-reset": reset}
        for _ in range(9):  # April's limit holds on what was counted since the boundary
            assert (await gate.check("org_0")).allowed
        blocked = await gate.check("org_0")
        assert not blocked.allowed and blocked.problem is not None
        assert blocked.problem["period_start"] == "2026-04-01T00:00:00Z"
        assert blocked.problem["period_end"] == "2026-05-01T00:00:00Z"
        # Lago answers: the provisional snapshots are replaced by paced usage reads
        for org in orgs:
            lago.usage[(org, "april")] = 4
        lago.hold.set()
        await settled(gate)
        april_reads = lago.answered[answered:]
        assert sorted(april_reads) == sorted(("usage", org) for org in orgs), april_reads
        assert gate.stats["cold_waits"] == waits
        clock.advance(gate.config.settle_lag + 1)  # the 1 call since the boundary: in Lago's 4 by now
        snap = await stored(gate, "org_1")
        assert (snap.base_calls, snap.period_start, snap.period_end) == (4, APRIL.timestamp(), MAY)
        assert snap.requested_at >= APRIL.timestamp()
        tasks.cancel_scope.cancel()


async def test_the_rollover_refreshes_are_paced_background_ones(clock: Clock, redis: str | None) -> None:
    """The provisional snapshots' refreshes start at LAGO_QUOTA_REFRESH_RATE (here 10/s), as due ones, not all at
    once as cold ones (a request waiting for each): 30 orgs at the boundary, 10 refreshes begin, 10 more a second
    later; none is a cold refresh, and every request is decided meanwhile."""
    orgs = [f"org_{i}" for i in range(30)]
    lago = PeriodLago(clock, limit=10)
    gate = stub_gate(lago, clock, redis, cold_timeout=0.5, refresh_rate=10.0)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        for org in orgs:
            assert (await gate.check(org)).allowed
        await settled(gate)
        clock.at = APRIL + dt.timedelta(seconds=1)
        lago.hold = anyio.Event()
        waits = gate.stats["cold_waits"]
        for org in orgs:
            assert headers(await gate.check(org))["ratelimit-remaining"] == "9"
        assert (len(gate._refreshing), gate._cold_queued, gate.stats["cold_waits"] - waits) == (10, 0, 0)
        clock.advance(1)
        for org in orgs:
            assert headers(await gate.check(org))["ratelimit-remaining"] == "8"
        assert len(gate._refreshing) == 20
        lago.hold.set()
        await settled(gate)
        tasks.cancel_scope.cancel()


@needs_redis
async def test_two_workers_roll_over_one_fleet_snapshot_and_one_count(clock: Clock, redis_url: str) -> None:
    """Two workers (gates on one Redis) at the boundary: each rolls the fleet's March snapshot over in its CHECK
    script; the count is one (April: 1, then 2 of 3), and the real April snapshot stored by one worker is not
    overwritten by the other's rollover."""
    lago = PeriodLago(clock, limit=3)
    prefix = f"rollover:{uuid.uuid4().hex[:8]}:"
    first = stub_gate(lago, clock, redis_url, redis_prefix=prefix, cold_timeout=0.5)
    second = stub_gate(lago, clock, redis_url, redis_prefix=prefix, cold_timeout=0.5)
    assert (await first.check("org_1")).allowed
    assert (await second.check("org_1")).allowed  # both hold March's snapshot
    clock.at = APRIL + dt.timedelta(seconds=1)
    lago.hold = anyio.Event()
    answered = len(lago.answered)
    a = await first.check("org_1")
    b = await second.check("org_1")
    assert (headers(a)["ratelimit-remaining"], headers(b)["ratelimit-remaining"]) == ("2", "1")
    assert first.stats["cold_waits"] + second.stats["cold_waits"] == 1  # (the first request, in March)
    assert len(lago.answered) == answered
    lago.usage[("org_1", "april")] = 0
    lago.hold.set()
    await settled(first, second)
    real = await stored(first, "org_1")
    assert real.period_end == MAY and real.requested_at >= APRIL.timestamp()
    c = await first.check("org_1")
    d = await second.check("org_1")  # (its copy was the provisional one: the real one is sent back)
    assert headers(c)["ratelimit-remaining"] == "0" and not d.allowed
    assert (await stored(second, "org_1")).version == real.version


async def test_a_march_read_landing_after_the_boundary_keeps_aprils_count(clock: Clock, redis: str | None) -> None:
    """A refresh begun at 23:59:58 (Lago answers March) lands after the org rolled over into April and counted 3
    calls there: it must not put March's snapshot back (April's counters were reset to March's period, and lost)."""
    lago = PeriodLago(clock, limit=5)
    gate = stub_gate(lago, clock, redis, cold_timeout=0.5)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert (await gate.check("org_1")).allowed
        clock.at = APRIL - dt.timedelta(seconds=2)
        lago.hold = anyio.Event()
        begun = len(lago.begun)
        assert (await gate.check("org_1")).allowed  # due: its refresh begins (March), held
        while len(lago.begun) == begun:
            await anyio.lowlevel.checkpoint()
        clock.at = APRIL + dt.timedelta(seconds=1)
        decisions = [await gate.check("org_1") for _ in range(3)]
        assert [headers(d)["ratelimit-remaining"] for d in decisions] == ["4", "3", "2"]
        assert gate.stats["cold_waits"] == 1  # (its first request, in March)
        lago.hold.set()
        await settled(gate)
        decision = await gate.check("org_1")
        assert headers(decision)["ratelimit-remaining"] == "1", headers(decision)
        tasks.cancel_scope.cancel()


# ------------------------------------------------------------------------ 2. what is not passed provisionally


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """The emulator: org_1 on starter (5 calls per period), legacy (no entitlements) for a downgrade."""
    return seed(FakeLago(clock_jobs="boundary", api_key="k", clock=clock.now), starter_calls=5)


def emulator_gate(fake: FakeLago, lago: LagoClient, clock: Clock, redis: str | None, **config: Any) -> QuotaGate:
    settings = lago.settings.replace(redis_url=redis) if redis else lago.settings
    if redis:
        config["redis_prefix"] = f"rollover:{uuid.uuid4().hex[:8]}:"
    gate = QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)
    _OPEN.append(gate)
    return gate


def lago_reads(fake: FakeLago) -> int:
    return sum(1 for r in fake.requests if r.method == "GET")


async def test_the_emulators_rollover_is_provisional_then_real(fake: FakeLago, clock: Clock, redis: str | None) -> None:
    """End to end on the emulator: at 00:00:01 the request is answered from the provisional April snapshot (no Lago
    read, no cold wait; reset at 1 May); the paced refresh then stores Lago's April snapshot in its place."""
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, plan_limits={})
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = emulator_gate(fake, lago, clock, redis, cold_timeout=0.5)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            for _ in range(5):
                assert (await gate.check("org_1")).allowed
            assert not (await gate.check("org_1")).allowed
            await settled(gate)
            march = await stored(gate, "org_1")
            clock.at = APRIL + dt.timedelta(seconds=1)
            reads, waits = lago_reads(fake), gate.stats["cold_waits"]
            decision = await gate.check("org_1")
            assert (lago_reads(fake) - reads, gate.stats["cold_waits"] - waits, gate.stats["fail_open"]) == (0, 0, 0)
            assert decision.allowed
            assert headers(decision)["ratelimit-remaining"] == "4"
            assert headers(decision)["ratelimit-reset"] == str(int(MAY - clock.time()))
            await settled(gate)
            real = await stored(gate, "org_1")
            assert real.requested_at > march.requested_at and real.period_start == APRIL.timestamp()
            assert real.period_end == MAY
            assert lago_reads(fake) - reads >= 1
            assert headers(await gate.check("org_1"))["ratelimit-remaining"] == "3"
            tasks.cancel_scope.cancel()


async def test_a_subscription_ending_at_the_boundary_is_not_passed_provisionally(
    fake: FakeLago, clock: Clock, redis: str | None
) -> None:
    """ending_at = the period end: Lago terminates it there. The request at the boundary waits for Lago (a cold
    wait, as before) and is answered 402 (no active subscription), not allowed on a provisional April."""
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "starter", ending_at="2026-04-01T00:00:00Z")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = emulator_gate(fake, lago, clock, redis, cold_timeout=5.0)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            assert (await gate.check("org_2")).allowed
            await settled(gate)
            clock.at = APRIL + dt.timedelta(seconds=1)
            waits = gate.stats["cold_waits"]
            decision = await gate.check("org_2")
            assert gate.stats["cold_waits"] - waits == 1
            assert (decision.allowed, decision.status) == (False, 402)
            tasks.cancel_scope.cancel()


async def test_a_downgrade_switching_at_the_boundary_is_not_passed_provisionally(
    fake: FakeLago, clock: Clock, redis: str | None
) -> None:
    """A pending downgrade (starter 5 calls -> legacy 2 calls, LAGO_PLAN_LIMITS) switches at the boundary: the first
    April request waits for Lago and gets legacy's limit, not starter's on a provisional snapshot."""
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", max_retries=0, plan_limits={"legacy": {"max_api_calls": 2}}
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = emulator_gate(fake, lago, clock, redis, cold_timeout=5.0)
        fake.add_subscription("org_1", "legacy")  # cheaper: a downgrade at the period end
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            assert (await gate.check("org_1")).allowed
            await settled(gate)
            assert (await stored(gate, "org_1")).plan_code == "starter"
            clock.at = APRIL + dt.timedelta(seconds=1)
            waits = gate.stats["cold_waits"]
            decision = await gate.check("org_1")
            assert gate.stats["cold_waits"] - waits == 1
            assert headers(decision)["ratelimit-limit"] == "2"
            tasks.cancel_scope.cancel()


# ------------------------------------------------------------------------------ 3. fair share of refresh slots


async def test_due_refreshes_get_a_share_of_the_slots_while_cold_ones_wait(clock: Clock) -> None:
    """One refresh slot, held; 12 cold refreshes of made-up org ids (a spoofable header) and 3 due refreshes of real
    orgs queue behind it. Cold ones went first, every one of them: with a flood that never ends while Lago is slow,
    the real orgs' snapshots were never refreshed. Now every 4th freed slot goes to a due refresh when both wait."""
    lago = PeriodLago(clock)
    gate = stub_gate(lago, clock, max_concurrent_refreshes=1)
    real = ["real_0", "real_1", "real_2"]
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        for org in real:
            assert (await gate.check(org)).allowed
        await settled(gate)
        warm = len(lago.answered)
        lago.hold = anyio.Event()
        gate._schedule_refresh("blocker", clock.time(), urgent=True)
        while ("sub", "blocker") not in lago.begun:
            await anyio.lowlevel.checkpoint()
        fake_ids = [f"made_up_{i}" for i in range(12)]
        lago.missing.update(fake_ids)
        for org in fake_ids:
            gate._schedule_refresh(org, clock.time(), urgent=True)
        for org in real:
            gate._schedule_refresh(org, clock.time())  # due (as _refresh_due starts them)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert gate._slots.waiting == 15
        lago.hold.set()
        await settled(gate)
        tasks.cancel_scope.cancel()
    order = []
    for _kind, org in lago.answered[warm:]:
        if org != "blocker" and org not in order and (org in real or org in fake_ids):
            order.append(org)
    first_eight = order[:8]
    assert sum(org in real for org in first_eight) >= 2, order


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize(
    ("interval", "start", "end", "fields", "expected"),
    [
        ("monthly", "2026-03-01T05:00:00Z", "2026-04-01T04:00:00Z", {}, "2026-05-01T04:00:00Z"),  # New York
        ("monthly", "2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z", {}, "2026-03-31T00:00:00Z"),  # anniversary 31
        ("monthly", "2026-10-31T23:00:00Z", "2026-11-30T23:00:00Z", {}, "2026-12-31T23:00:00Z"),  # Paris
        ("monthly", "2026-03-15T00:00:00Z", "2026-04-01T00:00:00Z", {}, "2026-05-01T00:00:00Z"),  # begun mid-month
        ("weekly", "2026-03-23T00:00:00Z", "2026-03-30T00:00:00Z", {}, "2026-04-06T00:00:00Z"),
        ("quarterly", "2026-01-01T00:00:00Z", "2026-04-01T00:00:00Z", {}, "2026-07-01T00:00:00Z"),
        ("yearly", "2025-04-01T00:00:00Z", "2026-04-01T00:00:00Z", {}, "2027-04-01T00:00:00Z"),
        ("", "2026-03-10T00:00:00Z", "2026-03-17T00:00:00Z", {}, "2026-03-24T00:00:00Z"),  # the old length
        (
            "monthly",
            "2026-03-01T00:00:00Z",
            "2026-04-01T00:00:00Z",
            {"ending_at": "2026-04-15T00:00:00Z"},
            "2026-04-15T00:00:00Z",
        ),
        ("monthly", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", {"ending_at": "2026-04-01T00:00:00Z"}, None),
        ("monthly", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", {"next_plan_code": "legacy"}, None),
    ],
)
async def test_the_next_periods_end_is_estimated_from_the_interval(
    interval: str, start: str, end: str, fields: dict[str, str], expected: str | None
) -> None:
    from lago_org_billing._periods import next_period_end

    snap = Snapshot(
        active=True,
        interval=interval,
        period_start=_ts(start),
        period_end=_ts(end),
        ending_at=_ts(fields["ending_at"]) if "ending_at" in fields else 0.0,
        next_plan_code=fields.get("next_plan_code"),
    )
    assert next_period_end(snap) == (_ts(expected) if expected else 0.0)
    assert next_period_end(Snapshot(active=False, period_start=snap.period_start, period_end=snap.period_end)) == 0.0


@pytest.mark.parametrize(
    "zone",
    [
        "UTC",
        "Europe/Paris",
        "America/New_York",
        "America/Los_Angeles",
        "Asia/Kathmandu",
        "Asia/Tokyo",
        "Pacific/Auckland",
        "Pacific/Tongatapu",
        "Pacific/Honolulu",
    ],
)
@pytest.mark.parametrize("billing_time", ["calendar", "anniversary"])
@pytest.mark.parametrize("interval", ["monthly", "quarterly", "yearly"])
async def test_the_estimate_is_lagos_next_period_in_every_zone_and_billing_day(
    zone: str, billing_time: str, interval: str
) -> None:
    """Lago's periods (the emulator's arithmetic: the customer's time zone, a billing day clipped to short months),
    billing days 1 to 31 over more than a year: each period's estimated successor is Lago's next period, exactly
    when both ends share a UTC offset (an hour off across a DST change: the refresh reads Lago within minutes)."""
    from zoneinfo import ZoneInfo

    from lago_org_billing._periods import next_period_end
    from lago_org_billing.testing._util import billing_period

    tz = ZoneInfo(zone)
    checked = 0
    for anchor_day in (1, 15, 28, 29, 30, 31):
        anchor = dt.datetime(2027, 1, anchor_day, 9, tzinfo=tz)
        at = anchor
        for _ in range(15 if interval == "monthly" else 6):
            start, last = billing_period(interval, billing_time, anchor, at, tz)
            end = last + dt.timedelta(seconds=1)
            following = billing_period(interval, billing_time, anchor, end, tz)[1] + dt.timedelta(seconds=1)
            snap = Snapshot(active=True, interval=interval, period_start=start.timestamp(), period_end=end.timestamp())
            estimate = next_period_end(snap)
            if end.astimezone(tz).utcoffset() == following.astimezone(tz).utcoffset():
                assert estimate == following.timestamp(), (anchor_day, start, end, following)
                checked += 1
            else:
                assert abs(estimate - following.timestamp()) == 3600, (anchor_day, start, end, following)
            at = end
    assert checked >= 12
