"""A FastAPI LLM API adopting the package from the README: what the README tells that user is there and true.

The README names every public error in its tree, every control route of the served emulator (a CI job driving
``lago-org-billing emulator`` over HTTP has nothing else to go by), where the billed *user* comes from (it said so
for the org only) and what happens to a request whose org is found nowhere (served unbilled without a word: a
misspelt ``X-Org-Id`` goes unnoticed). The behaviours those sentences describe are checked here too, through a
FastAPI app and the emulator: the user's resolution order, ``LAGO_ON_UNRESOLVED=reject`` answering 401, the
membership-checked header, ``attribute_usage`` called from a streaming response's generator (an LLM's usage is known
at the stream's end), and an org subscribed after its 402 served at once through a webhook or the billing routes.

A code defect found on the way is checked fixed: a FastAPI dependency's ``request.state.user_id`` is billed (and told by
``get_current_user``) when the org came from the header, as the resolvers' order says.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

import lago_org_billing
from lago_org_billing import (
    LagoWebhooks,
    OrgBillingMiddleware,
    attribute_usage,
    billing_routes,
    first_of,
    from_header,
    from_state,
    get_current_user,
)
from lago_org_billing.testing import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _use_it() -> str:
    """The README's "Use it" section, up to its first subsection."""
    return README.split("## Use it\n", 1)[1].split("\n### ", 1)[0]


@pytest.fixture
def lago(fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The served emulator with org_acme subscribed, and the environment pointing at it."""
    fake_lago_server.add_plan("starter")
    fake_lago_server.add_subscription("org_acme", "starter")
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    return fake_lago_server


# ------------------------------------------------------------------------------------------ what the README names


def test_the_error_tree_names_every_public_error() -> None:
    """Every exception class ``lago_org_billing`` exports is in the README's error tree (UnmovedHoldingsError,
    raised by the migration and named further down, was missing: a user reading the tree did not know to catch it)."""
    tree = next(block for block in README.split("```") if block.lstrip("\n").startswith("LagoIntegrationError"))
    named = set(re.findall(r"\b([A-Za-z]+Error)\b", tree))
    public = {
        name
        for name in lago_org_billing.__all__
        if isinstance(getattr(lago_org_billing, name), type) and issubclass(getattr(lago_org_billing, name), Exception)
    }
    assert public - named == set(), f"public errors missing from the README's tree: {sorted(public - named)}"


def test_the_readme_names_every_control_route_of_the_served_emulator() -> None:
    """Each ``/_emulator/`` route of the served emulator is in the README as ``METHOD /path`` (reset and state, the
    webhook deliver/redeliver routes and the faults listing were in no document a user reads)."""
    from lago_org_billing.testing import FakeLago
    from lago_org_billing.testing._server import install_controls

    fake = install_controls(FakeLago())
    routes = [*fake.app.routes, *fake.faults.routes(), *fake.webhook_dispatcher.routes()]
    controls = {
        f"{method} {route.path}"
        for route in routes
        if route.path.startswith("/_emulator/")
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert len(controls) >= 10, controls
    missing = sorted(control for control in controls if f"`{control}" not in README)
    assert not missing, f"emulator controls the README does not name: {missing}"
    assert "`GET /health`" in README  # what a CI job polls before its tests start


def test_the_readme_says_where_the_user_comes_from_and_what_an_unresolved_request_gets() -> None:
    """ "Use it" names the user's sources (``request.state.user_id``, ``request.user``, ``LAGO_USER_HEADER``) as it
    names the org's, and says that a request with no org is served unbilled unless ``LAGO_ON_UNRESOLVED=reject``."""
    text = _use_it()
    assert "`request.state.user_id`" in text and "`LAGO_USER_HEADER`" in text
    assert "unbilled" in text and "`LAGO_ON_UNRESOLVED=reject`" in text


# ------------------------------------------------------------------------------------------ what those sentences say


