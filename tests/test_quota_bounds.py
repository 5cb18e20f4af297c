"""Quota gate edges under load: a request cancelled while Redis comes back, refresh slots not held while waiting for
another worker's refresh, queued refreshes invalidated before they start, the seed helpers within the refresh bound,
a 429 pause with an upper bound, and the retry of an idempotent request whose first event was dropped (Redis).

Each test failed on the code before its fix (a review of the scale changes). No sleeps as synchronisation, no timing
assertions: events, a settable clock and counts only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import TOKENS, Clock, chat, needs_redis
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._errors import LagoRateLimitError
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend

pytestmark = pytest.mark.anyio


PERIOD_START = "2026-03-01T00:00:00Z"
PERIOD_END = "2026-03-31T23:59:59Z"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client() -> AsyncIterator[LagoClient]:
    """A LagoClient for event delivery only (every batch accepted); the gates read a StubLago."""

    async def accept(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={})

    settings = BillingSettings(api_url="http://lago.test", api_key="k", max_retries=0)
    async with LagoClient(settings, transport=httpx.MockTransport(accept)) as lago:
        yield lago


@pytest.fixture
def prefix() -> str:
    return f"review:{uuid.uuid4().hex[:8]}:"


class StubLago:
    """The two reads the gate makes; optional hooks per org; counts reads and the most in flight at once."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, str]] = []
        self.in_flight = 0
        self.peak = 0
        self.block: dict[str, anyio.Event] = {}  # org -> released when set
        self.entered: dict[str, anyio.Event] = {}  # org -> set when its subscription read starts
        self.raise_once: dict[str, BaseException] = {}

    async def _enter(self, kind: str, org: str) -> None:
        self.reads.append((kind, org))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if kind == "sub" and org in self.entered:
                self.entered[org].set()
            if kind == "sub" and org in self.block:
                await self.block[org].wait()
            for _ in range(3):  # overlapping reads, as on a network
                await anyio.lowlevel.checkpoint()
            error = self.raise_once.pop(org, None) if kind == "sub" else None
            if error is not None:
                raise error
        finally:
            self.in_flight -= 1

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        await self._enter("sub", external_id)
        return {
            "external_id": external_id,
            "external_customer_id": external_id,
            "status": "active",
            "plan_code": "starter",
            "current_billing_period_started_at": PERIOD_START,
            "current_billing_period_ending_at": PERIOD_END,
            "entitlements": [{"code": "api_quota", "privileges": [{"code": "max_api_calls", "value": 1000}]}],
        }

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        await self._enter("usage", subscription)
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

    def count(self, kind: str, org: str) -> int:
        return sum(1 for k, o in self.reads if k == kind and o == org)


def stub_gate(lago: StubLago, clock: Clock, **config: Any) -> QuotaGate:
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k")
    return QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]


async def settle_refreshes(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


def redis_gate(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str, lago: StubLago | None = None, **config: Any
) -> QuotaGate:
    settings = client.settings.replace(redis_url=redis_url)
    config = {"redis_prefix": prefix, **config}
    lago = lago if lago is not None else StubLago()
    return QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]


# ------------------------------------------------------------------ 1. Redis recovery after the shielded round trip


async def _recovering_backend(gate: QuotaGate, clock: Clock, orgs: tuple[str, ...]) -> RedisBackend:
    """Redis answered again after an outage: the records counted locally meanwhile wait to be merged (they are
    merged by the next reservation, on the request's path)."""
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    snapshot = await gate.snapshot("org_1")
    for org_id in orgs:
        backend.fallback.seed(org_id, snapshot)
        backend.fallback.settle(org_id, "", None, clock.time(), tokens=5, billed=True)
    backend.stats["redis_fallback"] = 1
    return backend


