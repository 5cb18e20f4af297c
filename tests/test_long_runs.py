"""Long-running behaviour: what a process keeps, loses or leaks after many requests, restarts and outages."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.lowlevel import checkpoint
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing._spool import SqliteOutbox
from lago_org_billing.testing import FakeLago
from test_delivery import make_client
from test_spool import rows

pytestmark = pytest.mark.anyio


def _size(path: str) -> int:
    return os.path.getsize(path)


@contextlib.asynccontextmanager
async def _one_worker_thread_held() -> AsyncIterator[anyio.CapacityLimiter]:
    """anyio's worker threads limited to one, held here: a spool commit waits for a thread (release it to let it go)."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    limiter.total_tokens = 1
    await limiter.acquire()
    try:
        yield limiter
    finally:
        limiter.total_tokens = total


def _event(n: int) -> dict[str, object]:
    return event_payload(
        transaction_id=f"tx_{n}", external_subscription_id="org_a", code="api_call", timestamp=1.0, properties={}
    )


async def test_spool_commit_cancelled_before_its_write_keeps_the_events(tmp_path: Path) -> None:
    """A group commit cancelled while it waits for its worker thread (the background work stopped: an event loop
    ending without a lifespan, a restart after an error) must not drop the events it took from memory: they were
    accepted (billed) and are neither in the file nor counted anywhere."""
    outbox = SqliteOutbox(str(tmp_path / "spool.db"))
    await outbox.open()
    for n in range(50):
        assert outbox.put(_event(n))
    # every worker thread busy: the commit waits for one, with the events in hand
    async with _one_worker_thread_held() as limiter, anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.commit)
        while outbox.pending:  # until it took them (then it waits for the limiter)
            await checkpoint()
        tasks.cancel_scope.cancel()
        limiter.release()  # (the thread is free again; the commit was cancelled meanwhile)
    assert outbox.unresolved() == 50
    await outbox.commit()
    assert rows(outbox.path) == 50
    assert outbox.unresolved() == 50
    assert await outbox.close() == 0


async def test_spool_commit_cancelled_natively_before_its_write_keeps_the_events(tmp_path: Path) -> None:
    """The same with a native asyncio cancellation (what ``asyncio.run`` does to the tasks left when the loop ends: a
    middleware started without a lifespan), which anyio's shields let through."""
    outbox = SqliteOutbox(str(tmp_path / "spool.db"))
    await outbox.open()
    for n in range(50):
        assert outbox.put(_event(n))
    async with _one_worker_thread_held() as limiter:
        task = asyncio.get_running_loop().create_task(outbox.commit())
        while outbox.pending:
            await checkpoint()
        task.cancel()
        limiter.release()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert outbox.unresolved() == 50
    await outbox.commit()
    assert rows(outbox.path) == 50
    assert outbox.unresolved() == 50
    assert await outbox.close() == 0


async def test_spool_file_shrinks_once_a_backlog_is_delivered(tmp_path: Path) -> None:
    """An outage fills the spool (LAGO_SPOOL_PATH); once Lago is back and the backlog is delivered, the file gives its
    space back instead of keeping the outage's high-water mark on disk for good."""
    fake = FakeLago(api_key="test-api-key")
    fake.faults.inject(status=503, count=10**9, path="/api/v1/events")
    path = str(tmp_path / "spool.db")
    async with make_client(fake.transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, spool_path=path, retry_backoff=0.01, max_backoff=0.05)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for n in range(20_000):
                pipeline.submit(
                    event_payload(
                        transaction_id=f"tx_{n}",
                        external_subscription_id="org_a",
                        code="api_call",
                        timestamp=1.0,
                        properties={"note": "x" * 200},
                    )
                )
            await pipeline.commit()
            backlog = _size(path)
            assert backlog > 4_000_000
            fake.faults.clear()
            assert await pipeline.flush(60)
            assert len(fake.events) == 20_000
            assert rows(path) == 0
            assert _size(path) < backlog // 10
            assert _size(path + "-wal") < 4_000_000
            await pipeline.aclose()


async def _chat(request: Request) -> Response:
    params = request.path_params
    return JSONResponse({"model": f"m{int(params['n']) % 7}", "usage": {"prompt_tokens": 3, "completion_tokens": 4}})


async def _stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'data: {"choices": []}\n\n'
        yield b'data: {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def _boom(request: Request) -> Response:
    raise RuntimeError("boom")


