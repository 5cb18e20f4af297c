"""What the quota gate's Redis work holds when an event loop ends without a lifespan shutdown is not lost.

``asyncio.run()`` ending a loop cancels every task at once with ``Task.cancel()``. An app without a lifespan (mounted
in another; ``uvicorn --lifespan off``; a test client without ``with``: a loop per request) runs the gate's Redis
writer and its refreshes in tasks of that loop. When it ended:

* the settles queued and not yet written (the last requests' tokens, their calls recorded or released) stayed in
  memory: lost when the process exits, their calls held in flight in Redis for ``inflight_horizon`` (an hour);
* a write of settles the loop's end cut off after Redis had applied it was queued again and written once more by
  the next loop: with a test client without ``with``, an org on a 3-call plan was refused its third call;
* a refresh in flight kept the fleet's refresh lock for its whole TTL: handing it back raced the disconnection of the
  loop's connections ("Redis failed ... Connection lost" at every such exit), and a lock whose ``SET`` was cut off
  before its answer was never handed back.

Each test ends its loops the way those apps' loops end: ``asyncio.run()`` returning, its tasks cancelled natively.
Real Redis (a redis-server), the Lago emulator, the middleware served through ``httpx.ASGITransport`` (no lifespan).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, cast

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _lifespan import serving_lifespan
from _quota_app import needs_redis, seed
from lago_org_billing import BillingSettings, OrgBillingMiddleware, QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago, serve_in_thread

pytestmark = needs_redis

API_KEY = "k"
TOKENS = 3
ORG = {"X-Org-Id": "org_1"}


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"total_tokens": TOKENS}})


class HangingUsage(httpx.AsyncBaseTransport):
    """The emulator, whose usage reads hang once ``hang`` is set (Lago slow): a refresh is in flight."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.hang = False
        self.reached: asyncio.Event | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.hang and request.url.path.endswith("/current_usage"):
            assert self.reached is not None
            self.reached.set()
            await asyncio.Event().wait()
        return await self.inner.handle_async_request(request)


class Served:
    """The middleware (no lifespan: started lazily by its first request) in front of the emulator, its own Redis
    prefix, a sync Redis client to read what the fleet sees."""

    def __init__(self, redis_url: str, **settings: Any) -> None:
        self.fake = seed(FakeLago(api_key=API_KEY), starter_calls=settings.pop("starter_calls", 300))
        self.lago = HangingUsage(self.fake.transport())
        self.prefix = f"loop-end-{uuid.uuid4().hex[:8]}:"
        self.settings = BillingSettings(
            api_url=FakeLago.base_url,
            api_key=API_KEY,
            org_header="X-Org-Id",
            redis_url=redis_url,
            quota_mode="enforce",
            **settings,
        )
        self.middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/chat", chat)]),
            self.settings,
            transport=self.lago,
            quota_config=QuotaConfig(redis_prefix=self.prefix),
            shutdown_timeout=2,
        )
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)

    @property
    def gate(self) -> QuotaGate:
        gate = self.middleware.quota
        assert isinstance(gate, QuotaGate)
        return gate

    @property
    def backend(self) -> Any:
        return self.gate.backend

    def loop(self, main: Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]) -> None:
        """One event loop, ended as ``asyncio.run()`` ends it (every task cancelled natively)."""

        async def run() -> None:
            transport = httpx.ASGITransport(app=self.middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                await main(client)

        asyncio.run(run())

    def requests(self, count: int) -> Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]:
        async def main(client: httpx.AsyncClient) -> None:
            for _ in range(count):
                assert (await client.get("/chat", headers=ORG)).status_code == 200

        return main

    def count(self) -> dict[str, int]:
        """The org's counter in Redis: calls recorded, tokens, calls still in flight."""
        fields = cast(dict[str, str], self.redis.hgetall(f"{self.prefix}{{org_1}}:count"))
        return {
            "recorded": sum(int(v) for k, v in fields.items() if k.startswith("c:")),
            "tokens": int(fields.get("tokens", 0)),
            "in_flight": sum(int(v) for k, v in fields.items() if k.startswith("i:")),
        }

    def lock_ms(self) -> int:
        """How long the fleet's refresh lock of the org is still held (ms; <= 0: free)."""
        return int(self.redis.pttl(f"{self.prefix}{{org_1}}:lock"))

    def close(self) -> None:
        self.redis.close()


