"""Quota gating across time: billing-period rollover (cached snapshots, requests in flight, the fleet's copy in
Redis), Retry-After / RateLimit-Reset near the period end, Lago a little behind this host's clock."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _quota_app import Clock, needs_redis, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

MARCH_END = dt.datetime(2026, 4, 1, tzinfo=dt.timezone.utc)  # org_1 (UTC, calendar) starts April here


@pytest.fixture
def clock() -> Clock:
    return Clock(MARCH_END - dt.timedelta(minutes=1))


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on starter: 5 calls per period."""
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


@pytest.fixture
def prefix() -> str:
    return f"periods:{uuid.uuid4().hex[:8]}:"


_OPEN: list[QuotaGate] = []


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def redis(request: pytest.FixtureRequest) -> str | None:
    """The backend: in process, or a real redis-server (skipped when not installed)."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture(autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


def make_gate(
    client: LagoClient, clock: Clock, *, redis: str | None = None, prefix: str = "", **config: Any
) -> QuotaGate:
    settings = client.settings.replace(redis_url=redis) if redis else client.settings
    if redis:
        config["redis_prefix"] = prefix
    gate = QuotaGate(settings, client, config=QuotaConfig(**config), clock=clock.time)
    _OPEN.append(gate)
    return gate


def headers(decision: QuotaDecision) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in decision.headers}


async def refreshed(*gates: QuotaGate) -> None:
    for gate in gates:
        for event in list(gate._refreshing.values()):
            await event.wait()


@needs_redis
async def test_seed_helpers_after_the_rollover_read_the_fleets_new_snapshot(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """A worker whose own copy of the snapshot is of the period just over, while another worker already stored the
    new period's in Redis: enforce_usage_limits / get_org_plan_limits answer from the fleet's snapshot (they raised
    LagoUnavailableError "could not be read in time")."""
    first = make_gate(client, clock, redis=redis_url, prefix=prefix)
    second = make_gate(client, clock, redis=redis_url, prefix=prefix)
    assert (await first.check("org_1")).allowed  # first's copy: March
    clock.at = MARCH_END + dt.timedelta(seconds=2)
    decision = await second.check("org_1")  # the fleet's snapshot: April (second holds the refresh lock)
    assert decision.allowed and headers(decision)["ratelimit-remaining"] == "4"
    status = await first.enforce_usage_limits("org_1")
    assert status["allowed"] and status["usage"]["max_api_calls"] == 1
    assert status["period_end"] == "2026-05-01T00:00:00Z"
    assert (await first.get_org_plan_limits("org_1"))["max_api_calls"] == 5
    assert await first.check_org_has_active_subscription("org_1")


async def test_tokens_of_a_request_begun_before_the_rollover_do_not_count_in_the_new_period(
    fake: FakeLago, clock: Clock
) -> None:
    """A request checked (and billed: its event's timestamp is its start) in March ends after the period rolled
    over: its tokens are March's (Lago bills them there), not April's. They were added to April's local count, so
    the org's first April request was refused 429 with Retry-After of a whole month (max_tokens 1,000, April's
    usage 0)."""
    fake.store.plans["starter"]["entitlements"]["api_quota"]["max_tokens"] = 1_000
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)

        async def long_chat(request: Request) -> Response:
            if request.query_params.get("long"):
                clock.at = MARCH_END + dt.timedelta(seconds=2)  # it ends in April, once April was read:
                assert (await gate.enforce_usage_limits("org_1"))["period_end"] == "2026-05-01T00:00:00Z"
            usage = {"prompt_tokens": 400, "completion_tokens": 600, "total_tokens": 1_000}
            return JSONResponse({"usage": usage})

        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", long_chat)]), settings, quota=gate, client=lago
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            assert (await http.get("/v1/chat?long=1", headers={"X-Org-Id": "org_1"})).status_code == 200
            assert await middleware.pipeline.flush(5)  # its event built: its tokens settled
            response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
        await middleware.aclose()
    assert response.status_code == 200, (response.headers.get("retry-after"), response.text)


class LaggingLago:
    """The emulator's clock, ``lag`` seconds behind the gate's (Lago's host clock behind this one's)."""

    def __init__(self, clock: Clock, lag: float) -> None:
        self.clock, self.lag = clock, lag

    def __call__(self) -> dt.datetime:
        return self.clock.at - dt.timedelta(seconds=self.lag)


def lago_reads(fake: FakeLago) -> int:
    return sum(1 for r in fake.requests if r.method == "GET")


async def test_lago_behind_at_the_rollover_is_not_read_in_a_loop(
    clock: Clock, redis: str | None, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Just after the period end by this host's clock, Lago (its clock a second behind) still reports the period
    that ended: the cold request re-read Lago back to back until cold_timeout (568 refreshes, 1,136 reads in 0.5 s
    in process), waiting all of it. Now the request is decided at once on a provisional snapshot of April, the
    re-reads back off and a read of March is not stored over it; once Lago is in the new period too, its snapshot
    serves."""
    lagging = LaggingLago(clock, 1.0)
    fake = seed(FakeLago(api_key="k", clock=lagging), starter_calls=5)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = make_gate(lago, clock, redis=redis, prefix=prefix, cold_timeout=0.5)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            assert (await gate.check("org_1")).allowed  # March, 1 of 5
            reads = lago_reads(fake)
            clock.at = MARCH_END + dt.timedelta(seconds=0.5)  # Lago: 23:59:59.5
            decision = await gate.check("org_1")
            assert decision.allowed and headers(decision)["ratelimit-remaining"] == "4"  # April's provisional snapshot
            await refreshed(gate)  # its paced refresh reads March (Lago behind): not stored over April's
            assert lago_reads(fake) - reads <= 12, lago_reads(fake) - reads
            assert (gate.stats["fail_open"], gate.stats["cold_waits"]) == (0, 1)  # (the first request's, in March)
            assert "Lago's clock is behind this one's" in caplog.text  # said, for the operator to fix
            lagging.lag = 0.0
            clock.advance(gate.config.failure_backoff + 1)  # Lago in April too
            decision = await gate.check("org_1")
            assert headers(decision)["ratelimit-remaining"] == "3"  # the call let through counts in April
            assert headers(decision)["ratelimit-reset"] == str(30 * 86400 - 6)  # 6.5 s into April: rounded up
            tasks.cancel_scope.cancel()


