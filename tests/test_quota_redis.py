"""Quota gating with the Redis backend (a real ``redis-server``): several gates (= workers) share one count and
one snapshot per org, Lago is asked once per TTL for the fleet, invalidation is fleet-wide, Redis outages fall
back to local counting."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import REDIS_SERVER, TOKENS, Clock, chat, free_port, redis_server, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


@pytest.fixture
def clock() -> Clock:
    """One settable clock for the gates and the emulator."""
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """A seeded emulator (org_1 on starter: 300 calls)."""
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=300)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    """A LagoClient on the emulator, without retries."""
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


@pytest.fixture
def prefix() -> str:
    """Redis keys of one test never meet another's."""
    return f"test:{uuid.uuid4().hex[:8]}:"


_OPEN: list[QuotaGate] = []


@pytest.fixture(autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    """Every gate a test made is closed (its Redis connections with it)."""
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


def make_gate(client: LagoClient, clock: Clock, url: str, prefix: str, **config: object) -> QuotaGate:
    settings = client.settings.replace(redis_url=url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix, **config), clock=clock.time)  # type: ignore[arg-type]
    _OPEN.append(gate)
    return gate


def usage_reads(fake: FakeLago) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/current_usage"))


async def test_four_gates_share_one_count(
    client: LagoClient, fake: FakeLago, clock: Clock, redis_url: str, prefix: str
) -> None:
    """4 gates (workers), 1,000 concurrent checks, limit 300: exactly 300 allowed; Lago read once."""
    # (1,000 connections opened at once: on a loaded machine some took over the 2 s default to connect, and their gates
    # counted locally, as they do when Redis is down; a healthy Redis is what this test is about)
    gates = [make_gate(client, clock, redis_url, prefix, redis_timeout=30.0) for _ in range(4)]
    allowed = 0

    async def one(gate: QuotaGate) -> None:
        nonlocal allowed
        decision = await gate.check("org_1")
        allowed += decision.allowed

    async with anyio.create_task_group() as tasks:
        for gate in gates:
            await tasks.start(gate.run)
        async with anyio.create_task_group() as burst:
            for n in range(1000):
                burst.start_soon(one, gates[n % 4])
        for gate in gates:
            await gate.aclose()
    # (counted in Redis throughout: a gate that fell back counts alone, and this test would say nothing of Redis)
    assert [getattr(gate.backend, "stats", {}).get("redis_errors") for gate in gates] == [0] * 4
    assert allowed == 300
    assert usage_reads(fake) == 1
    assert sum(g.stats["blocked"] for g in gates) == 700


async def test_snapshot_shared_and_refreshed_once_per_ttl(
    client: LagoClient, fake: FakeLago, clock: Clock, redis_url: str, prefix: str
) -> None:
    """A second gate decides from the first one's snapshot; after the TTL one gate of the fleet refreshes."""
    first, second = (make_gate(client, clock, redis_url, prefix) for _ in range(2))
    await first.check("org_1")
    reads = len(fake.requests)
    decision = await second.check("org_1")
    assert len(fake.requests) == reads
    assert dict(decision.headers)[b"ratelimit-remaining"] == b"298"
    clock.advance(31)
    await first.check("org_1")
    await second.check("org_1")
    for gate in (first, second):
        for event in list(gate._refreshing.values()):
            await event.wait()
    assert usage_reads(fake) == 2  # one refresh for both (SET NX PX lock)
    status = await second.enforce_usage_limits("org_1")
    assert status["usage"]["max_api_calls"] == 4


async def test_settle_releases_and_counts_tokens(client: LagoClient, clock: Clock, redis_url: str, prefix: str) -> None:
    """Settles go through the background writer: released calls come back, tokens add up."""
    gate = make_gate(client, clock, redis_url, prefix)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        for billed in (True, False, False):
            decision = await gate.check("org_1")
            gate.settle("org_1", decision, tokens=TOKENS if billed else 0, billed=billed)
        gate.settle("org_1", QuotaDecision(), tokens=5, billed=True)  # billed without a check
        await gate.aclose()
    other = make_gate(client, clock, redis_url, prefix)
    status = await other.enforce_usage_limits("org_1")
    assert status["usage"] == {"max_api_calls": 2, "max_tokens": TOKENS + 5}


async def test_invalidation_is_fleet_wide(
    client: LagoClient, fake: FakeLago, clock: Clock, redis_url: str, prefix: str
) -> None:
    """One gate invalidates after a plan change; another gate's next check sees the new plan."""
    fake.store.plans["starter"]["entitlements"]["api_quota"]["max_api_calls"] = 2
    first, second = (make_gate(client, clock, redis_url, prefix) for _ in range(2))
    assert [(await second.check("org_1")).allowed for _ in range(3)] == [True, True, False]
    await client.create_subscription(external_customer_id="org_1", plan_code="pro", external_id="org_1")
    assert not (await second.check("org_1")).allowed
    await first.invalidate("org_1")
    decision = await second.check("org_1")
    assert decision.allowed and dict(decision.headers)[b"ratelimit-limit"] == b"10000"


