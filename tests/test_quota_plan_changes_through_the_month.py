"""The in-process quota gate (default backend) through a SaaS's month, on the emulator: an upgrade mid-period (a
blocked org allowed again after ``invalidate``), a downgrade (limits kept until the period end), a termination
(402 after ``invalidate``), a subscription's entitlement override, the ``LAGO_PLAN_LIMITS`` fallback, and the
``monitor`` and ``off`` modes through the middleware."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on starter: 2 calls per period; pro: 10,000; legacy: no entitlements."""
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", max_retries=0, plan_limits={"legacy": {"max_api_calls": 1}}
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


@contextlib.asynccontextmanager
async def running_gate(
    lago: LagoClient, clock: Clock, settings: BillingSettings | None = None
) -> AsyncIterator[QuotaGate]:
    """A gate of ``lago`` (``settings``: its client's unless given) on the test's clock, running in the background
    for the ``async with`` block, then closed."""
    gate = QuotaGate(settings or lago.settings, lago, config=QuotaConfig(cold_timeout=5.0), clock=clock.time)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        yield gate
        tasks.cancel_scope.cancel()
    await gate.aclose()


async def use_up(gate: QuotaGate, org_id: str, calls: int) -> None:
    for _ in range(calls):
        decision = await gate.check(org_id)
        assert decision.allowed, decision
        gate.settle(org_id, decision, tokens=0, billed=True)


def limit(decision: Any) -> str | None:
    return dict((k.decode(), v.decode()) for k, v in decision.headers).get("ratelimit-limit")


