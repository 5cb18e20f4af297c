"""A block that rests on records Lago may already have counted.

A snapshot requested at ``T`` keeps the calls recorded in the ``settle_lag`` seconds before ``T`` (Lago may not have
them yet: never under-count). When Lago did have them, they are counted twice until the next refresh: an org near its
limit was answered 429 below it, with ``Retry-After`` telling the client to come back at the period's end (days), and
the block lasted a whole TTL however the client retried. Now the snapshot knows how much of its count is unsure; a
block that holds only with those records says so (``Retry-After``: seconds, until they can be trusted to Lago), and a
request past that point has the org read again and is decided on the new read.

A stub Lago (usage set by the test, as the delivered events make it), a settable clock, both backends.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _quota_app import START, Clock, needs_redis, subscription_answer
from lago_org_billing import BillingSettings, _quota
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate

pytestmark = pytest.mark.anyio

PERIOD_END = dt.datetime(2026, 4, 1, tzinfo=dt.timezone.utc).timestamp()


class StubLago:
    """Lago's two reads for an org on a plan of ``limit`` calls; ``usage``: the events Lago has counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.usage = 0
        self.usage_reads = 0

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        period = ("2026-03-01T00:00:00Z", "2026-03-31T23:59:59Z")
        return subscription_answer(external_id, period, [{"code": "max_api_calls", "value": self.limit}])

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        self.usage_reads += 1
        return {
            "from_datetime": "2026-03-01T00:00:00Z",
            "to_datetime": "2026-03-31T23:59:59Z",
            "charges_usage": [
                {
                    "billable_metric": {"code": "api_call", "aggregation_type": "sum_agg"},
                    "events_count": self.usage,
                    "units": "0",
                }
            ],
        }


@pytest.fixture
async def setup(redis: str | None, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[QuotaGate, StubLago, Clock]]:
    """A gate whose snapshots are due exactly a TTL (30 s) after their read (no jitter, first ones included)."""
    monkeypatch.setattr(_quota, "_FIRST_SPREAD", 0.0)
    clock = Clock(START)
    lago = StubLago(limit=5)
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=redis)
    config = QuotaConfig(jitter=0.0, **({"redis_prefix": f"unsure:{uuid.uuid4().hex[:8]}:"} if redis else {}))
    gate = QuotaGate(settings, lago, config=config, clock=clock.time)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        yield gate, lago, clock
        tasks.cancel_scope.cancel()
    await gate.aclose()


def headers(decision: QuotaDecision) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in decision.headers}


