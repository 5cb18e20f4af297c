"""The emulator's answers validate against Lago's official OpenAPI spec (tests/data/lago-openapi.yaml).

Each request goes to the in-process FakeLago; its response is then validated with openapi-core as if
it came from the spec's server (``https://api.getlago.com/api/v1/...``). Error answers are validated
too: Lago's clients rely on their ``code`` and ``error_details``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from _openapi import assert_response_matches, load_spec
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def openapi() -> Any:
    """Lago's OpenAPI spec (repaired by fix_spec), parsed once per process."""
    return load_spec()


@pytest.fixture
def fake() -> FakeLago:
    """A FakeLago with a metric, a plan, a customer with an active subscription and an invoice."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric(code="api_call", name="API calls", aggregation_type="count_agg")
    fake.add_plan(
        code="pro",
        name="Pro",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.01"}}],
    )
    fake.add_customer(external_id="acme", name="Acme", currency="USD")
    fake.add_subscription(external_customer_id="acme", plan_code="pro", external_id="acme_main")
    fake.add_invoice("acme", total_amount_cents=1234)
    return fake


class Conformance:
    """Sends requests to the fake and validates each response against the spec."""

    def __init__(self, client: httpx.AsyncClient, openapi: Any) -> None:
        self.client = client
        self.openapi = openapi
        self.checked: list[str] = []

    async def __call__(
        self, method: str, path: str, *, expect: int, json_body: Any = None, params: Any = None
    ) -> httpx.Response:
        response = await self.client.request(method, path, json=json_body, params=params)
        assert response.status_code == expect, (method, path, response.status_code, response.text)
        self.validate(response)
        return response

    def validate(self, response: httpx.Response) -> None:
        request = response.request
        assert_response_matches(response)
        self.checked.append(f"{request.method} {request.url.path} {response.status_code}")


@pytest.fixture
async def conform(fake: FakeLago, openapi: Any) -> AsyncIterator[Conformance]:
    """Send a request to the fake and validate the response against Lago's spec."""
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url, headers=AUTH) as client:
        yield Conformance(client, openapi)


async def test_customers(conform: Conformance) -> None:
    """Customers: upsert, get, list, delete, and their 400/404/422 errors."""
    body = {"customer": {"external_id": "globex", "name": "Globex", "email": "ops@globex.io", "currency": "EUR"}}
    await conform("POST", "/api/v1/customers", json_body=body, expect=200)
    await conform("POST", "/api/v1/customers", json_body=body, expect=200)
    await conform("GET", "/api/v1/customers/globex", expect=200)
    await conform("GET", "/api/v1/customers", params={"per_page": 1, "page": 2}, expect=200)
    await conform("DELETE", "/api/v1/customers/globex", expect=200)
    await conform("GET", "/api/v1/customers/globex", expect=404)
    await conform("DELETE", "/api/v1/customers/globex", expect=404)
    await conform("POST", "/api/v1/customers", json_body={"external_id": "no-root-key"}, expect=400)
    await conform("POST", "/api/v1/customers", json_body={"customer": {"name": "no id"}}, expect=422)


async def test_unauthorized(conform: Conformance) -> None:
    """A wrong API key gets Lago's 401 body."""
    conform.client.headers["Authorization"] = "Bearer wrong"
    await conform("GET", "/api/v1/customers", expect=401)
    await conform("POST", "/api/v1/events", json_body={"event": {}}, expect=401)


async def test_subscriptions(conform: Conformance) -> None:
    """Subscriptions: create, get, list, update, terminate, and their 404/422 errors."""
    body = {"subscription": {"external_customer_id": "globex", "plan_code": "pro", "external_id": "globex_main"}}
    await conform("POST", "/api/v1/subscriptions", json_body=body, expect=200)
    await conform("GET", "/api/v1/subscriptions/globex_main", expect=200)
    await conform("GET", "/api/v1/subscriptions", params={"external_customer_id": "globex"}, expect=200)
    await conform("PUT", "/api/v1/subscriptions/globex_main", json_body={"subscription": {"name": "Main"}}, expect=200)
    await conform("DELETE", "/api/v1/subscriptions/globex_main", expect=200)
    await conform("GET", "/api/v1/subscriptions/globex_main", expect=404)
    await conform("GET", "/api/v1/subscriptions/globex_main", params={"status": "terminated"}, expect=200)
    await conform("DELETE", "/api/v1/subscriptions/nope", expect=404)
    ghost = {"subscription": {"external_customer_id": "acme", "plan_code": "ghost", "external_id": "x"}}
    await conform("POST", "/api/v1/subscriptions", json_body=ghost, expect=404)
    bad = {"subscription": {**body["subscription"], "billing_time": "sometimes"}}
    await conform("POST", "/api/v1/subscriptions", json_body=bad, expect=422)


