"""Quota gating in process: limits from entitlements and plan tables, cached snapshots, exact counting,
answers (429/402 + RateLimit headers + RFC 9457 body), fail policies, invalidation, seed helpers."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import TOKENS, Clock, chat, seed
from lago_org_billing import BillingSettings, ConfigurationError, LagoClient, OrgBillingMiddleware, require_quota
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._identity import get_current_org
from lago_org_billing._limits import limits_from_entitlements, usage_totals
from lago_org_billing._quota import (
    PROBLEM_NO_SUBSCRIPTION,
    PROBLEM_QUOTA_EXCEEDED,
    QuotaConfig,
    QuotaGate,
    check_org_has_active_subscription,
    enforce_usage_limits,
    get_org_plan_limits,
)
from lago_org_billing._quota_local import LocalBackend
from lago_org_billing._quota_redis import RedisBackend, decode, encode
from lago_org_billing._snapshots import Snapshot
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    """One settable clock for the gate and the emulator."""
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """A seeded emulator on the test clock (org_1 on starter: 5 calls)."""
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    """A LagoClient on the emulator, without retries (failures are immediate)."""
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


def make_gate(client: LagoClient, clock: Clock, *, config: QuotaConfig | None = None, **changes: Any) -> QuotaGate:
    settings = client.settings.replace(**changes)
    return QuotaGate(settings, client, config=config or QuotaConfig(), clock=clock.time)


def headers(decision: QuotaDecision) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in decision.headers}


def lago_reads(fake: FakeLago) -> int:
    return sum(1 for r in fake.requests if r.method == "GET")


async def test_blocks_at_the_entitlement_limit_with_headers_and_problem(client: LagoClient, clock: Clock) -> None:
    """Limit 5 from the plan's entitlements: 5 allowed (remaining counts down), the 6th is a 429 problem."""
    gate = make_gate(client, clock)
    remaining = []
    for _ in range(5):
        decision = await gate.check("org_1")
        assert decision.allowed and decision.reserved
        remaining.append(headers(decision)["ratelimit-remaining"])
    assert remaining == ["4", "3", "2", "1", "0"]
    blocked = await gate.check("org_1")
    assert not blocked.allowed and blocked.status == 429
    h = headers(blocked)
    period_left = str(int(dt_end() - clock.time()))
    assert h == {
        "ratelimit-limit": "5",
        "ratelimit-remaining": "0",
        "ratelimit-reset": period_left,
        "retry-after": period_left,
    }
    assert blocked.problem is not None
    assert blocked.problem["type"] == PROBLEM_QUOTA_EXCEEDED
    assert blocked.problem["status"] == 429
    assert blocked.problem["limit_name"] == "max_api_calls"
    assert (blocked.problem["limit"], blocked.problem["usage"], blocked.problem["org_id"]) == (5, 5, "org_1")
    assert blocked.problem["period_end"] == "2026-04-01T00:00:00Z"
    response = blocked.response()
    assert response.status_code == 429 and response.headers["retry-after"] == period_left
    assert response.media_type == "application/problem+json"


def dt_end() -> float:
    import datetime as dt

    return dt.datetime(2026, 4, 1, tzinfo=dt.timezone.utc).timestamp()


