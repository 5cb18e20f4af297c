"""The quota gate when the host's wall clock steps (NTP correcting a clock that ran ahead, a VM whose clock was set
wrong at boot): times the gate stored on the old clock (a snapshot's ``refresh_at``/``requested_at``, the 1-second
buckets of its records, failure backoffs, a 429 pause) lie in the future of the corrected clock.

A settable host clock (the gate's); Lago is a stub whose answers do not depend on the host's clock (Lago's own clock
is right). Counts only (decisions, Lago reads), no sleeps as synchronisation.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _quota_app import Clock, subscription_answer
from lago_org_billing import BillingSettings
from lago_org_billing._errors import LagoRateLimitError, LagoUnavailableError
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate

pytestmark = pytest.mark.anyio


UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
APRIL = dt.datetime(2026, 4, 1, tzinfo=UTC)
MARCH_PERIOD = ("2026-03-01T00:00:00Z", "2026-03-31T23:59:59Z")
APRIL_PERIOD = ("2026-04-01T00:00:00Z", "2026-04-30T23:59:59Z")
HOURS_2 = 2 * 3600.0

_OPEN: list[QuotaGate] = []


@pytest.fixture(autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


class HostLago:
    """Lago with its own (right) clock: ``period`` is the period it reports, ``usage[org]`` the calls it counted;
    ``down``: reads fail; ``throttle``: reads answer 429 (Retry-After 1 s)."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.period = MARCH_PERIOD
        self.usage: dict[str, int] = {}
        self.down = False
        self.throttle = False
        self.reads = 0

    async def _enter(self) -> None:
        self.reads += 1
        await anyio.lowlevel.checkpoint()
        if self.throttle:
            raise LagoRateLimitError("slow down (test)", status=429, retry_after=1.0)
        if self.down:
            raise LagoUnavailableError("Lago is down (test)")

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        await self._enter()
        return subscription_answer(external_id, self.period, [{"code": "max_api_calls", "value": self.limit}])

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        await self._enter()
        return {
            "from_datetime": self.period[0],
            "to_datetime": self.period[1],
            "charges_usage": [
                {
                    "billable_metric": {"code": "api_call", "aggregation_type": "sum_agg"},
                    "events_count": self.usage.get(subscription, 0),
                    "units": "0",
                }
            ],
        }


def make_gate(
    lago: HostLago, clock: Clock, redis: str | None = None, *, fail_open: bool = True, **config: Any
) -> QuotaGate:
    settings = BillingSettings(
        api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=redis, fail_open=fail_open
    )
    if redis:
        config.setdefault("redis_prefix", f"clockjump:{uuid.uuid4().hex[:8]}:")
    gate = QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]
    _OPEN.append(gate)
    return gate


