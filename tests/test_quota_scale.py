"""Quota gate at fleet scale (thousands of active orgs): Lago reads bounded in concurrency and paced, a 429 pausing
every refresh, refreshes spread in time, the Redis refresh lock handed back after a failure, keys that expire,
records that stay bounded while Lago is down.

Every figure is a count (Lago calls, calls in flight, calls per gate-clock second, keys, buckets): no sleeps as
synchronisation, no timing assertions. Each test failed on the code before the fix (scale review).
"""

from __future__ import annotations

import collections
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from _quota_app import Clock, needs_redis, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import LagoUnavailableError
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._faults import install_faults

pytestmark = pytest.mark.anyio

#: Lago Cloud's documented limits (per Lago organization): current usage, every other endpoint.
USAGE_PER_SECOND = 200
OTHER_PER_SECOND = 50
#: LagoClient's httpx pool (max_connections).
POOL = 50
N = 2_000


# --------------------------------------------------------------------------------------------- helpers


class CountingTransport(httpx.AsyncBaseTransport):
    """At the network edge: counts Lago requests, the most in flight at once, and the answers' statuses.
    A few checkpoints before forwarding let concurrent requests overlap as they would on a real network."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.in_flight = 0
        self.peak = 0
        self.statuses: collections.Counter[int] = collections.Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            response = await self.inner.handle_async_request(request)
            self.statuses[response.status_code] += 1
            return response
        finally:
            self.in_flight -= 1


PERIOD_START = "2026-03-01T00:00:00Z"
PERIOD_END = "2026-03-31T23:59:59Z"


class StubLago:
    """A LagoClient stand-in (the two reads the gate makes), logging (gate-clock time, kind, org) per call."""

    def __init__(self, clock: Clock, *, limit: int = 1_000_000, fail: bool = False) -> None:
        self.clock = clock
        self.limit = limit
        self.fail = fail
        self.log: list[tuple[float, str, str]] = []

    def _read(self, kind: str, org: str) -> None:
        self.log.append((self.clock.time(), kind, org))
        if self.fail:
            raise LagoUnavailableError("Lago is down (stub)", status=503)

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        self._read("sub", external_id)
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
        self._read("usage", subscription)
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

    def per_second(self, kind: str, since: float = float("-inf")) -> collections.Counter[int]:
        return collections.Counter(int(t) for t, k, _ in self.log if k == kind and t >= since)


def stub_gate(lago: StubLago, clock: Clock, **config: Any) -> QuotaGate:
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k")
    return QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]


async def settle_refreshes(*gates: QuotaGate) -> None:
    for gate in gates:
        while gate._refreshing:
            for event in list(gate._refreshing.values()):
                await event.wait()


async def traffic(gate: QuotaGate, orgs: list[str], clock: Clock, seconds: int) -> None:
    """Every org sends one request per gate-clock second for ``seconds`` seconds (refreshes run in between)."""
    for _ in range(seconds):
        for org in orgs:
            await gate.check(org)
        await settle_refreshes(gate)
        clock.advance(1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def crowd() -> FakeLago:
    """One emulator with N orgs (o0..o1999) on ``starter`` (seeded once: it takes a second)."""
    fake = seed(FakeLago(api_key="k"), starter_calls=1_000)
    for i in range(N):
        fake.add_customer(f"o{i}")
        fake.add_subscription(f"o{i}", "starter")
    return fake


@pytest.fixture
def lago(crowd: FakeLago) -> Iterator[FakeLago]:
    crowd.clear_faults()
    crowd.requests.clear()
    yield crowd
    crowd.clear_faults()


async def burst(gate: QuotaGate, orgs: list[str]) -> list[Any]:
    decisions: list[Any] = []

    async def one(org: str) -> None:
        decisions.append(await gate.check(org))

    async with anyio.create_task_group() as tasks:
        for org in orgs:
            tasks.start_soon(one, org)
    return decisions


# ------------------------------------------------------------------------------------ 1. cold bursts


async def cold_burst(lago: FakeLago, transport: httpx.AsyncBaseTransport) -> QuotaGate:
    """The first checks of N cold orgs at once, through ``transport``; the gate once their refreshes are over."""
    settings = BillingSettings(api_url=lago.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=transport) as client:
        gate = QuotaGate(settings, client, config=QuotaConfig())
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            await burst(gate, [f"o{i}" for i in range(N)])
            await settle_refreshes(gate)
            tasks.cancel_scope.cancel()
    return gate


async def test_a_cold_burst_keeps_lago_reads_within_the_refresh_concurrency(lago: FakeLago) -> None:
    """2,000 first requests of distinct cold orgs right after startup: every one starts its own refresh at once, so
    2,000 Lago reads are in flight together. Behind LagoClient's 50-connection httpx pool they queue in httpcore,
    whose queue handling is O(queued x connections) per pool event: measured against the emulator over HTTP, the
    event loop froze for ~25 s (warm orgs too), cold requests waited ~24 s instead of cold_timeout (2 s), and all
    2,000 refreshes failed (PoolTimeout/ConnectTimeout). The gate should keep at most a pool's worth in flight."""
    transport = CountingTransport(lago.transport())
    await cold_burst(lago, transport)
    assert sum(transport.statuses.values()) == 2 * N  # subscription + current_usage per org
    assert transport.peak <= POOL, f"{transport.peak} Lago reads in flight at once (pool: {POOL} connections)"


