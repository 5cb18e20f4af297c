"""OrgBillingMiddleware end to end: ASGI app -> middleware -> pipeline -> Lago emulator."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware
from lago_org_billing._identity import get_current_org

pytestmark = pytest.mark.anyio

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


async def chat(request: Request) -> Response:
    return JSONResponse({"id": dict(request.path_params), "model": "gpt-4o-mini", "usage": USAGE})


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
        yield b'data: {"model": "gpt-4o-mini", "choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def boom(request: Request) -> Response:
    raise RuntimeError("app crashed")


async def whoami(request: Request) -> Response:
    state = request.state
    return JSONResponse(
        {
            "org": get_current_org(request),
            "billing_org": state.billing_org_id,
            "state_org": getattr(state, "org_id", None),
        }
    )


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def echo_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def build_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/chat/{chat_id}", chat, methods=["POST"]),
            Route("/v1/stream", stream),
            Route("/boom", boom),
            Route("/whoami", whoami),
            Route("/health", health),
            Mount("/api", routes=[Route("/items/{item_id}", chat, methods=["POST"])]),
            WebSocketRoute("/ws", echo_ws),
        ]
    )


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    """Settings pointing at the emulator; org and user from headers; /health excluded."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan(
        "starter",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}],
    )
    for org in ("org_a", "org_b"):
        fake_lago.add_subscription(org, "starter", external_id=org)
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        user_header="X-User-Id",
        exclude_paths=("/health",),
        retry_backoff=0.001,
    )


MiddlewareFactory = Callable[..., OrgBillingMiddleware]


@pytest.fixture
async def make_middleware(fake_lago: Any, settings: BillingSettings) -> AsyncIterator[MiddlewareFactory]:
    """Build the middleware around the test app, talking to the emulator in process; closed after the test."""
    made: list[OrgBillingMiddleware] = []

    def make(**kwargs: Any) -> OrgBillingMiddleware:
        kwargs.setdefault("settings", settings)
        middleware = OrgBillingMiddleware(build_app(), transport=fake_lago.transport(), **kwargs)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        await middleware.aclose()


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}


