"""The user an app's auth sets while it runs, requests with no org, and what a reattributed request is said to be.

* A FastAPI dependency sets ``request.state.user_id`` (with no org, or the org the header already gave): that user is
  billed and ``get_current_user`` tells it, as the resolvers' order says (``request.state.user_id`` first, then
  ``request.user``, then ``LAGO_USER_HEADER``); it was read only when the dependency also set another org. The org
  stays the one gated: nothing reattributed, its reserved call kept. Behind a proxy that deep-copies the scope too.
* A request whose org is found nowhere (the header left out or misspelt) was served unbilled with nothing logged: one
  WARNING per middleware now, on the first such request that would have been billed with an org, naming where the
  middleware looked and the remedies (``LAGO_ON_UNRESOLVED=reject``, ``LAGO_EXCLUDE_PATHS``). Not for excluded
  paths, CORS preflights or the routing's own 404, nor under ``reject`` (the 401 says it).
* A request whose header org the app's auth replaced by another is reattributed (said once, counted so); it was
  also said and counted ``ungated`` ("had no org before the app ran"), which it had.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from hypercorn.middleware import ProxyFixMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Scope

from lago_org_billing import (
    BillingSettings,
    OrgBillingMiddleware,
    first_of,
    from_header,
    from_state,
    from_user,
    get_current_org,
    get_current_user,
)

pytestmark = pytest.mark.anyio

UNRESOLVED_SAID = "served unbilled"


def billed(fake_lago: Any) -> list[tuple[str, Any]]:
    return [(e["external_subscription_id"], e["properties"].get("user_id")) for e in fake_lago.events]


def chat_app(auth_org: str | None = None, auth_user: str | None = "ada") -> FastAPI:
    """A FastAPI app whose auth dependency sets ``request.state.user_id`` (and ``org_id`` when given) while it runs;
    its endpoint answers what ``get_current_org`` / ``get_current_user`` say."""

    async def authenticate(request: Request) -> None:
        if auth_user is not None:
            request.state.user_id = auth_user
        if auth_org is not None:
            request.state.org_id = auth_org

    app = FastAPI()

    @app.post("/v1/chat", dependencies=[Depends(authenticate)])
    async def chat(request: Request) -> dict[str, Any]:
        return {"org": get_current_org(request), "user": get_current_user(request)}

    return app


async def serve(
    app: ASGIApp,
    settings: BillingSettings,
    fake_lago: Any,
    calls: list[tuple[str, str, dict[str, str]]],
    **options: Any,
) -> tuple[OrgBillingMiddleware, list[httpx.Response]]:
    """Each (method, path, headers) through the billing middleware (made with ``options``) around ``app``, every
    event delivered before it returns."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport(), **options)
    responses = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for method, path, headers in calls:
                responses.append(await http.request(method, path, headers=headers))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return middleware, responses


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# --------------------------------------------------------------------------------------------------------------------
# A. the user set by a dependency, the org from the header


@pytest.mark.parametrize("auth_org", [None, "org_a"], ids=["user-only", "same-org"])
async def test_a_dependencys_user_is_billed_over_the_user_header(
    fake_lago: Any, header_settings: BillingSettings, auth_org: str | None
) -> None:
    """The org from ``X-Org-Id``, the client's ``X-User-Id: mallory``; the app's auth dependency sets
    ``request.state.user_id = "ada"`` (and maybe the same org): ada is billed and ``get_current_user`` says ada, the
    org is the header's, not reattributed. The header's user (or none) was billed."""
    headers = {"X-Org-Id": "org_a", "X-User-Id": "mallory"}
    middleware, [answer] = await serve(chat_app(auth_org), header_settings, fake_lago, [("POST", "/v1/chat", headers)])
    assert answer.json() == {"org": "org_a", "user": "ada"}
    assert billed(fake_lago) == [("org_a", "ada")]
    assert "reattributed" not in middleware.stats and middleware.stats["ungated"] == 0