async def _drive(app: Any, start: int, count: int) -> None:
    """Varied traffic, called straight (no server): 300 orgs, 1,000 users, JSON, streams, streams cut off by the
    client, 404s on made-up paths, app errors, excluded paths, preflights, unresolved requests, mounted routes."""
    for i in range(start, start + count):
        kind = i % 10
        headers = [(b"x-org-id", b"org_%d" % (i % 300)), (b"x-user-id", b"user_%d" % (i % 1000))]
        method, path, cut = "GET", "/v1/stream", False
        if kind <= 2:
            method, path = "POST", f"/v1/chat/{i}"
        elif kind == 3:
            path = f"/nope/{i}"
        elif kind == 4:
            path = "/boom"
        elif kind == 5:
            path = "/health/live"
        elif kind == 6:
            method = "OPTIONS"
            headers += [(b"origin", b"http://x"), (b"access-control-request-method", b"GET")]
        elif kind == 7:
            cut = True
        elif kind == 8:
            method, path = "POST", f"/api/p{i % 40}/items/{i}"
        else:
            headers = headers[1:]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {},
        }  # fmt: skip
        messages, received = 0, False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if received:  # (a stream listens for the disconnect until it is over)
                await anyio.sleep_forever()
            received = True
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal messages
            messages += 1
            if cut and messages > 1:  # noqa: B023 - each request awaits its own
                raise OSError("the client went away")

        try:
            await app(scope, receive, send)
        except (OSError, RuntimeError):
            pass


@pytest.mark.parametrize("spool", [False, True])
async def test_many_requests_keep_memory_tasks_and_files_bounded(tmp_path: Path, spool: bool) -> None:
    """After a warm-up, thousands more requests of every kind leave nothing behind: no object, task or open file per
    request, every per-key cache within its bound, every billed event delivered."""
    from lago_org_billing import _endpoints, _identity, _middleware

    fake = FakeLago()
    fake.add_plan("starter", amount_cents=0)
    for org in range(300):
        if org % 5:  # the others have no subscription: 402
            fake.add_subscription(f"org_{org}", "starter", external_id=f"org_{org}")
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        org_header="X-Org-Id",
        user_header="X-User-Id",
        exclude_paths=("/health",),
        retry_backoff=0.001,
        spool_path=str(tmp_path / "spool.db") if spool else None,
    )
    inner = Starlette(
        routes=[
            Route("/v1/chat/{n}", _chat, methods=["POST"]),
            Route("/v1/stream", _stream),
            Route("/boom", _boom),
            Mount("/api/{project}", routes=[Route("/items/{n}", _chat, methods=["POST"])]),
        ]
    )
    middleware = OrgBillingMiddleware(
        CORSMiddleware(inner, allow_origins=["*"], allow_methods=["*"]), settings, transport=fake.transport()
    )

    def forget_delivered() -> None:  # (the emulator keeps what it ingests: not the middleware's memory)
        fake.store.events.clear()
        fake.store._event_index.clear()
        fake.requests.clear()

    async def settle() -> tuple[int, int, int]:
        assert await middleware.pipeline.flush(30)
        forget_delivered()
        gc.collect()
        for _ in range(100):  # async generators the collection finalised (streams cut off) close in tasks of their own
            if not any(type(task.get_coro()).__name__ == "async_generator_athrow" for task in asyncio.all_tasks()):
                break
            await checkpoint()
        return len(gc.get_objects()), len(asyncio.all_tasks()), len(os.listdir("/proc/self/fd"))

    gc.collect()  # (files an earlier test left to the collector, a failed one's pipeline: not this test's to count)
    fds_before = len(os.listdir("/proc/self/fd"))
    async with anyio.create_task_group() as tasks:
        await tasks.start(middleware._background)
        middleware._running = True
        await _drive(middleware, 0, 3_000)  # warm-up: every org, user, route and cache seen
        objects, task_count, fds = await settle()
        await _drive(middleware, 3_000, 6_000)
        objects_after, task_count_after, fds_after = await settle()
        assert task_count_after == task_count, [t.get_coro() for t in asyncio.all_tasks()]
        assert fds_after == fds
        assert objects_after - objects < 600  # 6,000 requests: < 0.1 object per request
        assert len(middleware._heads) <= 300 * 4 * 2
        assert len(middleware._first_seen) == 0
        assert len(_middleware._user_texts) <= 10_000 and len(_identity._header_ids) <= 10_000
        assert len(_endpoints._mount_prefixes) <= 10_000
        assert middleware.pipeline.dead_letters() == []
        stats = middleware.pipeline.stats
        assert stats["recorded"] == stats["delivered"] == middleware.stats["billed"] > 0
        await middleware.aclose()
        tasks.cancel_scope.cancel()
    assert len(os.listdir("/proc/self/fd")) == fds_before
