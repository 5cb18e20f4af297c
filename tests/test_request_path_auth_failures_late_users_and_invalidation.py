"""Auth failures left unbilled, users set late, the gate invalidated by ``OrgBilling``, and the raw poster's reading of
``Content-Length``.

* Starlette's own ``AuthenticationMiddleware`` refuses bad credentials with its ``on_error`` answer, a 400 by default
  (not a 401): with ``LAGO_ORG_HEADER``, a caller with bad credentials naming another org (``X-Org-Id: victim``) was
  still billed to that org, and its calls counted against the org's quota, as the app's 401/403 were before
  ``LAGO_BILL_AUTH_FAILURES``. Such an answer (no ``scope["auth"]``: the request never got past that middleware) is
  an auth failure now, governed by ``bill_auth_failures`` like a 401.
* A ``Content-Length`` padded with more than 4,300 leading zeros (``000...042``: a valid length, RFC 9110 8.6) made
  ``int()`` raise a ``ValueError`` out of the raw poster (its 18-digit bound counted the digits after the zeros): no
  ``RawHTTPError``, so an "unexpected error" with a traceback, and the batch Lago had ingested sent again for ever.
* ``OrgBilling`` did not invalidate the gate after a write whose answer was lost although Lago applied it (an
  upgrade): the org stayed refused on its old plan. It invalidates around its writes now, answered or not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from hypercorn.middleware import ProxyFixMiddleware
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from _limited_proxy import read_head
from _quota_app import Clock, chat, seed
from lago_org_billing import BillingSettings, LagoClient, LagoUnavailableError, OrgBilling, OrgBillingMiddleware
from lago_org_billing._http1 import RawHTTPError, RawPoster
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

API_KEY = "request-path-review-key"

#: The victim org's calls (``seed``'s ``starter`` plan), and what a spoofer and the org's real caller send.
CALLS = 3
VICTIM = {"X-Org-Id": "org_1"}
GOOD = {**VICTIM, "Authorization": "Bearer good"}
BAD = {**VICTIM, "Authorization": "Bearer stolen-or-guessed"}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    return seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=CALLS)


def events(fake: FakeLago) -> list[tuple[str, str, int]]:
    """(org, endpoint, status) of each event the emulator got."""
    return [
        (e["external_subscription_id"], e["properties"]["endpoint"], e["properties"]["status_code"])
        for e in fake.events
    ]


# ------------------------------------------------------------------ A. Starlette's AuthenticationMiddleware refusals


class TokenBackend(AuthenticationBackend):
    """Starlette's documented pattern: bad credentials raise ``AuthenticationError`` (answered by ``on_error``)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        header = conn.headers.get("authorization")
        if header is None:
            return None  # anonymous: request.user is an UnauthenticatedUser
        if header != "Bearer good":
            raise AuthenticationError("Invalid credentials")
        return AuthCredentials(["authenticated"]), SimpleUser("ada")


async def guarded(request: Request) -> Response:
    if not request.user.is_authenticated:
        return JSONResponse({"detail": "bad request: who are you?"}, status_code=400)
    if request.query_params.get("n") == "x":
        return JSONResponse({"detail": "n must be a number"}, status_code=400)  # an endpoint's own 400: billed
    return JSONResponse({"ok": True})


def auth_app(*, how: str, on_error: Any = None) -> ASGIApp:
    """A Starlette app behind Starlette's ``AuthenticationMiddleware``, the billing middleware outside it: added with
    ``add_middleware`` (the usual), declared in ``middleware=[...]``, or wrapping the app (its stack unbuilt)."""
    routes = [Route("/v1/chat", guarded, methods=["POST"])]
    options: dict[str, Any] = {"backend": TokenBackend()}
    if on_error is not None:
        options["on_error"] = on_error
    if how == "declared":
        return Starlette(routes=routes, middleware=[Middleware(AuthenticationMiddleware, **options)])
    app = Starlette(routes=routes)
    app.add_middleware(AuthenticationMiddleware, **options)
    return app


def installed(app: Any) -> OrgBillingMiddleware:
    layer = app if isinstance(app, OrgBillingMiddleware) else app.middleware_stack
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    return layer


@asynccontextmanager
async def served(
    app: Any, fake: FakeLago, clock: Clock, *, wrap: bool = False, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, list[OrgBillingMiddleware]]]:
    """``app`` behind the billing middleware (org from ``X-Org-Id``, a quota gate on the emulator), added to it or
    wrapping it; every event is delivered to the emulator when the block ends."""
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0, org_header="X-Org-Id")
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        outer: Any = app
        if wrap:
            outer = OrgBillingMiddleware(app, settings, quota=gate, client=lago, **options)
        else:
            app.add_middleware(OrgBillingMiddleware, settings=settings, quota=gate, client=lago, **options)
        found: list[OrgBillingMiddleware] = []
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http, found
            found.append(installed(outer))
        assert await found[0].pipeline.flush(5)
        await found[0].aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["add_middleware", "declared", "wrapped"])
