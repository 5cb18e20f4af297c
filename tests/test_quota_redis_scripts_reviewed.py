"""The Redis scripts (``CHECK``, ``STORE``, ``SETTLE``) count as the in-process backend does at billing-period
boundaries, on data a previous release wrote too, and on edge values.

Driven on both backends at once (``LocalBackend`` and ``RedisBackend`` on a real redis-server), with the same calls of
the backend API the gate makes (store a snapshot, reserve, settle a reserved call, settle a request's tokens once its
event is built, record usage without a check), on one settable time, and compared after each step: calls, tokens and
calls in flight. Seeded sequences cross the period's end, an upgrade and invalidations; named cases keep what they
found, their seed in their docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from _quota_app import REDIS_SERVER
from lago_org_billing._quota import QuotaConfig
from lago_org_billing._quota_local import LocalBackend
from lago_org_billing._quota_redis import RedisBackend, _Script, encode
from lago_org_billing._snapshots import ALLOWED, BLOCKED, COUNTED, NOT_STARTED, Mode, Outcome, Snapshot

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

UTC = dt.timezone.utc
DAY = 86400.0
ORG = "org_1"
MARCH = dt.datetime(2026, 3, 1, tzinfo=UTC).timestamp()
APRIL = dt.datetime(2026, 4, 1, tzinfo=UTC).timestamp()
MAY = dt.datetime(2026, 5, 1, tzinfo=UTC).timestamp()
LIMIT = 12


def period(start: float, end: float, requested_at: float, version: str, *, next_end: float | None = None) -> Snapshot:
    """An active subscription's snapshot of ``[start, end)`` read at ``requested_at``, nothing used in Lago yet;
    ``next_end``: the next period's end (``0``: none, a pending downgrade switches there: no rollover)."""
    return Snapshot(
        active=True,
        plan_code="small",
        calls_limit=LIMIT,
        tokens_limit=10_000,
        period_start=start,
        period_end=end,
        requested_at=requested_at,
        fetched_at=requested_at,
        plan_fetched_at=requested_at,
        refresh_at=requested_at + 30,
        limits_source="entitlements",
        version=version,
        interval="monthly",
        next_period_end=end + 30 * DAY if next_end is None else next_end,
    )


def local_counts(local: LocalBackend) -> tuple[str, int, int, dict[int, int]]:
    state = local._orgs.get(ORG)
    if state is None:
        return "", 0, 0, {}
    counts = state.counts
    return counts.period, counts.calls, counts.tokens, dict(counts.i)


async def redis_counts(red: RedisBackend) -> tuple[str, int, int, dict[int, int]]:
    raw = await red.redis.hgetall(red.key(ORG, "count"))
    fields = {key.decode(): value.decode() for key, value in raw.items()}
    inflight = {int(key[2:]): int(value) for key, value in fields.items() if key.startswith("i:") and int(value)}
    return fields.get("p", ""), int(fields.get("calls", 0)), int(fields.get("tokens", 0)), inflight


@dataclasses.dataclass
class Call:
    """A call reserved on both backends: each one's period, the second of its check."""

    periods: tuple[str, str]
    bucket: int


class Twins:
    """The in-process backend and the Redis one, driven alike on one settable time."""

    def __init__(self, red: RedisBackend, now: float) -> None:
        self.local = LocalBackend(red.config)
        self.red = red
        self.now = now
        self.log: list[str] = []

    def say(self, text: str) -> None:
        self.log.append(f"{self.now - APRIL:+10.0f} {text}")

    async def store(self, snapshot: Snapshot) -> None:
        self.say(
            f"store [{snapshot.period_start - APRIL:+.0f}, {snapshot.period_end - APRIL:+.0f}) "
            f"read {snapshot.requested_at - APRIL:+.0f}"
        )
        self.local.store_now(ORG, snapshot, self.now)
        await self.red.store(ORG, snapshot, self.now)

    async def reserve(self, mode: Mode) -> tuple[Outcome, Outcome]:
        mine = self.local.reserve_now(ORG, self.now, mode)
        theirs = await self.red.reserve(ORG, self.now, mode, None)
        self.say(
            f"reserve {mode}: local {mine.code} {mine.calls} {mine.period!r}, "
            f"redis {theirs.code} {theirs.calls} {theirs.period!r}"
        )
        return mine, theirs

    def settle(
        self, periods: tuple[str, str], bucket: int | None, *, tokens: int, billed: bool, checked: int | None = None
    ) -> None:
        self.say(f"settle {periods} bucket {bucket} checked {checked} tokens {tokens} billed {billed}")
        self.local.settle(ORG, periods[0], bucket, self.now, tokens=tokens, billed=billed, checked=checked)
        self.red.settle(ORG, periods[1], bucket, self.now, tokens=tokens, billed=billed, checked=checked)

    async def invalidate(self) -> None:
        self.say("invalidate")
        await self.local.invalidate(ORG)
        await self.red.invalidate(ORG)

    async def compare(self) -> tuple[str, int, int, dict[int, int]]:
        """Both backends' counts, which must agree (the period where both name one); the local ones returned."""
        await self.red.flush()
        mine, theirs = local_counts(self.local), await redis_counts(self.red)
        same = mine[1:] == theirs[1:] and (mine[0] == theirs[0] or not mine[0] or not theirs[0])
        assert same, f"local {mine} != redis {theirs}\n" + "\n".join(self.log[-40:])
        return mine


