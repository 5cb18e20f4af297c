"""Edges of the quota rollover (provisional next-period snapshots), the cold-refresh cap and the Redis scripts.

Counts only (decisions, Lago reads), a settable clock, a real redis-server behind a TCP proxy that can be cut (a
network partition: Redis keeps its data), no sleeps as synchronisation.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from _quota_app import Clock, needs_redis
from lago_org_billing import BillingSettings
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from test_quota_rollover import PeriodLago

pytestmark = pytest.mark.anyio


UTC = dt.timezone.utc
APRIL = dt.datetime(2026, 4, 1, tzinfo=UTC)
_OPEN: list[QuotaGate] = []


@pytest.fixture(autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock(APRIL - dt.timedelta(days=2))


def make_gate(
    lago: PeriodLago, clock: Clock, redis: str | None = None, *, fail_open: bool = True, **config: Any
) -> QuotaGate:
    settings = BillingSettings(
        api_url="http://lago.invalid", api_key="k", max_retries=0, redis_url=redis, fail_open=fail_open
    )
    if redis:
        config.setdefault("redis_prefix", f"rereview:{uuid.uuid4().hex[:8]}:")
    gate = QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]
    _OPEN.append(gate)
    return gate


def remaining(decision: QuotaDecision) -> str:
    return dict(decision.headers)[b"ratelimit-remaining"].decode()


async def settled(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


async def _close(stream: anyio.abc.AsyncResource) -> None:
    with anyio.CancelScope(shield=True):
        await stream.aclose()


class Proxy:
    """A TCP proxy to redis-server: ``cut()`` drops every connection and refuses new ones (a partition: Redis keeps
    its data), ``heal()`` lets them through again."""

    def __init__(self, target: str) -> None:
        self.target_port = int(target.rsplit(":", 1)[1].split("/", 1)[0])
        self.down = False
        self.port = 0
        self._streams: set[anyio.abc.ByteStream] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        if self.down:
            await _close(client)
            return
        try:
            upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
        except BaseException:
            await _close(client)
            raise
        self._streams.update((client, upstream))
        try:
            async with anyio.create_task_group() as pipes:
                pipes.start_soon(self._pipe, client, upstream, pipes.cancel_scope)
                pipes.start_soon(self._pipe, upstream, client, pipes.cancel_scope)
        finally:
            self._streams.difference_update((client, upstream))
            await _close(client)
            await _close(upstream)

    async def _pipe(self, source: Any, sink: Any, scope: anyio.CancelScope) -> None:
        try:
            async for chunk in source:
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    async def cut(self) -> None:
        self.down = True
        for stream in list(self._streams):
            await _close(stream)

    def heal(self) -> None:
        self.down = False


# ------------------------------------------------------------------ 1. Redis outage across the period boundary


@needs_redis
async def test_calls_counted_during_a_redis_outage_across_the_boundary_are_merged_into_the_new_period(
    clock: Clock, redis_url: str
) -> None:
    """Redis unreachable across 00:00 on 1 April: org_b's 5 April calls are counted locally on its provisional April
    snapshot. Redis answers again (the first check after it is another org's): the records are merged into Redis.
    They were dropped (the MERGE script refused a counter still of March's period, which Redis had not rolled over
    yet), so org_b was allowed 5 calls more than its April limit."""
    lago = PeriodLago(clock, limit=10)
    proxy = Proxy(redis_url)
    async with anyio.create_task_group() as tasks:
        await tasks.start(proxy.serve)
        gate = make_gate(lago, clock, proxy.url, redis_retry_interval=0.0, cold_timeout=0.5)
        try:
            await tasks.start(gate.run)
            for org in ("org_a", "org_b"):  # March: both known to the fleet
                assert remaining(await gate.check(org)) == "9"
            await settled(gate)
            backend = gate.backend
            assert isinstance(backend, RedisBackend)
            clock.at = APRIL + dt.timedelta(seconds=5)
            lago.hold = anyio.Event()  # the provisional snapshots' refreshes stay in flight: nothing is stored
            await proxy.cut()
            for expected in ("9", "8", "7", "6", "5"):
                decision = await gate.check("org_b")
                assert remaining(decision) == expected
                gate.settle("org_b", decision, tokens=0, billed=True)
            assert backend.stats["redis_fallback"] == 1
            proxy.heal()
            assert remaining(await gate.check("org_a")) == "9"  # Redis answers: what was counted meanwhile is merged
            assert backend.stats["redis_fallback"] == 0
            decision = await gate.check("org_b")
            assert remaining(decision) == "4", "the 5 calls org_b made during the outage were lost"
            lago.hold.set()
            await settled(gate)
        finally:
            await gate.aclose()
        tasks.cancel_scope.cancel()
    for _ in range(3):  # (the proxy's closed transports let go of their sockets)
        await anyio.lowlevel.checkpoint()


# ------------------------------------------------------- 2. a provisional period is for the boundary, not weeks on


async def test_an_org_idle_here_for_weeks_is_not_decided_on_a_provisional_zero(clock: Clock, redis: str | None) -> None:
    """org_1 was last seen here in March. On 20 April (its April calls served by other workers, or other services:
    Lago counted 10 of its 10) Lago is down and LAGO_FAIL_OPEN=false. The snapshot of March was rolled over into a
    provisional April one (usage base 0, as Lago has it at a period start) and the call allowed (RateLimit-Remaining
    9): fail-closed let an org past its limit for as long as Lago is down. A rollover is for the boundary (Redis
    expires a snapshot an hour after its period): weeks on, the org is cold, and fail-closed answers 503."""
    lago = PeriodLago(clock, limit=10)
    gate = make_gate(lago, clock, redis, fail_open=False, cold_timeout=0.5)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert remaining(await gate.check("org_1")) == "9"
        await settled(gate)
        clock.at = APRIL + dt.timedelta(days=19)
        lago.usage[("org_1", "april")] = 10
        lago.down = True
        decision = await gate.check("org_1")
        assert (decision.allowed, decision.status) == (False, 503), decision.headers
        await settled(gate)
        lago.down = False  # Lago answers: the org is at its April limit
        clock.advance(gate.config.failure_backoff + 1)
        decision = await gate.check("org_1")
        assert (decision.allowed, decision.status) == (False, 429)
        assert decision.problem is not None and decision.problem["usage"] == 10
        tasks.cancel_scope.cancel()


async def test_just_after_the_boundary_the_rollover_still_decides_at_once(clock: Clock, redis: str | None) -> None:
    """The bound above keeps the rollover itself: 30 minutes past the boundary, Lago down, fail-closed, the org is
    decided at once on its provisional April snapshot (no cold wait)."""
    lago = PeriodLago(clock, limit=10)
    gate = make_gate(lago, clock, redis, fail_open=False, cold_timeout=0.5)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        assert remaining(await gate.check("org_1")) == "9"
        await settled(gate)
        clock.at = APRIL + dt.timedelta(minutes=30)
        lago.down = True
        waits = gate.stats["cold_waits"]
        assert remaining(await gate.check("org_1")) == "9"
        assert gate.stats["cold_waits"] == waits
        assert (await gate.get_org_plan_limits("org_1"))["max_api_calls"] == 10
        await settled(gate)
        tasks.cancel_scope.cancel()
