"""billing_routes() seen by an attacker and a careful operator: query strings a client controls never crash the
routes nor reach Lago when Lago cannot take them, and an ``authorize`` that answers something other than ``True``
is denied out loud (in the log), not silently."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._routes import Authorize, billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "review-routes-security-key"
BASE = "/billing/organizations"
ADMIN = {"X-Admin-Of": "org_acme"}


def admin_of(request: Request, org_id: str) -> bool:
    return org_id in request.headers.get("x-admin-of", "").split(",")


@dataclass
class Env:
    fake: FakeLago
    client: httpx.AsyncClient


def _fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", name="Starter", amount_cents=1000, charges=[])
    fake.add_customer("org_acme", name="Acme")
    fake.add_subscription("org_acme", "starter")
    return fake


async def _make_env(fake: FakeLago, authorize: Authorize = admin_of) -> AsyncIterator[Env]:
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=authorize)
        app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is observed as a 500
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield Env(fake, client)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for value in _make_env(_fake()):
        yield value


# ------------------------------------------------------------------------------------------ ?page= / ?limit=


@pytest.mark.parametrize("name", ["page", "limit"])
async def test_invoices_query_of_thousands_of_digits_is_a_422_not_a_500(env: Env, name: str) -> None:
    """``raw.isdigit()`` passes, then ``int(raw)`` raises ValueError past Python's 4,300-digit limit: a 500 (a
    crash in the server log) for a URL of 5 KB, which any client can send."""
    response = await env.client.get(f"{BASE}/org_acme/invoices?{name}={'9' * 5000}", headers=ADMIN)
    assert response.status_code == 422, (response.status_code, response.text[:200])
    assert response.json()["detail"][0]["loc"] == ["query", name]


@pytest.mark.parametrize("page", [str(2**63), "99999999999999999999999"])
async def test_invoices_page_lago_cannot_offset_is_refused_before_lago(env: Env, page: str) -> None:
    """A page past what Lago's SQL OFFSET (a bigint: (page - 1) * per_page) can hold was forwarded to Lago, whose
    query fails (a 500, retried as an outage: several Lago calls, then a misleading "Lago is unavailable" 503). The
    route must refuse it itself, without asking Lago."""
    before = len(env.fake.requests)
    response = await env.client.get(f"{BASE}/org_acme/invoices?page={page}", headers=ADMIN)
    assert response.status_code == 422, (response.status_code, response.text[:200])
    assert response.json()["detail"][0]["loc"] == ["query", "page"]
    assert len(env.fake.requests) == before


async def test_invoices_far_pages_lago_can_offset_still_work(env: Env) -> None:
    """The cap is about what Lago can take, not a small page count: a page past the end is an empty list."""
    env.fake.add_invoice("org_acme", total_amount_cents=100)
    response = await env.client.get(f"{BASE}/org_acme/invoices?page={2**31 - 1}", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["invoices"] == []


async def test_a_field_the_billing_layer_refuses_is_located_in_the_body_not_the_path(env: Env) -> None:
    """An org name Lago cannot store (a NUL), refused by the billing layer after the route's own checks: the 422 was
    located at ``["path", "org_id"]``, the one field that was fine."""
    body = {"org_name": "New\u0000", "plan_code": "starter"}
    response = await env.client.post(f"{BASE}/org_new/setup", json=body, headers={"X-Admin-Of": "org_new"})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body"] and "org_name" in error["msg"]
    bad_org = await env.client.get(f"{BASE}/a%5Cb/invoices", headers={"X-Admin-Of": "a\\b"})  # (no Lago path takes it)
    assert bad_org.status_code == 422 and bad_org.json()["detail"][0]["loc"] == ["path", "org_id"]


# ------------------------------------------------------------------------------------------------ authorize


class Membership:
    """What an app's lookup returns: the caller's membership of the org, or None."""

    def __init__(self, role: str) -> None:
        self.role = role


@pytest.mark.parametrize("sync", [True, False])
async def test_authorize_answering_a_truthy_non_bool_is_denied_and_logged(
    caplog: pytest.LogCaptureFixture, sync: bool
) -> None:
    """``authorize`` must answer ``True``; a truthy object (a membership row, 1) is denied (fail closed), but the
    admin saw a bare 403 and the operator nothing in the log to say why: it must be logged (once), naming the type
    returned, and never shown to the client."""

    def lookup(request: Request, org_id: str) -> Any:
        return Membership("admin") if org_id == "org_acme" else None

    async def alookup(request: Request, org_id: str) -> Any:
        return lookup(request, org_id)

    async for env in _make_env(_fake(), authorize=lookup if sync else alookup):
        with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
            first = await env.client.get(f"{BASE}/org_acme/subscription")
            second = await env.client.get(f"{BASE}/org_acme/subscription")
        assert first.status_code == second.status_code == 403
        assert "Membership" not in first.text
        said = [r for r in caplog.records if "Membership" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in caplog.records]
        assert said[0].levelno >= logging.WARNING
        assert "True" in said[0].getMessage()


async def test_authorize_answering_false_or_none_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A plain denial (False, or None from a lookup that found nothing) is the normal case: no log line per
    request."""

    def lookup(request: Request, org_id: str) -> Any:
        return None if request.headers.get("x-none") else False

    async for env in _make_env(_fake(), authorize=lookup):
        with caplog.at_level(logging.DEBUG, logger="lago_org_billing"):
            assert (await env.client.get(f"{BASE}/org_acme/subscription")).status_code == 403
            assert (await env.client.get(f"{BASE}/org_acme/subscription", headers={"x-none": "1"})).status_code == 403
        assert [r for r in caplog.records if r.name.startswith("lago_org_billing.routes")] == []


