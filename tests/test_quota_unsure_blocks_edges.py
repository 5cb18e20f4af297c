"""The unsure blocks, at their edges (``Snapshot.unsure_calls``/``unsure_tokens``, ``QuotaGate._unsure_until``,
``QuotaGate._reread``, the Redis ``READ_AGAIN`` script).

A snapshot requested at ``T`` keeps the calls recorded in the ``settle_lag`` seconds before ``T``; a block that holds
only with them answers a short ``Retry-After`` and, past the point a read would trust them to Lago, has the org read
again. Checked here: what a client is told in each case (a clock stepped back, monitor mode, Lago failing or slow,
tokens, records Lago does not count, a provisional snapshot at a rollover), that Lago is read again at most once per
snapshot and per ``failure_backoff`` (one org, many orgs, Lago failing), and with Redis: several workers at once
(a worker blocked while another's read is in flight decides on that read), ``READ_AGAIN`` after a usage webhook's
mark (a refresh in flight elsewhere still stores nothing) and near a period's end (the lock capped to it).

A stub Lago (usage set by the test, as the delivered events make it), a settable clock, both backends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _quota_app import START, Clock, needs_redis, subscription_answer
from lago_org_billing import BillingSettings, _quota
from lago_org_billing._errors import LagoNotFoundError, LagoUnavailableError
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend, decode

pytestmark = pytest.mark.anyio

MARCH_END = dt.datetime(2026, 4, 1, tzinfo=dt.timezone.utc).timestamp()


class Lago:
    """Lago's two reads for orgs on a plan of ``limit`` calls (``tokens_limit`` tokens); ``usage``/``tokens``: what
    Lago has counted of each org. ``failing``: reads of usage raise; ``hold``: reads of usage wait for it."""

    def __init__(self, limit: int | None = 5, tokens_limit: int | None = None, *, charged: bool = True) -> None:
        self.limit = limit
        self.tokens_limit = tokens_limit
        self.charged = charged  # (False: the plan has no charge on the metric: Lago counts none of the calls)
        self.usage: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.reads: dict[str, int] = {}
        self.failing = False
        self.hold: anyio.Event | None = None
        self.period = ("2026-03-01T00:00:00Z", "2026-03-31T23:59:59Z")

    def total(self) -> int:
        return sum(self.reads.values())

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        privileges = [{"code": "max_api_calls", "value": self.limit}]
        if self.tokens_limit is not None:
            privileges.append({"code": "max_tokens", "value": self.tokens_limit})
        return subscription_answer(external_id, self.period, privileges)

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        self.reads[customer] = self.reads.get(customer, 0) + 1
        if self.hold is not None:
            await self.hold.wait()
        if self.failing:
            raise LagoUnavailableError("Lago is down (test)")
        if not self.charged:
            raise LagoNotFoundError("no charge on the metric (test)", status=404, code="charge_not_found")
        charge = {
            "billable_metric": {"code": "api_call", "aggregation_type": "sum_agg"},
            "events_count": self.usage.get(customer, 0),
            "units": str(self.tokens.get(customer, 0)),
        }
        return {"from_datetime": self.period[0], "to_datetime": self.period[1], "charges_usage": [charge]}


_PREFIX = "zzunsure"


@contextlib.asynccontextmanager
async def gates_on(
    lago: Lago,
    clock: Clock,
    redis: str | None,
    count: int = 1,
    mode: str = "enforce",
    ttl: float = 30.0,
    outage: bool = False,
    **config: Any,
) -> AsyncIterator[list[QuotaGate]]:
    """``count`` gates (workers) sharing ``redis`` (or one in process), running; snapshots due exactly a TTL
    after their read."""
    settings = BillingSettings(
        api_url="http://lago.invalid",
        api_key="k",
        max_retries=0,
        redis_url=redis,
        quota_mode=mode,
        usage_cache_ttl=ttl,
    )
    config.setdefault("jitter", 0.0)
    if redis:
        config.setdefault("redis_prefix", f"{_PREFIX}:{uuid.uuid4().hex[:8]}:")
    gates = [
        QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]
        for _ in range(count if redis else 1)
    ]
    try:
        async with anyio.create_task_group() as tasks:
            for gate in gates:
                await tasks.start(gate.run)
            yield gates
            tasks.cancel_scope.cancel()
        for gate in gates:  # (a Redis test that fell back to counting in process would prove nothing of the scripts)
            assert outage or getattr(gate.backend, "stats", {}).get("redis_errors", 0) == 0
    finally:
        for gate in gates:
            await gate.aclose()


@pytest.fixture(autouse=True)
def _no_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_quota, "_FIRST_SPREAD", 0.0)


def headers(decision: QuotaDecision) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in decision.headers}


def retry_after(decision: QuotaDecision) -> int:
    value = int(headers(decision)["retry-after"])
    assert decision.problem is not None and decision.problem["retry_after"] == value
    return value


async def settled(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


async def flushed(gate: QuotaGate) -> None:
    flush = getattr(gate.backend, "flush", None)
    if flush is not None:
        await flush()


async def call(gate: QuotaGate, lago: Lago, org: str = "org_1", tokens: int = 0) -> QuotaDecision:
    """One request: decided, and when allowed (or served in monitor mode) billed, its event in Lago at once."""
    decision = await gate.check(org)
    if decision.allowed:
        gate.settle(org, decision, tokens=tokens, billed=True)
        lago.usage[org] = lago.usage.get(org, 0) + 1
        lago.tokens[org] = lago.tokens.get(org, 0) + tokens
        await flushed(gate)
    return decision


async def unsure_block(
    gate: QuotaGate, lago: Lago, clock: Clock, org: str = "org_1", ttl: float = 30.0
) -> QuotaDecision:
    """The scenario of tests/test_quota_unsure_blocks.py (limit 5): one call at T, two at T+28 (TTL - 2), a refresh
    at T+31 while a fourth call runs (Lago has 3, the two calls of T+28 kept: counted 6 where Lago will count 4). At
    T+32 the fifth call is refused below the limit: an unsure block, ``Retry-After: 5``."""
    assert (await call(gate, lago, org)).allowed
    clock.advance(ttl - 2)
    assert (await call(gate, lago, org)).allowed and (await call(gate, lago, org)).allowed
    clock.advance(3)
    fourth = await gate.check(org)
    assert fourth.allowed
    await settled(gate)
    gate.settle(org, fourth, tokens=0, billed=True)
    lago.usage[org] += 1
    await flushed(gate)
    clock.advance(1)
    early = await call(gate, lago, org)
    assert not early.allowed and retry_after(early) == 5
    return early


# --------------------------------------------------------------------------------------- what the client is told


async def test_a_clock_stepped_back_after_an_unsure_block_never_asks_for_more_than_the_settle_lag(
    redis: str | None,
) -> None:
    """An unsure block asks the client back when a read can tell (``requested_at`` + 1 + ``settle_lag``). The host's
    clock stepped back ten minutes (NTP): that point is ten minutes on, and the client was told ``Retry-After: 606``
    for a block resting on records Lago may have counted; now at most ``settle_lag`` + 1 seconds (the snapshot, read
    on a clock stepped back since, is read again at once), and the org is decided on Lago's count again. With Redis,
    the STORE script restamped the records made before the step to the read's second without noting them unsure (as
    the in-process backend does): the fifth call was refused, ``Retry-After`` the period's end, for a whole TTL."""
    lago, clock = Lago(), Clock(START)
    async with gates_on(lago, clock, redis) as (gate,):
        await unsure_block(gate, lago, clock)
        clock.advance(-600)
        stepped = await call(gate, lago)
        assert not stepped.allowed
        assert 1 <= retry_after(stepped) <= 6
        await settled(gate)  # (its refresh, started by that request: a read stamped ten minutes ahead)
        await flushed(gate)
        clock.advance(retry_after(stepped))
        assert (await call(gate, lago)).allowed  # the fifth call: Lago has 4
        assert lago.usage["org_1"] == 5
        sixth = await call(gate, lago)
        assert not sixth.allowed and retry_after(sixth) == math.ceil(MARCH_END - clock.time())


