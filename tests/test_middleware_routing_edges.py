"""The routing policy, checked again: answers no endpoint produced are not billed, everything else is.

Holes looked for both ways: an endpoint's (or a mounted app's) own answer taken for the routing's and not billed, a
routing answer still billed; the gate's answers through the app's CORS middleware; one outcome per request.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from test_middleware_routing_answers import HEADERS, endpoints, serve

pytestmark = pytest.mark.anyio


def fastapi_with_static_in_router(fastapi: Any, directory: Any) -> Any:
    """A FastAPI app serving files from a ``StaticFiles`` mounted in an ``APIRouter`` it includes under ``/r``."""
    router = fastapi.APIRouter()
    router.mount("/static", StaticFiles(directory=str(directory)))
    router.mount("/{tenant}/files", StaticFiles(directory=str(directory)))
    app = fastapi.FastAPI()
    app.include_router(router, prefix="/r")
    return app


@pytest.mark.parametrize("mounted_in", [None, "fastapi", "starlette"])
async def test_a_static_files_mount_in_an_included_router_is_billed_as_the_mount(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Any, mounted_in: str | None
) -> None:
    """``router.mount("/static", StaticFiles(...))`` then ``app.include_router(router, prefix="/r")``: a missing file's
    404 is the mounted app's answer (README: "a mounted app's (StaticFiles) ... are billed"), but it was taken for the
    routing's and not billed (FastAPI leaves no ``scope["route"]`` for it), and the files it served were billed as
    ``<unmatched>``. Both are billed under the mount, ``/r/static/{path}``, at the top and with the app mounted in
    another one; an unknown path next to it is still the routing's."""
    fastapi = pytest.importorskip("fastapi")
    (tmp_path / "a.txt").write_text("a")
    app = fastapi_with_static_in_router(fastapi, tmp_path)
    prefix = ""
    if mounted_in == "fastapi":
        parent = fastapi.FastAPI()
        parent.mount("/sub", app)
        app, prefix = parent, "/sub"
    elif mounted_in == "starlette":
        app, prefix = Starlette(routes=[Mount("/sub", app=app)]), "/sub"
    requests = [
        ("GET", f"{prefix}/r/static/a.txt"),
        ("GET", f"{prefix}/r/static/missing.js"),
        ("GET", f"{prefix}/r/t1/files/missing.js"),
        ("GET", f"{prefix}/r/nope"),
    ]
    middleware, responses = await serve(app, header_settings, fake_lago, requests)
    assert [r.status_code for r in responses] == [200, 404, 404, 404]
    assert endpoints(fake_lago) == [
        (f"{prefix}/r/static/{{path}}", 200),
        (f"{prefix}/r/static/{{path}}", 404),
        (f"{prefix}/r/{{tenant}}/files/{{path}}", 404),
    ]
    assert middleware.stats["billed"] == 3 and middleware.stats["unrouted"] == 1


# --------------------------------------------------------------------------------------------------------------------
# Quota: an unrouted request's reserved call is released, with the Redis backend too; idempotency keys.


def redis_billing(header_settings: BillingSettings, fake_lago: Any, redis_url: str) -> OrgBillingMiddleware:
    """The billing middleware around ``routes()``, its gate on Redis (a prefix of its own), one call allowed."""
    import uuid

    from lago_org_billing import QuotaConfig
    from test_middleware_routing_answers import quota_settings, routes

    return OrgBillingMiddleware(
        Starlette(routes=routes()),
        settings=quota_settings(header_settings, 1).replace(redis_url=redis_url),
        transport=fake_lago.transport(),
        quota_config=QuotaConfig(redis_prefix=f"t{uuid.uuid4().hex[:8]}:"),
        idempotency_header="idempotency-key",
    )


async def test_unrouted_requests_release_their_call_in_redis(
    fake_lago: Any, header_settings: BillingSettings, redis_url: str
) -> None:
    """With the quota gate on Redis (one call left): unknown paths, slash redirects and 405s do not use it up (their
    reserved calls released there, once the gate's writer has written them), and with an idempotency key none of
    them is remembered as seen (the call is no retry)."""
    middleware = redis_billing(header_settings, fake_lago, redis_url)
    headers = {**HEADERS, "Idempotency-Key": "k1"}
    statuses = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for method, url in [("GET", "/wp-admin"), ("POST", "/v1/chat/"), ("DELETE", "/v1/chat")] * 2 + [
                ("POST", "/v1/chat"),
                ("POST", "/v1/chat"),
            ]:
                statuses.append((await http.request(method, url, headers=headers, json={"q": 1})).status_code)
                await middleware.quota.backend.flush()  # type: ignore[union-attr]
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert statuses == [404, 307, 405] * 2 + [200, 429]
    assert endpoints(fake_lago) == [("/v1/chat", 200)]
    stats = middleware.stats
    assert (stats["requests"], stats["unrouted"], stats["billed"], stats["blocked"]) == (8, 6, 1, 1)
    assert stats.get("idempotent_retries", 0) == 0


async def test_a_followed_slash_redirect_leaves_the_call_to_the_call_in_redis(
    fake_lago: Any, header_settings: BillingSettings, redis_url: str
) -> None:
    """``POST /v1/chat/`` -> 307 -> ``POST /v1/chat`` with one call left and the gate on Redis: the 307's reserved
    call is released, but only by the gate's background writer; the call that follows at once is checked first,
    sees the 307's call still in flight and is refused 429 (in process it is 200)."""
    middleware = redis_billing(header_settings, fake_lago, redis_url)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=middleware), base_url="http://t", follow_redirects=True
        ) as http:
            response = await http.post("/v1/chat/", headers=HEADERS, json={"q": 1})
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert [r.status_code for r in response.history] == [307]
    assert response.status_code == 200


