"""``require_quota`` after the app's auth gates the org that auth set, when the header named another.

With ``LAGO_ORG_HEADER=X-Org-Id`` and the app's real auth in a FastAPI dependency (``request.state.org_id``), the
middleware gates a request as the header's org before the app runs, then bills it to the org the auth set. A caller
whose own org (``acme``: a free plan, 5 calls) is over its limit named an org with quota (``globex``: 10,000 calls) in
the header and was served without limit: billed to acme, never refused. ``Depends(require_quota)`` after the auth
returned ``None`` (the org was known before the app ran).

Now ``require_quota`` gates such a request again as the real org: refused with the gate's 429 (headers, problem body)
over its limit; allowed, the real org's call is reserved and counted and the header org's released (exactly one call
counted, on the real org; nothing left in flight, in process and in Redis), and the ``RateLimit-*`` headers of the
answer are the real org's. Without ``require_quota`` the request is billed to the real org as before, and the WARNING
about reattributed requests says that ``require_quota`` after the auth closes the gap.

The Lago emulator on a clock that does not move (no snapshot refreshed while a test runs): the gate's counts are its
own.
"""

from __future__ import annotations

import gc
import logging
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from hypercorn.middleware import ProxyFixMiddleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, get_current_org, require_quota
from lago_org_billing._identity import billing_scope
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

#: acme's calls a period (``seed``'s ``starter`` plan); globex is on ``pro`` (10,000).
CALLS = 5
#: The caller: acme's own key, naming globex in the header.
SPOOFED = {"Authorization": "Bearer acme-key", "X-Org-Id": "globex"}
KEYS = {"Bearer acme-key": "acme", "Bearer globex-key": "globex"}
REATTRIBUTED_SAID = "was billed to org 'acme'"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=CALLS)
    fake.add_customer("acme")
    fake.add_subscription("acme", "starter")
    fake.add_customer("globex")
    fake.add_subscription("globex", "pro")
    return fake


async def authenticate(request: Request) -> None:
    """The app's auth: the org of the caller's key (what the header says is only the client's claim)."""
    org = KEYS.get(request.headers.get("authorization", ""))
    if org is None:
        raise HTTPException(401, "bad key")
    request.state.org_id = org


def chat_app(*, gated: bool = True, answer: int = 200) -> FastAPI:
    """``POST /v1/chat`` behind the auth (and ``require_quota`` after it when ``gated``), answering ``answer``;
    ``POST /v1/open`` behind the auth alone."""
    app = FastAPI()
    dependencies = [Depends(authenticate), Depends(require_quota)] if gated else [Depends(authenticate)]

    @app.post("/v1/chat", dependencies=dependencies)
    async def chat(request: Request) -> dict[str, Any]:
        if answer != 200:
            raise HTTPException(answer, "the endpoint's own answer")
        return {"org": get_current_org(request)}

    @app.post("/v1/open", dependencies=[Depends(authenticate)])
    async def open_chat() -> dict[str, bool]:
        return {"ok": True}

    return app


class Served:
    def __init__(self, http: httpx.AsyncClient, gate: QuotaGate, fake: FakeLago) -> None:
        self.http = http
        self.gate = gate
        self.fake = fake
        self.middleware: OrgBillingMiddleware | None = None

    async def post(self, path: str = "/v1/chat", headers: dict[str, str] = SPOOFED) -> httpx.Response:
        return await self.http.post(path, headers=headers)

    async def counted(self, org_id: str) -> tuple[int, int]:
        """(calls recorded, calls in flight) the gate holds for the org, beyond what Lago had when it was read."""
        backend = self.gate.backend
        if isinstance(backend, RedisBackend):
            await backend.flush()
            held = await backend.redis.hgetall(backend.key(org_id, "count"))
            recorded = sum(int(v) for k, v in held.items() if k.startswith(b"c:"))
            return recorded, sum(int(v) for k, v in held.items() if k.startswith(b"i:"))
        state = self.gate.local._orgs.get(org_id)
        if state is None:
            return 0, 0
        return sum(state.counts.c.values()), sum(state.counts.i.values())

    def billed(self) -> list[tuple[str, int]]:
        return [(e["external_subscription_id"], e["properties"]["status_code"]) for e in self.fake.events]


