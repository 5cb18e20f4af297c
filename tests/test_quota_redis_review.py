"""The Redis quota backend, reviewed again (a real ``redis-server`` on 127.0.0.1): settle batches Redis refuses in
part, the scripts' cache flushed, keys' expiries, org ids with special characters, key prefixes of two apps sharing
one Redis, exactness across the period boundary.

Counts only (decisions, Redis counters, TTLs), a settable clock, no sleeps as synchronisation.
"""

# ruff: noqa: F811 (test_quota_redis's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import datetime as dt
import types
import uuid
from typing import Any

import anyio
import pytest

from _quota_app import REDIS_SERVER, TOKENS, Clock
from lago_org_billing import BillingSettings, LagoClient, _quota_redis
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from test_quota_redis import _OPEN, _close_gates, client, clock, fake, prefix  # noqa: F401 (its fixtures)
from test_quota_rollover import APRIL, PeriodLago

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

UTC = dt.timezone.utc


def make_gate(client: Any, clock: Clock, url: str, prefix: str, **config: Any) -> QuotaGate:
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=url)
    if isinstance(client, LagoClient):
        settings = client.settings.replace(redis_url=url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix, **config), clock=clock.time)
    _OPEN.append(gate)
    return gate


def backend_of(gate: QuotaGate) -> RedisBackend:
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    return backend


async def usage(gate: QuotaGate, org: str) -> dict[str, Any]:
    return dict((await gate.enforce_usage_limits(org))["usage"])


# ------------------------------------------------------------------- 1. a settle batch Redis refuses in part