@contextlib.asynccontextmanager
async def twins(redis_url: str, now: float) -> AsyncIterator[Twins]:
    red = RedisBackend(redis_url, QuotaConfig(redis_prefix=f"scripts:{uuid.uuid4().hex[:8]}:"))
    try:
        yield Twins(red, now)
    finally:
        await red.aclose()


#: What a step of a sequence does (a store is a refresh for the check that follows it)
OPS = (
    ("store",) * 2
    + ("reserve",) * 3
    + ("settle",) * 2
    + ("tokens", "unchecked", "dated", "invalidate", "upgrade", "tick", "tick", "jump")
)


def reserved(outcome: Outcome, mode: Mode) -> bool:
    return (outcome.code in (ALLOWED, COUNTED) and mode != "peek" and outcome.period != NOT_STARTED) or (
        outcome.code == BLOCKED and mode in ("force", "blind")
    )


async def shared_step(
    w: Twins,
    op: str,
    rng: random.Random,
    in_flight: list[Call],
    billed: list[Call],
    *,
    dated_ago: tuple[int, ...],
) -> None:
    """The steps the backends-alike sequences take alike: a check (after a store too), a settle, its tokens, usage
    recorded undated or dated (``dated_ago`` seconds back), an invalidation, a tick. Other ``op`` are the caller's."""
    if op in ("store", "reserve"):  # (a snapshot is read for a check, which follows: the gate's refresh)
        mode: Mode = rng.choice(["normal", "normal", "blind", "force", "peek"])
        mine, theirs = await w.reserve(mode)
        assert (mine.code, mine.calls, mine.tokens) == (theirs.code, theirs.calls, theirs.tokens), "\n".join(
            w.log[-40:]
        )
        if reserved(mine, mode):
            in_flight.append(Call((mine.period, theirs.period), mine.bucket))
    elif op == "settle" and in_flight:
        call = in_flight.pop(rng.randrange(len(in_flight)))
        bill = rng.random() < 0.7
        w.settle(call.periods, call.bucket, tokens=rng.choice([0, 0, 40]), billed=bill)
        if bill:
            billed.append(call)
    elif op == "tokens" and billed:
        call = billed.pop(rng.randrange(len(billed)))  # (its event built: tokens of its check's second)
        w.settle(call.periods, None, tokens=rng.choice([7, 90]), billed=False, checked=call.bucket)
    elif op == "unchecked":  # (billed without a check: the org known only after the app ran; record_usage)
        w.settle(("", ""), None, tokens=3, billed=True)
    elif op == "dated":  # (record_usage with the event's timestamp)
        w.settle(("", ""), None, tokens=5, billed=True, checked=int(w.now) - rng.choice(dated_ago))
    elif op == "invalidate":
        await w.invalidate()
    elif op == "tick":
        w.now += rng.choice([0.0, 0.4, 1.0, 2.0, 3.0])


