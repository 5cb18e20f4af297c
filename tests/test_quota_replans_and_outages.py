"""The quota gate: a request blocked on a snapshot ``invalidate_all`` marked (``plan.updated``) and the
re-read it waits for (other workers with Redis, Lago slow), the fail-open reservation when a snapshot shows up
meanwhile, settles of calls decided during a Redis outage, and the advice given for org ids Lago cannot address."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from _quota_app import Clock, free_port, needs_redis, redis_server, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import LagoUnavailableError
from lago_org_billing._quota import QuotaConfig, QuotaGate, _Decision
from lago_org_billing._quota_local import LocalBackend
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing._snapshots import Mode, Outcome, Snapshot
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on starter: 2 calls per period."""
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


class Proxy:
    """The gate's Lago client, its subscription reads hung (``hang``) or failing (``fail``) on demand."""

    def __init__(self, inner: LagoClient) -> None:
        self.inner = inner
        self.hang = False
        self.fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_subscription(self, external_id: str, **params: Any) -> Any:
        if self.hang:
            await anyio.sleep_forever()
        if self.fail:
            raise LagoUnavailableError("Lago is down")
        return await self.inner.get_subscription(external_id, **params)


async def use_up(gate: QuotaGate, org_id: str = "org_1", calls: int = 2) -> None:
    for _ in range(calls):
        decision = await gate.check(org_id)
        assert decision.allowed
        gate.settle(org_id, decision, tokens=0, billed=True)


async def test_blocked_requests_wait_once_for_a_reread_lago_does_not_answer(client: LagoClient, clock: Clock) -> None:
    """After ``plan.updated``, Lago hangs: the first blocked request waits ``cold_timeout`` for the org's re-read,
    then 429. The next ones did too, each, as long as the read hung (the re-read is in flight), so every retry of an
    org over its quota was held seconds, piling up connections; a cold org's requests wait once per
    ``failure_backoff`` (``_gave_up``), and so do these now."""
    gate = QuotaGate(client.settings, client, config=QuotaConfig(cold_timeout=0.05), clock=clock.time)
    proxy = Proxy(client)
    gate.client = proxy  # type: ignore[assignment]
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await use_up(gate)
        assert not (await gate.check("org_1")).allowed
        await gate.invalidate_all()  # plan.updated
        proxy.hang = True
        waits, timeouts = gate.stats["cold_waits"], gate.stats["cold_timeouts"]
        decisions = [await gate.check("org_1") for _ in range(3)]
        tasks.cancel_scope.cancel()
    await gate.aclose()
    assert [(d.allowed, d.status) for d in decisions] == [(False, 429)] * 3
    assert gate.stats["cold_waits"] - waits == 1  # (it was 3: each request waited)
    assert gate.stats["cold_timeouts"] - timeouts == 1


class AppearingBackend(LocalBackend):
    """Another worker stores the org's snapshot (over its limit) between the check's reservation and the fail-open
    one (with Redis, two round trips apart)."""

    def __init__(self, config: QuotaConfig, late: Snapshot) -> None:
        super().__init__(config)
        self.late = late

    async def reserve(self, org_id: str, now: float, mode: Mode, known: Snapshot | None) -> Outcome:
        if mode == "blind":
            self.store_now(org_id, self.late, now)
        return self.reserve_now(org_id, now, mode)


async def test_a_fail_open_reservation_blocked_by_a_snapshot_that_came_meanwhile_is_released(
    client: LagoClient, clock: Clock
) -> None:
    """Lago fails, so the cold request is let through (LAGO_FAIL_OPEN), but the blind reservation finds a snapshot
    another worker stored meanwhile, over the limit: the request is blocked (right), yet its call stayed reserved,
    unsettled (a blocked decision reserves nothing, so nobody releases it): a phantom call in flight for an hour."""
    now = clock.time()
    over = Snapshot(
        active=True,
        plan_code="starter",
        calls_limit=2,
        period_start=now - 86400,
        period_end=now + 86400,
        base_calls=2,
        requested_at=now,
        fetched_at=now,
        plan_fetched_at=now,
        refresh_at=now + 30,
        version="other-worker",
    )
    config = QuotaConfig(cold_timeout=0.05)
    backend = AppearingBackend(config, over)
    gate = QuotaGate(client.settings, client, backend=backend, config=config, clock=clock.time)
    proxy = Proxy(client)
    proxy.fail = True
    gate.client = proxy  # type: ignore[assignment]
    decision = await gate.check("org_1")
    await gate.aclose()
    assert (decision.allowed, decision.status, decision.reserved) == (False, 429, False)
    assert backend._orgs["org_1"].counts.calls == 0  # nothing left in flight