async def test_invalidate_all_refreshes_the_plan_part(
    client: LagoClient, fake: FakeLago, clock: Clock, redis_url: str, prefix: str
) -> None:
    """invalidate_all (plan/feature webhooks): every org re-reads its subscription at its next request."""
    gate = make_gate(client, clock, redis_url, prefix)
    await gate.check("org_1")
    fake.store.plans["starter"]["entitlements"]["api_quota"]["max_api_calls"] = 1
    other = make_gate(client, clock, redis_url, prefix)
    await other.invalidate_all()
    await gate.check("org_1")  # served from the (due) snapshot, refresh starts
    for event in list(gate._refreshing.values()):
        await event.wait()
    assert not (await gate.check("org_1")).allowed


async def test_redis_outage_falls_back_to_local_counting(
    client: LagoClient, clock: Clock, tmp_path: Path, prefix: str
) -> None:
    """Redis dies: decisions continue from the last usage seen, counted locally (and said so in stats);
    Redis back: the local records are added to the shared counters."""
    port = free_port()
    with redis_server(tmp_path, port) as url:
        gate = make_gate(client, clock, url, prefix, redis_retry_interval=0.0)
        for _ in range(3):
            assert (await gate.check("org_1")).allowed
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    decision = await gate.check("org_1")
    assert decision.allowed
    assert backend.stats["redis_fallback"] == 1 and backend.stats["redis_errors"] >= 1
    assert dict(decision.headers)[b"ratelimit-remaining"] == b"296"  # 3 seen in Redis + this one
    gate.settle("org_1", decision, tokens=7, billed=True)
    with redis_server(tmp_path, port) as url:
        decision = await gate.check("org_1")  # Redis is back (empty: it lost everything)
        assert backend.stats["redis_fallback"] == 0
        assert decision.allowed
        status = await gate.enforce_usage_limits("org_1")
        assert status["usage"] == {"max_api_calls": 2, "max_tokens": 7}  # local records merged, + this call
        await gate.aclose()


async def test_redis_never_reachable_still_gates(client: LagoClient, clock: Clock, prefix: str) -> None:
    """No Redis at all: the gate works per process and says so."""
    gate = make_gate(client, clock, f"redis://127.0.0.1:{free_port()}/0", prefix)
    decision = await gate.check("org_1")
    assert decision.allowed and dict(decision.headers)[b"ratelimit-remaining"] == b"299"
    assert isinstance(gate.backend, RedisBackend) and gate.backend.stats["redis_fallback"] == 1


async def test_new_billing_period_is_refreshed_at_once_by_the_fleet(
    client: LagoClient, fake: FakeLago, clock: Clock, redis_url: str, prefix: str
) -> None:
    """A refresh just before a period ends holds the fleet's refresh lock; once the period is over the snapshot is
    of the past one. The lock ends with the period, so the first gate to see the new one refreshes at once and the
    other waits for its snapshot: nobody falls back to the fail policy (here: fail closed, 503)."""
    settings = client.settings.replace(redis_url=redis_url, fail_open=False)
    gates = []
    for _ in range(2):
        gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time)
        _OPEN.append(gate)
        gates.append(gate)
    first, second = gates
    assert (await first.check("org_1")).allowed and (await second.check("org_1")).allowed
    clock.at = dt.datetime(2026, 3, 31, 23, 59, 50, tzinfo=dt.timezone.utc)
    assert (await first.check("org_1")).allowed  # the snapshot is due: a refresh, which takes the lock for 30 s
    await first._refreshing["org_1"].wait()
    clock.advance(15)  # 2026-04-01T00:00:05Z: a new period
    reads = usage_reads(fake)
    decisions = [await second.check("org_1"), await first.check("org_1")]
    assert [(d.allowed, d.status) for d in decisions] == [(True, None), (True, None)]
    for gate in gates:  # the new period's provisional snapshot is refreshed in the background, paced
        while gate._refreshing:
            for event in list(gate._refreshing.values()):
                await event.wait()
    assert usage_reads(fake) == reads + 1  # one refresh for the fleet
    assert dict(decisions[1].headers)[b"ratelimit-remaining"] == b"298"  # the new period: 2 calls so far