async def test_monitor_mode_tells_what_enforce_mode_would_at_the_limit(redis: str | None) -> None:
    """Monitor mode answers ``would_block`` with the ``Retry-After`` enforce mode would send. Lago has 4 of 5 calls and
    the snapshot keeps the last one as unsure: enforce refuses the next call with ``Retry-After: 5``; monitor mode
    took its own (forced) reservation for one more record, and said the block was sure (``Retry-After``: the period's
    end)."""
    said: dict[str, QuotaDecision] = {}
    for mode in ("enforce", "monitor"):
        lago, clock = Lago(), Clock(START)
        async with gates_on(lago, clock, redis, mode=mode) as (gate,):
            for _ in range(3):
                assert (await call(gate, lago)).allowed
            clock.advance(28)
            assert (await call(gate, lago)).allowed
            clock.advance(3)
            await gate.invalidate("org_1", refresh=True, webhook_type="alert.triggered")  # read now: Lago has 4
            await settled(gate)
            clock.advance(1)
            decision = await gate.check("org_1")
            said[mode] = decision
    enforce, monitor = said["enforce"], said["monitor"]
    assert not enforce.allowed and retry_after(enforce) == 5
    assert monitor.allowed and monitor.would_block
    assert retry_after(monitor) == retry_after(enforce)


