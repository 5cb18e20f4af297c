"""Review of OrgBillingMiddleware in real ASGI stacks: an answer the app (or an error middleware of its own) sends after
its response went out (a failing BackgroundTask caught by a hand-written error middleware), the ASGI zero-copy send
extension under its specified message name (``http.response.zerocopysend``), and one EventPipeline shared by the
billing middlewares of two apps (mounted side by side, or served by two servers on one event loop)."""

from __future__ import annotations

import os
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from _lifespan import serving_lifespan
from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBillingMiddleware, _middleware

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
USAGE_JSON = b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'


class CatchAllErrors:
    """A hand-written error middleware (inside the billing one): any exception the app raises is answered with a JSON
    500, whether or not a response already went out (it does not track that, as Starlette's own does)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except Exception:
            await JSONResponse({"error": "internal"}, status_code=500)(scope, receive, send)


class IgnoresAfterTheEnd:
    """A server as the ASGI spec words it: once a body message without ``more_body`` went out, "the response will be
    taken as complete and closed, and any further messages on the channel will be ignored"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        done = False

        async def server_send(message: Message) -> None:
            nonlocal done
            if done:
                return
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
            await send(message)

        await self.app(scope, receive, server_send)


async def bill(
    app: ASGIApp, settings: BillingSettings, fake_lago: Any, path: str, *, server: Any = None, **headers: str
) -> tuple[httpx.Response, OrgBillingMiddleware]:
    """GET ``path`` through the billing middleware around ``app`` (behind ``server``, a wrapper standing for the
    server's own handling of messages); every event delivered before it returns. App errors are answered 500 by the
    transport (as a server does), not raised."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    served: ASGIApp = middleware if server is None else server(middleware)
    transport = httpx.ASGITransport(app=served, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get(path, headers=headers or HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return response, middleware


# --------------------------------------------------------------------------------------------------------------------
# An answer sent after the response went out: a server refuses it (uvicorn raises, httpx's transport asserts) or
# ignores it (as the spec says); the client got the first one, which is what is billed.


def _failing_job() -> None:
    raise RuntimeError("the job after the response failed")


@pytest.mark.parametrize("server", [None, IgnoresAfterTheEnd], ids=["server-refuses", "server-ignores"])
async def test_an_error_answer_after_the_response_went_out_leaves_it_billed_as_served(
    fake_lago: Any, header_settings: BillingSettings, server: Any
) -> None:
    """A JSON 200 went out whole, then its BackgroundTask raised; an error middleware inside the billing one answered
    that error with a 500 (a second ``http.response.start``, and its body). The client got the 200 and its tokens, but
    the watcher took the 500 start for the answer: the request was not billed (a server error, by default), its
    tokens not counted, though its work was done and delivered."""

    async def chat(request: Request) -> Response:
        return Response(USAGE_JSON, media_type="application/json", background=BackgroundTask(_failing_job))

    app = CatchAllErrors(Starlette(routes=[Route("/v1/chat", chat)]))
    response, middleware = await bill(app, header_settings, fake_lago, "/v1/chat", server=server)
    assert response.status_code == 200 and response.content == USAGE_JSON
    assert [(e["properties"]["status_code"], e["properties"]["total_tokens"]) for e in fake_lago.events] == [(200, 18)]
    assert middleware.stats["billed"] == 1 and middleware.stats["unbilled_errors"] == 0


async def test_an_error_answer_after_the_response_went_out_does_not_lengthen_its_duration(
    fake_lago: Any, header_settings: BillingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same under a server ignoring what comes after the end: the error answer's last body message is not the
    response's end (its duration stays the answer's, not the answer's plus its background task's)."""
    now = [1_700_000_000.0]
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=lambda: now[0]))

    def slow_failing_job() -> None:
        now[0] += 30.0
        raise RuntimeError("the job after the response failed")

    async def chat(request: Request) -> Response:
        now[0] += 0.25  # the answer itself
        return Response(USAGE_JSON, media_type="application/json", background=BackgroundTask(slow_failing_job))

    app = CatchAllErrors(Starlette(routes=[Route("/v1/chat", chat)]))
    await bill(app, header_settings, fake_lago, "/v1/chat", server=IgnoresAfterTheEnd)
    [event] = fake_lago.events
    assert event["properties"]["duration_ms"] == 250.0


