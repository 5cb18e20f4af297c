"""A stronger identity source holding a value that is no id (``bytes`` from Redis, a float, an object) leaves the
request unresolved, said at WARNING: it never falls through to the client's header (the org the client names billed
for another org's call). And an excluded prefix followed by dot segments left percent-encoded is billed."""

from __future__ import annotations

import logging
import posixpath
import re
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware, get_current_org
from lago_org_billing._identity import first_of, from_header, reset_warnings, resolve_now

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    """The emulator with orgs ``org_a`` and ``org_b`` subscribed to a free plan."""
    fake_lago.add_plan("starter", amount_cents=0)
    for org in ("org_a", "org_b"):
        fake_lago.add_subscription(org, "starter", external_id=org)
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


@pytest.fixture
async def make_middleware(
    fake_lago: Any, settings: BillingSettings
) -> AsyncIterator[Callable[..., OrgBillingMiddleware]]:
    made: list[OrgBillingMiddleware] = []

    def make(app: Any, **kwargs: Any) -> OrgBillingMiddleware:
        kwargs.setdefault("settings", settings)
        middleware = OrgBillingMiddleware(app, transport=fake_lago.transport(), **kwargs)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        await middleware.aclose()


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def billed(fake_lago: Any) -> list[str]:
    return [event["external_subscription_id"] for event in fake_lago.events]


# --------------------------------------------- a source holding something that is no id: no fall-through to the header


