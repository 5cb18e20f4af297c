"""The quota gate's counts at the edges of a subscription's life (review), in process and with Redis, on the emulator:

1. ``QuotaGate.invalidate(org, webhook_type=...)``: a usage webhook (``alert.triggered``,
   ``subscription.usage_threshold_reached``) marks the org's snapshot due instead of dropping it: the org keeps being
   decided on it while Lago's API is down (not the fail policy), and the org's failure backoff is kept (no Lago read
   per webhook while Lago fails). A ``subscription.terminated`` one still drops it (never served as active again).
2. A subscription replaced mid-period (an upgrade, no webhook): the calls recorded and in flight since the new period
   began, which Lago cannot have counted yet, are kept when the new period's snapshot is stored (they were all
   dropped: the org under-counted until the next refresh).
3. A subscription whose ``started_at`` is later the same day (active in Lago, which ignores events before it): the
   calls before it are served and not counted (they were, answering 429 "used 2 of 2" while Lago showed 0); the
   limits hold from the start.
4. A subscription moved to another customer (no webhook): ``current_usage`` on the cached customer answers 405 (404
   customer_not_found when that customer was deleted); the subscription is read again before concluding (it was
   answered 402, or its refreshes failed, until the next plan read).

A settable clock; the emulator's fault rules for Lago outages; no sleeps as synchronisation.
"""

# ruff: noqa: F811 (test_quota_redis's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from _quota_app import REDIS_SERVER, Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago
from test_quota_redis import _OPEN, _close_gates, prefix  # noqa: F401 (its fixtures)

pytestmark = pytest.mark.anyio

BACKENDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")),
]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on starter (2 calls per period); plus (3 calls, an upgrade from starter)."""
    lago = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0"}}
    lago.add_plan("plus", amount_cents=2_000, charges=[charge], entitlements={"api_quota": {"max_api_calls": 3}})
    return lago


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, fail_open=False)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def running(
    client: LagoClient, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str, n: int = 1
) -> AsyncIterator[list[QuotaGate]]:
    """``n`` gates (workers) of ``client`` on the test's clock, sharing Redis for ``backend == "redis"``."""
    settings = client.settings
    if backend == "redis":
        settings = settings.replace(redis_url=request.getfixturevalue("redis_url"))
    config = QuotaConfig(cold_timeout=5.0, redis_prefix=prefix)
    gates = [QuotaGate(settings, client, config=config, clock=clock.time) for _ in range(n)]
    _OPEN.extend(gates)
    async with anyio.create_task_group() as tasks:
        for gate in gates:
            await tasks.start(gate.run)
        yield gates
        tasks.cancel_scope.cancel()
    for gate in gates:
        await gate.aclose()


async def refreshed(*gates: QuotaGate) -> None:
    """Every refresh in flight of ``gates`` ended."""
    for gate in gates:
        while gate._refreshing:
            for event in list(gate._refreshing.values()):
                await event.wait()


async def flushed(gate: QuotaGate) -> None:
    if isinstance(gate.backend, RedisBackend):
        await gate.backend.flush()


def header(decision: Any, name: str) -> str | None:
    return dict((k.decode(), v.decode()) for k, v in decision.headers).get(name)


async def served(gate: QuotaGate, org_id: str, calls: int) -> list[bool]:
    out = []
    for _ in range(calls):
        decision = await gate.check(org_id)
        if decision.allowed:
            gate.settle(org_id, decision, tokens=0, billed=True)
        out.append(decision.allowed)
    await flushed(gate)
    return out


# ------------------------------------------------------------------- 1. usage webhooks mark the snapshot due