async def test_events(conform: Conformance) -> None:
    """Events: create, batch, get, and their 404/422 errors."""
    event = {
        "transaction_id": "tx_1",
        "external_subscription_id": "acme_main",
        "code": "api_call",
        "timestamp": f"{time.time():.3f}",
        "properties": {"tokens": 12},
    }
    await conform("POST", "/api/v1/events", json_body={"event": event}, expect=200)
    batch = [{**event, "transaction_id": f"tx_b{i}"} for i in range(3)]
    await conform("POST", "/api/v1/events/batch", json_body={"events": batch}, expect=200)
    await conform("GET", "/api/v1/events/tx_1", expect=200)
    await conform("GET", "/api/v1/events/tx_missing", expect=404)
    await conform("POST", "/api/v1/events", json_body={"event": {**event, "timestamp": "yesterday"}}, expect=422)
    await conform("POST", "/api/v1/events/batch", json_body={"events": [{"code": "api_call"}]}, expect=422)


async def test_current_usage(conform: Conformance) -> None:
    """Current usage: 200 for an active subscription, 404 for an unknown customer."""
    event = {"transaction_id": "tx_1", "external_subscription_id": "acme_main", "code": "api_call"}
    await conform("POST", "/api/v1/events", json_body={"event": event}, expect=200)
    response = await conform(
        "GET",
        "/api/v1/customers/acme/current_usage",
        params={"external_subscription_id": "acme_main", "apply_taxes": "false"},
        expect=200,
    )
    assert response.json()["customer_usage"]["charges_usage"][0]["units"] == "1.0"
    await conform("GET", "/api/v1/customers/nobody/current_usage", params={"external_subscription_id": "x"}, expect=404)


async def test_current_usage_without_subscription_is_405(conform: Conformance) -> None:
    """The real server answers 405 no_active_subscription, which the spec does not list."""
    response = await conform.client.get(
        "/api/v1/customers/acme/current_usage", params={"external_subscription_id": "other"}
    )
    assert response.status_code == 405
    assert response.json() == {"status": 405, "error": "Method Not Allowed", "code": "no_active_subscription"}
    # Not validated: the spec lists only 200/401/404 for current_usage, while the server answers 405
    # (docs/lago-api.md §6, from lago-api usage_controller.rb#current).


async def test_billable_metrics_and_plans(conform: Conformance) -> None:
    """Billable metrics and plans: create, get, list, and their 404/422 errors."""
    metric = {
        "billable_metric": {"name": "Tokens", "code": "tokens", "aggregation_type": "sum_agg", "field_name": "tokens"}
    }
    await conform("POST", "/api/v1/billable_metrics", json_body=metric, expect=200)
    await conform("GET", "/api/v1/billable_metrics/tokens", expect=200)
    await conform("GET", "/api/v1/billable_metrics", expect=200)
    await conform("GET", "/api/v1/billable_metrics/nope", expect=404)
    await conform("POST", "/api/v1/billable_metrics", json_body=metric, expect=422)
    plan = {
        "plan": {
            "name": "Team",
            "code": "team",
            "interval": "monthly",
            "amount_cents": 5000,
            "amount_currency": "USD",
            "pay_in_advance": False,
            "charges": [
                {"billable_metric_code": "tokens", "charge_model": "standard", "properties": {"amount": "0.001"}}
            ],
        }
    }
    await conform("POST", "/api/v1/plans", json_body=plan, expect=200)
    await conform("GET", "/api/v1/plans/team", expect=200)
    await conform("GET", "/api/v1/plans", expect=200)
    await conform("GET", "/api/v1/plans/nope", expect=404)
    await conform("POST", "/api/v1/plans", json_body={"plan": {"name": "no code"}}, expect=422)


async def test_invoices_and_public_key(conform: Conformance) -> None:
    """Invoices list and get, and the webhook public key."""
    listed = await conform("GET", "/api/v1/invoices", params={"external_customer_id": "acme"}, expect=200)
    lago_id = listed.json()["invoices"][0]["lago_id"]
    await conform("GET", f"/api/v1/invoices/{lago_id}", expect=200)
    await conform("GET", "/api/v1/invoices/00000000-0000-0000-0000-000000000000", expect=404)
    response = await conform("GET", "/api/v1/webhooks/json_public_key", expect=200)
    assert json.loads(response.content)["webhook"]["public_key"]


async def test_entitlements(conform: Conformance) -> None:
    """Features and plan/subscription entitlements: create, get, and their 404 errors."""
    feature = {
        "feature": {
            "code": "seats",
            "name": "Seats",
            "privileges": [{"code": "max", "name": "Max seats", "value_type": "integer"}],
        }
    }
    await conform("POST", "/api/v1/features", json_body=feature, expect=200)
    await conform("GET", "/api/v1/features/seats", expect=200)
    await conform("GET", "/api/v1/features", expect=200)
    await conform("GET", "/api/v1/features/nope", expect=404)
    entitlements = {"entitlements": {"seats": {"max": 20}}}
    await conform("POST", "/api/v1/plans/pro/entitlements", json_body=entitlements, expect=200)
    await conform("GET", "/api/v1/plans/pro/entitlements", expect=200)
    await conform("GET", "/api/v1/plans/nope/entitlements", expect=404)
    await conform("GET", "/api/v1/subscriptions/acme_main/entitlements", expect=200)
    await conform("GET", "/api/v1/subscriptions/nope/entitlements", expect=404)
