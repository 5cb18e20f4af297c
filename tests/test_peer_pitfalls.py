"""The peers' bugs (docs/peers.md: Moesif, LiteLLM, Starlette's BaseHTTPMiddleware...) this package must not repeat.

Each test names the complaint it guards against.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware

ORG = {"X-Org-Id": "org_a"}


async def chat(request: Request) -> Response:
    return JSONResponse({"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    """org_a subscribed; org from X-Org-Id; no quota gate (not what these tests are about); a first retry backoff
    of about a second, so that a batch Lago failed once is still waiting when the server shuts down."""
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        quota_mode="off",
        retry_backoff=1.0,
    )


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


# --------------------------------------------------------------------------------------------------------------------
# Moesif: "No flush: queued events are lost on exit".


def test_mounted_sub_app_flushes_its_events_at_shutdown(fake_lago: Any, settings: BillingSettings) -> None:
    """The middleware on a mounted sub-app (``app.mount("/api", sub_app)``, a common FastAPI layout) never gets the
    lifespan (Starlette does not forward it to mounts): it starts lazily, and is cancelled without ``aclose()`` when
    the server's loop ends. What it holds in memory is delivered then (here after a failed first try)."""
    inner = Starlette(routes=[Route("/chat", chat)])
    inner.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport())
    app = Starlette(routes=[Mount("/api", app=inner)])
    fake_lago.inject_fault(status=503, count=1, path="/api/v1/events/batch")  # Lago hiccups once
    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/api/chat", headers=ORG).status_code == 200
    assert len(fake_lago.events) == 3


def test_failing_app_shutdown_handler_does_not_lose_billing_events(fake_lago: Any, settings: BillingSettings) -> None:
    """The app's own shutdown code raises (a DB pool that fails to close): Starlette answers
    ``lifespan.shutdown.failed``, and the billing events are flushed all the same."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise RuntimeError("closing the database failed")

    app = Starlette(routes=[Route("/chat", chat)], lifespan=lifespan)
    app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport())
    fake_lago.inject_fault(status=503, count=1, path="/api/v1/events/batch")
    with pytest.raises(RuntimeError, match="closing the database failed"):
        with TestClient(app) as client:
            for _ in range(3):
                assert client.get("/chat", headers=ORG).status_code == 200
    assert len(fake_lago.events) == 3


# --------------------------------------------------------------------------------------------------------------------
# BaseHTTPMiddleware-style breakage (Starlette #919/#1525 family): the app's own exceptions must come out unchanged.


@pytest.mark.parametrize("where", ["startup", "shutdown"])
def test_app_lifespan_errors_propagate_unwrapped(fake_lago: Any, settings: BillingSettings, where: str) -> None:
    """The app's own startup or shutdown error comes out as it is, not wrapped in an ExceptionGroup by the
    middleware's task group (which would break ``except RuntimeError`` in the user's code)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if where == "startup":
            raise RuntimeError("app lifespan failed")
        yield
        raise RuntimeError("app lifespan failed")

    app = Starlette(routes=[Route("/chat", chat)], lifespan=lifespan)
    app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport())
    with pytest.raises(RuntimeError, match="app lifespan failed"):
        with TestClient(app):
            pass


# --------------------------------------------------------------------------------------------------------------------
# Starlette #919 / #1525: ContextVar changes not visible.


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


class RequestIdMiddleware:
    """A typical outer middleware keeping the request id in a ContextVar (logging, tracing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request_id.set(dict(scope["headers"]).get(b"x-request-id", b"").decode())
        await self.app(scope, receive, send)


@pytest.mark.anyio
async def test_event_properties_hook_runs_in_the_requests_context(fake_lago: Any, settings: BillingSettings) -> None:
    """The hook computes "extra event properties per request": it runs in the request's context (an outer
    middleware's ContextVar), not later in the delivery task's (which would give every event request 0's id)."""

    def hook(scope: Scope, identity: Any) -> dict[str, Any]:
        return {"request_id": request_id.get()}

    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/chat", chat)]), settings, transport=fake_lago.transport(), event_properties=hook
    )
    try:
        async with client_for(RequestIdMiddleware(middleware)) as client:
            for i in range(3):
                assert (await client.get("/chat", headers={**ORG, "X-Request-Id": f"r-{i}"})).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert sorted(event["properties"]["request_id"] for event in fake_lago.events) == ["r-0", "r-1", "r-2"]


