"""FastAPI users of require_quota and the middleware: router-level dependencies with prefixes, BackgroundTasks,
streaming (SSE) endpoints, exception handlers, response_model, docs routes, root_path, mounted sub-apps and
FastAPI lifespans, through httpx.ASGITransport / TestClient and the Lago emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, require_quota
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3)


async def authenticate(request: Request) -> None:
    org = request.headers.get("authorization", "").removeprefix("Bearer ")
    if not org:
        raise HTTPException(401, "who are you")
    request.state.org_id = org


def installed(app: Any) -> OrgBillingMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    return layer


@asynccontextmanager
async def served(
    app: FastAPI, fake: FakeLago, clock: Clock, root_path: str = "", **changes: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, **changes)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app.add_middleware(OrgBillingMiddleware, settings=settings, quota=gate, client=lago)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http
        middleware = installed(app)
        assert await middleware.pipeline.flush(5)
        await middleware.aclose()


BEARER = {"Authorization": "Bearer org_1"}


async def test_router_dependencies_with_prefix(fake: FakeLago, clock: Clock) -> None:
    router = APIRouter(dependencies=[Depends(authenticate), Depends(require_quota)])

    @router.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    async with served(app, fake, clock) as http:
        statuses = [(await http.get(f"/v1/items/{n}", headers=BEARER)).status_code for n in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert [e["properties"]["endpoint"] for e in fake.events] == ["/v1/items/{item_id}"] * 3


async def test_background_task_failing_after_the_answer(fake: FakeLago, clock: Clock) -> None:
    """A BackgroundTasks job that raises after a 200 went out: the client got its answer, so it is billed."""
    ran: list[str] = []

    def job() -> None:
        ran.append("job")
        raise RuntimeError("background job bug")

    app = FastAPI()

    @app.get("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def chat(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(job)
        return {"ok": "yes"}

    async with served(app, fake, clock) as http:
        statuses = [(await http.get("/v1/chat", headers=BEARER)).status_code for _ in range(4)]
        middleware = installed(app)
    assert ran == ["job"] * 3
    assert statuses == [200, 200, 200, 429]
    assert len(fake.events) == 3, middleware.stats


async def test_sse_stream_gated(fake: FakeLago, clock: Clock) -> None:
    app = FastAPI()

    @app.get("/v1/events", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def events() -> StreamingResponse:
        async def gen() -> AsyncIterator[str]:
            for n in range(3):
                yield f"data: {n}\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    async with served(app, fake, clock) as http:
        answers = [await http.get("/v1/events", headers=BEARER) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-remaining"] == "2"
    assert answers[0].text.count("data:") == 3
    assert answers[3].headers["content-type"] == "application/problem+json"
    assert len(fake.events) == 3


async def test_handler_of_all_errors_as_json(fake: FakeLago, clock: Clock) -> None:
    """An app turning every error (Exception handler) and LagoIntegrationError into JSON: still the gate's 429."""
    from lago_org_billing import LagoIntegrationError

    app = FastAPI()

    @app.exception_handler(LagoIntegrationError)
    async def lago_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "billing"}, status_code=503)

    @app.get("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def chat() -> dict[str, str]:
        return {"ok": "yes"}

    async with served(app, fake, clock) as http:
        answers = [await http.get("/v1/chat", headers=BEARER) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[3].json()["type"].endswith("quota-exceeded") or "org_id" in answers[3].json()


class Out(BaseModel):
    id: int


async def test_response_model_and_http_exception(fake: FakeLago, clock: Clock) -> None:
    app = FastAPI()

    @app.get("/v1/items/{n}", response_model=Out, dependencies=[Depends(authenticate), Depends(require_quota)])
    async def item(n: int) -> Any:
        if n == 0:
            raise HTTPException(404, "no such item")
        return {"id": n, "secret": "x"}

    async with served(app, fake, clock) as http:
        ok = await http.get("/v1/items/1", headers=BEARER)
        missing = await http.get("/v1/items/0", headers=BEARER)
        anonymous = await http.get("/v1/items/1")
    assert ok.json() == {"id": 1} and ok.headers["ratelimit-remaining"] == "2"
    assert missing.status_code == 404 and missing.headers["ratelimit-remaining"] == "1"
    assert anonymous.status_code == 401
    assert len(fake.events) == 2


async def test_docs_routes_of_anonymous_callers(fake: FakeLago, clock: Clock) -> None:
    app = FastAPI()

    @app.get("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def chat() -> dict[str, str]:
        return {"ok": "yes"}

    async with served(app, fake, clock) as http:
        assert (await http.get("/docs")).status_code == 200
        assert (await http.get("/openapi.json")).status_code == 200
    assert fake.events == []


async def test_root_path(fake: FakeLago, clock: Clock) -> None:
    app = FastAPI()

    @app.get("/v1/items/{n}", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def item(n: int) -> dict[str, int]:
        return {"id": n}

    async with served(app, fake, clock, root_path="/api", exclude_paths=("/v1/items/3",)) as http:
        a = await http.get("/api/v1/items/1", headers=BEARER)
        b = await http.get("/api/v1/items/2", headers=BEARER)
        c = await http.get("/api/v1/items/3", headers=BEARER)
    assert (a.status_code, b.status_code, c.status_code) == (200, 200, 200)
    assert [e["properties"]["endpoint"] for e in fake.events] == ["/v1/items/{n}"] * 2


async def test_mounted_fastapi_sub_app(fake: FakeLago, clock: Clock) -> None:
    sub = FastAPI()

    @sub.get("/items/{n}", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def item(n: int) -> dict[str, int]:
        return {"id": n}

    app = FastAPI()
    app.mount("/sub", sub)
    async with served(app, fake, clock) as http:
        statuses = [(await http.get(f"/sub/items/{n}", headers=BEARER)).status_code for n in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert [e["properties"]["endpoint"] for e in fake.events] == ["/sub/items/{n}"] * 3


def test_fastapi_lifespan_with_the_middleware(fake_lago_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """FastAPI(lifespan=...) with its state, the middleware added: the app's lifespan runs once, its state reaches
    the endpoint, the middleware delivers at shutdown and never says it got no lifespan."""
    from fastapi.testclient import TestClient

    seed(fake_lago_server, starter_calls=2)
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        seen.append("start")
        yield {"model": "m1"}
        seen.append("stop")

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota)])
    async def chat(request: Request) -> dict[str, str]:
        return {"model": request.state.model}

    settings = BillingSettings(api_url=fake_lago_server.url, api_key=fake_lago_server.api_key, max_retries=0)
    app.add_middleware(OrgBillingMiddleware, settings=settings)
    with TestClient(app) as http:
        answers = [http.get("/v1/chat", headers=BEARER) for _ in range(3)]
    assert seen == ["start", "stop"]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].json() == {"model": "m1"}
    assert len(fake_lago_server.events) == 2
    assert "no ASGI lifespan" not in caplog.text


async def connection_auth(connection: HTTPConnection) -> None:
    connection.state.org_id = "org_1"


def test_router_dependencies_cover_a_websocket_route(fake: FakeLago, clock: Clock) -> None:
    """An APIRouter whose dependencies include require_quota and which also has a websocket route: the websocket
    (passed through unbilled, ungated) still connects instead of failing on require_quota."""
    from fastapi.testclient import TestClient

    router = APIRouter(dependencies=[Depends(connection_auth), Depends(require_quota)])

    @router.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    @router.get("/chat")
    async def chat() -> dict[str, str]:
        return {"ok": "yes"}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, quota_mode="off")
    app.add_middleware(OrgBillingMiddleware, settings=settings)
    with TestClient(app) as http:
        with http.websocket_connect("/v1/ws") as socket:
            assert socket.receive_text() == "hi"