async def test_a_user_set_late_for_the_gated_org_keeps_its_call_counted(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The gate on, one call allowed: the request gated as the header's org, whose user the dependency sets, is billed
    to that user and its call stays counted (nothing released as for a reattributed request): the next is 429."""
    settings = header_settings.replace(
        quota_mode="enforce", plan_limits={"starter": {"max_api_calls": 1}}, usage_cache_ttl=3600
    )
    call = ("POST", "/v1/chat", {"X-Org-Id": "org_a"})
    middleware, answers = await serve(chat_app("org_a"), settings, fake_lago, [call, call])
    assert [answer.status_code for answer in answers] == [200, 429]
    assert billed(fake_lago) == [("org_a", "ada")]
    assert "reattributed" not in middleware.stats and middleware.stats["ungated"] == 0


async def test_a_dependencys_user_is_billed_behind_a_proxy_that_deep_copies_the_scope(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Behind hypercorn's ``ProxyFixMiddleware`` (the app runs on a deep copy of the scope, its own
    ``request.state``): the user the dependency sets there is billed, with the header's org."""
    app = ProxyFixMiddleware(chat_app())
    headers = {"X-Org-Id": "org_a", "X-Forwarded-Proto": "https"}
    _, [answer] = await serve(app, header_settings, fake_lago, [("POST", "/v1/chat", headers)])
    assert answer.json() == {"org": "org_a", "user": "ada"}
    assert billed(fake_lago) == [("org_a", "ada")]


# --------------------------------------------------------------------------------------------------------------------
# B. a request with no org is said once


async def test_the_first_billable_request_without_an_org_is_said_once_with_where_it_looked_and_the_remedies(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """``LAGO_ORG_HEADER=X-Org-Id``, a client sending ``X-Org`` (misspelt): served unbilled, and one WARNING names
    the header, ``LAGO_ON_UNRESOLVED=reject`` and ``LAGO_EXCLUDE_PATHS``; the next one is silent (counted only). An
    excluded path, a CORS preflight (answered by the app's ``CORSMiddleware``) and the router's 404 before it were
    not said: none would have been billed with an org either."""
    app = FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["*"])

    @app.post("/v1/chat")
    async def chat() -> dict[str, str]:
        return {"reply": "hi"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    settings = header_settings.replace(exclude_paths=("/health",))
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    misspelt = {"X-Org": "org_a"}
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.middleware"):
        middleware, answers = await serve(
            app,
            settings,
            fake_lago,
            [
                ("GET", "/health", {}),
                ("OPTIONS", "/v1/chat", preflight),
                ("POST", "/nowhere", misspelt),
                ("POST", "/v1/chat", misspelt),
                ("POST", "/v1/chat", misspelt),
            ],
        )
    assert [answer.status_code for answer in answers] == [200, 200, 404, 200, 200]
    assert fake_lago.events == []
    assert middleware.stats["unresolved"] == 3 and middleware.stats["excluded"] == 1
    [message] = said(caplog, UNRESOLVED_SAID)
    assert "'/v1/chat'" in message and "X-Org-Id" in message and "LAGO_ORG_HEADER" in message
    assert "request.state.org_id" in message and "request.user.org_id" in message
    assert "LAGO_ON_UNRESOLVED=reject" in message and "LAGO_EXCLUDE_PATHS" in message


async def test_the_warning_names_the_resolvers_given_and_is_not_said_when_rejecting(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """``resolve_org=`` given: the warning names its sources (the built-ins by what they read, a function of the
    app's by its name). Under ``on_unresolved="reject"`` nothing is said: the client's 401 says it."""

    def tenant_of(scope: Scope) -> str | None:
        return None

    app = chat_app(auth_user=None)
    call = ("POST", "/v1/chat", {"X-Org-Id": "org_a"})
    resolver = first_of(from_state("tenant_id"), from_user(("tenant", "team")), from_header("X-Tenant"), tenant_of)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.middleware"):
        _, [answer] = await serve(app, header_settings, fake_lago, [call], resolve_org=resolver)
        assert answer.status_code == 200
        [message] = said(caplog, UNRESOLVED_SAID)
        for source in ("request.state.tenant_id", "request.user.tenant", "team", "X-Tenant", "tenant_of"):
            assert source in message, (source, message)
        caplog.clear()
        _, [again] = await serve(app, header_settings, fake_lago, [call], resolve_org=tenant_of)
        assert again.status_code == 200
        [message] = said(caplog, UNRESOLVED_SAID)  # once per middleware: a second one says it again
        assert "tenant_of" in message
        caplog.clear()
        _, [refused] = await serve(
            app, header_settings, fake_lago, [call], resolve_org=tenant_of, on_unresolved="reject"
        )
    assert refused.status_code == 401
    assert said(caplog, UNRESOLVED_SAID) == []


# --------------------------------------------------------------------------------------------------------------------
# C. a reattributed request is not "ungated"


async def test_a_reattributed_request_is_said_and_counted_as_reattributed_only(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate on, ``X-Org-Id: org_a``, the dependency sets ``org_b`` (no ``require_quota``): billed to org_b, one
    WARNING (reattributed), counted ``reattributed``; not also "had no org before the app ran" nor ``ungated`` (it
    had one, gated as such). A request whose org is known only after the app ran is still ungated, and said so."""
    fake_lago.add_subscription("org_b", "starter", external_id="org_b")
    settings = header_settings.replace(quota_mode="enforce", user_header=None)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.middleware"):
        middleware, answers = await serve(
            chat_app("org_b"),
            settings,
            fake_lago,
            [("POST", "/v1/chat", {"X-Org-Id": "org_a"}), ("POST", "/v1/chat", {}), ("POST", "/v1/chat", {})],
        )
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert billed(fake_lago) == [("org_b", "ada")] * 3
    assert middleware.stats["reattributed"] == 1 and middleware.stats["ungated"] == 2
    assert len(said(caplog, "was billed to org 'org_b'")) == 1
    [ungated] = said(caplog, "had no org before the app ran")
    assert ungated.startswith("A request billed to org org_b")
    identity_said = [m for m in said(caplog, "") if "no ASGI lifespan" not in m]  # (served without one here)
    assert len(identity_said) == 2, identity_said