async def test_a_429_pauses_the_refreshes_of_other_orgs(lago: FakeLago) -> None:
    """Lago limits ``GET /subscriptions`` to 50/s (all non-usage endpoints) and ``current_usage`` to 200/s per
    organization. A cold burst of 2,000 orgs: after the first 429 (X-RateLimit-Reset given) the gate keeps firing
    the other orgs' reads into the closed window, so ~1,950 get 429 (and fail open / 503), and with retries they
    all come back at the same instant (the reset), where the window admits 50 again."""
    install_faults(lago, clock=lambda: 0.0)  # one rate-limit window for the whole test (no real time involved)
    lago.inject_fault(path="/api/v1/subscriptions", rate_limit={"limit": OTHER_PER_SECOND, "reset": 1})
    lago.inject_fault(path="/api/v1/customers", rate_limit={"limit": USAGE_PER_SECOND, "reset": 1})
    transport = CountingTransport(lago.transport())
    try:
        gate = await cold_burst(lago, transport)
    finally:
        install_faults(lago, clock=time.monotonic)
    rate_limited = transport.statuses[429]
    assert rate_limited <= POOL, (
        f"{rate_limited} reads answered 429 in one rate-limit window; refresh_errors={gate.stats['refresh_errors']}, "
        f"fail_open={gate.stats['fail_open']}"
    )


async def test_429_retries_of_a_burst_are_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """LagoClient waits exactly X-RateLimit-Reset after a 429 (its jitter, <= retry_backoff, is below it): every
    read of a burst retries at the same instant, into a window that again admits only the limit."""
    waits: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"X-RateLimit-Reset": "1"}, json={"status": 429, "error": "Too Many"})

    async def record(seconds: float) -> None:
        waits.append(seconds)

    settings = BillingSettings(api_url="http://lago.test", api_key="k", max_retries=1)
    async with LagoClient(settings, transport=httpx.MockTransport(handler)) as client:
        monkeypatch.setattr("lago_org_billing._client.anyio.sleep", record)  # the client's back-off, not waited
        async with anyio.create_task_group() as tasks:
            for i in range(100):
                tasks.start_soon(_swallow, client.get_subscription(f"o{i}"))
        monkeypatch.undo()
    assert len(waits) == 100
    assert len(set(waits)) > 1, f"all 100 retries wait exactly {waits[0]} s: they hit Lago again together"


async def _swallow(coro: Any) -> None:
    try:
        await coro
    except Exception:
        pass


# ---------------------------------------------------------------------------------- 2. steady state


async def test_refreshes_are_spread_after_a_cold_burst(clock: Clock) -> None:
    """2,000 orgs first seen in the same second (a deploy, a Redis flush, a morning peak) refresh again within a
    3-s window (jitter = 10 % of the 30-s TTL) and keep doing so: measured 697, 656, 529 current_usage calls in one
    gate-clock second in cycles 2-4 (Lago: 200/s). The average would be 2,000/30 = 67/s."""
    random.seed(1)
    lago = StubLago(clock)
    gate = stub_gate(lago, clock)
    orgs = [f"o{i}" for i in range(N)]
    start = clock.time()
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await traffic(gate, orgs, clock, 61)
        tasks.cancel_scope.cancel()
    second_cycle = lago.per_second("usage", since=start + 1)
    peak = max(second_cycle.values())
    assert sum(second_cycle.values()) >= N  # every org refreshed once more
    assert peak <= USAGE_PER_SECOND, f"{peak} current_usage calls in one second (Lago allows {USAGE_PER_SECOND}/s)"