@pytest.fixture
def served(redis_url: str) -> Any:
    made: list[Served] = []

    def make(**kwargs: Any) -> Served:
        made.append(Served(redis_url, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_the_settles_queued_when_the_loop_ends_are_written_to_redis(served: Callable[..., Served]) -> None:
    """The calls and tokens of a loop's last requests, settled and queued for Redis when the loop ends, are written
    then: the fleet counts every call recorded and every token, none held in flight."""
    app = served()
    app.loop(app.requests(3))
    assert app.count() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}
    assert not app.backend._queue


def test_uvicorn_without_lifespan_leaves_the_fleet_every_call_and_token_of_its_last_requests(
    served: Callable[..., Served],
) -> None:
    """``uvicorn --lifespan off`` (a real uvicorn, stopped as Ctrl-C stops it): the events of its last requests are
    delivered when its loop ends, and the fleet's counts in Redis hold their calls and tokens, none in flight."""
    app = served()
    with serve_in_thread(app.middleware, lifespan="off") as url, httpx.Client(base_url=url, headers=ORG) as client:
        for _ in range(3):
            assert client.get("/chat").status_code == 200
    assert len(app.fake.events) == 3
    assert app.count() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}


def test_a_settle_write_cut_by_the_loops_end_after_redis_applied_it_is_not_applied_again(
    served: Callable[..., Served],
) -> None:
    """A write of settles that Redis applied, whose answer the loop's end cut off, is not written again (at that end,
    nor by the next loop): an org on a 3-call plan served by a loop per request gets its three calls."""
    app = served(starter_calls=3)
    backend = app.backend
    real = backend._settle.run_all
    applied = asyncio.Event()
    cut: list[int] = []

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        results = await real(*args, **kwargs)
        if not cut:  # the first write: applied by Redis, its answer still on its way when the loop ends
            cut.append(1)
            applied.set()
            await asyncio.Event().wait()
        return results

    backend._settle.run_all = answer_lost

    async def first(client: httpx.AsyncClient) -> None:
        assert (await client.get("/chat", headers=ORG)).status_code == 200
        await applied.wait()

    app.loop(first)
    assert app.count() == {"recorded": 1, "tokens": TOKENS, "in_flight": 0}
    for _ in range(2):
        app.loop(app.requests(1))
    assert app.count() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}


def test_a_settle_write_cut_by_the_loops_end_before_redis_had_it_is_written_then(
    served: Callable[..., Served],
) -> None:
    """A write of settles the loop's end cut off before Redis had it is written at that end: the call is recorded and
    its tokens counted, not held in flight."""
    app = served()
    backend = app.backend
    real = backend._settle.run_all
    sending = asyncio.Event()
    cut: list[int] = []

    async def never_sent(*args: Any, **kwargs: Any) -> Any:
        if not cut:
            cut.append(1)
            sending.set()
            await asyncio.Event().wait()
        return await real(*args, **kwargs)

    backend._settle.run_all = never_sent

    async def first(client: httpx.AsyncClient) -> None:
        assert (await client.get("/chat", headers=ORG)).status_code == 200
        await sending.wait()

    app.loop(first)
    assert app.count() == {"recorded": 1, "tokens": TOKENS, "in_flight": 0}


def test_a_refresh_cut_by_the_loops_end_hands_the_fleets_lock_back(
    served: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh reading Lago when the loop ends hands the fleet's refresh lock back (another worker may read the org
    after ``failure_backoff``, not a whole TTL later), and no Redis failure is said of the loop's end."""
    app = served(usage_cache_ttl=300)
    app.loop(app.requests(1))  # the org's first snapshot

    async def refreshing(client: httpx.AsyncClient) -> None:
        assert (await client.get("/chat", headers=ORG)).status_code == 200  # (the gate's work runs in this loop)
        app.lago.hang, app.lago.reached = True, asyncio.Event()
        await app.gate.invalidate("org_1", refresh=True)
        await app.lago.reached.wait()
        assert app.lock_ms() > 100_000  # held for the TTL while the refresh reads Lago

    with caplog.at_level(logging.WARNING, logger="lago_org_billing.quota"):
        app.loop(refreshing)
    assert app.lock_ms() <= app.gate.config.failure_backoff * 1000
    assert "failed" not in caplog.text