# --------------------------------------------------------------------------------------------------------------------
# The gate's answers through a copy of the app's CORSMiddleware.


async def gate_answers(app: Any, billing: OrgBillingMiddleware | None, origin: str, **kwargs: Any) -> httpx.Response:
    """An over-quota org's call from a browser page at ``origin``."""
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await http.post("/v1/chat", headers={**HEADERS, "Origin": origin, "Cookie": "s=1"}, **kwargs)
    finally:
        if billing is None:
            billing = app.middleware_stack
            while not isinstance(billing, OrgBillingMiddleware):
                billing = billing.app
        await billing.aclose()


@pytest.mark.parametrize(
    ("cors", "origin", "expected"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "https://a.example", "https://a.example"),
        ({"allow_origins": ["*"]}, "https://a.example", "*"),
        ({"allow_origin_regex": r"https://.*\.example"}, "https://b.example", "https://b.example"),
        ({"allow_origins": ["https://a.example"]}, "https://evil.test", None),
    ],
)
async def test_the_gates_answer_carries_what_the_apps_cors_gives(
    fake_lago: Any, header_settings: BillingSettings, cors: dict[str, Any], origin: str, expected: str | None
) -> None:
    """Credentials, origin regexes, a disallowed origin: the 429 carries what the app's CORSMiddleware gives its own
    answers to that origin, nothing more (an origin it does not allow gets no Access-Control-Allow-Origin)."""
    from starlette.middleware.cors import CORSMiddleware

    from test_middleware_routing_answers import quota_settings, routes

    app = Starlette(routes=routes())
    app.add_middleware(CORSMiddleware, allow_methods=["*"], allow_headers=["*"], expose_headers=["Retry-After"], **cors)
    app.add_middleware(
        OrgBillingMiddleware, settings=quota_settings(header_settings, 0), transport=fake_lago.transport()
    )
    response = await gate_answers(app, None, origin)
    assert response.status_code == 429
    assert response.headers.get("access-control-allow-origin") == expected
    credentials = cors.get("allow_credentials") and expected is not None
    assert response.headers.get("access-control-allow-credentials") == ("true" if credentials else None)
    exposed = response.headers.get("access-control-expose-headers", "").split(", ")
    assert exposed[0] == "Retry-After"  # (the app's own first, to any origin, then the gate's headers)
    assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= {name.lower() for name in exposed}


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_the_first_answer_of_a_billing_middleware_around_the_app_carries_its_cors(
    fake_lago: Any, header_settings: BillingSettings, framework: str
) -> None:
    """``OrgBillingMiddleware(app)`` around an app that has a CORSMiddleware, served without a lifespan (mounted in
    another app, a server without one): until a request reached the app its middleware stack is not built, and the
    gate's answers went out without CORS headers."""
    from starlette.middleware.cors import CORSMiddleware

    from test_middleware_routing_answers import quota_settings, routes

    app: Any = Starlette(routes=routes()) if framework == "starlette" else pytest.importorskip("fastapi").FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["https://a.example"])
    billing = OrgBillingMiddleware(app, settings=quota_settings(header_settings, 0), transport=fake_lago.transport())
    response = await gate_answers(billing, billing, "https://a.example")
    assert response.status_code == 429
    assert response.headers.get("access-control-allow-origin") == "https://a.example"
    assert app.middleware_stack is None  # (the app was not built by it)


# --------------------------------------------------------------------------------------------------------------------
# A routing answer still billed: a sub-app mounted inside a middleware of its own.


@pytest.mark.parametrize("under", ["mount", "host"])
async def test_a_wrapped_sub_apps_routing_answers_are_not_billed(
    fake_lago: Any, header_settings: BillingSettings, under: str
) -> None:
    """``Mount("/api", app=CORSMiddleware(api))`` (or a ``Host``): the sub-app's router 404 for an unknown path and its
    slash redirect were billed as a ``/api/{path}`` endpoint (the mount's app has no routes of its own: the wrapper),
    where the same sub-app mounted bare is not billed. Its endpoints and a non-router app so wrapped are billed."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Host
    from starlette.types import Receive, Scope, Send

    from test_middleware_routing_answers import routes

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("no", status_code=404)(scope, receive, send)

    api = GZipMiddleware(CORSMiddleware(Starlette(routes=routes()), allow_origins=["*"]))
    if under == "mount":
        app = Starlette(routes=[Mount("/api", app=api), Mount("/bare", app=GZipMiddleware(bare))])
        base = "http://t/api"
        other = "http://t/bare/x"
        expected = [("/api/v1/chat", 200), ("/api/v1/chats/{chat_id}", 404), ("/bare/{path}", 404)]
    else:
        app = Starlette(routes=[Host("api.example", app=api), Host("bare.example", app=GZipMiddleware(bare))])
        base = "http://api.example"
        other = "http://bare.example/x"
        expected = [("/v1/chat", 200), ("/v1/chats/{chat_id}", 404), ("/{path}", 404)]
    requests = [
        ("GET", f"{base}/nope"),
        ("POST", f"{base}/v1/chat/"),
        ("POST", f"{base}/v1/chat"),
        ("GET", f"{base}/v1/chats/7"),
        ("GET", other),
    ]
    middleware, responses = await serve(app, header_settings, fake_lago, requests)
    assert [r.status_code for r in responses] == [404, 307, 200, 404, 404]
    assert endpoints(fake_lago) == expected
    assert middleware.stats["unrouted"] == 2 and middleware.stats["billed"] == 3
