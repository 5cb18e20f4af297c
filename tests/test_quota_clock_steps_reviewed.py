"""The clock-step rules, checked again (``CLOCK_STEP``): the Redis STORE and LOCK scripts' renumbered arguments, the
paths of each script, the rules' false positives in normal operation (long TTLs, workers' clocks a little apart),
and backoffs stamped on a clock stepped back since."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from _quota_app import Clock, needs_redis
from lago_org_billing import BillingSettings
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_local import LocalBackend
from lago_org_billing._quota_redis import RedisBackend, decode, encode
from lago_org_billing._snapshots import CLOCK_STEP, Snapshot
from test_quota_clock_steps import HOURS_2, T0, HostLago, call, flushed, no_redis_errors, refreshed, settled

pytestmark = pytest.mark.anyio


NOW = T0.timestamp()
MARCH = (
    dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc).timestamp(),
    dt.datetime(2026, 4, 1, tzinfo=dt.timezone.utc).timestamp(),
)
FEBRUARY = (dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc).timestamp(), MARCH[0])

_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
async def _close() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


def gate_on(lago: HostLago, clock: Clock, redis: str | None, *, ttl: float = 30.0, **config: Any) -> QuotaGate:
    settings = BillingSettings(
        api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=redis, usage_cache_ttl=ttl
    )
    if redis:
        config.setdefault("redis_prefix", f"rrclock:{uuid.uuid4().hex[:8]}:")
    gate = QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]
    _OPEN.append(gate)
    return gate


def backend_on(url: str, prefix: str, **config: Any) -> RedisBackend:
    # (a healthy Redis, however loaded the machine: past the 2 s default, a call counts as an outage)
    backend = RedisBackend(url, QuotaConfig(**{"redis_prefix": prefix, "redis_timeout": 30.0, **config}))
    _OPEN.append(backend)
    return backend


def snap(requested_at: float, period: tuple[float, float] = MARCH, **fields: Any) -> Snapshot:
    values: dict[str, Any] = {
        "active": True,
        "plan_code": "starter",
        "customer_id": "org_1",
        "calls_limit": 100,
        "period_start": period[0],
        "period_end": period[1],
        "base_calls": 7,
        "requested_at": requested_at,
        "fetched_at": requested_at,
        "plan_fetched_at": requested_at,
        "refresh_at": requested_at + 30,
        "version": f"v{requested_at!r}",
    }
    return Snapshot(**{**values, **fields})


async def stored(backend: RedisBackend, org: str) -> dict[str, str]:
    raw = await backend.redis.hgetall(backend.key(org, "snap"))
    return {k.decode(): v.decode() for k, v in raw.items()}


# ------------------------------------------------------------------------ 1. the STORE script's paths


@needs_redis
async def test_store_script_stores_a_newer_read_field_for_field(redis_url: str) -> None:
    """ARGV[16...] are the snapshot's HSET pairs: the stored hash is exactly ``encode(snapshot)`` (no argument of
    13..15 taken as a field, none of the snapshot's lost) plus the unsure records the script found (``uc``/``ut``:
    none here), and a newer read replaces an older one."""
    backend = backend_on(redis_url, f"rr:{uuid.uuid4().hex[:8]}:")
    first, newer = snap(NOW - 10), snap(NOW, base_calls=9)
    assert await backend.store("org_1", first, NOW - 10)
    assert await backend.store("org_1", newer, NOW)
    pairs = encode(newer)
    assert await stored(backend, "org_1") == {**dict(zip(pairs[::2], pairs[1::2], strict=True)), "uc": "0", "ut": "0"}
    assert decode(await backend.redis.hgetall(backend.key("org_1", "snap"))) == newer
    assert backend.stats["redis_errors"] == 0


@needs_redis
async def test_store_script_refuses_an_older_read_even_from_a_worker_a_minute_ahead(redis_url: str) -> None:
    """An older read is refused (as before the clock-step rule), also when the stored one was requested by a worker
    whose clock is up to a minute ahead of this one's; one requested more than ``CLOCK_STEP`` ahead (a clock stepped
    back since) is replaced."""
    backend = backend_on(redis_url, f"rr:{uuid.uuid4().hex[:8]}:")
    ahead = snap(NOW + CLOCK_STEP - 1)
    assert await backend.store("org_1", ahead, NOW + CLOCK_STEP - 1)
    assert await backend.store("org_1", snap(NOW - 1), NOW)
    assert decode(await backend.redis.hgetall(backend.key("org_1", "snap"))) == ahead  # refused

    stepped = snap(NOW + HOURS_2)
    assert await backend.store("org_2", stepped, NOW + HOURS_2)
    newer = snap(NOW)
    assert await backend.store("org_2", newer, NOW)
    assert decode(await backend.redis.hgetall(backend.key("org_2", "snap"))) == newer  # replaced
    assert backend.stats["redis_errors"] == 0


@needs_redis
async def test_store_script_refuses_a_read_of_an_earlier_period_and_hands_its_lock_back(redis_url: str) -> None:
    """A read of February arriving after March's snapshot is not stored; the lock its refresh took is set to the
    read's period end (ARGV[6]), not left held for a TTL."""
    backend = backend_on(redis_url, f"rr:{uuid.uuid4().hex[:8]}:")
    march = snap(NOW - 5)
    assert await backend.store("org_1", march, NOW - 5)
    assert await backend.try_lock("org_1", 30.0, NOW)
    late_february = snap(NOW, FEBRUARY)  # (requested later: only its period refuses it)
    assert await backend.store("org_1", late_february, NOW)
    assert decode(await backend.redis.hgetall(backend.key("org_1", "snap"))) == march
    # (for the 1 ms to the read's period end, already past: gone by the time it is read on a busy machine)
    assert await backend.redis.get(backend.key("org_1", "lock")) in (None, repr(FEBRUARY[1]).encode())
    assert backend.stats["redis_errors"] == 0


