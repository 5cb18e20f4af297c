"""Answers 401 and 403 the app gives are not billed by default (``LAGO_BILL_AUTH_FAILURES``).

With the org read from a request header (``LAGO_ORG_HEADER``) and the app's own auth in a FastAPI dependency, anyone
sending ``X-Org-Id: victim`` with bad credentials was answered 401/403 by the app, yet the victim org was billed and
its quota consumed: no service was rendered by such an answer. The middleware's own rejections are never billed
anyway; ``LAGO_BILL_AUTH_FAILURES=true`` (or ``bill_auth_failures=True``) bills the app's as before. Other 4xx answers
of endpoints (402, 404, 422) are billed as before.

Also realistic FastAPI stacks and the routes their events carry: routers with prefixes included twice, ``{path:path}``
converters, a ``root_path`` from a proxy, ``HEAD`` on a ``GET`` route, 405, the ``redirect_slashes`` 307, a
``StaticFiles`` mount, exception handlers turning exceptions into 4xx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, ConfigurationError, LagoClient, OrgBillingMiddleware, require_quota
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

#: The victim org's three calls (``seed``'s ``starter`` plan), and the header a spoofer sends.
CALLS = 3
VICTIM = {"X-Org-Id": "org_1"}
GOOD = {**VICTIM, "Authorization": "Bearer good"}
BAD = {**VICTIM, "Authorization": "Bearer stolen-or-guessed"}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=CALLS)


def installed(app: Any) -> OrgBillingMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    return layer


@asynccontextmanager
async def served(
    app: FastAPI,
    fake: FakeLago,
    clock: Clock,
    *,
    settings: BillingSettings | None = None,
    root_path: str = "",
    **middleware: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` behind the billing middleware (org from ``X-Org-Id``, a quota gate on the emulator); every event is
    delivered to the emulator when the block ends."""
    if settings is None:
        settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, org_header="X-Org-Id")
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app.add_middleware(OrgBillingMiddleware, settings=settings, quota=gate, client=lago, **middleware)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http
        billing = installed(app)
        assert await billing.pipeline.flush(5)
        await billing.aclose()


def check_key(status: int) -> Any:
    """The app's own auth: a dependency answering ``status`` to a caller without the right key."""

    async def dependency(request: Request) -> None:
        if request.headers.get("authorization") != "Bearer good":
            raise HTTPException(status, "bad credentials")

    return dependency


def guarded_app(status: int) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat", dependencies=[Depends(check_key(status))])
    async def chat() -> dict[str, bool]:
        return {"ok": True}

    return app


def endpoints(fake: FakeLago) -> list[tuple[str, str, int]]:
    """(method, endpoint, status) of each event the emulator got."""
    return [(p["method"], p["endpoint"], p["status_code"]) for p in (e["properties"] for e in fake.events)]


# ------------------------------------------------------------------------------------------------- Task A


@pytest.mark.parametrize("status", [401, 403])
async def test_a_spoofed_org_answered_401_or_403_by_the_app_is_neither_billed_nor_counted(
    fake: FakeLago, clock: Clock, status: int
) -> None:
    """Bad credentials with ``X-Org-Id: victim`` cost the victim nothing: no event, and its quota is whole."""
    app = guarded_app(status)
    async with served(app, fake, clock) as http:
        spoofed = [(await http.post("/v1/chat", headers=BAD)).status_code for _ in range(10)]
        good = [(await http.post("/v1/chat", headers=GOOD)).status_code for _ in range(CALLS + 1)]
        middleware = installed(app)
    assert spoofed == [status] * 10
    assert good == [200] * CALLS + [429]  # the victim's calls are all there, then the gate says no
    assert endpoints(fake) == [("POST", "/v1/chat", 200)] * CALLS
    assert middleware.stats["unbilled_auth_failures"] == 10
    assert middleware.stats["billed"] == CALLS and middleware.stats["requests"] == 10 + CALLS + 1
    assert middleware.stats["unrouted"] == 0 and middleware.stats["unbilled_errors"] == 0


