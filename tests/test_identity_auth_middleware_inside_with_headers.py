"""Starlette's ``AuthenticationMiddleware`` added before ``OrgBillingMiddleware`` (so inside it: the usual order of
``add_middleware`` calls), with ``LAGO_ORG_HEADER``/``LAGO_USER_HEADER`` set: the org and user were taken from the
client's headers before the app ran and ``request.user``, set while it ran, was never read. A client naming another
org in ``X-Org-Id`` billed that org; ``X-User-Id: mallory`` billed mallory for ada's call. The resolvers' order is
``request.state``, then ``request.user``, then the headers: the authenticated user's org and id win, in the event and
in ``get_current_org()``. Found by an audit of identity resolution."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._identity import get_current_org, get_current_user
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


class Member(BaseUser):
    def __init__(self, user_id: str, org_id: str | None) -> None:
        self.user_id, self.org_id = user_id, org_id

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.user_id


class Backend(AuthenticationBackend):
    def __init__(self, org_id: str | None = "org_b", state_org: str | None = None) -> None:
        self.org_id, self.state_org = org_id, state_org

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        if conn.headers.get("authorization") != "Bearer ada":
            return None  # (anonymous: request.user is an UnauthenticatedUser)
        if self.state_org is not None:
            conn.state.org_id = self.state_org
        return AuthCredentials(["authenticated"]), Member("ada", self.org_id)


async def _billed(headers: dict[str, str], backend: Backend | None = None) -> tuple[list[tuple[str, Any]], Any]:
    fake = FakeLago(api_key="k")
    fake.add_plan("starter", amount_cents=0)
    for org in ("org_a", "org_b", "org_c"):
        fake.add_subscription(org, "starter", external_id=org)
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", org_header="X-Org-Id", user_header="X-User-Id", quota_mode="off"
    )
    seen: dict[str, Any] = {}

    async def endpoint(request: Request) -> JSONResponse:
        seen.update(org=get_current_org(request), user=get_current_user(request))
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/chat", endpoint)])
    app.add_middleware(AuthenticationMiddleware, backend=backend or Backend())
    app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake.transport())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
        assert (await http.get("/v1/chat", headers=headers)).status_code == 200
        middleware = app.middleware_stack
        while not isinstance(middleware, OrgBillingMiddleware):
            middleware = middleware.app  # type: ignore[attr-defined]
        assert await middleware.pipeline.flush(5)
        await middleware.aclose()
    return [(e["external_subscription_id"], e["properties"].get("user_id")) for e in fake.events], seen


AUTH = {"Authorization": "Bearer ada"}


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Org-Id": "org_a"},  # another org named by the client: org_a was billed
        {"X-Org-Id": "org_b", "X-User-Id": "mallory"},  # another user: mallory was billed
        {"X-Org-Id": "org_b"},  # the user was lost: billed with none
        {},  # (no header: resolved once the app ran, as before)
    ],
)
async def test_the_authenticated_users_org_and_id_win_over_the_headers(headers: dict[str, str]) -> None:
    events, seen = await _billed({**AUTH, **headers})
    assert events == [("org_b", "ada")]
    assert seen == {"org": "org_b", "user": "ada"}  # (get_current_org in the endpoint: the org billed)


async def test_a_user_without_an_org_keeps_the_header_org_and_is_the_user_billed() -> None:
    events, _ = await _billed({**AUTH, "X-Org-Id": "org_a", "X-User-Id": "mallory"}, Backend(org_id=None))
    assert events == [("org_a", "ada")]


async def test_request_state_still_wins_over_request_user() -> None:
    events, seen = await _billed({**AUTH, "X-Org-Id": "org_a"}, Backend(org_id="org_b", state_org="org_c"))
    assert events == [("org_c", "ada")]
    assert seen == {"org": "org_c", "user": "ada"}


async def test_an_anonymous_request_is_billed_by_its_headers_as_before() -> None:
    events, _ = await _billed({"X-Org-Id": "org_a", "X-User-Id": "guest"})
    assert events == [("org_a", "guest")]