async def run_sequence(seed: int, redis_url: str) -> None:
    """One seeded sequence around the end of March (and an upgrade in it, maybe; a pending downgrade, maybe)."""
    rng = random.Random(seed)
    upgrade_at: float | None = None
    downgrade = rng.random() < 0.3  # (no rollover at the period's end: the org is cold until read)
    async with twins(redis_url, rng.choice([APRIL - 40 * 60, APRIL - 12, APRIL - 4])) as w:
        in_flight: list[Call] = []
        billed: list[Call] = []
        last_read = 0.0
        for step in range(70):
            op = rng.choice(OPS)
            if op == "store":
                read = max(last_read, w.now - rng.choice([0, 0, 1, 3]))
                last_read = read
                if read >= APRIL:
                    snapshot = period(APRIL, MAY, read, f"v{step}")
                elif upgrade_at is not None and read >= upgrade_at:
                    snapshot = period(upgrade_at, APRIL, read, f"v{step}", next_end=0.0 if downgrade else None)
                else:
                    snapshot = period(MARCH, APRIL, read, f"v{step}", next_end=0.0 if downgrade else None)
                await w.store(snapshot)
            await shared_step(w, op, rng, in_flight, billed, dated_ago=(0, 2, 9))
            if op == "upgrade" and upgrade_at is None and w.now < APRIL:
                upgrade_at = float(int(w.now))  # (a new subscription and period from now on: its webhook)
                w.say("upgrade")
                await w.invalidate()
            elif op == "jump":
                w.now = max(w.now, rng.choice([APRIL - 5, APRIL - 1, APRIL + 0.5, APRIL + 6]))
            await w.compare()
        for call in in_flight:  # every request ends: nothing is left in flight on either
            w.settle(call.periods, call.bucket, tokens=0, billed=False)
        _, _, _, left = await w.compare()
        assert not left, "\n".join(w.log[-40:])


@pytest.mark.parametrize("seed", [*range(100), 144, 295])
async def test_the_redis_scripts_count_as_the_in_process_backend_in_seeded_sequences(redis_url: str, seed: int) -> None:
    """Both backends, given the same stores, reservations and settles around a period's end, an upgrade, a pending
    downgrade and invalidations, count the same calls, tokens and calls in flight."""
    await run_sequence(seed, redis_url)


# ------------------------------------------------------------------- named cases (the in-process backend)


async def test_a_late_settle_of_an_ended_period_leaves_the_calls_let_through_since_counted(redis_url: str) -> None:
    """A call checked before the period's end and settled after it, once the org went cold (a downgrade pending:
    no rollover, the counts reset at the end), does not name the org's counts after the ended period: the calls let
    through since (``LAGO_FAIL_OPEN``, April's) stay counted when April is read (seed 4).

    The in-process backend took the period of such a settle for counts it found empty, as for an org forgotten: the
    next period's snapshot then took them as the ended period's and dropped them, with the call still in flight,
    whose settle was dropped too (under-counted until the next read). The Redis SETTLE script checks the org's
    snapshot for that period first, and drops the settle (billed in March)."""
    async with twins(redis_url, APRIL - 10) as w:
        await w.store(period(MARCH, APRIL, APRIL - 10, "v1", next_end=0.0))
        before, _ = await w.reserve("normal")
        w.now = APRIL + 0.5
        await w.reserve("peek")  # (the period is over, no next one known: cold)
        blind, theirs = await w.reserve("blind")  # Lago's reads fail: let through
        w.now = APRIL + 1
        w.settle((before.period, before.period), before.bucket, tokens=40, billed=True)
        assert await w.compare() == ("", 1, 0, {int(APRIL): 1})
        w.now = APRIL + 3
        await w.store(period(APRIL, MAY, APRIL + 2, "v2"))
        assert (await w.compare())[1:] == (1, 0, {int(APRIL): 1})  # (the blind call, in flight)
        w.settle((blind.period, theirs.period), blind.bucket, tokens=0, billed=True)
        assert (await w.compare())[1:] == (1, 0, {})


async def test_a_call_let_through_without_a_snapshot_is_settled_in_the_period_it_was_made_in(redis_url: str) -> None:
    """A call let through without a snapshot (``LAGO_FAIL_OPEN``, after an invalidation) just after the period's end
    is counted in the new period when it ends, whatever snapshot was read meanwhile (seed 144).

    The in-process backend gave such a call the period its counts were named after (the ended one, kept from before
    the invalidation), where Redis gives none: a read of the ended period begun before its end, stored after it,
    rolled over at the next check, and the call's settle, of the ended period, was dropped (its event, dated in
    April, billed there: under-counted until the next read)."""
    async with twins(redis_url, APRIL - 12) as w:
        await w.store(period(MARCH, APRIL, APRIL - 12, "v1"))
        await w.reserve("peek")
        await w.invalidate()  # (a webhook)
        w.now = APRIL
        mine, theirs = await w.reserve("blind")
        assert (mine.code, mine.period) == (theirs.code, theirs.period) == (COUNTED, "")
        w.now = APRIL + 1
        await w.store(period(MARCH, APRIL, APRIL - 2, "v2"))  # (read before the end, stored after it)
        await w.reserve("normal")  # (rolled over: April's provisional snapshot)
        w.now = APRIL + 2
        w.settle((mine.period, theirs.period), mine.bucket, tokens=40, billed=True)
        assert (await w.compare())[1:] == (2, 40, {int(APRIL + 1): 1})