async def test_json_request_is_one_event_with_attribution(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """A JSON response becomes exactly one event with org, user, route template, model and tokens."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        response = await client.post("/v1/chat/c_42", headers=HEADERS)
    assert response.status_code == 200
    assert await middleware.pipeline.flush(5)
    [event] = fake_lago.events
    props = event["properties"]
    assert event["code"] == "api_call" and event["external_subscription_id"] == "org_a"
    assert props["org_id"] == "org_a" and props["user_id"] == "ada"
    assert props["endpoint"] == "/v1/chat/{chat_id}"
    assert props["method"] == "POST" and props["status_code"] == 200
    assert props["model"] == "gpt-4o-mini"
    assert (props["input_tokens"], props["output_tokens"], props["total_tokens"]) == (11, 7, 18)
    assert props["duration_ms"] >= 0


async def test_sse_stream_is_one_event_with_final_usage(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """A server-sent-event stream is passed through whole and billed once with the final chunk's usage."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        response = await client.get("/v1/stream", headers=HEADERS)
    assert response.text.endswith("data: [DONE]\n\n")
    assert await middleware.pipeline.flush(5)
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 18
    assert event["properties"]["endpoint"] == "/v1/stream"


async def test_gzip_middleware_inside_the_billing_one(fake_lago: Any, settings: BillingSettings) -> None:
    """GZipMiddleware added before the billing middleware (so inside it, compressing first): tokens still billed."""
    from starlette.middleware.gzip import GZipMiddleware

    middleware = OrgBillingMiddleware(
        GZipMiddleware(build_app(), minimum_size=1), settings=settings, transport=fake_lago.transport()
    )
    try:
        async with client_for(middleware) as client:
            response = await client.post("/v1/chat/c_1", headers={**HEADERS, "Accept-Encoding": "gzip"})
        assert response.headers["content-encoding"] == "gzip" and response.json()["model"] == "gpt-4o-mini"
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 18 and event["properties"]["model"] == "gpt-4o-mini"


async def test_route_template_without_scope_route(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """Starlette before 1.7 sets no ``scope["route"]`` (its router leaves ``scope["endpoint"]``): a plain Starlette
    app's events still carry the route template, not ``<unmatched>``."""

    class StarletteBefore17:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                scope.pop("route", None)

    middleware = OrgBillingMiddleware(
        StarletteBefore17(build_app()), settings=make_middleware().settings, transport=fake_lago.transport()
    )
    try:
        async with client_for(middleware) as client:
            await client.post("/v1/chat/c_42", headers=HEADERS)
            await client.post("/api/items/77", headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert [e["properties"]["endpoint"] for e in fake_lago.events] == ["/v1/chat/{chat_id}", "/api/items/{item_id}"]


async def test_mounted_route_keeps_prefix(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """Inside a Mount, the endpoint is the mount prefix plus the inner template."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        await client.post("/api/items/77", headers=HEADERS)
    assert await middleware.pipeline.flush(5)
    assert fake_lago.events[0]["properties"]["endpoint"] == "/api/items/{item_id}"


@pytest.mark.parametrize("starlette_before_1_7", [False, True])
def test_mounts_with_parameters_give_their_templates(starlette_before_1_7: bool) -> None:
    """Mounts with path parameters, nested ones too, give their templates, not the values (one endpoint per route,
    not one per project); behind a proxy's root_path as well. Starlette before 1.7 (``starlette>=0.37`` is allowed)
    leaves no ``scope["route"]``: the route is found from ``scope["endpoint"]``, here one endpoint serving three."""
    from lago_org_billing._endpoints import route_template

    seen: list[str] = []

    async def capture(scope: Any, receive: Any, send: Any) -> None:
        root_path = scope.get("root_path", "")
        await app(scope, receive, send)
        if starlette_before_1_7:
            scope.pop("route", None)
        seen.append(route_template(scope, 200, root_path))

    inner = [Route("/chat/{chat_id}", chat, methods=["POST"])]
    app = Starlette(
        routes=[
            Mount("/v1/projects/{project_id}", routes=inner),
            Mount("/v2", routes=[Mount("/teams/{team}", routes=inner), Route("/x", chat, methods=["POST"])]),
        ]
    )
    for root_path in ("", "/proxy"):
        with TestClient(capture, root_path=root_path) as client:
            for path in ("/v1/projects/p1/chat/1", "/v1/projects/p2/chat/2", "/v2/teams/t1/chat/3", "/v2/x"):
                assert client.post(root_path + path).status_code == 200
    assert seen == 2 * [
        "/v1/projects/{project_id}/chat/{chat_id}",
        "/v1/projects/{project_id}/chat/{chat_id}",
        "/v2/teams/{team}/chat/{chat_id}",
        "/v2/x",
    ]


@pytest.mark.parametrize(("bill_server_errors", "expected_events"), [(False, 0), (True, 1)])
async def test_app_errors_follow_the_setting(
    fake_lago: Any, make_middleware: MiddlewareFactory, bill_server_errors: bool, expected_events: int
) -> None:
    """An exception in the app propagates; the 500 is billed only with bill_server_errors."""
    middleware = make_middleware(bill_server_errors=bill_server_errors)
    async with client_for(middleware) as client:
        with pytest.raises(RuntimeError, match="app crashed"):
            await client.get("/boom", headers=HEADERS)
    assert await middleware.pipeline.flush(5)
    assert len(fake_lago.events) == expected_events
    if expected_events:
        assert fake_lago.events[0]["properties"]["status_code"] == 500


async def test_excluded_paths_are_not_billed(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """LAGO_EXCLUDE_PATHS prefixes are neither billed nor resolved."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        assert (await client.get("/health", headers=HEADERS)).text == "ok"
    assert await middleware.pipeline.flush(5)
    assert fake_lago.events == []
    assert middleware.stats["excluded"] == 1


async def test_excluded_paths_are_whole_segments(fake_lago: Any, settings: BillingSettings) -> None:
    """ "/v1/chat" covers "/v1/chat" and "/v1/chat/...", not "/v1/chatter" (a plain string prefix did)."""

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/chat/{id}", ok), Route("/v1/chatter", ok), Route("/v1/chat", ok)])
    middleware = OrgBillingMiddleware(
        app, settings.replace(exclude_paths=("/v1/chat/",)), quota=None, transport=fake_lago.transport()
    )
    async with client_for(middleware) as client:
        for path in ("/v1/chat", "/v1/chat/1", "/v1/chatter"):
            assert (await client.get(path, headers=HEADERS)).status_code == 200
    assert await middleware.pipeline.flush(5)
    assert [event["properties"]["endpoint"] for event in fake_lago.events] == ["/v1/chatter"]
    assert middleware.stats["excluded"] == 2


@pytest.mark.parametrize("given", [("/health ",), ("\t/health\n",), ["/health"], frozenset({" /health/ "})])
async def test_excluded_paths_given_in_code_as_from_env_reads_them(
    fake_lago: Any, settings: BillingSettings, given: Any
) -> None:
    """Blanks around a prefix given in code (a line read from a file, a stray space) are no part of it, as from_env's
    comma-separated form reads them: "/health " excluded nothing, and /health was billed. A list or set is read as
    the tuple it stands for, by the settings and by the middleware's ``exclude_paths`` setter alike."""
    for made in ("settings", "setter"):
        before = len(fake_lago.events)
        if made == "settings":
            middleware = OrgBillingMiddleware(
                build_app(), settings.replace(exclude_paths=given), quota=None, transport=fake_lago.transport()
            )
        else:
            middleware = OrgBillingMiddleware(
                build_app(), settings.replace(exclude_paths=()), quota=None, transport=fake_lago.transport()
            )
            middleware.exclude_paths = given
        assert middleware.exclude_paths == (("/health/",) if isinstance(given, frozenset) else ("/health",))
        async with client_for(middleware) as client:
            assert (await client.get("/health", headers=HEADERS)).status_code == 200
            assert (await client.post("/v1/chat/1", headers=HEADERS)).status_code == 200
        assert await middleware.pipeline.flush(5)
        await middleware.aclose()
        assert [event["properties"]["endpoint"] for event in fake_lago.events[before:]] == ["/v1/chat/{chat_id}"], made
        assert middleware.stats["excluded"] == 1, made


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (("health",), "entry 'health' must start with '/'"),
        (("/ ",), "entry '/ ' would exclude every request"),
        (("/health*",), "is a path prefix, not a pattern"),
        (("/health /metrics",), "holds several prefixes"),
        ("/health", "must be a tuple of path prefixes"),
        ((b"/health",), "entry b'/health' is a bytes"),
    ],
)
def test_excluded_paths_that_are_no_prefix_are_refused_by_the_setter_too(
    settings: BillingSettings, given: Any, said: str
) -> None:
    """The middleware's ``exclude_paths`` setter took anything (a prefix without its '/', a pattern), silently
    matching nothing: it refuses what BillingSettings refuses, with the same words, and keeps what it had."""
    with pytest.raises(ConfigurationError, match=re.escape(said)):
        settings.replace(exclude_paths=given)
    middleware = OrgBillingMiddleware(build_app(), settings, quota=None)
    with pytest.raises(ConfigurationError, match=re.escape(said)):
        middleware.exclude_paths = given
    assert middleware.exclude_paths == ("/health",)


def test_excluded_paths_under_a_root_path(fake_lago: Any, settings: BillingSettings) -> None:
    """Served under a root_path (``uvicorn --root-path /api``: the scope's path is "/api/health"), "/health" is the
    app's path and is excluded; the full path is too."""

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", ok), Route("/ready", ok), Route("/x", ok)])
    middleware = OrgBillingMiddleware(
        app, settings.replace(exclude_paths=("/health", "/api/ready")), quota=None, transport=fake_lago.transport()
    )
    with TestClient(middleware, root_path="/api") as client:
        for path in ("/api/health", "/api/ready", "/api/x"):
            assert client.get(path, headers=HEADERS).status_code == 200
    assert [event["properties"]["endpoint"] for event in fake_lago.events] == ["/x"]
    assert middleware.stats["excluded"] == 2


async def test_missing_org_allowed_unbilled_and_counted(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """Without an org the request is served, not billed, and counted."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        assert (await client.post("/v1/chat/c1")).status_code == 200
    assert await middleware.pipeline.flush(5)
    assert fake_lago.events == []
    assert middleware.stats["unresolved"] == 1


async def test_missing_org_rejected_with_problem_json(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """With on_unresolved='reject' the app is not called and a JSON problem is returned."""
    middleware = make_middleware(on_unresolved="reject", unresolved_status=403)
    async with client_for(middleware) as client:
        response = await client.post("/v1/chat/c1")
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 403
    assert middleware.stats["unresolved"] == 1


def _cors(app: Any) -> Any:
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=["https://app.example"], allow_methods=["*"], allow_headers=["*"])


PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "x-org-id, x-user-id",
}


async def test_cors_preflights_pass_through(fake_lago: Any, settings: BillingSettings) -> None:
    """A browser's CORS preflight (OPTIONS, no credentials, no header values) reaches the CORS middleware behind the
    billing one: it is not rejected as unresolved (a 401 without CORS headers failed every cross-origin call), nor
    billed or counted against the quota when a resolver finds its org (the path here), nor blocked by it. A plain
    OPTIONS request is an API call like any other."""
    strict = settings.replace(
        on_unresolved="reject", quota_mode="enforce", plan_limits={"starter": {"max_api_calls": 1}}
    )
    rejecting = OrgBillingMiddleware(_cors(build_app()), strict, quota=None, transport=fake_lago.transport())
    by_path = OrgBillingMiddleware(
        _cors(build_app()), strict, resolve_org=lambda scope: "org_b", transport=fake_lago.transport()
    )
    try:
        async with client_for(rejecting) as client:
            answer = await client.options("/v1/chat/c1", headers=PREFLIGHT)
            assert answer.status_code == 200, answer.text
            assert answer.headers["access-control-allow-origin"] == "https://app.example"
            assert (await client.options("/v1/chat/c1", headers={"Origin": "https://app.example"})).status_code == 401
        assert rejecting.stats["preflight"] == 1 and rejecting.stats["unresolved"] == 1
        async with client_for(by_path) as client:
            for _ in range(3):
                assert (await client.options("/v1/chat/c1", headers=PREFLIGHT)).status_code == 200
            call = await client.post("/v1/chat/c1", headers={"Origin": "https://app.example"})
            assert call.status_code == 200, call.text  # the one call allowed: no preflight took it
            assert (await client.post("/v1/chat/c2", headers={"Origin": "https://app.example"})).status_code == 429
        assert await by_path.pipeline.flush(5)
        assert [(event["properties"]["method"], event["external_subscription_id"]) for event in fake_lago.events] == [
            ("POST", "org_b")
        ]
        assert by_path.stats["preflight"] == 3 and by_path.stats["requests"] == 2
    finally:
        await rejecting.aclose()
        await by_path.aclose()


async def test_unresolved_and_server_error_policies_come_from_the_settings(
    fake_lago: Any, make_middleware: MiddlewareFactory, settings: BillingSettings
) -> None:
    """LAGO_ON_UNRESOLVED / LAGO_UNRESOLVED_STATUS / LAGO_BILL_SERVER_ERRORS drive the one-line setup; an argument
    given in code wins."""
    strict = settings.replace(on_unresolved="reject", unresolved_status=403, bill_server_errors=True)
    middleware = make_middleware(settings=strict)
    async with client_for(middleware) as client:
        assert (await client.post("/v1/chat/c1")).status_code == 403
        with pytest.raises(RuntimeError, match="app crashed"):
            await client.get("/boom", headers=HEADERS)
    assert await middleware.pipeline.flush(5)
    assert [event["properties"]["status_code"] for event in fake_lago.events] == [500]
    relaxed = make_middleware(settings=strict, on_unresolved="allow", bill_server_errors=False)
    assert relaxed.on_unresolved == "allow" and relaxed.bill_server_errors is False


async def test_org_is_available_downstream(make_middleware: MiddlewareFactory) -> None:
    """The resolved org is on request.state and through get_current_org."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        body = (await client.get("/whoami", headers=HEADERS)).json()
    # request.state.org_id stays your auth layer's: a header-resolved org never passes for an authenticated one
    assert body == {"org": "org_a", "billing_org": "org_a", "state_org": None}


async def test_custom_resolver_and_extra_properties(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """A callable resolver and an event_properties hook are honoured."""

    async def org_from_path(scope: Any) -> str | None:
        return "org_b" if scope["path"].startswith("/v1/chat/") else None

    middleware = make_middleware(resolve_org=org_from_path, event_properties=lambda scope, identity: {"region": "eu"})
    async with client_for(middleware) as client:
        await client.post("/v1/chat/x")
    assert await middleware.pipeline.flush(5)
    [event] = fake_lago.events
    assert event["external_subscription_id"] == "org_b" and event["properties"]["region"] == "eu"


async def test_idempotency_key_is_ignored_unless_enabled(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """By default a client's Idempotency-Key changes nothing: two requests are two events (it cannot buy work
    billed once from an API that does not honour the key)."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        for _ in range(2):
            await client.post("/v1/chat/c1", headers={**HEADERS, "Idempotency-Key": "k-1"})
    assert await middleware.pipeline.flush(5)
    assert len(fake_lago.events) == 2


@pytest.mark.parametrize("event_store", ["postgres", "clickhouse"])
async def test_idempotency_key_bills_a_retried_request_once(
    fake_lago: Any, make_middleware: MiddlewareFactory, event_store: str
) -> None:
    """Opted in: a retried request (same org, route and key) is one transaction_id with the first one's
    timestamp, so Lago keeps one event on either store; the same key on another route is another event."""
    fake_lago.event_store = fake_lago.store.event_store = event_store
    middleware = make_middleware(idempotency_header="Idempotency-Key")
    async with client_for(middleware) as client:
        for path in ("/v1/chat/c1", "/v1/chat/c2", "/api/items/1"):  # a retry (same route), then another route
            await client.post(path, headers={**HEADERS, "Idempotency-Key": "k-1"})
        await client.post("/v1/chat/c1", headers={"X-Org-Id": "org_b", "Idempotency-Key": "k-1"})  # another org
    assert await middleware.pipeline.flush(5)
    events = fake_lago.events
    assert sorted(event["properties"]["endpoint"] for event in events) == [
        "/api/items/{item_id}",
        "/v1/chat/{chat_id}",
        "/v1/chat/{chat_id}",
    ]
    assert len({event["transaction_id"] for event in events}) == 3
    assert middleware.pipeline.stats["duplicates"] == (1 if event_store == "postgres" else 0)


async def test_idempotent_transaction_ids_are_exact_and_secret(
    fake_lago: Any, make_middleware: MiddlewareFactory, settings: BillingSettings
) -> None:
    """Keys differing past 128 characters are different requests (they were cut there: billed once); a route and key
    never read as another route and key ("/v1/chat/c1" + "K" and "/v1/chat" + "c1/K" were one id); and the id is
    keyed by the Lago API key, so that an org admin cannot compute it ahead and record a 0-token event under it
    (``usage/record`` takes any transaction_id) to have the real request dropped as a duplicate."""
    middleware = make_middleware(idempotency_header="Idempotency-Key")
    async with client_for(middleware) as client:
        for n in range(3):
            await client.post("/v1/chat/c1", headers={**HEADERS, "Idempotency-Key": "k" * 128 + str(n)})
    assert await middleware.pipeline.flush(5)
    assert len({event["transaction_id"] for event in fake_lago.events}) == 3
    ids = {
        middleware._idempotent_id("K", "org_a", "POST", "/v1/chat/c1"),
        middleware._idempotent_id("c1/K", "org_a", "POST", "/v1/chat"),
        OrgBillingMiddleware(build_app(), settings.replace(api_key="another"))._idempotent_id(
            "K", "org_a", "POST", "/v1/chat/c1"
        ),
    }
    assert len(ids) == 3 and all(i.startswith("idem_") and len(i) == 37 for i in ids)


def test_idempotent_retry_keeps_the_first_timestamp_and_its_own_duration(settings: BillingSettings) -> None:
    """The event of a retry (same key) carries the first request's transaction id and timestamp, and the retry's
    own duration, not the time since the first attempt (its facts, as ``_record`` takes them: the first timestamp,
    moved on by its own duration; through requests: ``test_idempotency_retries_waiting_in_the_outbox.py``)."""
    middleware = OrgBillingMiddleware(build_app(), settings, idempotency_header="Idempotency-Key", quota=None)
    usage = json.dumps({"usage": USAGE}).encode()
    first = json.loads(
        middleware._build_event(
            ("/v1/chat/{chat_id}", "POST", 200, 100.0, 100.5, "idem_k", "org_a", None, usage, False, None)
        )
    )
    retry = json.loads(
        middleware._build_event(
            ("/v1/chat/{chat_id}", "POST", 200, 100.0, 100.25, "idem_k", "org_a", None, usage, False, None)
        )
    )
    assert retry["transaction_id"] == first["transaction_id"] and retry["timestamp"] == first["timestamp"] == "100.000"
    assert (first["properties"]["duration_ms"], retry["properties"]["duration_ms"]) == (500.0, 250.0)


async def test_many_concurrent_requests_exactly_once(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """250 concurrent requests for two orgs give 250 distinct events in Lago, none lost, none twice."""
    middleware = make_middleware()

    async def call(client: httpx.AsyncClient, i: int) -> None:
        org = "org_a" if i % 2 else "org_b"
        assert (await client.post(f"/v1/chat/{i}", headers={"X-Org-Id": org})).status_code == 200

    async with client_for(middleware) as client, anyio.create_task_group() as tasks:
        for i in range(250):
            tasks.start_soon(call, client, i)
    assert await middleware.pipeline.flush(10)
    ids = [event["transaction_id"] for event in fake_lago.events]
    assert len(ids) == 250 and len(set(ids)) == 250
    usage = fake_lago.usage("org_a", "org_a")["customer_usage"]
    assert float(usage["charges_usage"][0]["units"]) == 125 * 18


async def test_lago_down_then_back_delivers_every_event_once(
    fake_lago: Any, make_middleware: MiddlewareFactory
) -> None:
    """Requests are served while Lago fails; once it is back every event arrives exactly once."""
    fake_lago.inject_fault(status=503, count=4, path="/api/v1/events")
    middleware = make_middleware()
    async with client_for(middleware) as client:
        for i in range(30):
            assert (await client.post(f"/v1/chat/{i}", headers=HEADERS)).status_code == 200
    assert await middleware.pipeline.flush(10)
    ids = [event["transaction_id"] for event in fake_lago.events]
    assert len(ids) == 30 and len(set(ids)) == 30


def test_lifespan_starts_and_shutdown_flushes(fake_lago: Any, settings: BillingSettings) -> None:
    """Through app.add_middleware and the lifespan: events are flushed to Lago on shutdown."""
    app = build_app()
    app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport())
    with TestClient(app) as client:
        for i in range(5):
            client.post(f"/v1/chat/{i}", headers=HEADERS)
        with client.websocket_connect("/ws") as websocket:  # non-http scopes pass through
            assert websocket.receive_text() == "hello"
    assert len(fake_lago.events) == 5


async def test_background_work_failing_once_started_leaves_the_apps_lifespan_alone(
    fake_lago: Any, settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery (or quota) task shares a task group with the app's own lifespan: an error escaping it once
    started (a bug) is logged and counted, and the app's lifespan goes on (it was cancelled: the app's shutdown code
    ran while the server served on, and the server was told the shutdown failed)."""
    import contextlib

    from _lifespan import background_failed, serving_lifespan
    from lago_org_billing import EventPipeline, LagoClient

    crash = anyio.Event()

    class Crashing(EventPipeline):
        async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            await crash.wait()
            raise RuntimeError("a bug in the delivery loop")

    app_lifespan = {"state": "not started"}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        app_lifespan["state"] = "running"
        try:
            yield
        finally:
            app_lifespan["state"] = "ended"

    client = LagoClient(settings, transport=fake_lago.transport())
    middleware = OrgBillingMiddleware(Starlette(lifespan=lifespan), settings, pipeline=Crashing(client), quota=None)
    async with client, serving_lifespan(middleware) as sent:
        with caplog.at_level(logging.ERROR, logger="lago_org_billing.middleware"):
            crash.set()
            await background_failed(middleware)
        assert app_lifespan["state"] == "running" and sent == ["lifespan.startup.complete"]
        assert "background work stopped" in caplog.text
    assert app_lifespan["state"] == "ended" and sent[-1] == "lifespan.shutdown.complete"


def test_without_lifespan_a_loop_ending_tries_once_and_leaves_nothing_behind(
    fake_lago_server: Any, settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Started lazily (TestClient without ``with``: a loop per request), delivery is tried once more when each loop
    ends, within the middleware's shutdown_timeout, and not retried there while Lago fails (an app's test suite run
    without Lago would wait seconds per request); what fails waits for the next loop. Nothing of a loop is reused
    by the next one (its pooled connections were, and failed with "Event loop is closed")."""
    fake_lago = fake_lago_server  # over HTTP: the events' own keep-alive poster, whose connections are a loop's
    middleware = OrgBillingMiddleware(build_app(), settings.replace(api_url=fake_lago.url), shutdown_timeout=0.5)
    assert middleware.pipeline.shutdown_timeout == 0.5
    fake_lago.inject_fault(status=503, count=1_000, path="/api/v1/events/batch")
    client = TestClient(middleware)
    assert client.post("/v1/chat/1", headers=HEADERS).status_code == 200
    posts = [r for r in fake_lago.requests if r.path.endswith("/events/batch")]
    assert len(posts) <= 2 and middleware.pipeline.outbox.unresolved() == 1  # tried, kept for the next loop
    fake_lago.clear_faults()
    for i in range(3):
        assert client.post(f"/v1/chat/{i}", headers=HEADERS).status_code == 200
    anyio.run(middleware.aclose)
    assert len(fake_lago.events) == 4
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_idempotency_keys_in_redis_across_event_loops(
    fake_lago: Any, settings: BillingSettings, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Served without a lifespan (a loop per request), the Redis client of idempotency keys is closed with each loop
    and made anew on the next: no "Redis is unavailable" (its pooled connection belonged to the first loop)."""
    from _quota_app import REDIS_SERVER, redis_server

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with redis_server(tmp_path) as url:
        middleware = OrgBillingMiddleware(
            build_app(), settings.replace(redis_url=url), transport=fake_lago.transport(), idempotency_header="Idem"
        )
        client = TestClient(middleware)
        for i in range(3):
            assert client.post("/v1/chat/1", headers={**HEADERS, "Idem": f"k{i}"}).status_code == 200
    assert "unavailable for idempotency keys" not in caplog.text
    assert len(fake_lago.events) == 3


def test_lazy_mode_with_the_redis_quota_gate_survives_a_second_event_loop(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Served without a lifespan (a TestClient without ``with``: a loop per request) with LAGO_REDIS_URL, the quota
    gate's Redis writer starts again on each loop (its wake-up event was the first loop's: the background work,
    delivery included, failed on every later loop)."""
    from starlette.testclient import TestClient

    from _quota_app import REDIS_SERVER, redis_server, seed
    from lago_org_billing.testing import FakeLago

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    fake = seed(FakeLago(api_key="k"), starter_calls=300)

    async def chat(request: Request) -> Response:
        return JSONResponse({"usage": {"total_tokens": 3}})

    with redis_server(tmp_path) as url:
        settings = BillingSettings(
            api_url=fake.base_url, api_key="k", org_header="X-Org-Id", redis_url=url, quota_mode="enforce"
        )
        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/chat", chat)]), settings, transport=fake.transport(), shutdown_timeout=1
        )
        client = TestClient(middleware)
        statuses = [client.get("/chat", headers={"X-Org-Id": "org_1"}).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert "bound to a different event loop" not in caplog.text
    assert "background work stopped" not in caplog.text
    assert len(fake.events) == 3


def test_app_served_again_after_a_shutdown_keeps_billing(fake_lago: Any, settings: BillingSettings) -> None:
    """One app, two `with TestClient(app)` blocks (a module-level app shared by tests): the second lifespan starts
    a new pipeline (the first was closed at shutdown), and its requests are billed too."""
    app = build_app()
    app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport())
    gates = []
    for round_ in range(2):
        with TestClient(app) as client:
            for i in range(3):
                assert client.post(f"/v1/chat/{round_}-{i}", headers=HEADERS).status_code == 200
            layer = app.middleware_stack
            while not isinstance(layer, OrgBillingMiddleware):
                layer = layer.app
            gates.append(layer.quota)
            assert (
                layer._check_now is not None and layer._check_now.__self__ is layer.quota
            )  # decides with the new gate
            assert layer.quota.stats["checks"] == 3
    assert len(fake_lago.events) == 6 and gates[0] is not gates[1]


async def test_background_work_that_cannot_start_fails_the_request_instead_of_hanging(
    fake_lago: Any, settings: BillingSettings, tmp_path: Any
) -> None:
    """No lifespan and a spool path that cannot be created: the first request gets the reason (it used to hang
    forever), and a later request tries again."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    middleware = OrgBillingMiddleware(
        build_app(), settings.replace(spool_path=str(blocker / "spool.db")), transport=fake_lago.transport()
    )
    with anyio.fail_after(30):  # a guard against the hang this test is about
        async with client_for(middleware) as client:
            for _ in range(2):
                with pytest.raises(ConfigurationError, match="could not start its background delivery"):
                    await client.post("/v1/chat/1", headers=HEADERS)
            failures: list[BaseException] = []

            async def call() -> None:
                try:
                    await client.post("/v1/chat/2", headers=HEADERS)
                except ConfigurationError as exc:
                    failures.append(exc)

            async with anyio.create_task_group() as tasks:  # requests arriving during one start wait for it
                for _ in range(3):
                    tasks.start_soon(call)
    assert len(failures) == 3 and all("could not start" in str(exc) for exc in failures)
    assert middleware._lazy_task is None and not middleware._running


def test_add_middleware_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no arguments the middleware reads LAGO_* from the environment (and needs an API key)."""
    app = Starlette(middleware=[Middleware(OrgBillingMiddleware)])
    with pytest.raises(ConfigurationError, match="LAGO_API_KEY"):
        with TestClient(app):
            pass
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_EXCLUDE_PATHS", "/status")
    middleware = OrgBillingMiddleware(build_app())
    assert middleware.settings.exclude_paths == ("/status",)


_BAD_ENV_APP = """
from starlette.applications import Starlette
from starlette.middleware import Middleware
from lago_org_billing import OrgBillingMiddleware
app = Starlette(middleware=[Middleware(OrgBillingMiddleware)])
"""


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LAGO_API_TIMEOUT", "abc"), ("LAGO_QUOTA_MODE", "bogus"), ("LAGO_PLAN_LIMITS", "{"), ("LAGO_SPOOL_PATH", "")],
)
def test_a_bad_setting_stops_uvicorn_at_startup_with_its_message(tmp_path: Any, variable: str, value: str) -> None:
    """``app.add_middleware(OrgBillingMiddleware)`` is built by Starlette on the lifespan startup: an error raised
    there made uvicorn (lifespan "auto") decide the lifespan was unsupported, serve anyway and fail every request.
    The startup fails instead, with the setting named."""
    (tmp_path / "bad_env_app.py").write_text(_BAD_ENV_APP)
    value = value or str(tmp_path)  # LAGO_SPOOL_PATH: a directory (the spool cannot open; found at startup)
    env = {**os.environ, "LAGO_API_KEY": "k", "LAGO_API_URL": "http://127.0.0.1:9", variable: value}
    run = subprocess.run(
        [sys.executable, "-m", "uvicorn", "bad_env_app:app", "--app-dir", str(tmp_path), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0, run.stderr
    assert "Application startup failed" in run.stderr and variable in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "Uvicorn running" not in run.stderr


def test_a_bad_setting_raises_at_once_where_nothing_would_swallow_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built outside a running app (at import time), the middleware raises the error itself."""
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_API_TIMEOUT", "abc")
    with pytest.raises(ConfigurationError, match="LAGO_API_TIMEOUT"):
        OrgBillingMiddleware(build_app())


async def test_a_bad_argument_raises_at_once_in_async_code_too(fake_lago: Any, settings: BillingSettings) -> None:
    """Only Starlette's lazy build defers the error: an async app factory (or test) gets it at once."""
    with pytest.raises(ConfigurationError, match="on_unresolved"):
        OrgBillingMiddleware(build_app(), settings, on_unresolved="deny")  # type: ignore[arg-type]


async def test_exclude_paths_set_after_construction_apply(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    middleware = make_middleware()
    middleware.exclude_paths = ("/v1/chat",)
    async with client_for(middleware) as client:
        assert (await client.post("/v1/chat/c1", headers=HEADERS)).status_code == 200
    assert middleware.stats["excluded"] == 1


async def test_a_bad_setting_built_in_a_running_app_fails_its_requests_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a lifespan (nothing reports the startup), each request fails with the configuration error."""
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_API_TIMEOUT", "abc")
    app = Starlette(routes=build_app().routes, middleware=[Middleware(OrgBillingMiddleware)])
    async with client_for(app) as client:
        for _ in range(2):
            with pytest.raises(ConfigurationError, match="LAGO_API_TIMEOUT"):
                await client.post("/v1/chat/1", headers=HEADERS)
    layer = app.middleware_stack
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    await layer.aclose()  # nothing to close, and no error of its own


async def test_two_apps_do_not_share_state(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """Two middleware instances have separate pipelines and stats."""
    first, second = make_middleware(), make_middleware()
    async with client_for(first) as client:
        await client.post("/v1/chat/1", headers=HEADERS)
    assert first.pipeline is not second.pipeline
    assert first.stats["billed"] == 1 and second.stats["billed"] == 0


async def test_fastapi_app(fake_lago: Any, settings: BillingSettings) -> None:
    """FastAPI routes are billed with their path template."""
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()

    @app.get("/v1/users/{user_id}/items")
    async def items(user_id: str) -> dict[str, Any]:
        return {"user": user_id, "usage": {"input_tokens": 3, "output_tokens": 4}}

    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    async with client_for(middleware) as client:
        assert (await client.get("/v1/users/u1/items", headers=HEADERS)).status_code == 200
    await middleware.aclose()
    [event] = fake_lago.events
    assert event["properties"]["endpoint"] == "/v1/users/{user_id}/items"
    assert event["properties"]["total_tokens"] == 7


async def test_client_disconnect_mid_stream_is_still_billed(fake_lago: Any, settings: BillingSettings) -> None:
    """A stream cut off by the client produces its event with the usage counted so far."""

    async def anthropic_stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            start = {"type": "message_start", "message": {"model": "claude-haiku", "usage": {"input_tokens": 25}}}
            yield b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n"
            await anyio.sleep_forever()  # the model "thinks" until the client gives up
            yield b""  # pragma: no cover

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/messages", anthropic_stream)])
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    disconnected = anyio.Event()
    sent: list[dict[str, Any]] = []
    received: list[str] = []

    async def receive() -> dict[str, Any]:
        if not received:
            received.append("request")
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            disconnected.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/messages",
        "raw_path": b"/v1/messages",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"x-org-id", b"org_a"), (b"x-user-id", b"ada")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    await middleware(scope, receive, send)
    await middleware.aclose()
    [event] = fake_lago.events
    assert event["properties"]["model"] == "claude-haiku"
    assert event["properties"]["input_tokens"] == 25


async def test_org_set_by_endpoint_dependency_is_billed(fake_lago: Any, settings: BillingSettings) -> None:
    """Auth done inside the endpoint (FastAPI Depends) sets request.state late: the request is still billed, and
    get_current_org(request) in the endpoint sees the org (it answered None: resolved only once the app answered)."""
    fastapi = pytest.importorskip("fastapi")

    def authenticate(request: Request) -> str:
        request.state.org_id = "org_b"
        return "org_b"

    app = fastapi.FastAPI()

    @app.get("/v1/report")
    async def report(request: Request, org: str = fastapi.Depends(authenticate)) -> dict[str, Any]:
        return {"org": org, "billed_to": get_current_org(request)}

    middleware = OrgBillingMiddleware(app, settings=settings.replace(org_header=None), transport=fake_lago.transport())
    async with client_for(middleware) as client:
        assert (await client.get("/v1/report")).json() == {"org": "org_b", "billed_to": "org_b"}
    await middleware.aclose()
    [event] = fake_lago.events
    assert event["external_subscription_id"] == "org_b"
    assert event["properties"]["endpoint"] == "/v1/report"


async def test_unmatched_paths_are_not_billed(fake_lago: Any, make_middleware: MiddlewareFactory) -> None:
    """404s for unknown paths and a redirect_slashes answer are the router's, not an endpoint's: not billed (once
    billed under one endpoint value, never the client's raw, maybe secret-bearing, path), counted as unrouted."""
    middleware = make_middleware()
    async with client_for(middleware) as client:
        for path in ("/wp-admin", "/.env", "/x/y/z"):
            assert (await client.get(path, headers=HEADERS)).status_code == 404
        assert (await client.post("/v1/chat/secret-123/", headers=HEADERS)).status_code == 307
    assert await middleware.pipeline.flush(5)
    assert fake_lago.events == [] and middleware.stats["unrouted"] == 4


def test_mounted_app_endpoint_is_the_mount(tmp_path: Any) -> None:
    """A mounted non-router app (StaticFiles) is reported as '<mount>/{path}', its prefix once."""
    from starlette.staticfiles import StaticFiles

    from lago_org_billing._endpoints import route_template

    (tmp_path / "a.txt").write_text("x")
    seen: dict[str, str] = {}

    async def capture(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)
        seen["endpoint"] = route_template(scope, 200)

    app = Starlette(routes=[Mount("/static", app=StaticFiles(directory=tmp_path))])
    with TestClient(capture) as client:
        assert client.get("/static/a.txt").text == "x"
    assert seen["endpoint"] == "/static/{path}"


@pytest.mark.parametrize("spool", [False, True])
async def test_event_that_cannot_be_built_goes_to_dead_letters(
    fake_lago: Any, settings: BillingSettings, tmp_path: Any, spool: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event that fails to build never breaks the response, and the request lands in the dead letters."""
    if spool:
        settings = settings.replace(spool_path=str(tmp_path / "spool.sqlite3"))
    middleware = OrgBillingMiddleware(build_app(), settings=settings, transport=fake_lago.transport())

    def broken(*args: Any) -> str:
        raise KeyError("tenant_region")

    monkeypatch.setattr(middleware, "_head", broken)
    async with client_for(middleware) as client:
        assert (await client.post("/v1/chat/1", headers=HEADERS)).status_code == 200
        assert (await client.post("/v1/chat/2", headers=HEADERS)).status_code == 200
    assert await middleware.pipeline.flush(5)
    letters = middleware.pipeline.dead_letters()
    await middleware.aclose()
    assert fake_lago.events == []
    assert len(letters) == 2
    assert all("tenant_region" in letter.reason for letter in letters)
    assert middleware.stats["event_errors"] == 2


@pytest.mark.parametrize(
    "hook",
    [
        lambda scope, identity: {}["tenant_region"],  # raises
        lambda scope, identity: {"region": object()},  # not JSON
        lambda scope, identity: ["region"],  # not a mapping
    ],
)
async def test_a_failing_event_properties_hook_bills_the_request_without_them(
    fake_lago: Any, settings: BillingSettings, hook: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook is optional enrichment: when it fails, the request is billed all the same (without its properties),
    the failure is logged with its traceback once and counted (Moesif swallowed its callbacks' errors; an event lost
    to one would be worse)."""
    middleware = OrgBillingMiddleware(
        build_app(), settings=settings, transport=fake_lago.transport(), event_properties=hook
    )
    try:
        async with client_for(middleware) as client:
            for i in range(2):
                assert (await client.post(f"/v1/chat/{i}", headers=HEADERS)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert [event["properties"]["total_tokens"] for event in fake_lago.events] == [18, 18]
    assert not any("region" in event["properties"] for event in fake_lago.events)
    assert middleware.stats["event_properties_errors"] == 2 and not middleware.pipeline.dead_letters()
    assert len([r for r in caplog.records if "event_properties hook" in r.getMessage()]) == 1


def test_an_async_event_properties_hook_is_refused() -> None:
    """It would run on the request's path when the response is over: a coroutine there is a mistake, said at once."""

    async def hook(scope: Any, identity: Any) -> dict[str, Any]:
        return {}

    with pytest.raises(ConfigurationError, match="not an async one"):
        OrgBillingMiddleware(build_app(), settings=BillingSettings(api_key="k"), event_properties=hook)


async def test_background_task_time_is_not_billed_as_request_duration(
    fake_lago: Any, settings: BillingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The response is over before its BackgroundTask runs (Starlette #919): the event's duration ends with the last
    body message, not when the app returns. The middleware's clocks are settable ones; the task moves them 30 s on."""
    import types

    from starlette.background import BackgroundTask

    from lago_org_billing import _middleware

    now = [1_700_000_000.0, 5_000.0]  # the wall clock, the monotonic one
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=lambda: now[1]))

    def slow_job() -> None:
        now[0] += 30.0
        now[1] += 30.0

    async def endpoint(request: Request) -> Response:
        now[0] += 0.25  # the answer itself
        now[1] += 0.25
        return JSONResponse({"usage": {"total_tokens": 3}}, background=BackgroundTask(slow_job))

    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/j", endpoint)]), settings=settings, transport=fake_lago.transport()
    )
    try:
        async with client_for(middleware) as client:
            assert (await client.get("/j", headers=HEADERS)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert event["properties"]["duration_ms"] == 250.0


def test_direct_event_json_matches_json_module() -> None:
    """The middleware's hand-written event JSON is the document event_payload builds, quotes and unicode too."""
    from lago_org_billing._attribution import Usage
    from lago_org_billing._events import event_payload

    settings = BillingSettings(api_key="k", subscription_id_template="sub_{org_id}")
    middleware = OrgBillingMiddleware(Starlette(), settings=settings, quota=None)
    for org, user, model in (
        ("org_a", "ada", "gpt-4o-mini"),
        ('org"\\q', 'o"brien\\n', "模型-ü\u2028"),
        ("org_b", None, None),
    ):
        for key in (None, "retry-1"):
            facts = ("/v1/chat/{chat_id}", "POST", 200, 1764082800.1234, 1764082800.1357, key, org, user)
            text = middleware._build_event((*facts, Usage(model, 1, 2, 3), None, None))
            assert isinstance(text, str)
            document = json.loads(text)
            properties: dict[str, Any] = {
                "org_id": org,
                "endpoint": "/v1/chat/{chat_id}",
                "method": "POST",
                "status_code": 200,
                "duration_ms": 12.3,
                "input_tokens": 1,
                "output_tokens": 2,
                "total_tokens": 3,
            }
            if user is not None:
                properties["user_id"] = user
                properties["model"] = model
            expected = event_payload(
                transaction_id=document["transaction_id"],
                external_subscription_id=f"sub_{org}",
                code="api_call",
                properties=properties,
                timestamp=1764082800.1234,
            )
            assert document == expected
            assert document["timestamp"] == "1764082800.123"
            if key is not None:  # a client retry of the same request is the same event
                assert text == middleware._build_event((*facts, Usage(model, 1, 2, 3), None, None))


async def test_prometheus_metrics_of_requests_pipeline_and_gate(
    fake_lago: Any, make_middleware: MiddlewareFactory, settings: BillingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LAGO_METRICS=true exports the middleware's counts, its pipeline's and its quota gate's to Prometheus' default
    registry; middlewares registered with one registry are summed (two apps never clash)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)  # the default registry, for this test only
    first = make_middleware(settings=settings.replace(metrics=True))
    async with client_for(first) as client:
        assert (await client.post("/v1/chat/1", headers=HEADERS)).status_code == 200
        assert (await client.get("/health")).status_code == 200  # excluded
        assert (await client.post("/v1/chat/2")).status_code == 200  # no org: allowed, unbilled
    assert await first.pipeline.flush(5)

    def value(name: str) -> float | None:
        return registry.get_sample_value(f"lago_billing_{name}")

    assert value("requests_total") == 2 and value("requests_billed_total") == 1
    assert value("requests_unresolved_total") == 1 and value("requests_excluded_total") == 1
    assert value("requests_blocked_total") == 0
    assert value("events_recorded_total") == 1 and value("events_delivered_total") == 1
    assert value("queue_depth") == 0 and value("delivery_seconds_count") == 1
    assert value("quota_checks_total") == 1 and value("quota_allowed_total") == 1
    assert value("quota_fail_open_total") == 0

    second = make_middleware(metrics_registry=registry)  # same registry, passed explicitly
    async with client_for(second) as client:
        await client.post("/v1/chat/3", headers=HEADERS)
    assert await second.pipeline.flush(5)
    assert value("requests_billed_total") == 2 and value("events_delivered_total") == 2
    assert value("quota_allowed_total") == 2


async def test_watcher_lets_go_of_the_request_once_the_event_is_handed_over() -> None:
    """deferred() gives the JSON body and drops the scope, the server's send and the late resolver with it."""
    from lago_org_billing._attribution import AttributionConfig
    from lago_org_billing._middleware import _ResponseWatcher

    async def send(message: dict[str, Any]) -> None:
        pass

    watcher = _ResponseWatcher({"type": "http"}, AttributionConfig(), send)
    headers = [(b"content-type", b"application/json")]
    await watcher({"type": "http.response.start", "status": 200, "headers": headers})
    await watcher({"type": "http.response.body", "body": b'{"usage":{"total_tokens":3}}'})
    assert watcher.deferred() == b'{"usage":{"total_tokens":3}}'
    assert watcher.send is None and watcher.on_start is None and watcher._scope is None
    with pytest.raises(AssertionError, match="the response is over"):
        watcher({"type": "http.response.body", "body": b""})


def test_the_response_watcher_sets_every_field_a_usage_recorder_sets() -> None:
    """``_ResponseWatcher.__init__`` does ``UsageRecorder.__init__``'s work inline (a call less per request): a field
    added to the recorder and not to the watcher would be missing (AttributeError) on the middleware's path only."""
    from lago_org_billing._attribution import UsageRecorder
    from lago_org_billing._middleware import _ResponseWatcher

    scope: dict[str, Any] = {"type": "http", "headers": []}
    recorder = UsageRecorder(scope)
    watcher = _ResponseWatcher(scope, recorder._config, _noop_send)

    def fields(obj: object, cls: type) -> set[str]:
        names = {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}
        return {name for name in names if hasattr(obj, name)}

    assert fields(recorder, UsageRecorder) <= fields(watcher, UsageRecorder)


async def _noop_send(message: Any) -> None:
    return None
