"""Answers no endpoint of the app produced are not billed nor counted against the quota.

The routing's own answers: a Starlette/FastAPI router's 404 for an unknown path (at the top, under a ``Mount`` of
routes or a ``Host``), its ``redirect_slashes`` 307 (``/v1/chat/`` -> ``/v1/chat``: the client following it was
billed twice for one call, and an org with one call left got a 429 on the call itself), its 405 for a method the
route does not take, and a redirect a Starlette middleware inside the billing one answers before any route
(``HTTPSRedirectMiddleware``). What endpoints answer (a 404 of theirs, a redirect) is billed as before.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Host, Mount, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from test_asgi_extensions_and_hosts import StarletteBefore17

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
USAGE = {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


async def chat(request: Request) -> Response:
    await request.body()
    return JSONResponse(USAGE)


async def missing(request: Request) -> Response:
    raise HTTPException(404, "no such chat")


async def moved(request: Request) -> Response:
    return RedirectResponse("/v1/chat", status_code=308)


def routes() -> list[Any]:
    inner = [Route("/chat", chat, methods=["POST"]), Mount("/{tenant}", routes=[Route("/x", chat)])]
    return [
        Route("/v1/chat", chat, methods=["POST"]),
        Route("/v1/chats/{chat_id}", missing),
        Route("/v1/old-chat", moved, methods=["POST"]),
        Mount("/v2", routes=inner),
        Host("api.example.com", app=Router([Route("/h/{h}", chat)])),
    ]


def quota_settings(header_settings: BillingSettings, calls: int) -> BillingSettings:
    return header_settings.replace(quota_mode="enforce", plan_limits={"starter": {"max_api_calls": calls}})


async def serve(
    app: ASGIApp, settings: BillingSettings, fake_lago: Any, requests: list[tuple[str, str]], **client: Any
) -> tuple[OrgBillingMiddleware, list[httpx.Response]]:
    """Each (method, url) through the billing middleware around ``app``; every event delivered before it returns."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    responses = []
    try:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", **client) as http:
            for method, url in requests:
                responses.append(await http.request(method, url, headers=HEADERS, json={"q": 1}))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return middleware, responses


def endpoints(fake_lago: Any) -> list[tuple[str, int]]:
    return [(e["properties"]["endpoint"], e["properties"]["status_code"]) for e in fake_lago.events]


@pytest.mark.parametrize("starlette_before_1_7", [False, True])
async def test_a_redirect_slashes_then_the_call_is_one_billed_call(
    fake_lago: Any, header_settings: BillingSettings, starlette_before_1_7: bool
) -> None:
    """``POST /v1/chat/`` -> 307 -> ``POST /v1/chat``: one call, billed once and counted once by the gate (an org with
    one call left got the 307 billed and its call answered 429)."""
    app: ASGIApp = Starlette(routes=routes())
    if starlette_before_1_7:
        app = StarletteBefore17(app)
    middleware, responses = await serve(
        app,
        quota_settings(header_settings, 1),
        fake_lago,
        [("POST", "/v1/chat/")],
        follow_redirects=True,
    )
    assert [r.status_code for r in responses] == [200]
    assert [r.status_code for r in responses[0].history] == [307]
    assert endpoints(fake_lago) == [("/v1/chat", 200)]
    stats = middleware.stats
    assert stats["requests"] == 2 and stats["billed"] == 1 and stats["unrouted"] == 1