async def settled(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


async def call(gate: QuotaGate, lago: StubLago) -> QuotaDecision:
    """One request: decided, and when allowed billed (its event reaches Lago at once)."""
    decision = await gate.check("org_1")
    if decision.allowed:
        gate.settle("org_1", decision, tokens=0, billed=True)
        lago.usage += 1
        flush = getattr(gate.backend, "flush", None)
        if flush is not None:
            await flush()
    return decision


async def test_a_block_on_records_lago_may_have_counted_is_short_and_read_again(
    setup: tuple[QuotaGate, StubLago, Clock],
) -> None:
    """Limit 5. One call at T, two at T+28 (every event in Lago at once). At T+31 the stale snapshot is refreshed
    while a fourth call runs: Lago has 3, and the two calls of T+28 are kept (recorded 3 s before the read), so the
    gate counts 6 where Lago will count 4. The fifth call, at T+32, is refused below the limit: its 429 asks the
    client back in 5 s (when a read keeps none of the records of T+31's second or before: trusted to Lago), not at the
    period's end.
    Past that point the org is read again before the answer, until the count holds only what Lago cannot have yet:
    the fifth call is allowed, and the sixth refused for the period, as Lago's count says."""
    gate, lago, clock = setup
    assert (await call(gate, lago)).allowed
    clock.advance(28)
    assert (await call(gate, lago)).allowed and (await call(gate, lago)).allowed
    clock.advance(3)
    fourth = await gate.check("org_1")  # stale: read again in the background, the call in flight meanwhile
    assert fourth.allowed
    await settled(gate)
    gate.settle("org_1", fourth, tokens=0, billed=True)
    lago.usage += 1
    if hasattr(gate.backend, "flush"):
        await gate.backend.flush()
    assert lago.usage_reads == 2

    clock.advance(1)  # T+32: Lago has 4 of 5
    early = await call(gate, lago)
    assert not early.allowed
    assert headers(early)["retry-after"] == "5"  # not the period's end
    assert early.problem is not None and early.problem["retry_after"] == 5
    assert "may be lower than counted here: retry in 5 s" in early.problem["detail"]
    assert headers(early)["ratelimit-reset"] == str(math.ceil(PERIOD_END - clock.time()))
    assert lago.usage_reads == 2  # too early for a read to tell more

    allowed: list[QuotaDecision] = []
    for _ in range(3):  # every 5 s, as the answers ask
        clock.advance(int(headers(early)["retry-after"]) if not allowed else 5)
        decision = await call(gate, lago)
        if decision.allowed:
            allowed.append(decision)
            break
        early = decision
        assert int(headers(decision)["retry-after"]) <= 5
    assert len(allowed) == 1  # the fifth call
    assert lago.usage == 5

    sixth = await call(gate, lago)
    assert not sixth.allowed
    assert sixth.problem is not None and "may be lower" not in sixth.problem["detail"]
    assert headers(sixth)["retry-after"] == str(math.ceil(PERIOD_END - clock.time()))  # truly at the limit
    reads = lago.usage_reads
    clock.advance(6)
    assert not (await call(gate, lago)).allowed
    assert lago.usage_reads == reads  # a sure block reads nothing early


async def test_calls_in_flight_and_records_after_the_read_block_for_the_period(
    setup: tuple[QuotaGate, StubLago, Clock],
) -> None:
    """Records Lago cannot have (in flight, or made after the read) make a sure block: Retry-After is the period's
    end, and no early read is made however long the client keeps asking."""
    gate, lago, clock = setup
    running = [await gate.check("org_1") for _ in range(5)]  # five long calls, in flight
    assert all(decision.allowed for decision in running)
    blocked = await gate.check("org_1")
    assert not blocked.allowed
    assert headers(blocked)["retry-after"] == str(math.ceil(PERIOD_END - clock.time()))
    reads = lago.usage_reads
    for _ in range(3):
        clock.advance(6)
        assert not (await gate.check("org_1")).allowed
    assert lago.usage_reads == reads


@needs_redis
async def test_with_redis_one_gate_of_the_fleet_reads_an_unsure_block_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gates (two workers) share Redis. The scenario of the first test: once the unsure records can be trusted,
    both workers' blocked requests come in; the org is read again once for the fleet (the lock freed for that
    snapshot only), and both decide on that read."""
    monkeypatch.setattr(_quota, "_FIRST_SPREAD", 0.0)
    clock = Clock(START)
    lago = StubLago(limit=5)
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=redis_url)
    config = QuotaConfig(jitter=0.0, redis_prefix=f"unsure:{uuid.uuid4().hex[:8]}:")
    gates = [QuotaGate(settings, lago, config=config, clock=clock.time) for _ in range(2)]  # type: ignore[arg-type]
    first, second = gates
    async with anyio.create_task_group() as tasks:
        for gate in gates:
            await tasks.start(gate.run)
        assert (await call(first, lago)).allowed
        clock.advance(28)
        assert (await call(first, lago)).allowed and (await call(second, lago)).allowed
        clock.advance(3)
        fourth = await first.check("org_1")
        assert fourth.allowed
        await settled(first)
        first.settle("org_1", fourth, tokens=0, billed=True)
        lago.usage += 1
        await first.backend.flush()  # type: ignore[attr-defined]
        reads = lago.usage_reads
        clock.advance(1)
        assert [headers(await gate.check("org_1"))["retry-after"] for gate in gates] == ["5", "5"]
        clock.advance(5)
        decisions: list[QuotaDecision] = []

        async def one(gate: QuotaGate) -> None:
            decisions.append(await gate.check("org_1"))

        async with anyio.create_task_group() as burst:
            for gate in gates:
                burst.start_soon(one, gate)
        assert lago.usage_reads == reads + 1  # once for the fleet
        assert sorted(decision.allowed for decision in decisions) == [False, True]  # the fifth call, once
        tasks.cancel_scope.cancel()
    for gate in gates:
        await gate.aclose()