@needs_redis
async def test_store_script_restamps_records_made_before_a_step_as_the_local_backend_does(redis_url: str) -> None:
    """The restamp loop: calls and tokens stamped more than ``CLOCK_STEP`` after now go to second ``now``
    (totals unchanged), those of a worker a little ahead keep their second, old ones are pruned, in-flight ones
    are untouched. The in-process backend ends with the same records."""
    backend = backend_on(redis_url, f"rr:{uuid.uuid4().hex[:8]}:")
    period = repr(MARCH[0])
    count = backend.key("org_1", "count")
    now = int(NOW)
    step, near, old = now + int(HOURS_2), now + int(CLOCK_STEP), now - 100
    await backend.redis.hset(
        count,
        mapping={
            "p": period,
            f"c:{step}": 5,
            f"t:{step}": 50,
            f"c:{near}": 2,
            f"c:{old}": 3,
            f"t:{old}": 30,
            f"i:{step}": 1,
            "calls": 5 + 2 + 3 + 1,
            "tokens": 50 + 30,
        },
    )
    assert await backend.store("org_1", snap(NOW - 10), NOW)
    raw = {k.decode(): int(v) for k, v in (await backend.redis.hgetall(count)).items() if k != b"p"}
    assert raw == {f"c:{now}": 5, f"t:{now}": 50, f"c:{near}": 2, f"i:{step}": 1, "calls": 8, "tokens": 50}

    local = LocalBackend(QuotaConfig())
    state = local._org("org_1")
    state.counts.period = period
    for sec, n in ((step, 5), (near, 2), (old, 3)):
        state.counts.c[sec] = n
    state.counts.t.update({step: 50, old: 30})
    state.counts.i[step] = 1
    state.counts.calls, state.counts.tokens = 11, 80
    local.store_now("org_1", snap(NOW - 10), NOW)
    counts = state.counts
    assert (counts.c, counts.t, counts.i, counts.calls, counts.tokens) == (
        {now: 5, near: 2},
        {now: 50},
        {step: 1},
        8,
        50,
    )
    assert backend.stats["redis_errors"] == 0