async def test_fastapis_own_bearer_check_is_not_billed(fake: FakeLago, clock: Clock) -> None:
    """FastAPI's ``HTTPBearer`` answering a request without credentials (401 or 403 by FastAPI's version) is not
    billed to the org its header names."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models(key: Annotated[HTTPAuthorizationCredentials, Depends(HTTPBearer())]) -> dict[str, str]:
        return {"key": key.credentials}

    async with served(app, fake, clock) as http:
        answers = [(await http.get("/v1/models", headers=VICTIM)).status_code for _ in range(5)]
        middleware = installed(app)
    assert answers[0] in (401, 403) and len(set(answers)) == 1
    assert fake.events == [] and middleware.stats["unbilled_auth_failures"] == 5


@pytest.mark.parametrize("status", [401, 403])
async def test_an_org_the_app_sets_then_refuses_releases_require_quotas_call(
    fake: FakeLago, clock: Clock, status: int
) -> None:
    """An org known only once the app's auth ran (``request.state.org_id``), whose call ``require_quota`` reserved,
    then refused by a permission check: no event, the reserved call released, not counted ungated."""

    async def authenticate(request: Request) -> None:
        request.state.org_id = "org_1"

    async def permission(request: Request) -> None:
        if request.headers.get("authorization") != "Bearer good":
            raise HTTPException(status, "not allowed")

    router = APIRouter(dependencies=[Depends(authenticate), Depends(require_quota), Depends(permission)])

    @router.post("/chat")
    async def chat() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with served(app, fake, clock, settings=settings) as http:
        refused = [(await http.post("/v1/chat", headers={"Authorization": "Bearer x"})).status_code for _ in range(6)]
        good = [(await http.post("/v1/chat", headers={"Authorization": "Bearer good"})).status_code for _ in range(4)]
        middleware = installed(app)
    assert refused == [status] * 6
    assert good == [200] * CALLS + [429]
    assert endpoints(fake) == [("POST", "/v1/chat", 200)] * CALLS
    assert middleware.stats["unbilled_auth_failures"] == 6 and middleware.stats["ungated"] == 0


async def test_a_401_with_an_idempotency_key_leaves_the_key_to_the_call_that_succeeds(
    fake: FakeLago, clock: Clock
) -> None:
    """A client retrying with the right credentials and the same ``Idempotency-Key`` after a 401 is billed once, for
    the call served: the 401 took no first timestamp (the 200 was billed as its retry, Lago keeping the 401's)."""
    app = guarded_app(401)
    async with served(app, fake, clock, idempotency_header="Idempotency-Key") as http:
        first = await http.post("/v1/chat", headers={**BAD, "Idempotency-Key": "k1"})
        second = await http.post("/v1/chat", headers={**GOOD, "Idempotency-Key": "k1"})
        middleware = installed(app)
    assert (first.status_code, second.status_code) == (401, 200)
    assert endpoints(fake) == [("POST", "/v1/chat", 200)]
    assert middleware.stats.get("idempotent_retries", 0) == 0


async def test_a_401_with_an_idempotency_key_asks_redis_nothing(fake: FakeLago, clock: Clock, redis_url: str) -> None:
    """With the first timestamps shared in Redis, a 401 is not billed and takes none either: the call served after
    it, with the same key, is the first."""
    app = guarded_app(401)
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", max_retries=0, org_header="X-Org-Id", redis_url=redis_url
    )
    async with served(app, fake, clock, settings=settings, idempotency_header="Idempotency-Key") as http:
        first = await http.post("/v1/chat", headers={**BAD, "Idempotency-Key": "k-redis"})
        second = await http.post("/v1/chat", headers={**GOOD, "Idempotency-Key": "k-redis"})
        middleware = installed(app)
    assert (first.status_code, second.status_code) == (401, 200)
    assert endpoints(fake) == [("POST", "/v1/chat", 200)]
    assert middleware.stats.get("idempotent_retries", 0) == 0


async def test_an_endpoint_taking_options_answering_401_to_a_preflight_shaped_call_is_not_billed(
    fake: FakeLago, clock: Clock
) -> None:
    """A call in a CORS preflight's shape that an endpoint taking ``OPTIONS`` answers 401 (no CORS middleware) is an
    API call refused: counted as a request, not billed."""
    app = FastAPI()

    @app.options("/v1/chat", dependencies=[Depends(check_key(401))])
    async def options() -> dict[str, bool]:
        return {"ok": True}

    preflight = {**BAD, "Origin": "https://site.example", "Access-Control-Request-Method": "POST"}
    async with served(app, fake, clock) as http:
        answer = await http.options("/v1/chat", headers=preflight)
        middleware = installed(app)
    assert answer.status_code == 401
    assert fake.events == []
    assert middleware.stats["unbilled_auth_failures"] == 1 and middleware.stats["requests"] == 1


