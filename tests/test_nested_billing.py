"""Two billing middlewares on one request (one around a mounted app, one inside it): billed once, gated once,
whichever of them knows the org first; neither bills what the other one left."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._gate import require_quota
from lago_org_billing._identity import get_current_org

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    """org_a subscribed; the org from request.state.org_id (set by the endpoint's own auth); no quota gate."""
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, quota_mode="off")


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def chat_authenticating(request: Request) -> Response:
    request.state.org_id = "org_a"  # auth inside the endpoint (a FastAPI dependency does the same)
    return JSONResponse({"org": get_current_org(request), "usage": {"total_tokens": 3}})


async def crash_after_auth(request: Request) -> Response:
    request.state.org_id = "org_a"
    raise RuntimeError("the endpoint failed after its auth ran")


@pytest.mark.parametrize("inner_kind", ["excludes the path", "resolves no org"])
async def test_an_inner_middleware_that_bills_nothing_leaves_the_request_to_the_outer_one(
    fake_lago: Any, settings: BillingSettings, inner_kind: str
) -> None:
    """The outer middleware waits for the org (known only in the endpoint); the mounted app's own middleware takes
    the request over but does not bill it (it excludes the path, or its resolvers find no org): the outer one bills
    it, once."""
    inner_options: dict[str, Any] = (
        {"settings": settings.replace(exclude_paths=("/chat",))}
        if inner_kind == "excludes the path"
        else {"settings": settings, "resolve_org": lambda scope: None}
    )
    inner = OrgBillingMiddleware(
        Starlette(routes=[Route("/chat", chat_authenticating)]), transport=fake_lago.transport(), **inner_options
    )
    outer = OrgBillingMiddleware(Starlette(routes=[Mount("/v1", app=inner)]), settings, transport=fake_lago.transport())
    try:
        async with client_for(outer) as client:
            assert (await client.get("/v1/chat")).status_code == 200
    finally:
        await inner.aclose()
        await outer.aclose()
    assert (outer.stats["billed"], inner.stats["billed"]) == (1, 0)
    assert len(fake_lago.events) == 1


async def test_two_waiting_middlewares_bill_a_crashed_request_once(fake_lago: Any, settings: BillingSettings) -> None:
    """Both middlewares wait for the org; the endpoint's auth runs, then it raises before answering, and the error
    goes up through both (nothing answers it in between), billed (bill_server_errors): once, by the inner one."""
    failing = settings.replace(bill_server_errors=True)
    inner = OrgBillingMiddleware(
        Router(routes=[Route("/chat", crash_after_auth)]), failing, transport=fake_lago.transport()
    )
    outer = OrgBillingMiddleware(Router(routes=[Mount("/v1", app=inner)]), failing, transport=fake_lago.transport())
    try:
        async with client_for(outer) as client:
            with pytest.raises(RuntimeError):
                await client.get("/v1/chat")
    finally:
        await inner.aclose()
        await outer.aclose()
    assert inner.stats["billed"] + outer.stats["billed"] == 1
    assert len(fake_lago.events) == 1


async def chat_authenticating_gated(request: Request) -> Response:
    request.state.org_id = "org_1"  # the endpoint's auth, then the quota check it asks for
    await require_quota(request)
    return JSONResponse({"usage": {"total_tokens": 3}})


async def test_an_inner_middleware_excluding_the_path_does_not_disable_require_quota() -> None:
    """The outer middleware (its gate: 2 calls) waits for the org; the endpoint authenticates and calls
    require_quota(). An inner billing middleware excluding the path steps aside: the outer one's require_quota()
    still gates (2 of 4)."""
    from _quota_app import Clock, seed
    from lago_org_billing import LagoClient
    from lago_org_billing._quota import QuotaConfig, QuotaGate
    from lago_org_billing.testing import FakeLago

    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        inner = OrgBillingMiddleware(
            Starlette(routes=[Route("/chat", chat_authenticating_gated)]),
            settings.replace(exclude_paths=("/chat",)),
            quota=None,
            client=lago,
        )
        outer = OrgBillingMiddleware(Starlette(routes=[Mount("/v1", app=inner)]), settings, quota=gate, client=lago)
        async with client_for(outer) as http:
            statuses = [(await http.get("/v1/chat")).status_code for _ in range(4)]
        await inner.aclose()
        await outer.aclose()
    assert statuses == [200, 200, 429, 429]
