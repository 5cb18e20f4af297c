"""Review of ``billing_routes()`` as a frontend team and an org admin use it, mounted in FastAPI and in Starlette,
against the Lago emulator: a 422 Lago itself answers keeps the documented FastAPI-style ``detail`` list, a 405 is
JSON and its ``Allow`` names every method of the path, ``POST /usage/record`` of an event code the org's plan does
not bill is refused (Lago takes it and never bills it), and a JSON body with a number too long to read is refused
without Python's internals in the message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "secret-api-key-never-shown"
ADMIN = {"X-Admin-Of": "org_acme"}
BASE = "/billing/organizations/org_acme"


def admin_of(request: Request, org_id: str) -> bool:
    """The X-Admin-Of header lists the orgs the caller manages."""
    return org_id in request.headers.get("x-admin-of", "").split(",")


def _fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_billable_metric("storage_gb", aggregation_type="sum_agg", field_name="gb")  # on no plan
    charges = [
        {"billable_metric_code": "api_call", "properties": {"amount": "0.01"}},
        {"billable_metric_code": "tokens", "properties": {"amount": "0.001"}},
    ]
    fake.add_plan("starter", name="Starter", amount_cents=1000, charges=charges)
    fake.add_plan("pro", name="Pro", amount_cents=5000, charges=charges)
    return fake


@dataclass
class Env:
    fake: FakeLago
    client: httpx.AsyncClient


@pytest.fixture(params=["starlette", "fastapi"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    """The routes mounted under /billing of a Starlette or a FastAPI app, talking to the emulator."""
    fake = _fake()
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=admin_of)
        if request.param == "fastapi":
            app: Starlette = FastAPI()
            app.mount("/billing", router)
        else:
            app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is seen as a 500
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield Env(fake, client)


async def _setup(env: Env) -> None:
    response = await env.client.post(f"{BASE}/setup", json={"org_name": "Acme", "plan_code": "starter"}, headers=ADMIN)
    assert response.status_code == 200, response.text


def _assert_fastapi_detail(body: object) -> None:
    assert isinstance(body, dict)
    detail = body["detail"]
    assert isinstance(detail, list) and detail, detail
    for error in detail:
        assert set(error) >= {"loc", "msg", "type"}, error
        assert isinstance(error["loc"], list) and isinstance(error["msg"], str) and isinstance(error["type"], str)


# ------------------------------------------------------------------------------------ 422 answered by Lago


async def test_a_422_lago_answers_keeps_the_documented_detail_list(env: Env) -> None:
    """The module docstring promises every 422 a FastAPI-style ``detail`` list; a 422 of Lago's own (here: the org's
    subscription id is held by another customer) answered ``"detail": "Lago rejected the request."``, a string a
    frontend's ``detail.map(e => e.msg)`` fails on. It is a list naming Lago's field and reason now (``code`` and
    ``errors`` kept), and never the API key."""
    env.fake.add_customer("org_other")
    env.fake.add_subscription("org_other", "starter", external_id="org_acme")
    response = await env.client.post(f"{BASE}/setup", json={"org_name": "Acme", "plan_code": "starter"}, headers=ADMIN)
    assert response.status_code == 422, response.text
    body = response.json()
    _assert_fastapi_detail(body)
    assert body["detail"][0]["loc"] == ["body", "external_id"]
    assert body["detail"][0]["type"] == "value_already_exist"
    assert "external_id" in body["detail"][0]["msg"]
    assert body["code"] == "validation_errors"
    assert body["errors"] == {"external_id": ["value_already_exist"]}
    assert API_KEY not in response.text


async def test_a_422_lago_answers_without_details_is_still_a_list(env: Env) -> None:
    """A 422 whose ``error_details`` are empty (a proxy, an older Lago) still answers a one-item list."""
    await _setup(env)
    env.fake.faults.inject(422, count=5, path="/api/v1/subscriptions")
    response = await env.client.put(f"{BASE}/subscription", json={"plan_code": "pro"}, headers=ADMIN)
    assert response.status_code == 422, response.text
    _assert_fastapi_detail(response.json())
    assert response.json()["code"] == "validation_errors"


# ------------------------------------------------------------------------------------------------- 405


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/subscription", {"GET", "HEAD", "PUT", "DELETE"}),
        ("POST", "/subscription", {"GET", "HEAD", "PUT", "DELETE"}),
        ("GET", "/setup", {"POST"}),
        ("DELETE", "/dashboard", {"GET", "HEAD"}),
        ("PUT", "/usage/record", {"POST"}),
    ],
)
async def test_a_405_is_json_and_names_every_method_of_the_path(
    env: Env, method: str, path: str, allowed: set[str]
) -> None:
    """``PATCH /subscription`` answered ``Allow: GET, HEAD`` (the first of the three routes of that path), telling a
    frontend that PUT and DELETE do not exist, and in Starlette as plain text: every method is listed now, in a
    JSON ``{"detail": ...}`` like the routes' other errors (``Cache-Control: no-store`` and ``nosniff`` as every answer
    of the routes), and Lago is not asked."""
    before = len(env.fake.requests)
    response = await env.client.request(method, BASE + path, json={}, headers=ADMIN)
    assert response.status_code == 405, response.text
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    assert response.json()["detail"] == "Method Not Allowed"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert len(env.fake.requests) == before


async def test_every_route_still_answers_its_methods(env: Env) -> None:
    """The methods of one path still reach their handler (HEAD too, for GET)."""
    await _setup(env)
    assert (await env.client.get(f"{BASE}/subscription", headers=ADMIN)).status_code == 200
    assert (await env.client.head(f"{BASE}/subscription", headers=ADMIN)).status_code == 200
    put = await env.client.put(f"{BASE}/subscription", json={"plan_code": "pro"}, headers=ADMIN)
    assert put.status_code == 200 and put.json()["effective"] == "now"
    assert (await env.client.get(f"{BASE}/dashboard", headers=ADMIN)).status_code == 200
    assert (await env.client.delete(f"{BASE}/subscription", headers=ADMIN)).status_code == 200
    assert (await env.client.get(f"{BASE}/subscription", headers=ADMIN)).status_code == 404
    forbidden = await env.client.put(f"{BASE}/subscription", json={"plan_code": "pro"}, headers={"X-Admin-Of": "x"})
    assert forbidden.status_code == 403


# ------------------------------------------------------------------------------------- POST /usage/record


@pytest.mark.parametrize("event_code", ["api_calls", "storage_gb"])
async def test_usage_of_a_code_the_plan_does_not_bill_is_refused(env: Env, event_code: str) -> None:
    """A typo (``api_calls``) or a metric the org's plan has no charge for answered 201: Lago stores the event and
    never bills it, and it never shows in the dashboard. A 422 on ``event_code`` naming the plan's codes now, and
    nothing is sent to Lago's events."""
    await _setup(env)
    response = await env.client.post(
        f"{BASE}/usage/record", json={"event_code": event_code, "properties": {"gb": 3}}, headers=ADMIN
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "event_code"]
    assert "api_call" in error["msg"] and "tokens" in error["msg"]
    assert not env.fake.events


