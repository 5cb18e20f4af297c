"""An org known only after the app ran is counted ``ungated`` only when billed; a
Starlette middleware between the billing middleware and the app (``HTTPSRedirectMiddleware``,
``TrustedHostMiddleware``) neither gets its redirect billed nor puts the client's raw path in the endpoint label; the
gate's own 429 exposes its ``Retry-After``/``RateLimit-*`` headers to the page through the app's CORS."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from test_middleware_routing_answers import HEADERS, endpoints, quota_settings, routes, serve

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------------------------------------------------
# (1) ungated: only requests actually billed


class LateAuth:
    """An auth middleware inside the app: sets ``request.state.org_id`` from ``X-Auth-Org`` after the billing
    middleware looked (as auth in an endpoint dependency does)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-auth-org":
                    scope.setdefault("state", {})["org_id"] = value.decode()
        await self.app(scope, receive, send)


async def unavailable(request: Request) -> Response:
    return PlainTextResponse("down", status_code=503)


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def test_unbilled_answers_of_a_late_org_are_not_counted_ungated(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The org is known only once the app ran (auth inside it), the gate is on. The router's 404, its slash redirect,
    its 405 and an unbilled 503 bill nothing: they were counted ``stats["ungated"]`` all the same and fired the
    once-logged warning "A request billed to org ... had no org before the app ran" for requests nobody billed."""
    settings = quota_settings(header_settings, 100).replace(org_header=None, user_header=None)
    app = Starlette(
        routes=[Route("/v1/chat", ok, methods=["POST"]), Route("/v1/down", unavailable)],
        middleware=[Middleware(LateAuth)],
    )
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    auth = {"X-Auth-Org": "org_a"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            with caplog.at_level(logging.WARNING, logger="lago_org_billing.middleware"):
                statuses = [
                    (await http.post("/nowhere", headers=auth)).status_code,
                    (await http.post("/v1/chat/", headers=auth)).status_code,
                    (await http.get("/v1/chat", headers=auth)).status_code,
                    (await http.get("/v1/down", headers=auth)).status_code,
                ]
            assert statuses == [404, 307, 405, 503]
            assert middleware.stats["billed"] == 0
            assert middleware.stats["ungated"] == 0
            assert "had no org before the app ran" not in caplog.text
            assert (await http.post("/v1/chat", headers=auth)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert endpoints(fake_lago) == [("/v1/chat", 200)]
    assert middleware.stats["ungated"] == 1 and middleware.stats["billed"] == 1


async def test_an_unbilled_answer_reattributed_late_is_not_counted_ungated(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The org found before the app ran is replaced by the one the app's auth set (``_authenticated_late``): an
    unbilled 503 was counted ``ungated`` for the late org."""
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")
    settings = quota_settings(header_settings, 100)
    app = Starlette(routes=[Route("/v1/down", unavailable)], middleware=[Middleware(LateAuth)])
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            response = await http.get("/v1/down", headers={**HEADERS, "X-Auth-Org": "org_b"})
        assert response.status_code == 503
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert middleware.stats.get("reattributed") == 1 and middleware.stats["billed"] == 0
    assert middleware.stats["ungated"] == 0


# --------------------------------------------------------------------------------------------------------------------
# (2) a Starlette middleware between the billing middleware and the app


async def test_a_https_redirect_around_the_app_is_not_billed(fake_lago: Any, header_settings: BillingSettings) -> None:
    """``OrgBillingMiddleware(HTTPSRedirectMiddleware(app))``: the Starlette app never ran, nothing in the scope shows
    its routing: the 307 was billed under the client's raw path, then the call over https again."""
    app = HTTPSRedirectMiddleware(Starlette(routes=routes()))
    middleware, responses = await serve(
        app, header_settings, fake_lago, [("POST", "/v1/chat"), ("POST", "https://t/v1/chat")]
    )
    assert [r.status_code for r in responses] == [307, 200]
    assert endpoints(fake_lago) == [("/v1/chat", 200)]
    assert middleware.stats["unrouted"] == 1 and middleware.stats["billed"] == 1


async def test_a_https_redirect_of_a_plain_asgi_app_is_not_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Wherever it sits, the redirect is no endpoint's answer: around an app without Starlette routing too."""

    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({"ok": True})(scope, receive, send)

    middleware, responses = await serve(
        HTTPSRedirectMiddleware(plain), header_settings, fake_lago, [("POST", "/x/1"), ("POST", "https://t/x/1")]
    )
    assert [r.status_code for r in responses] == [307, 200]
    assert endpoints(fake_lago) == [("/x/1", 200)]
    assert middleware.stats["unrouted"] == 1


async def test_a_https_redirect_of_a_mounted_app_is_not_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``Mount("/api", app=HTTPSRedirectMiddleware(api))``: the redirect was billed as an ``/api/{path}`` endpoint."""
    app = Starlette(routes=[Mount("/api", app=HTTPSRedirectMiddleware(Starlette(routes=routes())))])
    middleware, responses = await serve(
        app, header_settings, fake_lago, [("POST", "/api/v1/chat"), ("POST", "https://t/api/v1/chat")]
    )
    assert [r.status_code for r in responses] == [307, 200]
    assert endpoints(fake_lago) == [("/api/v1/chat", 200)]
    assert middleware.stats["unrouted"] == 1


async def test_an_answer_before_the_apps_routing_has_no_raw_path_endpoint(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``OrgBillingMiddleware(TrustedHostMiddleware(app))``: its 400 for a host not allowed is billed (as it is with
    the middleware inside the app), but under ``<unmatched>``, not the client's raw path (one endpoint label per
    probed path, a client's ids in the label)."""
    app = TrustedHostMiddleware(Starlette(routes=routes()), allowed_hosts=["api.example.com"])
    middleware, responses = await serve(
        app, header_settings, fake_lago, [("POST", "/v1/chats/secret-id-1"), ("POST", "http://api.example.com/v1/chat")]
    )
    assert [r.status_code for r in responses] == [400, 200]
    assert endpoints(fake_lago) == [("<unmatched>", 400), ("/v1/chat", 200)]
    assert middleware.stats["billed"] == 2 and middleware.stats["unrouted"] == 0


# --------------------------------------------------------------------------------------------------------------------
# (3) the gate's answer exposes its headers to the page


@pytest.mark.parametrize("expose", [None, ["X-Request-Id"]])
async def test_the_gates_429_exposes_its_headers_through_the_apps_cors(
    fake_lago: Any, header_settings: BillingSettings, expose: list[str] | None
) -> None:
    """A browser page reads ``Retry-After`` and ``RateLimit-*`` of a cross-origin answer only if
    ``Access-Control-Expose-Headers`` names them: the gate's 429, sent through the app's CORSMiddleware, exposed only
    what the app's own answers expose (nothing, or its own headers). Only that answer gets them."""
    app = Starlette(routes=routes())
    app.add_middleware(CORSMiddleware, allow_origins=["*"], expose_headers=expose or ())
    middleware = OrgBillingMiddleware(app, settings=quota_settings(header_settings, 1), transport=fake_lago.transport())
    origin = {**HEADERS, "Origin": "https://a.example"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            allowed = await http.post("/v1/chat", headers=origin, json={})
            blocked = await http.post("/v1/chat", headers=origin, json={})
            after = await http.post("/v1/chat", headers=HEADERS, json={})
    finally:
        await middleware.aclose()
    assert (allowed.status_code, blocked.status_code, after.status_code) == (200, 429, 429)
    assert blocked.headers["access-control-allow-origin"] == "*"
    exposed = [name.strip().lower() for name in blocked.headers.get("access-control-expose-headers", "").split(",")]
    assert {"retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(exposed)
    assert "ratelimit-reset" in blocked.headers and "retry-after" in blocked.headers
    if expose:
        assert "x-request-id" in exposed
    assert len(exposed) == len(set(exposed))
    # the app's own answers keep what the app exposes; a request without Origin gets no CORS headers
    assert allowed.headers.get("access-control-expose-headers") == (", ".join(expose) if expose else None)
    assert "access-control-expose-headers" not in after.headers
