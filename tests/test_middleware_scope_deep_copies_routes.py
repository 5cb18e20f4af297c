"""Review round 4 of the middleware: the deep copies of the scope it remembers (751fb3b) and what it reads there.

* memory: a deep copy of the scope made once the request is over (a logging middleware around the billing one
  dumping a deep copy of the scope it passed on) was remembered in the billing dict, which the copy refers to: a
  cycle holding the request's scope and its copy until the cyclic collector ran, for every request (org known
  before the app, found only after it, or blocked by the gate);
* routes behind a scope-deep-copying proxy (hypercorn's ``ProxyFixMiddleware``): Starlette's router writes
  ``scope["route"]`` into the copy. Events are billed under their route templates (they were ``<unmatched>``), the
  router's own 404 is neither billed nor counted against the quota, with the default resolvers, custom ones, or an
  org known only after the app; the ``event_properties`` hook reads the copy the app ran on (its route and state);
* the other side: an app without such a proxy whose endpoint deep-copies its scope to dispatch a sub-call to
  another router is still billed under its own route (not the sub-call's).
"""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import httpx
import pytest
from hypercorn.middleware import ProxyFixMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._identity import Identity

pytestmark = pytest.mark.anyio

FORWARDED = {"X-Forwarded-Proto": "https"}


class Marker:
    """Something in the request's state, deep-copied with it (a weak reference tells when a copy is freed)."""


def endpoints(fake_lago: Any) -> list[tuple[str, str, int]]:
    return [
        (e["external_subscription_id"], e["properties"]["endpoint"], e["properties"]["status_code"])
        for e in fake_lago.events
    ]


async def item(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["id"]})


async def item_authenticated(request: Request) -> Response:
    request.state.org_id = "org_a"  # the app's auth, in the endpoint
    return JSONResponse({"id": request.path_params["id"]})


async def run(
    middleware: OrgBillingMiddleware, requests: list[tuple[str, dict[str, str]]], outer: ASGIApp | None = None
) -> list[int]:
    statuses = []
    try:
        app = outer or middleware
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            for path, headers in requests:
                statuses.append((await http.get(path, headers={**FORWARDED, **headers})).status_code)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return statuses