async def test_subscription_rereads_of_the_fleet_are_spread(clock: Clock) -> None:
    """The subscription part is re-read when ``plan_ttl`` (300 s) has passed, with no jitter of its own: orgs first
    seen together re-read their subscriptions together. Measured: 500 orgs -> 73/s peak, 1,000 -> 146/s (Lago: 50/s
    for GET /subscriptions); at 10,000 orgs ~1,500/s."""
    random.seed(2)
    lago = StubLago(clock)
    gate = stub_gate(lago, clock)
    orgs = [f"o{i}" for i in range(500)]
    start = clock.time()
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await traffic(gate, orgs, clock, 335)
        tasks.cancel_scope.cancel()
    rereads = lago.per_second("sub", since=start + 1)
    assert sum(rereads.values()) == len(orgs)
    peak = max(rereads.values())
    assert peak <= OTHER_PER_SECOND, f"{peak} subscription reads in one second (Lago allows {OTHER_PER_SECOND}/s)"


async def test_invalidate_all_rereads_orgs_at_a_steady_pace(clock: Clock) -> None:
    """``invalidate_all`` (every ``plan.updated``/``feature.updated`` webhook, e.g. a plan's name edited in Lago's UI)
    makes all cached orgs due, subscription part included: with 2,000 busy orgs, the next second of traffic sends
    2,000 subscription + 2,000 usage reads (Lago: 50/s and 200/s)."""
    lago = StubLago(clock)
    gate = stub_gate(lago, clock)
    orgs = [f"o{i}" for i in range(N)]
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await traffic(gate, orgs, clock, 1)
        await gate.invalidate_all()
        since = clock.time()
        await traffic(gate, orgs, clock, 1)
        tasks.cancel_scope.cancel()
    peak = max(lago.per_second("sub", since=since).values())
    assert peak <= OTHER_PER_SECOND, f"{peak} subscription reads in one second after invalidate_all"


# ------------------------------------------------------------------------------------------- 3. Redis


@pytest.fixture
async def emulator(clock: Clock) -> AsyncIterator[tuple[FakeLago, LagoClient]]:
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=300)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield fake, client


@needs_redis
async def test_a_failed_refresh_hands_the_fleet_lock_back_after_the_backoff(
    emulator: tuple[FakeLago, LagoClient], clock: Clock, redis_url: str
) -> None:
    """With Redis, a refresh takes the fleet's lock for the TTL (30 s) and keeps it when Lago fails (a 429 of a
    burst, a 503): nobody in the fleet asks Lago about the org again for 30 s, not failure_backoff (5 s). With
    LAGO_FAIL_OPEN=false the cold org is answered 503 ``Retry-After: 5`` for 30 s: a client that obeys gets 503
    again (fail-open: 30 s of uncounted requests)."""
    fake, client = emulator
    settings = client.settings.replace(redis_url=redis_url, fail_open=False)
    config = QuotaConfig(redis_prefix=f"scale:{uuid.uuid4().hex[:8]}:", cold_timeout=0.2)
    gate = QuotaGate(settings, client, config=config, clock=clock.time)
    try:
        fake.inject_fault(status=429, count=1, path="/api/v1/subscriptions")
        first = await gate.check("org_1")
        assert (first.allowed, first.status, dict(first.headers)[b"retry-after"]) == (False, 503, b"5")
        clock.advance(6)  # the client retries after Retry-After (and after failure_backoff); Lago answers again
        second = await gate.check("org_1")
        reads = sum(1 for r in fake.requests if r.path.startswith("/api/v1/subscriptions"))
        assert reads == 2, f"Lago asked {reads} time(s): the failed refresh's lock still blocks the fleet"
        assert second.allowed
    finally:
        await gate.aclose()