async def test_the_advice_for_an_org_id_lago_cannot_address_is_one_that_works(
    client: LagoClient, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``acme.com`` (a dot: Rails reads a format) has no subscription Lago can address: the warning told users to
    map such ids with LAGO_SUBSCRIPTION_ID_TEMPLATE, a template around ``{org_id}`` that cannot replace a character
    (and that LAGO_SUBSCRIPTION_ID_TEMPLATE also names the events' subscription). The org id itself must change."""
    gate = QuotaGate(client.settings, client, config=QuotaConfig(), clock=clock.time)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.quota"):
        decision = await gate.check("acme.com")
    assert decision.status == 402
    [record] = [r for r in caplog.records if "has no subscription Lago can address" in r.getMessage()]
    message = record.getMessage()
    assert "LAGO_SUBSCRIPTION_ID_TEMPLATE" not in message
    assert "resolve_org" in message and "'acme-com'" in message


@needs_redis
async def test_a_blocked_request_on_another_worker_waits_for_the_fleets_reread(
    fake: FakeLago, clock: Clock, redis_url: str
) -> None:
    """Redis, two workers, an org at its limit (2) raised to 50, then ``plan.updated``. Worker A's re-read holds the
    fleet's lock; a request blocked on worker B meanwhile saw the snapshot marked by the webhook, "waited" for the
    refresh of the process holding the lock (any snapshot already there ended the wait at once), and was answered
    429 with ``Retry-After`` = days, the answer the re-read is there to avoid."""
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, redis_url=redis_url)
    prefix = f"rereview:{uuid.uuid4().hex[:8]}:"
    async with LagoClient(settings, transport=fake.transport()) as lago:
        first, second = (
            QuotaGate(settings, lago, config=QuotaConfig(redis_prefix=prefix), clock=clock.time) for _ in range(2)
        )
        a, b = first.backend, second.backend
        assert isinstance(a, RedisBackend) and isinstance(b, RedisBackend)
        storing, go, checked = anyio.Event(), anyio.Event(), anyio.Event()
        results: dict[str, Any] = {}
        async with anyio.create_task_group() as tasks:
            await tasks.start(first.run)
            await tasks.start(second.run)
            await use_up(first)
            await a.flush()
            assert not (await second.check("org_1")).allowed
            fake.store.plans["starter"]["entitlements"]["api_quota"]["max_api_calls"] = 50
            await first.invalidate_all()  # plan.updated
            clock.advance(1)

            store = a.store

            async def held_store(org_id: str, snapshot: Snapshot, now: float) -> bool:
                storing.set()  # A holds the fleet's lock and has read the new plan
                await go.wait()
                return await store(org_id, snapshot, now)

            a.store = held_store  # type: ignore[method-assign]
            hget = b.redis.hget
            polls = 0

            async def counted_hget(*args: Any, **kwargs: Any) -> Any:
                nonlocal polls
                answer = await hget(*args, **kwargs)
                polls += 1
                if polls >= 2:  # B looked twice for A's snapshot: A may store it now
                    go.set()
                return answer

            b.redis.hget = counted_hget

            async def on_first() -> None:
                results["first"] = await first.check("org_1")
                checked.set()

            tasks.start_soon(on_first)
            await storing.wait()
            results["second"] = await second.check("org_1")
            go.set()
            await checked.wait()
            tasks.cancel_scope.cancel()
        await first.aclose()
        await second.aclose()
    assert results["first"].allowed
    assert results["second"].allowed, dict(results["second"].headers)


@needs_redis
async def test_tokens_settled_after_redis_came_back_on_a_fallback_decision_are_counted(
    client: LagoClient, clock: Clock, tmp_path: Path
) -> None:
    """A call decided locally during a Redis outage and settled (with its tokens) after Redis came back: the local
    records were handed to Redis by then (drain: its call counted as recorded there), so its settle found an org
    without a period in the local backend and was dropped: its tokens never counted (an under-count, for the whole
    period when Lago does not count tokens)."""
    port = free_port()
    prefix = f"rereview:{uuid.uuid4().hex[:8]}:"
    with redis_server(tmp_path, port) as url:
        settings = client.settings.replace(redis_url=url)
        config = QuotaConfig(redis_prefix=prefix, redis_retry_interval=0.0)
        gate = QuotaGate(settings, client, config=config, clock=clock.time)
        assert (await gate.check("org_1")).allowed  # seen in Redis (its reservation stays in flight there)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    during = await gate.check("org_1")  # Redis down: decided locally
    assert during.allowed and backend.stats["redis_fallback"] == 1
    with redis_server(tmp_path, port):  # back (empty: a restart lost its data)
        assert (await gate.check("org_1")).allowed  # the local records are handed to Redis
        assert backend.stats["redis_fallback"] == 0
        gate.settle("org_1", during, tokens=7, billed=True)  # the outage's request ends now
        await backend.flush()
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert status["usage"] == {"max_api_calls": 2, "max_tokens": 7}


async def test_a_block_on_a_plan_not_read_again_yet_asks_the_client_back_in_seconds(
    client: LagoClient, clock: Clock
) -> None:
    """After ``plan.updated`` the blocked org's re-read fails (Lago down, or throttled: every refresh paused; with
    Redis, the fleet's refresher slower than ``cold_timeout``): the block stands, with ``Retry-After`` = seconds to
    the period's end (days: a client honouring it stops for days, though the new plan may allow it). Its plan is
    unknown until read again: the client is asked back once the gate tries Lago again (``failure_backoff``)."""
    config = QuotaConfig(cold_timeout=0.05)
    gate = QuotaGate(client.settings, client, config=config, clock=clock.time)
    proxy = Proxy(client)
    gate.client = proxy  # type: ignore[assignment]
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await use_up(gate)
        blocked = await gate.check("org_1")
        assert int(dict(blocked.headers)[b"retry-after"]) > 86400  # known over its plan's limit: the period's end
        await gate.invalidate_all()  # plan.updated
        proxy.fail = True
        decisions = [await gate.check("org_1") for _ in range(2)]
        tasks.cancel_scope.cancel()
    await gate.aclose()
    for decision in decisions:
        assert (decision.allowed, decision.status) == (False, 429)
        retry = int(dict(decision.headers)[b"retry-after"])
        assert 1 <= retry <= config.failure_backoff
        assert decision.problem is not None and decision.problem["retry_after"] == retry
        assert int(dict(decision.headers)[b"ratelimit-reset"]) > 86400  # (the quota's window is unchanged)


@needs_redis
async def test_tokens_settled_during_a_redis_outage_count_against_the_fallback(clock: Clock, tmp_path: Path) -> None:
    """Redis down: calls are counted locally, but the tokens of a request (settled by the middleware with an
    unreserved decision of the call's period, once its event is built) were only queued for Redis: the local
    fallback never saw them, so an org over its token limit was served for the whole outage."""
    from lago_org_billing._middleware import _tokens_only

    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=100, starter_tokens=10)
    port = free_port()
    prefix = f"rereview:{uuid.uuid4().hex[:8]}:"
    async with LagoClient(
        BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0), transport=fake.transport()
    ) as lago:
        with redis_server(tmp_path, port) as url:
            settings = lago.settings.replace(redis_url=url)
            config = QuotaConfig(redis_prefix=prefix, redis_retry_interval=3600.0)
            gate = QuotaGate(settings, lago, config=config, clock=clock.time)
            assert (await gate.check("org_1")).allowed
        during = await gate.check("org_1")  # Redis down: decided locally
        assert during.allowed
        gate.settle("org_1", during, tokens=0, billed=True)
        assert isinstance(during, _Decision)
        gate.settle("org_1", _tokens_only(during.period), tokens=10, billed=False)  # as the middleware does
        after = await gate.check("org_1")
        await gate.aclose()
    assert not after.allowed