async def test_a_token_block_on_unsure_tokens_is_short_and_read_again_and_a_sure_one_is_not(
    redis: str | None,
) -> None:
    """A token limit of 100: 40 tokens at T, 50 at T+28 (Lago has them at once), a read at T+31 keeps the 50 of T+28
    (counted 140 where Lago has 90): the next call is refused with ``Retry-After`` in seconds, then allowed once a read
    can tell. Past the limit for good (Lago's count), the block is for the period, and nothing is read early."""
    lago, clock = Lago(limit=None, tokens_limit=100), Clock(START)
    async with gates_on(lago, clock, redis) as (gate,):
        assert (await call(gate, lago, tokens=40)).allowed
        clock.advance(28)
        assert (await call(gate, lago, tokens=50)).allowed
        clock.advance(3)
        await gate.invalidate("org_1", refresh=True, webhook_type="alert.triggered")
        await settled(gate)
        clock.advance(1)
        early = await call(gate, lago)
        assert not early.allowed and retry_after(early) == 5
        assert headers(early)["ratelimit-reset"] == str(math.ceil(MARCH_END - clock.time()))
        clock.advance(5)
        assert (await call(gate, lago, tokens=20)).allowed  # Lago: 110 tokens
        reads = lago.total()
        blocked = await call(gate, lago)
        assert not blocked.allowed and retry_after(blocked) == math.ceil(MARCH_END - clock.time())
        clock.advance(7)
        again = await call(gate, lago)
        assert not again.allowed and retry_after(again) == math.ceil(MARCH_END - clock.time())
        assert lago.total() == reads


async def test_records_lago_does_not_count_are_never_unsure(redis: str | None) -> None:
    """A plan with no charge on the metric: Lago counts none of the calls, every record is kept for the period. A
    block on them is sure: ``Retry-After`` is the period's end, and Lago is not read early."""
    lago, clock = Lago(charged=False), Clock(START)
    async with gates_on(lago, clock, redis) as (gate,):
        for _ in range(5):
            assert (await call(gate, lago)).allowed
        clock.advance(3)
        await gate.invalidate("org_1", refresh=True, webhook_type="alert.triggered")
        await settled(gate)
        reads = lago.total()
        for _ in range(3):
            clock.advance(6)
            blocked = await call(gate, lago)
            assert not blocked.allowed and retry_after(blocked) == math.ceil(MARCH_END - clock.time())
        assert lago.total() == reads


