"""FastAPI's app-wide request body limit (``FastAPI(max_body_size=...)``) and Starlette's
``RequestBodyLimitMiddleware`` added after the billing middleware: both sit outside it. A request declaring a
``Content-Length`` over the limit gets their 413 in place of whatever the app answered, and the send of that answer
raises their signal back through the middleware: that is no crash of the app (a 500) but its answer replaced outside,
billed as the app answered it (an endpoint's 413, once it read the body), and not at all when the routing answered
(a path no route matches), as without the limit."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

body_limit = pytest.importorskip("starlette.middleware.body_limit")
needs_app_limit = pytest.mark.skipif(
    "max_body_size" not in inspect.signature(FastAPI).parameters, reason="FastAPI without max_body_size"
)

LIMIT = 64
ORG = {"X-Org-Id": "org_1"}


@pytest.fixture
def fake() -> FakeLago:
    fake = FakeLago(api_key="k")
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_customer("org_1")
    fake.add_subscription("org_1", "starter")
    return fake


def _installed(app: Any) -> OrgBillingMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    return layer


@asynccontextmanager
async def _served(
    app: Starlette, fake: FakeLago, *, limit_outside: bool = False, **changes: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, org_header="X-Org-Id", **changes)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        app.add_middleware(OrgBillingMiddleware, settings=settings, client=lago)
        if limit_outside:  # (added last: outermost)
            app.add_middleware(body_limit.RequestBodyLimitMiddleware, max_body_size=LIMIT)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", headers=ORG) as http:
            yield http
        middleware = _installed(app)
        assert await middleware.pipeline.flush(5)
        await middleware.aclose()


class Prompt(BaseModel):
    prompt: str


def _fastapi_app(**options: Any) -> FastAPI:
    app = FastAPI(**options)

    @app.post("/v1/chat")
    async def chat(body: Prompt) -> dict[str, int]:
        return {"length": len(body.prompt)}

    @app.post("/v1/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    return app


def _billed(fake: FakeLago) -> list[tuple[str, int]]:
    return [(event["properties"]["endpoint"], event["properties"]["status_code"]) for event in fake.events]


async def _calls(http: httpx.AsyncClient) -> list[int]:
    big = "x" * (2 * LIMIT)
    answers = [
        await http.post("/v1/chat", json={"prompt": "hi"}),
        await http.post("/v1/chat", json={"prompt": big}),  # (Content-Length over the limit)
        await http.post("/v1/raw", content=big.encode()),
        await http.post("/nowhere", content=big.encode()),  # no route: the router's 404, replaced by the 413
    ]
    return [answer.status_code for answer in answers]


@needs_app_limit
@pytest.mark.parametrize("bill_server_errors", [False, True])
async def test_fastapi_max_body_size_413_is_not_a_server_error(fake: FakeLago, bill_server_errors: bool) -> None:
    """A 413 for an oversized body was taken for the app crashing: billed as a 500 under
    ``LAGO_BILL_SERVER_ERRORS=true`` (the path no route matches too, as ``<unmatched>``), counted in
    ``unbilled_errors`` otherwise, while the same 413 to a chunked upload (no ``Content-Length``) was billed 413."""
    app = _fastapi_app(max_body_size=LIMIT)
    async with _served(app, fake, bill_server_errors=bill_server_errors) as http:
        statuses = await _calls(http)
        stats = _installed(app).stats
    assert statuses == [200, 413, 413, 413]
    assert _billed(fake) == [("/v1/chat", 200), ("/v1/chat", 413), ("/v1/raw", 413)]
    assert (stats["billed"], stats["unrouted"], stats["unbilled_errors"]) == (3, 1, 0)


async def test_starlette_body_limit_middleware_outside_the_billing_one(fake: FakeLago) -> None:
    """The same with Starlette's ``RequestBodyLimitMiddleware`` added after the billing middleware, around a
    Starlette app."""

    async def raw(request: Request) -> JSONResponse:
        return JSONResponse({"length": len(await request.body())})

    app = Starlette(routes=[Route("/v1/raw", raw, methods=["POST"]), Route("/v1/chat", raw, methods=["POST"])])
    async with _served(app, fake, limit_outside=True, bill_server_errors=True) as http:
        statuses = await _calls(http)
        stats = _installed(app).stats
    assert statuses == [200, 413, 413, 413]
    assert _billed(fake) == [("/v1/chat", 200), ("/v1/chat", 413), ("/v1/raw", 413)]
    assert (stats["billed"], stats["unrouted"], stats["unbilled_errors"]) == (3, 1, 0)


@needs_app_limit
async def test_the_org_an_auth_dependency_sets_is_billed_the_413(fake: FakeLago) -> None:
    """The org known only once a FastAPI dependency ran (``request.state.org_id``): the 413 its endpoint answered
    when it read the body is billed to that org as such, not taken for a crash (a 500, unbilled)."""

    async def authenticate(request: Request) -> None:
        request.state.org_id = request.headers.get("authorization", "").removeprefix("Bearer ") or None

    app = FastAPI(max_body_size=LIMIT, dependencies=[Depends(authenticate)])

    @app.post("/v1/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    async with _served(app, fake) as http:
        http.headers.pop("X-Org-Id")
        answer = await http.post("/v1/raw", content=b"x" * (2 * LIMIT), headers={"Authorization": "Bearer org_1"})
        stats = _installed(app).stats
    assert answer.status_code == 413
    assert _billed(fake) == [("/v1/raw", 413)]
    assert [event["external_subscription_id"] for event in fake.events] == ["org_1"]
    assert (stats["billed"], stats["unbilled_errors"]) == (1, 0)
