"""Idempotent retries (``idempotency_header``) whose event waits in the outbox before it is built: the retry is the
same event as its first (same transaction id and timestamp: Lago's ClickHouse store deduplicates on both) however
long it waits, even once the process's memory of first timestamps has forgotten the key meanwhile (its day over, or
newer keys past its bound). Before, the build read the first timestamp from that memory: forgotten, the retry (counted
as a retry: its quota call released) was sent with its own timestamp and billed a second time.

Also: a retry's event keeps its own duration; two long methods sharing their start are two calls (their transaction
ids were made from the cut method without Redis); the Redis store used on one event loop then another.

The pipeline builds only when flushed (a long ``flush_interval``); a settable clock drives the middleware's wall clock
and its memory's day; no sleeps as synchronisation. Redis: a throwaway ``redis-server`` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import gc
import logging
import time
import types
import uuid
from typing import Any

import httpx
import pytest
from cachetools import TTLCache
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBillingMiddleware, _middleware
from lago_org_billing._idempotency import SharedFirstSeen
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

DAY = 86_400
T0 = dt.datetime(2026, 3, 10, 12, tzinfo=dt.timezone.utc)


def _event_time(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def _served(
    clock: Clock, redis: str | None, steps: Any, *, memory: int | None = None, monotonic: list[float] | None = None
) -> tuple[list[dict[str, Any]], OrgBillingMiddleware]:
    """Run ``steps(post, flush)`` against a middleware whose pipeline builds events only when flushed; Lago's events
    (ClickHouse store) and the middleware. ``post(key, took)``: the endpoint moves ``monotonic`` on by ``took``."""

    async def ok(request: Request) -> Response:
        if monotonic is not None:
            monotonic[0] += float(request.headers["x-took"])
        return JSONResponse({})

    fake = seed(FakeLago(api_key="k", clock=clock.now, event_store="clickhouse"))
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, redis_url=redis, org_header="X-Org")
    async with LagoClient(settings, transport=fake.transport()) as lago:
        pipeline = EventPipeline(lago, flush_interval=3_600)  # (built when flushed, not by its own clock)
        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", ok, methods=["POST"])]),
            settings,
            quota=None,
            client=lago,
            pipeline=pipeline,
            idempotency_header="Idempotency-Key",
        )
        if memory is not None:  # (the memory of first timestamps, its bound made small)
            middleware._first_seen = TTLCache(maxsize=memory, ttl=DAY, timer=clock.time)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:

                async def post(key: str, took: float = 0.0) -> None:
                    headers = {"X-Org": "org_1", "Idempotency-Key": key, "X-Took": str(took)}
                    answer = await http.post("/v1/chat", headers=headers)
                    assert answer.status_code == 200

                async def flush() -> None:
                    assert await pipeline.flush(5)

                await steps(post, flush)
        finally:
            await middleware.aclose()
            await pipeline.aclose()
    return [event for event in fake.events if event["transaction_id"].startswith("idem_")], middleware


async def test_a_retry_recorded_in_its_keys_day_and_built_after_it_is_the_first_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retry arrives a minute before its key's day is over (in this process's memory, no Redis) and its event is
    built a minute after it (Lago down, a long ``flush_interval``): the retry was counted as one, so its event is the
    first one's, with its timestamp."""
    clock = Clock(T0)
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic))
    monkeypatch.setattr(_middleware, "TTLCache", functools.partial(TTLCache, timer=clock.time))
    key = f"day-{uuid.uuid4().hex}"

    async def steps(post: Any, flush: Any) -> None:
        await post(key)
        await flush()
        clock.at = T0 + dt.timedelta(seconds=DAY - 60)
        await post(key)  # the retry, counted as one
        clock.at = T0 + dt.timedelta(seconds=DAY + 60)  # its event not built yet
        await flush()

    events, middleware = await _served(clock, None, steps)
    assert middleware.stats.get("idempotent_retries") == 1
    assert [_event_time(event) for event in events] == [T0.timestamp()], (
        "the retry, counted as one, was sent with its own timestamp: a second event in Lago's ClickHouse store"
    )


