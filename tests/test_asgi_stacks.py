"""OrgBillingMiddleware inside real-world ASGI stacks: FastAPI's included routers, memoryview bodies, raw ASGI apps,
streams that fail before their first byte."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
USAGE_JSON = b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'


@pytest.fixture
def settings(header_settings: BillingSettings) -> BillingSettings:
    """org_a subscribed; org and user from headers; no quota gate (these tests are about attribution)."""
    return header_settings


async def serve(
    app: Any, settings: BillingSettings, fake_lago: Any, paths: list[str], **kwargs: Any
) -> tuple[list[httpx.Response], OrgBillingMiddleware]:
    """GET each path through the billing middleware around ``app``; every event delivered before it returns."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport(), **kwargs)
    responses = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for path in paths:
                responses.append(await client.get(path, headers=HEADERS))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return responses, middleware


# --------------------------------------------------------------------------------------------------------------------
# FastAPI >= 0.16x keeps included routers as routers (fastapi.routing._IncludedRouter): scope["route"] is the
# APIRoute as its own router declared it, without the include_router() prefix; the prefixed template is only in
# scope["fastapi"]["effective_route_context"].


async def test_fastapi_include_router_prefix_is_part_of_the_endpoint(fake_lago: Any, settings: BillingSettings) -> None:
    """``app.include_router(router, prefix="/v1/chat")``, FastAPI's usual layout: the billed endpoint must be the
    full template ``/v1/chat/{item_id}``. It is ``/{item_id}``, the same for every router included that way, so
    chat and image calls (and their idempotency keys) cannot be told apart in Lago."""
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()
    chat = fastapi.APIRouter()
    images = fastapi.APIRouter(prefix="/images")

    @chat.get("/{item_id}")
    async def get_chat(item_id: str) -> dict[str, Any]:
        return {"usage": {"total_tokens": 3}}

    @images.get("/{item_id}")
    async def get_image(item_id: str) -> dict[str, Any]:
        return {"usage": {"total_tokens": 4}}

    app.include_router(chat, prefix="/v1/chat")
    app.include_router(images, prefix="/v1")
    responses, _ = await serve(app, settings, fake_lago, ["/v1/chat/c1", "/v1/images/i1"])
    assert [r.status_code for r in responses] == [200, 200]
    assert [e["properties"]["endpoint"] for e in fake_lago.events] == ["/v1/chat/{item_id}", "/v1/images/{item_id}"]