@pytest.mark.parametrize("value", [b"org_a", 17.0, True, ["org_a"]], ids=["bytes", "float", "bool", "list"])
async def test_state_org_id_of_bytes_is_not_replaced_by_the_org_the_client_names_in_the_header(
    value: object,
    fake_lago: Any,
    settings: BillingSettings,
    make_middleware: Callable[..., OrgBillingMiddleware],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app's auth sets ``request.state.org_id`` to the caller's org as it read it from Redis (redis-py returns
    ``bytes`` unless ``decode_responses=True``): ``b"org_a"``. ``LAGO_ORG_HEADER`` is set as the documented fallback,
    and the client sends ``X-Org-Id: org_b``. Before, the bytes read as "no id" without a word, and the chain fell
    through to the header: ``org_b`` was billed (and gated) for ``org_a``'s call, and the app was told
    ``get_current_org() == "org_b"``. Now the request is unresolved (served unbilled under the default policy), and
    the value of the wrong type is said, naming request.state.org_id."""
    caplog.set_level(logging.WARNING, logger="lago_org_billing")

    async def org_from_redis(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["org_id"] = value  # redis.get(...) without decode_responses
        await middleware(scope, receive, send)

    async def whoami(request: Request) -> Response:
        return JSONResponse({"org": get_current_org(request)})

    middleware = make_middleware(
        Starlette(routes=[Route("/v1/whoami", whoami)]), settings=settings.replace(org_header="X-Org-Id"), quota=None
    )
    async with client_for(org_from_redis) as client:
        response = await client.get("/v1/whoami", headers={"X-Org-Id": "org_b"})
    assert response.status_code == 200
    assert await middleware.pipeline.flush(5)
    assert "org_b" not in billed(fake_lago), "org_b billed for a call the app's auth attributed to org_a"
    assert response.json() == {"org": None}
    assert middleware.stats["unresolved"] == 1
    assert any("request.state.org_id" in record.getMessage() for record in caplog.records)


async def test_user_org_id_of_bytes_is_not_replaced_by_the_org_the_client_names_in_the_header(
    fake_lago: Any,
    settings: BillingSettings,
    make_middleware: Callable[..., OrgBillingMiddleware],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same with the org in ``request.user.org_id`` (an auth middleware setting ``scope["user"]``): unresolved,
    said naming request.user.org_id; under ``LAGO_ON_UNRESOLVED=reject``, refused rather than billed to org_b."""
    caplog.set_level(logging.WARNING, logger="lago_org_billing")

    async def auth(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["user"] = types.SimpleNamespace(is_authenticated=True, org_id=b"org_a", identity="ann")
        await middleware(scope, receive, send)

    async def whoami(request: Request) -> Response:
        return JSONResponse({"org": get_current_org(request)})

    middleware = make_middleware(
        Starlette(routes=[Route("/v1/whoami", whoami)]),
        settings=settings.replace(org_header="X-Org-Id", on_unresolved="reject"),
        quota=None,
    )
    async with client_for(auth) as client:
        response = await client.get("/v1/whoami", headers={"X-Org-Id": "org_b"})
    assert response.status_code == 401
    assert await middleware.pipeline.flush(5)
    assert billed(fake_lago) == []
    assert any("request.user.org_id" in record.getMessage() for record in caplog.records)


async def test_state_org_id_of_bytes_set_by_a_dependency_is_not_replaced_by_the_header_org(
    fake_lago: Any,
    settings: BillingSettings,
    make_middleware: Callable[..., OrgBillingMiddleware],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same with the auth in a FastAPI dependency (the README's pattern): the org it sets while the app runs wins
    over the header's (``late_identity``). Before, only a ``str`` did: ``b"org_a"`` was ignored and the client's
    ``X-Org-Id: org_b`` was billed. Now the request is left unbilled (and the app told no org), said at WARNING."""
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    fastapi = pytest.importorskip("fastapi")

    def authenticate(request: Request) -> None:
        request.state.org_id = b"org_a"  # the caller's verified org, as Redis returned it

    app = fastapi.FastAPI()

    @app.get("/v1/whoami", dependencies=[fastapi.Depends(authenticate)])
    async def whoami(request: Request) -> dict[str, Any]:
        return {"org": get_current_org(request)}

    middleware = make_middleware(app, settings=settings.replace(org_header="X-Org-Id"), quota=None)
    async with client_for(middleware) as client:
        response = await client.get("/v1/whoami", headers={"X-Org-Id": "org_b"})
    assert response.status_code == 200
    assert await middleware.pipeline.flush(5)
    assert "org_b" not in billed(fake_lago), "org_b billed for a call the app's auth attributed to org_a"
    assert response.json() == {"org": None}
    assert any("request.state.org_id" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_first_of_resolver_returning_bytes_does_not_fall_through_to_the_header(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``first_of(tenant_of, from_header("X-Org-Id"))`` with ``tenant_of`` returning ``b"org_a"``: the warning says
    "the request is treated as unresolved", and it is. Before, ``first_of`` went on to the header and resolved the
    client's ``org_b``, though it documents that a failing resolver does not fall through "to a later, possibly
    weaker, source such as a header"; a resolver returning a value that is never an id is as broken."""
    caplog.set_level(logging.WARNING, logger="lago_org_billing")

    def tenant_of(scope: Any) -> Any:
        return b"org_a"

    async def tenant_of_async(scope: Any) -> Any:
        return b"org_a"

    scope = {"type": "http", "headers": [(b"x-org-id", b"org_b")]}
    resolved = resolve_now(first_of(tenant_of_async if is_async else tenant_of, from_header("X-Org-Id")), scope)
    if is_async:
        assert isinstance(resolved, Awaitable)
        resolved = await resolved
    assert resolved is None
    assert any("treated as unresolved" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------- excluded prefixes followed by percent-encoded dot segments


def _nginx_normalised(raw_path: bytes) -> str:
    """A path as nginx (or Cloudflare's URL normalisation) reads it before routing or proxying it on: percent-encoded
    unreserved characters decoded (RFC 3986 6.2.2.2, ``%2E`` is ``.``), then dot segments removed (6.2.2.3)."""
    text = re.sub(rb"%2[eE]", b".", raw_path).decode("ascii")
    return posixpath.normpath(unquote(text))


async def test_excluded_prefix_followed_by_percent_encoded_dot_segments_is_billed(
    fake_lago: Any, settings: BillingSettings, make_middleware: Callable[..., OrgBillingMiddleware]
) -> None:
    """CHANGELOG: "``LAGO_EXCLUDE_PATHS=/health`` excluded ``/health/../v1/chat`` (sent as is, or ``%2e%2e``) ... A
    path with ``.`` or ``..`` segments is never taken as excluded". One more encoding got through: a client sends
    ``/health/%252e%252e/v1/chat``; the server decodes it once into the path ``/health/%2e%2e/v1/chat``, which was not
    seen as dot segments, so it was excluded. An LLM gateway's catch-all route forwards the path upstream with httpx,
    which sends ``%2e%2e`` as is; an upstream behind nginx or Cloudflare normalises it to ``/v1/chat`` and serves the
    call. Now it is billed, as ``/health/../v1/chat`` is."""

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse({"served": _nginx_normalised(scope["raw_path"])})(scope, receive, send)

    async def forward(request: Request) -> Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream)) as up:
            answer = await up.get("http://upstream/" + request.path_params["rest"])
        return JSONResponse(answer.json())

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/health", health), Route("/{rest:path}", forward)])
    middleware = make_middleware(
        app, settings=settings.replace(org_header="X-Org-Id", exclude_paths=("/health",)), quota=None
    )
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    raw_path = b"/health/%252e%252e/v1/chat"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),  # as uvicorn gives it: decoded once -> /health/%2e%2e/v1/chat
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"x-org-id", b"org_a")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }
    await middleware(scope, receive, send)
    assert sent[0]["status"] == 200 and b'"/v1/chat"' in sent[1]["body"]  # what the upstream served
    assert await middleware.pipeline.flush(5)
    assert middleware.stats["excluded"] == 0
    assert billed(fake_lago) == ["org_a"]


@pytest.mark.parametrize(
    "path",
    [
        "/health/%2e%2e/v1/chat",
        "/health/%2E./v1/chat",
        "/health/.%2e",
        "/health/x%2f..%2f..%2fv1/chat",
        "/health/x\\..\\..\\v1/chat",
        "/health/..\\v1/chat",
    ],
)
def test_excluded_prefix_followed_by_encoded_dot_segments_or_backslashes_is_not_excluded(path: str) -> None:
    """Dot segments the server left percent-encoded (``%2e``, ``%2f`` for the slash) or written with ``\\`` (IIS
    reads it as ``/``) are dot segments: the path is not taken as the excluded one it starts with. A ``%`` that
    encodes something else, or an excluded path without dot segments, is excluded as before."""
    middleware = OrgBillingMiddleware(Starlette(), settings=BillingSettings(api_key="k", exclude_paths=("/health",)))
    assert not middleware._is_excluded(path, "")
    assert middleware._is_excluded("/health/%41%2e", "")  # ("A.": no dot segment)
    assert middleware._is_excluded("/health/live%20check", "")
