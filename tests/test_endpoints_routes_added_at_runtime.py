"""The endpoint of a route added at runtime (``app.add_route()``, ``app.router.routes`` extended after requests were
served), on Starlette before 1.7, whose router leaves no ``scope["route"]``: the route is found from
``scope["endpoint"]``, and the routes serving an endpoint were looked up once and kept."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from test_asgi_extensions_and_hosts import StarletteBefore17
from test_middleware_routing_answers import HEADERS, endpoints

pytestmark = pytest.mark.anyio


async def chat(request: Request) -> Response:
    return JSONResponse({"ok": True})


@pytest.mark.parametrize("added", ["route", "mounted route"])
async def test_a_route_added_at_runtime_with_a_known_endpoint_bills_its_own_template(
    fake_lago: Any, header_settings: BillingSettings, added: str
) -> None:
    """``/a/{x}`` served, then ``/b/{y}`` (or ``/m/{t}/b/{y}``) added with the same endpoint: its calls were billed as
    ``/a/{x}``, the one route the endpoint had when first looked up."""
    app = Starlette(routes=[Route("/a/{x}", chat)])
    middleware = OrgBillingMiddleware(StarletteBefore17(app), settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            assert (await http.get("/a/1", headers=HEADERS)).status_code == 200
            if added == "route":
                app.add_route("/b/{y}", chat)
                url, template = "/b/2", "/b/{y}"
            else:
                app.router.routes.append(Mount("/m/{t}", routes=[Route("/b/{y}", chat)]))
                url, template = "/m/1/b/2", "/m/{t}/b/{y}"
            assert (await http.get(url, headers=HEADERS)).status_code == 200
            assert (await http.get("/a/3", headers=HEADERS)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert endpoints(fake_lago) == [("/a/{x}", 200), (template, 200), ("/a/{x}", 200)]
