"""Review round 3 of the middleware: the org an app's auth sets behind a proxy that deep-copies the scope.

Commit e8dd15d shares the billing dict (``scope[SCOPE_KEY]``) with deep copies of the scope (hypercorn's
``ProxyFixMiddleware``, the real one here), but the copy's ``request.state`` is its own: the org an auth in the
endpoint (a FastAPI dependency) set there went unseen by the middleware. Covered here:

* no org before the app, ``request.state.org_id`` set by the app's auth behind the proxy: billed to that org (it
  was counted ``unresolved`` and sent nothing), with the state's user; under asyncio and trio;
* an org claimed in the header before the app, another set by the auth behind the proxy: billed to the
  authenticated one, as without the proxy (the client's claim was billed);
* a failing app whose auth ran behind the proxy: billed per ``bill_server_errors`` to its org;
* what the middleware keeps to find the copies does not outlive the request: the copied scope is freed without
  the cyclic garbage collector, and a logging middleware dumping the scope as JSON (``default=str``) still can;
* the routes the router writes in the copy: events billed under their templates, the router's own 404 not billed.
"""

from __future__ import annotations

import copy
import gc
import json
import weakref
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request as FastAPIRequest
from hypercorn.middleware import ProxyFixMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware, get_current_org
from lago_org_billing._identity import SCOPE_KEY

pytestmark = pytest.mark.anyio

BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
FORWARDED = {"X-Forwarded-Proto": "https"}


async def serve(
    app: Any, settings: BillingSettings, fake_lago: Any, headers: dict[str, str], count: int = 1, **options: Any
) -> tuple[OrgBillingMiddleware, list[httpx.Response]]:
    """``count`` POSTs through the billing middleware (made with ``options``) around ``app``, every event delivered
    before it returns."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport(), **options)
    responses = []
    try:
        transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for _ in range(count):
                responses.append(await http.post("/v1/chat", headers={**FORWARDED, **headers}, json={"q": 1}))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return middleware, responses


async def authenticated(request: Request) -> Response:
    request.state.org_id = "org_a"  # the app's auth, in the endpoint
    request.state.user_id = "ada"
    return JSONResponse({"org": get_current_org(request)})


def proxied_starlette() -> Any:
    return ProxyFixMiddleware(Starlette(routes=[Route("/v1/chat", authenticated, methods=["POST"])]))


def billed(fake_lago: Any) -> list[tuple[str, Any]]:
    return [(e["external_subscription_id"], e["properties"].get("user_id")) for e in fake_lago.events]


@BACKENDS
async def test_an_org_the_auth_sets_behind_a_deep_copying_proxy_is_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """No org header: the org is known only once the endpoint's auth ran, in the copy's ``request.state``. The
    middleware resolved the original scope's state, found nothing and billed nothing (``unresolved``)."""
    settings = header_settings.replace(org_header=None, user_header=None)
    middleware, responses = await serve(proxied_starlette(), settings, fake_lago, {})
    assert [(r.status_code, r.json()) for r in responses] == [(200, {"org": "org_a"})]
    assert middleware.stats["unresolved"] == 0
    assert billed(fake_lago) == [("org_a", "ada")]


async def test_a_fastapi_dependency_behind_a_deep_copying_proxy_is_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The same with the auth in a FastAPI dependency and a custom resolver reading ``request.state``."""

    async def auth(request: FastAPIRequest) -> str:
        request.state.tenant = "org_a"
        return "org_a"

    api = FastAPI()

    @api.post("/v1/chat")
    async def chat(org: str = Depends(auth)) -> dict[str, str]:
        return {"org": org}

    def tenant(scope: Scope) -> str | None:
        state = scope.get("state")
        return state.get("tenant") if isinstance(state, dict) else None

    settings = header_settings.replace(org_header=None, user_header=None)
    middleware, [response] = await serve(ProxyFixMiddleware(api), settings, fake_lago, {}, resolve_org=tenant)
    assert response.json() == {"org": "org_a"}
    assert middleware.stats["unresolved"] == 0
    assert billed(fake_lago) == [("org_a", None)]


async def test_the_authenticated_org_wins_over_the_header_behind_a_deep_copying_proxy(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The client claims org_b in the header; the app's auth says org_a. Without a proxy org_a is billed (the
    state wins, ``stats['reattributed']``); behind hypercorn's proxy fix the client's claim was billed."""
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")
    middleware, responses = await serve(proxied_starlette(), header_settings, fake_lago, {"X-Org-Id": "org_b"})
    assert [(r.status_code, r.json()) for r in responses] == [(200, {"org": "org_a"})]
    assert middleware.stats.get("reattributed") == 1
    assert billed(fake_lago) == [("org_a", "ada")]