@pytest.mark.parametrize("starlette_before_1_7", [False, True])
async def test_the_routings_own_answers_are_neither_billed_nor_counted(
    fake_lago: Any, header_settings: BillingSettings, starlette_before_1_7: bool
) -> None:
    """Unknown paths (404) and slash redirects (307), at the top, under a Mount of routes (billed as a made-up
    ``/v2/{path}`` or ``/v2/{tenant}/{path}`` endpoint) and under a Host, and a method the route does not take
    (405): no event, not counted against the quota (the one call allowed is still there), one outcome each in the
    stats (``unrouted``)."""
    app: ASGIApp = Starlette(routes=routes())
    if starlette_before_1_7:
        app = StarletteBefore17(app)
    requests = [
        ("GET", "/wp-admin"),
        ("POST", "/v1/chat/"),
        ("GET", "/v2/nope"),  # 307: /v2/nope/ would match the tenant mount
        ("POST", "/v2/chat/"),  # 404 inside the tenant mount
        ("GET", "/v2/t1/nope"),
        ("GET", "/v2/t1/x/"),  # 307
        ("GET", "http://api.example.com/h/1/"),  # 307 under a host
        ("GET", "http://api.example.com/nope"),
        ("DELETE", "/v1/chat"),  # 405
        ("POST", "/v1/chat"),  # the call
    ]
    middleware, responses = await serve(app, quota_settings(header_settings, 1), fake_lago, requests)
    assert [r.status_code for r in responses] == [404, 307, 307, 404, 404, 307, 307, 404, 405, 200]
    assert endpoints(fake_lago) == [("/v1/chat", 200)]
    stats = middleware.stats
    assert stats["requests"] == 10 and stats["billed"] == 1 and stats["unrouted"] == 9 and stats["blocked"] == 0


async def test_what_endpoints_answer_is_billed_as_before(fake_lago: Any, header_settings: BillingSettings) -> None:
    """An endpoint's own 404 and redirect, a 404 of an app without Starlette routing, and a HEAD of a GET route run
    the app's code: billed, under their templates."""

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:  # no router: its 404 is its own answer
        await PlainTextResponse("no", status_code=404)(scope, receive, send)

    _, responses = await serve(
        Starlette(routes=[*routes(), Route("/h", chat, methods=["GET"])]),
        header_settings,
        fake_lago,
        [("GET", "/v1/chats/7"), ("POST", "/v1/old-chat"), ("HEAD", "/h"), ("POST", "/v2/chat")],
    )
    assert [r.status_code for r in responses] == [404, 308, 200, 200]
    _, responses = await serve(bare, header_settings, fake_lago, [("GET", "/anything")])
    assert endpoints(fake_lago) == [
        ("/v1/chats/{chat_id}", 404),
        ("/v1/old-chat", 308),
        ("/h", 200),
        ("/v2/chat", 200),
        ("<unmatched>", 404),
    ]


async def test_a_redirect_of_a_middleware_inside_is_not_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``HTTPSRedirectMiddleware`` in the app, inside the billing middleware: its 307 (before any route) was billed
    with the client's raw path as its endpoint, then the call over https again: one call billed twice."""
    app = Starlette(routes=routes(), middleware=[Middleware(HTTPSRedirectMiddleware)])
    middleware, responses = await serve(
        app, header_settings, fake_lago, [("POST", "/v1/chat"), ("POST", "https://t/v1/chat")]
    )
    assert [r.status_code for r in responses] == [307, 200]
    assert endpoints(fake_lago) == [("/v1/chat", 200)]
    assert middleware.stats["unrouted"] == 1 and middleware.stats["billed"] == 1


