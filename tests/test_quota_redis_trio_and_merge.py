"""The Redis quota backend: which event loop it runs on, and callers cut off around Redis's answers (a real
``redis-server`` on 127.0.0.1).

1. Under trio (``hypercorn -k trio``) with ``LAGO_REDIS_URL``: ``redis.asyncio`` runs only on asyncio, so every gated
   request raised ``RuntimeError: no running event loop`` (a 500 for every call of every org). Now the gate counts in
   the process, as while Redis is down, says why once, and the fallback gauge shows it. Through the middleware.
2. The merge of what a worker counted during a Redis outage, cut off or failed after Redis applied it (a native
   ``task.cancel()`` of the request that ran it: ``asyncio.timeout`` around the app, a client gone, uvicorn cancelling
   at shutdown; or a socket timeout): the records were taken back and merged again, so the outage's calls counted
   twice fleet-wide (the org refused early for the rest of its period). Each merge now leaves a mark in Redis, and
   the next one adds only what the latest applied one leaves, however many were lost in a row.

A settable clock; counts, decisions and logs only, no sleeps as synchronisation.
"""

# ruff: noqa: F811 (test_quota_redis_recovery's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import httpx
import pytest
from redis import exceptions as redis_exceptions
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import REDIS_SERVER, Clock, chat, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago
from test_quota_redis_recovery import (  # noqa: F401 (its fixtures)
    Fleet,
    backend_of,
    client,
    clock,
    fake,
    fleet,
    port,
    redis_dir,
    served,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


# ------------------------------------------------------------------- 1. a Redis gate under trio


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_a_redis_gate_counts_in_the_process_instead_of_failing_every_request(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Limit 3, five requests of org_1 through the middleware under trio, LAGO_REDIS_URL set: each raised
    ``RuntimeError`` from the redis client. Now 3 are served and 2 refused (429), counted in the process; the reason
    is logged once, with what to do."""
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    clock = Clock()
    lago = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3)
    settings = BillingSettings(
        api_url=lago.base_url, api_key="k", max_retries=0, redis_url=redis_url, org_header="x-org-id"
    )
    async with LagoClient(settings, transport=lago.transport()) as lago_client:
        prefix = f"trio:{uuid.uuid4().hex[:8]}:"
        gate = QuotaGate(settings, lago_client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time)
        app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])
        middleware = OrgBillingMiddleware(app, settings=settings, client=lago_client, quota=gate)
        statuses = []
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://t") as http:
                for _ in range(5):
                    response = await http.post("/v1/chat", headers={"x-org-id": "org_1"}, json={})
                    statuses.append(response.status_code)
        finally:
            await middleware.aclose()
    assert statuses == [200, 200, 200, 429, 429]
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    assert backend.stats["redis_fallback"] == 1
    said = [r.getMessage() for r in caplog.records if "trio" in r.getMessage()]
    assert len(said) == 1 and "asyncio" in said[0], said


# ------------------------------------------------------------------- 2. a merge cut off after Redis applied it


async def test_a_merge_cut_off_after_redis_applied_it_counts_the_outage_once(fleet: Fleet) -> None:
    """Limit 3. One call counted in Redis; Redis down: two more served on this worker's fallback. Redis answers again:
    the next request hands those two to Redis (MERGE), and is cancelled natively just after Redis applied it. The two
    records are taken back and merged again by the next check: 5 calls in Redis for 3 served (should be 3)."""
    with fleet.up():
        gate = fleet.gate()
        await served(gate)
        await backend_of(gate).flush()
        await fleet.save()
    for _ in range(2):
        await served(gate)  # Redis down: decided here
    backend = backend_of(gate)
    assert backend.stats["redis_fallback"] == 1
    with fleet.up():
        fleet.retry_due()
        original = backend._merge
        cut: list[asyncio.Task[Any]] = []

        async def applied_then_cut(**kwargs: Any) -> Any:
            result = await original(**kwargs)  # Redis ran the script: the records are in its counter
            if cut:
                cut.pop().cancel()  # the request is cancelled before the reply reaches it
            await asyncio.sleep(0)
            return result

        backend._merge = applied_then_cut  # type: ignore[method-assign]
        request = asyncio.ensure_future(gate.check("org_1"))
        cut.append(request)
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.gather(*backend._orphans)  # (anything cut off, going on apart from the request)
        backend._merge = original  # type: ignore[method-assign]
        after = await gate.check("org_1")
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert (after.allowed, after.status) == (False, 429)
    assert status["usage"]["max_api_calls"] == 3
    assert backend.stats["redis_fallback"] == 0


async def test_merges_failing_after_redis_applied_them_twice_in_a_row_count_the_outage_once(fleet: Fleet) -> None:
    """Limit 3. One call counted in Redis; Redis down: one more served here. Redis answers again, but the reply of the
    merge of that record is lost (a socket timeout once Redis ran it: a Redis error, the record taken back), twice in
    a row; the third merge goes through. Each check meanwhile is decided here and its call released. Redis must hold 2
    calls, and the next call be allowed: each merge adds only what the latest one applied leaves (before: 4,
    refused)."""
    with fleet.up():
        gate = fleet.gate()
        await served(gate)
        await backend_of(gate).flush()
        await fleet.save()
    await served(gate)  # Redis down: decided here
    backend = backend_of(gate)
    with fleet.up():
        original = backend._merge
        lost = 2

        async def applied_then_lost(**kwargs: Any) -> Any:
            nonlocal lost
            result = await original(**kwargs)  # Redis ran the script
            if lost:
                lost -= 1
                raise redis_exceptions.TimeoutError("Timeout reading from socket")
            return result

        backend._merge = applied_then_lost  # type: ignore[method-assign]
        for left in (1, 0):
            fleet.retry_due()
            decision = await gate.check("org_1")  # its merge lost: decided here, with the record taken back
            assert decision.allowed and lost == left and backend.stats["redis_fallback"] == 1
            gate.settle("org_1", decision, tokens=0, billed=False)
        fleet.retry_due()
        after = await gate.check("org_1")  # the third merge goes through, then the call is decided in Redis
        gate.settle("org_1", after, tokens=0, billed=False)
        await backend.flush()
        status = await gate.enforce_usage_limits("org_1")
        await gate.aclose()
    assert backend.stats["redis_fallback"] == 0
    assert after.allowed
    assert status["usage"]["max_api_calls"] == 2
