"""The quota gate across Redis outages (a real ``redis-server`` on 127.0.0.1, stopped and started again
on the same port with its data saved, as after a crash or a failover): the decisions made when Redis answers again,
workers that see no traffic after an outage, and the settles of a second outage close to the first.

A settable wall clock for the gates and the emulator, a settable monotonic clock for the backend's retries (when Redis
is tried again), no sleeps as synchronisation.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from _quota_app import REDIS_SERVER, Clock, free_port, redis_server, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._middleware import _tokens_only
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


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on starter: 3 calls, 10 tokens per period; org_2 on pro."""
    lago = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3, starter_tokens=10)
    lago.add_customer("org_2")
    lago.add_subscription("org_2", "pro")
    return lago


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def redis_dir(tmp_path: Path) -> Path:
    return tmp_path


class Fleet:
    """Gates (workers) on one Redis that goes down and comes back with its data."""

    def __init__(self, client: LagoClient, clock: Clock, directory: Path, port: int) -> None:
        self.client, self.clock, self.directory, self.port = client, clock, directory, port
        self.prefix = f"outages:{uuid.uuid4().hex[:8]}:"
        self.url = f"redis://127.0.0.1:{port}/0"
        self.gates: list[QuotaGate] = []
        self.monotonic = Monotonic()

    def gate(self) -> QuotaGate:
        settings = self.client.settings.replace(redis_url=self.url)
        gate = QuotaGate(settings, self.client, config=QuotaConfig(redis_prefix=self.prefix), clock=self.clock.time)
        backend = gate.backend
        assert isinstance(backend, RedisBackend)
        backend._clock = self.monotonic
        self.gates.append(gate)
        return gate

    def up(self) -> Any:
        """Redis running (with what it held when it was last stopped by :meth:`save_and_stop`)."""
        return redis_server(self.directory, self.port)

    async def save(self) -> None:
        backend = self.gates[0].backend
        assert isinstance(backend, RedisBackend)
        await backend.redis.save()

    def retry_due(self) -> None:
        """``redis_retry_interval`` passes: the gates try Redis again."""
        self.monotonic.at += QuotaConfig().redis_retry_interval


@pytest.fixture
def fleet(client: LagoClient, clock: Clock, redis_dir: Path, port: int) -> Iterator[Fleet]:
    yield Fleet(client, clock, redis_dir, port)


def backend_of(gate: QuotaGate) -> RedisBackend:
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    return backend


async def served(gate: QuotaGate, org_id: str = "org_1") -> _Decision:
    decision = await gate.check(org_id)
    assert decision.allowed and isinstance(decision, _Decision)
    gate.settle(org_id, decision, tokens=0, billed=True)
    return decision


async def close(fleet: Fleet) -> None:
    for gate in fleet.gates:
        await gate.aclose()


async def test_the_first_check_after_redis_answers_again_counts_the_outages_calls(fleet: Fleet) -> None:
    """Limit 3. One call counted in Redis; Redis goes down; two more are served on the local fallback, the next one
    is refused (exact, in one worker). Redis answers again: the next check reserved in Redis first, on Redis's count
    (1, without the outage's 2), and only then handed the outage's records to Redis: a 4th call of a 3-call plan."""
    with fleet.up():
        gate = fleet.gate()
        await served(gate)
        await backend_of(gate).flush()
        await fleet.save()
    for _ in range(2):
        await served(gate)  # Redis down: decided here
    assert backend_of(gate).stats["redis_fallback"] == 1
    assert not (await gate.check("org_1")).allowed
    with fleet.up():
        fleet.retry_due()
        after = await gate.check("org_1")
        status = await gate.enforce_usage_limits("org_1")
        await close(fleet)
    assert (after.allowed, after.status) == (False, 429)
    assert status["usage"]["max_api_calls"] == 3