async def test_settles_redis_applied_are_not_replayed_when_another_of_their_batch_fails(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """The background writer sends up to 500 settles in one pipeline. When Redis refuses one of them (here a
    WRONGTYPE on another org's key; in production an OOM at maxmemory, a BUSY script, a READONLY failover) the
    others were applied all the same, yet the whole batch was queued again and applied again at the next flush:
    org_1's one billed call counted twice (and once more at every retry while the refusal lasts)."""
    gate = make_gate(client, clock, redis_url, prefix, redis_retry_interval=0.0)
    backend = backend_of(gate)
    decision = await gate.check("org_1")
    assert decision.allowed
    await backend.redis.set(backend.key("poisoned", "count"), "not a hash")
    gate.settle("org_1", decision, tokens=TOKENS, billed=True)
    gate.settle("poisoned", QuotaDecision(), tokens=1, billed=True)  # (a call billed without a check)
    await backend.flush()
    assert backend.stats["redis_errors"] == 1  # refused: kept for later
    await backend.redis.delete(backend.key("poisoned", "count"))  # the refusal ends (memory freed, failover over)
    await backend.flush()
    assert not backend._queue
    assert await usage(gate, "org_1") == {"max_api_calls": 1, "max_tokens": TOKENS}
    assert await backend.redis.hget(backend.key("poisoned", "count"), "calls") == b"1"  # written once, later


# ------------------------------------------------------------------- 2. the scripts' cache flushed


async def test_a_flushed_script_cache_is_reloaded_without_falling_back(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """SCRIPT FLUSH (a failover to a replica, a restart that kept its data): the next CHECK and the next settle
    batch get NOSCRIPT and load their script again; Redis is not taken for down, nothing is lost or doubled."""
    gate = make_gate(client, clock, redis_url, prefix)
    backend = backend_of(gate)
    first = await gate.check("org_1")
    await backend.redis.script_flush()
    second = await gate.check("org_1")
    await backend.redis.script_flush()
    for decision in (first, second):
        gate.settle("org_1", decision, tokens=TOKENS, billed=True)
    await backend.flush()
    await backend.redis.script_flush()
    assert await usage(gate, "org_1") == {"max_api_calls": 2, "max_tokens": 2 * TOKENS}
    assert backend.stats["redis_errors"] == 0 and backend.stats["redis_fallback"] == 0


# ------------------------------------------------------------------- 3. keys' expiries


async def settled(*gates: QuotaGate) -> None:
    for gate in gates:
        while gate._refreshing:
            for event in list(gate._refreshing.values()):
                await event.wait()


async def ttls(backend: RedisBackend, prefix: str) -> dict[str, int]:
    out = {}
    async for key in backend.redis.scan_iter(match=prefix.replace("[", "[[]") + "*", count=1000):
        out[key.decode()] = await backend.redis.pttl(key)
    return out


async def test_every_key_expires_and_none_of_a_live_org_before_its_period_ends(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After checks, settles, refreshes, a rollover, blind counting, an org without subscription, invalidations and
    an outage merge: every key has an expiry, and the live org's snapshot and counter outlive its period. The
    counter an outage's merge made for a new period expired after a day (UNPERIODED_TTL_MS) whatever its period:
    an org blocked all along (no reservation renews it) lost it mid-period."""
    clock = Clock(APRIL - dt.timedelta(minutes=2))
    monkeypatch.setattr(_quota_redis, "time", types.SimpleNamespace(time=clock.time))  # (the merge's clock)
    lago = PeriodLago(clock, limit=10)
    lago.missing.add("nobody")
    gate = make_gate(lago, clock, redis_url, prefix, cold_timeout=0.5)
    backend = backend_of(gate)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        decision = await gate.check("org_1")
        gate.settle("org_1", decision, tokens=3, billed=True)
        assert not (await gate.check("nobody")).allowed
        await backend.reserve("blind", clock.time(), "blind", None)  # fail-open, before any snapshot
        backend.settle("late", "", None, clock.time(), tokens=2, billed=True)  # billed without a check
        await settled(gate)
        await backend.flush()
        clock.at = APRIL + dt.timedelta(seconds=5)
        decision = await gate.check("org_1")  # rolled over in Redis
        gate.settle("org_1", decision, tokens=3, billed=True)
        await settled(gate)
        await backend.flush()
        await gate.invalidate("nobody")
        await gate.invalidate_all()
        # an outage's local records of a later period merged into a counter of an earlier one
        await backend.redis.hset(backend.key("merged", "count"), mapping={"p": repr(APRIL.timestamp() - 86400 * 31)})
        await backend.redis.pexpire(backend.key("merged", "count"), 3_600_000)
        snapshot = await gate.snapshot("org_1")
        backend.fallback.seed("merged", snapshot)
        backend.fallback.settle("merged", "", None, clock.time(), tokens=1, billed=True)
        backend.stats["redis_fallback"] = 1
        await backend._recovered()
        await settled(gate)
        tasks.cancel_scope.cancel()
    keys = await ttls(backend, prefix)
    assert keys and all(ttl > 0 for ttl in keys.values()), keys
    period_left_ms = (snapshot.period_end - clock.time()) * 1000
    for org in ("org_1", "merged"):
        assert keys[backend.key(org, "count")] >= period_left_ms, org
    assert keys[backend.key("org_1", "snap")] >= period_left_ms


# ------------------------------------------------------------------- 4. an outage's records of the period before


async def test_an_outages_records_of_the_past_period_do_not_count_in_the_new_one(redis_url: str, prefix: str) -> None:
    """Redis restarted (its data lost) during an outage across 00:00 on 1 April: org_1's 3 calls counted here on 31
    March are merged into its (now missing) counter. They carried no period there, so the first April snapshot
    adopted them as April's: org_1 had 3 calls fewer in April (RateLimit-Remaining 6 on its first call), for as
    long as Redis kept those records (all April when Lago does not count the calls)."""
    clock = Clock(APRIL - dt.timedelta(minutes=2))
    lago = PeriodLago(clock, limit=10)
    gate = make_gate(lago, clock, redis_url, prefix, cold_timeout=0.5)
    backend = backend_of(gate)
    march = await gate.snapshot("org_1")
    backend.fallback.seed("org_1", march)
    for _ in range(3):  # counted here while Redis is unreachable
        backend.fallback.settle("org_1", "", None, clock.time(), tokens=0, billed=True)
    for kind in ("snap", "count", "lock"):  # Redis restarted: what it held is gone
        await backend.redis.delete(backend.key("org_1", kind))
    clock.at = APRIL + dt.timedelta(seconds=30)
    backend.stats["redis_fallback"] = 1
    await backend._recovered()  # Redis answers again
    decision = await gate.check("org_1")
    assert dict(decision.headers)[b"ratelimit-remaining"] == b"9"
    await settled(gate)


# ------------------------------------------------------------------- 5. org ids and key prefixes

ODD_IDS = ["a:b", "{x}", "}x", "x}:count", "x", "org é 😀", "*", "a[b]?", "x}:snap"]


async def test_org_ids_with_special_characters_keep_their_own_keys(redis_url: str, prefix: str) -> None:
    """Colons, braces (a Redis Cluster hash tag's), glob characters and unicode in org ids: each org keeps its own
    count, an invalidation reaches that org only, and invalidate_all reaches each of them."""
    clock = Clock(APRIL - dt.timedelta(days=2))
    lago = PeriodLago(clock, limit=10)
    gate = make_gate(lago, clock, redis_url, prefix, cold_timeout=0.5)
    backend = backend_of(gate)
    for n, org in enumerate(ODD_IDS):
        for _ in range(n + 1):
            assert (await gate.check(org)).allowed
    await settled(gate)
    for n, org in enumerate(ODD_IDS):
        assert (await usage(gate, org))["max_api_calls"] == n + 1, org
    versions = {org: (await backend.load(org)).version for org in ODD_IDS}  # type: ignore[union-attr]
    await gate.invalidate("x")
    assert await backend.load("x") is None
    assert [org for org in ODD_IDS if await backend.load(org) is None] == ["x"]
    await gate.invalidate_all()
    for org in ODD_IDS:
        if org != "x":
            assert (await backend.load(org)).version != versions[org], org  # type: ignore[union-attr]


@pytest.mark.parametrize("names", [("app:", "app:staging:"), ("app[eu]:", "appe:")])
async def test_invalidate_all_keeps_to_its_own_prefix(redis_url: str, names: tuple[str, str]) -> None:
    """Two apps sharing one Redis with their own LAGO_QUOTA_REDIS_PREFIX: a plan webhook's invalidate_all in one
    marks due its own orgs' snapshots, not the other app's (one prefix starting with the other, or holding glob
    characters: SCAN MATCH read "app[eu]:" as a pattern, matching "appe:" keys and none of its own)."""
    run = uuid.uuid4().hex[:8]
    clock = Clock(APRIL - dt.timedelta(days=2))
    lago = PeriodLago(clock, limit=10)
    mine, other = (make_gate(lago, clock, redis_url, f"{run}{name}", cold_timeout=0.5) for name in names)
    for gate in (mine, other):
        assert (await gate.check("org_1")).allowed
        await settled(gate)
    before = {id(gate): (await gate.backend.load("org_1")).version for gate in (mine, other)}  # type: ignore[union-attr]
    await mine.invalidate_all()
    assert (await mine.backend.load("org_1")).version != before[id(mine)]  # type: ignore[union-attr]
    assert (await other.backend.load("org_1")).version == before[id(other)]  # type: ignore[union-attr]


# ------------------------------------------------------------------- 6. exactness across the boundary


async def test_four_gates_allow_exactly_the_limit_across_the_boundary_with_the_refresh_landing_midway(
    redis_url: str, prefix: str
) -> None:
    """Limit 10. org_1 used 8 in March. At 00:00:01 on 1 April, 4 gates (workers) sharing one Redis take 100
    concurrent checks; the snapshot is rolled over in Redis by the first, and the fresh April read from Lago (0
    used: nothing delivered yet) is stored midway through the burst. Exactly 10 are allowed, all of April."""
    clock = Clock(APRIL - dt.timedelta(minutes=5))
    lago = PeriodLago(clock, limit=10)
    gates = [make_gate(lago, clock, redis_url, prefix, cold_timeout=0.5, refresh_rate=0.0) for _ in range(4)]
    for n in range(8):
        decision = await gates[n % 4].check("org_1")
        assert decision.allowed
        gates[n % 4].settle("org_1", decision, tokens=0, billed=True)
    await settled(*gates)
    clock.at = APRIL + dt.timedelta(seconds=1)
    lago.hold = anyio.Event()
    allowed: list[bytes] = []

    async def one(n: int) -> None:
        decision = await gates[n % 4].check("org_1")
        if decision.allowed:
            allowed.append(dict(decision.headers)[b"ratelimit-reset"])
        if n == 50:
            lago.hold.set()  # type: ignore[union-attr]  # the April read lands now

    async with anyio.create_task_group() as tasks:
        for gate in gates:
            await tasks.start(gate.run)
        async with anyio.create_task_group() as burst:
            for n in range(100):
                burst.start_soon(one, n)
        lago.hold.set()
        await settled(*gates)
        assert len(allowed) == 10
        assert (await usage(gates[0], "org_1"))["max_api_calls"] == 10
        assert ("usage", "org_1") in lago.answered
        tasks.cancel_scope.cancel()
