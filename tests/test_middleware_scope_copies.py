"""The middleware's outer layers: an endpoint's own redirect or 404 stays billed, under its route, when something
between the billing middleware and the app runs the routing on a copy of the scope (a proxy-fix middleware, as
hypercorn's ``ProxyFixMiddleware`` does: the route is read in that copy), an ``HTTPSRedirectMiddleware`` in the
chain included; the ``app.add_middleware`` layout; the gate's exposed headers next to an app exposing ``*``."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from test_middleware_routing_answers import HEADERS, endpoints, quota_settings, routes

pytestmark = pytest.mark.anyio


class CopyingProxyFix:
    """A proxy-fix middleware as hypercorn's ``ProxyFixMiddleware``: the scheme from ``X-Forwarded-Proto``, set on a
    deep copy of the scope (what the app's routing writes there never reaches the middlewares around it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = copy.deepcopy(scope)
            for name, value in scope["headers"]:
                if name == b"x-forwarded-proto":
                    scope["scheme"] = value.decode()
        await self.app(scope, receive, send)


async def download(request: Request) -> Response:
    return RedirectResponse("https://files.example.com/blob/1?sig=abc")  # (a 307, as the https redirect's)


def app_routes() -> list[Any]:
    return [*routes(), Route("/v1/files/{file_id}", download)]


async def call(
    app: ASGIApp, settings: BillingSettings, fake_lago: Any, requests: list[tuple[str, str, dict[str, str]]]
) -> tuple[OrgBillingMiddleware, list[int]]:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    statuses = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for method, url, headers in requests:
                response = await http.request(method, url, headers={**HEADERS, **headers}, json={"q": 1})
                statuses.append(response.status_code)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return middleware, statuses


FORWARDED_HTTPS = {"X-Forwarded-Proto": "https"}


@pytest.mark.parametrize("https_redirect", [True, False])
async def test_endpoint_answers_behind_a_scope_copying_proxy_fix_stay_billed(
    fake_lago: Any, header_settings: BillingSettings, https_redirect: bool
) -> None:
    """``OrgBillingMiddleware(ProxyFix(HTTPSRedirectMiddleware(app)))`` behind a TLS-terminating proxy: the request
    reaches the billing middleware as ``http`` and the app as ``https`` (the proxy fix's copy of the scope). The
    endpoints' own 307 (a download link) and 404 ran and are billed; they were taken for the https redirect / the
    routing's answers (an HTTPSRedirectMiddleware or a router found inside) and billed nothing. The redirect of a
    request that really came over http is still not billed."""
    inner: ASGIApp = Starlette(routes=app_routes())
    if https_redirect:
        inner = HTTPSRedirectMiddleware(inner)
    requests = [
        ("GET", "/v1/files/1", FORWARDED_HTTPS),
        ("GET", "/v1/chats/1", FORWARDED_HTTPS),
        ("POST", "/v1/chat", FORWARDED_HTTPS),
    ]
    if https_redirect:
        requests.append(("GET", "/v1/files/1", {}))  # plain http: the middleware's redirect
    middleware, statuses = await call(CopyingProxyFix(inner), header_settings, fake_lago, requests)
    assert statuses == [307, 404, 200] + ([307] if https_redirect else [])
    # (under their routes, read in the proxy fix's copy of the scope, where the router wrote them)
    assert endpoints(fake_lago) == [("/v1/files/{file_id}", 307), ("/v1/chats/{chat_id}", 404), ("/v1/chat", 200)]
    assert middleware.stats["billed"] == 3
    assert middleware.stats.get("unrouted", 0) == (1 if https_redirect else 0)


async def test_the_endpoints_redirect_is_billed_with_the_https_redirect_in_front(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``OrgBillingMiddleware(HTTPSRedirectMiddleware(app))``, no proxy fix: an https request's endpoint redirect
    (307 to another https URL) is billed under its route; the http request's redirect is not."""
    app = HTTPSRedirectMiddleware(Starlette(routes=app_routes()))
    middleware, statuses = await call(
        app, header_settings, fake_lago, [("GET", "https://t/v1/files/1", {}), ("GET", "http://t/v1/files/1", {})]
    )
    assert statuses == [307, 307]
    assert endpoints(fake_lago) == [("/v1/files/{file_id}", 307)]
    assert middleware.stats["unrouted"] == 1


def test_add_middleware_with_the_https_redirect_inside(fake_lago: Any, header_settings: BillingSettings) -> None:
    """``app.add_middleware(HTTPSRedirectMiddleware)`` then ``app.add_middleware(OrgBillingMiddleware)`` (built by
    Starlette around the inner stack): the http redirect is not billed, the https call's endpoint redirect is."""
    app = Starlette(routes=app_routes())
    app.add_middleware(HTTPSRedirectMiddleware)
    app.add_middleware(OrgBillingMiddleware, settings=header_settings, transport=fake_lago.transport())
    with TestClient(app, base_url="http://t") as client:
        assert client.get("/v1/files/1", headers=HEADERS, follow_redirects=False).status_code == 307
        assert client.get("https://t/v1/files/1", headers=HEADERS, follow_redirects=False).status_code == 307
        assert client.post("https://t/v1/chat", headers=HEADERS, json={}).status_code == 200
    assert endpoints(fake_lago) == [("/v1/files/{file_id}", 307), ("/v1/chat", 200)]


def test_a_cyclic_wrapper_chain_does_not_hang_the_construction(header_settings: BillingSettings) -> None:
    """A wrapper whose ``.app`` leads back to itself (a proxy object): the chain walk ends."""

    class Loop:
        def __init__(self) -> None:
            self.app = self

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
            raise AssertionError

    OrgBillingMiddleware(Loop(), settings=header_settings)


@pytest.mark.parametrize("expose", [["*"], ["retry-after", "RateLimit-Limit"]])
async def test_the_gates_exposed_headers_next_to_the_apps(
    fake_lago: Any, header_settings: BillingSettings, expose: list[str]
) -> None:
    """The app exposes ``*`` (not a wildcard to a credentialed request: the names still listed) or some of the
    gate's names already, in another case: each named once, the app's list first."""
    app = Starlette(routes=routes())
    app.add_middleware(CORSMiddleware, allow_origins=["*"], expose_headers=expose)
    middleware = OrgBillingMiddleware(app, settings=quota_settings(header_settings, 0), transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            blocked = await http.post("/v1/chat", headers={**HEADERS, "Origin": "https://a.example"}, json={})
    finally:
        await middleware.aclose()
    assert blocked.status_code == 429
    exposed = [name.strip() for name in blocked.headers["access-control-expose-headers"].split(",")]
    assert exposed[: len(expose)] == expose
    lowered = [name.lower() for name in exposed]
    assert len(lowered) == len(set(lowered))
    assert {"retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(lowered)


@pytest.mark.parametrize(
    "gated",
    [False, True],
)
async def test_a_scope_deep_copied_inside_does_not_crash_every_request(
    fake_lago: Any, header_settings: BillingSettings, gated: bool
) -> None:
    """``OrgBillingMiddleware(ProxyFixMiddleware(app))`` (hypercorn's proxy fix deep-copies the scope): the billing
    middleware's per-request dict in the scope holds the middleware itself (tasks, clients, locks): every request
    raised ``TypeError: cannot pickle '_asyncio.Task'`` (or a RecursionError) and answered 500."""
    settings = quota_settings(header_settings, 100) if gated else header_settings
    _, statuses = await call(
        CopyingProxyFix(Starlette(routes=app_routes())), settings, fake_lago, [("POST", "/v1/chat", FORWARDED_HTTPS)]
    )
    assert statuses == [200]
    assert endpoints(fake_lago) == [("/v1/chat", 200)]  # (its route read in the copy the router wrote it in)
