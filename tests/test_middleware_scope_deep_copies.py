"""Review round 2 of the middleware: requests in flight at shutdown, deep-copied scopes, the mount-prefix cache.

Covered here:

* the in-flight count (``_in_flight``) the lifespan shutdown waits on (commit 8b4bb68): balanced on every path
  (a request gated out, unresolved, nested billing middlewares, the same middleware twice in a chain, a failing
  record, a lifespan run twice by a test client), never held by a WebSocket session, and a shutdown with nothing
  in flight does not wait;
* the billing dict under ``SCOPE_KEY`` behind a middleware that deep-copies the scope (hypercorn's
  ``ProxyFixMiddleware``, the real one): ``attribute_usage()`` tokens and ``require_quota()``'s reservation reach
  the middleware (they were written into the copy and lost);
* the caches keyed by a request's concrete path: a ``Mount("/t/{tenant}")`` prefix (``_mount_prefixes``) and, for an
  app without Starlette routing, the raw path as endpoint (the event heads' cache, ``_heads``): a 16 KB value in
  the URL is not kept per entry (10,000 entries: hundreds of MB).
"""

from __future__ import annotations

import copy
from typing import Any

import anyio
import httpx
import pytest
from hypercorn.middleware import ProxyFixMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from lago_org_billing import (
    BillingSettings,
    OrgBillingMiddleware,
    _endpoints,
    attribute_usage,
    get_current_org,
    require_quota,
)
from lago_org_billing._identity import SCOPE_KEY

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
FORWARDED_HTTPS = {"X-Forwarded-Proto": "https"}


def quota_settings(header_settings: BillingSettings, calls: int) -> BillingSettings:
    return header_settings.replace(quota_mode="enforce", plan_limits={"starter": {"max_api_calls": calls}})


async def serve(
    app: Any, settings: BillingSettings, fake_lago: Any, requests: list[tuple[str, str, dict[str, str]]]
) -> tuple[OrgBillingMiddleware, list[httpx.Response]]:
    """Each request through the billing middleware around ``app``, every event delivered before it returns."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    responses = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for method, url, headers in requests:
                responses.append(await http.request(method, url, headers=headers, json={"q": 1}))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return middleware, responses


# ---------------------------------------------------------------------------------------- deep-copied scopes


async def reported(request: Request) -> Response:
    attribute_usage(request, model="m", input_tokens=7, output_tokens=5)
    return JSONResponse({"ok": True, "org": get_current_org(request)})


async def authenticated(request: Request) -> Response:
    request.state.org_id = "org_a"  # auth in the endpoint (a FastAPI dependency)
    await require_quota(request)
    return JSONResponse({"ok": True, "org": get_current_org(request)})


async def test_attribute_usage_behind_hypercorns_proxy_fix_is_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``OrgBillingMiddleware(ProxyFixMiddleware(app))``: hypercorn's proxy fix deep-copies the scope, and with it the
    billing dict: the tokens ``attribute_usage()`` stored went into the copy and the event was sent without them."""
    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/chat", reported, methods=["POST"])]))
    _, responses = await serve(app, header_settings, fake_lago, [("POST", "/v1/chat", {**HEADERS, **FORWARDED_HTTPS})])
    assert [r.status_code for r in responses] == [200]
    assert responses[0].json()["org"] == "org_a"
    [event] = fake_lago.events
    assert (event["properties"]["total_tokens"], event["properties"]["model"]) == (12, "m")


async def test_require_quota_behind_hypercorns_proxy_fix_is_settled_and_refuses_past_the_limit(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """No org before the app, ``require_quota()`` after the app's auth, hypercorn's proxy fix between: the call it
    reserved (on the copy) was neither billed nor settled, the request ended unresolved; with a limit of 2, the
    second call is served and billed, the third refused (429) and not billed."""
    settings = quota_settings(header_settings, 2).replace(org_header=None)
    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/chat", authenticated, methods=["POST"])]))
    middleware, responses = await serve(app, settings, fake_lago, [("POST", "/v1/chat", FORWARDED_HTTPS)] * 3)
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].json()["org"] == "org_a"
    assert middleware.stats["unresolved"] == 0
    assert middleware.stats["blocked"] == 1
    assert [e["external_subscription_id"] for e in fake_lago.events] == ["org_a", "org_a"]