async def test_a_failing_app_authenticated_behind_a_deep_copying_proxy_is_billed_per_bill_server_errors(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The endpoint's auth ran, then it failed: with ``bill_server_errors`` on, its 500 is billed to its org."""

    async def failing(request: Request) -> Response:
        request.state.org_id = "org_a"
        raise RuntimeError("boom")

    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/chat", failing, methods=["POST"])]))
    settings = header_settings.replace(org_header=None, user_header=None, bill_server_errors=True)
    middleware, responses = await serve(app, settings, fake_lago, {})
    assert [r.status_code for r in responses] == [500]
    assert middleware.stats["unresolved"] == 0
    assert billed(fake_lago) == [("org_a", None)]


class Marker:
    """Something in the request's state, deep-copied with it (a weak reference tells when its copy is freed)."""


async def test_the_copies_found_do_not_outlive_the_request(fake_lago: Any, header_settings: BillingSettings) -> None:
    """The copy of the scope (and of its state) is freed when the request ends, by reference counting: nothing the
    middleware keeps to find it forms a cycle that only the cyclic collector would free (memory piling up under
    load between collections). A logging middleware around the proxy dumps the scope as JSON meanwhile."""
    copies: list[weakref.ref[Marker]] = []
    dumped: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["org_id"] = "org_a"
        copies.append(weakref.ref(scope["state"]["marker"]))
        await JSONResponse({"ok": True})(scope, receive, send)

    async def logging_middleware(scope: Scope, receive: Receive, send: Send) -> None:
        await proxied(scope, receive, send)
        dumped.append(json.dumps(scope, default=str))

    async def with_marker(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["marker"] = Marker()
        await middleware(scope, receive, send)

    proxied = ProxyFixMiddleware(app)
    settings = header_settings.replace(org_header=None, user_header=None)
    middleware = OrgBillingMiddleware(logging_middleware, settings=settings, transport=fake_lago.transport())
    gc.collect()
    gc.disable()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_marker), base_url="http://t") as http:
            response = await http.post("/v1/chat", headers=FORWARDED, json={})
        assert response.status_code == 200
        assert [ref() for ref in copies] == [None]
    finally:
        gc.enable()
        assert await middleware.pipeline.flush(5)
        await middleware.aclose()
    assert billed(fake_lago) == [("org_a", None)]
    assert len(dumped) == 1 and '"type": "http"' in dumped[0]


async def test_a_copy_of_the_billing_dict_in_the_app_is_still_the_middlewares(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Regression cover of e8dd15d: what the app writes in any copy of the billing dict reaches the middleware."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        copied = copy.deepcopy(scope)
        copied["state"]["org_id"] = "org_a"  # the app's auth, in a copy made by the app itself
        await JSONResponse({"ok": True})(copied, receive, send)

    settings = header_settings.replace(org_header=None, user_header=None)
    _, responses = await serve(app, settings, fake_lago, {})
    assert [r.status_code for r in responses] == [200]
    assert billed(fake_lago) == [("org_a", None)]
    assert SCOPE_KEY == "lago_org_billing"


async def test_nested_billing_middlewares_around_a_deep_copying_proxy_bill_once_and_let_the_copies_go(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Two billing middlewares, neither knowing the org before the app, hypercorn's proxy fix inside both: the inner
    one finds the org the auth set in the copy and bills it, once; the outer one hands it over and, outermost, lets
    the copies go (no cycle left to the collector)."""
    copies: list[weakref.ref[Marker]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["org_id"] = "org_a"
        copies.append(weakref.ref(scope["state"]["marker"]))
        await JSONResponse({"ok": True})(scope, receive, send)

    async def with_marker(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["marker"] = Marker()
        await outer(scope, receive, send)

    settings = header_settings.replace(org_header=None, user_header=None)
    inner = OrgBillingMiddleware(ProxyFixMiddleware(app), settings=settings, transport=fake_lago.transport())
    outer = OrgBillingMiddleware(inner, settings=settings, transport=fake_lago.transport())
    gc.collect()
    gc.disable()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_marker), base_url="http://t") as http:
            response = await http.post("/v1/chat", headers=FORWARDED, json={})
        assert response.status_code == 200
        assert [ref() for ref in copies] == [None]
    finally:
        gc.enable()
        for middleware in (inner, outer):
            assert await middleware.pipeline.flush(5)
            await middleware.aclose()
    assert billed(fake_lago) == [("org_a", None)]
    assert (inner.stats["billed"], outer.stats.get("handed_over"), outer.stats["unresolved"]) == (1, 1, 0)


async def test_routes_behind_a_deep_copying_proxy_are_billed_under_their_templates(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Behind hypercorn's proxy fix, Starlette's router writes ``scope["route"]`` into the copy: every event's
    endpoint was ``<unmatched>`` (per-endpoint charges and filters see one endpoint) and the router's own 404 for a
    path no route serves was billed (and counted against the quota). Without the proxy: ``/v1/items/{id}`` twice,
    the 404 not billed. The copies found at the request's end (``_scope_copies``) hold the route: read there."""

    async def item(request: Request) -> Response:
        return JSONResponse({"id": request.path_params["id"]})

    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/items/{id}", item)]))
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            statuses = [
                (await http.get(path, headers={"X-Org-Id": "org_a"})).status_code
                for path in ("/v1/items/1", "/v1/items/2", "/nope")
            ]
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert statuses == [200, 200, 404]
    assert [e["properties"]["endpoint"] for e in fake_lago.events] == ["/v1/items/{id}", "/v1/items/{id}"]
    assert middleware.stats["unrouted"] == 1
