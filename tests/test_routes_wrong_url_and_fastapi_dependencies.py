"""billing_routes() and the request helpers FastAPI users call (get_current_org / require_quota), against a wrong
LAGO_API_URL and as FastAPI dependencies.

* ``Depends(get_current_org)`` / ``Depends(get_current_user)``: FastAPI reads their ``Any``-typed parameter as a
  required query parameter, so every request is a 422 asking the client for ``?request_or_scope=``.
* A ``LAGO_API_URL`` Lago is not served at (Lago's catch-all ``404 resource_not_found``): every route answered an org
  admin a 404 as if the org had no billing ("no active subscription to change"), and the operator was told nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from starlette.applications import Starlette
from starlette.routing import Mount

from _quota_app import Clock, seed
from lago_org_billing import (
    BillingSettings,
    LagoClient,
    OrgBilling,
    OrgBillingMiddleware,
    get_current_org,
    get_current_user,
    require_quota,
)
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "audit-routes-key-never-shown"
BASE = "/billing/organizations"
ADMIN = {"X-Admin-Of": "org_acme"}


def admin_of(request: Request, org_id: str) -> bool:
    """The test's authorization rule: the X-Admin-Of header lists the orgs the caller manages."""
    return org_id in request.headers.get("x-admin-of", "").split(",")


# ------------------------------------------------------------------- get_current_org as a FastAPI dependency


@asynccontextmanager
async def _served(app: FastAPI, fake: FakeLago, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        app.add_middleware(OrgBillingMiddleware, settings=settings, quota=gate, client=lago)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http
        layer: Any = app.middleware_stack
        while not isinstance(layer, OrgBillingMiddleware):
            layer = layer.app
        assert await layer.pipeline.flush(5)
        await layer.aclose()


async def _authenticate(request: Request) -> None:
    org = request.headers.get("authorization", "").removeprefix("Bearer ")
    if not org:
        raise HTTPException(401, "who are you")
    request.state.org_id = org
    request.state.user_id = "ada"


async def test_get_current_org_and_user_work_as_fastapi_dependencies() -> None:
    """``org: str = Depends(get_current_org)`` is how a FastAPI user reads the org the request is billed to (the
    README's ``get_current_org(request)``, as FastAPI calls dependencies). Its parameter is typed ``Any``, so FastAPI
    made it a required query parameter: every call was a 422 ``["query", "request_or_scope"] Field required``, the
    OpenAPI schema advertised a ``request_or_scope`` parameter, and a client could fill it in. ``require_quota`` types
    its parameter ``HTTPConnection`` for exactly this reason."""
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3)
    app = FastAPI()

    @app.get("/v1/who", dependencies=[Depends(_authenticate), Depends(require_quota)])
    async def who(
        org: str | None = Depends(get_current_org), user: str | None = Depends(get_current_user)
    ) -> dict[str, str | None]:
        return {"org": org, "user": user}

    async with _served(app, fake, clock) as http:
        answer = await http.get("/v1/who", headers={"Authorization": "Bearer org_1"})
        schema = (await http.get("/openapi.json")).json()
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"org": "org_1", "user": "ada"}
    parameters = schema["paths"]["/v1/who"]["get"].get("parameters", [])
    assert [p["name"] for p in parameters] == [], parameters


# ------------------------------------------------------- a LAGO_API_URL Lago is not served at (resource_not_found)


def _acme_lago() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", name="Starter", amount_cents=1000, charges=[])
    fake.add_plan("pro", name="Pro", amount_cents=5000, charges=[])
    fake.add_customer("org_acme", name="Acme")
    fake.add_subscription("org_acme", "starter")
    return fake


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/subscription", None),
        ("GET", "/dashboard", None),
        ("GET", "/invoices", None),
        ("POST", "/usage/record", {"tokens": 1}),
        ("PUT", "/subscription", {"plan_code": "pro"}),
        ("DELETE", "/subscription", None),
    ],
)
async def test_a_lago_url_lago_is_not_served_at_is_a_502_said_in_the_log_not_an_orgs_404(
    caplog: pytest.LogCaptureFixture, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """``LAGO_API_URL`` naming a path Lago is not served under (``https://lago.example.com/api``): Lago's Rails
    catch-all answers every call ``404 resource_not_found`` (the client's own message says "Lago serves no such route.
    Check LAGO_API_URL"). The routes answered the org's admin a 404 as if its billing did not exist ("Not found in
    Lago.", and for PUT/DELETE "Org 'org_acme' has no active subscription to change/terminate", which is false), and
    logged nothing: the operator never learns why. A 401 (bad key) or a proxy's 404 page is a 502 said in the log;
    this deployment error must be too."""
    fake = _acme_lago()
    settings = BillingSettings(api_url=fake.base_url + "/lago", api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        app = Starlette(routes=[Mount("/billing", app=billing_routes(OrgBilling(client=lago), authorize=admin_of))])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            with caplog.at_level(logging.INFO, logger="lago_org_billing"):
                response = await client.request(method, f"{BASE}/org_acme{path}", json=body, headers=ADMIN)
    assert response.status_code == 502, (response.status_code, response.text)
    assert "no active subscription" not in response.text
    said = [r for r in caplog.records if r.name.startswith("lago_org_billing") and r.levelno >= logging.ERROR]
    assert any("LAGO_API_URL" in r.getMessage() for r in said), [r.getMessage() for r in caplog.records]
    assert API_KEY not in response.text