async def test_the_billing_dict_is_shared_by_copies_of_the_scope(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """What an app sees under ``SCOPE_KEY`` is the middleware's own dict, whether the scope was copied shallowly,
    deeply, or not at all; its values (and the rest of the scope) are not shared by a deep copy's other entries."""
    seen: list[tuple[bool, bool, bool]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        billing = scope[SCOPE_KEY]
        deep, shallow = copy.deepcopy(scope), copy.copy(scope)
        seen.append((deep[SCOPE_KEY] is billing, shallow[SCOPE_KEY] is billing, deep["headers"] is scope["headers"]))
        await PlainTextResponse("ok")(scope, receive, send)

    await serve(app, header_settings, fake_lago, [("GET", "/v1/x", HEADERS)])
    assert seen == [(True, True, False)]


# ----------------------------------------------------------------------------------- caches of concrete paths


async def tenant_chat(request: Request) -> Response:
    return JSONResponse({"ok": True})


def cached_text(cache: dict[Any, Any]) -> int:
    """Characters of the strings a cache holds, keys and values (a path prefix dominates its entries' size)."""

    def size(value: Any) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, tuple):
            return sum(size(item) for item in value)
        return 0

    return sum(size(key) + size(value) for key, value in cache.items())


async def test_long_mount_prefixes_are_not_cached_whole(fake_lago: Any, header_settings: BillingSettings) -> None:
    """``Mount("/t/{tenant}")`` and a 16 KB tenant in the URL (servers accept that long a request line): each
    distinct value was cached whole, 32 KB an entry (prefix as key, template or prefix as value), up to 10,000
    entries: ~300 MB a client can make a worker hold. The endpoint is still the mount's template."""
    app = Starlette(routes=[Mount("/t/{tenant}", routes=[Route("/chat", tenant_chat)])])
    _endpoints._mount_prefixes.clear()
    tenants = [f"{i:04d}" + "x" * 16_000 for i in range(8)]
    _, responses = await serve(app, header_settings, fake_lago, [("GET", f"/t/{t}/chat", HEADERS) for t in tenants])
    assert [r.status_code for r in responses] == [200] * 8
    assert {e["properties"]["endpoint"] for e in fake_lago.events} == {"/t/{tenant}/chat"}
    assert cached_text(_endpoints._mount_prefixes) < 8 * 1024  # (was 8 x 16 KB x 2)
    # short prefixes are still cached (looked up once per value)
    await serve(app, header_settings, fake_lago, [("GET", "/t/acme/chat", HEADERS)])
    assert any(key[1] == "/t/acme" for key in _endpoints._mount_prefixes)


async def test_long_raw_paths_are_not_cached_in_the_event_heads(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An app without Starlette routing is billed with its raw path as endpoint: the JSON head of its events was
    cached per (org, path, method), a 16 KB path kept twice per entry (key and head), up to 10,000 entries. Paths
    are cut to 1,024 characters now (see test_middleware_preflight_shapes_nul_paths_and_ollama_caps): what is cached
    is bounded by that."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("ok")(scope, receive, send)

    paths = [f"/files/{i:04d}" + "x" * 16_000 for i in range(8)]
    middleware, _ = await serve(app, header_settings, fake_lago, [("GET", p, HEADERS) for p in [*paths, "/short"]])
    cut = [path[:1023] + "\u2026" for path in paths]
    assert sorted(e["properties"]["endpoint"] for e in fake_lago.events) == sorted([*cut, "/short"])
    assert cached_text(middleware._heads) < 9 * 2 * 1200
    assert ("org_a", "/short", "GET") in middleware._heads


# ------------------------------------------------------------------------------ requests in flight at shutdown


async def test_the_in_flight_count_is_balanced_on_every_path(fake_lago: Any, header_settings: BillingSettings) -> None:
    """Served, refused by the gate, unresolved (allowed), an app error, a failing record: none leaves a request
    counted, so that the shutdown does not wait ``shutdown_timeout`` for requests that ended long ago."""

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/v1/chat", reported, methods=["POST"]), Route("/v1/boom", boom, methods=["POST"])])
    settings = quota_settings(header_settings, 1)
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport(), shutdown_timeout=30)
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        statuses = [
            (await http.post("/v1/boom", headers=HEADERS)).status_code,  # (not billed: its call released)
            (await http.post("/v1/chat", headers=HEADERS)).status_code,
            (await http.post("/v1/chat", headers=HEADERS)).status_code,  # over quota
            (await http.post("/v1/chat")).status_code,  # unresolved
        ]
        assert statuses == [500, 200, 429, 200]
        assert middleware._in_flight == 0
    with anyio.fail_after(10):  # (30 s of shutdown_timeout: a leaked count would fail here)
        await middleware.aclose()

    middleware = OrgBillingMiddleware(
        app, settings=header_settings, transport=fake_lago.transport(), shutdown_timeout=30
    )

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("record failed")

    middleware._record = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="record failed"):
        await middleware({**transport_scope("/v1/chat"), "headers": [(b"x-org-id", b"org_a")]}, _request, _ignore)
    assert middleware._in_flight == 0
    with anyio.fail_after(10):
        await middleware.aclose()


def transport_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("t", 80),
        "client": ("c", 1),
    }


async def _request() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


async def _ignore(message: Any) -> None:
    pass


async def test_nested_and_repeated_middlewares_leave_nothing_in_flight(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Two billing middlewares (the inner one passes the request on), and one instance twice in the chain (a mounted
    app wrapped in the same middleware): each request is billed once and both counts come back to zero."""
    inner = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", reported, methods=["POST"])]),
        settings=header_settings,
        transport=fake_lago.transport(),
    )
    outer = OrgBillingMiddleware(inner, settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t") as http:
            assert (await http.post("/v1/chat", headers=HEADERS)).status_code == 200
            assert (await http.post("/v1/chat")).status_code == 200  # unresolved in both
        assert (outer._in_flight, inner._in_flight) == (0, 0)
    finally:
        with anyio.fail_after(10):
            await outer.aclose()
            await inner.aclose()
    assert len(fake_lago.events) == 1


def test_a_lifespan_run_twice_and_websockets_leave_nothing_in_flight(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``with TestClient(app)`` twice (the shutdown, then a start again), a WebSocket session between: not counted,
    the second shutdown waits for nothing and each HTTP request is billed once."""

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app = Starlette(routes=[Route("/v1/chat", reported, methods=["POST"]), WebSocketRoute("/ws", echo)])
    middleware = OrgBillingMiddleware(
        app, settings=header_settings, transport=fake_lago.transport(), shutdown_timeout=30
    )
    for _ in range(2):
        with TestClient(middleware) as client:
            assert client.post("/v1/chat", headers=HEADERS).status_code == 200
            with client.websocket_connect("/ws", headers=HEADERS) as websocket:
                assert websocket.receive_text() == "hi"
                assert middleware._in_flight == 0
        assert middleware._in_flight == 0
    assert len(fake_lago.events) == 2