def installed(app: Any) -> OrgBillingMiddleware:
    layer = app.middleware_stack if isinstance(app, FastAPI) else app
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    return layer


@asynccontextmanager
async def served(
    fake: FakeLago, clock: Clock, app: Any, redis: str | None, how: str = "added"
) -> AsyncIterator[Served]:
    """``app`` behind the billing middleware (org from ``X-Org-Id``, a gate on the emulator, in process or on Redis):
    ``how`` is ``added`` (``app.add_middleware``), ``wrapped`` (around the app: its error middlewares inside) or
    ``proxied`` (around hypercorn's ``ProxyFixMiddleware``, which runs the app on a deep copy of the scope). Every
    event is delivered to the emulator when the block ends."""
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", max_retries=0, org_header="X-Org-Id", redis_url=redis, quota_mode="enforce"
    )
    config = QuotaConfig(redis_prefix=f"late:{uuid.uuid4().hex[:8]}:") if redis else QuotaConfig()
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=config, clock=clock.time)
        options: dict[str, Any] = {"settings": settings, "quota": gate, "client": lago}
        asgi: Any = app
        if how == "added":
            app.add_middleware(OrgBillingMiddleware, **options)
        elif how == "wrapped":
            asgi = OrgBillingMiddleware(app, **options)
        else:
            asgi = OrgBillingMiddleware(ProxyFixMiddleware(app), **options)
        transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            serving = Served(http, gate, fake)
            try:
                yield serving
            finally:
                billing = installed(asgi)
                serving.middleware = billing
                assert await billing.pipeline.flush(5)
                await billing.aclose()


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


async def test_a_caller_over_its_limit_is_refused_whatever_org_it_names(
    fake: FakeLago, clock: Clock, redis: str | None
) -> None:
    """acme (5 calls) names globex in ``X-Org-Id``: its first 5 calls are served, the next two answered the gate's 429
    for acme (problem body, ``Retry-After``) without reaching the endpoint. Billed: acme's 5; acme's gate count holds
    5 recorded calls, none in flight; globex holds nothing (its reservations released). Before: 7 x 200."""
    async with served(fake, clock, chat_app(), redis) as app:
        answers = [await app.post() for _ in range(CALLS + 2)]
        acme, globex = await app.counted("acme"), await app.counted("globex")
    assert [answer.status_code for answer in answers] == [200] * CALLS + [429] * 2
    assert [answer.json() for answer in answers[:CALLS]] == [{"org": "acme"}] * CALLS
    refused = answers[-1]
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["org_id"] == "acme" and refused.json()["status"] == 429
    assert int(refused.headers["retry-after"]) > 0
    assert app.billed() == [("acme", 200)] * CALLS
    assert (acme, globex) == ((CALLS, 0), (0, 0))
    assert app.middleware is not None and app.middleware.stats["blocked"] == 2


async def test_the_allowed_answers_carry_the_real_orgs_ratelimit_headers(fake: FakeLago, clock: Clock) -> None:
    """The ``RateLimit-*`` headers of a call gated again are acme's (limit 5, remaining 4 down to 0), not those of
    globex, which the header named (limit 10,000), and appear once."""
    async with served(fake, clock, chat_app(), None) as app:
        answers = [await app.post() for _ in range(CALLS)]
    assert [answer.headers.get_list("ratelimit-limit") for answer in answers] == [["5"]] * CALLS
    assert [answer.headers["ratelimit-remaining"] for answer in answers] == ["4", "3", "2", "1", "0"]