async def test_a_provisional_snapshot_at_the_rollover_blocks_for_its_period(redis: str | None) -> None:
    """Past a period's end, a provisional snapshot of the next one (usage 0 plus the calls recorded since the
    boundary) decides at once: none of its records can be in a base of 0, so a block there is sure and asks the
    client back at the new period's end."""
    lago, clock = Lago(limit=2), Clock(dt.datetime(2026, 3, 31, 23, 59, 50, tzinfo=dt.timezone.utc))
    async with gates_on(lago, clock, redis, refresh_rate=0.0) as (gate,):
        assert (await call(gate, lago)).allowed
        lago.failing = True  # (the next period's read fails: the provisional snapshot keeps deciding)
        clock.advance(11)  # 00:00:01 on April 1st
        first = await call(gate, lago)
        await settled(gate)
        assert first.allowed
        assert (await call(gate, lago)).allowed
        blocked = await call(gate, lago)
        assert not blocked.allowed
        april_end = dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc).timestamp()
        assert retry_after(blocked) == math.ceil(april_end - clock.time())


# ------------------------------------------------------------------------------------------- reads of Lago


async def test_lago_failing_an_unsure_block_is_read_again_once_per_failure_backoff(redis: str | None) -> None:
    """Past the point a read can tell, Lago fails: the blocked request is answered at once with ``Retry-After`` of
    ``failure_backoff`` (never 0, never the period's end), and however often the client asks, Lago is read once per
    ``failure_backoff`` (and with Redis, the fleet's lock is asked about no more often than that either)."""
    lago, clock = Lago(), Clock(START)
    async with gates_on(lago, clock, redis) as (gate,):
        await unsure_block(gate, lago, clock)
        asked: list[str] = []
        read_again = getattr(gate.backend, "read_again", None)
        if read_again is not None:

            async def spy(org_id: str, version: str) -> None:
                asked.append(version)
                await read_again(org_id, version)

            gate.backend.read_again = spy  # type: ignore[attr-defined]
        lago.failing = True
        reads = lago.total()
        clock.advance(5)
        for _ in range(4):  # four requests within a second
            decision = await call(gate, lago)
            await settled(gate)
            assert not decision.allowed and retry_after(decision) == 5
            clock.advance(0.25)
        assert lago.total() == reads + 1
        clock.advance(5)
        for _ in range(4):
            decision = await call(gate, lago)
            await settled(gate)
            assert not decision.allowed and retry_after(decision) == 5
            clock.advance(0.25)
        assert lago.total() == reads + 2
        assert len(asked) <= 2
        lago.failing = False
        clock.advance(5)
        assert (await call(gate, lago)).allowed  # the fifth call, once Lago answers
        assert lago.usage["org_1"] == 5


async def test_a_slow_lago_holds_one_request_and_the_next_ones_are_answered_at_once(redis: str | None) -> None:
    """Lago slower than ``cold_timeout``: the first blocked request past the point waits that long, then is refused
    with ``Retry-After`` of ``failure_backoff``; the org's next blocked requests until then are answered at once (no
    wait, no read), and the read that came late decides for the org."""
    lago, clock = Lago(), Clock(START)
    async with gates_on(lago, clock, redis, cold_timeout=0.05) as (gate,):
        await unsure_block(gate, lago, clock)
        lago.hold = anyio.Event()
        reads = lago.total()
        clock.advance(5)
        first = await call(gate, lago)
        assert not first.allowed and retry_after(first) == 5
        assert gate.stats["cold_timeouts"] == 1
        for _ in range(3):
            clock.advance(0.5)
            decision = await call(gate, lago)
            assert not decision.allowed and retry_after(decision) == 5
        assert gate.stats["cold_timeouts"] == 1 and lago.total() == reads + 1
        lago.hold.set()
        lago.hold = None
        await settled(gate)
        await flushed(gate)
        assert (await call(gate, lago)).allowed  # decided on the read that came late
        assert lago.total() == reads + 1