async def test_calls_reserved_before_a_redis_outage_are_settled_in_redis(
    client: LagoClient, clock: Clock, tmp_path: Path, prefix: str
) -> None:
    """Calls reserved in Redis, answered during a Redis outage: their settles wait for Redis, which releases the
    reservations of the unbilled ones, instead of leaving them counted for an hour."""
    port = free_port()
    with redis_server(tmp_path, port) as url:
        gate = make_gate(client, clock, url, prefix, redis_retry_interval=0.0)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            decisions = [await gate.check("org_1") for _ in range(5)]
            tasks.cancel_scope.cancel()
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    for decision in decisions:  # answered while Redis is down: not billed (5xx)
        gate.settle("org_1", decision, tokens=0, billed=False)
    await backend.flush()
    assert len(backend._queue) == 5  # kept for Redis
    with redis_server(tmp_path, port) as url:  # back (and empty: a restart lost its data; the script starts over)
        await backend.flush()
        assert len(backend._queue) == 0
        status = await gate.enforce_usage_limits("org_1")
    assert status["usage"]["max_api_calls"] == 0


async def test_a_request_cancelled_during_its_redis_reservation_releases_it(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """A request cancelled (a client gone, a timeout) while its call is being reserved in Redis: the script ran, so
    the reservation is settled (released: the app never answered) instead of held in flight for an hour, refusing
    the org's calls meanwhile."""

    async def slow_chat(request: Any) -> Any:
        await anyio.lowlevel.checkpoint()  # the app awaits something before answering
        return await chat(request)

    gate = make_gate(client, clock, redis_url, prefix)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", slow_chat)]),
        client.settings.replace(org_header="X-Org-Id"),
        quota=gate,
        client=client,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
        assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 200  # warm
        original = backend._check
        with anyio.CancelScope() as request_scope:

            async def cancelled_during_the_round_trip(**kwargs: Any) -> Any:
                request_scope.cancel()  # delivered at the next await: sending the script, or reading its answer
                return await original(**kwargs)

            backend._check = cancelled_during_the_round_trip  # type: ignore[method-assign]
            await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
        backend._check = original  # type: ignore[method-assign]
        assert request_scope.cancelled_caught
    assert await middleware.pipeline.flush(5)
    await backend.flush()
    status = await gate.enforce_usage_limits("org_1")
    await middleware.aclose()
    assert status["usage"]["max_api_calls"] == 1  # the served request only


async def test_local_records_not_merged_when_redis_fails_again_are_kept(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """Redis answers again, then fails in the middle of taking the local records back: what was not merged yet
    stays counted locally (it was dropped)."""
    gate = make_gate(client, clock, redis_url, prefix)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    snapshot = await gate.snapshot("org_1")
    for org_id in ("o1", "o2", "o3"):
        backend.fallback.seed(org_id, snapshot)
        backend.fallback.settle(org_id, "", None, clock.time(), tokens=5, billed=True)
    backend.stats["redis_fallback"] = 1
    merge = backend._merge
    merged: list[str] = []

    async def merge_then_fail(keys: list[str], args: list[object]) -> object:
        if merged:
            raise ConnectionError("Redis went away again")
        merged.append(keys[0])
        return await merge(keys=keys, args=args)

    backend._merge = merge_then_fail  # type: ignore[method-assign]
    await backend._recovered()
    assert len(merged) == 1 and backend.stats["redis_fallback"] == 1
    kept = backend.fallback.drain()
    assert sorted(org_id for org_id, _, _ in kept) == sorted({"o1", "o2", "o3"} - {merged[0].split("{")[1][:2]})
    assert all(counts.calls == 1 and counts.tokens == 5 for _, _, counts in kept)


async def test_tokens_lago_does_not_count_keep_counting_in_redis(clock: Clock, redis_url: str, prefix: str) -> None:
    """The same with Redis: the STORE script folds the records Lago does not count instead of pruning them."""
    from test_quota import CountOnlyLago

    settings = BillingSettings(api_key="k", api_url="http://lago.test", redis_url=redis_url)
    gate = QuotaGate(settings, CountOnlyLago(), config=QuotaConfig(redis_prefix=prefix), clock=clock.time)  # type: ignore[arg-type]
    _OPEN.append(gate)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    for _ in range(2):
        decision = await gate.check("org_1")
        assert decision.allowed
        gate.settle("org_1", decision, tokens=900, billed=True)
        await backend.flush()
        clock.advance(40)
        await backend.store("org_1", await gate.fetch("org_1"), clock.time())  # a routine refresh
    assert (await gate.enforce_usage_limits("org_1"))["usage"]["max_tokens"] == 1800
    assert not (await gate.check("org_1")).allowed
    fields = await backend.redis.hkeys(backend.key("org_1", "count"))
    assert sorted(f.decode() for f in fields if f.startswith(b"t:")) == ["t:0"]


# ------------------------------------------------------------------------------------- idempotency keys, fleet-wide


async def test_an_idempotent_retry_on_another_worker_is_billed_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """idempotency_header with LAGO_REDIS_URL: a retry reaching another worker (another middleware, its own memory)
    gets the first request's timestamp from Redis, so Lago's ClickHouse store (deduplicating on transaction_id and
    timestamp) keeps one event; each worker had kept its own, billed twice. Redis down: served and billed, said once."""
    import time
    import types

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from lago_org_billing import OrgBillingMiddleware, _middleware

    now = [1_700_000_000.0]
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic))

    async def chat(request: object) -> JSONResponse:
        return JSONResponse({"usage": {"total_tokens": 3}})

    fake = FakeLago(api_key="k", event_store="clickhouse")
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", org_header="X-Org-Id", quota_mode="off", redis_url=redis_url
    )
    key = {"X-Org-Id": "org_1", "Idempotency-Key": f"k-{uuid.uuid4()}"}
    workers = [
        OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", chat)]),
            settings,
            idempotency_header="Idempotency-Key",
            transport=fake.transport(),
        )
        for _ in range(2)
    ]
    for worker in workers:  # the first request, then its retry 5 s later on the other worker
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=worker), base_url="http://app") as client:
            assert (await client.get("/v1/chat", headers=key)).status_code == 200
        assert await worker.pipeline.flush(5)
        now[0] += 5
    for worker in workers:
        await worker.aclose()
    assert len(fake.events) == 1

    down = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", chat)]),
        settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}"),
        idempotency_header="Idempotency-Key",
        transport=fake.transport(),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=down), base_url="http://app") as client:
        for _ in range(2):
            assert (await client.get("/v1/chat", headers={**key, "Idempotency-Key": "other"})).status_code == 200
    assert await down.pipeline.flush(5)
    await down.aclose()
    assert len(fake.events) == 2  # this worker's retry kept its first timestamp in memory
    said = [r for r in caplog.records if "Redis (LAGO_REDIS_URL) is unavailable for idempotency keys" in r.getMessage()]
    assert len(said) == 1