# ------------------------------------------------------------------- named cases (the Redis scripts)


async def test_a_call_in_flight_since_before_its_counters_period_is_released_by_its_settle(redis_url: str) -> None:
    """The settle of a call let through before the period began (``LAGO_FAIL_OPEN``), which its counter holds in
    flight still, releases it: not in flight for an hour (``inflight_horizon``), the org refused a call early.

    A previous release's STORE (a rolling upgrade: both on one Redis) does not adopt a counter made before any
    snapshot: the first check on the new snapshot does, with the call still in flight. This release's SETTLE drops the
    settle of a call checked before the counter's period began (billed in the one before), and its release with it."""
    async with twins(redis_url, APRIL - 2) as w:
        red = w.red
        blind = await red.reserve(ORG, w.now, "blind", None)
        assert blind.code == COUNTED
        w.now = APRIL + 5
        # what the previous release's STORE leaves: the snapshot replaced, the counter as it was (no period)
        april = period(APRIL, MAY, APRIL + 4, "v1")
        await red.redis.hset(red.key(ORG, "snap"), mapping=dict(zip(*[iter(encode(april))] * 2, strict=True)))
        allowed = await red.reserve(ORG, w.now, "normal", None)
        assert (allowed.code, allowed.calls) == (ALLOWED, 2)  # (the blind call, still in flight)
        red.settle(ORG, blind.period, blind.bucket, w.now, tokens=0, billed=True)
        await red.flush()
        assert await redis_counts(red) == (allowed.period, 1, 0, {int(APRIL + 5): 1})


def test_the_fallbacks_call_in_flight_since_before_its_counts_period_is_released_by_its_settle() -> None:
    """The in-process backend releases, as the SETTLE script does, a call let through before its counts' period
    began that they hold in flight: records taken back after a merge into Redis was cut off (``restore``) keep their
    calls in flight under the period read meanwhile. Its settle, of a call billed in the period before, is dropped;
    its call is not left in flight for an hour."""
    local = LocalBackend(QuotaConfig())
    blind = local.reserve_now(ORG, APRIL - 2, "blind")
    drained = local.drain()  # (handed to Redis: the merge cut off, they are taken back below)
    local.store_now(ORG, period(APRIL, MAY, APRIL + 3, "v1"), APRIL + 4)
    local.restore(drained)
    assert local_counts(local)[1:] == (1, 0, {int(APRIL - 2): 1})
    local.settle(ORG, blind.period, blind.bucket, APRIL + 5, tokens=30, billed=True)
    assert local_counts(local) == (repr(APRIL), 0, 0, {})


async def test_a_call_handed_over_in_flight_after_an_outage_is_released_by_its_settle(redis_url: str) -> None:
    """A call let through during a Redis outage just before the period's end (no snapshot known: ``LAGO_FAIL_OPEN``),
    handed to Redis in flight when it answers again, into a counter of the period begun since (another worker read
    it), is released there by its settle, which is dropped (billed in the period before): not left in flight for an
    hour."""
    monotonic = [1000.0]
    config = QuotaConfig(redis_prefix=f"scripts:{uuid.uuid4().hex[:8]}:")
    worker = RedisBackend(redis_url, config, clock=lambda: monotonic[0])
    other = RedisBackend(redis_url, config)
    try:
        worker._failed(RedisConnectionError("connection refused"))  # (as a failed command says)
        blind = await worker.reserve(ORG, APRIL - 2, "blind", None)
        assert (blind.code, blind.backend) == (COUNTED, worker.fallback)
        await other.store(ORG, period(APRIL, MAY, APRIL + 3, "v1"), APRIL + 3)
        assert (await other.reserve(ORG, APRIL + 3, "normal", None)).code == ALLOWED
        monotonic[0] += config.redis_retry_interval
        after = await worker.reserve(ORG, APRIL + 4, "normal", None)  # (its org's records merged first)
        assert (after.code, after.calls, after.backend) == (ALLOWED, 3, worker)
        assert worker.handed_over(ORG, blind.bucket)  # (as the gate asks, settling it)
        worker.settle(ORG, blind.period, blind.bucket, APRIL + 5, tokens=0, billed=True)
        await worker.flush()
        assert (await redis_counts(worker))[1:] == (2, 0, {int(APRIL + 3): 1, int(APRIL + 4): 1})
    finally:
        await worker.aclose()
        await other.aclose()


# ------------------------------------------------------------------- edge values