async def test_many_orgs_blocked_unsure_are_each_read_again_once(redis: str | None) -> None:
    """Twenty orgs in the same unsure block, each asked by its client many times past the point: each org is read
    again once, its fifth call allowed once, and its next ones refused for the period with no more reads."""
    lago, clock = Lago(), Clock(START)
    orgs = [f"org_{n}" for n in range(20)]
    async with gates_on(lago, clock, redis) as (gate,):
        for org in orgs:
            assert (await call(gate, lago, org)).allowed
        clock.advance(28)
        for org in orgs:
            assert (await call(gate, lago, org)).allowed and (await call(gate, lago, org)).allowed
        clock.advance(3)
        running = {org: await gate.check(org) for org in orgs}  # stale: read again, a fourth call each in flight
        await settled(gate)
        for org, decision in running.items():
            gate.settle(org, decision, tokens=0, billed=True)
            lago.usage[org] += 1
        await flushed(gate)
        clock.advance(1)
        for org in orgs:
            assert retry_after(await call(gate, lago, org)) == 5
        reads = dict(lago.reads)
        clock.advance(5)
        decisions: dict[str, list[QuotaDecision]] = {org: [] for org in orgs}

        async def client(org: str) -> None:
            for _ in range(3):
                decisions[org].append(await call(gate, lago, org))

        async with anyio.create_task_group() as burst:
            for org in orgs:
                burst.start_soon(client, org)
        for org in orgs:
            assert lago.reads[org] == reads[org] + 1, org
            assert [d.allowed for d in decisions[org]] == [True, False, False], org
            assert retry_after(decisions[org][-1]) == math.ceil(MARCH_END - clock.time())
        clock.advance(10)
        for org in orgs:
            assert not (await call(gate, lago, org)).allowed
        assert sum(lago.reads.values()) == sum(reads.values()) + len(orgs)
        assert all(lago.usage[org] == 5 for org in orgs)


# ------------------------------------------------------------------------------------------------------ Redis


@needs_redis
async def test_a_worker_blocked_while_another_reads_the_org_decides_on_that_read(redis_url: str) -> None:
    """Two workers. Past the point a read can tell, the first one's blocked request frees the fleet's lock and reads
    the org (Lago slow to answer); the second one's blocked request comes meanwhile. It found the lock held and took
    the stored snapshot as the one it waited for: refused at once on the very records the read is to settle,
    ``Retry-After: 5``. It now waits for that read (within ``cold_timeout``) and both decide on it: one fifth call."""
    lago, clock = Lago(), Clock(START)
    async with gates_on(lago, clock, redis_url, count=2) as (first, second):
        await unsure_block(first, lago, clock)
        clock.advance(5)
        reads = lago.total()
        lago.hold = anyio.Event()
        decisions: dict[str, QuotaDecision] = {}
        go = anyio.Event()  # Lago answers the first worker once the second one decided, or waits for that answer

        async def one(name: str, gate: QuotaGate) -> None:
            decisions[name] = await call(gate, lago)
            if name == "second":
                go.set()

        backend: Any = second.backend
        wait_snapshot = backend.wait_snapshot

        async def waits(org_id: str, timeout: float, after: float = 0.0) -> None:  # noqa: ASYNC109
            # (the second worker's refresh found the fleet's lock held: it waits for a snapshot newer than `after`)
            stored = float(await backend.redis.hget(backend.key(org_id, "snap"), "rq"))
            if stored <= after:
                go.set()
            await wait_snapshot(org_id, timeout, after)

        backend.wait_snapshot = waits
        async with anyio.create_task_group() as burst:
            burst.start_soon(one, "first", first)
            while lago.total() == reads:  # the first worker's read has begun
                await anyio.lowlevel.checkpoint()
            burst.start_soon(one, "second", second)
            await go.wait()
            lago.hold.set()
        assert lago.total() == reads + 1  # once for the fleet
        assert sorted(d.allowed for d in decisions.values()) == [False, True]
        refused = next(d for d in decisions.values() if not d.allowed)
        assert retry_after(refused) == math.ceil(MARCH_END - clock.time())  # decided on the new read: sure