async def test_the_middlewares_own_rejection_is_counted_unresolved_not_as_an_auth_failure(
    fake: FakeLago, clock: Clock
) -> None:
    """``on_unresolved="reject"``'s 401 is the middleware's: counted in ``unresolved`` only."""
    app = guarded_app(401)
    async with served(app, fake, clock, on_unresolved="reject") as http:
        answer = await http.post("/v1/chat", headers={"Authorization": "Bearer good"})
        middleware = installed(app)
    assert answer.status_code == 401
    assert middleware.stats["unresolved"] == 1 and middleware.stats.get("unbilled_auth_failures", 0) == 0


@pytest.mark.parametrize("how", ["environment", "argument"])
async def test_bill_auth_failures_bills_them_as_before(fake: FakeLago, clock: Clock, how: str) -> None:
    """``LAGO_BILL_AUTH_FAILURES=true`` (or ``bill_auth_failures=True``) bills the app's 401/403 and counts them."""
    environ = {"LAGO_API_URL": fake.base_url, "LAGO_API_KEY": "k", "LAGO_ORG_HEADER": "X-Org-Id"}
    extra: dict[str, Any] = {}
    if how == "environment":
        environ["LAGO_BILL_AUTH_FAILURES"] = "true"
    else:
        extra["bill_auth_failures"] = True
    settings = BillingSettings.from_env(None, environ=environ, max_retries=0)
    app = guarded_app(401)
    async with served(app, fake, clock, settings=settings, **extra) as http:
        answers = [(await http.post("/v1/chat", headers=BAD)).status_code for _ in range(CALLS + 1)]
        middleware = installed(app)
    assert answers == [401] * CALLS + [429]
    assert endpoints(fake) == [("POST", "/v1/chat", 401)] * CALLS
    assert middleware.stats.get("unbilled_auth_failures", 0) == 0


async def test_the_argument_wins_over_the_setting(fake: FakeLago, clock: Clock) -> None:
    """``bill_auth_failures=False`` given to the middleware leaves them unbilled whatever the settings say."""
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", max_retries=0, org_header="X-Org-Id", bill_auth_failures=True
    )
    app = guarded_app(403)
    async with served(app, fake, clock, settings=settings, bill_auth_failures=False) as http:
        answer = await http.post("/v1/chat", headers=BAD)
        middleware = installed(app)
    assert answer.status_code == 403 and fake.events == []
    assert middleware.bill_auth_failures is False and middleware.stats["unbilled_auth_failures"] == 1


async def test_402_404_and_422_of_endpoints_are_billed_as_before(fake: FakeLago, clock: Clock) -> None:
    """Other 4xx answers of endpoints (payment required, not found, a validation error) are still billed."""
    app = FastAPI()

    @app.get("/v1/pay")
    async def pay() -> None:
        raise HTTPException(402, "pay first")

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        if item_id == 0:
            raise HTTPException(404, "no such item")
        return {"id": item_id}

    async with served(app, fake, clock) as http:
        statuses = [
            (await http.get("/v1/pay", headers=VICTIM)).status_code,
            (await http.get("/v1/items/0", headers=VICTIM)).status_code,
            (await http.get("/v1/items/abc", headers=VICTIM)).status_code,
        ]
    assert statuses == [402, 404, 422]
    assert endpoints(fake) == [
        ("GET", "/v1/pay", 402),
        ("GET", "/v1/items/{item_id}", 404),
        ("GET", "/v1/items/{item_id}", 422),
    ]


