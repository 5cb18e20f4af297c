"""Org ids an auth layer sets as an ``int`` or ``UUID`` it did not build itself: an enum member mixing in ``int``, an
``int`` or ``UUID`` subclass with a ``__str__`` of its own (billed as their number, not as their ``str()``); and values
there that can never be an id (a ``str`` over 255 characters or with control characters, an ``int`` too long: once a
crash of the request): said once, unresolved, never resolved by the client's header instead."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lago_org_billing import BillingSettings, OrgBillingMiddleware, get_current_org
from lago_org_billing._identity import (
    default_identity,
    default_org_resolver,
    from_state,
    from_user,
    reset_warnings,
    resolve_now,
)

pytestmark = pytest.mark.anyio


class Tenant(int, enum.Enum):
    """An enum of ints (not an ``IntEnum``): ``str(Tenant.ACME)`` is ``'Tenant.ACME'``, on every Python."""

    ACME = 7


class Flagged(enum.IntEnum):
    """``str()`` of an ``IntEnum`` member is its number from Python 3.11 only (``'Flagged.ACME'`` on 3.10)."""

    ACME = 8


class OrgPk(int):
    """A primary key type of an ORM, printed with its model's name."""

    def __str__(self) -> str:
        return f"Org #{int(self)}"

    __repr__ = __str__


class OrgUuid(uuid.UUID):
    """A UUID type printed as a URN."""

    def __str__(self) -> str:
        return "urn:uuid:" + uuid.UUID.__str__(self)


ORG_UUID = "00000000-0000-4000-8000-000000000009"

CASES: list[tuple[object, str]] = [
    (Tenant.ACME, "7"),
    (Flagged.ACME, "8"),
    (OrgPk(9), "9"),
    (OrgUuid(ORG_UUID), ORG_UUID),
]


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.mark.parametrize(("value", "expected"), CASES, ids=["int-enum", "IntEnum", "int-subclass", "uuid-subclass"])
def test_an_int_or_uuid_of_a_subclass_resolves_to_its_number_not_its_str(value: object, expected: str) -> None:
    scope: dict[str, Any] = {"type": "http", "headers": [], "state": {"org_id": value, "user_id": value}}
    assert resolve_now(from_state("org_id"), scope) == expected
    settings = BillingSettings(api_url="http://127.0.0.1:9", api_key="k")
    assert default_identity(settings)(scope) == (expected, expected)
    user_scope: dict[str, Any] = {"type": "http", "headers": [], "user": {"org_id": value}}
    assert resolve_now(from_user("org_id"), user_scope) == expected


def test_an_int_too_long_to_be_an_id_is_unresolved_not_an_error() -> None:
    # (str() of an int over 4300 digits raises ValueError: the request's identity crashed with it)
    huge = 10**5000
    scope: dict[str, Any] = {"type": "http", "headers": [(b"x-org-id", b"org_a")], "state": {"org_id": huge}}
    settings = BillingSettings(api_url="http://127.0.0.1:9", api_key="k", org_header="X-Org-Id")
    assert resolve_now(from_state("org_id"), scope) is None
    assert resolve_now(default_org_resolver(settings), scope) is None  # (not the header's org_a)
    assert default_identity(settings)(scope) == (None, None)
    assert resolve_now(from_state("org_id"), {"state": {"org_id": 10**255}}) is None  # (256 digits)
    assert resolve_now(from_state("org_id"), {"state": {"org_id": 10**254}}) == str(10**254)  # (255 digits: an id)


NO_IDS = ["o" * 256, "acme\u200b", "ac\nme", "acme\x00"]