class FirstSeen:
    """A stand-in for the Redis-shared first timestamps of idempotency keys: records what it is asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def first(self, transaction_id: str, candidate: float) -> float:
        self.asked.append(transaction_id)
        return candidate

    async def forget(self, transaction_id: str, first: float) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_an_unrouted_request_with_an_idempotency_key_asks_redis_nothing(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """With ``idempotency_header`` and Redis, a redirect is not billed, so no first timestamp is stored for it."""
    middleware = OrgBillingMiddleware(
        Starlette(routes=routes()),
        settings=header_settings,
        transport=fake_lago.transport(),
        idempotency_header="Idempotency-Key",
    )
    shared = middleware._shared_first_seen = FirstSeen()  # type: ignore[assignment]
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            headers = {**HEADERS, "Idempotency-Key": "k1"}
            assert (await http.post("/v1/chat/", headers=headers)).status_code == 307
            assert (await http.post("/v1/chat", headers=headers)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert endpoints(fake_lago) == [("/v1/chat", 200)]
    assert len(shared.asked) == 1


async def test_a_starlette_middlewares_answer_is_not_billed_under_the_raw_path(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A Starlette middleware inside the billing one refusing a request before any route (``TrustedHostMiddleware``'s
    400) was billed with the client's raw path as its endpoint: one endpoint per path, secrets in paths sent to Lago.
    It is ``<unmatched>``, as the router's answers without a route."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = Starlette(routes=routes(), middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=["good.example"])])
    _, responses = await serve(app, header_settings, fake_lago, [("POST", "/v1/chats/sk-secret-1")])
    assert [r.status_code for r in responses] == [400]
    assert endpoints(fake_lago) == [("<unmatched>", 400)]


async def test_fastapi_the_routings_answers_are_not_billed_its_frontends_are(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Any
) -> None:
    """FastAPI: an unknown path (404), a slash redirect (307) and a method the route does not take (405), in the app and
    in an included router, are not billed; a missing file of a ``frontend`` (static files, no ``scope["route"]``) is
    its answer, billed as before."""
    fastapi = pytest.importorskip("fastapi")
    (tmp_path / "index.html").write_text("<html>app</html>")
    router = fastapi.APIRouter()
    router.frontend("/ui", directory=str(tmp_path))

    async def item(item_id: str) -> dict[str, Any]:
        return USAGE

    async def chat_endpoint() -> dict[str, Any]:
        return USAGE

    router.add_api_route("/items/{item_id}", item, methods=["POST"])
    app = fastapi.FastAPI()
    app.include_router(router, prefix="/v1")
    app.add_api_route("/chat", chat_endpoint, methods=["POST"])

    requests = [
        ("GET", "/nope"),
        ("POST", "/chat/"),
        ("POST", "/v1/items/1/"),
        ("GET", "/chat"),
        ("DELETE", "/v1/items/1"),
        ("GET", "/v1/ui/index.html"),
        ("GET", "/v1/ui/missing.js"),
        ("POST", "/v1/items/1"),
    ]
    middleware, responses = await serve(app, quota_settings(header_settings, 3), fake_lago, requests)
    assert [r.status_code for r in responses] == [404, 307, 307, 405, 405, 200, 404, 200]
    assert [status for _, status in endpoints(fake_lago)] == [200, 404, 200]
    assert endpoints(fake_lago)[2] == ("/v1/items/{item_id}", 200)
    assert middleware.stats["unrouted"] == 5 and middleware.stats["billed"] == 3


# --------------------------------------------------------------------------------------------------------------------
# CORS: the app's CORSMiddleware inside the billing one (added before it) never saw the gate's answers.

ORIGIN = {"Origin": "https://app.example"}


def cors_inside(settings: BillingSettings, fake_lago: Any) -> Starlette:
    from starlette.middleware.cors import CORSMiddleware

    app = Starlette(routes=routes())
    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport())
    return app


@pytest.mark.parametrize("answer", ["blocked", "unresolved"])
async def test_the_gates_answers_carry_the_apps_cors_headers(
    fake_lago: Any, header_settings: BillingSettings, answer: str
) -> None:
    """``app.add_middleware(CORSMiddleware, ...)`` then ``app.add_middleware(OrgBillingMiddleware)``: preflights pass
    (not billed, not gated), but the 429 of an org over quota (and the 401 of ``LAGO_ON_UNRESOLVED=reject``) went out
    without ``Access-Control-Allow-Origin``: the browser fails the call with a CORS error, and the page never sees
    the 429 nor its ``Retry-After``. They go out through the app's CORS middleware, as its own answers do."""
    settings = quota_settings(header_settings, 0).replace(on_unresolved="reject")
    app = cors_inside(settings, fake_lago)
    preflight = {**ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-org-id"}
    headers = {**ORIGIN, **HEADERS} if answer == "blocked" else ORIGIN
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.options("/v1/chat", headers=preflight)).status_code == 200
        try:
            response = await http.post("/v1/chat", headers=headers)
            plain = await http.post("/v1/chat", headers=HEADERS if answer == "blocked" else {})
        finally:
            billing: Any = app.middleware_stack
            while not isinstance(billing, OrgBillingMiddleware):
                billing = billing.app
            await billing.aclose()
    assert response.status_code == (429 if answer == "blocked" else 401)
    assert response.headers.get("access-control-allow-origin") == "https://app.example"
    assert plain.status_code == response.status_code and "access-control-allow-origin" not in plain.headers
    assert fake_lago.events == []