# ------------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("case", ["header org", "org after the app", "blocked"])
async def test_a_deep_copy_made_after_the_request_is_not_kept_in_a_cycle(
    fake_lago: Any, header_settings: BillingSettings, case: str
) -> None:
    """A logging middleware around the billing one deep-copies the scope once the request is over (to log it, or
    queue it): the billing dict in it remembered that copy's memo (the copy, the scope), which refer to it back. With
    the cyclic collector off, the copy was still alive after the logging middleware let it go."""
    freed: list[weakref.ref[Marker]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if case == "org after the app":
            scope["state"]["org_id"] = "org_a"
        await JSONResponse({"ok": True})(scope, receive, send)

    async def logging_middleware(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["marker"] = Marker()
        await middleware(scope, receive, send)
        logged = copy.deepcopy(scope)  # once the request is over
        freed.append(weakref.ref(logged["state"]["marker"]))
        del logged

    settings = header_settings
    headers = {"X-Org-Id": "org_a"}
    if case == "org after the app":
        settings, headers = header_settings.replace(org_header=None, user_header=None), {}
    elif case == "blocked":
        settings = header_settings.replace(quota_mode="enforce", plan_limits={"starter": {"max_api_calls": 0}})
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    gc.collect()
    gc.disable()
    try:
        statuses = await run(middleware, [("/v1/x", headers)], outer=logging_middleware)
        assert [ref() for ref in freed] == [None]
    finally:
        gc.enable()
    assert statuses == [429 if case == "blocked" else 200]


# ------------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize("resolvers", ["default", "custom"])
async def test_routes_behind_a_deep_copying_proxy_are_billed_under_their_templates(
    fake_lago: Any, header_settings: BillingSettings, resolvers: str
) -> None:
    """Org known before the app (the header, or a custom resolver): the route is read from the copy the router
    wrote it in; the router's own 404 is not billed (counted ``unrouted``)."""
    extra: dict[str, Any] = {}
    if resolvers == "custom":

        def org_of(scope: Scope) -> str | None:
            return dict(scope["headers"]).get(b"x-tenant", b"").decode() or None

        extra = {"resolve_org": org_of, "resolve_user": lambda scope: None}
    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/items/{id}", item)]))
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport(), **extra)
    headers = {"X-Org-Id": "org_a", "X-Tenant": "org_a"}
    statuses = await run(middleware, [("/v1/items/1", headers), ("/nope", headers), ("/v1/items/2", headers)])
    assert statuses == [200, 404, 200]
    assert endpoints(fake_lago) == [("org_a", "/v1/items/{id}", 200)] * 2
    assert middleware.stats["unrouted"] == 1


async def test_the_routers_404_behind_a_deep_copying_proxy_is_not_counted_against_the_quota(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An org with one call left probes an unknown path, then calls: the probe (the router's 404) does not take
    the call (it did: the real call was refused with a 429)."""
    settings = header_settings.replace(quota_mode="enforce", plan_limits={"starter": {"max_api_calls": 1}})
    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/items/{id}", item)]))
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    headers = {"X-Org-Id": "org_a"}
    assert await run(middleware, [("/nope", headers), ("/v1/items/1", headers)]) == [404, 200]
    assert endpoints(fake_lago) == [("org_a", "/v1/items/{id}", 200)]


async def test_an_org_found_after_the_app_behind_a_deep_copying_proxy_is_billed_under_its_route(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """No org before the app, the endpoint's auth sets it in the copy's state: billed to it under its template."""
    settings = header_settings.replace(org_header=None, user_header=None)
    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/items/{id}", item_authenticated)]))
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    assert await run(middleware, [("/v1/items/1", {})]) == [200]
    assert endpoints(fake_lago) == [("org_a", "/v1/items/{id}", 200)]


async def test_the_event_properties_hook_reads_the_scope_the_app_ran_on(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The hook gets the copy the app ran on: its route, its ``request.state`` (it got the middleware's scope,
    where neither is)."""

    async def tagged(request: Request) -> Response:
        request.state.plan_tier = "gold"
        return JSONResponse({})

    def properties(scope: Scope, identity: Identity) -> dict[str, Any]:
        route = scope.get("route")
        return {"route_name": getattr(route, "name", None), "tier": scope.get("state", {}).get("plan_tier")}

    app = ProxyFixMiddleware(Starlette(routes=[Route("/v1/items/{id}", tagged, name="item")]))
    middleware = OrgBillingMiddleware(
        app, settings=header_settings, transport=fake_lago.transport(), event_properties=properties
    )
    assert await run(middleware, [("/v1/items/1", {"X-Org-Id": "org_a"})]) == [200]
    [event] = fake_lago.events
    assert (event["properties"]["route_name"], event["properties"]["tier"]) == ("item", "gold")
    assert event["properties"]["endpoint"] == "/v1/items/{id}"


@pytest.mark.parametrize("proxied", [False, True])
async def test_an_endpoint_dispatching_a_deep_copy_of_its_scope_is_billed_under_its_own_route(
    fake_lago: Any, header_settings: BillingSettings, proxied: bool
) -> None:
    """The endpoint deep-copies its scope and sends it to another router (a sub-call), with or without a proxy fix
    around the app. The request is the endpoint's: billed under ``/v1/proxy/{id}``, not the sub-call's route (the
    latest copy a router ran on)."""
    inner = Router(routes=[Route("/internal/{id}", item)])

    async def forwarding(request: Request) -> Response:
        routing = ("app", "router", "route", "endpoint", "path_params")  # (the app itself is not deep-copied)
        sub = copy.deepcopy({key: value for key, value in request.scope.items() if key not in routing})
        sub["path"] = "/internal/1"
        sent: list[Any] = []

        async def collect(message: Any) -> None:
            sent.append(message)

        await inner(sub, request.receive, collect)
        return JSONResponse({"forwarded": sent[0]["status"]})

    app: ASGIApp = Starlette(routes=[Route("/v1/proxy/{id}", forwarding)])
    if proxied:
        app = ProxyFixMiddleware(app)
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    assert await run(middleware, [("/v1/proxy/9", {"X-Org-Id": "org_a"})]) == [200]
    assert endpoints(fake_lago) == [("org_a", "/v1/proxy/{id}", 200)]