@pytest.mark.parametrize("value", NO_IDS, ids=["256-characters", "zero-width-space", "line-break", "nul"])
def test_a_state_org_that_can_never_be_an_id_is_said_and_not_replaced_by_the_header(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The app's auth attributed the request to an org whose id is unusable: unresolved, not billed to the org the
    client names in its header (as for bytes there), and said (it was silent: only "no org was found in
    request.state.org_id" once, for every request of that org served unbilled)."""
    settings = BillingSettings(api_url="http://127.0.0.1:9", api_key="k", org_header="X-Org-Id", user_header="X-U")

    def scope() -> dict[str, Any]:
        headers = [(b"x-org-id", b"org_b"), (b"x-u", b"mallory")]
        return {"type": "http", "headers": headers, "state": {"org_id": value, "user_id": "ada"}}

    assert resolve_now(default_org_resolver(settings), scope()) is None
    assert default_identity(settings)(scope()) == (None, None)
    said = [record for record in caplog.records if "cannot be an id" in record.getMessage()]
    assert len(said) == 1  # (once per source)
    assert "request.state.org_id" in said[0].getMessage()
    # a user id so: no user, not the header's
    user_scope = {**scope(), "state": {"org_id": "org_a", "user_id": value}}
    assert default_identity(settings)(user_scope) == ("org_a", None)


def test_a_blank_state_org_is_no_org_and_the_next_source_is_read() -> None:
    settings = BillingSettings(api_url="http://127.0.0.1:9", api_key="k", org_header="X-Org-Id")
    for blank in ("", "  ", "\n"):
        scope: dict[str, Any] = {"type": "http", "headers": [(b"x-org-id", b"org_b")], "state": {"org_id": blank}}
        assert resolve_now(default_org_resolver(settings), scope) == "org_b"
        assert default_identity(settings)(scope) == ("org_b", None)


def test_a_user_org_that_can_never_be_an_id_is_not_replaced_by_the_header() -> None:
    settings = BillingSettings(api_url="http://127.0.0.1:9", api_key="k", org_header="X-Org-Id")
    scope: dict[str, Any] = {"type": "http", "headers": [(b"x-org-id", b"org_b")], "user": {"org_id": "o" * 300}}
    assert resolve_now(default_org_resolver(settings), scope) is None
    assert resolve_now(from_user("org_id"), {"user": {"org_id": " acme "}}) == "acme"


class _LongOrgUser(SimpleUser):
    org_id = "o" * 300


class _Backend(AuthenticationBackend):
    async def authenticate(self, conn: Any) -> tuple[AuthCredentials, SimpleUser]:
        return AuthCredentials(["authenticated"]), _LongOrgUser("ada")


async def test_the_middleware_does_not_bill_the_header_org_for_a_state_org_that_is_no_id(fake_lago: Any) -> None:
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"org": get_current_org(request)})

    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001, org_header="X-Org-Id"
    )
    inner = Starlette(routes=[Route("/v1/chat", endpoint)])
    middleware = OrgBillingMiddleware(inner, settings=settings, transport=fake_lago.transport())

    async def auth(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("state", {})["org_id"] = "o" * 300
        await middleware(scope, receive, send)

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=auth), base_url="http://testserver") as client:
            response = await client.get("/v1/chat", headers={"X-Org-Id": "org_b"})
    finally:
        await middleware.aclose()
    assert response.status_code == 200
    assert response.json() == {"org": None}
    assert middleware.stats["unresolved"] == 1
    assert fake_lago.events == []


async def test_the_middleware_bills_an_int_enum_org_as_its_number(fake_lago: Any) -> None:
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("7", "starter", external_id="7")

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"org": get_current_org(request), "published": request.state.billing_org_id})

    inner = Starlette(routes=[Route("/v1/chat", endpoint)])
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)
    middleware = OrgBillingMiddleware(inner, settings=settings, transport=fake_lago.transport())

    async def auth(scope: Any, receive: Any, send: Any) -> None:  # an auth middleware outside the billing one
        scope.setdefault("state", {})["org_id"] = Tenant.ACME
        await middleware(scope, receive, send)

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=auth), base_url="http://testserver") as client:
            response = await client.get("/v1/chat")
    finally:
        await middleware.aclose()
    assert response.status_code == 200
    assert response.json() == {"org": "7", "published": "7"}
    assert [event["external_subscription_id"] for event in fake_lago.events] == ["7"]


async def test_the_middleware_serves_a_request_whose_org_is_a_huge_int_unresolved(fake_lago: Any) -> None:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"org": get_current_org(request)})

    inner = Starlette(routes=[Route("/v1/chat", endpoint)])
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)
    middleware = OrgBillingMiddleware(inner, settings=settings, transport=fake_lago.transport())

    async def auth(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("state", {})["org_id"] = 10**5000
        await middleware(scope, receive, send)

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=auth), base_url="http://testserver") as client:
            response = await client.get("/v1/chat")
    finally:
        await middleware.aclose()
    assert response.status_code == 200
    assert response.json() == {"org": None}
    assert middleware.stats["unresolved"] == 1
    assert fake_lago.events == []


def test_the_middleware_does_not_bill_the_header_org_for_a_user_org_that_is_no_id(fake_lago: Any) -> None:
    """An authenticated user's org so, with Starlette's ``AuthenticationMiddleware`` outside the billing one."""
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"org": get_current_org(request)})

    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001, org_header="X-Org-Id"
    )
    app = Starlette(
        routes=[Route("/v1/chat", endpoint)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=_Backend()),
            Middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport()),
        ],
    )
    with TestClient(app) as client:
        response = client.get("/v1/chat", headers={"X-Org-Id": "org_b"})
    assert response.status_code == 200
    assert response.json() == {"org": None}
    assert fake_lago.events == []
