"""OrgBillingMiddleware composed with a real app's own middlewares: a Starlette ``BaseHTTPMiddleware`` (what
FastAPI's ``@app.middleware("http")`` decorator adds) inside the billing middleware must not change what a request is
billed as. ``LAGO_BILL_SERVER_ERRORS=false`` (the default) promises that "a stream whose app raised before its first
body byte" counts as a request the app crashed on: not billed (README, the settings table)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}


class ProcessTime(BaseHTTPMiddleware):
    """The Starlette/FastAPI docs' first middleware: a header added to every answer."""

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["X-Process-Time"] = "0.001"
        return response


async def failing_stream(request: Request) -> Response:
    """The usual LLM proxy: the upstream call fails inside the generator, before its first chunk."""

    async def upstream() -> AsyncIterator[bytes]:
        raise RuntimeError("upstream LLM unavailable")
        yield b""  # pragma: no cover

    return StreamingResponse(upstream(), media_type="text/event-stream")


async def bill(app: Any, settings: BillingSettings, fake_lago: Any) -> tuple[httpx.Response, OrgBillingMiddleware]:
    """One GET /v1/stream through the billing middleware around ``app``; app errors answered as a server does."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/v1/stream", headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return response, middleware


async def test_a_stream_failing_before_its_first_byte_behind_a_base_http_middleware_is_not_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A ``BaseHTTPMiddleware`` inside the billing one closes the failed stream itself (an empty last body message)
    and only then re-raises the app's error: the watcher takes that close for the end of a served response, and the
    crash is billed as a successful 200 call (counted against the quota too), though the customer got nothing. Without
    the BaseHTTPMiddleware the same app is (rightly) not billed."""
    app = Starlette(routes=[Route("/v1/stream", failing_stream)], middleware=[Middleware(ProcessTime)])
    response, middleware = await bill(app, header_settings, fake_lago)
    assert response.content == b""  # the customer got nothing
    assert [event["properties"]["status_code"] for event in fake_lago.events] == [], "billed as a successful call"
    assert middleware.stats["billed"] == 0 and middleware.stats["unbilled_errors"] == 1


async def test_a_fastapi_stream_failing_before_its_first_byte_under_an_http_middleware_is_not_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The same through FastAPI's own ``@app.middleware("http")`` (a BaseHTTPMiddleware), with the billing middleware
    added last, outermost, as the README's CORS advice has it."""
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()

    @app.middleware("http")
    async def add_process_time(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["X-Process-Time"] = "0.001"
        return response

    app.add_api_route("/v1/stream", failing_stream, methods=["GET"])
    response, middleware = await bill(app, header_settings, fake_lago)
    assert response.content == b""
    assert fake_lago.events == [], "billed as a successful call"
    assert middleware.stats["billed"] == 0 and middleware.stats["unbilled_errors"] == 1


async def test_an_answer_sent_whole_then_a_failing_background_task_behind_a_base_http_middleware_stays_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The control a fix must keep: a JSON answer that went out whole, then a BackgroundTask that raises, is billed
    as served (with its tokens), BaseHTTPMiddleware or not."""

    def job() -> None:
        raise RuntimeError("background job bug")

    async def endpoint(request: Request) -> Response:
        body = b'{"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'
        return Response(body, media_type="application/json", background=BackgroundTask(job))

    app = Starlette(routes=[Route("/v1/stream", endpoint)], middleware=[Middleware(ProcessTime)])
    response, _middleware = await bill(app, header_settings, fake_lago)
    assert response.status_code == 200
    assert [event["properties"]["total_tokens"] for event in fake_lago.events] == [18]