async def test_a_retry_waiting_while_newer_keys_fill_the_memory_is_the_first_event(redis: str | None) -> None:
    """A retry's event waits to be built while newer keys push its first timestamp out of this process's memory (its
    bound: 100,000 keys, made 2 here): in this process only, and with the first timestamps shared in Redis
    (``LAGO_REDIS_URL``), where the retry learnt it."""
    clock = Clock(T0)
    tag = uuid.uuid4().hex

    async def steps(post: Any, flush: Any) -> None:
        await post(f"{tag}-a")
        await flush()
        clock.advance(5)
        await post(f"{tag}-a")  # the retry, counted as one
        for other in ("b", "c"):  # newer keys, while the retry's event waits
            clock.advance(1)
            await post(f"{tag}-{other}")
        await flush()

    events, middleware = await _served(clock, redis, steps, memory=2)
    assert middleware.stats.get("idempotent_retries") == 1
    assert len(events) == 3, (
        "the retry, counted as one, was sent with its own timestamp: a second event in Lago's ClickHouse store "
        f"({sorted((event['transaction_id'], event['timestamp']) for event in events)})"
    )


async def test_a_retrys_event_has_its_first_events_timestamp_and_its_own_duration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first attempt starts at T0 and takes 0.5 s; its retry starts 10 s later and takes 0.25 s. Lago's ClickHouse
    store keeps the latest copy of the one event: the retry's, dated T0, lasting 250 ms (not the 10.25 s since the
    first attempt)."""
    wall, monotonic = [T0.timestamp()], [1_000.0]
    monkeypatch.setattr(
        _middleware, "time", types.SimpleNamespace(time=lambda: wall[0], monotonic=lambda: monotonic[0])
    )
    clock = Clock(T0)
    key = f"duration-{uuid.uuid4().hex}"

    async def steps(post: Any, flush: Any) -> None:
        for start, took in ((0.0, 0.5), (10.0, 0.25)):
            wall[0], monotonic[0] = T0.timestamp() + start, 1_000.0 + start
            await post(key, took)
        await flush()

    events, middleware = await _served(clock, None, steps, monotonic=monotonic)
    assert middleware.stats.get("idempotent_retries") == 1
    assert [(_event_time(event), event["properties"]["duration_ms"]) for event in events] == [(T0.timestamp(), 250.0)]


async def test_two_long_methods_sharing_their_start_with_one_key_are_two_calls(redis: str | None) -> None:
    """Methods are a client's tokens (h11 takes any): two of 70 characters differing in the last one, with one key on
    one path, are two calls, in this process's memory as in Redis (an event's ``method`` is cut at 64 characters;
    its transaction id was made from the cut one without Redis: the second was a retry, never billed)."""
    fake = FakeLago(api_key="k", event_store="clickhouse")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, redis_url=redis, org_header="X-Org")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse({})(scope, receive, send)

    middleware = OrgBillingMiddleware(
        app, settings, quota=None, transport=fake.transport(), idempotency_header="Idempotency-Key"
    )
    key = f"methods-{uuid.uuid4().hex}"
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            for method in ("X" * 69 + "A", "X" * 69 + "B"):
                answer = await http.request(method, "/v1/chat", headers={"X-Org": "org_1", "Idempotency-Key": key})
                assert answer.status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert middleware.stats.get("idempotent_retries", 0) == 0
    assert len({event["transaction_id"] for event in fake.events}) == 2


# (the sockets of the loops that ended: dropped, not closed, as a loop's transports close on their own loop only)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_the_redis_store_used_on_one_event_loop_then_another_keeps_sharing(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The idempotency keys' Redis store (``SharedFirstSeen``) used on one event loop, then on another (a loop per
    test, per ``asyncio.run``), without being closed between: its client's connections of the loop before were used
    on the next, where each call failed ("Event loop is closed"), said as Redis being unavailable, the first timestamp
    kept in the process (a retry reaching another worker billed again); closing it from a third loop raised."""
    caplog.set_level(logging.INFO, logger="lago_org_billing")
    store = SharedFirstSeen(redis_url)
    key = f"loops-{uuid.uuid4().hex}"
    firsts = [asyncio.run(store.first(key, candidate)) for candidate in (1.5, 2.5, 3.5)]
    asyncio.run(store.aclose())
    gc.collect()  # (the sockets of the loops that ended, dropped: collected here)
    assert firsts == [1.5, 1.5, 1.5]
    assert not store.down
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
