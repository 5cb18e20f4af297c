"""Review of the Redis quota backend across workers (a real ``redis-server`` on 127.0.0.1): Redis restarted or its
keys evicted mid-period (counts lost, scripts flushed), the settles that arrive meanwhile, and Redis deployments
behind a password, an ACL user, a db index in the URL.

A settable clock for the gates and the emulator, counts only, no sleeps as synchronisation.
"""

# ruff: noqa: F811 (test_quota_redis's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from _quota_app import REDIS_SERVER, TOKENS, Clock, free_port, redis_server
from lago_org_billing import LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago
from test_quota_redis import _OPEN, _close_gates, client, clock, fake, prefix  # noqa: F401 (its fixtures)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


def make_gate(client: LagoClient, clock: Clock, url: str, prefix: str, **config: Any) -> QuotaGate:
    settings = client.settings.replace(redis_url=url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix, **config), clock=clock.time)
    _OPEN.append(gate)
    return gate


def backend_of(gate: QuotaGate) -> RedisBackend:
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    return backend


async def usage(gate: QuotaGate, org: str) -> dict[str, Any]:
    return dict((await gate.enforce_usage_limits(org))["usage"])


async def settled(*gates: QuotaGate) -> None:
    for gate in gates:
        while gate._refreshing:
            for event in list(gate._refreshing.values()):
                await event.wait()


# ------------------------------------------------------------------- 1. Redis lost the org's counter mid-period


@pytest.mark.parametrize("lost", ["restart", "eviction"])
async def test_calls_settled_after_redis_lost_the_counter_stay_counted(
    client: LagoClient, fake: FakeLago, clock: Clock, redis_url: str, prefix: str, lost: str
) -> None:
    """org_1 may make 2 calls. Redis restarted without its data (or evicted the org's counter at maxmemory: every key
    has a TTL, which a ``volatile-*`` policy takes) while both were in flight. They end billed moments later, before
    the org's next check: their settles found no counter of their period and were dropped, not written. The snapshot
    read from Lago right after cannot have their events yet (``settle_lag``): a third call was allowed over the limit
    (the in-process backend keeps such records). Kept, the counter (blocked: no reservation renews its expiry) lives
    as long as the period."""
    fake.store.plans["starter"]["entitlements"]["api_quota"]["max_api_calls"] = 2
    gate = make_gate(client, clock, redis_url, prefix)
    backend = backend_of(gate)
    decisions = [await gate.check("org_1") for _ in range(2)]
    assert all(decision.allowed for decision in decisions)
    await settled(gate)
    if lost == "restart":
        await backend.redis.script_flush()
        await backend.redis.delete(*[backend.key("org_1", kind) for kind in ("snap", "count", "lock")])
    else:
        await backend.redis.delete(backend.key("org_1", "count"))
    for decision in decisions:
        gate.settle("org_1", decision, tokens=TOKENS, billed=True)
    await backend.flush()
    assert backend.stats["redis_errors"] == 0
    clock.advance(1)
    await gate.check("org_1")  # (restart: cold, refreshed from Lago)
    await settled(gate)
    assert not (await gate.check("org_1")).allowed
    assert await usage(gate, "org_1") == {"max_api_calls": 2, "max_tokens": 2 * TOKENS}
    period_left_ms = ((await gate.snapshot("org_1")).period_end - clock.time()) * 1000
    assert await backend.redis.pttl(backend.key("org_1", "count")) >= period_left_ms


async def test_a_late_settle_of_a_period_that_is_over_makes_no_counter(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """The other side of the above: a settle of the period that ended, arriving after its counter went (the first
    check past the end took it), is not counted again in a counter of its own, which calls counted past the
    boundary would join and the next period's snapshot would drop with them."""
    gate = make_gate(client, clock, redis_url, prefix)
    backend = backend_of(gate)
    decision = await gate.check("org_1")
    await settled(gate)
    snapshot = await gate.snapshot("org_1")
    await backend.redis.delete(backend.key("org_1", "count"))
    clock.advance(snapshot.period_end - clock.time() + 1)
    gate.settle("org_1", decision, tokens=TOKENS, billed=True)
    await backend.flush()
    assert await backend.redis.exists(backend.key("org_1", "count")) == 0


# ------------------------------------------------------------------- 2. connections Redis closed


async def test_connections_redis_closed_are_opened_again_instead_of_falling_back(
    client: LagoClient, clock: Clock, tmp_path: Path, prefix: str
) -> None:
    """Redis restarted (a crash, a failover, an upgrade; the same for idle clients dropped by its ``timeout`` or a
    proxy) and answers again before the next requests. Under redis-py 8 (RESP3, maintenance notifications on) the
    pool handed out its connections the server had closed without noticing it: each failed its next command
    ("Connection closed by server"), every request on one was decided by this process alone (limits per worker, not
    per fleet) and the whole worker fell back to local counting for ``redis_retry_interval``."""
    port = free_port()
    stack = contextlib.ExitStack()
    url = stack.enter_context(redis_server(tmp_path, port))
    gate = make_gate(client, clock, url, prefix)
    backend = backend_of(gate)
    try:
        async with anyio.create_task_group() as burst:  # (several connections in the pool)
            for _ in range(8):
                burst.start_soon(gate.check, "org_1")
        await settled(gate)

        def restart() -> None:  # (in a thread: the event loop sees the connections close meanwhile, as in production)
            stack.close()
            stack.enter_context(redis_server(tmp_path, port))

        await anyio.to_thread.run_sync(restart)
        async with anyio.create_task_group() as burst:
            for _ in range(8):
                burst.start_soon(gate.check, "org_1")
        await settled(gate)
        assert backend.stats == {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0}
        assert (await usage(gate, "org_1"))["max_api_calls"] == 8  # (Redis lost the first 8: restarted empty)
        await gate.aclose()
    finally:
        stack.close()