async def test_usage_of_a_code_the_plan_bills_is_still_recorded(env: Env) -> None:
    """The plan's codes (and the default event code) are recorded as before."""
    await _setup(env)
    tokens = await env.client.post(
        f"{BASE}/usage/record", json={"event_code": "tokens", "properties": {"total_tokens": 7}}, headers=ADMIN
    )
    assert tokens.status_code == 201, tokens.text
    default = await env.client.post(f"{BASE}/usage/record", json={"tokens": 3}, headers=ADMIN)
    assert default.status_code == 201, default.text
    assert len(env.fake.events) == 2


# ------------------------------------------------------------------------------------------ JSON bodies


async def test_a_number_too_long_to_read_is_refused_without_python_internals(env: Env) -> None:
    """A 5,000-digit number answered a 422 telling the frontend to ``use sys.set_int_max_str_digits()``: the
    message says what is wrong with the body instead."""
    await _setup(env)
    response = await env.client.post(
        f"{BASE}/usage/record",
        content=b'{"tokens": ' + b"9" * 5000 + b"}",
        headers={**ADMIN, "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["type"] == "json_invalid"
    assert "sys." not in error["msg"] and "set_int_max_str_digits" not in error["msg"]
    assert "digits" in error["msg"]


async def test_a_retry_answers_the_event_lago_holds_not_the_retrys_body(env: Env) -> None:
    """A retry under the same ``transaction_id`` is a 200 ``duplicate`` (no second charge), but its ``event`` echoed
    the retry's own body: ``total_tokens`` 7 where Lago bills 5, no ``lago_id``. A frontend showing it showed a
    usage nobody is billed for. It is the event Lago holds now (its ``timestamp`` still the Unix seconds the retry
    was deduplicated with)."""
    await _setup(env)
    first = await env.client.post(f"{BASE}/usage/record", json={"transaction_id": "tx-1", "tokens": 5}, headers=ADMIN)
    assert first.status_code == 201, first.text
    retry = await env.client.post(f"{BASE}/usage/record", json={"transaction_id": "tx-1", "tokens": 7}, headers=ADMIN)
    assert retry.status_code == 200, retry.text
    assert retry.json()["duplicate"] is True
    held, sent = retry.json()["event"], first.json()["event"]
    assert held["properties"]["total_tokens"] == 5
    assert held["code"] == sent["code"] and held["created_at"] == sent["created_at"]
    assert held["lago_id"] == sent["lago_id"]
    assert len(env.fake.events) == 1


async def test_a_retry_never_answers_another_orgs_event(env: Env) -> None:
    """``GET /events/{transaction_id}`` is the first match across the Lago account: an event of another org with the
    same id is never answered (the retry's own payload is, as before)."""
    env.fake.add_customer("org_other")
    env.fake.add_subscription("org_other", "starter")
    await _setup(env)
    other = await env.client.post(
        "/billing/organizations/org_other/usage/record",
        json={"transaction_id": "tx-1", "tokens": 9, "user_id": "secret-user"},
        headers={"X-Admin-Of": "org_other"},
    )
    assert other.status_code == 201, other.text
    first = await env.client.post(f"{BASE}/usage/record", json={"transaction_id": "tx-1", "tokens": 5}, headers=ADMIN)
    assert first.status_code == 201, first.text
    retry = await env.client.post(f"{BASE}/usage/record", json={"transaction_id": "tx-1", "tokens": 5}, headers=ADMIN)
    assert retry.status_code == 200, retry.text
    assert "secret-user" not in retry.text
    assert retry.json()["event"]["external_subscription_id"] == "org_acme"


async def test_a_retry_answers_200_when_lago_cannot_be_read_back(env: Env) -> None:
    """When reading the held event back fails (Lago throttling), the retry is still the 200 duplicate it was."""
    await _setup(env)
    first = await env.client.post(f"{BASE}/usage/record", json={"transaction_id": "tx-2", "tokens": 5}, headers=ADMIN)
    assert first.status_code == 201, first.text
    env.fake.faults.inject(503, count=5, path="/api/v1/events/tx-2")
    retry = await env.client.post(f"{BASE}/usage/record", json={"transaction_id": "tx-2", "tokens": 5}, headers=ADMIN)
    assert retry.status_code == 200, retry.text
    assert retry.json()["duplicate"] is True
    assert retry.json()["event"]["transaction_id"] == "tx-2"


# ------------------------------------------------------------------------------------------------ dashboard


@pytest.mark.parametrize("accept", ["application/json", "text/html"])
async def test_a_ledger_of_decimal_strings_shows_in_the_dashboard(accept: str) -> None:
    """A ledger keeping Lago's precise amounts (``"150.5"`` cents, as ``precise_amount_cents``) or counts read back as
    text (``"3.0"``) made the org's dashboard a 500: the amounts are whole cents (rounded half up) and the counts
    whole numbers now, the HTML escaping what the ledger names."""

    def ledger(org_id: str) -> dict[str, object]:
        return {
            "by_user": [
                {"user_id": "<b>ada</b>", "events": "3.0", "amount_cents": "150.5", "units": {"tokens": "12.5"}}
            ],
            "by_model": [{"model": "gpt", "events": 2, "amount_cents": " 7 ", "units": {}}],
        }

    fake = _fake()
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=admin_of, breakdown_provider=ledger)
        app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            await _setup(Env(fake, client))
            response = await client.get(f"{BASE}/dashboard", headers={**ADMIN, "Accept": accept})
    assert response.status_code == 200, response.text
    if accept == "text/html":
        assert "<b>ada</b>" not in response.text and "&lt;b&gt;ada&lt;/b&gt;" in response.text
        assert "1.51 USD" in response.text
        return
    [user] = response.json()["by_user"]
    assert user == {"user_id": "<b>ada</b>", "events": 3, "amount_cents": 151, "units": {"tokens": 12.5}}
    assert response.json()["by_model"][0]["amount_cents"] == 7
