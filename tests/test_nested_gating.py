"""Two billing middlewares on one request, and the quota: require_quota() is answered by the middleware that bills the
request, with its own gate, once; one that excludes the path or finds no org lends nothing (gate, resolvers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._gate import require_quota
from lago_org_billing._identity import get_current_org

pytestmark = pytest.mark.anyio


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


class Env:
    """org_1 on a plan of ``calls`` calls; gates on a settable clock; middlewares sharing one client."""

    def __init__(self, calls: int = 2) -> None:
        from _quota_app import Clock, seed
        from lago_org_billing.testing import FakeLago

        self.clock = Clock()
        self.fake = seed(FakeLago(api_key="k", clock=self.clock.now), starter_calls=calls)
        self.settings = BillingSettings(api_url=self.fake.base_url, api_key="k", max_retries=0)
        self.middlewares: list[OrgBillingMiddleware] = []

    def gate(self) -> Any:
        from lago_org_billing._quota import QuotaConfig, QuotaGate

        return QuotaGate(self.settings, self.lago, config=QuotaConfig(), clock=self.clock.time)

    def middleware(self, app: ASGIApp, settings: BillingSettings | None = None, **options: Any) -> OrgBillingMiddleware:
        options.setdefault("quota", None)
        middleware = OrgBillingMiddleware(app, settings or self.settings, client=self.lago, **options)
        self.middlewares.append(middleware)
        return middleware

    async def statuses(self, app: ASGIApp, count: int, path: str = "/v1/chat") -> list[int]:
        async with client_for(app) as http:
            return [(await http.get(path)).status_code for _ in range(count)]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    env = Env()
    async with LagoClient(env.settings, transport=env.fake.transport()) as lago:
        env.lago = lago
        try:
            yield env
        finally:
            for middleware in env.middlewares:
                await middleware.aclose()


async def chat_gated(request: Request) -> Response:
    request.state.org_id = "org_1"  # the endpoint's auth, then the quota check it asks for
    await require_quota(request)
    return JSONResponse({"usage": {"total_tokens": 3}})


async def chat_gated_failing(request: Request) -> Response:
    request.state.org_id = "org_1"
    await require_quota(request)
    return JSONResponse({"error": "upstream failed"}, status_code=500)  # not billed (bill_server_errors off)


async def chat_asking_org(request: Request) -> Response:
    request.state.org_id = "org_1"
    return JSONResponse({"org": get_current_org(request)})


# --------------------------------------------------------------------------------------------------------------------


async def test_inner_middleware_finding_no_org_does_not_disable_require_quota(env: Env) -> None:
    """The outer middleware (gate: 2 calls, org from request.state) waits for the org; the mounted app's middleware
    has a resolver that finds none (another auth scheme) and steps aside. The endpoint authenticates and calls
    require_quota(): the outer one bills every request, and its gate answers 429 after 2 (the inner one's resolver
    was asked, found no org, and nothing was gated)."""
    gate = env.gate()
    inner = env.middleware(Starlette(routes=[Route("/chat", chat_gated)]), resolve_org=lambda scope: None)
    outer = env.middleware(Starlette(routes=[Mount("/v1", app=inner)]), quota=gate)
    assert await env.statuses(outer, 4) == [200, 200, 429, 429]


async def test_inner_middleware_finding_no_org_does_not_hide_the_org_from_get_current_org(env: Env) -> None:
    """Same arrangement without gates: the endpoint authenticates then asks get_current_org(): org_1, which the outer
    middleware bills (only the inner one's resolvers were asked: None)."""
    inner = env.middleware(Starlette(routes=[Route("/chat", chat_asking_org)]), resolve_org=lambda scope: None)
    outer = env.middleware(Starlette(routes=[Mount("/v1", app=inner)]))
    async with client_for(outer) as http:
        response = await http.get("/v1/chat")
    assert outer.stats["billed"] == 1
    assert response.json() == {"org": "org_1"}


@pytest.mark.parametrize("excluding", ["outer", "inner"])
async def test_a_middleware_excluding_the_path_lends_its_gate_to_nobody(env: Env, excluding: str) -> None:
    """A middleware excluding the path ("never billed nor gated") still puts its gate in billing["quota"] before
    the exclusion check, and the other (waiting) middleware's require_quota() used it; no longer:

    * outer excludes /v1 (its gate: 2 calls), inner bills with no gate: require_quota() must gate nothing (all
      200), but the excluded outer's gate answers 429;
    * inner excludes /chat with its own gate, outer (its own gate) bills: the inner, excluded gate is checked, the
      outer's never."""
    outer_gate, inner_gate = env.gate(), env.gate()
    if excluding == "outer":
        inner = env.middleware(Starlette(routes=[Route("/chat", chat_gated)]))
        outer = env.middleware(
            Starlette(routes=[Mount("/v1", app=inner)]),
            env.settings.replace(exclude_paths=("/v1",)),
            quota=outer_gate,
        )
        assert await env.statuses(outer, 4) == [200, 200, 200, 200]
        assert outer_gate.stats["checks"] == 0
    else:
        inner = env.middleware(
            Starlette(routes=[Route("/chat", chat_gated)]),
            env.settings.replace(exclude_paths=("/chat",)),
            quota=inner_gate,
        )
        outer = env.middleware(Starlette(routes=[Mount("/v1", app=inner)]), quota=outer_gate)
        assert await env.statuses(outer, 1) == [200]
        assert outer.stats["billed"] == 1
        assert (outer_gate.stats["checks"], inner_gate.stats["checks"]) == (1, 0)


async def test_require_quota_reservation_is_settled_by_the_gate_that_made_it(env: Env) -> None:
    """Both middlewares wait for the org; only the outer has a gate (2 calls). The endpoint authenticates, calls
    require_quota() (a call reserved on the outer gate) and answers 500, which is not billed: the reservation must
    be released, as with one middleware (all four reach the app). The inner middleware bills the request (it
    resolves the org first) and settles nothing, having no gate: the outer gate's reservations leaked and it answered
    429 to requests that were never billed."""
    gate = env.gate()
    inner = env.middleware(Router(routes=[Route("/chat", chat_gated_failing)]))
    outer = env.middleware(Router(routes=[Mount("/v1", app=inner)]), quota=gate)
    assert await env.statuses(outer, 4) == [500, 500, 500, 500]


class AuthAskingQuota:
    """The outer app's own auth middleware, in front of a mounted sub-app: authenticates, then asks for the quota."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["org_id"] = "org_1"
            await require_quota(Request(scope))
        await self.app(scope, receive, send)


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"total_tokens": 3}})


async def test_a_request_require_quota_gated_is_not_gated_again_by_an_inner_middleware(env: Env) -> None:
    """The outer middleware waits; the outer app's auth middleware authenticates and calls require_quota() (outer
    gate: a call reserved), then the request reaches the mounted app's middleware, which now knows the org and gates
    it again with its own gate. Gated at most once: one check in all (there were two, and the outer gate's
    reservation was never settled, the inner one billing the request)."""
    outer_gate, inner_gate = env.gate(), env.gate()
    inner = env.middleware(Router(routes=[Route("/chat", chat)]), quota=inner_gate)
    outer = env.middleware(Router(routes=[Mount("/v1", app=AuthAskingQuota(inner))]), quota=outer_gate)
    assert await env.statuses(outer, 1) == [200]
    assert outer_gate.stats["checks"] + inner_gate.stats["checks"] == 1


async def test_a_quota_refusal_answered_by_the_inner_middleware_stays_the_inner_ones(env: Env) -> None:
    """Both wait; the inner middleware (gate: 2 calls) around a plain Router, whose endpoint calls require_quota():
    the QuotaExceededError reaches the inner middleware unanswered, which answers the 429 and counts the block (it
    answered without claiming the request, and the outer one claimed it, replaced the answer and counted it)."""
    gate = env.gate()
    inner = env.middleware(Router(routes=[Route("/chat", chat_gated)]), quota=gate)
    outer = env.middleware(Router(routes=[Mount("/v1", app=inner)]))
    assert await env.statuses(outer, 4) == [200, 200, 429, 429]
    assert (inner.stats["blocked"], outer.stats["blocked"]) == (2, 0)
