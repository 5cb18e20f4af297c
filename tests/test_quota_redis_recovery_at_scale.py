"""Quota counting when Redis answers again after an outage (a real ``redis-server`` on 127.0.0.1, stopped and started
again with its data, as after a crash or a failover), at fleet scale.

1. Calls decided on a worker's fallback during the outage and still running when Redis answers again were handed to
   Redis as *finished* (recorded) calls: the next snapshots dropped them once ``settle_lag`` had passed, so a long
   stream stayed uncounted until its event reached Lago (over-admission); and one released afterwards (unbilled: a
   5xx) stayed counted, blocking the org until a refresh. They are now handed over in flight, and settled in Redis.
2. The merge of the outage's records, one round trip per org, while a check of any org among them waited for the
   whole of it (then, its time up, decided the org with nothing known of it: its records already handed over). A
   check now merges its own org's records itself, and waits for nobody else's.

A settable wall clock for the gates and the emulator, a settable monotonic clock for the backend's retries; merges
held on events; counts and decisions only, no sleeps as synchronisation.
"""

# ruff: noqa: F811 (test_quota_redis_recovery's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from _quota_app import REDIS_SERVER
from lago_org_billing._quota import QuotaGate
from test_quota_redis_recovery import (  # noqa: F401 (its fixtures)
    Fleet,
    backend_of,
    client,
    clock,
    fake,
    fleet,
    port,
    redis_dir,
    served,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


async def _known(fleet: Fleet, gate: QuotaGate, *orgs: str) -> None:
    """The orgs' snapshots stored in Redis, nothing used; then Redis stops (with that data saved)."""
    for org_id in orgs:
        await gate.enforce_usage_limits(org_id)
    await backend_of(gate).flush()
    await fleet.save()


async def _refreshed(fleet: Fleet, gate: QuotaGate, org_id: str) -> None:
    """``settle_lag`` (and a second) later, the org's snapshot is read again from Lago (which counted nothing)."""
    fleet.clock.advance(gate.config.settle_lag + 1)
    await gate.invalidate(org_id)
    await gate.snapshot(org_id)


# ------------------------------------------------------------------- 1. calls in flight when Redis answers again


async def test_calls_in_flight_when_redis_answers_again_stay_counted_past_settle_lag(fleet: Fleet) -> None:
    """Limit 3. Redis down: two long calls (streams) of org_1 start on the fallback. Redis answers again and their
    records are handed to it; Lago's usage is read again twice, ``settle_lag`` apart, while they still run: they were
    dropped as finished calls Lago had counted (usage 0), and three more calls were let through (5 running on a
    3-call plan). Held in flight, they count until they end: one more call, then 429."""
    with fleet.up():
        gate = fleet.gate()
        await _known(fleet, gate, "org_1", "org_2")
    streams = [await gate.check("org_1") for _ in range(2)]  # Redis down: decided here, still running
    assert all(d.allowed for d in streams) and backend_of(gate).stats["redis_fallback"] == 1
    with fleet.up():
        fleet.retry_due()
        await served(gate, "org_2")  # Redis answers again: the fallback's records are handed to it
        assert backend_of(gate).stats["redis_fallback"] == 0
        for _ in range(2):
            await _refreshed(fleet, gate, "org_1")
        status = await gate.enforce_usage_limits("org_1")
        decisions = [await gate.check("org_1") for _ in range(2)]
        for decision in streams:  # the streams end, billed
            gate.settle("org_1", decision, tokens=0, billed=True)
        await backend_of(gate).flush()
        ended = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert status["usage"]["max_api_calls"] == 2
    assert [d.allowed for d in decisions] == [True, False]
    assert ended["usage"]["max_api_calls"] == 3  # the two streams, now recorded, and the call allowed after them


async def test_calls_handed_to_redis_in_flight_and_then_released_are_no_longer_counted(fleet: Fleet) -> None:
    """Limit 3. Redis down: three calls of org_1 start on the fallback (the whole plan). Redis answers again (their
    records handed to it), then all three fail (5xx: released, not billed). They stayed counted in Redis as finished
    calls: the org was refused (429) until a refresh, ``settle_lag`` later. Now the next call is allowed."""
    with fleet.up():
        gate = fleet.gate()
        await _known(fleet, gate, "org_1", "org_2")
    failing = [await gate.check("org_1") for _ in range(3)]
    assert all(d.allowed for d in failing)
    with fleet.up():
        fleet.retry_due()
        await served(gate, "org_2")  # Redis answers again: the fallback's records are handed to it
        for decision in failing:
            gate.settle("org_1", decision, tokens=0, billed=False)
        after = await gate.check("org_1")
        gate.settle("org_1", after, tokens=0, billed=True)
        await backend_of(gate).flush()
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert after.allowed
    assert status["usage"]["max_api_calls"] == 1


async def test_tokens_of_a_call_handed_over_in_flight_are_counted_in_redis(fleet: Fleet) -> None:
    """Limit 10 tokens. A call decided on the fallback, handed to Redis in flight, ends with 10 tokens: counted in
    Redis (the org refused next), and its call recorded once."""
    with fleet.up():
        gate = fleet.gate()
        await _known(fleet, gate, "org_1", "org_2")
    during = await gate.check("org_1")
    with fleet.up():
        fleet.retry_due()
        await served(gate, "org_2")
        gate.settle("org_1", during, tokens=10, billed=True)
        await backend_of(gate).flush()
        blocked = await gate.check("org_1")
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert (blocked.allowed, blocked.status) == (False, 429)
    assert (status["usage"]["max_api_calls"], status["usage"]["max_tokens"]) == (1, 10)


async def test_a_call_in_flight_whose_merge_was_lost_is_counted_once_however_it_ends(fleet: Fleet) -> None:
    """Limit 3. Redis down: two calls of org_1 start here. Redis answers again; the merge of their records is applied
    but its answer lost (a socket timeout): they are taken back, and the first one ends meanwhile, failing (released
    here). The next merge adds only what the lost one left: one call in flight in Redis, no more (two more calls
    allowed, then 429); the second one, ending billed, is recorded there once."""
    from redis import exceptions as redis_exceptions

    with fleet.up():
        gate = fleet.gate()
        await _known(fleet, gate, "org_1", "org_2")
    first, second = [await gate.check("org_1") for _ in range(2)]
    backend = backend_of(gate)
    with fleet.up():
        original = backend._merge
        lost = [1]

        async def applied_then_lost(**kwargs: Any) -> Any:
            result = await original(**kwargs)  # Redis ran the script
            if lost:
                lost.pop()
                raise redis_exceptions.TimeoutError("Timeout reading from socket")
            return result

        backend._merge = applied_then_lost  # type: ignore[method-assign]
        fleet.retry_due()
        await gate.check("org_2")  # its merge lost: the records taken back
        assert not lost and backend.stats["redis_fallback"] == 1
        gate.settle("org_1", first, tokens=0, billed=False)  # (held here again: released here)
        fleet.retry_due()
        decisions = [await gate.check("org_1") for _ in range(3)]  # merged again, then decided in Redis
        gate.settle("org_1", second, tokens=0, billed=True)
        for decision in decisions:
            gate.settle("org_1", decision, tokens=0, billed=False)
        await backend.flush()
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert backend.stats["redis_fallback"] == 0
    assert [d.allowed for d in decisions] == [True, True, False]
    assert status["usage"]["max_api_calls"] == 1


# ------------------------------------------------------------------- 2. a slow merge of many orgs


async def test_a_check_does_not_wait_for_the_merge_of_other_orgs(fleet: Fleet) -> None:
    """Limit 3. Redis down: two calls of org_1 served here, and one of org_2. Redis answers again: a check of org_2
    starts handing the outage's records over, and the hand-over of org_2's is slow (held; at fleet scale: thousands
    of orgs merged one round trip at a time). A check of org_1 meanwhile waited for the whole merge (redis_timeout),
    then decided org_1 with nothing known of it (its records handed over already): the plan's 3 calls let through
    again. It now merges org_1's records itself: one call more (3), then 429, at once."""
    with fleet.up():
        gate = fleet.gate()
        await _known(fleet, gate, "org_1", "org_2")
    for _ in range(2):
        await served(gate)
    await served(gate, "org_2")
    backend = backend_of(gate)
    with fleet.up():
        fleet.retry_due()
        original = backend._merge
        slow_org = backend.key("org_2", "count")
        held, release = asyncio.Event(), asyncio.Event()
        cut: list[str] = []

        async def slow(**kwargs: Any) -> Any:
            if kwargs["keys"][0] == slow_org:
                held.set()
                try:
                    await release.wait()
                except asyncio.CancelledError:  # (its time, redis_timeout, is up)
                    cut.append("org_2")
                    raise
            return await original(**kwargs)

        backend._merge = slow  # type: ignore[method-assign]
        other = asyncio.ensure_future(gate.check("org_2"))
        await held.wait()
        decisions: list[Any] = []
        for _ in range(3):
            decision = await gate.check("org_1")
            decisions.append(decision)
            if decision.allowed:
                gate.settle("org_1", decision, tokens=0, billed=True)
        waited = bool(cut)  # org_2's merge was still held (not cut off) when org_1 was decided, or not
        release.set()
        await other
        backend._merge = original  # type: ignore[method-assign]
        await backend.flush()
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert not waited, "the checks of org_1 waited for the merge of org_2's records (until it was cut off)"
    assert [d.allowed for d in decisions] == [True, False, False]
    assert status["usage"]["max_api_calls"] == 3
    assert backend.stats["redis_fallback"] == 0


async def test_the_outage_records_of_many_orgs_are_all_merged_once(fleet: Fleet) -> None:
    """400 orgs with a call each on the fallback (and org_1 two): Redis answers again, the background writer hands
    them over; each is counted once in Redis, and the gauge is back to 0."""
    with fleet.up():
        gate = fleet.gate()
        await _known(fleet, gate, "org_1", "org_2")
    backend = backend_of(gate)
    await served(gate)
    await served(gate)
    seeded = backend.fallback.peek_snapshot("org_1")
    assert seeded is not None
    orgs = [f"bulk_{i}" for i in range(400)]
    for org_id in orgs:
        backend.fallback.seed(org_id, seeded)
        backend.fallback.settle(org_id, "", None, fleet.clock.time(), tokens=1, billed=True)
    with fleet.up():
        fleet.retry_due()
        await backend.flush()
        counts = [int(await backend.redis.hget(backend.key(o, "count"), "calls") or 0) for o in orgs]
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert backend.stats["redis_fallback"] == 0
    assert counts == [1] * len(orgs)
    assert status["usage"]["max_api_calls"] == 2
