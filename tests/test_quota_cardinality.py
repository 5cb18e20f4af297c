"""A hostile (or just very large) client population sending a fresh org id, user id, idempotency
key or path on every request. Every per-key structure stays bounded, and the Lago reads they trigger are bounded.

Every figure is a count (queued refreshes, Lago calls, keys, entries): no sleeps as synchronisation, no timing
assertions. Each test failed on the code before its fix.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _quota_app import Clock, needs_redis
from lago_org_billing import BillingSettings
from lago_org_billing._errors import LagoNotFoundError
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate

pytestmark = pytest.mark.anyio


PERIOD_START = "2026-03-01T00:00:00Z"
PERIOD_END = "2026-03-31T23:59:59Z"


class SlowLago:
    """A LagoClient stand-in (the two reads the gate makes): ``real`` orgs have a subscription, any other id is
    Lago's 404. While ``hold`` is set, every read waits for ``release`` (a slow or hung Lago)."""

    def __init__(self, real: tuple[str, ...] = (), *, limit: int = 1000) -> None:
        self.real = set(real)
        self.limit = limit
        self.hold = False
        self.release = anyio.Event()
        self.log: list[tuple[str, str]] = []

    async def _read(self, kind: str, org: str) -> None:
        self.log.append((kind, org))
        if self.hold:
            await self.release.wait()

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        await self._read("sub", external_id)
        if external_id not in self.real:
            raise LagoNotFoundError("Not Found", status=404, code="not_found")
        return {
            "external_id": external_id,
            "external_customer_id": external_id,
            "status": "active",
            "plan_code": "starter",
            "current_billing_period_started_at": PERIOD_START,
            "current_billing_period_ending_at": PERIOD_END,
            "entitlements": [{"code": "api_quota", "privileges": [{"code": "max_api_calls", "value": self.limit}]}],
        }

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        await self._read("usage", subscription)
        return {
            "from_datetime": PERIOD_START,
            "to_datetime": PERIOD_END,
            "charges_usage": [
                {
                    "billable_metric": {"code": "api_call", "aggregation_type": "sum_agg"},
                    "events_count": 0,
                    "units": "0",
                }
            ],
        }


def stub_gate(lago: SlowLago, clock: Clock, *, redis_url: str | None = None, **config: Any) -> QuotaGate:
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k", redis_url=redis_url)
    return QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]


