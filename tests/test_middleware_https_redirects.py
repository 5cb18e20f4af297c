"""The outer layers: the HTTPS redirect told from an endpoint's 307 by its ``Location``, and
the billing dict of a scope deep-copied by a proxy fix inside the middleware."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, attribute_usage, require_quota
from test_middleware_routing_answers import endpoints, quota_settings
from test_middleware_scope_copies import FORWARDED_HTTPS, CopyingProxyFix, app_routes, call

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "url",
    [
        "/v1/files/a%20b",  # a space in a file name
        "/v1/files/r%C3%A9sum%C3%A9.pdf",  # non-ASCII
        "/v1/files/a%3Fb",  # an escaped '?' in a segment
        '/v1/files/1?q={"a":1}|x^y',  # query characters a client sends raw, the redirect escapes
        "/v1/files/1?name=%C3%A9&raw=é",
    ],
)
async def test_the_https_redirect_of_an_escaped_url_is_not_billed(
    fake_lago: Any, header_settings: BillingSettings, url: str
) -> None:
    """``OrgBillingMiddleware(HTTPSRedirectMiddleware(app))``, a plain http call whose path or query the redirect
    percent-encodes (Starlette quotes its Location): the middleware's redirect, not an endpoint's: not billed. It was
    compared with the scope's decoded path and raw query, did not match, and the org paid for a call never served."""
    app = HTTPSRedirectMiddleware(Starlette(routes=app_routes()))
    middleware, statuses = await call(app, header_settings, fake_lago, [("GET", url, {})])
    assert statuses == [307]
    assert endpoints(fake_lago) == []
    assert middleware.stats["unrouted"] == 1


async def test_an_endpoint_redirect_to_an_escaped_url_elsewhere_stays_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The other side: behind a proxy fix (the app sees https), an endpoint's 307 to another https URL whose path
    ends with the request's path in another form is billed, under its route (read in the proxy fix's copy)."""

    async def elsewhere(request: Request) -> Response:
        return RedirectResponse("https://files.example.com/v1/files/a b/more")

    app = HTTPSRedirectMiddleware(Starlette(routes=[Route("/v1/files/{name}", elsewhere)]))
    _, statuses = await call(
        CopyingProxyFix(app), header_settings, fake_lago, [("GET", "/v1/files/a%20b", FORWARDED_HTTPS)]
    )
    assert statuses == [307]
    assert endpoints(fake_lago) == [("/v1/files/{name}", 307)]


async def test_an_endpoints_own_upgrade_to_https_behind_a_proxy_fix_is_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Behind a scope-copying proxy fix, an endpoint answering a 307 to the request's own URL over https (same
    status, same Location as ``HTTPSRedirectMiddleware``'s answer) is told from it by the copy the app ran on: https,
    and routed to the endpoint. Billed under its route (it was taken for the redirect: a documented limit)."""

    async def upgrade(request: Request) -> Response:
        return RedirectResponse(str(request.url.replace(scheme="https")))

    app = HTTPSRedirectMiddleware(Starlette(routes=[Route("/v1/up", upgrade)]))
    middleware, statuses = await call(
        CopyingProxyFix(app), header_settings, fake_lago, [("GET", "/v1/up", FORWARDED_HTTPS)]
    )
    assert statuses == [307]
    assert endpoints(fake_lago) == [("/v1/up", 307)]
    assert middleware.stats.get("unrouted", 0) == 0


async def reported(request: Request) -> Response:
    attribute_usage(request, model="m", input_tokens=7, output_tokens=5)
    return JSONResponse({"ok": True})


async def test_usage_attributed_behind_a_scope_deep_copying_proxy_fix_is_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``OrgBillingMiddleware(ProxyFixMiddleware(app))`` (hypercorn's deep-copies the scope): ``attribute_usage()``
    writes into the copy of the billing dict; the event is sent without the tokens."""
    app = CopyingProxyFix(Starlette(routes=[Route("/v1/chat", reported, methods=["POST"])]))
    _, statuses = await call(app, header_settings, fake_lago, [("POST", "/v1/chat", FORWARDED_HTTPS)])
    assert statuses == [200]
    [event] = fake_lago.events
    assert event["properties"].get("total_tokens") == 12, event["properties"]


async def authenticated(request: Request) -> Response:
    request.state.org_id = "org_a"  # auth in the endpoint (a FastAPI dependency)
    await require_quota(request)
    return JSONResponse({"ok": True})


async def test_require_quota_behind_a_scope_deep_copying_proxy_fix_is_billed_and_settled(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """No org before the app, ``require_quota()`` after the app's auth, a deep-copying proxy fix between: the call
    reserved on the copy was never settled nor billed (the request ended unresolved, the org's quota one call
    short for each such request); with a limit of 1, the second call is refused though none was billed."""
    settings = quota_settings(header_settings, 1).replace(org_header=None)
    app = CopyingProxyFix(Starlette(routes=[Route("/v1/chat", authenticated, methods=["POST"])]))
    middleware, statuses = await call(app, settings, fake_lago, [("POST", "/v1/chat", FORWARDED_HTTPS)])
    assert statuses == [200]
    assert middleware.stats["unresolved"] == 0
    assert [e["external_subscription_id"] for e in fake_lago.events] == ["org_a"]