async def test_a_call_in_flight_across_the_rollover_counts_in_its_own_period(
    client: LagoClient, clock: Clock, redis: str | None, prefix: str
) -> None:
    """Checked in March, settled (billed) after April's snapshot arrived: Lago bills it in March (its event's
    timestamp is its start), so April's count does not include it, and released reservations of March release
    nothing of April's."""
    gate = make_gate(client, clock, redis=redis, prefix=prefix)
    march = [await gate.check("org_1") for _ in range(3)]
    assert all(d.allowed for d in march)
    clock.at = MARCH_END + dt.timedelta(seconds=1)
    april = await gate.check("org_1")
    assert headers(april)["ratelimit-remaining"] == "4"
    gate.settle("org_1", march[0], tokens=0, billed=True)
    gate.settle("org_1", march[1], tokens=0, billed=False)
    gate.settle("org_1", march[2], tokens=500, billed=True)
    if redis:
        await gate.backend.flush()  # type: ignore[attr-defined]
    status = await gate.enforce_usage_limits("org_1")
    assert status["usage"] == {"max_api_calls": 1, "max_tokens": 0}
    assert status["period_end"] == "2026-05-01T00:00:00Z"


async def test_an_upgrade_seen_in_the_usage_period_rereads_the_plan(
    client: LagoClient, fake: FakeLago, clock: Clock, redis: str | None, prefix: str
) -> None:
    """An upgrade (no webhook received): Lago replaces the subscription, whose usage period now starts at the
    upgrade. The next usage refresh sees that period start and reads the subscription again, instead of applying
    the old plan's limit (and naming it in 429s) to the new subscription's count until plan_ttl (300 s) is over."""
    clock.at = MARCH_END + dt.timedelta(days=10)  # org_1 subscribed in March: its April period is known
    gate = make_gate(client, clock, redis=redis, prefix=prefix)
    for _ in range(5):
        assert (await gate.check("org_1")).allowed
    blocked = await gate.check("org_1")
    assert not blocked.allowed and blocked.problem is not None and blocked.problem["plan_code"] == "starter"
    fake.add_subscription("org_1", "pro")  # upgrade: takes effect at once
    clock.advance(31)  # the usage snapshot is due (TTL 30 s), the plan part is not (300 s)
    await gate.check("org_1")
    await refreshed(gate)
    decision = await gate.check("org_1")
    assert decision.allowed
    assert headers(decision)["ratelimit-limit"] == "10000"
    assert (await gate.get_org_plan_limits("org_1"))["plan_code"] == "pro"


@pytest.mark.parametrize("limit", ["max_api_calls", "max_tokens"])
async def test_blocked_a_moment_before_the_period_end_says_retry_in_1_second(
    fake: FakeLago, clock: Clock, redis: str | None, prefix: str, limit: str
) -> None:
    """Blocked 0.3 s before the period ends: Retry-After and RateLimit-Reset 1 (never 0), the problem body says the
    same (limit, usage, period end, retry_after); 1 s later the new period lets the request through."""
    entitlements = fake.store.plans["starter"]["entitlements"]["api_quota"]
    entitlements.update({"max_api_calls": 2} if limit == "max_api_calls" else {"max_api_calls": None, "max_tokens": 0})
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = make_gate(lago, clock, redis=redis, prefix=prefix, over_quota_status=402)

        async def ok(request: Request) -> Response:
            return JSONResponse({})

        middleware = OrgBillingMiddleware(Starlette(routes=[Route("/v1/chat", ok)]), settings, quota=gate, client=lago)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            for _ in range(2 if limit == "max_api_calls" else 0):
                assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 200
            clock.at = MARCH_END - dt.timedelta(seconds=0.3)
            blocked = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
            clock.at = MARCH_END + dt.timedelta(seconds=0.7)
            allowed = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
        await middleware.aclose()
    assert blocked.status_code == 402
    assert blocked.headers["content-type"] == "application/problem+json"
    assert blocked.headers["retry-after"] == blocked.headers["ratelimit-reset"] == "1"
    assert blocked.headers["ratelimit-remaining"] == "0"
    body = blocked.json()
    assert body["status"] == 402 and body["limit_name"] == limit and body["retry_after"] == 1
    assert (body["limit"], body["usage"]) == ((2, 2) if limit == "max_api_calls" else (0, 0))
    assert body["period_end"] == "2026-04-01T00:00:00Z" and "2026-04-01T00:00:00Z" in body["detail"]
    assert blocked.headers["ratelimit-limit"] == str(body["limit"])
    if limit == "max_api_calls":
        assert allowed.status_code == 200 and allowed.headers["ratelimit-remaining"] == "1"
        assert allowed.headers["ratelimit-reset"] == str(30 * 86400)  # 30 days less 0.7 s left: rounded up
    else:
        assert allowed.status_code == 402  # a limit of 0 tokens: blocked in every period