@needs_redis
@pytest.mark.parametrize("mark", ["mark_due", "invalidate_all", "invalidate"])
async def test_read_again_leaves_an_invalidations_mark_on_the_lock(redis_url: str, mark: str) -> None:
    """A usage webhook (``mark_due``), a plan change (``invalidate_all``) or any other webhook (``invalidate``) marks
    the lock ``"0"`` so that a refresh in flight then (its read may predate the change) stores nothing. An unsure
    block's ``READ_AGAIN`` on the marked snapshot (``ra`` set to ``"0"`` too by ``mark_due``) deleted that mark: the
    refresh in flight stored its stale read. Free to take all the same, the mark is now left."""
    from lago_org_billing._snapshots import Snapshot

    config = QuotaConfig(redis_prefix=f"{_PREFIX}:{uuid.uuid4().hex[:8]}:")
    ours, theirs = RedisBackend(redis_url, config), RedisBackend(redis_url, config)
    now = time.time()

    def snap(at: float) -> Snapshot:
        return Snapshot(
            active=True,
            plan_code="starter",
            customer_id="org_1",
            calls_limit=5,
            period_start=now - 86_400,
            period_end=now + 86_400,
            base_calls=3,
            requested_at=at,
            fetched_at=at,
            plan_fetched_at=at,
            refresh_at=at + 30,
            version=f"v{at!r}",
        )

    try:
        assert await ours.try_lock("org_1", 30.0, now - 40)
        assert await ours.store("org_1", snap(now - 40), now - 40)
        versions = [decode(await ours.redis.hgetall(ours.key("org_1", "snap")))]
        assert await theirs.try_lock("org_1", 30.0, now)  # due: their refresh begins, reading Lago
        await getattr(ours, mark)(*(() if mark == "invalidate_all" else ("org_1",)))  # a webhook, meanwhile
        versions.append(decode(await ours.redis.hgetall(ours.key("org_1", "snap"))))
        for seen in versions:  # (an unsure block on the snapshot before the mark, or on the marked one)
            if seen is not None:
                await ours.read_again("org_1", seen.version)
        assert await ours.redis.get(ours.key("org_1", "lock")) == b"0"
        assert await theirs.store("org_1", snap(now), now) is False  # superseded: read before the webhook
        assert ours.stats["redis_errors"] == theirs.stats["redis_errors"] == 0
    finally:
        await ours.aclose()
        await theirs.aclose()


@needs_redis
async def test_near_the_period_end_an_unsure_block_is_read_again_for_the_fleet(redis_url: str) -> None:
    """A snapshot read less than a TTL before its period ends: its lock is held until the period's end, not its
    ``refresh_at`` (STORE caps it). ``READ_AGAIN`` compared the lock with ``ra`` only: it never freed it, and the org,
    refused below its limit, was not read again before the period ended (each request told to come back in 5 s)."""
    lago, clock = Lago(), Clock(dt.datetime(2026, 3, 31, 23, 58, 0, tzinfo=dt.timezone.utc))
    async with gates_on(lago, clock, redis_url, ttl=60.0) as (gate,):
        await unsure_block(gate, lago, clock, ttl=60.0)  # read at 23:59:01: due at 00:00:01, past the period's end
        lock = await gate.backend.redis.get(gate.backend.key("org_1", "lock"))  # type: ignore[attr-defined]
        assert float(lock) == MARCH_END  # (capped)
        reads = lago.total()
        clock.advance(5)  # 23:59:07
        fifth = await call(gate, lago)
        assert lago.total() == reads + 1
        assert fifth.allowed
        assert lago.usage["org_1"] == 5


@needs_redis
async def test_redis_down_an_unsure_block_stays_short_on_the_fallback(redis_url: str) -> None:
    """Redis goes down while an org's block is unsure: the process counts on from the usage it last saw there (the
    unsure records in it). That block was taken as sure: ``Retry-After`` the period's end, and no read before the
    snapshot's TTL. It stays unsure on the fallback: 5 s, then the org is read again and the fifth call allowed."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    lago, clock = Lago(), Clock(START)
    async with gates_on(lago, clock, redis_url, outage=True) as (gate,):
        await unsure_block(gate, lago, clock)
        backend: Any = gate.backend

        async def down(**_: Any) -> Any:
            raise RedisConnectionError("Redis is down (test)")

        backend._check = down
        clock.advance(0.5)
        blocked = await call(gate, lago)
        assert backend.stats["redis_fallback"] == 1
        assert not blocked.allowed and retry_after(blocked) == 5
        reads = lago.total()
        clock.advance(5)
        assert (await call(gate, lago)).allowed  # read again: Lago has 4
        assert lago.total() == reads + 1
        sixth = await call(gate, lago)
        assert not sixth.allowed and retry_after(sixth) == math.ceil(MARCH_END - clock.time())
