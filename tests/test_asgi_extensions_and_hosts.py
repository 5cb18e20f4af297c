"""OrgBillingMiddleware against ASGI protocol corners: the server-side file extensions (``http.response.pathsend``,
``http.response.zerocopy``), trailers, early hints, lifespans an app does not support, and ``Host`` routing (route
templates of the apps a host serves)."""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Host, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware, _middleware

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
USAGE_JSON = b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'
JSON_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json")],
}


class FileSendingServer:
    """What a server advertising the ASGI file extensions (granian: ``http.response.pathsend``) does around the app:
    advertises them in the scope and sends the file itself when the app hands it over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["extensions"] = {"http.response.pathsend": {}, "http.response.zerocopy": {}}

        async def server_send(message: Message) -> None:
            if message["type"] == "http.response.pathsend":
                message = {"type": "http.response.body", "body": await anyio.Path(message["path"]).read_bytes()}
            elif message["type"] == "http.response.zerocopy":
                body = os.read(message["file"], 1 << 20)
                message = {"type": "http.response.body", "body": body, "more_body": message.get("more_body", False)}
            await send(message)

        await self.app(scope, receive, server_send)


async def bill(
    app: ASGIApp, settings: BillingSettings, fake_lago: Any, requests: list[tuple[str, str]], **kwargs: Any
) -> list[httpx.Response]:
    """Send each (host, path) GET through the billing middleware around ``app`` (behind a server sending files
    itself); every event delivered before it returns. App errors are answered 500 by the transport, not raised."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport(), **kwargs)
    transport = httpx.ASGITransport(app=FileSendingServer(middleware), raise_app_exceptions=False)
    responses = []
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for host, path in requests:
                responses.append(await client.get(path, headers={**HEADERS, "Host": host}))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return responses


# --------------------------------------------------------------------------------------------------------------------
# http.response.pathsend / http.response.zerocopy: the response is over when the app hands its file to the server.