async def settle_refreshes(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


async def let_tasks_run() -> None:
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


# ------------------------------------------------------------------------------- 1. cold refresh queue


async def test_a_flood_of_unknown_org_ids_keeps_the_cold_refresh_queue_bounded() -> None:
    """LAGO_ORG_HEADER (spoofable) and a slow Lago: every request naming a fresh org id is cold, waits
    ``cold_timeout``, is answered (fail-open here) and leaves its refresh queued behind the
    ``max_concurrent_refreshes`` running ones. Nothing bounded that queue: 2,000 fake ids left 2,000 refresh tasks
    in memory (a sustained flood grows it without end), and once Lago answered, every one of them read Lago for an
    org whose request was answered long before (2,000 GET /subscriptions)."""
    clock = Clock()
    lago = SlowLago()
    lago.hold = True
    # at most min(max_orgs, 10,000) cold refreshes queued: 100 here (a fleet's deploy is covered by the default)
    gate = stub_gate(lago, clock, max_concurrent_refreshes=2, cold_timeout=0.0, max_orgs=100)
    flood = 2_000
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        for i in range(flood):
            decision = await gate.check(f"fake-{i}")
            assert decision.allowed  # fail-open: the cold request is not held
            await let_tasks_run()
        pending = len(gate._refreshing)
        lago.release.set()
        await settle_refreshes(gate)
        tasks.cancel_scope.cancel()
    reads = len(lago.log)
    assert pending <= 100 + 2, f"{pending} refreshes pending after a flood of {flood} fake org ids"
    assert reads <= 100 + 2, f"{reads} Lago reads for {flood} fake org ids whose requests were answered"
    assert gate.stats["fail_open"] == flood  # every request answered at once (LAGO_FAIL_OPEN), none held


# ------------------------------------------------------------------------------------------ 2. Redis keys


@needs_redis
async def test_redis_keys_of_unknown_org_ids_expire_within_hours(redis_url: str) -> None:
    """With Redis, every fresh org id leaves keys the whole fleet keeps: its "no subscription" snapshot (Lago's 404)
    and, when its request is let through without one (LAGO_FAIL_OPEN: Lago slow, rate-limited or down, the cold
    queue full), a counter. Both lived 24 h, whereas the snapshot is due again after the TTL (30 s) and a counter
    that never gets a snapshot holds nothing a snapshot would keep after ``inflight_horizon`` (1 h): a flood of
    fake ids at 1,000/s kept ~86 M keys in Redis. They should expire within a couple of hours."""
    clock = Clock()
    lago = SlowLago()
    prefix = f"card:{uuid.uuid4().hex[:8]}:"
    gate = stub_gate(lago, clock, redis_url=redis_url, redis_prefix=prefix, cold_timeout=0.0)
    backend: Any = gate.backend
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            lago.hold = False
            first = await gate.snapshot("fake-404")  # read from Lago: 404, no subscription
            assert not first.active
            lago.hold = True  # Lago slow from now on: a cold org is let through (fail-open), counted blind
            decision = await gate.check("fake-blind")
            assert decision.allowed
            gate.settle("fake-blind", decision, tokens=0, billed=True)
            # billed without a check (its org known only once the app ran: a JWT resolver in the app)
            gate.settle("fake-late", QuotaDecision(), tokens=5, billed=True)
            await backend.flush()
            snap_ttl = await backend.redis.pttl(backend.key("fake-404", "snap"))
            count_ttl = await backend.redis.pttl(backend.key("fake-blind", "count"))
            late_ttl = await backend.redis.pttl(backend.key("fake-late", "count"))
            lago.release.set()
            await settle_refreshes(gate)
            tasks.cancel_scope.cancel()
    finally:
        await gate.aclose()
    two_hours = 2 * 3_600_000 + 60_000
    assert 0 < snap_ttl <= two_hours, f"the snapshot of an org Lago does not know lives {snap_ttl / 3_600_000:.1f} h"
    assert 0 < count_ttl <= two_hours, f"a counter of an org without snapshot lives {count_ttl / 3_600_000:.1f} h"
    assert 0 < late_ttl <= two_hours, f"a counter made by a settle lives {late_ttl / 3_600_000:.1f} h"


# --------------------------------------------------------------------------------------- 3. LocalBackend LRU


async def test_a_flood_of_unknown_org_ids_does_not_evict_a_recently_used_org_over_its_quota() -> None:
    """LocalBackend over ``max_orgs`` forgot first *every* org with nothing counted locally, however recently used:
    a real org over its quota (blocked requests count nothing) goes before ids seen once that were let through
    (fail-open: counted). A flood of fresh ids while Lago is slow (or pausing after the flood's own 429s) evicted
    it, its next request was cold and LAGO_FAIL_OPEN let the over-quota org through. Recently used orgs should
    outlive ids seen once."""
    clock = Clock()
    lago = SlowLago(real=("over",), limit=0)  # a plan with no call left
    gate = stub_gate(lago, clock, max_orgs=50, cold_timeout=0.0)
    over_allowed = 0
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert not (await gate.check("over")).allowed
        await settle_refreshes(gate)
        lago.hold = True  # Lago slow from now on
        for i in range(200):  # fresh ids, let through (fail-open); the real org's client keeps retrying meanwhile
            decision = await gate.check(f"fake-{i}")
            gate.settle(f"fake-{i}", decision, tokens=0, billed=True)
            if i % 5 == 4:
                over_allowed += (await gate.check("over")).allowed
        lago.release.set()
        await settle_refreshes(gate)
        tasks.cancel_scope.cancel()
    reads = [kind for kind, org in lago.log if org == "over"]
    assert over_allowed == 0, f"the over-quota org was let through {over_allowed} times"
    assert reads == ["sub", "usage"], f"the recently used org was read from Lago again: {reads}"