async def test_a_spoofed_org_refused_by_starlettes_authentication_middleware_is_neither_billed_nor_counted(
    fake: FakeLago, clock: Clock, how: str
) -> None:
    """Bad credentials with ``X-Org-Id: victim``, refused by Starlette's ``AuthenticationMiddleware`` (its default
    ``on_error``: 400), cost the victim nothing: no event, its quota whole (it was locked out with 429s)."""
    app = auth_app(how="add_middleware" if how == "wrapped" else how)
    async with served(app, fake, clock, wrap=how == "wrapped") as (http, found):
        spoofed = [(await http.post("/v1/chat", headers=BAD)).status_code for _ in range(10)]
        good = [(await http.post("/v1/chat", headers=GOOD)).status_code for _ in range(CALLS + 1)]
    [middleware] = found
    assert spoofed == [400] * 10
    assert good == [200] * CALLS + [429]
    assert events(fake) == [("org_1", "/v1/chat", 200)] * CALLS
    assert middleware.stats["unbilled_auth_failures"] == 10 and middleware.stats["unrouted"] == 0
    assert middleware.stats["billed"] == CALLS


@pytest.mark.anyio
async def test_a_custom_on_error_status_is_an_auth_failure_too(fake: FakeLago, clock: Clock) -> None:
    """An ``on_error`` answering another 4xx (here 419) is the same refusal: not billed."""

    def on_error(conn: HTTPConnection, exc: Exception) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=419)

    app = auth_app(how="add_middleware", on_error=on_error)
    async with served(app, fake, clock) as (http, found):
        answer = await http.post("/v1/chat", headers=BAD)
    assert answer.status_code == 419 and fake.events == []
    assert found[0].stats["unbilled_auth_failures"] == 1


@pytest.mark.anyio
async def test_answers_past_the_authentication_middleware_are_billed_as_before(fake: FakeLago, clock: Clock) -> None:
    """Once Starlette's ``AuthenticationMiddleware`` let a request through (authenticated, or anonymous: it set
    ``request.user``), the endpoint's own 400s are billed as any endpoint's answer."""
    app = auth_app(how="add_middleware")
    async with served(app, fake, clock) as (http, found):
        statuses = [
            (await http.post("/v1/chat?n=x", headers=GOOD)).status_code,
            (await http.post("/v1/chat", headers=VICTIM)).status_code,  # anonymous, refused by the endpoint
        ]
    assert statuses == [400, 400]
    assert events(fake) == [("org_1", "/v1/chat", 400)] * 2
    assert found[0].stats.get("unbilled_auth_failures", 0) == 0


@pytest.mark.anyio
async def test_behind_a_proxy_that_deep_copies_the_scope_refusals_are_told_from_endpoints_answers(
    fake: FakeLago, clock: Clock
) -> None:
    """Hypercorn's ``ProxyFixMiddleware`` between the billing middleware and the app (which then runs on a deep copy
    of the scope, ``scope["auth"]`` written there): the refusal is not billed, the endpoint's own 400 is."""
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0, org_header="X-Org-Id")
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        proxied = ProxyFixMiddleware(auth_app(how="declared"))
        middleware = OrgBillingMiddleware(proxied, settings, quota=gate, client=lago)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            statuses = [
                (await http.post("/v1/chat", headers=BAD)).status_code,
                (await http.post("/v1/chat?n=x", headers=GOOD)).status_code,
            ]
        assert await middleware.pipeline.flush(5)
        await middleware.aclose()
    assert statuses == [400, 400]
    assert events(fake) == [("org_1", "/v1/chat", 400)]
    assert middleware.stats["unbilled_auth_failures"] == 1


@pytest.mark.anyio
async def test_bill_auth_failures_bills_the_authentication_middlewares_refusals(fake: FakeLago, clock: Clock) -> None:
    """``bill_auth_failures=True`` bills them as before (under ``<unmatched>``: no route served them)."""
    app = auth_app(how="add_middleware")
    async with served(app, fake, clock, bill_auth_failures=True) as (http, found):
        answers = [(await http.post("/v1/chat", headers=BAD)).status_code for _ in range(CALLS + 1)]
    assert answers == [400] * CALLS + [429]
    assert events(fake) == [("org_1", "<unmatched>", 400)] * CALLS
    assert found[0].stats.get("unbilled_auth_failures", 0) == 0


@pytest.mark.anyio
async def test_a_trusted_host_refusal_without_authentication_middleware_is_billed_as_before(
    fake: FakeLago, clock: Clock
) -> None:
    """An app without ``AuthenticationMiddleware``: a ``TrustedHostMiddleware`` 400 is billed as ``<unmatched>``, as
    it was (only a refusal before Starlette's auth is taken for an auth failure)."""
    app = Starlette(routes=[Route("/v1/chat", chat)])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["api.example"])
    async with served(app, fake, clock) as (http, found):
        answer = await http.get("/v1/chat", headers=VICTIM)
    assert answer.status_code == 400
    assert events(fake) == [("org_1", "<unmatched>", 400)]
    assert found[0].stats.get("unbilled_auth_failures", 0) == 0