def _chat_app(lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """A FastAPI app billed by the middleware (settings from the environment), with one JSON chat endpoint."""
    app = FastAPI(lifespan=lifespan)
    app.add_middleware(OrgBillingMiddleware)

    @app.post("/v1/chat")
    async def chat() -> dict[str, Any]:
        return {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}

    return app


class _SetUser:
    """An auth middleware (runs before the app): sets ``request.state.user_id``."""

    def __init__(self, app: ASGIApp, user_id: str) -> None:
        self.app = app
        self.user_id = user_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["user_id"] = self.user_id
        await self.app(scope, receive, send)


def test_the_user_comes_from_request_state_before_the_user_header(lago: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: the user from ``request.state.user_id``, else ``request.user``, else ``LAGO_USER_HEADER``: the user an
    auth middleware sets wins over the header the client sends; without it, the header's user is billed."""
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")
    monkeypatch.setenv("LAGO_USER_HEADER", "X-User-Id")
    headers = {"X-Org-Id": "org_acme", "X-User-Id": "from-header"}
    authenticated = _chat_app()
    authenticated.add_middleware(_SetUser, user_id="from-auth")  # added last: outside the billing middleware
    with TestClient(authenticated) as client:
        assert client.post("/v1/chat", headers=headers).status_code == 200
    with TestClient(_chat_app()) as client:
        assert client.post("/v1/chat", headers=headers).status_code == 200
    assert sorted(event["properties"]["user_id"] for event in lago.events) == ["from-auth", "from-header"]


def test_the_readmes_membership_checked_header_bills_members_only(lago: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: ``resolve_org=first_of(from_state(), from_header("X-Org-Id", membership_check=is_member))`` behind an
    auth that runs before the app: a member's org is billed, another org named in the header is not."""
    members = {"ada": {"org_acme"}}

    def is_member(scope: Scope, org_id: str) -> bool:
        return org_id in members.get(scope["state"]["user_id"], set())

    app = FastAPI()
    app.add_middleware(
        OrgBillingMiddleware, resolve_org=first_of(from_state(), from_header("X-Org-Id", membership_check=is_member))
    )
    app.add_middleware(_SetUser, user_id="ada")

    @app.post("/v1/chat")
    async def chat() -> dict[str, Any]:
        return {}

    with TestClient(app) as client:
        assert client.post("/v1/chat", headers={"X-Org-Id": "org_acme"}).status_code == 200
        assert client.post("/v1/chat", headers={"X-Org-Id": "org_other"}).status_code == 200  # served, unbilled
    assert [(e["external_subscription_id"], e["properties"]["user_id"]) for e in lago.events] == [("org_acme", "ada")]


@pytest.mark.parametrize("auth_org", [None, "org_acme"], ids=["user-only", "same-org"])
def test_a_dependencys_user_is_billed_when_the_org_comes_from_the_header(
    lago: Any, monkeypatch: pytest.MonkeyPatch, auth_org: str | None
) -> None:
    """A FastAPI dependency authenticating the caller sets ``request.state.user_id`` (and maybe the same org);
    the org comes from ``LAGO_ORG_HEADER``. The resolvers' order puts ``request.state.user_id`` first, as it does for
    a late ``request.state.org_id``: the authenticated user is billed, not none (nor ``LAGO_USER_HEADER``'s)."""
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")

    async def authenticate(request: Request) -> None:
        request.state.user_id = "ada"
        if auth_org is not None:
            request.state.org_id = auth_org

    app = FastAPI()
    app.add_middleware(OrgBillingMiddleware)

    @app.post("/v1/chat", dependencies=[Depends(authenticate)])
    async def chat(request: Request) -> dict[str, Any]:
        return {"user": get_current_user(request)}

    with TestClient(app) as client:
        answer = client.post("/v1/chat", headers={"X-Org-Id": "org_acme"})
    assert answer.status_code == 200 and answer.json() == {"user": "ada"}
    [event] = lago.events
    assert event["properties"].get("user_id") == "ada", event["properties"]


def test_a_request_without_the_org_header_is_unbilled_or_refused_as_the_readme_says(
    lago: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: a request whose org is found nowhere is served unbilled (``LAGO_ON_UNRESOLVED=allow``, the default);
    with ``LAGO_ON_UNRESOLVED=reject`` it is answered 401 and the endpoint never runs."""
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")
    with TestClient(_chat_app()) as client:
        assert client.post("/v1/chat", headers={"X-Org": "org_acme"}).status_code == 200  # a misspelt header
    assert lago.events == []
    monkeypatch.setenv("LAGO_ON_UNRESOLVED", "reject")
    with TestClient(_chat_app()) as client:
        refused = client.post("/v1/chat", headers={"X-Org": "org_acme"})
    assert refused.status_code == 401 and refused.headers["content-type"].startswith("application/problem+json")
    assert lago.events == []


def test_attribute_usage_from_a_streaming_generator_bills_its_tokens(
    lago: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: ``attribute_usage`` also works from a ``StreamingResponse``'s generator before it ends, where an LLM
    proxy learns the usage (the stream's last event)."""
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")
    app = FastAPI()
    app.add_middleware(OrgBillingMiddleware)

    @app.post("/v1/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            yield "data: Hel\n\n"
            yield "data: lo\n\n"
            attribute_usage(request, model="my-model", input_tokens=100, output_tokens=50)

        return StreamingResponse(events(), media_type="text/event-stream")

    with TestClient(app) as client:
        assert client.post("/v1/stream", headers={"X-Org-Id": "org_acme"}).text == "data: Hel\n\ndata: lo\n\n"
    [event] = lago.events
    properties = event["properties"]
    assert (properties["model"], properties["total_tokens"], properties["endpoint"]) == ("my-model", 150, "/v1/stream")
    assert "StreamingResponse" in _use_it()


# ------------------------------------------------------------------------------------- an org subscribed after a 402


def test_an_org_subscribed_after_its_402_is_served_once_lagos_webhook_arrives(
    lago: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Quota gating): an org without a subscription gets 402; once subscribed, it is served as soon as Lago's
    ``subscription.started`` webhook reaches ``LagoWebhooks``, not a cache TTL later."""
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")
    monkeypatch.setenv("LAGO_EXCLUDE_PATHS", "/webhooks/")
    monkeypatch.setenv("LAGO_WEBHOOK_HMAC_KEY", "adoption-hmac-key")
    app = _chat_app()
    app.add_route("/webhooks/lago", LagoWebhooks(), methods=["POST"])
    org = {"X-Org-Id": "org_new"}
    with serve_in_thread(app) as app_url, httpx.Client(base_url=app_url) as client:
        refused = client.post("/v1/chat", headers=org)
        assert refused.status_code == 402 and refused.json()["external_subscription_id"] == "org_new"
        endpoint = f"{app_url}/webhooks/lago"
        lago.webhook_dispatcher.configure(url=endpoint, signature="hmac", hmac_key="adoption-hmac-key")
        emitted = len(lago.emitted_webhooks)
        lago.add_subscription("org_new", "starter")
        delivered = lago.webhook_dispatcher.wait_delivered(len(lago.emitted_webhooks) - emitted)
        assert "subscription.started" in {d.webhook_type for d in delivered if d.succeeded}
        assert client.post("/v1/chat", headers=org).status_code == 200


def test_an_org_set_up_through_the_billing_routes_after_its_402_is_served_at_once(
    lago: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Quota gating): a subscription made through ``billing_routes()`` (``POST .../setup``) clears the org's
    402 at once, without webhooks."""
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")
    monkeypatch.setenv("LAGO_EXCLUDE_PATHS", "/billing/")
    router = billing_routes(authorize=lambda request, org_id: True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await router.aclose()  # its Lago client (a Mount passes no lifespan on)

    app = _chat_app(lifespan)
    app.mount("/billing", router)
    org = {"X-Org-Id": "org_new"}
    with TestClient(app) as client:
        assert client.post("/v1/chat", headers=org).status_code == 402
        setup = client.post(
            "/billing/organizations/org_new/setup",
            json={"plan_code": "starter", "name": "New", "email": "billing@new.test"},
        )
        assert setup.status_code in (200, 201), setup.text
        assert client.post("/v1/chat", headers=org).status_code == 200