# --------------------------------------------------------------------------------------------------------------------
# "Double counting" (LiteLLM / Lago SDK): one request, one event.


@pytest.mark.anyio
async def test_nested_billing_middlewares_bill_a_request_once(fake_lago: Any, settings: BillingSettings) -> None:
    """The middleware around the app and again around a mounted sub-app (or both ``add_middleware`` and the
    wrapper the README suggests for ``OrgBilling(pipeline=...)``): the outer one bills (and gates) the request, the
    inner one passes it on, says so once and counts it."""
    inner = OrgBillingMiddleware(Starlette(routes=[Route("/chat", chat)]), settings, transport=fake_lago.transport())
    outer = OrgBillingMiddleware(Starlette(routes=[Mount("/v1", app=inner)]), settings, transport=fake_lago.transport())
    try:
        async with client_for(outer) as client:
            assert (await client.get("/v1/chat", headers=ORG)).status_code == 200
        assert await outer.pipeline.flush(5)
    finally:
        await inner.aclose()
        await outer.aclose()
    assert len(fake_lago.events) == 1
    assert (outer.stats["billed"], inner.stats["billed"], inner.stats["nested"]) == (1, 0, 1)


@pytest.mark.anyio
async def test_an_outer_middleware_excluding_a_mount_leaves_it_to_the_inner_one(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """The outer billing middleware excludes /v2, whose mounted app has its own: the inner one bills it (the outer
    one's claim on the request would have left it billed by nobody)."""
    inner = OrgBillingMiddleware(Starlette(routes=[Route("/chat", chat)]), settings, transport=fake_lago.transport())
    outer = OrgBillingMiddleware(
        Starlette(routes=[Mount("/v2", app=inner)]),
        settings.replace(exclude_paths=("/v2",)),
        transport=fake_lago.transport(),
    )
    try:
        async with client_for(outer) as client:
            assert (await client.get("/v2/chat", headers=ORG)).status_code == 200
    finally:
        await inner.aclose()
        await outer.aclose()
    assert (outer.stats["excluded"], inner.stats.get("nested", 0), inner.stats["billed"]) == (1, 0, 1)
    assert len(fake_lago.events) == 1


class _SubAppAuth:
    """A mounted app's own auth, outside its own billing middleware: the org is known from there on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["org_id"] = "org_1"
        await self.app(scope, receive, send)


async def chat_authenticating(request: Request) -> Response:
    request.state.org_id = "org_1"  # auth done by the endpoint itself (a FastAPI dependency would do the same)
    return await chat(request)


@pytest.mark.anyio
@pytest.mark.parametrize("inner_knows_the_org", [True, False])
async def test_an_outer_middleware_waiting_for_the_org_hands_the_request_over(inner_knows_the_org: bool) -> None:
    """The outer billing middleware cannot know the org before the app runs; the mounted app's own billing
    middleware, behind its auth, can: that one gates (limit 2 of 4) and bills, once; the outer one bills nothing
    (both billed, or only the outer one, ungated). When the org is known only inside the endpoint, the inner one
    bills it (late, ungated), once."""
    from _quota_app import Clock, seed
    from lago_org_billing import LagoClient
    from lago_org_billing._quota import QuotaConfig, QuotaGate
    from lago_org_billing.testing import FakeLago

    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gates = [QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time) for _ in range(2)]
        endpoint = chat if inner_knows_the_org else chat_authenticating
        inner = OrgBillingMiddleware(
            Starlette(routes=[Route("/chat", endpoint)]), settings, quota=gates[0], client=lago
        )
        inner_app: ASGIApp = _SubAppAuth(inner) if inner_knows_the_org else inner
        outer = OrgBillingMiddleware(
            Starlette(routes=[Mount("/v1", app=inner_app)]), settings, quota=gates[1], client=lago
        )
        async with client_for(outer) as http:
            statuses = [(await http.get("/v1/chat")).status_code for _ in range(4)]
        await inner.aclose()
        await outer.aclose()
    assert statuses == ([200, 200, 429, 429] if inner_knows_the_org else [200] * 4)
    billed = 2 if inner_knows_the_org else 4
    assert (inner.stats["billed"], outer.stats["billed"], outer.stats["handed_over"]) == (billed, 0, 4)
    assert len(fake.events) == billed