# ------------------------------------------------------------------ B. Content-Length padded past int()'s limit


async def _answering(answer: bytes, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """A server on 127.0.0.1 that answers every request on a connection with ``answer``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def handle(stream: anyio.abc.SocketStream) -> None:
            buffer = b""
            async with stream:
                while True:
                    parts = await read_head(stream, buffer)
                    if parts is None:
                        return
                    head, buffer = parts
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(buffer) < length:
                        buffer += await stream.receive()
                    buffer = buffer[length:]
                    await stream.send(answer)

        await listener.serve(handle)


BODY = b'{"events":[]}'


@pytest.mark.anyio
@pytest.mark.parametrize("zeros", [4300, 5000, 60_000])
async def test_a_content_length_with_thousands_of_leading_zeros_is_read_as_its_length(zeros: int) -> None:
    """``Content-Length: 000...013`` is 13 (leading zeros are digits of the number): the answer is read, and the
    connection kept for the next request. It raised ``int()``'s ``ValueError`` past 4,300 digits."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * zeros + b"13\r\n\r\n" + BODY
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(_answering, answer)
        poster = RawPoster(f"http://127.0.0.1:{port}", {}, timeout=5)
        try:
            answers = [(await poster.post("/api/v1/events/batch", b"{}"))[0::2] for _ in range(2)]
            assert len(poster._idle) == 1  # (the one connection, reused)
        finally:
            await poster.aclose()
            tasks.cancel_scope.cancel()
    assert answers == [(200, BODY)] * 2


@pytest.mark.anyio
async def test_a_batch_answered_with_a_padded_length_is_delivered_not_an_unexpected_error() -> None:
    """Through ``LagoClient`` (the delivery's call): the padded answer is Lago's 200, not a ``ValueError``; a length
    with more than 18 significant digits is still no length (a protocol error: Lago unavailable)."""
    padded = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 5000 + b"13\r\n\r\n" + BODY
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 5000 + b"\r\n\r\n" + BODY
    async with anyio.create_task_group() as tasks:
        outcomes: list[str] = []
        for answer in (padded, huge):
            port = await tasks.start(_answering, answer)
            settings = BillingSettings(api_key=API_KEY, api_url=f"http://127.0.0.1:{port}", max_retries=0)
            async with LagoClient(settings) as client:
                assert client._raw is not None  # (the raw HTTP/1.1 poster carries the batches)
                try:
                    await client.send_event_batch_json(b'{"events":[]}')
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
                else:
                    outcomes.append("delivered")
        tasks.cancel_scope.cancel()
    assert outcomes == ["delivered", "LagoUnavailableError"]


def test_a_padded_length_in_a_list_of_equal_lengths_is_read() -> None:
    """``"000...42, 42"`` (a proxy joining two equal headers) is 42, the padding whatever its length."""
    from lago_org_billing._http1 import _decimal, _same_length

    assert _decimal("0" * 5000 + "42") == 42
    assert _decimal("0" * 5000) == 0
    assert _same_length("0" * 5000 + "42, 42") == 42
    assert _decimal("1" + "0" * 18) is None  # (19 significant digits: no length a server sends)
    assert RawHTTPError  # (the error the poster raises for the lengths it cannot read)


# ------------------------------------------------------------------ C. OrgBilling's invalidation (needs _billing.py)


class LosingAnswers(httpx.AsyncBaseTransport):
    """The emulator, with the answer to ``POST /api/v1/subscriptions`` lost once Lago applied it (a timeout)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.losing = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.losing and request.method == "POST" and request.url.path == "/api/v1/subscriptions":
            await response.aread()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


@pytest.mark.anyio
async def test_an_upgrade_whose_answer_was_lost_still_invalidates_the_gate(fake: FakeLago, clock: Clock) -> None:
    """``change_plan`` whose answer is lost (Lago applied the upgrade): the call fails, yet the org, refused 429 on
    its old plan, is served on the new one at its next request, as after an answered upgrade."""
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", max_retries=0)
    losing = LosingAnswers(fake.transport())
    async with LagoClient(settings, transport=losing) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app = Starlette(routes=[Route("/v1/chat", chat)])
        middleware = OrgBillingMiddleware(app, settings, client=lago, quota=gate)
        billing = OrgBilling(client=lago, middleware=middleware)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            before = [(await http.get("/v1/chat", headers=VICTIM)).status_code for _ in range(CALLS + 1)]
            losing.losing = True
            with pytest.raises(LagoUnavailableError):
                await billing.change_plan("org_1", "pro")
            losing.losing = False
            after = (await http.get("/v1/chat", headers=VICTIM)).status_code
        await middleware.aclose()
    assert before == [200] * CALLS + [429]
    assert [s["plan_code"] for s in fake.subscriptions if s["status"] == "active"] == ["pro"]  # (Lago applied it)
    assert after == 200