async def test_a_settle_dated_0_or_not_dated_and_a_call_at_the_periods_first_second(redis_url: str) -> None:
    """Edge values of the second a call was checked in, alike on both backends: ``checked=0`` (a usage record dated
    1970) is before any period (dropped), ``None`` (not known) counts, and a call checked in the period's first
    second, let through before any snapshot, is the period's: adopted in flight, its settle and tokens counted."""
    async with twins(redis_url, APRIL) as w:
        blind, theirs = await w.reserve("blind")  # (no snapshot yet: an org never read, Lago's reads failing)
        assert blind.bucket == int(APRIL) and blind.period == theirs.period == ""
        w.now = APRIL + 2
        await w.store(period(APRIL, MAY, APRIL + 1, "v1"))
        assert (await w.compare())[1:] == (1, 0, {int(APRIL): 1})  # (not dropped as one of before the period)
        w.settle(("", ""), blind.bucket, tokens=0, billed=True)
        w.settle(("", ""), None, tokens=11, billed=False, checked=int(APRIL))  # (its tokens, once its event is built)
        w.settle(("", ""), None, tokens=5, billed=True, checked=0)
        w.settle(("", ""), None, tokens=3, billed=True, checked=None)
        assert (await w.compare())[1:] == (2, 14, {})


async def test_the_tokens_of_a_call_checked_in_an_upgrades_first_second_count_in_it(redis_url: str) -> None:
    """A request checked in the very second an upgrade began (on the snapshot of before it), whose tokens are settled
    once the new period was read, has them counted there on both backends (its event is dated in it); one checked a
    second before has them dropped (billed in the old period)."""
    upgrade = APRIL - 10 * DAY
    async with twins(redis_url, upgrade - 1) as w:
        await w.store(period(MARCH, APRIL, upgrade - 1, "v1"))
        early, theirs_early = await w.reserve("normal")
        w.settle((early.period, theirs_early.period), early.bucket, tokens=0, billed=True)
        w.now = upgrade
        late, theirs_late = await w.reserve("normal")
        w.settle((late.period, theirs_late.period), late.bucket, tokens=0, billed=True)
        assert (await w.compare())[1:] == (2, 0, {})
        await w.invalidate()  # (the upgrade's webhook)
        w.now = upgrade + 2
        await w.store(period(upgrade, APRIL, upgrade + 1, "v2"))  # (the calls since it began carried over)
        assert (await w.compare())[1:] == (1, 0, {})
        w.settle((early.period, theirs_early.period), None, tokens=50, billed=False, checked=early.bucket)
        w.settle((late.period, theirs_late.period), None, tokens=70, billed=False, checked=late.bucket)
        assert (await w.compare())[1:] == (1, 70, {})


async def test_every_script_run_keeps_to_one_cluster_slot(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each script the backend runs (check, settle, store, lock, invalidate...) names keys of one Redis Cluster hash
    slot, whatever the org id (empty, starting with "}", holding braces): a cluster refuses a script whose keys
    span slots (CROSSSLOT)."""
    runs: list[list[str]] = []
    original_call, original_queue = _Script.__call__, _Script.queue

    async def call(self: _Script, *, keys: list[Any], args: list[Any]) -> Any:
        runs.append([str(key) for key in keys])
        return await original_call(self, keys=keys, args=args)

    def queue(self: _Script, pipe: Any, *, keys: list[Any], args: list[Any], load: bool) -> None:
        runs.append([str(key) for key in keys])
        original_queue(self, pipe, keys=keys, args=args, load=load)

    monkeypatch.setattr(_Script, "__call__", call)
    monkeypatch.setattr(_Script, "queue", queue)
    red = RedisBackend(redis_url, QuotaConfig(redis_prefix=f"scripts:{uuid.uuid4().hex[:8]}:"))
    try:
        for org_id in ("", "}x", "a{b}c", "{org}", "org_1"):
            now = APRIL + 1
            blind = await red.reserve(org_id, now, "blind", None)
            assert await red.try_lock(org_id, 30, now)
            await red.store(org_id, period(APRIL, MAY, now, "v1"), now)
            allowed = await red.reserve(org_id, now, "normal", None)
            red.settle(org_id, blind.period, blind.bucket, now, tokens=5, billed=True)
            red.settle(org_id, allowed.period, None, now, tokens=5, billed=False, checked=allowed.bucket)
            await red.flush()
            await red.compact(org_id, int(now))
            await red.mark_due(org_id)
            await red.invalidate(org_id)
    finally:
        await red.aclose()
    assert len(runs) > 40 and len({key_slot(keys[0].encode()) for keys in runs}) > 1  # (orgs spread over slots)
    assert [keys for keys in runs if len({key_slot(key.encode()) for key in keys}) != 1] == []