# ------------------------------------------------------------------------ 2. the LOCK script


@needs_redis
async def test_lock_script_paths(redis_url: str) -> None:
    """Taken when free, refused while another process holds it (also one whose clock is up to a minute ahead),
    renewed by its holder, taken when held beyond now + TTL + ``CLOCK_STEP`` (a clock stepped back since), and a
    failed refresh's unlock holds the fleet off for ``failure_backoff``."""
    prefix = f"rr:{uuid.uuid4().hex[:8]}:"
    one, two = backend_on(redis_url, prefix), backend_on(redis_url, prefix)
    assert await one.try_lock("org_1", 30.0, NOW)
    assert not await two.try_lock("org_1", 30.0, NOW + 29)
    assert await one.try_lock("org_1", 30.0, NOW + 1)  # renewed by its holder
    assert await two.try_lock("org_1", 30.0, NOW + 31.5)  # expired (on the gates' clock)

    assert await one.try_lock("org_2", 30.0, NOW + CLOCK_STEP - 1)  # a worker a minute ahead
    assert not await two.try_lock("org_2", 30.0, NOW)

    assert await one.try_lock("org_3", 30.0, NOW + HOURS_2)  # taken before the clock was stepped back
    assert await two.try_lock("org_3", 30.0, NOW)

    assert await one.try_lock("org_4", 30.0, NOW)
    await one.unlock("org_4", NOW, 5.0)
    assert not await two.try_lock("org_4", 30.0, NOW + 4)
    assert await two.try_lock("org_4", 30.0, NOW + 6)
    assert one.stats["redis_errors"] == two.stats["redis_errors"] == 0


@needs_redis
async def test_a_failure_backoff_longer_than_a_ttl_and_a_minute_still_holds_the_fleet_off(redis_url: str) -> None:
    """``QuotaConfig(failure_backoff=300)`` (TTL 30 s): a refresh that failed hands the fleet's lock back until
    now + 300 s. That is no lock taken on a clock stepped back: other workers must not take it 10 s later (each
    would read Lago while it fails, the fleet's backoff gone)."""
    prefix = f"rr:{uuid.uuid4().hex[:8]}:"
    one = backend_on(redis_url, prefix, failure_backoff=300.0)
    two = backend_on(redis_url, prefix, failure_backoff=300.0)
    assert await one.try_lock("org_1", 30.0, NOW)
    await one.unlock("org_1", NOW, 300.0)
    assert not await two.try_lock("org_1", 30.0, NOW + 10), "the failed refresh's backoff was ignored"
    assert await two.try_lock("org_1", 30.0, NOW + 301)


@needs_redis
async def test_workers_read_lago_once_per_failure_backoff_while_it_fails(redis_url: str) -> None:
    """The same through the gates: two workers, ``failure_backoff=300``, Lago down. One refresh fails; the other
    worker's request 10 s later does not read Lago again."""
    clock = Clock(T0)
    lago = HostLago()
    prefix = f"rrclock:{uuid.uuid4().hex[:8]}:"
    one = gate_on(lago, clock, redis_url, failure_backoff=300.0, cold_timeout=0.2, redis_prefix=prefix)
    two = gate_on(lago, clock, redis_url, failure_backoff=300.0, cold_timeout=0.2, redis_prefix=prefix)
    async with anyio.create_task_group() as tasks:
        await tasks.start(one.run)
        await tasks.start(two.run)
        lago.down = True
        assert (await one.check("org_1")).allowed  # fail-open
        await settled(one)
        reads = lago.reads
        clock.advance(10)
        assert (await two.check("org_1")).allowed
        await settled(two)
        assert lago.reads == reads, "the second worker read Lago within the fleet's failure backoff"
        no_redis_errors(one)
        tasks.cancel_scope.cancel()


# ------------------------------------------------------------------------ 3. false positives in normal operation


