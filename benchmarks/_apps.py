"""The apps benchmarks/overhead.py serves: one small JSON endpoint, bare and behind middlewares.

Run by uvicorn as ``benchmarks._apps:bare``, ``...:passthrough``, ``...:billed``, ``...:gated`` (settings
from the environment).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

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


bare = _app()
passthrough = _app(Middleware(PassThrough))


def _billed() -> Starlette:
    from lago_org_billing import OrgBillingMiddleware

    return _app(Middleware(OrgBillingMiddleware))


def __getattr__(name: str) -> Starlette:
    if name == "billed":
        return _billed()
    raise AttributeError(name)
