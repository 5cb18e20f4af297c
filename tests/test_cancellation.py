"""Requests cancelled on the way (a client gone, a server or middleware timeout): the middleware keeps working, a
reserved call is settled, a served request is billed, a dropped event is not counted against the quota."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import Clock, chat, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, require_quota
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_local import LocalBackend
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


def http_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/chat",
        "raw_path": b"/v1/chat",
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "server": ("app", 80),
        "client": ("client", 1234),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def receive_nothing() -> dict[str, Any]:
    await anyio.sleep_forever()
    raise AssertionError


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``condition`` (a deadline of 5 s, no fixed sleep as synchronisation); fail naming it after that."""
    with anyio.move_on_after(5):
        while not await condition():  # noqa: ASYNC110 - polling an outside state with a deadline
            await anyio.sleep(0.001)
        return
    pytest.fail(f"{getattr(condition, '__name__', condition)}() still false after 5 s")


def fresh_fake(clock: Clock) -> FakeLago:
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)


async def test_first_request_cancelled_during_lazy_start_does_not_break_the_middleware() -> None:
    """No lifespan: the first request starts the background work and is cancelled (client gone, a timeout) while
    it waits for it to start: the work starts all the same and later requests are served (only the cancelled request
    marked it running, and every later one failed with "background delivery is not running")."""
    clock = Clock()
    fake = fresh_fake(clock)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    middleware = OrgBillingMiddleware(Starlette(routes=[Route("/v1/chat", chat)]), settings, transport=fake.transport())

    async def send(message: dict[str, Any]) -> None:
        pass

    with anyio.CancelScope() as scope:
        scope.cancel()  # the first request is cancelled at its first checkpoint: waiting for the start
        await middleware(http_scope((b"x-org-id", b"org_1")), receive, send)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
        assert response.status_code == 200
    finally:
        await middleware.aclose()


async def test_request_cancelled_after_require_quota_releases_its_call_with_an_async_resolver() -> None:
    """Auth in a dependency + Depends(require_quota), an async resolver that awaits (a token/DB lookup): a request
    cancelled (timeout, disconnect under a level-triggered cancel scope) after require_quota reserved its call has
    that call settled (it stayed in flight for an hour: 5 such requests locked a 5-call org out)."""
    clock = Clock()
    fake = fresh_fake(clock)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    inside = anyio.Event()

    async def authenticate(request: Request) -> None:
        request.state.org_id = "org_1"

    app = FastAPI()

    @app.get("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def slow() -> dict[str, str]:
        inside.set()
        await anyio.sleep_forever()
        raise AssertionError

    async def resolve_org(scope: dict[str, Any]) -> str | None:
        await anyio.lowlevel.checkpoint()  # e.g. a session lookup
        state = scope.get("state") or {}
        return state.get("org_id")

    async def send(message: dict[str, Any]) -> None:
        pass

    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(app, settings, quota=gate, client=lago, resolve_org=resolve_org)
        try:
            async with anyio.create_task_group() as tasks:
                scopes: list[anyio.CancelScope] = []

                async def request() -> None:
                    with anyio.CancelScope() as scope:
                        scopes.append(scope)
                        await middleware(http_scope(), receive_nothing, send)

                tasks.start_soon(request)
                await inside.wait()
                assert gate.local.reserve_now("org_1", clock.time(), "peek").calls == 1  # reserved by require_quota
                scopes[0].cancel()
        finally:
            await middleware.aclose()
    assert gate.local.reserve_now("org_1", clock.time(), "peek").calls == 0  # released: the request was not billed


async def test_served_request_natively_cancelled_while_sharing_its_first_seen_is_still_billed() -> None:
    """idempotency_header + LAGO_REDIS_URL, Redis slow: the response went out (200), and the task is cancelled
    natively (task.cancel(): uvicorn's graceful-shutdown timeout, asyncio.timeout around the app) while the first
    timestamp is asked of Redis (anyio's shield does not stop a native cancel): the served request is billed."""
    received: list[bytes] = []
    connections: list[asyncio.StreamWriter] = []

    async def hung_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        received.append(await reader.read(100))
        await reader.read()  # never answers

    server = await asyncio.start_server(hung_redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = Clock()
    fake = fresh_fake(clock)
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key="k",
        org_header="X-Org-Id",
        max_retries=0,
        redis_url=f"redis://127.0.0.1:{port}/0",
        api_timeout=10,
    )
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    async with LagoClient(settings, transport=fake.transport()) as lago:
        backend = LocalBackend(QuotaConfig())  # the gate counts in process; only first-seen goes to (hung) Redis
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time, backend=backend)
        gate.settle("org_1", await gate.check("org_1"), tokens=0, billed=False)  # warm: a snapshot, nothing counted
        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", chat)]),
            settings,
            quota=gate,
            client=lago,
            idempotency_header="Idempotency-Key",
        )
        try:
            task = asyncio.get_running_loop().create_task(
                middleware(http_scope((b"x-org-id", b"org_1"), (b"idempotency-key", b"k1")), receive, send)
            )

            async def asking_redis() -> bool:
                return bool(received)

            await until(asking_redis)
            assert sent == ["http.response.start", "http.response.body"]  # served
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await middleware.aclose()
            for writer in connections:
                writer.close()
            server.close()
            await server.wait_closed()
    assert len(fake.events) == 1  # the served request is billed
    assert not backend._orgs["org_1"].counts.i  # and its call recorded, not left in flight


async def test_event_refused_by_a_full_outbox_is_not_counted_against_the_quota() -> None:
    """Memory outbox full: requests go on and the drop is logged once; a dropped request's call is released, not
    counted against the quota nor in stats['billed'] (an org was refused for calls Lago never received)."""
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=50)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        pipeline = EventPipeline(lago, memory_capacity=1, flush_interval=60)
        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", chat)]), settings, quota=gate, client=lago, pipeline=pipeline
        )
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
                for _ in range(4):
                    assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 200
            dropped = pipeline.metrics.dropped
            assert dropped >= 1
            counted = gate.local.reserve_now("org_1", clock.time(), "peek").calls
        finally:
            await middleware.aclose()
    assert counted == 4 - dropped
    assert middleware.stats["billed"] == len(fake.events)
