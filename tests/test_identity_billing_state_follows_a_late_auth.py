"""What an app reads of the org and user a request is billed to.

README: "The app reads the org a request is billed to with ``get_current_org(request)`` (or
``request.state.billing_org_id``...)", and "``request.state.org_id`` comes first even when your auth sets it only while
the app runs (a FastAPI dependency): the request is billed to that org (and to that ``request.state.user_id``) ... and
``get_current_org`` returns it from then on".

With ``LAGO_ORG_HEADER`` on and the app's auth in a dependency naming another org (or user) than the headers did,
``get_current_org`` / ``get_current_user`` tell the authenticated org and user, the event is billed to them, but
``request.state.billing_org_id`` / ``billing_user_id`` keep the header's values (the client's claim) for the whole
request, even after ``get_current_org`` was called. When the headers named no org, ``get_current_org`` does publish
the org it finds there: the two documented ways to read the billed org disagree only when a client named one.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from lago_org_billing import BillingSettings, OrgBillingMiddleware, get_current_org, get_current_user

pytestmark = pytest.mark.anyio


def late_auth_app(auth_org: str | None, auth_user: str | None) -> FastAPI:
    """A FastAPI app whose auth dependency sets ``request.state.org_id`` / ``user_id`` while it runs (the README's
    example of auth inside the app); its endpoint answers what ``get_current_org`` / ``get_current_user`` say, then
    what ``request.state.billing_org_id`` / ``billing_user_id`` say after that."""

    async def authenticate(request: Request) -> None:
        if auth_org is not None:
            request.state.org_id = auth_org
        if auth_user is not None:
            request.state.user_id = auth_user

    app = FastAPI()

    @app.post("/v1/chat", dependencies=[Depends(authenticate)])
    async def chat(request: Request) -> dict[str, Any]:
        org, user = get_current_org(request), get_current_user(request)
        return {
            "org": org,
            "user": user,
            "billing_org_id": getattr(request.state, "billing_org_id", None),
            "billing_user_id": getattr(request.state, "billing_user_id", None),
        }

    return app


async def call(app: FastAPI, settings: BillingSettings, fake_lago: Any, headers: dict[str, str]) -> dict[str, Any]:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            answer = await http.post("/v1/chat", headers=headers)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def test_billing_org_id_tells_the_org_a_late_auth_set_not_the_header_org(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The client names org_b in X-Org-Id, the app's auth sets org_a: the request is billed to org_a and
    ``get_current_org`` says org_a; ``request.state.billing_org_id``, which the README offers as the same thing,
    still says org_b (the client's claim) after it."""
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")
    seen = await call(late_auth_app("org_a", None), header_settings, fake_lago, {"X-Org-Id": "org_b"})
    assert [e["external_subscription_id"] for e in fake_lago.events] == ["org_a"]
    assert seen["org"] == "org_a"
    assert seen["billing_org_id"] == seen["org"], seen  # fails: 'org_b'


async def test_billing_user_id_tells_the_user_a_late_auth_set_not_the_header_user(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The client sends X-Org-Id: org_a and X-User-Id: mallory, the app's auth sets ``request.state.user_id = "ada"``:
    ada is billed and ``get_current_user`` says ada; ``request.state.billing_user_id`` still says mallory."""
    headers = {"X-Org-Id": "org_a", "X-User-Id": "mallory"}
    seen = await call(late_auth_app(None, "ada"), header_settings, fake_lago, headers)
    assert [e["properties"].get("user_id") for e in fake_lago.events] == ["ada"]
    assert seen["user"] == "ada"
    assert seen["billing_user_id"] == seen["user"], seen  # fails: 'mallory'


async def test_billing_org_id_after_get_current_org_is_the_same_with_or_without_a_header_org(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Without a header org, ``get_current_org`` publishes the org the auth set (billing_org_id follows); with one,
    it does not: the same app reads two different orgs for the same authenticated caller."""
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")
    app = late_auth_app("org_a", None)
    without = await call(app, header_settings, fake_lago, {})
    with_header = await call(app, header_settings, fake_lago, {"X-Org-Id": "org_b"})
    assert without["billing_org_id"] == "org_a"
    assert with_header["billing_org_id"] == without["billing_org_id"], with_header  # fails: 'org_b'