async def settled(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


def no_redis_errors(gate: QuotaGate) -> None:
    """(A Redis test that fell back to counting in process would prove nothing about the scripts.)"""
    assert getattr(gate.backend, "stats", {}).get("redis_errors", 0) == 0


def remaining(decision: QuotaDecision) -> int:
    return int(dict(decision.headers)[b"ratelimit-remaining"])


async def call(gate: QuotaGate, org: str) -> QuotaDecision:
    """One gated request, billed when allowed."""
    decision = await gate.check(org)
    if decision.allowed:
        gate.settle(org, decision, tokens=0, billed=True)
    return decision


async def flushed(gate: QuotaGate) -> None:
    flush = getattr(gate.backend, "flush", None)
    if flush is not None:
        await flush()


async def refreshed(gate: QuotaGate, org: str) -> QuotaDecision:
    """A request that finds the snapshot due (starting its refresh), then the refresh's end."""
    decision = await call(gate, org)
    await settled(gate)
    await flushed(gate)
    return decision


# ------------------------------------------------------------------------ 1. a step back within a period


async def test_a_clock_stepped_back_does_not_freeze_the_orgs_snapshot(redis: str | None) -> None:
    """The host's clock ran 2 h ahead and NTP steps it back. The snapshot read before the step has ``refresh_at``
    and ``requested_at`` 2 h in the future of the corrected clock: it must not serve for 2 h without a refresh (and a
    refresh must not be refused as older than it): the org's usage counted elsewhere (90 more calls, another
    service) is seen after the next TTL, not 2 h later."""
    clock = Clock(T0)
    lago = HostLago(limit=100)
    gate = make_gate(lago, clock, redis)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        for _ in range(10):
            assert (await call(gate, "org_1")).allowed
        await settled(gate)
        await flushed(gate)
        lago.usage["org_1"] = 10
        clock.advance(gate.ttl + gate.config.settle_lag + 1)
        await refreshed(gate, "org_1")  # a normal refresh: the 10 calls are in Lago's 10
        lago.usage["org_1"] = 11 + 90  # this deployment's 11th call, and 90 made elsewhere
        clock.advance(-HOURS_2)  # NTP steps the clock back
        clock.advance(gate.ttl + gate.config.settle_lag + 1)  # a TTL and more since the last refresh
        await refreshed(gate, "org_1")
        decision = await call(gate, "org_1")
        assert not decision.allowed, "the org's usage at Lago (101 of 100) is not seen: the snapshot is frozen"
        no_redis_errors(gate)
        tasks.cancel_scope.cancel()


async def test_records_made_before_a_step_back_are_not_counted_twice_for_the_whole_step(redis: str | None) -> None:
    """50 calls recorded just before the clock is stepped back 2 h carry buckets 2 h in the future of the corrected
    clock. Once Lago has counted them (its usage 50), a refresh's base includes them: they must leave the local
    records one refresh later (the first refresh after the step cannot tell whether Lago had them when it read), not
    stay counted twice (100 of 100: a false 429) until the clock is back where they were made, 2 h later."""
    clock = Clock(T0)
    lago = HostLago(limit=100)
    gate = make_gate(lago, clock, redis)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert (await call(gate, "org_1")).allowed  # the first snapshot (usage 0)
        await settled(gate)
        for _ in range(49):
            assert (await call(gate, "org_1")).allowed
        await settled(gate)
        await flushed(gate)
        lago.usage["org_1"] = 50  # delivered
        clock.advance(-HOURS_2)
        for _ in range(2):  # two TTLs: two refreshes
            clock.advance(gate.ttl + gate.config.settle_lag + 1)
            if (await refreshed(gate, "org_1")).allowed:
                lago.usage["org_1"] += 1  # (delivered before the next refresh)
        decision = await gate.check("org_1")
        assert decision.allowed, decision.problem
        assert remaining(decision) == 100 - lago.usage["org_1"] - 1
        no_redis_errors(gate)
        tasks.cancel_scope.cancel()


# ------------------------------------------------------------------------ 2. backoffs stamped on the old clock


async def test_a_failure_backoff_stamped_before_a_step_back_does_not_hold_the_org_for_the_step() -> None:
    """Fail-closed. A cold org's refresh fails (Lago down) just before the clock is stepped back 2 h: its
    ``failure_backoff`` (5 s) must not last 2 h (every request of the org answered 503 without asking Lago)."""
    clock = Clock(T0)
    lago = HostLago(limit=100)
    gate = make_gate(lago, clock, fail_open=False, cold_timeout=0.5)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        lago.down = True
        assert (await gate.check("org_1")).status == 503
        lago.down = False
        clock.advance(-HOURS_2)
        clock.advance(gate.config.failure_backoff + 1)
        decision = await gate.check("org_1")
        assert decision.allowed, decision.problem
        no_redis_errors(gate)
        tasks.cancel_scope.cancel()


async def test_a_429_pause_stamped_before_a_step_back_does_not_stop_refreshes_for_the_step() -> None:
    """Lago answers a refresh 429 (Retry-After 1 s) just before the clock is stepped back 2 h: the pause of every
    refresh must not last 2 h (every cold org fail-closed, no snapshot refreshed)."""
    clock = Clock(T0)
    lago = HostLago(limit=100)
    gate = make_gate(lago, clock, fail_open=False, cold_timeout=0.5)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        lago.throttle = True
        assert (await gate.check("org_1")).status == 503
        lago.throttle = False
        clock.advance(-HOURS_2)
        clock.advance(gate.config.failure_backoff + 2)
        decision = await gate.check("org_2")
        assert decision.allowed, decision.problem
        no_redis_errors(gate)
        tasks.cancel_scope.cancel()


async def test_a_plan_read_before_a_step_back_is_read_again_after_plan_ttl(redis: str | None) -> None:
    """The subscription part read just before the clock is stepped back 2 h is stamped 2 h ahead: ``plan_ttl`` (the
    safety net when a webhook is missed) must not become 2 h: a limit raised at Lago (100 to 200, no webhook) is
    seen once ``plan_ttl`` has passed."""
    clock = Clock(T0)
    lago = HostLago(limit=100)
    gate = make_gate(lago, clock, redis, plan_ttl=60.0)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert remaining(await call(gate, "org_1")) == 99
        await settled(gate)
        lago.limit = 200
        clock.advance(-HOURS_2)
        for _ in range(3):  # a refresh every TTL; the plan's read again after plan_ttl
            clock.advance(gate.ttl + 1)
            await refreshed(gate, "org_1")
        decision = await gate.check("org_1")
        assert dict(decision.headers)[b"ratelimit-limit"] == b"200"
        no_redis_errors(gate)
        tasks.cancel_scope.cancel()


# ------------------------------------------------------------------------ 3. a step forward


async def test_calls_served_just_before_a_step_forward_count_until_lago_has_them(redis: str | None) -> None:
    """The host's clock ran 38 h behind (a VM's clock set wrong at boot; Lago's is right) and NTP steps it forward.
    Three calls served just before the step, their events not in Lago yet, look 38 h old to the first read after it,
    whose usage lacks them (1 call): that read dropped them, and a 5-call plan served three more calls (7) until the
    next read. Lago's usage bounds what it lacks whatever the clock says: they count until Lago has them (the plan's
    fifth call served, then 429), and are not counted twice once it has (a limit raised to 7 serves two more)."""
    clock = Clock(T0)
    clock.advance(-38 * 3600)
    lago = HostLago(limit=5)
    lago.usage["org_1"] = 1
    gate = make_gate(lago, clock, redis)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert [(await call(gate, "org_1")).allowed for _ in range(3)] == [True] * 3
        await settled(gate)
        await flushed(gate)
        clock.advance(38 * 3600)  # stepped forward: Lago still has 1 (the 3 on their way)
        reads = lago.reads
        assert (await refreshed(gate, "org_1")).allowed  # the plan's fifth (decided on the read before the step)
        assert lago.reads > reads  # (due: read again)
        allowed = [(await call(gate, "org_1")).allowed for _ in range(3)]
        assert allowed == [False] * 3, "the calls served before the step were dropped by the read after it"
        await flushed(gate)
        lago.usage["org_1"] = 5  # delivered
        lago.limit = 7
        clock.advance(gate.config.settle_lag + 1)
        await gate.invalidate("org_1")  # (subscription.updated: the limit raised)
        assert [(await call(gate, "org_1")).allowed for _ in range(3)] == [True, True, False]
        no_redis_errors(gate)
        tasks.cancel_scope.cancel()