# ------------------------------------------------------------------------------------- usage/record retries


class LoseEventAnswers(httpx.AsyncBaseTransport):
    """Lago stores the event, then its answer is lost (a proxy timeout, a connection reset): a read timeout."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.lose = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.lose and request.method == "POST" and request.url.path == "/api/v1/events":
            await response.aread()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


async def test_usage_recorded_behind_a_lost_answer_can_be_retried_without_a_second_charge() -> None:
    """POST /usage/record without a transaction_id: the route made a random one, Lago stored the event, its answer
    was lost, and the route answered 503 "retry later" without saying which transaction_id it sent. The caller's
    retry then got a new random id: the usage was billed twice. The 503 must say the event's transaction_id and
    timestamp, so that a retry with them is a duplicate (200), not a second event."""
    fake = _fake()
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    lossy = LoseEventAnswers(fake.transport())
    async with LagoClient(settings, transport=lossy) as lago:
        app = Starlette(routes=[Mount("/billing", app=billing_routes(OrgBilling(client=lago), authorize=admin_of))])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            body = {"user_id": "ada", "tokens": 1200}
            first = await client.post(f"{BASE}/org_acme/usage/record", json=body, headers=ADMIN)
            assert first.status_code == 503, first.text
            assert len(fake.events) == 1  # (Lago has it)
            answer = first.json()
            assert answer["transaction_id"] == fake.events[0]["transaction_id"], answer
            lossy.lose = False
            retry = {**body, "transaction_id": answer["transaction_id"], "timestamp": answer["timestamp"]}
            second = await client.post(f"{BASE}/org_acme/usage/record", json=retry, headers=ADMIN)
            assert second.status_code == 200, second.text
            assert second.json()["duplicate"] is True
            assert second.json()["event"]["timestamp"] == answer["timestamp"]
            assert len(fake.events) == 1


async def test_plans_callable_answering_a_truthy_non_bool_is_refused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``plans=(request, org_id, plan_code) -> bool``: a truthy non-bool (the plan row an app looked up) refuses the
    plan (422 "not offered"), fail closed, but silently: the operator must see why in the log."""
    fake = _fake()
    fake.add_plan("pro", name="Pro", amount_cents=5000, charges=[])

    class PlanRow:
        pass

    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=admin_of, plans=lambda r, o, p: PlanRow())  # type: ignore[arg-type]
        app = Starlette(routes=[Mount("/billing", app=router)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
                put = await client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "pro"}, headers=ADMIN)
            assert put.status_code == 422, put.text
            assert "PlanRow" not in put.text
    said = [r for r in caplog.records if "PlanRow" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
