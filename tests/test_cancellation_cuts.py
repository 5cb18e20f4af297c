"""Cancellation, timeouts and client disconnects through the billing middleware, under asyncio and trio.

The promise: one ``api_call`` event per served request (a stream cut short is billed with what was counted; an app
error follows ``bill_server_errors``), a quota reservation always settled or released, cancellation never swallowed.

Covered here: a server's graceful-shutdown timeout cancelling a stream just before the lifespan shutdown (uvicorn,
and the same sequence under trio); a request cut (a timeout, KeyboardInterrupt, SystemExit, a BaseExceptionGroup)
after its 200 headers but before any body byte, gated before the app or through ``require_quota``; and, as
regression cover, cancellation before the answer, mid-stream, natively (``asyncio.wait_for``) and while the gate
waits for a cold org's first snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from _quota_app import Clock, chat, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, require_quota
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

if sys.version_info < (3, 11):  # pragma: no cover - anyio's backport on 3.10
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])

#: The first SSE event of a stream: 7 tokens counted before it is cut.
FIRST = b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}\n\n'


def http_scope(path: str = "/v1/x", spec_version: str = "2.3", org: bool = True) -> dict[str, Any]:
    # ASGI spec 2.3, as uvicorn sends: Starlette's StreamingResponse streams in a task group of its own
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-org-id", b"org_1")] if org else [],
        "server": ("app", 80),
        "client": ("client", 1234),
    }


def receiver() -> Receive:
    """The request (no body), then nothing (the client stays)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    return receive


async def ignore(message: Message) -> None:
    pass


def stream_app(streaming: anyio.Event | None = None) -> Starlette:
    """``/v1/x``: a stream whose first event (7 tokens) goes out (``streaming`` set then), then waits for a model
    that never answers."""

    async def endpoint(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            yield FIRST
            if streaming is not None:
                streaming.set()
            await anyio.sleep_forever()
            yield b""  # pragma: no cover

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/x", endpoint)])


@contextlib.asynccontextmanager
async def gated(
    app: Any,
    *,
    bill_server_errors: bool = False,
    wrap: Callable[[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport] | None = None,
) -> AsyncIterator[tuple[OrgBillingMiddleware, QuotaGate, FakeLago, Clock]]:
    """The middleware with an in-process quota gate (org_1: 5 calls) on the emulator (its transport wrapped in
    ``wrap``), its background work started; closed (events delivered) when the block ends."""
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    transport: httpx.AsyncBaseTransport = fake.transport()
    if wrap is not None:
        transport = wrap(transport)
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key="k",
        org_header="X-Org-Id",
        max_retries=0,
        bill_server_errors=bill_server_errors,
    )
    async with LagoClient(settings, transport=transport) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(cold_timeout=30), clock=clock.time)
        middleware = OrgBillingMiddleware(app, settings, quota=gate, client=lago)
        try:
            await middleware._start_lazily()
            yield middleware, gate, fake, clock
        finally:
            await middleware.aclose()


async def warm(gate: QuotaGate) -> None:
    """org_1's snapshot read, nothing counted."""
    gate.settle("org_1", await gate.check("org_1"), tokens=0, billed=False)


def counted(gate: QuotaGate, clock: Clock) -> tuple[int, dict[int, int]]:
    """org_1's calls counted (recorded and in flight), and those in flight."""
    return gate.local.reserve_now("org_1", clock.time(), "peek").calls, dict(gate.local._orgs["org_1"].counts.i)


def billed(fake: FakeLago) -> list[tuple[int, int]]:
    return [(event["properties"]["status_code"], event["properties"]["total_tokens"]) for event in fake.events]


# ------------------------------------------------------------------ a server's shutdown cancelling in-flight streams