@pytest.mark.parametrize(("answer", "billed"), [(404, True), (403, False), (500, False)])
async def test_a_call_gated_again_counts_once_on_the_real_org_whatever_its_answer(
    fake: FakeLago, clock: Clock, redis: str | None, answer: int, billed: bool
) -> None:
    """The endpoint answers after ``require_quota`` allowed acme: its own 404 (billed: acme's call recorded), a 403
    (an auth failure, not billed) or a 500 (not billed): acme's reserved call recorded or released, globex's released;
    nothing left in flight, nothing counted on globex."""
    async with served(fake, clock, chat_app(answer=answer), redis) as app:
        [response] = [await app.post()]
        acme, globex = await app.counted("acme"), await app.counted("globex")
    assert response.status_code == answer
    assert app.billed() == ([("acme", answer)] if billed else [])
    assert (acme, globex) == ((1 if billed else 0, 0), (0, 0))


@pytest.mark.parametrize("how", ["wrapped", "proxied"])
async def test_the_refusal_is_the_gates_answer_around_the_app_and_behind_a_copying_proxy(
    fake: FakeLago, clock: Clock, how: str
) -> None:
    """The middleware wrapped around the FastAPI app (whose own exception middlewares answer ``require_quota``'s error
    first), or around hypercorn's ``ProxyFixMiddleware`` (the app runs on a deep copy of the scope, its auth sets
    that copy's ``request.state``): the same 5 calls served with acme's headers, then the gate's 429 problem."""
    async with served(fake, clock, chat_app(), None, how) as app:
        answers = [await app.post(headers={**SPOOFED, "X-Forwarded-Proto": "https"}) for _ in range(CALLS + 1)]
        acme, globex = await app.counted("acme"), await app.counted("globex")
    assert [answer.status_code for answer in answers] == [200] * CALLS + [429]
    assert [answer.headers["ratelimit-remaining"] for answer in answers[:CALLS]] == ["4", "3", "2", "1", "0"]
    assert answers[-1].headers["content-type"] == "application/problem+json"
    assert answers[-1].json()["org_id"] == "acme"
    assert app.billed() == [("acme", 200)] * CALLS
    assert (acme, globex) == ((CALLS, 0), (0, 0))


async def test_the_refusal_no_exception_handler_answers_is_the_gates_answer(
    redis: str | None, fake: FakeLago, clock: Clock
) -> None:
    """A bare Starlette ``Router`` (no exception middleware) whose endpoint sets the org and awaits ``require_quota``:
    its refusal reaches the middleware unanswered, which answers the gate's 429 (not a 500); nothing billed or left in
    flight for the refused call."""

    async def chat(request: Request) -> Response:
        await authenticate(request)
        await require_quota(request)
        return JSONResponse({"ok": True})

    async with served(fake, clock, Router([Route("/v1/chat", chat, methods=["POST"])]), redis, "wrapped") as app:
        answers = [await app.post() for _ in range(CALLS + 1)]
        acme, globex = await app.counted("acme"), await app.counted("globex")
    assert [answer.status_code for answer in answers] == [200] * CALLS + [429]
    assert answers[-1].json()["org_id"] == "acme" and "retry-after" in answers[-1].headers
    assert app.billed() == [("acme", 200)] * CALLS
    assert (acme, globex) == ((CALLS, 0), (0, 0))
    assert app.middleware is not None and app.middleware.stats["blocked"] == 1


async def test_require_quota_twice_and_the_same_org_in_the_header_count_one_call(fake: FakeLago, clock: Clock) -> None:
    """``require_quota`` in the router's dependencies and the route's (called twice): one call gated again, counted
    once. A caller naming its own org is gated before the app as before (``require_quota`` adds nothing): its sixth
    call is refused before the app runs."""
    router = APIRouter(dependencies=[Depends(authenticate), Depends(require_quota)])

    @router.post("/chat", dependencies=[Depends(require_quota)])
    async def chat() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    async with served(fake, clock, app, None) as served_app:
        spoofed = [(await served_app.post()).status_code for _ in range(3)]
        own = {"Authorization": "Bearer acme-key", "X-Org-Id": "acme"}
        honest = [(await served_app.post(headers=own)).status_code for _ in range(3)]
        acme, globex = await served_app.counted("acme"), await served_app.counted("globex")
    assert spoofed == [200] * 3 and honest == [200, 200, 429]
    assert (acme, globex) == ((CALLS, 0), (0, 0))


