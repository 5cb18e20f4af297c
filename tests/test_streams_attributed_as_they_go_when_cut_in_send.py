"""Usage attribution of a stream whose client left while a chunk waited in ``send`` (a slow client, a
``BaseHTTPMiddleware`` inside: FastAPI's ``@app.middleware("http")``). Starlette cancels the stream there and leaves
the generator suspended at its ``yield``, unclosed: its ``finally`` runs only when the garbage collector closes it,
after the event was built. What the generator attributed as it went (the README's advice) is what is billed."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from lago_org_billing import BillingSettings, OrgBillingMiddleware, attribute_usage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def no_collection() -> Iterator[None]:
    """No garbage collection while the request runs: an abandoned generator is not closed behind the test's back
    (the cycle holding it is young in a test; in a server, a stream's objects are older and live on longer)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _scope() -> dict[str, Any]:
    """A request from an ASGI 2.3 server (uvicorn, granian): Starlette's stream listens for ``http.disconnect``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat",
        "raw_path": b"/v1/chat",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"t"), (b"x-org-id", b"org_a")],
        "server": ("t", 80),
        "client": ("c", 1),
    }


async def _passthrough(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    return await call_next(request)


async def _cut_while_sending(middleware: OrgBillingMiddleware, after: int) -> None:
    """Serve one request whose client reads ``after`` body messages, then stops reading (``send`` waits) and
    leaves (``http.disconnect``)."""
    gone = anyio.Event()
    bodies = 0

    async def receive() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal bodies
        if message["type"] == "http.response.body":
            bodies += 1
            if bodies == after:  # the client leaves while the chunk is sent: uvicorn drops what comes after
                gone.set()
                await anyio.lowlevel.checkpoint()

    with anyio.fail_after(10):
        await middleware(_scope(), receive, send)


async def test_a_stream_cut_in_send_bills_what_its_generator_attributed_as_it_went(
    fake_lago: Any, header_settings: BillingSettings, no_collection: None
) -> None:
    """An LLM proxy behind ``@app.middleware("http")`` that attributes its counts with each chunk: the client leaves
    while the third waits in ``send``; the event carries the proxy's model and the counts it last attributed."""
    attributed: list[int] = []
    closed = anyio.Event()

    async def proxy(request: Request) -> StreamingResponse:
        async def relay() -> AsyncIterator[bytes]:
            counted = 0
            try:
                for _ in range(1_000):
                    counted += 5
                    attribute_usage(request, model="m-proxy", input_tokens=100, output_tokens=counted)
                    attributed.append(counted)
                    yield b'data: {"delta": "tok"}\n\n'
            finally:
                closed.set()

        return StreamingResponse(relay(), media_type="text/event-stream")

    app = Starlette(
        routes=[Route("/v1/chat", proxy, methods=["POST"])],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=_passthrough)],
    )
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        await _cut_while_sending(middleware, after=3)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()  # (an aclose() the finalizer scheduled would have run)
        # the premise: the generator was left open (Starlette cancelled its stream in send), not closed
        assert not closed.is_set()
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [props] = [event["properties"] for event in fake_lago.events]
    assert 3 <= len(attributed) < 1_000
    assert (props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]) == (
        "m-proxy",
        100,
        attributed[-1],
        100 + attributed[-1],
    )
    assert props["status_code"] == 200