@BACKENDS
async def test_a_stream_cancelled_by_the_servers_shutdown_is_billed_before_delivery_closes() -> None:
    """uvicorn's shutdown past ``timeout_graceful_shutdown``: it cancels the requests still running and, without
    waiting for them to end, sends the lifespan shutdown, where the middleware closed its pipeline at once. A stream
    of ASGI spec 2.3 (Starlette streams it in a task group) records its event a few loop turns after the cancel: the
    pipeline was closed by then and the event was dropped ("Dropping billing event ...: the pipeline is closed"), so
    every stream still running at a deploy went unbilled. Its event is now in, with the tokens counted."""
    streaming = anyio.Event()
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    middleware = OrgBillingMiddleware(stream_app(streaming), settings, transport=fake.transport(), quota=None)
    to_lifespan, lifespan_messages = anyio.create_memory_object_stream[Message](4)
    started, shut_down = anyio.Event(), anyio.Event()

    async def lifespan_send(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            shut_down.set()

    request_scope = anyio.CancelScope()

    async def request() -> None:
        with request_scope:
            await middleware(http_scope(), receiver(), ignore)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks, to_lifespan, lifespan_messages:
            tasks.start_soon(
                middleware, {"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan_messages.receive, lifespan_send
            )
            await to_lifespan.send({"type": "lifespan.startup"})
            await started.wait()
            tasks.start_soon(request)
            await streaming.wait()
            request_scope.cancel()  # the graceful shutdown's time is up: in-flight requests cancelled...
            await to_lifespan.send({"type": "lifespan.shutdown"})  # ...and the lifespan shut down right after
            await shut_down.wait()
    assert middleware.pipeline.metrics.dropped == 0
    assert billed(fake) == [(200, 7)]


@BACKENDS
async def test_a_request_still_running_at_shutdown_keeps_the_shutdown_within_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request that never ends (not cancelled by the server) is waited for at most half of ``shutdown_timeout``;
    delivery gets what is left, so that the whole shutdown stays within ``shutdown_timeout`` (a deployment sizes its
    kill grace period on it): it was waited for the whole ``shutdown_timeout``, and delivery given as long again."""
    streaming = anyio.Event()
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    middleware = OrgBillingMiddleware(
        stream_app(streaming), settings, transport=fake.transport(), quota=None, shutdown_timeout=1.0
    )
    given: list[float | None] = []
    to_lifespan, lifespan_messages = anyio.create_memory_object_stream[Message](4)
    started, shut_down = anyio.Event(), anyio.Event()

    async def lifespan_send(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            shut_down.set()

    with anyio.fail_after(10), caplog.at_level(logging.WARNING, logger="lago_org_billing"):
        async with anyio.create_task_group() as tasks, to_lifespan, lifespan_messages:
            tasks.start_soon(
                middleware, {"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan_messages.receive, lifespan_send
            )
            await to_lifespan.send({"type": "lifespan.startup"})
            await started.wait()
            aclose = middleware.pipeline.aclose

            async def recording_aclose(timeout: float | None = None) -> Any:  # noqa: ASYNC109 - aclose's own
                given.append(timeout)
                return await aclose(timeout)

            middleware.pipeline.aclose = recording_aclose  # type: ignore[method-assign]
            tasks.start_soon(middleware, http_scope(), receiver(), ignore)
            await streaming.wait()
            await to_lifespan.send({"type": "lifespan.shutdown"})  # the request goes on: never cancelled
            await shut_down.wait()
            tasks.cancel_scope.cancel()
    # waited 0.5 s (half of it) at least: delivery given the rest, half at least
    assert given == [0.5]
    assert any("1 requests still running after 0.5 s" in r.getMessage() for r in caplog.records)
    assert middleware.stats["unfinished_at_shutdown"] == 1  # (requests_unfinished_at_shutdown_total)


def test_a_stream_cut_by_uvicorns_graceful_shutdown_timeout_is_billed() -> None:
    """The same through a real uvicorn (``timeout_graceful_shutdown``), a client still reading the stream."""
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0)
    middleware = OrgBillingMiddleware(stream_app(), settings, transport=fake.transport(), quota=None)
    server = serve_in_thread(middleware, timeout_graceful_shutdown=0.05)
    url = server.__enter__()
    try:
        with httpx.Client(timeout=10) as client:
            with client.stream("GET", url + "/v1/x", headers={"X-Org-Id": "org_1"}) as response:
                chunks = response.iter_raw()  # (kept: a generator dropped closes the connection)
                assert next(chunks) == FIRST
                server.__exit__(None, None, None)  # the server shuts down while the client reads the stream
    finally:
        server.__exit__(None, None, None)  # (a no-op once exited)
    assert middleware.pipeline.metrics.dropped == 0
    assert billed(fake) == [(200, 7)]


# ------------------------------------------------------------------ cut after the 200 headers, before any body byte


def headers_then(cut: Callable[[], BaseException] | None) -> Any:
    """A raw ASGI app: a 200 stream's headers, then ``cut`` raised (None: it hangs until cancelled)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if cut is None:
            await anyio.sleep_forever()
        raise cut()

    return app


CUTS = pytest.mark.parametrize(
    "cut",
    [
        pytest.param(None, id="timeout"),
        pytest.param(KeyboardInterrupt, id="KeyboardInterrupt"),
        pytest.param(SystemExit, id="SystemExit"),
        pytest.param(lambda: BaseExceptionGroup("app", [KeyboardInterrupt()]), id="BaseExceptionGroup"),
    ],
)


async def cut_request(middleware: OrgBillingMiddleware, cut: Callable[[], BaseException] | None, **scope: Any) -> None:
    """One request through ``middleware``: cut by a timeout around it (``anyio.move_on_after``, as a timeout
    middleware) when ``cut`` is None, else by what the app raises (checked to come out as it is)."""
    if cut is None:
        with anyio.move_on_after(0.01) as timeout:
            await middleware(http_scope(**scope), receiver(), ignore)
        assert timeout.cancelled_caught  # the cancellation went through the middleware
    else:
        with pytest.raises(BaseException) as raised:
            await middleware(http_scope(**scope), receiver(), ignore)
        assert type(raised.value) is type(cut())


@BACKENDS
@CUTS
@pytest.mark.parametrize("bill_server_errors", [False, True])
async def test_a_response_cut_after_its_headers_before_any_body_is_a_server_error(
    cut: Callable[[], BaseException] | None, bill_server_errors: bool
) -> None:
    """The 200 headers went out, then the request was cut before a body byte: by a timeout (a timeout middleware, a
    server's), or the app raised KeyboardInterrupt, SystemExit or a BaseExceptionGroup. The client got an empty
    answer: it was billed as a successful 200 call (0 tokens) and counted against the quota, whatever
    ``bill_server_errors`` said, where an app error at the same point is a 500 (billed only with that setting)."""
    async with gated(headers_then(cut), bill_server_errors=bill_server_errors) as (middleware, gate, fake, clock):
        await warm(gate)
        await cut_request(middleware, cut)
    assert billed(fake) == ([(500, 0)] if bill_server_errors else [])
    assert counted(gate, clock) == (1 if bill_server_errors else 0, {})


@BACKENDS
@CUTS
async def test_a_response_cut_after_its_headers_releases_the_call_require_quota_reserved(
    cut: Callable[[], BaseException] | None,
) -> None:
    """The same when the org is known only in the app (auth in a dependency) and ``require_quota`` reserved the call:
    it was billed as a 200 and its call kept; now released, nothing billed."""
    app = FastAPI()

    async def authenticate(request: Request) -> None:
        request.state.org_id = "org_1"

    @app.get("/v1/x", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def endpoint() -> Response:
        async def events() -> AsyncIterator[bytes]:
            if cut is None:
                await anyio.sleep_forever()
            raise cut()
            yield b""  # pragma: no cover

        return StreamingResponse(events(), media_type="text/event-stream")

    async with gated(app) as (middleware, gate, fake, clock):
        await warm(gate)
        await cut_request(middleware, cut, org=False, spec_version="2.4")
    assert billed(fake) == []
    assert counted(gate, clock) == (0, {})


# ------------------------------------------------------------------ regression cover: what already held


def hangs_before_answering() -> Starlette:
    async def endpoint(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError

    return Starlette(routes=[Route("/v1/x", endpoint)])


async def expire_once(streaming: anyio.Event, scope: anyio.CancelScope) -> None:
    """The deadline of ``scope`` (a ``fail_after``'s) reached once ``streaming`` is set."""
    await streaming.wait()
    scope.deadline = anyio.current_time()


@BACKENDS
@pytest.mark.parametrize("where", ["before the answer", "mid-stream"])
async def test_a_timeout_around_the_middleware_bills_what_was_served_and_settles_the_call(where: str) -> None:
    """``anyio.fail_after`` around the app: before any answer, nothing billed and the call released; mid-stream,
    one event with the tokens counted and the call recorded. The timeout comes out (not swallowed)."""
    streaming = anyio.Event()
    app = hangs_before_answering() if where == "before the answer" else stream_app(streaming)
    async with gated(app) as (middleware, gate, fake, clock):
        await warm(gate)
        with pytest.raises(TimeoutError):
            # mid-stream: the deadline brought to now once the first event is out (50 ms from the start cut it before
            # that on a loaded machine: nothing billed); before the answer, whenever it comes is the same
            with anyio.fail_after(0.05 if where == "before the answer" else 30) as timeout:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(expire_once, streaming, timeout)
                    await middleware(http_scope(), receiver(), ignore)
    assert billed(fake) == ([] if where == "before the answer" else [(200, 7)])
    assert counted(gate, clock) == (0 if where == "before the answer" else 1, {})


@pytest.mark.parametrize("where", ["before the answer", "mid-stream"])
async def test_a_native_asyncio_timeout_around_the_middleware_is_raised_and_settled(where: str) -> None:
    """``asyncio.wait_for`` (a native cancel, through anyio's scopes): the same."""
    streaming = anyio.Event()
    app = hangs_before_answering() if where == "before the answer" else stream_app(streaming)
    async with gated(app) as (middleware, gate, fake, clock):
        await warm(gate)
        request = asyncio.ensure_future(middleware(http_scope(), receiver(), ignore))
        if where == "mid-stream":  # (the 50 ms counted from the first event out, not from the start: see above)
            with anyio.fail_after(30):
                await streaming.wait()
        with pytest.raises(asyncio.TimeoutError):  # (the builtin TimeoutError from 3.11 only)
            await asyncio.wait_for(request, 0.05)
    assert billed(fake) == ([] if where == "before the answer" else [(200, 7)])
    assert counted(gate, clock) == (0 if where == "before the answer" else 1, {})


class HeldLago(httpx.AsyncBaseTransport):
    """The emulator, each request held until ``answer`` is set (``asked``: one came)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.asked, self.answer = anyio.Event(), anyio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.asked.set()
        await self.answer.wait()
        return await self.inner.handle_async_request(request)


@BACKENDS
async def test_cancelled_while_the_gate_waits_for_a_cold_orgs_first_snapshot_reserves_nothing() -> None:
    """A cold org (no snapshot yet), Lago slow: the request is cancelled while the gate waits for the snapshot. The
    cancellation comes out, nothing is reserved for the org; once Lago answers, the next request is served and
    counted once."""
    holding: list[HeldLago] = []

    def hold(transport: httpx.AsyncBaseTransport) -> HeldLago:
        holding.append(HeldLago(transport))
        return holding[0]

    async with gated(Starlette(routes=[Route("/v1/x", chat)]), wrap=hold) as (middleware, gate, _, clock):
        [held] = holding
        with anyio.fail_after(10):
            with anyio.CancelScope() as request:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(middleware, http_scope(), receiver(), ignore)
                    await held.asked.wait()
                    request.cancel()
            assert request.cancelled_caught
            held.answer.set()
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
                assert (await http.get("/v1/x", headers={"X-Org-Id": "org_1"})).status_code == 200
        assert middleware.stats["billed"] == 1
    assert counted(gate, clock) == (1, {})