async def test_an_alert_webhook_keeps_the_org_decided_on_its_snapshot_while_lago_is_down(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """org_1 read (1 call of 2 used); Lago's API goes down; an ``alert.triggered`` webhook comes (Lago's webhook
    workers still run). The org's snapshot was dropped: its next request waited for a read that failed and got the
    fail policy (503, LAGO_FAIL_OPEN=false) while the old snapshot could decide. Now it is marked due: decided on it,
    with the workers sharing Redis too; once Lago answers, the next request refreshes it."""
    async with running(client, clock, backend, request, prefix, n=2 if backend == "redis" else 1) as gates:
        gate = gates[0]
        assert await served(gate, "org_1", 1) == [True]
        fake.faults.inject(503)
        await gate.invalidate("org_1", webhook_type="alert.triggered")
        decisions = [await gate.check("org_1") for gate in gates]  # (the 2nd: another worker, on Redis's copy)
        assert [(d.allowed, d.status) for d in decisions] == [(True, None), (False, 429)][: len(gates)]
        assert header(decisions[0], "ratelimit-limit") == "2"
        await refreshed(*gates)
        fake.faults.clear()
        clock.advance(gate.config.failure_backoff + 1)
        reads = sum(g.stats["refreshes"] for g in gates)
        await gate.check("org_1")  # due: refreshed now that Lago answers
        await refreshed(*gates)
        assert sum(g.stats["refreshes"] for g in gates) == reads + 1


async def test_usage_webhooks_keep_the_failure_backoff(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """A refresh of org_1 failed (Lago down): no read before ``failure_backoff``. Each usage webhook cleared that
    backoff and dropped the snapshot: one more Lago read per webhook, each request waiting for it. Now none."""
    async with running(client, clock, backend, request, prefix) as (gate,):
        assert await served(gate, "org_1", 1) == [True]
        clock.advance(gate.ttl + 1)
        fake.faults.inject(503)
        assert (await gate.check("org_1")).allowed  # due: its refresh fails
        await refreshed(gate)
        assert gate.stats["refresh_errors"] == 1
        reads = gate.stats["refreshes"]
        for kind in ("alert.triggered", "subscription.usage_threshold_reached", "alert.triggered"):
            await gate.invalidate("org_1", webhook_type=kind)
            decision = await gate.check("org_1")
            assert (decision.allowed, decision.status) == (False, 429)  # 2 of 2 used: on its snapshot
            await refreshed(gate)
        assert gate.stats["refreshes"] == reads


async def test_a_terminated_webhook_still_drops_the_snapshot(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """``subscription.terminated``: never served as active again; with Lago down meanwhile, the fail policy."""
    async with running(client, clock, backend, request, prefix) as (gate,):
        assert await served(gate, "org_1", 1) == [True]
        fake.faults.inject(503)
        await gate.invalidate("org_1", webhook_type="subscription.terminated")
        down = await gate.check("org_1")
        fake.faults.clear()
        fake.store.terminate_subscription("org_1", {})
        await gate.invalidate("org_1", webhook_type="subscription.terminated")
        gone = await gate.check("org_1")
    assert (down.allowed, down.status) == (False, 503)
    assert (gone.allowed, gone.status) == (False, 402)


# ------------------------------------------------------------------- 2. the records of a new period kept


async def test_an_upgrade_without_a_webhook_keeps_the_calls_lago_has_not_counted_yet(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """org_1 upgraded to plus (3 calls) at T, no webhook. At T its snapshot (starter's: 2 calls) is due: 1 call served
    and recorded, 1 in flight, none in Lago yet (within settle_lag); the refresh reads the new subscription, its
    period begun at T. Storing it dropped every local record: the org had 3 more calls, 5 in all on a limit of 3.
    Now the calls made since T are kept (in flight included, its settle applied there), and the 4th is refused."""
    async with running(client, clock, backend, request, prefix) as (gate,):
        gate.settle("org_1", await gate.check("org_1"), tokens=0, billed=False)  # (cold read; released)
        clock.advance(3600)
        fake.add_subscription("org_1", "plus")  # upgrade: at once, a new period from now
        assert await served(gate, "org_1", 1) == [True]  # (its refresh starts)
        in_flight = await gate.check("org_1")
        assert in_flight.allowed
        await refreshed(gate)
        assert (await gate.get_org_plan_limits("org_1"))["plan_code"] == "plus"
        after = await served(gate, "org_1", 2)
        gate.settle("org_1", in_flight, tokens=0, billed=True)
        await flushed(gate)
        usage = await gate.enforce_usage_limits("org_1")
    assert after == [True, False]
    assert usage["usage"]["max_api_calls"] == 3


async def test_records_made_before_the_new_period_are_not_kept(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """The other side: calls of the old subscription (before T) are not carried into the new period."""
    async with running(client, clock, backend, request, prefix) as (gate,):
        assert await served(gate, "org_1", 2) == [True, True]
        clock.advance(3600)
        fake.add_subscription("org_1", "plus")
        await gate.invalidate("org_1", webhook_type="subscription.started")
        assert await served(gate, "org_1", 4) == [True, True, True, False]


# ------------------------------------------------------------------- 3. a subscription starting later today


async def test_calls_before_a_subscriptions_start_are_served_and_not_counted(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """org_2 subscribed at 12:00 with ``subscription_at`` 18:00 the same day: active in Lago, which ignores events
    dated before 18:00. The gate counted them: 429 "used 2 of 2" at the 3rd call while Lago showed 0. Now they are
    served uncounted; from 18:00 the limit holds (2 calls, then 429)."""
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "starter", subscription_at="2026-03-10T18:00:00Z")
    async with running(client, clock, backend, request, prefix) as (gate,):
        before = await served(gate, "org_2", 4)
        usage = await gate.enforce_usage_limits("org_2")
        clock.at = dt.datetime(2026, 3, 10, 18, 0, 1, tzinfo=dt.timezone.utc)
        after = await served(gate, "org_2", 3)
    assert before == [True] * 4
    assert usage["usage"]["max_api_calls"] == 0
    assert after == [True, True, False]


# ------------------------------------------------------------------- 4. a subscription moved to another customer


async def test_a_subscription_moved_to_another_customer_is_read_again_not_402(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """org_1's subscription terminated on customer org_1 and made again on customer org_1_eu (same external_id), no
    webhook wired. Its usage refresh (plan cached: within plan_ttl) asks current_usage of org_1: 405
    no_active_subscription, taken for "no subscription": 402 until the plan's next read (5 minutes). Now the
    subscription is read again first: the org is served on its new customer's usage."""
    async with running(client, clock, backend, request, prefix) as (gate,):
        assert await served(gate, "org_1", 1) == [True]
        fake.store.terminate_subscription("org_1", {})
        fake.add_customer("org_1_eu")
        fake.add_subscription("org_1_eu", "starter", external_id="org_1")
        clock.advance(gate.ttl + 1)
        await gate.check("org_1")  # due: refreshed
        await refreshed(gate)
        decision = await gate.check("org_1")
        limits = await gate.get_org_plan_limits("org_1")
    assert (decision.allowed, decision.status) == (True, None)
    assert limits["plan_code"] == "starter"


async def test_a_subscription_moved_off_a_deleted_customer_is_read_again(
    client: LagoClient, fake: FakeLago, clock: Clock, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """The same, the old customer deleted (its subscription terminated with it): ``current_usage`` on it answers 404
    customer_not_found, which failed every refresh (the stale snapshot served, then the fail policy) until the plan's
    next read. Now the subscription is read again, on its new customer."""
    async with running(client, clock, backend, request, prefix) as (gate,):
        assert await served(gate, "org_1", 1) == [True]
        fake.store.delete_customer("org_1")
        fake.add_customer("org_1_eu")
        fake.add_subscription("org_1_eu", "starter", external_id="org_1")
        clock.advance(gate.ttl + 1)
        await gate.check("org_1")
        await refreshed(gate)
        snapshot = await gate.snapshot("org_1")
    assert (snapshot.active, snapshot.customer_id, gate.stats["refresh_errors"]) == (True, "org_1_eu", 0)
