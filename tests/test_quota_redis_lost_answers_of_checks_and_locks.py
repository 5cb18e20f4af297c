"""The Redis quota backend (a real ``redis-server`` on 127.0.0.1) when a connection to Redis drops after Redis ran a
script, before its answer reached the worker (a reservation, a refresh lock): what the fleet counts and decides once
Redis answers again.

A small TCP proxy between the gate and Redis passes everything on, but for the answer it is told to lose: it closes
the client's connection instead of passing that answer on (a network blip, a load balancer or proxy resetting the
connection, a failover cutting it: the command ran, the worker never learnt it). A settable wall clock for the gates
and the emulator, a settable monotonic clock for the backend's retries; no sleeps as synchronisation.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from _quota_app import REDIS_SERVER, Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate, _Decision
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


class Monotonic:
    """The backend's monotonic clock: Redis is tried again once ``redis_retry_interval`` has passed on it."""

    def __init__(self) -> None:
        self.at = 1000.0

    def __call__(self) -> float:
        return self.at


class AnswerLosingProxy:
    """A TCP proxy in front of Redis. ``lose_next_answer()``: the next answer Redis sends (on any connection) is not
    passed on; ``lose_answer_to(marker)``: nor the answer to the next command holding ``marker`` (a script's SHA1). The
    client's connection is closed instead: the command ran in Redis, its answer never came."""

    def __init__(self, upstream: str) -> None:
        host_port = upstream.removeprefix("redis://").split("/", 1)[0]
        self.host, port = host_port.rsplit(":", 1)
        self.upstream_port = int(port)
        self.lose = False
        self.marker: bytes | None = None
        self.lost = anyio.Event()

    def lose_next_answer(self) -> None:
        self.lose = True
        self.lost = anyio.Event()

    def lose_answer_to(self, marker: bytes) -> None:
        self.marker = marker
        self.lost = anyio.Event()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started(f"redis://127.0.0.1:{port}/0")
            await listener.serve(self._connection)

    async def _connection(self, client: anyio.abc.SocketStream) -> None:
        losing = False  # (this connection's next answer is lost)
        async with client, await anyio.connect_tcp(self.host, self.upstream_port) as server:
            async with anyio.create_task_group() as pipes:

                async def up() -> None:
                    nonlocal losing
                    try:
                        async for chunk in client:
                            if self.marker is not None and self.marker in chunk:
                                self.marker = None
                                losing = True
                            await server.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    pipes.cancel_scope.cancel()

                async def down() -> None:
                    nonlocal losing
                    try:
                        async for chunk in server:
                            if self.lose or losing:
                                self.lose = losing = False
                                self.lost.set()
                                break
                            await client.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    pipes.cancel_scope.cancel()

                pipes.start_soon(up)
                pipes.start_soon(down)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on starter: 3 calls per period."""
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


@pytest.fixture
def prefix() -> str:
    return f"lost:{uuid.uuid4().hex[:8]}:"


def make_gate(client: LagoClient, clock: Clock, url: str, prefix: str, monotonic: Monotonic) -> QuotaGate:
    settings = client.settings.replace(redis_url=url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    backend._clock = monotonic
    return gate


def backend_of(gate: QuotaGate) -> RedisBackend:
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    return backend


async def served(gate: QuotaGate, org_id: str = "org_1") -> _Decision:
    decision = await gate.check(org_id)
    assert decision.allowed and isinstance(decision, _Decision)
    gate.settle(org_id, decision, tokens=0, billed=True)
    return decision


async def test_a_check_whose_answer_was_lost_is_not_counted_twice_after_redis_answers_again(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """Limit 3, one worker. Call 1 is reserved and recorded in Redis. Call 2's CHECK runs in Redis (it reserves the
    call: an in-flight record), but its answer is lost (the connection drops): the worker falls back to counting
    itself, serves call 2 there and records it. Redis answers again and the outage's record (call 2) is merged into
    Redis. Redis held call 2 twice (its reservation, never released, and its merged record) for
    ``inflight_horizon`` (an hour): call 3, the plan's last, was refused with 2 of 3 calls used. The reservation's
    mark tells it was made: it is released before the merge."""
    monotonic = Monotonic()
    proxy = AnswerLosingProxy(redis_url)
    async with anyio.create_task_group() as tasks:
        url = await tasks.start(proxy.serve)
        gate = make_gate(client, clock, url, prefix, monotonic)
        backend = backend_of(gate)
        await served(gate)  # call 1: in Redis
        await backend.flush()
        proxy.lose_next_answer()
        await served(gate)  # call 2: its CHECK ran in Redis; its answer lost; served on the fallback
        assert proxy.lost.is_set() and backend.stats["redis_fallback"] == 1
        monotonic.at += QuotaConfig().redis_retry_interval  # Redis is tried again (it answers)
        status = await gate.enforce_usage_limits("org_1")  # (merges call 2's record into Redis)
        # (the reservations' marks: call 1's deleted by its settle, call 2's by its release; none left behind)
        fields = await backend.redis.hkeys(backend.key("org_1", "count"))
        assert not [field for field in fields if field.startswith(b"r:")], fields
        third = await gate.check("org_1")
        await gate.aclose()
        tasks.cancel_scope.cancel()
    assert backend.stats["redis_fallback"] == 0
    assert status["usage"]["max_api_calls"] == 2  # calls 1 and 2, call 2 once
    assert (third.allowed, third.status) == (True, None)  # (not refused: no 429)


async def test_a_refresh_lock_whose_answer_was_lost_does_not_keep_the_fleet_from_reading_the_org(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """LAGO_FAIL_OPEN=false. Worker A's first request of org_1 (cold) takes the fleet's refresh lock: the LOCK script
    runs in Redis, its answer is lost (the connection drops). A falls back, reads Lago and stores the snapshot in its
    own process only. A forgot the lock: it stayed held in Redis for a whole TTL (30 s) by nobody, and worker B, on a
    healthy connection, found org_1 cold, waited for A's refresh that would never store anything in Redis, and
    answered 503 (or, with LAGO_FAIL_OPEN=true, let it through unlimited) until the lock expired, with Lago and Redis
    both answering. A hands it back as soon as Redis answers it again (its next round after
    ``redis_retry_interval``), not on that request's time."""
    monotonic = Monotonic()
    proxy = AnswerLosingProxy(redis_url)
    async with anyio.create_task_group() as tasks:
        url = await tasks.start(proxy.serve)
        closed = client.settings.replace(fail_open=False)
        a = QuotaGate(closed.replace(redis_url=url), client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time)
        b = QuotaGate(
            closed.replace(redis_url=redis_url),
            client,
            config=QuotaConfig(redis_prefix=prefix, cold_timeout=0.3),
            clock=clock.time,
        )
        backend_of(a)._clock = monotonic
        lock = backend_of(a)._lock
        await backend_of(b).redis.script_load(lock.body)  # (EVALSHA finds it: the LOCK runs in one command)
        proxy.lose_answer_to(lock.sha.encode())
        first = await a.check("org_1")
        assert proxy.lost.is_set() and backend_of(a).stats["redis_fallback"] == 1
        held = await backend_of(b).redis.pttl(backend_of(b).key("org_1", "lock"))
        assert held > 25_000  # (the lock A took, its answer lost)
        monotonic.at += QuotaConfig().redis_retry_interval
        await backend_of(a).flush()  # (A's background round: Redis answers again)
        assert backend_of(a).stats["redis_fallback"] == 0
        second = await b.check("org_1")
        await a.aclose()
        await b.aclose()
        tasks.cancel_scope.cancel()
    assert first.allowed
    assert (second.allowed, second.status) == (True, None)  # (not refused: no 503)