async def test_fastapi_nested_included_routers_and_a_mounted_fastapi_app(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """Prefixes add up through routers included in included routers, and inside a FastAPI app mounted under a
    parameterised path; a route declared on the app itself keeps its own path."""
    fastapi = pytest.importorskip("fastapi")
    inner, outer = fastapi.APIRouter(prefix="/b"), fastapi.APIRouter()

    @inner.get("/{x}")
    async def deep(x: str) -> dict[str, Any]:
        return {"usage": {"total_tokens": 1}}

    outer.include_router(inner, prefix="/a")
    sub = fastapi.FastAPI()
    sub.include_router(outer, prefix="/v2")
    app = fastapi.FastAPI()
    app.include_router(outer, prefix="/v1")

    @app.get("/direct/{y}")
    async def direct(y: str) -> dict[str, Any]:
        return {"usage": {"total_tokens": 2}}

    app.mount("/tenants/{tenant}", sub)
    paths = ["/v1/a/b/1", "/direct/2", "/tenants/t1/v2/a/b/3"]
    responses, _ = await serve(app, settings, fake_lago, paths)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [e["properties"]["endpoint"] for e in fake_lago.events] == [
        "/v1/a/b/{x}",
        "/direct/{y}",
        "/tenants/{tenant}/v2/a/b/{x}",
    ]


async def test_fastapi_starlette_route_in_an_included_router_is_not_unmatched(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """A plain Starlette route in an APIRouter (``router.add_route``), included with a prefix, answers 200 but is
    billed as ``<unmatched>`` (the endpoint value of 404s): FastAPI leaves no ``scope["route"]`` for it."""
    fastapi = pytest.importorskip("fastapi")

    async def legacy(request: Request) -> Response:
        return Response(USAGE_JSON, media_type="application/json")

    router = fastapi.APIRouter()
    router.add_route("/legacy/{item_id}", legacy)
    app = fastapi.FastAPI()
    app.include_router(router, prefix="/v1")
    responses, _ = await serve(app, settings, fake_lago, ["/v1/legacy/1"])
    assert responses[0].status_code == 200
    [event] = fake_lago.events
    assert event["properties"]["endpoint"] == "/v1/legacy/{item_id}"
    assert event["properties"]["total_tokens"] == 18


async def test_fastapi_mount_in_an_included_router_bills_its_template_not_the_concrete_path(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """``router.mount("/files/{bucket}", sub_app)`` included with ``prefix="/v1"``: the mount's concrete prefix is not
    found among the app's mounts (the included router is not a ``Mount``), so each bucket id goes into the endpoint
    (``/v1/files/b1/objects/{key}``): unbounded endpoint values in Lago, path ids (maybe secrets) in events."""
    fastapi = pytest.importorskip("fastapi")

    async def get_object(request: Request) -> Response:
        return Response(USAGE_JSON, media_type="application/json")

    router = fastapi.APIRouter()
    router.mount("/files/{bucket}", Starlette(routes=[Route("/objects/{key}", get_object)]))
    app = fastapi.FastAPI()
    app.include_router(router, prefix="/v1")
    responses, _ = await serve(app, settings, fake_lago, ["/v1/files/b1/objects/k1", "/v1/files/b2/objects/k2"])
    assert [r.status_code for r in responses] == [200, 200]
    assert {e["properties"]["endpoint"] for e in fake_lago.events} == {"/v1/files/{bucket}/objects/{key}"}


# --------------------------------------------------------------------------------------------------------------------
# Starlette responses send memoryview bodies (Response.render keeps a memoryview; StreamingResponse passes
# ``bytes | memoryview`` chunks on as they are), and servers take them.


async def test_a_memoryview_json_body_is_billed(fake_lago: Any, settings: BillingSettings) -> None:
    """``Response(memoryview(...), media_type="application/json")``: the middleware hands the memoryview over as the
    "JSON body" to read later, ``_build_event`` asserts it is bytes, and the request's event is dead-lettered:
    served, never billed."""

    async def endpoint(request: Request) -> Response:
        return Response(memoryview(USAGE_JSON), media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat", endpoint)])
    responses, middleware = await serve(app, settings, fake_lago, ["/v1/chat"])
    assert responses[0].content == USAGE_JSON
    assert middleware.pipeline.dead_letters() == []
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 18 and event["properties"]["model"] == "gpt-4o-mini"


async def test_a_memoryview_json_stream_is_billed(fake_lago: Any, settings: BillingSettings) -> None:
    """The same with a StreamingResponse of one memoryview chunk (its closing empty chunk is not kept)."""

    async def endpoint(request: Request) -> Response:
        async def chunks() -> AsyncIterator[memoryview]:
            yield memoryview(USAGE_JSON)

        return StreamingResponse(chunks(), media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat", endpoint)])
    _, middleware = await serve(app, settings, fake_lago, ["/v1/chat"])
    assert middleware.pipeline.dead_letters() == []
    assert [e["properties"]["total_tokens"] for e in fake_lago.events] == [18]


async def test_memoryview_event_stream_chunks_are_read(fake_lago: Any, settings: BillingSettings) -> None:
    """An SSE StreamingResponse yielding memoryview chunks: the stream parser calls ``chunk.startswith``, fails
    (logged as an internal error) and bills 0 tokens."""

    async def endpoint(request: Request) -> Response:
        async def chunks() -> AsyncIterator[memoryview]:
            yield memoryview(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
            yield memoryview(b"data: " + USAGE_JSON + b"\n\n")
            yield memoryview(b"data: [DONE]\n\n")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/stream", endpoint)])
    responses, _ = await serve(app, settings, fake_lago, ["/v1/stream"])
    assert responses[0].text.endswith("data: [DONE]\n\n")
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 18 and event["properties"]["model"] == "gpt-4o-mini"


# --------------------------------------------------------------------------------------------------------------------
# ASGI: ``headers`` of http.response.start is an Iterable of pairs, which a generator is.


async def test_response_headers_given_as_a_generator_reach_the_client(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """A raw ASGI app sending its headers as a generator (valid ASGI; uvicorn takes ``list(headers)``): the
    watcher iterates them to read the content type, then forwards the exhausted generator: the client gets no
    headers at all (no Content-Type, no Content-Length, none of the app's)."""

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        headers = {"content-type": "application/json", "x-request-id": "req-1"}
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": ((name.encode(), value.encode()) for name, value in headers.items()),
            }
        )
        await send({"type": "http.response.body", "body": USAGE_JSON})

    app = Starlette(routes=[Mount("/raw", app=raw)])
    responses, _ = await serve(app, settings, fake_lago, ["/raw/"])
    assert responses[0].headers.get("x-request-id") == "req-1"
    assert responses[0].headers.get("content-type") == "application/json"
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 18


# --------------------------------------------------------------------------------------------------------------------
# LAGO_BILL_SERVER_ERRORS=false (the default): "bill responses >= 500 and requests the app crashed on (the customer
# got nothing)" are not billed.


async def test_a_stream_whose_generator_crashes_before_its_first_byte_is_not_billed(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """The usual LLM proxy: ``StreamingResponse(upstream())`` where the upstream call fails inside the generator.
    Starlette has sent the 200 start already, then the app raises; the client gets an empty, broken response. The
    middleware only looks at the status it saw (200) and bills a successful ``api_call`` (quota consumed, status
    200 in Lago), though the app crashed and the customer got nothing."""

    async def endpoint(request: Request) -> Response:
        async def upstream() -> AsyncIterator[bytes]:
            raise RuntimeError("upstream LLM unavailable")
            yield b""  # pragma: no cover

        return StreamingResponse(upstream(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/stream", endpoint)])
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            with pytest.raises(RuntimeError, match="upstream LLM unavailable"):
                await client.get("/v1/stream", headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert fake_lago.events == []
    assert middleware.stats["billed"] == 0 and middleware.stats["unbilled_errors"] == 1


@pytest.mark.parametrize(
    "upstream_error",
    [
        TimeoutError("the upstream model sent no token within 30 s"),  # anyio.fail_after, asyncio.timeout, aiohttp
        ConnectionRefusedError(111, "Connection refused"),  # the upstream host is down (raw sockets, aiohttp)
    ],
    ids=["upstream-timeout", "upstream-refused"],
)
async def test_a_stream_whose_upstream_fails_with_an_oserror_before_its_first_byte_is_not_billed(
    fake_lago: Any, settings: BillingSettings, upstream_error: Exception
) -> None:
    """The LLM proxy of the CHANGELOG entry ("whose upstream failed inside the generator"), with the usual upstream
    failures: a timeout waiting for the first token (``TimeoutError``, what ``anyio.fail_after`` and
    ``asyncio.timeout`` raise) or a refused connection. Both are ``OSError`` subclasses, which ``crashed()`` takes
    for the *client* going away (``_DISCONNECTED``), so the request keeps the 200 of the start message and is
    billed as a successful ``api_call``, though the app crashed and the customer got nothing (a RuntimeError there
    is not billed)."""

    async def endpoint(request: Request) -> Response:
        async def upstream() -> AsyncIterator[bytes]:
            raise upstream_error
            yield b""  # pragma: no cover

        return StreamingResponse(upstream(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/stream", endpoint)])
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            with pytest.raises(type(upstream_error)):
                await client.get("/v1/stream", headers={"X-Org-Id": "org_a", "X-User-Id": "ada"})
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert [e["properties"].get("status_code") for e in fake_lago.events] == [], "billed as a successful call"
    assert middleware.stats["billed"] == 0 and middleware.stats["unbilled_errors"] == 1


async def test_fastapi_frontend_in_an_included_router_is_not_billed_under_an_empty_endpoint(
    fake_lago: Any, settings: BillingSettings, tmp_path: Any
) -> None:
    """FastAPI 0.16x ``router.frontend("/ui", directory=...)`` (static SPA files) in a router included with
    ``prefix="/v1"``: FastAPI leaves no ``scope["route"]`` and an effective route context whose original route is
    the ``_FrontendRouteGroup``, with ``path == ""``. ``_fastapi_route`` takes that context (its path is a str), so
    every request there, a 404 included, is billed under the endpoint ``""`` (``<unmatched>`` before the fix, and
    still for ``app.frontend(...)`` declared on the app)."""
    fastapi = pytest.importorskip("fastapi")
    (tmp_path / "index.html").write_text("<html>app</html>")
    router = fastapi.APIRouter()
    router.frontend("/ui", directory=str(tmp_path))
    app = fastapi.FastAPI()
    app.include_router(router, prefix="/v1")
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    statuses = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for path in ("/v1/ui/index.html", "/v1/ui/deep/missing"):
                response = await client.get(path, headers={"X-Org-Id": "org_a", "X-User-Id": "ada"})
                statuses.append(response.status_code)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert statuses == [200, 404]
    endpoints = [event["properties"]["endpoint"] for event in fake_lago.events]
    assert len(endpoints) == 2 and "" not in endpoints, endpoints
    assert endpoints[1] == "<unmatched>", endpoints