async def test_a_file_sent_by_the_server_ends_the_duration_before_the_background_task(
    fake_lago: Any, header_settings: BillingSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A FileResponse under a server advertising ``http.response.pathsend`` sends no body message: its event's
    duration ran on until the app returned, its BackgroundTask's 30 s included (as with a body it ends with the
    response: test_background_task_time_is_not_billed_as_request_duration)."""
    now = [1_700_000_000.0]
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=lambda: now[0]))
    export = tmp_path / "export.csv"
    export.write_bytes(b"a,b\n1,2\n")

    def slow_job() -> None:
        now[0] += 30.0

    async def download(request: Request) -> Response:
        now[0] += 0.25  # the answer itself
        return FileResponse(export, background=BackgroundTask(slow_job))

    app = Starlette(routes=[Route("/export", download)])
    [response] = await bill(app, header_settings, fake_lago, [("t", "/export")])
    assert response.status_code == 200 and response.content == b"a,b\n1,2\n"
    [event] = fake_lago.events
    assert event["properties"]["status_code"] == 200
    assert event["properties"]["duration_ms"] == 250.0


async def test_a_file_sent_by_the_server_then_a_failing_background_task_is_billed_as_served(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Path
) -> None:
    """The file went out whole (pathsend), then the response's BackgroundTask raised: the request was billed as a
    500 (so, by default, not at all), where the same response sent as body messages is billed as the 200 it was."""
    export = tmp_path / "export.csv"
    export.write_bytes(b"a,b\n1,2\n")

    def failing_job() -> None:
        raise RuntimeError("the job after the response failed")

    async def download(request: Request) -> Response:
        return FileResponse(export, background=BackgroundTask(failing_job))

    app = Starlette(routes=[Route("/export", download)])
    [response] = await bill(app, header_settings, fake_lago, [("t", "/export")])
    assert response.content == b"a,b\n1,2\n"
    [event] = fake_lago.events
    assert event["properties"]["status_code"] == 200
    assert event["properties"]["endpoint"] == "/export"


@pytest.mark.parametrize("pieces", [1, 2])
async def test_a_zerocopy_file_then_a_crash_is_billed_as_served(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Path, pieces: int
) -> None:
    """``http.response.zerocopy``: the last message (``more_body`` false) ends the response; an error after it
    (cleanup, a background job) leaves the request billed as served, as after a last body message."""
    export = tmp_path / "export.csv"
    export.write_bytes(b"a,b\n1,2\n")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/csv")]})
        fd = os.open(export, os.O_RDONLY)
        try:
            for piece in range(pieces):
                await send({"type": "http.response.zerocopy", "file": fd, "more_body": piece < pieces - 1})
        finally:
            os.close(fd)
        raise RuntimeError("failed after the response")

    [response] = await bill(app, header_settings, fake_lago, [("t", "/export")])
    assert response.content == b"a,b\n1,2\n"
    [event] = fake_lago.events
    assert event["properties"]["status_code"] == 200


async def test_a_zerocopy_stream_cut_off_after_its_first_piece_is_billed_with_what_it_sent(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Path
) -> None:
    """A zerocopy piece with ``more_body`` is a body byte out: the app failing after it cuts a stream off (billed
    with what was counted, as body messages), not one that failed before its first byte (a 500)."""
    export = tmp_path / "export.csv"
    export.write_bytes(b"a,b\n1,2\n")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/csv")]})
        fd = os.open(export, os.O_RDONLY)
        try:
            await send({"type": "http.response.zerocopy", "file": fd, "more_body": True})
        finally:
            os.close(fd)
        raise RuntimeError("the upstream failed mid-file")

    await bill(app, header_settings, fake_lago, [("t", "/export")])
    [event] = fake_lago.events
    assert event["properties"]["status_code"] == 200


# --------------------------------------------------------------------------------------------------------------------
# Trailers, early hints, lifespans: passed on untouched, one event.


async def test_trailers_and_early_hints_pass_through_with_one_event(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An early hint before the response and trailers after its body reach the server as the app sent them; the
    request is one event with the body's tokens."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.early_hint", "links": [b"</s.css>; rel=preload"]})
        await send({**JSON_START, "trailers": True})
        await send({"type": "http.response.body", "body": USAGE_JSON})
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")], "more_trailers": False})

    async def server_send(message: Message) -> None:
        seen.append(message)

    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "2",
        "method": "POST",
        "scheme": "https",
        "path": "/v1/chat",
        "raw_path": b"/v1/chat",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"x-org-id", b"org_a")],
        "extensions": {"http.response.trailers": {}, "http.response.early_hint": {}},
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    try:
        await middleware(scope, receive, server_send)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert [m["type"] for m in seen] == [
        "http.response.early_hint",
        "http.response.start",
        "http.response.body",
        "http.response.trailers",
    ]
    assert seen[1]["trailers"] is True and seen[3]["headers"] == [(b"x-checksum", b"1")]
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 18 and event["properties"]["status_code"] == 200


@pytest.mark.parametrize("lifespan", ["raises", "returns"])
async def test_an_app_without_lifespan_support_is_billed_after_all(
    fake_lago: Any, header_settings: BillingSettings, lifespan: str
) -> None:
    """A raw ASGI app that does not support the lifespan (raises, as the spec says, or returns at once): the middleware
    answers the lifespan itself (its shutdown delivers what is pending: see
    test_lifecycle_apps_that_do_not_speak_the_lifespan.py), and starts its delivery again with a request after it."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if lifespan == "raises":
                raise RuntimeError("lifespan not supported")
            return
        await send(JSON_START)
        await send({"type": "http.response.body", "body": USAGE_JSON})

    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    startup = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        return startup.pop() if startup else {"type": "lifespan.shutdown"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            assert (await client.post("/v1/chat", headers=HEADERS)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 18


# --------------------------------------------------------------------------------------------------------------------
# Host routing: the apps a Host serves have route templates like any others.


async def chat(request: Request) -> Response:
    return Response(USAGE_JSON, media_type="application/json")


def host_app(static_dir: Path) -> Starlette:
    inner = [Route("/chat/{chat_id}", chat)]
    return Starlette(
        routes=[
            Host(
                "api.example.com",
                app=Router([Mount("/v1/{tenant}", routes=inner), Route("/models/{model}", chat)]),
            ),
            Host("{sub}.example.org", app=Starlette(routes=[Mount("/teams/{team}", routes=inner)])),
            Host("static.example.com", app=StaticFiles(directory=static_dir)),
            Route("/plain", chat),
        ]
    )


class StarletteBefore17:
    """Starlette before 1.7 (``starlette>=0.37`` is allowed) leaves no ``scope["route"]``: ``scope["endpoint"]``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            scope.pop("route", None)


@pytest.mark.parametrize("starlette_before_1_7", [False, True])
async def test_routes_served_by_a_host_bill_their_templates(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Path, starlette_before_1_7: bool
) -> None:
    """``Host(...)`` routing: the routes of a host's router are billed under their templates, mounts' included. They
    were billed under the concrete mount prefix (one endpoint per tenant: ``/v1/t1/chat/{chat_id}``) and, before
    Starlette 1.7, as ``<unmatched>`` (the endpoint of 404s), whatever the route."""
    (tmp_path / "logo.txt").write_text("logo")
    app: ASGIApp = host_app(tmp_path)
    if starlette_before_1_7:
        app = StarletteBefore17(app)
    requests = [
        ("api.example.com", "/v1/t1/chat/1"),
        ("api.example.com", "/v1/t2/chat/2"),
        ("api.example.com", "/models/gpt"),
        ("a.example.org", "/teams/red/chat/3"),
        ("t", "/plain"),
    ]
    responses = await bill(app, header_settings, fake_lago, requests)
    assert [r.status_code for r in responses] == [200] * 5
    assert [e["properties"]["endpoint"] for e in fake_lago.events] == [
        "/v1/{tenant}/chat/{chat_id}",
        "/v1/{tenant}/chat/{chat_id}",
        "/models/{model}",
        "/teams/{team}/chat/{chat_id}",
        "/plain",
    ]
    assert [e["properties"]["total_tokens"] for e in fake_lago.events] == [18] * 5


@pytest.mark.parametrize("starlette_before_1_7", [False, True])
async def test_an_app_a_host_serves_that_is_not_a_router_is_not_unmatched(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Path, starlette_before_1_7: bool
) -> None:
    """``Host("static.example.com", app=StaticFiles(...))``: its 200s were billed as ``<unmatched>``, the endpoint
    of 404s. Like a mount of such an app (``/static/{path}``), the host is the route: ``/{path}``, one endpoint
    however many files, its 404s too (the app's answers); a router's redirect (``redirect_slashes``) under a host is
    the routing's own answer, not billed."""
    (tmp_path / "logo.txt").write_text("logo")
    app: ASGIApp = host_app(tmp_path)
    if starlette_before_1_7:
        app = StarletteBefore17(app)
    requests = [
        ("static.example.com", "/logo.txt"),
        ("static.example.com", "/missing.txt"),
        ("api.example.com", "/models/gpt/"),
    ]
    responses = await bill(app, header_settings, fake_lago, requests)
    assert [r.status_code for r in responses] == [200, 404, 307]
    assert [e["properties"]["endpoint"] for e in fake_lago.events] == ["/{path}", "/{path}"]


async def test_a_host_inside_a_parameterised_mount_keeps_the_mount_template(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A Host inside a Mount with parameters: the mount's template, then the host's route's."""

    async def text(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Mount("/r/{region}", routes=[Host("api.example.com", app=Router([Route("/x/{x}", text)]))])]
    )
    await bill(app, header_settings, fake_lago, [("api.example.com", "/r/eu/x/1"), ("api.example.com", "/r/us/x/2")])
    assert [e["properties"]["endpoint"] for e in fake_lago.events] == ["/r/{region}/x/{x}"] * 2


async def test_a_json_file_sent_by_the_server_is_billed_once(fake_lago: Any, header_settings: BillingSettings) -> None:
    """Sanity: one event per request through the file-sending server, JSON responses read as usual."""

    async def endpoint(request: Request) -> Response:
        return JSONResponse({"usage": {"total_tokens": 4}})

    app = Starlette(routes=[Route("/j", endpoint)])
    await bill(app, header_settings, fake_lago, [("t", "/j"), ("t", "/j")])
    assert [e["properties"]["total_tokens"] for e in fake_lago.events] == [4, 4]