async def test_an_upgrade_mid_period_unblocks_after_invalidate(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    async with running_gate(client, clock) as gate:
        await use_up(gate, "org_1", 2)
        blocked = await gate.check("org_1")
        assert (blocked.allowed, blocked.status) == (False, 429)
        clock.advance(3600)
        fake.add_subscription("org_1", "pro")  # upgrade: at once
        await gate.invalidate("org_1")
        decision = await gate.check("org_1")
        assert decision.allowed, decision
        assert limit(decision) == "10000"
        assert (await gate.get_org_plan_limits("org_1"))["plan_code"] == "pro"


async def test_a_downgrade_keeps_the_current_limits_until_the_period_end(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "pro")
    async with running_gate(client, clock) as gate:
        await use_up(gate, "org_2", 3)
        clock.advance(3600)
        fake.add_subscription("org_2", "starter")  # downgrade: at the period end
        await gate.invalidate("org_2")
        decision = await gate.check("org_2")
        assert decision.allowed, decision
        assert limit(decision) == "10000"
        assert (await gate.get_org_plan_limits("org_2"))["plan_code"] == "pro"


async def test_a_termination_mid_period_is_402_after_invalidate(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    async with running_gate(client, clock) as gate:
        await use_up(gate, "org_1", 1)
        clock.advance(60)
        fake.store.terminate_subscription("org_1", {})
        await gate.invalidate("org_1")
        decision = await gate.check("org_1")
        assert (decision.allowed, decision.status) == (False, 402)


async def test_a_subscription_override_raises_one_orgs_limit(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "starter")
    fake.store.patch_sub_entitlements("org_2", None, {"entitlements": {"api_quota": {"max_api_calls": 5}}})
    async with running_gate(client, clock) as gate:
        assert limit(await gate.check("org_2")) == "5"
        assert limit(await gate.check("org_1")) == "2"


async def test_plan_limits_fallback_for_a_plan_without_entitlements(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    fake.add_customer("org_3")
    fake.add_subscription("org_3", "legacy")
    async with running_gate(client, clock) as gate:
        await use_up(gate, "org_3", 1)
        decision = await gate.check("org_3")
        assert (decision.allowed, decision.status) == (False, 429)
        assert (await gate.get_org_plan_limits("org_3"))["source"] == "plan_limits"


def middleware_for(fake: FakeLago, lago: LagoClient, clock: Clock, mode: str = "enforce") -> Any:
    from lago_org_billing import OrgBillingMiddleware

    settings = lago.settings.replace(org_header="X-Org-Id", quota_mode=mode)

    async def ok(request: Request) -> Response:
        return JSONResponse({})

    gate = None
    if mode != "off":
        gate = QuotaGate(settings, lago, config=QuotaConfig(cold_timeout=5.0), clock=clock.time)
    app = Starlette(routes=[Route("/v1/chat", ok)])
    if gate is None:
        return OrgBillingMiddleware(app, settings, client=lago), None
    return OrgBillingMiddleware(app, settings, quota=gate, client=lago), gate


@pytest.mark.parametrize("later", [1, 60])
async def test_an_upgrade_through_the_middleware_starts_the_new_plan_with_lagos_count(
    client: LagoClient, fake: FakeLago, clock: Clock, later: int
) -> None:
    middleware, gate = middleware_for(fake, client, clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
        for _ in range(2):
            assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 200
        assert await middleware.pipeline.flush(5)
        assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 429
        clock.advance(later)
        fake.add_subscription("org_1", "pro")
        await gate.invalidate("org_1")
        response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
    await middleware.aclose()
    assert response.status_code == 200
    assert response.headers["ratelimit-limit"] == "10000"
    assert response.headers["ratelimit-remaining"] == "9999"


async def test_monitor_mode_reports_a_terminated_subscription_without_blocking(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    middleware, gate = middleware_for(fake, client, clock, "monitor")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
        for _ in range(3):
            assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 200
        fake.store.terminate_subscription("org_1", {})
        await gate.invalidate("org_1")
        response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
    await middleware.aclose()
    assert response.status_code == 200
    assert gate.stats["would_block"] == 2 and gate.stats["blocked"] == 0


async def test_off_mode_never_reads_lago_for_quota(client: LagoClient, fake: FakeLago, clock: Clock) -> None:
    middleware, _ = middleware_for(fake, client, clock, "off")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
        statuses = [(await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code for _ in range(4)]
        assert await middleware.pipeline.flush(5)
    await middleware.aclose()
    assert statuses == [200] * 4
    assert not [r for r in fake.requests if r.method == "GET"]


async def test_a_downgrade_unseen_before_the_rollover_applies_once_lago_switches_it() -> None:
    """pro (10,000 calls) read at 23:58; a downgrade to starter (2 calls) is scheduled then, no webhook wired to
    ``invalidate``. Lago switches it when its biller runs (at minute 10 of the hour, the emulator's default timing):
    until then Lago itself still holds pro, and the provisional April snapshot (pro's limits) decides, as Lago would.
    Once switched, the first usage refresh (after ``LAGO_USAGE_CACHE_TTL``) sees the new subscription's start (00:10,
    within the known period) and the gate reads the plan again: starter's limits apply then, not only after
    ``LAGO_QUOTA_PLAN_TTL``.

    (This was a strict xfail while the emulator switched downgrades exactly at the boundary, a state real Lago never
    shows: a provisional snapshot's refresh reads usage only, by design.)"""
    clock = Clock(dt.datetime(2026, 3, 31, 23, 58, tzinfo=dt.timezone.utc))
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "pro")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        async with running_gate(lago, clock, settings) as gate:
            assert (await gate.check("org_2")).allowed
            fake.add_subscription("org_2", "starter")  # a downgrade: at the period end
            clock.at = dt.datetime(2026, 4, 1, 0, 0, 1, tzinfo=dt.timezone.utc)
            first = await gate.check("org_2")  # provisional: allowed at once
            assert first.allowed
            gate.settle("org_2", first, tokens=0, billed=True)
            await refreshed(gate)
            assert (await gate.get_org_plan_limits("org_2"))["plan_code"] == "pro"  # as Lago holds it until 00:10
            clock.at = dt.datetime(2026, 4, 1, 0, 10, 1, tzinfo=dt.timezone.utc)  # the biller switched it
            clock.advance(settings.usage_cache_ttl + 1)  # (the usage read after its TTL sees the new start)
            decisions = []
            for _ in range(4):
                decision = await gate.check("org_2")
                gate.settle("org_2", decision, tokens=0, billed=True)
                decisions.append(decision.allowed)
                await refreshed(gate)
            plan = (await gate.get_org_plan_limits("org_2"))["plan_code"]
    assert plan == "starter"
    # the first decision after the switch is the last on pro's snapshot (its refresh reads the new start), then
    # starter's 2 calls of April are used up (one at 00:00:01, one now)
    assert decisions == [True, True, False, False]


async def refreshed(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


async def test_an_upgrade_without_a_webhook_is_seen_at_the_next_usage_refresh(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    """No ``invalidate``: the usage read after the TTL shows a period begun within the known one (the subscription was
    replaced), so the plan is read again: the blocked org is allowed on pro's limit."""
    async with running_gate(client, clock) as gate:
        await use_up(gate, "org_1", 2)
        assert not (await gate.check("org_1")).allowed
        clock.advance(3600)
        fake.add_subscription("org_1", "pro")
        await gate.check("org_1")  # due: its refresh starts
        await refreshed(gate)
        decision = await gate.check("org_1")
    assert decision.allowed and limit(decision) == "10000"


async def test_a_termination_without_a_webhook_is_402_after_the_next_usage_refresh(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    async with running_gate(client, clock) as gate:
        await use_up(gate, "org_1", 1)
        clock.advance(3600)
        fake.store.terminate_subscription("org_1", {})
        await gate.check("org_1")
        await refreshed(gate)
        decision = await gate.check("org_1")
    assert (decision.allowed, decision.status) == (False, 402)


async def test_an_override_patched_mid_period_applies_after_invalidate(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    async with running_gate(client, clock) as gate:
        await use_up(gate, "org_1", 2)
        assert not (await gate.check("org_1")).allowed
        fake.store.patch_sub_entitlements("org_1", None, {"entitlements": {"api_quota": {"max_api_calls": 4}}})
        await gate.invalidate("org_1")
        decision = await gate.check("org_1")
    assert decision.allowed and limit(decision) == "4"