def test_a_refresh_lock_taken_as_the_loop_ends_is_handed_back(served: Callable[..., Served]) -> None:
    """A refresh lock Redis set, whose answer the loop's end cut off, is handed back: not held a whole TTL by a
    process that no longer knows it holds it."""
    app = served(usage_cache_ttl=300)
    app.loop(app.requests(1))
    backend = app.backend
    real = backend._lock
    taken = asyncio.Event()

    class AnswerLost:
        async def __call__(self, **kwargs: Any) -> Any:
            await real(**kwargs)
            taken.set()
            await asyncio.Event().wait()

    backend._lock = AnswerLost()

    async def refreshing(client: httpx.AsyncClient) -> None:
        assert (await client.get("/chat", headers=ORG)).status_code == 200
        await app.gate.invalidate("org_1", refresh=True)
        await taken.wait()
        assert app.lock_ms() > 100_000

    app.loop(refreshing)
    assert app.lock_ms() <= app.gate.config.failure_backoff * 1000


def test_a_lifespan_shutdown_right_after_requests_leaves_the_fleet_their_tokens(served: Callable[..., Served]) -> None:
    """With a lifespan too: requests answered just before the shutdown (their events not built yet: the pipeline
    builds them within ``flush_interval``) have their tokens in the fleet's counts, not only in this process's (the
    gate closed before delivery's last flush built them)."""
    app = served()

    async def main() -> None:
        async with serving_lifespan(app.middleware):
            transport = httpx.ASGITransport(app=app.middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for _ in range(3):
                    assert (await client.get("/chat", headers=ORG)).status_code == 200

    asyncio.run(main())
    assert len(app.fake.events) == 3
    assert app.count() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}


def test_a_loop_that_used_the_gate_without_its_background_work_leaves_the_next_loop_working(
    served: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook's invalidation on a loop the gate's work did not run in (a webhook served in a test client's loop
    of its own) left its Redis connection in the pool when that loop ended: the next loop's first Redis call failed on
    it (the background work stopped on an error, counting fell back to the process; or the request raised "Event loop
    is closed"). It drops its connections: the next loop's requests are served and counted in Redis."""
    app = served()
    app.loop(app.requests(1))

    async def webhook(client: httpx.AsyncClient) -> None:
        await app.gate.invalidate("org_1", webhook_type="subscription.updated")

    app.loop(webhook)
    with caplog.at_level(logging.WARNING):
        app.loop(app.requests(2))
    assert app.count() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lago_org_billing.quota")]
    assert "background work stopped" not in caplog.text


# (the socket of a connection another loop left cannot be closed but by the garbage collector: that loop is closed)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_connection_another_loop_left_in_the_pool_is_dropped_before_the_next_loop_uses_redis(
    served: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    """The gate used directly on a loop its work did not run in (a check made by the app's own code, outside the
    middleware) leaves a connection of that loop in the pool: the next loop's writer drops it as it starts, and that
    loop's requests are served and counted in Redis (the first one raised "Event loop is closed")."""
    app = served()
    app.loop(app.requests(1))

    async def direct(client: httpx.AsyncClient) -> None:
        decision = await app.gate.check("org_1")
        app.gate.settle("org_1", decision, tokens=0, billed=False)  # (not billed: released)

    app.loop(direct)
    with caplog.at_level(logging.WARNING):
        app.loop(app.requests(2))
    gc.collect()  # (the dropped connection's socket, closed by the collector: here, not in another test)
    assert app.count() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lago_org_billing.quota")]


def test_a_refresh_in_flight_at_a_lifespan_shutdown_hands_its_lock_back_and_leaves_no_connection(
    served: Callable[..., Served],
) -> None:
    """With a lifespan: a refresh reading Lago at the shutdown hands the fleet's lock back before the gate's Redis
    client closes (it made a connection again after the close, left open when the loop ended: a ResourceWarning at
    exit, an unclosed socket)."""
    app = served(usage_cache_ttl=300)

    async def main() -> None:
        async with serving_lifespan(app.middleware):
            transport = httpx.ASGITransport(app=app.middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                assert (await client.get("/chat", headers=ORG)).status_code == 200
                app.lago.hang, app.lago.reached = True, asyncio.Event()
                await app.gate.invalidate("org_1", refresh=True)
                await app.lago.reached.wait()

    asyncio.run(main())
    pool = app.backend.redis.connection_pool
    assert not [c for c in (*pool._available_connections, *pool._in_use_connections) if c.is_connected]
    assert app.lock_ms() <= app.gate.config.failure_backoff * 1000