def test_the_setting_is_read_from_the_environment_and_checked() -> None:
    """``LAGO_BILL_AUTH_FAILURES`` reads as the other switches; a text given in code is refused, not taken as true."""
    read = BillingSettings.from_env(None, environ={"LAGO_BILL_AUTH_FAILURES": "yes"}, require_api_key=False)
    assert read.bill_auth_failures is True
    assert BillingSettings.from_env(None, environ={}, require_api_key=False).bill_auth_failures is False
    assert "bill_auth_failures=False" in repr(BillingSettings())
    with pytest.raises(ConfigurationError, match="LAGO_BILL_AUTH_FAILURES") as info:
        BillingSettings.from_env(None, environ={"LAGO_BILL_AUTH_FAILURES": "perhaps"}, require_api_key=False)
    assert info.value.variable == "LAGO_BILL_AUTH_FAILURES"
    with pytest.raises(ConfigurationError, match="LAGO_BILL_AUTH_FAILURES"):
        BillingSettings(bill_auth_failures="false")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="bill_auth_failures"):
        OrgBillingMiddleware(guarded_app(401), BillingSettings(), quota=None, bill_auth_failures="false")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- Task B


class Conflict(Exception):
    """A domain error the app's exception handler answers 409."""


class SessionExpired(Exception):
    """An auth error the app's exception handler answers 401."""


def fastapi_stack(static: Path) -> FastAPI:
    """A FastAPI app as they are built: one router included twice (under a router with a path parameter in its prefix,
    itself included with a prefix, and on its own), a ``{path:path}`` route, a ``StaticFiles`` mount, exception
    handlers turning domain errors into 4xx."""
    items = APIRouter(prefix="/items")

    @items.get("/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        if item_id == "taken":
            raise Conflict()
        if item_id == "expired":
            raise SessionExpired()
        return {"id": item_id}

    @items.get("/{item_id}/files/{file_path:path}")
    async def item_file(item_id: str, file_path: str) -> dict[str, str]:
        return {"path": file_path}

    orgs = APIRouter(prefix="/orgs/{org}")
    orgs.include_router(items)
    app = FastAPI()
    app.include_router(orgs, prefix="/api/v1")
    app.include_router(items, prefix="/v2")
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": "taken"}, status_code=409)

    @app.exception_handler(SessionExpired)
    async def expired(request: Request, exc: SessionExpired) -> JSONResponse:
        return JSONResponse({"detail": "log in again"}, status_code=401)

    return app


@pytest.mark.parametrize("root_path", ["", "/proxy"])
async def test_a_realistic_fastapi_stack_is_billed_under_its_templates(
    clock: Clock, tmp_path: Path, root_path: str
) -> None:
    """Routes of nested and twice-included routers, ``{path:path}`` converters and a ``StaticFiles`` mount are billed
    under their templates, behind a proxy's ``root_path`` too; an exception handler's 409 is billed, its 401 is not;
    the routing's own answers (``HEAD`` on a FastAPI ``GET`` route and other methods it does not take: 405; the
    ``redirect_slashes`` 307; an unknown path) are not."""
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=100)
    (tmp_path / "a.txt").write_text("a")
    app = fastapi_stack(tmp_path)
    calls = [
        ("GET", "/api/v1/orgs/acme/items/7", 200),
        ("GET", "/v2/items/7", 200),
        ("GET", "/api/v1/orgs/acme/items/7/files/a/b.txt", 200),
        ("GET", "/static/a.txt", 200),
        ("GET", "/static/missing.txt", 404),
        ("GET", "/v2/items/taken", 409),
        ("GET", "/v2/items/expired", 401),
        ("HEAD", "/v2/items/7", 405),
        ("DELETE", "/api/v1/orgs/acme/items/7", 405),
        ("GET", "/v2/items/7/", 307),
        ("GET", "/nope", 404),
    ]
    async with served(app, fake, clock, root_path=root_path) as http:
        statuses = [(await http.request(m, root_path + url, headers=GOOD)).status_code for m, url, _ in calls]
        middleware = installed(app)
    assert statuses == [status for _, _, status in calls]
    assert endpoints(fake) == [
        ("GET", "/api/v1/orgs/{org}/items/{item_id}", 200),
        ("GET", "/v2/items/{item_id}", 200),
        ("GET", "/api/v1/orgs/{org}/items/{item_id}/files/{file_path:path}", 200),
        ("GET", "/static/{path}", 200),
        ("GET", "/static/{path}", 404),
        ("GET", "/v2/items/{item_id}", 409),
    ]
    assert middleware.stats["unrouted"] == 4 and middleware.stats["unbilled_auth_failures"] == 1