async def test_an_idempotent_retry_on_another_worker_is_counted_once(
    client: LagoClient, fake: FakeLago, clock: Clock, redis_url: str, prefix: str
) -> None:
    """idempotency_header with LAGO_REDIS_URL: a request and its retries on other workers are one event in Lago, so
    the fleet's count has it once (calls and tokens); each retry had been counted again."""
    settings = client.settings.replace(org_header="X-Org-Id", redis_url=redis_url)
    workers = []
    for _ in range(2):
        gate = make_gate(client, clock, redis_url, prefix)
        workers.append(
            OrgBillingMiddleware(
                Starlette(routes=[Route("/v1/chat", chat)]),
                settings,
                quota=gate,
                client=client,
                idempotency_header="Idempotency-Key",
            )
        )
    key = {"X-Org-Id": "org_1", "Idempotency-Key": f"k-{uuid.uuid4()}"}
    for n in range(4):  # the request, then three retries, alternating between the workers
        worker = workers[n % 2]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=worker), base_url="http://app") as http:
            assert (await http.get("/v1/chat", headers=key)).status_code == 200
        assert await worker.pipeline.flush(5)
        await worker.quota.backend.flush()  # type: ignore[union-attr]
    usage = (await workers[0].quota.enforce_usage_limits("org_1"))["usage"]  # type: ignore[union-attr]
    for worker in workers:
        await worker.aclose()
    assert usage == {"max_api_calls": 1, "max_tokens": TOKENS}
    assert len(fake.events) == 1
    assert sum(worker.stats.get("idempotent_retries", 0) for worker in workers) == 3


async def test_the_redis_password_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The fallback warning and the recovery line name Redis without its password."""
    import logging

    caplog.set_level(logging.INFO, logger="lago_org_billing")
    backend = RedisBackend(f"redis://:s3cretRedisPw@127.0.0.1:{free_port()}/0", QuotaConfig())  # nothing listens
    try:
        await backend.reserve("org_a", 1e9, "normal", None)
    finally:
        await backend.aclose()
    assert backend.stats["redis_fallback"] == 1 and "falls back" in caplog.text
    assert "s3cretRedisPw" not in caplog.text and ":***@127.0.0.1" in caplog.text


async def test_a_refresh_failing_after_the_gate_closed_does_not_warn_of_an_outage(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh still running when the gate closes fails on the closed connection: that is the shutdown, not Redis
    going down, so no "falls back to this process" warning at every stop of a busy server."""
    settings = client.settings.replace(redis_url=redis_url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time)
    assert (await gate.check("org_1")).allowed
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    await gate.aclose()
    backend._failed(ConnectionError("Connection closed by server."))
    assert "falls back" not in caplog.text
    assert backend.stats["redis_errors"] == 1