@needs_redis
async def test_a_request_cancelled_as_redis_recovers_keeps_the_outage_records(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """The CHECK round trip is shielded, so a cancellation arriving during it is delivered at the next await: the
    merge of the outage's local records in ``_recovered()``, which runs right after, unshielded, on the request's
    path. ``drain()`` has already emptied the local records; the merge is cut and nothing restores them: calls and
    tokens served during the Redis outage vanish from every count (under-count, up to the whole outage's traffic)."""
    gate = redis_gate(client, clock, redis_url, prefix)
    orgs = ("o1", "o2", "o3")
    try:
        backend = await _recovering_backend(gate, clock, orgs)
        original = backend._check
        with anyio.CancelScope() as request_scope:

            async def cancelled_during_the_round_trip(**kwargs: Any) -> Any:
                request_scope.cancel()  # the client goes away while the script runs
                return await original(**kwargs)

            backend._check = cancelled_during_the_round_trip
            await gate.check("org_1")
            await anyio.lowlevel.checkpoint()  # the request goes on (the app awaits something)
        backend._check = original
        assert request_scope.cancelled_caught
        kept = {org_id: counts.calls for org_id, _, counts in backend.fallback.drain()}
        merged = {o: int(await backend.redis.hget(backend.key(o, "count"), "calls") or 0) for o in orgs}
    finally:
        await gate.aclose()
    lost = [o for o in orgs if kept.get(o, 0) + merged[o] != 1]
    assert not lost, f"calls recorded during the outage neither merged nor kept: {lost} (merged={merged}, kept={kept})"


@needs_redis
async def test_a_request_cancelled_as_redis_recovers_releases_its_reservation(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """Same moment, through the middleware: the shield let the CHECK reserve the call, but the cancellation then
    raises out of ``reserve()`` (inside ``_recovered()``) before ``check()`` returns the decision, so the middleware
    never settles it: the call stays in flight for ``inflight_horizon`` (1 h), refusing the org's calls meanwhile,
    exactly what a3eeee4 set out to prevent."""

    async def slow_chat(request: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        return await chat(request)

    gate = redis_gate(client, clock, redis_url, prefix)
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", slow_chat)]),
        client.settings.replace(org_header="X-Org-Id"),
        quota=gate,
        client=client,
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 200  # warm
            assert await middleware.pipeline.flush(5)
            backend = await _recovering_backend(gate, clock, ("o1",))
            await backend.flush()
            original = backend._check
            with anyio.CancelScope() as request_scope:

                async def cancelled_during_the_round_trip(**kwargs: Any) -> Any:
                    request_scope.cancel()
                    return await original(**kwargs)

                backend._check = cancelled_during_the_round_trip
                await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
            backend._check = original
            assert request_scope.cancelled_caught
        assert await middleware.pipeline.flush(5)
        await backend.flush()
        inflight = [f for f in await backend.redis.hkeys(backend.key("org_1", "count")) if f.startswith(b"i:")]
    finally:
        await middleware.aclose()
    assert inflight == [], f"the cancelled request's reservation is held in flight: {inflight}"


# ------------------------------------------------------------------------- 2. refreshes queued behind the slots


async def test_a_queued_refresh_invalidated_before_it_starts_reads_lago_once(clock: Clock) -> None:
    """``invalidate``/``invalidate_all`` mark every org in ``_refreshing`` stale, so that a refresh already reading
    Lago reads again. Since 18bb96e, ``_refreshing`` also holds refreshes still queued for a slot (thousands in a
    burst): they have read nothing yet, but each reads subscription + usage twice once it starts. A ``plan.updated``
    webhook during a cold burst doubles the Lago reads of every queued org (what the slots and pacing bound)."""
    lago = StubLago()
    gate = stub_gate(lago, clock, max_concurrent_refreshes=1)
    lago.block["busy"] = anyio.Event()
    lago.entered["busy"] = anyio.Event()
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await gate.invalidate("busy", refresh=True)  # takes the only slot, and stays in Lago
        await lago.entered["busy"].wait()
        await gate.invalidate("queued", refresh=True)  # waits for the slot
        await gate.invalidate_all()  # a plan.updated webhook: nothing of "queued" has been read yet
        lago.block["busy"].set()
        await settle_refreshes(gate)
        tasks.cancel_scope.cancel()
    assert lago.count("sub", "queued") == 1, f"{lago.count('sub', 'queued')} subscription reads for one refresh"
    assert lago.count("usage", "queued") == 1


async def test_seed_helpers_stay_within_the_refresh_concurrency(clock: Clock) -> None:
    """``snapshot()`` (behind ``check_org_has_active_subscription``/``get_org_plan_limits``/``enforce_usage_limits``,
    used as per-request dependencies) fetches a cold org itself: not through the slots, not paused after a 429,
    not deduplicated with the refresh in flight. A cold burst through the helpers is the unbounded burst 18bb96e
    bounded for check()."""
    lago = StubLago()
    gate = stub_gate(lago, clock, max_concurrent_refreshes=4)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        async with anyio.create_task_group() as burst:
            for i in range(50):
                burst.start_soon(gate.get_org_plan_limits, f"o{i}")
        tasks.cancel_scope.cancel()
    assert lago.peak <= 4, f"{lago.peak} Lago reads in flight at once (LAGO_QUOTA_REFRESH_CONCURRENCY=4)"


async def test_a_429_pause_is_bounded(clock: Clock) -> None:
    """After a refresh's 429 every refresh of the process waits ``retry_after`` (X-RateLimit-Reset / Retry-After,
    taken as given). A reset a gateway gives as an epoch time (as GitHub-style limiters do) or an hour-long
    Retry-After pauses every org's refresh for that long: no cold org gets a snapshot (fail-open or 503 for all)
    and stale ones are never refreshed. The pause should be capped (e.g. at the TTL)."""
    lago = StubLago()
    gate = stub_gate(lago, clock)
    lago.raise_once["o1"] = LagoRateLimitError("429 (stub)", status=429, retry_after=1_773_144_000.0)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await gate.check("o1")  # cold: Lago answers 429
        await settle_refreshes(gate)
        clock.advance(3600)  # an hour later, Lago long since answers
        await gate.check("o2")  # another cold org
        await settle_refreshes(gate)
        tasks.cancel_scope.cancel()
    assert lago.count("sub", "o2") == 1, f"no refresh for an hour after one 429 (paused until {gate._paused_until})"


# --------------------------------------------------------------------------------------- 3. idempotent retries


@needs_redis
async def test_the_retry_of_a_dropped_first_event_is_counted_with_redis(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """In process, a first request whose event the full outbox drops is forgotten (``_first_seen`` entry deleted), so
    its retry is the first event after all and is counted. With ``LAGO_REDIS_URL`` the first timestamp was already
    SET NX in Redis by ``_share_first_seen`` and is left there: the retry is taken for a retry (released, its tokens
    not counted) while its event is the only one Lago ever gets. Lago bills one call; the gate counts none until the
    next snapshot (and none at all for tokens Lago does not count)."""
    gate = redis_gate(client, clock, redis_url, prefix)
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", chat)]),
        client.settings.replace(org_header="X-Org-Id", redis_url=redis_url),
        quota=gate,
        client=client,
        idempotency_header="Idempotency-Key",
    )
    submit = middleware._submit
    dropped: list[object] = []

    def drop_the_first(facts: Any) -> object:
        if not dropped:
            dropped.append(facts)
            return False  # the memory outbox is full: the event is dropped
        return submit(facts)

    middleware._submit = drop_the_first
    headers = {"X-Org-Id": "org_1", "Idempotency-Key": f"k-{uuid.uuid4()}"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            for _ in range(2):  # the request (its event dropped), then its retry
                assert (await http.get("/v1/chat", headers=headers)).status_code == 200
        assert await middleware.pipeline.flush(5)
        backend = gate.backend
        assert isinstance(backend, RedisBackend)
        await backend.flush()
        usage = (await gate.enforce_usage_limits("org_1"))["usage"]
    finally:
        await middleware.aclose()
    assert len(dropped) == 1 and middleware.stats["billed"] == 1  # one event went to Lago: the retry's
    assert usage == {"max_api_calls": 1, "max_tokens": TOKENS}, f"the one event Lago bills is not counted: {usage}"


@needs_redis
async def test_waiting_for_another_workers_refresh_does_not_hold_a_refresh_slot(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """With Redis, a refresh whose fleet lock another worker holds makes no Lago call: it polls Redis
    (``wait_snapshot``) for up to ``cold_timeout``. It does so inside its slot, so in a fleet a cold burst (each org's
    lock won by one worker of W) fills every worker's slots with such waits: the fleet reads Lago ~16 at a time in
    all, not 16 per worker, and cold orgs whose locks are free queue behind the waits until their requests time out
    (fail-open / 503 while Lago and the locks are free)."""
    lago = StubLago()
    lago.block["x"] = anyio.Event()
    lago.entered["x"] = anyio.Event()
    lago.entered["y"] = anyio.Event()
    worker_a = redis_gate(client, clock, redis_url, prefix, lago)
    worker_b = redis_gate(client, clock, redis_url, prefix, lago, max_concurrent_refreshes=1, cold_timeout=30.0)
    backend_b = worker_b.backend
    assert isinstance(backend_b, RedisBackend)
    waiting = anyio.Event()
    wait_snapshot = backend_b.wait_snapshot

    async def noted_wait_snapshot(*args: Any, **kwargs: Any) -> None:
        waiting.set()
        await wait_snapshot(*args, **kwargs)

    backend_b.wait_snapshot = noted_wait_snapshot  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(worker_a.run)
            await tasks.start(worker_b.run)
            await worker_a.invalidate("x", refresh=True)  # worker A holds x's fleet lock, reading Lago
            await lago.entered["x"].wait()
            tasks.start_soon(worker_b.check, "x")  # a cold request of x on worker B: waits for A's snapshot
            await waiting.wait()
            await worker_b.invalidate("y", refresh=True)  # y: nobody holds its lock
            slots = worker_b._slots
            while not (lago.entered["y"].is_set() or "y" in slots._urgent or "y" in slots._later):
                await anyio.lowlevel.checkpoint()
            queued_behind_a_wait = not lago.entered["y"].is_set()
            lago.block["x"].set()
            await settle_refreshes(worker_a)
            await settle_refreshes(worker_b)
            tasks.cancel_scope.cancel()
    finally:
        await worker_a.aclose()
        await worker_b.aclose()
    assert not queued_behind_a_wait, "y's Lago read waits for the slot of a refresh that only polls Redis for x"


@pytest.fixture
async def gate(clock: Clock, redis_url: str, prefix: str) -> AsyncIterator[QuotaGate]:
    """A Redis-backed gate reading a StubLago."""
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=redis_url)
    gate = QuotaGate(settings, StubLago(), config=QuotaConfig(redis_prefix=prefix), clock=clock.time)  # type: ignore[arg-type]
    try:
        yield gate
    finally:
        await gate.aclose()


@needs_redis
async def test_outage_records_restored_by_a_native_cancel_are_merged_later(gate: QuotaGate, clock: Clock) -> None:
    """A native cancel (task.cancel(), asyncio.timeout...) goes through anyio's shield: ``_recovered()`` then puts
    the unmerged records back in the fallback, but it has already set redis_fallback = 0 and _down_until = 0, so
    nothing merges them again while Redis stays up (the fallback is not consulted then): the calls served during
    the outage are missing from the fleet's count for the rest of the period (more than the limit allowed)."""
    orgs = ("o1", "o2")
    backend = await _recovering_backend(gate, clock, orgs)
    original = backend._merge
    entered, never = asyncio.Event(), asyncio.Event()

    async def merge_cut_off(**kwargs: Any) -> Any:
        entered.set()
        await never.wait()  # the request's task is cancelled natively meanwhile

    backend._merge = merge_cut_off
    task = asyncio.ensure_future(gate.check("org_1"))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    backend._merge = original
    for _ in range(3):  # Redis is up; requests go on
        await gate.check("org_1")
    merged = {o: int(await backend.redis.hget(backend.key(o, "count"), "calls") or 0) for o in orgs}
    assert merged == {"o1": 1, "o2": 1}, (
        f"outage records never merged (Redis counts {merged}; left in the unused fallback, "
        f"redis_fallback={backend.stats['redis_fallback']})"
    )


@needs_redis
async def test_a_refresh_cut_off_as_it_takes_the_fleet_lock_hands_it_back(gate: QuotaGate) -> None:
    """The unlock in ``finally`` covers failures after try_lock returned; a cancellation (gate closing, the worker
    shutting down) that arrives while the LOCK script's answer is on its way leaves ``locked`` False and the lock in
    Redis for the whole TTL: no worker of the fleet may refresh the org meanwhile (cold requests wait out
    cold_timeout and fail open/closed)."""
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    original = backend._lock
    scope = anyio.CancelScope()

    async def answer_lost(**kwargs: Any) -> Any:
        result = await original(**kwargs)  # Redis took the lock...
        scope.cancel()  # ...and the refresh is cut off before try_lock returns
        await anyio.lowlevel.checkpoint()
        return result

    backend._lock = answer_lost
    event = gate._refreshing["x"] = anyio.Event()
    with scope:
        await gate._refresh("x", event)
    assert scope.cancelled_caught
    pttl = await backend.redis.pttl(backend.key("x", "lock"))
    assert pttl <= gate.config.failure_backoff * 1000, f"fleet lock of x held for another {pttl} ms (TTL {gate.ttl} s)"


@needs_redis
async def test_the_recovery_merge_inside_the_reservation_shield_is_bounded(gate: QuotaGate, clock: Clock) -> None:
    """The merge of every org's outage records now runs inside the shield of one request's reservation, one Redis
    round trip per org, with no overall bound: a request cut off (client gone, its deadline) is held for as many
    round trips as there are orgs with records (each up to redis_timeout + the pool's wait)."""
    orgs = tuple(f"o{i}" for i in range(5))
    backend = await _recovering_backend(gate, clock, orgs)
    original = backend._merge
    deadlines: list[float] = []

    async def noted(**kwargs: Any) -> Any:
        deadlines.append(anyio.current_effective_deadline())
        return await original(**kwargs)

    backend._merge = noted
    with anyio.move_on_after(3600):  # the request's own deadline
        await gate.check("org_1")
    assert len(deadlines) == len(orgs)
    assert all(d != float("inf") for d in deadlines), "the shielded merge of all orgs runs without any deadline"
