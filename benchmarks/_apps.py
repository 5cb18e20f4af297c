"""The apps benchmarks/overhead.py serves: one small JSON endpoint, bare and behind middlewares.

Run by uvicorn as ``benchmarks._apps:bare``, ``...:passthrough``, ``...:billed`` (settings from the environment)
``...:floor`` (the least a billing middleware does), ``...:request_path`` (the billed app's request path alone: its
events dropped), ``...:floor_delivered`` (the floor's request path, its events built and delivered as the billed app's)
and ``...:burn`` (a calibrated CPU cost, ``BENCH_BURN_US``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY = {
    "id": "chatcmpl-bench",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
}


async def chat(request: Request) -> Response:
    return JSONResponse(BODY)


class PassThrough:
    """The cheapest pure ASGI middleware: the floor any middleware pays."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _app(*middleware: Middleware) -> Starlette:
    return Starlette(routes=[Route("/v1/chat/{chat_id}", chat, methods=["GET", "POST"])], middleware=list(middleware))


class Burn:
    """A pass-through that spends ``BENCH_BURN_US`` microseconds of pure CPU per request, calibrated in process:
    shows what a microsecond measured in process costs in the server on this machine."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        micros = float(os.environ.get("BENCH_BURN_US", "10"))
        loops = 100_000
        started = time.perf_counter()
        for _ in range(loops):
            pass
        self.loops = max(1, round(micros * 1e-6 / ((time.perf_counter() - started) / loops)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(self.loops):
            pass
        await self.app(scope, receive, send)


class Floor:
    """The least a billing middleware can do per request in pure Python, as a floor for the real one: the org read
    from a header, ``send`` wrapped to see the status and the body, the request's facts kept as one tuple. No route
    template, no usage parsed, no event built, nothing delivered: what the real middleware does beyond this is its
    own cost."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.facts: list[tuple[object, ...]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        org = None
        for name, value in scope["headers"]:
            if name == b"x-org-id":
                org = value
                break
        seen: list[object] = [500, b""]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen[0] = message["status"]
            else:
                seen[1] = message.get("body", b"")
            await send(message)

        started = time.time()
        await self.app(scope, receive, watch)
        self.facts.append((org, scope["path"], scope["method"], seen[0], started, time.time(), seen[1]))
        if len(self.facts) >= 10_000:
            self.facts.clear()


bare = _app()
passthrough = _app(Middleware(PassThrough))


def _billed() -> Starlette:
    from lago_org_billing import OrgBillingMiddleware

    return _app(Middleware(OrgBillingMiddleware))


def _request_path() -> Starlette:
    """The billed app with its events dropped as they are handed over: the middleware's request path alone, nothing
    built or delivered (what the billed app costs beyond it is building and delivering its events)."""
    from lago_org_billing import OrgBillingMiddleware
    from lago_org_billing._delivery import EventPipeline

    class RequestPathOnly(OrgBillingMiddleware):
        def _use_pipeline(self, pipeline: EventPipeline) -> None:
            super()._use_pipeline(pipeline)
            self._submit = lambda facts: True

    return _app(Middleware(RequestPathOnly))


def _floor_delivered() -> Starlette:
    """The floor's request path (the org from its header, the body kept, no checks) handing its facts to the billed
    app's pipeline: its events are built and delivered exactly as the billed app's. What a billing middleware would
    cost with a request path as cheap as the floor's: the events' building and delivery alone (the common case
    only: a JSON answer of a known org; not a middleware to use)."""
    from lago_org_billing import OrgBillingMiddleware
    from lago_org_billing._identity import _header_ids

    class FloorDelivered(OrgBillingMiddleware):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or not self._running:
                await super().__call__(scope, receive, send)
                return
            found = dict(scope["headers"])
            org, user = _header_ids.get(found.get(b"x-org-id", b"")), _header_ids.get(found.get(b"x-user-id", b""))
            if org is None:  # (the first request of the org: its id checked by the middleware)
                await super().__call__(scope, receive, send)
                return
            seen: list[Any] = [500, b"", 0.0]

            async def watch(message: Message) -> None:
                if message["type"] == "http.response.start":
                    seen[0] = message["status"]
                else:
                    seen[1] += message.get("body", b"")
                    if not message.get("more_body"):
                        seen[2] = time.time()
                await send(message)

            started = time.time()
            await self.app(scope, receive, watch)
            endpoint = scope["route"].path
            self._submit((endpoint, scope["method"], seen[0], started, seen[2], None, org, user, seen[1], None, None))

    return _app(Middleware(FloorDelivered))


def __getattr__(name: str) -> Starlette:
    if name == "billed":
        return _billed()
    if name == "request_path":
        return _request_path()
    if name == "floor_delivered":
        return _floor_delivered()
    if name == "floor":
        return _app(Middleware(Floor))
    if name == "burn":
        return _app(Middleware(Burn))
    raise AttributeError(name)
