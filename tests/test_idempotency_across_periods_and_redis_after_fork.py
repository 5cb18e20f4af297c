"""Idempotency keys (``idempotency_header``) across a billing-period boundary, and the Redis connections of a forked
process.

A settable clock drives the emulator, the gate and the middleware's wall clock; no sleeps as synchronisation.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import time
import types
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
MARCH_END = dt.datetime(2026, 4, 1, tzinfo=UTC)  # org_1 (UTC customer, calendar billing) starts April here


def _event_time(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def test_a_retry_of_a_request_dated_into_the_next_period_carries_its_first_events_timestamp(
    monkeypatch: pytest.MonkeyPatch, redis: str | None
) -> None:
    """A request with ``Idempotency-Key: K`` starts at 23:59:59.5 on March 31 and is checked by the gate at 00:00:00.5
    on April 1 (a slow resolver). The client retries it (same key) a few seconds later. The retry's event must be the
    same event (same transaction id and timestamp), so that Lago's ClickHouse store, which deduplicates on both, keeps
    one: had the first been dated at April's first second (as a request without a key checked across the boundary
    is) and the retry at the first request's start, Lago would bill two. The same with the first timestamps shared in
    Redis (``LAGO_REDIS_URL``)."""
    clock = Clock(MARCH_END - dt.timedelta(minutes=1))
    monkeypatch.setattr(
        "lago_org_billing._middleware.time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic)
    )
    fake = seed(FakeLago(api_key="k", clock=clock.now, event_store="clickhouse"), starter_calls=100)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, redis_url=redis)

    async def resolve_org(scope: Any) -> str:
        if dict(scope["headers"]).get(b"x-slow") == b"1":
            clock.at = MARCH_END + dt.timedelta(seconds=0.5)  # the lookup returns after the boundary
        return "org_1"

    async def ok(request: Request) -> Response:
        return JSONResponse({})

    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", ok)]),
            settings,
            quota=gate,
            client=lago,
            resolve_org=resolve_org,
            idempotency_header="Idempotency-Key",
        )
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
                assert (await http.get("/v1/chat")).status_code == 200  # (the org warmed up in March)
                clock.at = MARCH_END - dt.timedelta(seconds=0.5)
                first = await http.get("/v1/chat", headers={"x-slow": "1", "Idempotency-Key": "K"})
                assert first.status_code == 200
                assert await middleware.pipeline.flush(5)
                clock.at = MARCH_END + dt.timedelta(seconds=5)
                retry = await http.get("/v1/chat", headers={"Idempotency-Key": "K"})
                assert retry.status_code == 200
                assert await middleware.pipeline.flush(5)
        finally:
            await middleware.aclose()
    assert middleware.stats.get("idempotent_retries") == 1
    idempotent = [event for event in fake.events if event["transaction_id"].startswith("idem_")]
    assert len({event["transaction_id"] for event in idempotent}) == 1
    assert len(idempotent) == 1, (
        "the request and its retry are stored as two events (ClickHouse deduplicates on transaction id and "
        f"timestamp): dated {[event['timestamp'] for event in idempotent]}"
    )
    # (an idempotent request keeps its first timestamp, the request's start: its retries, here and on other workers
    # through Redis, are sent with it)
    assert _event_time(idempotent[0]) == (MARCH_END - dt.timedelta(seconds=0.5)).timestamp()


# ------------------------------------------------------------------------------------------------ forks and Redis

#: A worker (argv[1]: the Redis URL) uses the middleware's Redis stores on its event loop: the idempotency keys'
#: (``SharedFirstSeen``), the quota gate's backend (``RedisBackend``) and the webhooks' dedupe (``RedisDedupe``), each
#: keeping a connection in its pool. From a request, it forks a helper (``multiprocessing``'s ``fork``, ``os.fork()``),
#: which runs a loop of its own and uses them: an org's plan changed there (``OrgBilling(middleware=...)`` invalidates
#: the middleware's gate), a key's first timestamp, a webhook's claim. The worker waits for it, then goes on.
REDIS_CHILD = textwrap.dedent(
    """
    import asyncio, logging, os, sys

    from lago_org_billing._idempotency import SharedFirstSeen
    from lago_org_billing._quota_redis import RedisBackend
    from lago_org_billing._webhooks import RedisDedupe

    logging.disable(logging.CRITICAL)
    url = sys.argv[1]
    store, backend, dedupe = SharedFirstSeen(url), RedisBackend(url), RedisDedupe(url)


    async def use(who, first_key, timestamp, org_id, webhook):
        first = await store.first(first_key, timestamp)
        try:
            await backend.invalidate(org_id)
            invalidated = "ok"
        except Exception as exc:
            invalidated = type(exc).__name__
        try:
            claimed = await dedupe.claim(webhook)
        except Exception as exc:
            claimed = type(exc).__name__
        print(who, first, store.down, invalidated, claimed, flush=True)


    async def worker():
        await use("PARENT", "before", 1.0, "org_before", "w_before")
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(use("CHILD", "child", 2.0, "org_child", "w_child"))
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        await use("PARENT", "after", 3.0, "org_after", "w_after")
        await store.aclose()
        await backend.aclose()
        await dedupe.aclose()


    asyncio.run(worker())
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: POSIX only")
def test_a_forked_helper_uses_redis_through_connections_of_its_own(redis_url: str) -> None:
    """The helper's Redis calls went through the worker's pooled connections (redis-py's asyncio pool neither checks
    the process id nor the loop): each failed in the helper ("got Future attached to a different loop", said as a
    Redis outage; the plan change's invalidation not made fleet-wide), and having written its command on the socket it
    shares with the worker, it cost the worker its next call on each (a 2-second stall, then an "outage": a key's first
    timestamp kept in the process, a retry reaching another worker billed twice). As ``LagoClient``'s pool and the
    raw poster's kept-alive connections are, the Redis stores' connections must be the worker's alone: the helper
    makes its own, and the worker's are left as they were."""
    done = subprocess.run(
        [sys.executable, "-c", REDIS_CHILD, redis_url], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "PARENT 1.0 False ok new",
        "CHILD 2.0 False ok new",
        "PARENT 3.0 False ok new",
    ], (done.stdout, done.stderr[-2000:])