async def test_a_stream_cut_off_then_answered_again_is_billed_with_what_it_sent(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A stream fails after its usage event went out; the error middleware tries a 500 on top (refused by the
    server). Without that middleware the request is billed as the 200 it was, with the tokens counted: with it, the
    500 start the server refused decided, and the request was not billed."""

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: " + USAGE_JSON + b"\n\n"
            raise RuntimeError("the upstream failed mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    app = CatchAllErrors(Starlette(routes=[Route("/v1/stream", stream)]))
    await bill(app, header_settings, fake_lago, "/v1/stream")
    assert [(e["properties"]["status_code"], e["properties"]["total_tokens"]) for e in fake_lago.events] == [(200, 18)]


async def test_an_org_known_only_after_the_app_ran_is_billed_once_despite_a_second_answer(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The org set by the endpoint (auth there): the second answer neither runs the late resolution again nor makes
    the request a server error; it is billed once, to that org."""
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")

    async def chat(request: Request) -> Response:
        request.state.org_id = "org_b"
        return Response(USAGE_JSON, media_type="application/json", background=BackgroundTask(_failing_job))

    app = CatchAllErrors(Starlette(routes=[Route("/v1/chat", chat)]))
    settings = header_settings.replace(org_header=None)
    response, middleware = await bill(app, settings, fake_lago, "/v1/chat", **{"X-Trace": "1"})
    assert response.status_code == 200
    assert [(e["external_subscription_id"], e["properties"]["status_code"]) for e in fake_lago.events] == [
        ("org_b", 200)
    ]
    assert middleware.stats["billed"] == 1


# --------------------------------------------------------------------------------------------------------------------
# The ASGI zero-copy send extension: its message is "http.response.zerocopysend" (asgiref docs/extensions.rst).


class ZeroCopyServer:
    """A server advertising ``http.response.zerocopysend`` and sending the file itself when the app hands it over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["extensions"] = {"http.response.zerocopysend": {}}

        async def server_send(message: Message) -> None:
            if message["type"] == "http.response.zerocopysend":
                body = os.read(message["file"], 1 << 20)
                message = {"type": "http.response.body", "body": body, "more_body": message.get("more_body", False)}
            await send(message)

        await self.app(scope, receive, server_send)


def _zero_copy_app(export: Path, pieces: int, then: Any) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/csv")]})
        fd = os.open(export, os.O_RDONLY)
        try:
            for piece in range(pieces):
                await send({"type": "http.response.zerocopysend", "file": fd, "more_body": piece < pieces - 1})
        finally:
            os.close(fd)
        then()

    return app


@pytest.mark.parametrize("pieces", [1, 2])
async def test_a_zerocopysend_file_then_a_crash_is_billed_as_served(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Path, pieces: int
) -> None:
    """The file went out whole through ``http.response.zerocopysend``, then the app failed (a background job): billed
    as the 200 it was. The watcher knew only a ``http.response.zerocopy`` message, which ASGI does not define: the
    response never ended, and the request was taken for one that failed before its first byte (a 500, not billed)."""
    export = tmp_path / "export.csv"
    export.write_bytes(b"a,b\n1,2\n")

    def fail() -> None:
        raise RuntimeError("failed after the response")

    response, _ = await bill(
        _zero_copy_app(export, pieces, fail), header_settings, fake_lago, "/e", server=ZeroCopyServer
    )
    assert response.content == b"a,b\n1,2\n"
    assert [e["properties"]["status_code"] for e in fake_lago.events] == [200]


async def test_a_zerocopysend_file_ends_the_duration_before_what_follows(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The response is over when the last zero-copy piece is handed over: the work the app does after (30 s of a
    background job) is not the request's duration."""
    now = [1_700_000_000.0]
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=lambda: now[0]))
    export = tmp_path / "export.csv"
    export.write_bytes(b"a,b\n1,2\n")

    def slow_job() -> None:
        now[0] += 30.0

    await bill(_zero_copy_app(export, 1, slow_job), header_settings, fake_lago, "/e", server=ZeroCopyServer)
    [event] = fake_lago.events
    assert event["properties"]["duration_ms"] == 0.0


# --------------------------------------------------------------------------------------------------------------------
# One EventPipeline given to the billing middlewares of two apps (the README: "a pipeline or gate they share").


async def _chat(request: Request) -> Response:
    return Response(USAGE_JSON, media_type="application/json")


def _billed_app(settings: BillingSettings, pipeline: EventPipeline) -> OrgBillingMiddleware:
    return OrgBillingMiddleware(Starlette(routes=[Route("/chat", _chat)]), settings, pipeline=pipeline, quota=None)


async def test_two_mounted_apps_sharing_a_pipeline_both_serve_and_bill(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Two billed apps mounted side by side (Starlette passes them no lifespan: each starts its background work with
    its first request). The second one's start ran the shared pipeline again, which refuses ("already running"):
    every request to the second app failed with a 500, for as long as the process ran."""
    async with LagoClient(header_settings, transport=fake_lago.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.0)
        first, second = _billed_app(header_settings, pipeline), _billed_app(header_settings, pipeline)
        parent = Starlette(routes=[Mount("/a", first), Mount("/b", second)])
        statuses = []
        try:
            transport = httpx.ASGITransport(app=parent, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                for path in ("/a/chat", "/b/chat", "/b/chat", "/a/chat"):
                    statuses.append((await http.get(path, headers=HEADERS)).status_code)
            assert await pipeline.flush(5)
        finally:
            await first.aclose()
            await second.aclose()
    assert statuses == [200, 200, 200, 200]
    assert len(fake_lago.events) == 4
    assert first.stats["billed"] == 2 and second.stats["billed"] == 2


async def test_a_pipeline_the_app_runs_itself_can_be_given_to_its_middleware(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The application runs the pipeline in its own task group (``await tg.start(pipeline.run)``, as the delivery
    docs show) and gives it to the middleware of an app it mounts: every request failed, the middleware running the
    pipeline a second time."""
    async with LagoClient(header_settings, transport=fake_lago.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.0)
        middleware = _billed_app(header_settings, pipeline)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/v1", middleware)]))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                statuses = [(await http.get("/v1/chat", headers=HEADERS)).status_code for _ in range(2)]
            await pipeline.aclose()
        await middleware.aclose()
    assert statuses == [200, 200]
    assert [e["properties"]["total_tokens"] for e in fake_lago.events] == [18, 18]


async def test_two_apps_served_on_one_loop_sharing_a_pipeline_both_start(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Two servers in one process and event loop (``asyncio.gather(server_a.serve(), server_b.serve())``), each with
    its billed app, one pipeline shared: the second app's lifespan startup failed ("already running")."""
    async with LagoClient(header_settings, transport=fake_lago.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.0)
        first, second = _billed_app(header_settings, pipeline), _billed_app(header_settings, pipeline)
        async with serving_lifespan(first) as first_sent, serving_lifespan(second) as second_sent:
            assert first_sent == second_sent == ["lifespan.startup.complete"]
            for app in (first, second):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                    assert (await http.get("/chat", headers=HEADERS)).status_code == 200
            assert await pipeline.flush(5)
    assert len(fake_lago.events) == 2