async def test_a_ttl_of_an_hour_is_not_taken_for_a_clock_step(redis: str | None) -> None:
    """``LAGO_USAGE_CACHE_TTL=3600``: a snapshot's ``refresh_at`` is at most a TTL ahead, never taken for one read on
    a stepped clock: Lago is read once, not at every request."""
    clock = Clock(T0)
    lago = HostLago()
    gate = gate_on(lago, clock, redis, ttl=3600.0)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert (await refreshed(gate, "org_1")).allowed
        reads = lago.reads
        for _ in range(5):
            clock.advance(60)
            assert (await refreshed(gate, "org_1")).allowed
        assert lago.reads == reads
        no_redis_errors(gate)
        tasks.cancel_scope.cancel()


@needs_redis
async def test_four_workers_with_clocks_up_to_a_minute_apart_allow_exactly_the_limit(redis_url: str) -> None:
    """Four gates on one Redis, their clocks 0, 20, 40 and 59 s apart, limit 25: exactly 25 of 60 concurrent checks
    are allowed; after a refresh by the worker the furthest ahead (Lago counted the 25, the limit raised to 50, its
    webhook), exactly 25 more, and the workers behind take its snapshot (due 59 s + a TTL ahead of their clocks) for
    a fresh one, not one read before a clock step (read again)."""
    lago = HostLago(limit=25)
    prefix = f"rrclock:{uuid.uuid4().hex[:8]}:"
    clocks = [Clock(T0 + dt.timedelta(seconds=offset)) for offset in (0, 20, 40, 59)]
    gates = [gate_on(lago, clock, redis_url, redis_prefix=prefix) for clock in clocks]
    async with anyio.create_task_group() as tasks:
        for gate in gates:
            await tasks.start(gate.run)

        async def burst() -> int:
            allowed = 0

            async def one(gate: QuotaGate) -> None:
                nonlocal allowed
                if (await call(gate, "org_1")).allowed:
                    allowed += 1

            async with anyio.create_task_group() as checks:
                for index in range(60):
                    checks.start_soon(one, gates[index % 4])
            for gate in gates:
                await settled(gate)
                await flushed(gate)
            return allowed

        assert await burst() == 25
        lago.usage["org_1"], lago.limit = 25, 50
        for clock in clocks:
            clock.advance(30 + 5 + 60 + 1)  # a TTL, the settle lag and the clocks' spread
        await gates[3].invalidate("org_1", refresh=True)  # (the plan.updated webhook, at the worker furthest ahead)
        await settled(gates[3])
        reads = lago.reads
        for clock in clocks:
            clock.advance(1)
        assert await burst() == 25
        assert lago.reads == reads, "a snapshot of the worker 59 s ahead was taken for one read before a clock step"
        for gate in gates:
            no_redis_errors(gate)
        tasks.cancel_scope.cancel()


# ------------------------------------------------------------------------ 4. backoffs stamped before a step


async def test_a_429_after_a_step_back_pauses_refreshes_despite_a_pause_stamped_before_it() -> None:
    """Lago answers 429 just before the clock is stepped back 2 h (a pause stamped 2 h ahead, ignored since), and
    again after the step: that second pause must hold (a refresh of another org waits it out), not be lost in
    ``max()`` with the stale one (every refresh sent to a Lago that throttles us, for 2 h)."""
    clock = Clock(T0)
    lago = HostLago()
    gate = gate_on(lago, clock, None, cold_timeout=0.2)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        lago.throttle = True
        await gate.check("org_1")
        await settled(gate)
        clock.advance(-HOURS_2)
        clock.advance(gate.config.failure_backoff + 2)
        await gate.check("org_2")  # read, answered 429 again: refreshes pause
        await settled(gate)
        reads = lago.reads
        await gate.check("org_3")
        await settled(gate)
        assert lago.reads == reads, "a refresh was sent to Lago during its 429 pause"
        assert gate.stats.get("refreshes_paused", 0) >= 1
        tasks.cancel_scope.cancel()