async def test_an_org_changed_again_after_require_quota_leaves_nothing_in_flight(fake: FakeLago, clock: Clock) -> None:
    """A dependency after ``require_quota`` sets yet another org (org_1): billed to it, as before; acme's call reserved
    by ``require_quota`` released, globex's too."""

    async def switch(request: Request) -> None:
        request.state.org_id = "org_1"

    app = FastAPI()

    @app.post("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota), Depends(switch)])
    async def chat() -> dict[str, bool]:
        return {"ok": True}

    async with served(fake, clock, app, None) as served_app:
        answer = await served_app.post()
        acme, globex = await served_app.counted("acme"), await served_app.counted("globex")
    assert answer.status_code == 200
    assert served_app.billed() == [("org_1", 200)]
    assert (acme, globex) == ((0, 0), (0, 0))


async def test_without_require_quota_the_call_is_billed_to_the_real_org_and_the_warning_says_how_to_gate_it(
    fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``/v1/open`` has no ``require_quota``: acme's 7 calls naming globex are served and billed to acme (as before),
    and the WARNING about reattributed requests (once) says that ``require_quota`` after the auth gates them as the
    org it set. Calls that ``require_quota`` gated again (``/v1/chat`` first) are not said: their gap is closed."""
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.middleware"):
        async with served(fake, clock, chat_app(), None) as app:
            gated = [(await app.post()).status_code for _ in range(2)]
            assert said(caplog, REATTRIBUTED_SAID) == []
            open_calls = [(await app.post("/v1/open")).status_code for _ in range(CALLS + 2)]
    assert gated == [200] * 2 and open_calls == [200] * (CALLS + 2)
    assert [org for org, _ in app.billed()] == ["acme"] * (CALLS + 4)
    [warning] = said(caplog, REATTRIBUTED_SAID)
    assert "Depends(require_quota) after your auth" in warning
    assert "gates nothing" not in warning
    assert app.middleware is not None and app.middleware.stats["reattributed"] == CALLS + 4


class Marker:
    """An object the request's billing dict holds: alive after the request only if that dict is."""


@pytest.mark.parametrize("named", ["globex", "acme"], ids=["gated-again", "gated-once"])
async def test_the_billing_dict_is_freed_without_the_cyclic_collector(fake: FakeLago, clock: Clock, named: str) -> None:
    """The billing dict of a request gated before the app ran holds its response watcher (for ``require_quota``),
    which refers back to it: with the cyclic collector off, a marker the endpoint put in that dict is freed once the
    request is over, gated again or not (the watcher is let go when the request ends)."""
    freed: list[weakref.ref[Marker]] = []

    async def chat(request: Request) -> Response:
        await authenticate(request)
        await require_quota(request)
        marker = Marker()
        billing = billing_scope(request)
        assert billing is not None
        billing["marker"] = marker
        freed.append(weakref.ref(marker))
        return JSONResponse({"ok": True})

    app = Router([Route("/v1/chat", chat, methods=["POST"])])
    async with served(fake, clock, app, None, "wrapped") as served_app:
        await served_app.post()  # (the org read from Lago before: nothing pending while measured)
        gc.collect()
        gc.disable()
        try:
            answer = await served_app.post(headers={**SPOOFED, "X-Org-Id": named})
            alive = freed[-1]() is not None
        finally:
            gc.enable()
    assert answer.status_code == 200
    assert not alive