async def test_concurrent_checks_when_redis_answers_again_keep_the_limit(fleet: Fleet) -> None:
    """The same, with the org's clients retrying at once when Redis comes back: every check made while the outage's
    records were being handed to Redis decided on Redis's count without them."""
    with fleet.up():
        gate = fleet.gate()
        await served(gate)
        await backend_of(gate).flush()
        await fleet.save()
    for _ in range(2):
        await served(gate)
    decisions: list[Any] = []
    with fleet.up():
        fleet.retry_due()

        async def one() -> None:
            decisions.append(await gate.check("org_1"))

        async with anyio.create_task_group() as tasks:
            for _ in range(5):
                tasks.start_soon(one)
        status = await gate.enforce_usage_limits("org_1")
        await close(fleet)
    assert [d.allowed for d in decisions] == [False] * 5
    assert status["usage"]["max_api_calls"] == 3


async def test_a_worker_without_traffic_hands_its_outage_records_to_redis_once_it_answers(fleet: Fleet) -> None:
    """Two workers, limit 3, 1 call counted in Redis. Redis goes down; worker A serves a call on its fallback (no
    settle is queued for Redis: it was decided and settled here), then gets no more requests. Redis answers again:
    A's background writer never handed its record to Redis (it did so only after writing queued settles), so worker
    B, asking Redis, allowed a 4th call of the 3-call plan, and A's fallback gauge stayed at 1."""
    with fleet.up():
        a, b = fleet.gate(), fleet.gate()
        await served(a)
        await backend_of(a).flush()
        b.settle("org_1", await b.check("org_1"), tokens=0, billed=False)  # (B knows the org)
        await fleet.save()
    await a.check("org_2")  # Redis down
    await served(a)
    backend = backend_of(a)
    assert backend.stats["redis_fallback"] == 1 and not backend._queue
    with fleet.up():
        fleet.retry_due()
        merged = anyio.Event()
        recovered = backend._recovered

        async def watched(*args: Any, **kwargs: Any) -> None:
            await recovered(*args, **kwargs)
            if not backend.stats["redis_fallback"]:
                merged.set()

        backend._recovered = watched  # type: ignore[method-assign]
        async with anyio.create_task_group() as tasks:
            await tasks.start(a.run)
            with anyio.fail_after(10):  # (a guard: the writer tries Redis again after redis_retry_interval)
                await merged.wait()
            tasks.cancel_scope.cancel()
        decisions = [await b.check("org_1") for _ in range(2)]
        await close(fleet)
    assert backend.stats["redis_fallback"] == 0
    assert [d.allowed for d in decisions] == [True, False]  # 1 in Redis + A's call of the outage + this one: 3


async def test_tokens_settled_in_a_second_outage_are_kept(fleet: Fleet) -> None:
    """Redis flaps (a failover). A long request of org_1 is decided during the first outage; Redis comes back (the
    fallback's records go to Redis) and goes down again before the request ends. Its tokens (10, the plan's token
    limit) were settled on the fallback, which held nothing of org_1 any more (no period): dropped, so org_1 went on
    being served over its token limit, and Redis never learnt them either."""
    with fleet.up():
        gate = fleet.gate()
        await served(gate)
        await served(gate, "org_2")
        await backend_of(gate).flush()
        await fleet.save()
    during = await gate.check("org_1")  # first outage: decided on the fallback
    assert during.allowed and isinstance(during, _Decision)
    with fleet.up():
        fleet.retry_due()
        await served(gate, "org_2")  # Redis answers again: the fallback's records are handed to it
        await backend_of(gate).flush()
        assert backend_of(gate).stats["redis_fallback"] == 0
        await fleet.save()
    await served(gate, "org_2")  # second outage
    assert backend_of(gate).stats["redis_fallback"] == 1
    gate.settle("org_1", during, tokens=0, billed=True)  # the request ends: its call, then its tokens
    gate.settle("org_1", _tokens_only(during.period), tokens=10, billed=False)
    blocked = await gate.check("org_1")
    with fleet.up():
        fleet.retry_due()
        await served(gate, "org_2")
        await backend_of(gate).flush()
        status = await gate.enforce_usage_limits("org_1")
        await close(fleet)
    assert (blocked.allowed, blocked.status) == (False, 429)
    assert status["usage"]["max_tokens"] == 10