@needs_redis
async def test_count_keys_always_expire(emulator: tuple[FakeLago, LagoClient], clock: Clock, redis_url: str) -> None:
    """The CHECK script creates ``{org}:count`` (HSET p) before knowing whether it reserves; the TTL is set only
    when it does. A peek (enforce_usage_limits) or a blocked check on an org without a counter leaves the key
    with no TTL: it stays forever for an org that never reserves again (limit 0, over quota, churned)."""
    fake, client = emulator
    prefix = f"scale:{uuid.uuid4().hex[:8]}:"
    fake.add_plan("free", amount_cents=0, entitlements={"api_quota": {"max_api_calls": 0}})
    fake.add_customer("org_free")
    fake.add_subscription("org_free", "free")
    gate = QuotaGate(
        client.settings.replace(redis_url=redis_url), client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time
    )
    try:
        await gate.enforce_usage_limits("org_1")  # peek
        assert not (await gate.check("org_free")).allowed  # blocked (limit 0)
        backend = gate.backend
        assert isinstance(backend, RedisBackend)
        ttls = {org: await backend.redis.pttl(backend.key(org, "count")) for org in ("org_1", "org_free")}
    finally:
        await gate.aclose()
    assert all(ttl != -1 for ttl in ttls.values()), f"count keys without TTL (-1): {ttls}"


# ------------------------------------------------------------------------------------------ 4. memory


async def test_local_records_stay_bounded_while_lago_is_down(clock: Clock) -> None:
    """Per-second buckets (calls, tokens) are pruned only when a snapshot is stored. While Lago is down (refreshes
    fail, the stale snapshot serves) a busy org gains 2 dict entries per second: 7,200 per org-hour; 1,000 busy orgs
    x 1 h = 7.2 M entries. Buckets older than ``now - settle_lag`` could be merged (the next snapshot drops them
    all anyway)."""
    lago = StubLago(clock)
    gate = stub_gate(lago, clock)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        await gate.check("busy")
        await settle_refreshes(gate)
        lago.fail = True
        for _ in range(600):  # 10 minutes of outage, one request per second
            clock.advance(1)
            decision = await gate.check("busy")
            gate.settle("busy", decision, tokens=10, billed=True)
            await settle_refreshes(gate)
        tasks.cancel_scope.cancel()
    counts = gate.local._orgs["busy"].counts
    buckets = len(counts.c) + len(counts.t) + len(counts.i)
    assert buckets <= 2 * (gate.config.settle_lag + gate.ttl + 1), f"{buckets} buckets for one org after 10 min"


@needs_redis
async def test_redis_count_hash_stays_bounded_while_lago_is_down(clock: Clock, redis_url: str) -> None:
    """Same in Redis: ``{org}:count`` gains ``c:<s>`` and ``t:<s>`` per second until a snapshot is stored (STORE
    prunes): 7,200 fields per busy org-hour of Lago outage, and the next STORE walks them all in one Lua call."""
    lago = StubLago(clock)
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k", redis_url=redis_url)
    config = QuotaConfig(redis_prefix=f"scale:{uuid.uuid4().hex[:8]}:")
    gate = QuotaGate(settings, lago, config=config, clock=clock.time)  # type: ignore[arg-type]
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            await gate.check("busy")
            await settle_refreshes(gate)
            lago.fail = True
            for _ in range(300):
                clock.advance(1)
                decision = await gate.check("busy")
                gate.settle("busy", decision, tokens=10, billed=True)
                await settle_refreshes(gate)
            await backend.flush()
            fields = await backend.redis.hlen(backend.key("busy", "count"))
            tasks.cancel_scope.cancel()
    finally:
        await gate.aclose()
    assert fields <= 2 * (config.settle_lag + gate.ttl + 1) + 3, f"{fields} fields in one org's count hash after 5 min"


async def test_eviction_keeps_orgs_with_calls_in_flight(clock: Clock) -> None:
    """LocalBackend over ``max_orgs`` with no idle org evicts the least recently used orgs without calls in flight:
    it evicted the first inserted tenth, records included, so an org whose calls were in flight (LLM streams) lost
    them, was read again from Lago (which had not seen them) and got its limit again (limit 5: 10 allowed)."""
    lago = StubLago(clock, limit=5)
    gate = stub_gate(lago, clock, max_orgs=10)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        allowed = 0
        for _ in range(5):  # the limit, all in flight (not settled yet)
            allowed += (await gate.check("big")).allowed
        for i in range(10):  # ten more orgs, each with a call recorded (settled): none is idle
            decision = await gate.check(f"o{i}")
            gate.settle(f"o{i}", decision, tokens=0, billed=True)
        await settle_refreshes(gate)
        for _ in range(3):
            allowed += (await gate.check("big")).allowed
            await settle_refreshes(gate)
        tasks.cancel_scope.cancel()
    assert "big" in gate.local._orgs
    assert allowed == 5, f"{allowed} calls allowed on a limit of 5"
