"""billing_routes() and the dashboard as an attacker and as a browser user.

Covers: an ``authorize`` (or ``plans``) callback that raises is a denial (403 / 422, logged for the operator),
not a 500, while an ``HTTPException`` it raises (a 401 asking to log in) still reaches the client; an org's admin
cannot poison its own usage in Lago through ``POST /usage/record`` with property values no counter can sum
("NaN", "Infinity", "1e400", a JSON number past 2**53 - 1) - Lago's aggregation (and the emulator's) fails on them,
so the period's usage could no longer be priced; the dashboard stays up (no 500) when a usage or limit is too
large for a float ratio.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Mount

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "routes6-secret-api-key"
BASE = "/billing/organizations"
ADMIN = {"X-Admin-Of": "org_acme"}


def admin_of(request: Request, org_id: str) -> bool:
    """Stands for a cookie session: the header lists the orgs the (logged-in) caller manages."""
    return org_id in request.headers.get("x-admin-of", "").split(",")


@dataclass
class Env:
    fake: FakeLago
    client: httpx.AsyncClient


def _fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_billable_metric("seats", aggregation_type="sum_agg", field_name="seats")
    charges = [
        {"billable_metric_code": "api_call", "properties": {"amount": "0.01"}},
        {"billable_metric_code": "seats", "properties": {"amount": "1"}},
    ]
    fake.add_plan("starter", name="Starter", amount_cents=1000, charges=charges)
    fake.add_plan("pro", name="Pro", amount_cents=5000, charges=charges)
    return fake


async def _make_env(fake: FakeLago, **route_options: Any) -> AsyncIterator[Env]:
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        options = {"authorize": admin_of, **route_options}
        router = billing_routes(OrgBilling(client=lago), **options)
        app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is observed as a 500
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield Env(fake, client)


async def _setup(env: Env) -> None:
    response = await env.client.post(
        f"{BASE}/org_acme/setup", json={"org_name": "Acme", "plan_code": "starter"}, headers=ADMIN
    )
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------------ authorize


@pytest.mark.parametrize("sync", [True, False])
async def test_authorize_that_raises_denies_with_403_not_500(caplog: pytest.LogCaptureFixture, sync: bool) -> None:
    """The usual ``request.state.user.admin_of`` raises AttributeError for a caller with no session (a scanner, a
    logged-out tab): that was a 500 (an alert, a retry) per request. It must deny (403, no-store, nothing of the
    exception in the body) and tell the operator (logged once, with the traceback)."""

    def may_manage(request: Request, org_id: str) -> bool:
        return org_id in request.state.user.admin_of  # type: ignore[no-any-return]

    async def amay_manage(request: Request, org_id: str) -> bool:
        return may_manage(request, org_id)

    async for env in _make_env(_fake(), authorize=may_manage if sync else amay_manage):
        with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
            first = await env.client.get(f"{BASE}/org_acme/subscription")
            second = await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "pro"})
        assert first.status_code == second.status_code == 403, first.text
        assert first.headers["cache-control"] == "no-store"
        assert "AttributeError" not in first.text and "state" not in first.text
        said = [r for r in caplog.records if r.levelno >= logging.WARNING and "authorize" in r.getMessage()]
        assert len(said) == 1 and said[0].exc_info is not None, [r.getMessage() for r in caplog.records]
        assert not env.fake.subscriptions


async def test_authorize_raising_an_http_exception_keeps_its_answer() -> None:
    """An app's ``authorize`` may answer "log in first" itself (a 401 with ``WWW-Authenticate``): that is an answer,
    not a crash, and is kept."""

    def must_log_in(request: Request, org_id: str) -> bool:
        raise HTTPException(401, "Log in first.", headers={"WWW-Authenticate": "Bearer"})

    async for env in _make_env(_fake(), authorize=must_log_in):
        response = await env.client.get(f"{BASE}/org_acme/subscription")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


async def test_plans_callable_that_raises_refuses_the_plan_not_500(caplog: pytest.LogCaptureFixture) -> None:
    """A ``plans`` lookup that fails (its catalogue unreachable) must refuse the plan (422, nothing changed), as an
    answer other than True does, not crash with a 500."""

    def offered(request: Request, org_id: str, plan_code: str) -> bool:
        raise KeyError(plan_code)

    async for env in _make_env(_fake(), plans=offered):
        with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
            response = await env.client.post(
                f"{BASE}/org_acme/setup", json={"org_name": "Acme", "plan_code": "pro"}, headers=ADMIN
            )
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "plan_code"]
        assert not env.fake.subscriptions
        assert any(r.exc_info is not None and "plans" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------- POST /usage/record


@pytest.mark.parametrize(
    "raw",
    [
        '"NaN"',
        '"-nan"',
        '"Infinity"',
        '"inf"',
        '"1e400"',
        '"1E+30"',
        "1e30",
        "123456789012345678901234567890",
    ],
)
async def test_usage_record_refuses_values_no_counter_can_sum(raw: str) -> None:
    """An org's admin summing ``"NaN"``, ``"Infinity"`` or ``"1e400"`` into a metric broke the org's usage in Lago
    (Postgres sums NaN/Infinity, amounts overflow; the emulator's current usage crashed): the period can no longer
    be priced, a way to leave it unbilled. Refused as input (422), nothing sent to Lago."""
    async for env in _make_env(_fake()):
        await _setup(env)
        body = '{"event_code": "seats", "properties": {"seats": ' + raw + "}}"
        response = await env.client.post(
            f"{BASE}/org_acme/usage/record", content=body, headers={**ADMIN, "content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "properties", "seats"]
        assert not env.fake.events
        usage = await env.client.get(f"{BASE}/org_acme/usage/current", headers=ADMIN)
        assert usage.status_code == 200, usage.text


@pytest.mark.parametrize("value", ["42", 42, 2.5, "0.5", "12345678901234567890", "user-nan", "inference"])
async def test_usage_record_still_takes_counts_ids_and_labels(value: Any) -> None:
    """What a property legitimately holds: counts, decimals, long digit-string ids (unique counts), words."""
    async for env in _make_env(_fake()):
        await _setup(env)
        response = await env.client.post(
            f"{BASE}/org_acme/usage/record",
            json={"event_code": "seats", "properties": {"seats": value}},
            headers=ADMIN,
        )
        assert response.status_code == 201, response.text


# ------------------------------------------------------------------------------------------------ dashboard


@pytest.mark.parametrize("accept", ["application/json", "text/html"])
async def test_dashboard_with_a_usage_too_large_for_a_float_answers(accept: str) -> None:
    """A ledger or limits provider (or Lago) with a huge usage made ``used / limit`` raise OverflowError: the org's
    dashboard was a 500 until the period ended. It shows the limit as exceeded instead."""

    def limits(org_id: str) -> dict[str, Any]:
        return {"max_seats": {"limit": 3, "used": "1e400"}, "max_calls": {"limit": "1e400", "used": 1.5}}

    async for env in _make_env(_fake(), limits_provider=limits):
        await _setup(env)
        response = await env.client.get(f"{BASE}/org_acme/dashboard", headers={**ADMIN, "accept": accept})
        assert response.status_code == 200, response.text
        if accept == "application/json":
            seats, calls = response.json()["limits"]
            assert seats["exceeded"] is True and seats["remaining"] == 0 and seats["ratio"] > 1
            assert calls["exceeded"] is False and calls["ratio"] == 0
        else:
            assert 'data-limit="max_seats"' in response.text and "fill over" in response.text
