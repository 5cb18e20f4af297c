"""Usage recorded around a subscription's start (``started_at`` later today: Lago ignores the events dated before it)
counts alike in process and with Redis: nothing recorded before the start counts in its period (undated before it,
or dated before it and recorded after it), what is recorded from the start counts, before the org's first check too.

1. Through the gate, on the emulator: ``OrgBilling.record_api_call`` around the start, then the org's checks.
2. Backend against backend: ``LocalBackend`` and ``RedisBackend`` on a real redis-server driven alike (the
   differential of ``test_quota_redis_scripts_reviewed``), named cases and seeded sequences around a start; and the
   records a worker of the previous release leaves in Redis.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid

import pytest

from _quota_app import REDIS_SERVER, Clock, metric_and_feature
from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBilling
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import encode
from lago_org_billing._snapshots import ALLOWED, NOT_STARTED
from lago_org_billing.testing import FakeLago
from test_quota_redis_scripts_reviewed import APRIL, MAY, ORG, Call, period, redis_counts, shared_step, twins

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


# ------------------------------------------------------------------- 1. through the gate, on the emulator


async def _late_start(redis: str | None, record: list[tuple[dt.datetime, dt.datetime | None]]) -> list[bool]:
    """org_1 subscribed at 17:00 with ``subscription_at`` 18:00 (2 calls a period), read at 17:59:00; the app records
    an API call at each (clock time, event timestamp) of ``record``; at 18:00:10 three calls are checked (and
    billed): whether each was let through."""
    clock = Clock(dt.datetime(2026, 3, 10, 17, 0, tzinfo=UTC))
    fake = FakeLago(api_key="k", clock=clock.now)
    limits = {"max_api_calls": 2, "max_tokens": 1_000}
    fake.add_plan("pro", amount_cents=1_000, charges=[metric_and_feature(fake)], entitlements={"api_quota": limits})
    fake.add_customer(ORG)
    fake.add_subscription(ORG, "pro", subscription_at="2026-03-10T18:00:00Z")
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", max_retries=0, redis_url=redis, usage_cache_ttl=300.0
    )
    config = QuotaConfig(redis_prefix=f"late:{uuid.uuid4().hex[:8]}:", jitter=0.0, cold_timeout=30.0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        gate = QuotaGate(settings, client, config=config, clock=clock.time)
        pipeline = EventPipeline(client)
        billing = OrgBilling(client=client, quota=gate, pipeline=pipeline)
        try:
            clock.at = dt.datetime(2026, 3, 10, 17, 59, tzinfo=UTC)
            assert (await gate.enforce_usage_limits(ORG))["usage"]["max_api_calls"] == 0  # (read: not started)
            for n, (at, timestamp) in enumerate(record):
                clock.at = at
                await billing.record_api_call(ORG, f"tx_{n}", tokens=10, timestamp=timestamp)
            clock.at = dt.datetime(2026, 3, 10, 18, 0, 10, tzinfo=UTC)
            flush = getattr(gate.backend, "flush", None)
            if flush is not None:
                await flush()
            served = []
            for _ in range(3):
                decision = await gate.check(ORG)
                if decision.allowed:
                    gate.settle(ORG, decision, tokens=0, billed=True)
                served.append(decision.allowed)
            return served
        finally:
            await pipeline.aclose()
            await gate.aclose()


async def test_usage_recorded_before_a_subscriptions_start_is_not_counted_from_its_start(redis: str | None) -> None:
    """Two API calls the app recorded at 17:59:30 (dated then: Lago ignores them, the subscription starts at 18:00)
    are not counted against the 2 calls of the period: the org's first two calls from 18:00 are served, the third
    refused. With Redis, the first check from 18:00 took the records made before it (a counter of no period) into
    the period: the org was refused at once, until the next read of Lago."""
    early = dt.datetime(2026, 3, 10, 17, 59, 30, tzinfo=UTC)
    assert await _late_start(redis, [(early, None), (early, None)]) == [True, True, False]


async def test_usage_dated_before_a_subscriptions_start_is_not_counted_when_recorded_after_it(
    redis: str | None,
) -> None:
    """An API call recorded at 18:00:05 with the timestamp 17:59:50 (before the subscription's start: Lago ignores
    it) is not counted; the org's first two calls from 18:00 are served. With Redis, a counter of no period took it
    (the org's counter was dropped while its period had not started), which the first check then took in."""
    at = dt.datetime(2026, 3, 10, 18, 0, 5, tzinfo=UTC)
    dated = dt.datetime(2026, 3, 10, 17, 59, 50, tzinfo=UTC)
    assert await _late_start(redis, [(at, dated), (at, dated)]) == [True, True, False]


async def test_usage_recorded_from_a_subscriptions_start_counts_before_its_first_check(redis: str | None) -> None:
    """An API call the app recorded at 18:00:05 (dated then: Lago bills it), before the org's first check since its
    subscription started at 18:00, counts: one more call is served, the next refused. In process, the records kept
    while the period had not started were dropped at that first check, this one with them (under-counted until the
    next read of Lago)."""
    at = dt.datetime(2026, 3, 10, 18, 0, 5, tzinfo=UTC)
    assert await _late_start(redis, [(at, None)]) == [True, False, False]


# ------------------------------------------------------------------- 2. backend against backend


@needs_redis
async def test_usage_recorded_before_the_periods_start_is_dropped_on_both_backends(redis_url: str) -> None:
    """Records made while the stored snapshot's period has not started (undated: before it; dated before it, made
    after it) are not counted by either backend from its start; those dated from it (or made from it, undated) are,
    the call checked then with them."""
    async with twins(redis_url, APRIL - 600) as w:
        await w.store(period(APRIL, MAY, APRIL - 600, "v1"))
        mine, theirs = await w.reserve("normal")
        assert (mine.code, mine.period) == (theirs.code, theirs.period) == (ALLOWED, NOT_STARTED)
        w.now = APRIL - 30
        w.settle(("", ""), None, tokens=5, billed=True)  # (record_usage, dated now: before the start)
        w.settle(("", ""), None, tokens=5, billed=True, checked=int(APRIL - 30))
        w.now = APRIL + 2
        w.settle(("", ""), None, tokens=7, billed=True, checked=int(APRIL - 1))  # (dated before the start)
        w.settle(("", ""), None, tokens=11, billed=True, checked=int(APRIL))  # (dated at the start)
        w.settle(("", ""), None, tokens=13, billed=True)  # (dated now)
        await w.red.flush()  # (the settles written, as the backend's writer does)
        w.now = APRIL + 3
        mine, theirs = await w.reserve("normal")
        assert (mine.code, mine.calls, mine.tokens) == (theirs.code, theirs.calls, theirs.tokens) == (ALLOWED, 3, 24)
        await w.compare()


@needs_redis
async def test_records_made_before_the_period_kept_by_a_previous_release_are_dropped_at_the_first_check(
    redis_url: str,
) -> None:
    """Usage recorded before the period began, in a counter of no period (the org not read yet), which a worker of
    the previous release left there when it stored the period's snapshot (its STORE does not take such a counter in),
    is dropped by the first check (it took it into the period: 2 calls and their tokens counted that Lago bills in
    none), as this release's STORE drops it; the call let through then, still in flight, is left to its settle."""
    async with twins(redis_url, APRIL - 30) as w:
        red = w.red
        blind = await red.reserve(ORG, w.now, "blind", None)  # (no snapshot: Lago's reads failing, LAGO_FAIL_OPEN)
        # what the previous release's SETTLE leaves, recording usage without a check now: records of no period
        count = red.key(ORG, "count")
        second = str(int(APRIL - 30))
        await red.redis.hset(count, mapping={"c:" + second: 2, "t:" + second: 9})
        await red.redis.hincrby(count, "calls", 2)
        await red.redis.hincrby(count, "tokens", 9)
        # and its STORE of the period's snapshot, read once it began: the counter as it was (no period)
        april = period(APRIL, MAY, APRIL + 1, "v1")
        await red.redis.hset(red.key(ORG, "snap"), mapping=dict(zip(*[iter(encode(april))] * 2, strict=True)))
        w.now = APRIL + 2
        outcome = await red.reserve(ORG, w.now, "normal", None)
        assert (outcome.code, outcome.calls, outcome.tokens) == (ALLOWED, 2, 0)
        assert await redis_counts(red) == (repr(APRIL), 2, 0, {blind.bucket: 1, int(APRIL + 2): 1})


#: What a step of a sequence around a late start does (a store is a refresh for the check that follows it)
STEPS = ("store", "reserve", "reserve", "settle", "settle", "tokens", "unchecked", "dated", "invalidate", "tick")
STEPS += ("jump",)


async def run_late_start(seed: int, redis_url: str) -> None:
    """One seeded sequence around the start of a subscription starting later today (April's first period starts
    at ``APRIL``): snapshots read before and after the start, checks, settles, usage recorded undated and dated."""
    rng = random.Random(seed)
    async with twins(redis_url, APRIL - rng.choice([600, 30, 3])) as w:
        in_flight: list[Call] = []
        billed: list[Call] = []
        last_read = 0.0
        for step in range(60):
            op = rng.choice(STEPS)
            if op == "store":
                read = max(last_read, w.now - rng.choice([0, 0, 1, 3]))
                last_read = read
                await w.store(period(APRIL, MAY, read, f"v{step}"))
            await shared_step(w, op, rng, in_flight, billed, dated_ago=(0, 2, 9, 60))
            if op == "jump":
                w.now = max(w.now, rng.choice([APRIL - 5, APRIL - 1, APRIL, APRIL + 0.5, APRIL + 6]))
            await w.compare()
        for call in in_flight:
            w.settle(call.periods, call.bucket, tokens=0, billed=False)
        w.now = max(w.now, APRIL + 1)
        _, _, _, left = await w.compare()
        assert not left, "\n".join(w.log[-40:])


@needs_redis
@pytest.mark.parametrize("seed", [*range(30), 180, 229])
async def test_both_backends_count_alike_around_a_late_start_in_seeded_sequences(redis_url: str, seed: int) -> None:
    """Both backends, given the same stores, checks, settles and usage records (undated, dated) around the start of
    a subscription starting later today, and invalidations, count the same calls, tokens and calls in flight at each
    step (seeds 180 and 229: a record dated before the start, made after it once the org was invalidated)."""
    await run_late_start(seed, redis_url)