async def test_cached_snapshot_means_no_lago_call(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """Once an org's snapshot is fresh, checks never call Lago; one refresh follows after the TTL."""
    gate = make_gate(client, clock)
    await gate.check("org_1")
    reads = lago_reads(fake)
    assert reads == 2  # subscription (with entitlements) + current usage
    for _ in range(3):
        await gate.check("org_1")
    assert lago_reads(fake) == reads
    clock.advance(31)
    await gate.check("org_1")  # stale: served from cache, refresh in the background (not running: a task)
    await wait_refreshed(gate)
    usage_calls = [r for r in fake.requests if r.path.endswith("/current_usage")]
    assert len(usage_calls) == 2
    assert usage_calls[0].query["apply_taxes"] == "false"
    assert usage_calls[0].query["billable_metric_code"] == "api_call"
    assert lago_reads(fake) == reads + 1  # the subscription part is kept for plan_ttl


async def wait_refreshed(gate: QuotaGate) -> None:
    for event in list(gate._refreshing.values()):
        await event.wait()


async def test_one_refresh_for_many_cold_requests(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """50 concurrent first requests of a cold org share one subscription read and one usage read."""
    gate = make_gate(client, clock, quota_mode="enforce")
    fake.store.plans["starter"]["entitlements"]["api_quota"]["max_api_calls"] = 30
    results: list[QuotaDecision] = []

    async def one() -> None:
        results.append(await gate.check("org_1"))

    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        async with anyio.create_task_group() as burst:
            for _ in range(50):
                burst.start_soon(one)
        tasks.cancel_scope.cancel()
    assert lago_reads(fake) == 2
    assert sum(d.allowed for d in results) == 30


async def test_usage_already_in_lago_counts(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """Calls Lago already counted this period are the base: 3 ingested of 5 leave 2."""
    clock.advance(120)  # the events, 60 s old, fall after the subscription's start (Lago counts from started_at)
    for n in range(3):
        await client.create_event(
            {"transaction_id": f"t{n}", "external_subscription_id": "org_1", "code": "api_call",
             "timestamp": clock.time() - 60, "properties": {"total_tokens": 4}}
        )  # fmt: skip
    gate = make_gate(client, clock)
    assert [(await gate.check("org_1")).allowed for _ in range(3)] == [True, True, False]
    assert (await gate.enforce_usage_limits("org_1"))["usage"] == {"max_api_calls": 5, "max_tokens": 12}


async def test_entitlement_override_changes_the_limit(client: LagoClient, clock: Clock) -> None:
    """A per-subscription override (enterprise custom limit) replaces the plan value."""
    await client.update_subscription_entitlements("org_1", {"api_quota": {"max_api_calls": 2}})
    gate = make_gate(client, clock)
    assert [(await gate.check("org_1")).allowed for _ in range(3)] == [True, True, False]
    assert await gate.get_org_plan_limits("org_1") == {
        "plan_code": "starter",
        "max_api_calls": 2,
        "max_tokens": None,
        "source": "entitlements",
    }


async def test_plan_change_is_seen_after_invalidation(client: LagoClient, clock: Clock) -> None:
    """Blocked on starter; upgraded to pro: still blocked from the cache until invalidate(), then allowed."""
    gate = make_gate(client, clock)
    for _ in range(5):
        assert (await gate.check("org_1")).allowed
    assert not (await gate.check("org_1")).allowed
    await client.create_subscription(external_customer_id="org_1", plan_code="pro", external_id="org_1")
    assert not (await gate.check("org_1")).allowed  # cached snapshot
    await gate.invalidate("org_1")
    decision = await gate.check("org_1")
    assert decision.allowed
    assert headers(decision)["ratelimit-limit"] == "10000"
    assert headers(decision)["ratelimit-remaining"] == str(10_000 - 6)  # the 5 starter calls still count


async def test_invalidation_as_a_cold_snapshot_lands_is_waited_out(client: LagoClient, clock: Clock) -> None:
    """A webhook invalidates the org just after its first snapshot landed, before the waiting request read it:
    the request waits for the next snapshot (same cold_timeout budget) instead of taking it for an outage."""
    gate = make_gate(client, clock)
    store = gate.local.store
    invalidations: list[str] = []

    async def store_then_invalidate(org_id: str, snapshot: Snapshot, now: float) -> None:
        await store(org_id, snapshot, now)
        if not invalidations:
            invalidations.append(org_id)
            await gate.invalidate(org_id)

    gate.local.store = store_then_invalidate  # type: ignore[method-assign]
    decision = await gate.check("org_1")
    assert invalidations == ["org_1"]
    assert decision.allowed and headers(decision)["ratelimit-remaining"] == "4"  # a real decision, counted
    assert gate.stats["fail_open"] == 0 and gate.stats["refreshes"] == 2


async def test_plan_change_while_a_snapshot_is_fetched_is_not_lost(client: LagoClient, clock: Clock) -> None:
    """The org upgrades (and its webhook invalidates the cache) while a refresh is reading the old plan: the
    refresh reads again, and the new plan's limit applies at once, not after the TTL."""
    gate = make_gate(client, clock)
    fetch = gate.fetch
    upgraded: list[bool] = []

    async def fetch_during_an_upgrade(org_id: str, previous: Snapshot | None = None) -> Snapshot:
        snapshot = await fetch(org_id, previous)
        if not upgraded:
            upgraded.append(True)
            await client.create_subscription(external_customer_id="org_1", plan_code="pro", external_id="org_1")
            await gate.invalidate("org_1")
        return snapshot

    gate.fetch = fetch_during_an_upgrade  # type: ignore[method-assign]
    decision = await gate.check("org_1")
    assert upgraded == [True]
    assert headers(decision)["ratelimit-limit"] == "10000"


async def test_plan_limits_table_is_the_fallback(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """A plan without entitlements takes LAGO_PLAN_LIMITS; entitlements win over the table."""
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "legacy")
    gate = make_gate(client, clock, plan_limits={"legacy": {"max_api_calls": 1}, "starter": {"max_api_calls": 99}})
    assert [(await gate.check("org_2")).allowed for _ in range(2)] == [True, False]
    assert (await gate.get_org_plan_limits("org_2"))["source"] == "plan_limits"
    assert (await gate.get_org_plan_limits("org_1"))["max_api_calls"] == 5


async def test_unlimited_org_costs_one_read_and_no_headers(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """No limit anywhere: allowed without RateLimit headers, and current usage is never asked."""
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "legacy")
    gate = make_gate(client, clock)
    decision = await gate.check("org_2")
    assert decision.allowed and decision.headers == ()
    assert not any(r.path.endswith("/current_usage") for r in fake.requests)


async def test_no_active_subscription_is_402(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """An org without subscription gets a 402 problem; the answer is cached; 'allow' lets it through."""
    gate = make_gate(client, clock)
    decision = await gate.check("org_unknown")
    assert not decision.allowed and decision.status == 402
    assert decision.problem is not None and decision.problem["type"] == PROBLEM_NO_SUBSCRIPTION
    reads = lago_reads(fake)
    assert (await gate.check("org_unknown")).status == 402
    assert lago_reads(fake) == reads
    assert not await gate.check_org_has_active_subscription("org_unknown")
    assert await gate.check_org_has_active_subscription("org_1")
    allowing = make_gate(client, clock, config=QuotaConfig(no_subscription="allow"))
    assert (await allowing.check("org_unknown")).allowed


async def test_an_org_id_lago_cannot_address_has_no_subscription(
    client: LagoClient, fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An org id whose subscription id cannot be put in a Lago URL ("acme.com": Rails reads the dot as a format)
    has no subscription this package can make or read: a 402, said once, not "Lago unreachable", which the default
    LAGO_FAIL_OPEN let through unlimited (and unbilled: its events had no subscription)."""
    gate = make_gate(client, clock)
    for org_id in ("acme.com", "acme.com", "other.org"):  # (said once, not per org: a header could flood the log)
        decision = await gate.check(org_id)
        assert not decision.allowed and decision.status == 402
        clock.advance(60)
    assert gate.stats["fail_open"] == 0 and gate.stats["refresh_errors"] == 0
    assert caplog.text.count("has no subscription Lago can address") == 1


async def test_terminated_subscription_is_402_after_invalidation(client: LagoClient, clock: Clock) -> None:
    """Terminating the subscription (then invalidating, as the webhook does) blocks with 402."""
    gate = make_gate(client, clock)
    assert (await gate.check("org_1")).allowed
    await client.terminate_subscription("org_1")
    await gate.invalidate("org_1")
    assert (await gate.check("org_1")).status == 402


async def test_token_limit_checked_before_and_counted_after(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """max_tokens 25: requests pass while tokens remain, settle adds them, the exhausted org is blocked."""
    fake.store.plans["starter"]["entitlements"]["api_quota"] = {"max_tokens": 25}
    gate = make_gate(client, clock)
    for _ in range(3):  # 0, 10, 20 tokens used before each: all allowed
        decision = await gate.check("org_1")
        assert decision.allowed
        gate.settle("org_1", decision, tokens=TOKENS, billed=True)
    blocked = await gate.check("org_1")
    assert not blocked.allowed and blocked.problem is not None
    assert (blocked.problem["limit_name"], blocked.problem["usage"], blocked.problem["limit"]) == ("max_tokens", 30, 25)
    assert headers(blocked)["ratelimit-limit"] == "25"


async def test_unbilled_requests_release_their_call(client: LagoClient, clock: Clock) -> None:
    """A reserved call whose request was not billed (5xx) is given back."""
    gate = make_gate(client, clock)
    for _ in range(10):
        decision = await gate.check("org_1")
        assert decision.allowed
        gate.settle("org_1", decision, tokens=0, billed=False)
    assert (await gate.enforce_usage_limits("org_1"))["remaining"]["max_api_calls"] == 5


async def test_late_resolved_billed_requests_count(client: LagoClient, clock: Clock) -> None:
    """A request billed without a check (org resolved after the app ran) still counts."""
    gate = make_gate(client, clock)
    await gate.check("org_1")
    gate.settle("org_1", QuotaDecision(), tokens=3, billed=True)
    status = await gate.enforce_usage_limits("org_1")
    assert status["usage"] == {"max_api_calls": 2, "max_tokens": 3}


async def test_monitor_mode_never_blocks(client: LagoClient, clock: Clock) -> None:
    """monitor: the 6th request is allowed with would_block and the problem it would have got."""
    gate = make_gate(client, clock, quota_mode="monitor")
    decisions = [await gate.check("org_1") for _ in range(7)]
    assert all(d.allowed for d in decisions)
    assert [d.would_block for d in decisions] == [False] * 5 + [True] * 2
    assert decisions[5].problem is not None and decisions[5].status == 429
    assert gate.stats["would_block"] == 2 and gate.stats["blocked"] == 0


async def test_status_402_for_over_quota_and_no_headers_when_disabled(client: LagoClient, clock: Clock) -> None:
    """QuotaConfig(over_quota_status=402, headers=False): 402 when over, no headers on allowed answers."""
    gate = make_gate(client, clock, config=QuotaConfig(over_quota_status=402, headers=False))
    decisions = [await gate.check("org_1") for _ in range(6)]
    assert decisions[0].headers == ()
    assert decisions[5].status == 402 and headers(decisions[5])["retry-after"]


async def test_lago_down_cold_org_fail_open(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """Lago unreachable for a cold org: allowed (fail open), counted, and counted once Lago is back."""
    fake.inject_fault(status=503)
    gate = make_gate(client, clock)
    decision = await gate.check("org_1")
    assert decision.allowed and decision.reserved and decision.headers == ()
    assert gate.stats["fail_open"] == 1 and gate.stats["refresh_errors"] == 1
    assert (await gate.check("org_1")).allowed  # no new attempt within failure_backoff
    assert gate.stats["refresh_errors"] == 1
    fake.clear_faults()
    clock.advance(6)
    decision = await gate.check("org_1")  # Lago is back: snapshot, and the 2 fail-open calls count
    assert headers(decision)["ratelimit-remaining"] == "2"


async def test_an_outage_is_logged_once_not_per_org(
    client: LagoClient, fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago down: every org's refresh fails; one WARNING says so (then DEBUG) until a refresh works again, which
    is said at INFO; the next outage is said again. (One WARNING per org: 10,000 active orgs, 10,000 lines.)"""
    import logging

    fake.inject_fault(status=503)
    gate = make_gate(client, clock)
    for n in range(30):
        await gate.check(f"org_{n}")
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "Could not refresh" in r.getMessage()]
    assert gate.stats["refresh_errors"] == 30 and len(warned) == 1
    fake.clear_faults()
    clock.advance(6)
    await gate.check("org_1")
    await wait_refreshed(gate)
    assert "Lago answers again" in caplog.text
    fake.inject_fault(status=503)
    clock.advance(6)
    await gate.check("org_99")
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "Could not refresh" in r.getMessage()]
    assert len(warned) == 2


async def test_lago_down_cold_org_fail_closed(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """LAGO_FAIL_OPEN=false: a cold org is refused with 503 + Retry-After while Lago is down."""
    fake.inject_fault(status=503)
    gate = make_gate(client, clock, fail_open=False)
    decision = await gate.check("org_1")
    assert not decision.allowed and decision.status == 503 and headers(decision)["retry-after"] == "5"
    assert gate.stats["fail_closed"] == 1


async def test_stale_snapshot_serves_while_lago_is_down(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """A stale snapshot keeps deciding (and counting) during an outage."""
    gate = make_gate(client, clock, fail_open=False)
    for _ in range(4):
        assert (await gate.check("org_1")).allowed
    fake.inject_fault(status=503)
    clock.advance(120)
    assert (await gate.check("org_1")).allowed
    await wait_refreshed(gate)
    assert gate.stats["refresh_errors"] == 1
    assert not (await gate.check("org_1")).allowed
    assert gate.stats["fail_closed"] == 0


async def test_slow_lago_cold_wait_is_bounded(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """Lago slower than cold_timeout: the request gets the fail-open answer, the snapshot lands later."""
    fake.inject_fault(latency_ms=300, count=1)
    gate = make_gate(client, clock, config=QuotaConfig(cold_timeout=0.01))
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        decision = await gate.check("org_1")
        assert decision.allowed and decision.headers == ()
        assert gate.stats["cold_timeouts"] == 1 and gate.stats["fail_open"] == 1
        await wait_refreshed(gate)
        decision = await gate.check("org_1")
        assert headers(decision)["ratelimit-remaining"] == "3"
        tasks.cancel_scope.cancel()


async def test_new_billing_period_starts_from_zero(client: LagoClient, clock: Clock) -> None:
    """Exhausted in March; on April 1st the gate fetches the new period and allows again."""
    gate = make_gate(client, clock)
    for _ in range(5):
        await gate.check("org_1")
    assert not (await gate.check("org_1")).allowed
    clock.advance(dt_end() - clock.time() + 1)
    decision = await gate.check("org_1")
    assert decision.allowed and headers(decision)["ratelimit-remaining"] == "4"


async def test_records_survive_a_refresh_until_lago_has_them(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """Calls recorded within settle_lag of a refresh stay counted (never under-count); older ones are
    trusted to be in Lago's snapshot."""
    gate = make_gate(client, clock)
    await gate.check("org_1")  # snapshot at T; this call stays in flight (never settled)
    clock.advance(28)
    decision = await gate.check("org_1")
    gate.settle("org_1", decision, tokens=0, billed=True)  # recorded at T+28, not yet in Lago
    clock.advance(3)
    await gate.check("org_1")  # stale: refresh requested at T+31; Lago has no events yet
    await wait_refreshed(gate)
    status = await gate.enforce_usage_limits("org_1")
    assert status["usage"]["max_api_calls"] == 3  # 2 in flight + 1 recorded 3 s before the refresh
    clock.advance(40)
    await client.create_event(
        {"transaction_id": "t1", "external_subscription_id": "org_1", "code": "api_call",
         "timestamp": clock.time() - 43, "properties": {"total_tokens": 0}}
    )  # fmt: skip
    await gate.check("org_1")  # the refresh requested now trusts Lago with the call recorded 43 s ago
    await wait_refreshed(gate)
    status = await gate.enforce_usage_limits("org_1")
    assert status["usage"]["max_api_calls"] == 4  # Lago's 1 + 3 in flight


async def test_seed_helpers_on_the_same_cache(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    """check_org_has_active_subscription / get_org_plan_limits / enforce_usage_limits use the gate's cache."""
    gate = make_gate(client, clock)
    assert await check_org_has_active_subscription("org_1")
    reads = lago_reads(fake)
    assert (await get_org_plan_limits("org_1"))["max_api_calls"] == 5
    for _ in range(2):
        await gate.check("org_1")
    status = await enforce_usage_limits("org_1")
    assert status == {
        "allowed": True,
        "reason": None,
        "limits": {"max_api_calls": 5, "max_tokens": None},
        "usage": {"max_api_calls": 2, "max_tokens": 0},
        "remaining": {"max_api_calls": 3, "max_tokens": None},
        "plan_code": "starter",
        "period_end": "2026-04-01T00:00:00Z",
    }
    assert lago_reads(fake) == reads
    assert (await enforce_usage_limits("org_unknown"))["reason"] == "no_active_subscription"


async def test_seed_helpers_with_two_apps_use_the_requests_gate(fake: FakeLago, clock: Clock) -> None:
    """Two apps in one process, each with its own Lago: helpers given the request read that app's gate; without
    one, they refuse to guess (ConfigurationError) instead of answering from the other app's Lago."""
    other = seed(FakeLago(api_key="k2", clock=clock.now), starter_calls=7)
    seen: dict[str, Any] = {}

    async def status(request: Any) -> Any:
        seen[request.url.path] = await get_org_plan_limits("org_1", request=request)
        with pytest.raises(ConfigurationError, match="2 quota gates run"):
            await get_org_plan_limits("org_1")
        return await chat(request)

    async with anyio.create_task_group() as tasks:
        apps = []
        for lago, key, path in ((fake, "k", "/a"), (other, "k2", "/b")):
            settings = BillingSettings(api_url=lago.base_url, api_key=key, org_header="X-Org-Id", max_retries=0)
            client = LagoClient(settings, transport=lago.transport())
            gate = QuotaGate(settings, client, config=QuotaConfig(), clock=clock.time)
            await tasks.start(gate.run)
            apps.append(
                OrgBillingMiddleware(Starlette(routes=[Route(path, status)]), settings, quota=gate, client=client)
            )
        for app, path in zip(apps, ("/a", "/b"), strict=True):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                assert (await http.get(path, headers={"X-Org-Id": "org_1"})).status_code == 200
        for app in apps:
            await app.aclose()
            await app.pipeline.client.aclose()
        tasks.cancel_scope.cancel()
    assert seen["/a"]["max_api_calls"] == 5 and seen["/b"]["max_api_calls"] == 7


async def test_usage_recorded_through_org_billing_counts_against_the_quota(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    """OrgBilling(quota=gate): api_call events recorded outside requests (nowait or awaited) count at once, so a
    limit of 5 holds between snapshots; without it they would be seen only at the next refresh."""
    from lago_org_billing import EventPipeline, OrgBilling

    gate = make_gate(client, clock)
    for _ in range(2):
        assert (await gate.check("org_1")).allowed  # two requests through the gate
    async with EventPipeline(client) as pipeline:
        billing = OrgBilling(client=client, pipeline=pipeline, quota=gate)
        billing.record_api_call_nowait("org_1", tokens=3)
        await billing.record_api_call("org_1", tokens=4)
        billing.record_usage_nowait("org_1", "other_metric", properties={"total_tokens": 99})  # not api_call
        decision = await gate.check("org_1")
        assert decision.allowed and headers(decision)["ratelimit-remaining"] == "0"  # the 5th call
        assert not (await gate.check("org_1")).allowed
        assert gate.local.reserve_now("org_1", clock.time(), "peek").tokens == 7


def test_an_entitlement_value_that_is_no_whole_number_is_ignored_not_unlimited() -> None:
    """A privilege valued "unlimited", -5 or true is ignored (the plan table, or no limit from it, applies), not read
    as "no limit", which would lift the limits of the org; a privilege without any value is unlimited."""
    config = QuotaConfig()

    def entitlement(value: object) -> list[dict[str, object]]:
        return [{"code": "api_quota", "privileges": [{"code": "max_api_calls", "value": value}]}]

    for bad in ("unlimited", -5, True, "1.5e"):
        assert limits_from_entitlements(entitlement(bad), config) == {}
    assert limits_from_entitlements(entitlement(None), config) == {"max_api_calls": None}
    assert limits_from_entitlements(entitlement("300"), config) == {"max_api_calls": 300}


def test_config_from_env() -> None:
    """LAGO_QUOTA_* variables are read and validated."""
    config = QuotaConfig.from_env(
        {"LAGO_QUOTA_STATUS": "402", "LAGO_QUOTA_COLD_TIMEOUT": "0.5", "LAGO_QUOTA_HEADERS": "off",
         "LAGO_QUOTA_FEATURE": "quota", "LAGO_QUOTA_NO_SUBSCRIPTION": "allow"}
    )  # fmt: skip
    assert (config.over_quota_status, config.cold_timeout, config.headers) == (402, 0.5, False)
    assert (config.feature_code, config.no_subscription) == ("quota", "allow")
    for env in ({"LAGO_QUOTA_STATUS": "500"}, {"LAGO_QUOTA_HEADERS": "maybe"}, {"LAGO_QUOTA_COLD_TIMEOUT": "x"}):
        with pytest.raises(ConfigurationError):
            QuotaConfig.from_env(env)


def test_entitlement_and_usage_parsing() -> None:
    """Privilege values (override first), unlimited privileges, and one figure per metric across charges."""
    config = QuotaConfig()
    entitlements = [
        {"code": "other", "privileges": [{"code": "max_api_calls", "value": 1}]},
        {
            "code": "api_quota",
            "privileges": [
                {"code": "max_api_calls", "value": None, "plan_value": 10, "override_value": 20},
                {"code": "max_tokens", "value": None, "plan_value": None, "override_value": None},
                {"code": "seats", "value": 3},
            ],
        },
    ]
    assert limits_from_entitlements(entitlements, config) == {"max_api_calls": 20, "max_tokens": None}
    usage = {
        "charges_usage": [
            {
                "billable_metric": {"code": "api_call", "aggregation_type": "sum_agg"},
                "units": "70.0",
                "events_count": 7,
            },
            {
                "billable_metric": {"code": "api_call", "aggregation_type": "sum_agg"},
                "units": "70.0",
                "events_count": 7,
            },
        ]
    }
    assert usage_totals(usage, "api_call", "api_call") == (7, 70)
    usage["charges_usage"][0]["billable_metric"]["aggregation_type"] = "count_agg"
    usage["charges_usage"][1]["billable_metric"]["aggregation_type"] = "count_agg"
    assert usage_totals(usage, "api_call", "api_call") == (7, None)


def test_local_backend_adopts_the_first_period() -> None:
    """Calls counted before any snapshot (fail-open) belong to the first snapshot's period."""
    backend = LocalBackend()
    assert backend.reserve_now("o", 100.0, "blind").code == 4
    snap = Snapshot(active=True, calls_limit=2, period_start=0.0, period_end=1e12, requested_at=99.0)
    backend.store_now("o", snap, 100.0)
    outcome = backend.reserve_now("o", 101.0, "normal")
    assert (outcome.code, outcome.calls) == (1, 2)
    assert backend.reserve_now("o", 101.0, "normal").code == 2


def test_snapshot_encoding_round_trips() -> None:
    """A snapshot stored as a Redis hash reads back equal."""
    snap = Snapshot(active=True, plan_code="pro", customer_id="c", calls_limit=5, tokens_limit=None,
                    period_start=1.5, period_end=9.0, base_calls=3, base_tokens=4, requested_at=2.25,
                    fetched_at=2.5, plan_fetched_at=2.0, refresh_at=30.0, limits_source="entitlements",
                    version="v1")  # fmt: skip
    flat = encode(snap)
    assert decode([f.encode() for f in flat]) == snap
    assert decode({}) is None


def test_missing_redis_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the redis package, LAGO_REDIS_URL fails with the extra to install."""
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigurationError, match=r"lago-org-billing\[redis\]"):
        RedisBackend("redis://127.0.0.1:1/0")


# --------------------------------------------------------------------------- through the middleware


async def test_exactly_the_limit_through_the_middleware(fake: FakeLago, clock: Clock) -> None:
    """Limit 300, one process, 1,000 concurrent requests: exactly 300 answered 200, 300 events in Lago."""
    fake.store.plans["starter"]["entitlements"]["api_quota"]["max_api_calls"] = 300
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app = Starlette(routes=[Route("/v1/chat", chat)])
        middleware = OrgBillingMiddleware(app, settings, quota=gate, client=lago)
        transport = httpx.ASGITransport(app=middleware)
        statuses: list[int] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:

            async def one() -> None:
                response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert response.json()["limit"] == 300

            async with anyio.create_task_group() as tasks:
                for _ in range(1000):
                    tasks.start_soon(one)
        await middleware.aclose()
    assert statuses.count(200) == 300 and statuses.count(429) == 700
    assert len(fake.events) == 300
    assert middleware.stats["blocked"] == 700


@pytest.mark.parametrize("event_store", ["postgres", "clickhouse"])
async def test_an_idempotent_retry_is_not_counted_twice(fake: FakeLago, clock: Clock, event_store: str) -> None:
    """idempotency_header: Lago keeps one event for a request and its retries (same key), so the gate counts it
    once, calls and tokens: the org's other requests are not refused for calls it will not be billed (limit 5
    calls, 30 tokens: one request retried four times, then four others; it was 5 calls and 50 tokens counted)."""
    fake.event_store = fake.store.event_store = event_store
    fake.store.plans["starter"]["entitlements"]["api_quota"]["max_tokens"] = 5 * TOKENS
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app = Starlette(routes=[Route("/v1/chat", chat)])
        middleware = OrgBillingMiddleware(app, settings, quota=gate, client=lago, idempotency_header="Idempotency-Key")
        statuses = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            for _ in range(5):  # the request, then four retries, each after the previous one's event is built
                response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1", "Idempotency-Key": "k-1"})
                statuses.append(response.status_code)
                assert await middleware.pipeline.flush(5)
            for n in range(5):
                response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1", "Idempotency-Key": f"k-{n + 2}"})
                statuses.append(response.status_code)
                assert await middleware.pipeline.flush(5)
        usage = (await gate.enforce_usage_limits("org_1"))["usage"]
        await middleware.aclose()
    assert statuses == [200] * 9 + [429]
    assert usage == {"max_api_calls": 5, "max_tokens": 5 * TOKENS}
    assert len({event["transaction_id"] for event in fake.events}) == 5
    assert middleware.stats["idempotent_retries"] == 4


def dependency_auth_app(*, gated: bool) -> Any:
    """A FastAPI app whose auth is a dependency (the org is known only inside the app), with or without
    require_quota after it."""

    async def authenticate(request: Request) -> None:
        request.state.org_id = request.headers["authorization"].removeprefix("Bearer ")
        # who is billed, asked before require_quota runs: that must not stand for "gated already"
        assert get_current_org(request) == request.state.org_id

    app = FastAPI()
    dependencies = [Depends(authenticate), Depends(require_quota)] if gated else [Depends(authenticate)]

    @app.get("/v1/chat", dependencies=dependencies)
    async def chat_endpoint(request: Request) -> dict[str, Any]:
        usage = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": TOKENS}
        return {"model": "m", "usage": usage, "org": get_current_org(request)}

    return app


def installed_middleware(app: Any) -> OrgBillingMiddleware:
    """The OrgBillingMiddleware instance ``app.add_middleware`` made (once the app has served a request)."""
    layer = app.middleware_stack
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    return layer


@pytest.mark.parametrize(("gated", "arrangement"), [(True, "wrapped"), (True, "added"), (False, "wrapped")])
async def test_org_known_only_in_a_dependency_is_gated_by_require_quota(
    fake: FakeLago, clock: Clock, gated: bool, arrangement: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Auth in a FastAPI dependency: with Depends(require_quota) after it, limit 5 of 40 concurrent requests is
    exactly 5 served and billed, 35 answered 429 with the gate's problem body and headers, whether the middleware
    wraps the app or was added with app.add_middleware. Without it, every request is served and billed, counted
    as ungated, and a warning says how to gate them."""
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app = dependency_auth_app(gated=gated)
        if arrangement == "wrapped":
            served_by: Any = OrgBillingMiddleware(app, settings, quota=gate, client=lago)
        else:
            app.add_middleware(OrgBillingMiddleware, settings=settings, quota=gate, client=lago)
            served_by = app
        answers: list[httpx.Response] = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served_by), base_url="http://app") as http:

            async def one() -> None:
                answers.append(await http.get("/v1/chat", headers={"Authorization": "Bearer org_1"}))

            async with anyio.create_task_group() as tasks:
                for _ in range(40):
                    tasks.start_soon(one)
        middleware = served_by if arrangement == "wrapped" else installed_middleware(app)
        await middleware.aclose()
    statuses = [answer.status_code for answer in answers]
    if gated:
        assert statuses.count(200) == 5 and statuses.count(429) == 35
        blocked = next(answer for answer in answers if answer.status_code == 429)
        assert blocked.headers["content-type"] == "application/problem+json"
        assert blocked.json()["type"] == PROBLEM_QUOTA_EXCEEDED and blocked.json()["org_id"] == "org_1"
        assert blocked.headers["ratelimit-remaining"] == "0" and "retry-after" in blocked.headers
        served = [answer for answer in answers if answer.status_code == 200]
        # the decision came before the answer began: its headers are on it, and the endpoint knew the org
        assert sorted(answer.headers["ratelimit-remaining"] for answer in served) == ["0", "1", "2", "3", "4"]
        assert {answer.json()["org"] for answer in served} == {"org_1"}
        assert len(fake.events) == 5
        assert middleware.stats["blocked"] == 35 and middleware.stats["ungated"] == 0
        assert gate.local.reserve_now("org_1", clock.time(), "peek").calls == 5  # counted once each, none left over
    else:
        assert statuses == [200] * 40 and len(fake.events) == 40
        assert {answer.json()["org"] for answer in answers} == {"org_1"}  # get_current_org looks again
        assert middleware.stats["ungated"] == 40
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "Depends(require_quota)" in caplog.text


async def test_app_crash_after_require_quota_releases_its_call(fake: FakeLago, clock: Clock) -> None:
    """An endpoint that fails after require_quota reserved its call (add_middleware: the error passes through the
    middleware before any answer): the request is not billed and its call is released, so 7 crashes on a plan of 5
    calls never lock the org out."""

    async def authenticate(request: Request) -> None:
        request.state.org_id = "org_1"

    app = FastAPI()

    @app.get("/v1/fail", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def fail() -> None:
        raise RuntimeError("endpoint bug")

    @app.get("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app.add_middleware(OrgBillingMiddleware, settings=settings, quota=gate, client=lago)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            statuses = [(await http.get("/v1/fail")).status_code for _ in range(7)]
            assert (await http.get("/v1/chat")).status_code == 200
        middleware = installed_middleware(app)
        await middleware.aclose()
    assert statuses == [500] * 7
    assert middleware.stats["unbilled_errors"] == 7 and middleware.stats["unresolved"] == 0
    assert gate.local.reserve_now("org_1", clock.time(), "peek").calls == 1  # only the request that was served
    assert len(fake.events) == 1


async def test_require_quota_error_reaching_the_middleware_is_answered(fake: FakeLago, clock: Clock) -> None:
    """An app with no exception handling (a bare Router): the error require_quota raises reaches the middleware,
    which answers the gate's 429 instead of letting it crash the request; 5 served, 3 blocked."""
    from starlette.routing import Router

    async def endpoint(request: Request) -> Any:
        request.state.org_id = "org_1"
        await require_quota(request)
        return await chat(request)

    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(Router([Route("/v1/chat", endpoint)]), settings, quota=gate, client=lago)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            statuses = [(await http.get("/v1/chat")).status_code for _ in range(8)]
        await middleware.aclose()
    assert statuses == [200] * 5 + [429] * 3
    assert len(fake.events) == 5 and middleware.stats["blocked"] == 3


async def test_require_quota_outside_the_middleware_says_so() -> None:
    """require_quota() on a request no billing middleware saw: a ConfigurationError saying what is missing."""
    with pytest.raises(ConfigurationError, match="OrgBillingMiddleware"):
        await require_quota(Request({"type": "http", "headers": []}))


async def test_check_now_decides_without_a_coroutine_once_the_org_is_cached(client: LagoClient, clock: Clock) -> None:
    """check_now() is None (counting nothing) for a cold org, then the same decisions as check(), blocks included."""
    gate = make_gate(client, clock)
    assert gate.check_now("org_1") is None
    assert gate.stats["checks"] == 0
    first = await gate.check("org_1")  # fetches the snapshot
    decisions = [gate.check_now("org_1") for _ in range(5)]
    assert first.allowed and all(d is not None for d in decisions)
    remaining = [headers(d)["ratelimit-remaining"] for d in decisions if d is not None]
    assert remaining == ["3", "2", "1", "0", "0"]
    assert [d.allowed for d in decisions if d is not None] == [True, True, True, True, False]
    assert gate.stats["checks"] == 6 and gate.stats["blocked"] == 1


async def test_check_now_defers_to_check_with_a_shared_backend(client: LagoClient, clock: Clock) -> None:
    """A backend that needs I/O (Redis) always goes through check()."""
    gate = make_gate(client, clock)
    gate.backend = RedisBackend("redis://127.0.0.1:9", QuotaConfig(), fallback=gate.local)
    assert gate.check_now("org_1") is None


class CountOnlyLago:
    """A Lago whose api_call metric is a count_agg: it counts calls, never tokens (a max_tokens limit is set)."""

    async def get_subscription(self, subscription_id: str) -> dict[str, Any]:
        return {
            "status": "active",
            "plan_code": "pro",
            "external_customer_id": "org_1",
            "current_billing_period_started_at": "2026-03-01T00:00:00Z",
            "current_billing_period_ending_at": "2026-03-31T23:59:59Z",
            "entitlements": [{"code": "api_quota", "privileges": [{"code": "max_tokens", "value": 1000}]}],
        }

    async def get_current_usage(self, customer_id: str, subscription_id: str, **options: Any) -> dict[str, Any]:
        return {
            "from_datetime": "2026-03-01T00:00:00Z",
            "to_datetime": "2026-03-31T23:59:59Z",
            "charges_usage": [
                {
                    "units": "0",
                    "events_count": 0,
                    "billable_metric": {"code": "api_call", "aggregation_type": "count_agg"},
                }
            ],
        }


async def test_tokens_lago_does_not_count_keep_counting_across_refreshes(clock: Clock) -> None:
    """max_tokens with a metric Lago does not sum tokens in: the gate's own token records are the only count, so a
    refresh keeps them (folded, memory bounded) instead of pruning them as if Lago had them: 900 + 900 tokens
    exceed the 1,000 limit however many refreshes pass."""
    settings = BillingSettings(api_key="k", api_url="http://lago.test")
    gate = QuotaGate(settings, CountOnlyLago(), config=QuotaConfig(), clock=clock.time)  # type: ignore[arg-type]
    for _ in range(2):
        decision = await gate.check("org_1")
        assert decision.allowed
        gate.settle("org_1", decision, tokens=900, billed=True)
        clock.advance(40)
        await gate.backend.store("org_1", await gate.fetch("org_1"), clock.time())  # a routine refresh
    assert (await gate.enforce_usage_limits("org_1"))["usage"]["max_tokens"] == 1800
    assert not (await gate.check("org_1")).allowed
    assert len(gate.local._orgs["org_1"].counts.t) == 1  # folded into one bucket


async def test_aclose_ends_a_refresh_in_flight(clock: Clock) -> None:
    """A refresh started outside run() (a loose task) that is still reading Lago at aclose() is ended before the
    backend closes, so it never outlives the gate holding a connection (its loop closing under it)."""
    reading = anyio.Event()

    class SlowLago(CountOnlyLago):
        async def get_current_usage(self, customer_id: str, subscription_id: str, **options: Any) -> dict[str, Any]:
            reading.set()
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

    settings = BillingSettings(api_key="k", api_url="http://lago.test")
    gate = QuotaGate(settings, SlowLago(), config=QuotaConfig(cold_timeout=0.01), clock=clock.time)  # type: ignore[arg-type]
    await gate.check("org_1")  # cold: a loose refresh starts and stays at Lago's door
    await reading.wait()
    assert gate._loose
    await gate.aclose()
    assert all(task.done() for task in gate._loose) and not gate._loose


async def test_a_misspelt_plan_limit_is_refused(client: LagoClient) -> None:
    """{"starter": {"max_api_cals": 1}} was accepted and never enforced."""
    settings = client.settings.replace(plan_limits={"starter": {"max_api_cals": 1}})
    with pytest.raises(ConfigurationError, match="max_api_cals") as info:
        QuotaGate(settings, client, config=QuotaConfig())
    assert info.value.variable == "LAGO_PLAN_LIMITS" and "'max_api_calls'" in str(info.value)
    renamed = QuotaConfig(calls_privilege="max_api_cals")  # the privilege renamed: the key is a limit
    QuotaGate(settings, client, config=renamed)


async def test_a_lago_url_under_a_wrong_path_follows_the_fail_policy_not_402(
    fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``LAGO_API_URL`` under a path Lago is not served at: Lago's catch-all ``404 resource_not_found`` is not "this org
    has no subscription" (a 402 for every org): Lago is unusable as configured, so LAGO_FAIL_OPEN decides, and the
    log says to check the URL."""
    settings = BillingSettings(api_url=fake.base_url + "/lago", api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = make_gate(lago, clock)
        decision = await gate.check("org_1")
        assert decision.allowed and gate.stats["fail_open"] == 1 and gate.stats["refresh_errors"] == 1
        closed = make_gate(lago, clock, fail_open=False)
        assert (await closed.check("org_1")).status == 503
    assert "LAGO_API_URL" in caplog.text
