"""Every route FakeLago serves answers as Lago's OpenAPI spec says: its success answer, 401 for a wrong key, 404 for
an unknown id, 400 for a missing root key and 422 for an invalid body, each validated against the spec's schema for
that operation and status (tests/data/lago-openapi.yaml, through tests/_openapi.py). Request bodies the spec calls
invalid (a wrong type, a missing required field) get the 4xx Lago gives, and a value Lago stores as a string comes
back as one.

Where real Lago differs from its spec the emulator follows Lago, and the answer is reshaped or left unvalidated here,
with the reason next to it: a plan's ``entitlements`` rendered flat (lago-api ``PlanSerializer``), the subscription
entitlement DELETEs answering the subscription's whole list, and ``GET /events_enriched``, which the spec lacks.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml

from _openapi import SPEC_PATH, assert_request_matches, assert_response_matches
from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"
NO_INVOICE = "00000000-0000-0000-0000-000000000000"
#: Placeholders in the tables below, replaced by the fixture's ids
INVOICE = "@invoice"
METRIC_ID = "@metric_id"


@dataclass(frozen=True)
class Call:
    """One request: its method, its path (with placeholders), its JSON body and query parameters."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


PLAN_BODY = {
    "plan": {
        "name": "Team",
        "code": "team",
        "interval": "monthly",
        "amount_cents": 5000,
        "amount_currency": "USD",
        "pay_in_advance": False,
        "charges": [{"billable_metric_id": METRIC_ID, "charge_model": "standard", "properties": {"amount": "1"}}],
    }
}
EVENT = {"transaction_id": "tx_2", "external_subscription_id": "sub", "code": "api_call", "timestamp": 1773576000}

#: Each route the emulator serves under /api/v1 (method, Starlette path) and a request it answers 200
SUCCESS: dict[tuple[str, str], Call] = {
    ("GET", "/customers"): Call("GET", "/customers"),
    ("POST", "/customers"): Call("POST", "/customers", {"customer": {"external_id": "globex", "name": "Globex"}}),
    ("GET", "/customers/{external_id}/current_usage"): Call(
        "GET", "/customers/acme/current_usage", params={"external_subscription_id": "sub"}
    ),
    ("GET", "/customers/{external_id}/past_usage"): Call(
        "GET", "/customers/acme/past_usage", params={"external_subscription_id": "sub"}
    ),
    ("GET", "/customers/{external_id}/invoices"): Call("GET", "/customers/acme/invoices"),
    ("GET", "/customers/{external_id}/subscriptions"): Call("GET", "/customers/acme/subscriptions"),
    ("GET", "/customers/{external_id}/wallets"): Call("GET", "/customers/acme/wallets"),
    ("GET", "/customers/{external_id}/applied_coupons"): Call("GET", "/customers/acme/applied_coupons"),
    ("GET", "/customers/{external_id}/credit_notes"): Call("GET", "/customers/acme/credit_notes"),
    ("GET", "/customers/{external_id}"): Call("GET", "/customers/acme"),
    ("DELETE", "/customers/{external_id}"): Call("DELETE", "/customers/acme"),
    ("POST", "/subscriptions"): Call(
        "POST",
        "/subscriptions",
        {"subscription": {"external_customer_id": "acme", "plan_code": "pro", "external_id": "sub2"}},
    ),
    ("GET", "/subscriptions"): Call("GET", "/subscriptions", params={"external_customer_id": "acme"}),
    ("GET", "/subscriptions/{external_id}/entitlements"): Call("GET", "/subscriptions/sub/entitlements"),
    ("PATCH", "/subscriptions/{external_id}/entitlements"): Call(
        "PATCH", "/subscriptions/sub/entitlements", {"entitlements": {"seats": {"max": 3}}}
    ),
    ("DELETE", "/subscriptions/{external_id}/entitlements/{feature_code}"): Call(
        "DELETE", "/subscriptions/sub/entitlements/seats"
    ),
    ("DELETE", "/subscriptions/{external_id}/entitlements/{feature_code}/privileges/{privilege_code}"): Call(
        "DELETE", "/subscriptions/sub/entitlements/seats/privileges/max"
    ),
    ("GET", "/subscriptions/{external_id}"): Call("GET", "/subscriptions/sub"),
    ("PUT", "/subscriptions/{external_id}"): Call(
        # (the spec marks ending_at required on update, the server does not: null keeps it renewing)
        "PUT",
        "/subscriptions/sub",
        {"subscription": {"name": "Main", "ending_at": None}},
    ),
    ("DELETE", "/subscriptions/{external_id}"): Call("DELETE", "/subscriptions/sub"),
    ("POST", "/events/batch"): Call("POST", "/events/batch", {"events": [EVENT]}),
    ("POST", "/events"): Call("POST", "/events", {"event": EVENT}),
    ("GET", "/events"): Call("GET", "/events", params={"external_subscription_id": "sub"}),
    ("GET", "/events_enriched"): Call("GET", "/events_enriched"),
    ("GET", "/events/{transaction_id}"): Call("GET", "/events/tx_1"),
    ("POST", "/billable_metrics"): Call(
        "POST",
        "/billable_metrics",
        {"billable_metric": {"name": "T", "code": "tokens", "aggregation_type": "count_agg"}},
    ),
    ("GET", "/billable_metrics"): Call("GET", "/billable_metrics"),
    ("GET", "/billable_metrics/{code}"): Call("GET", "/billable_metrics/api_call"),
    ("PUT", "/billable_metrics/{code}"): Call("PUT", "/billable_metrics/api_call", {"billable_metric": {"name": "C"}}),
    ("DELETE", "/billable_metrics/{code}"): Call("DELETE", "/billable_metrics/api_call"),
    ("POST", "/features"): Call(
        "POST", "/features", {"feature": {"code": "sso", "privileges": [{"code": "idp", "value_type": "string"}]}}
    ),
    ("GET", "/features"): Call("GET", "/features"),
    ("GET", "/features/{code}"): Call("GET", "/features/seats"),
    ("PUT", "/features/{code}"): Call("PUT", "/features/seats", {"feature": {"name": "Seats"}}),
    ("DELETE", "/features/{code}"): Call("DELETE", "/features/seats"),
    ("DELETE", "/features/{code}/privileges/{privilege_code}"): Call("DELETE", "/features/seats/privileges/max"),
    ("POST", "/plans"): Call("POST", "/plans", PLAN_BODY),
    ("GET", "/plans"): Call("GET", "/plans"),
    ("GET", "/plans/{code}"): Call("GET", "/plans/pro"),
    ("PUT", "/plans/{code}"): Call("PUT", "/plans/free", {"plan": {"name": "Free!"}}),
    ("DELETE", "/plans/{code}"): Call("DELETE", "/plans/free"),
    ("POST", "/plans/{code}/entitlements"): Call(
        "POST", "/plans/pro/entitlements", {"entitlements": {"seats": {"max": 20}}}
    ),
    ("PATCH", "/plans/{code}/entitlements"): Call(
        "PATCH", "/plans/pro/entitlements", {"entitlements": {"seats": {"sso": False}}}
    ),
    ("GET", "/plans/{code}/entitlements"): Call("GET", "/plans/pro/entitlements"),
    ("GET", "/plans/{code}/entitlements/{feature_code}"): Call("GET", "/plans/pro/entitlements/seats"),
    ("DELETE", "/plans/{code}/entitlements/{feature_code}"): Call("DELETE", "/plans/pro/entitlements/seats"),
    ("DELETE", "/plans/{code}/entitlements/{feature_code}/privileges/{privilege_code}"): Call(
        "DELETE", "/plans/pro/entitlements/seats/privileges/max"
    ),
    ("GET", "/invoices"): Call("GET", "/invoices"),
    ("GET", "/wallets"): Call("GET", "/wallets", params={"external_customer_id": "acme"}),
    ("GET", "/applied_coupons"): Call("GET", "/applied_coupons"),
    ("GET", "/credit_notes"): Call("GET", "/credit_notes"),
    ("GET", "/invoices/{lago_id}"): Call("GET", f"/invoices/{INVOICE}"),
    ("PUT", "/invoices/{lago_id}"): Call("PUT", f"/invoices/{INVOICE}", {"invoice": {"payment_status": "succeeded"}}),
    ("GET", "/webhooks/json_public_key"): Call("GET", "/webhooks/json_public_key"),
    ("GET", "/webhooks/public_key"): Call("GET", "/webhooks/public_key"),
}
#: Not in the spec (lago-api.md §4 "Detecting the store"): answers are checked here, not validated
NOT_IN_SPEC = {("GET", "/events_enriched")}
#: lago-api's subscription entitlement DELETEs render the subscription's entitlements (``{"entitlements": [...]}``, as
#: ``GET /subscriptions/{id}/entitlements``); the spec documents one ``{"entitlement": ...}``
ANSWERS_THE_LIST = {
    ("DELETE", "/subscriptions/{external_id}/entitlements/{feature_code}"),
    ("DELETE", "/subscriptions/{external_id}/entitlements/{feature_code}/privileges/{privilege_code}"),
}

#: An unknown id on each route that has one in its path, and the ``code`` of the 404
NOT_FOUND: list[tuple[Call, str]] = [
    (Call("GET", "/customers/nope/current_usage", params={"external_subscription_id": "sub"}), "customer_not_found"),
    (
        Call(
            "GET", "/customers/acme/past_usage", params={"external_subscription_id": "sub", "billable_metric_code": "x"}
        ),
        "billable_metric_not_found",
    ),
    (Call("GET", "/customers/nope/invoices"), "customer_not_found"),
    (Call("GET", "/customers/nope/subscriptions"), "customer_not_found"),
    (Call("GET", "/customers/nope/wallets"), "customer_not_found"),
    (Call("GET", "/customers/nope/applied_coupons"), "customer_not_found"),
    (Call("GET", "/customers/nope/credit_notes"), "customer_not_found"),
    (Call("GET", "/customers/nope"), "customer_not_found"),
    (Call("DELETE", "/customers/nope"), "customer_not_found"),
    (
        Call(
            "POST",
            "/subscriptions",
            {"subscription": {"external_customer_id": "acme", "plan_code": "x", "external_id": "s"}},
        ),
        "plan_not_found",
    ),
    (Call("GET", "/subscriptions/nope/entitlements"), "subscription_not_found"),
    (
        Call("PATCH", "/subscriptions/nope/entitlements", {"entitlements": {"seats": {"max": 1}}}),
        "subscription_not_found",
    ),
    (Call("PATCH", "/subscriptions/sub/entitlements", {"entitlements": {"ghost": {"max": 1}}}), "feature_not_found"),
    (Call("DELETE", "/subscriptions/nope/entitlements/seats"), "subscription_not_found"),
    (Call("DELETE", "/subscriptions/sub/entitlements/seats/privileges/nope"), "privilege_not_found"),
    (Call("GET", "/subscriptions/nope"), "subscription_not_found"),
    (Call("PUT", "/subscriptions/nope", {"subscription": {"name": "x"}}), "subscription_not_found"),
    (Call("DELETE", "/subscriptions/nope"), "subscription_not_found"),
    (Call("GET", "/events/nope"), "event_not_found"),
    (Call("GET", "/billable_metrics/nope"), "billable_metric_not_found"),
    (Call("PUT", "/billable_metrics/nope", {"billable_metric": {"name": "x"}}), "billable_metric_not_found"),
    (Call("DELETE", "/billable_metrics/nope"), "billable_metric_not_found"),
    (Call("GET", "/features/nope"), "feature_not_found"),
    (Call("PUT", "/features/nope", {"feature": {"name": "x"}}), "feature_not_found"),
    (Call("DELETE", "/features/nope"), "feature_not_found"),
    (Call("DELETE", "/features/seats/privileges/nope"), "privilege_not_found"),
    (
        Call("POST", "/plans", {"plan": {**PLAN_BODY["plan"], "charges": [{"billable_metric_id": NO_INVOICE}]}}),
        "billable_metric_not_found",
    ),
    (Call("GET", "/plans/nope"), "plan_not_found"),
    (Call("PUT", "/plans/nope", {"plan": {"name": "x"}}), "plan_not_found"),
    (Call("DELETE", "/plans/nope"), "plan_not_found"),
    (Call("POST", "/plans/nope/entitlements", {"entitlements": {"seats": {"max": 1}}}), "plan_not_found"),
    (Call("PATCH", "/plans/nope/entitlements", {"entitlements": {"seats": {"max": 1}}}), "plan_not_found"),
    (Call("POST", "/plans/pro/entitlements", {"entitlements": {"ghost": {"max": 1}}}), "feature_not_found"),
    (Call("GET", "/plans/nope/entitlements"), "plan_not_found"),
    (Call("GET", "/plans/pro/entitlements/nope"), "entitlement_not_found"),
    (Call("DELETE", "/plans/pro/entitlements/nope"), "entitlement_not_found"),
    (Call("DELETE", "/plans/pro/entitlements/seats/privileges/nope"), "privilege_not_found"),
    (Call("GET", f"/invoices/{NO_INVOICE}"), "invoice_not_found"),
    (Call("PUT", f"/invoices/{NO_INVOICE}", {"invoice": {"payment_status": "succeeded"}}), "invoice_not_found"),
]

#: A body without its root key on each route taking one: Rails' ``params.require`` answers 400
#: (Not the entitlements routes: lago-api reads their body with ``params.fetch(:entitlements, {})``, so a body
#: without its root is no entitlements, taken: ROOT_OPTIONAL.)
MISSING_ROOT: list[Call] = [
    Call("POST", "/customers", {"external_id": "acme"}),
    Call("POST", "/subscriptions", {"external_id": "sub"}),
    Call("PUT", "/subscriptions/sub", {"name": "x"}),
    Call("POST", "/events", EVENT),
    Call("POST", "/events/batch", {"event": EVENT}),
    Call("POST", "/billable_metrics", {"code": "x"}),
    Call("PUT", "/billable_metrics/api_call", {"name": "x"}),
    Call("POST", "/features", {"code": "x"}),
    Call("PUT", "/features/seats", {"name": "x"}),
    Call("POST", "/plans", PLAN_BODY["plan"]),
    Call("PUT", "/plans/free", {"name": "x"}),
    Call("PUT", f"/invoices/{INVOICE}", {"payment_status": "succeeded"}),
]

#: The routes whose body's root lago-api reads with a default (``params.fetch(:entitlements, {})``): a body without it
#: is no entitlements (a plan's replaced by none, a subscription's patch changing nothing), answered 200.
ROOT_OPTIONAL: list[Call] = [
    Call("PATCH", "/subscriptions/sub/entitlements", {"seats": {"max": 1}}),
    Call("POST", "/plans/pro/entitlements", {"seats": {"max": 1}}),
    Call("PATCH", "/plans/pro/entitlements", {"seats": {"max": 1}}),
]

#: A request Lago refuses with 422 on each route whose spec lists one, and the ``error_details`` it names
UNPROCESSABLE: list[tuple[Call, dict[str, Any]]] = [
    (Call("POST", "/customers", {"customer": {"name": "no id"}}), {"external_id": ["value_is_mandatory"]}),
    (
        Call("GET", "/customers/acme/past_usage"),  # (external_subscription_id is required)
        {"external_subscription_id": ["value_is_mandatory"]},
    ),
    (Call("GET", "/customers/acme/invoices", params={"amount_from": "lots"}), {"amount_from": ["value_is_invalid"]}),
    (
        Call(
            "POST",
            "/subscriptions",
            {
                "subscription": {
                    "external_customer_id": "acme",
                    "plan_code": "pro",
                    "external_id": "s",
                    "billing_time": "x",
                }
            },
        ),
        {"billing_time": ["value_is_invalid"]},
    ),
    (
        Call("PATCH", "/subscriptions/sub/entitlements", {"entitlements": {"seats": {"max": "lots"}}}),
        {"max_privilege_value": ["value_is_invalid"]},
    ),
    (Call("PUT", "/subscriptions/sub", {"subscription": {"ending_at": "soon"}}), {"ending_at": ["invalid_date"]}),
    (
        Call("DELETE", "/subscriptions/sub", params={"on_termination_invoice": "maybe"}),
        {"on_termination_invoice": ["value_is_invalid"]},
    ),
    (Call("POST", "/events", {"event": {**EVENT, "timestamp": "yesterday"}}), {"timestamp": ["invalid_format"]}),
    (Call("POST", "/events/batch", {"events": [{**EVENT, "code": None}]}), {"0": {"code": ["value_is_mandatory"]}}),
    (Call("GET", "/events", params={"timestamp_from": "yesterday"}), {"timestamp_from": ["invalid_date"]}),
    (
        Call("POST", "/billable_metrics", {"billable_metric": {"code": "x", "aggregation_type": "count_agg"}}),
        {"name": ["value_is_mandatory"]},
    ),
    (Call("PUT", "/billable_metrics/api_call", {"billable_metric": {"name": ""}}), {"name": ["value_is_mandatory"]}),
    (Call("POST", "/features", {"feature": {"name": "no code"}}), {"code": ["value_is_mandatory"]}),
    (
        Call("PUT", "/features/seats", {"feature": {"privileges": [{"code": "n", "value_type": "float"}]}}),
        {"privilege.value_type": ["value_is_invalid"]},
    ),
    (Call("POST", "/plans", {"plan": {**PLAN_BODY["plan"], "code": None}}), {"code": ["value_is_mandatory"]}),
    (Call("PUT", "/plans/free", {"plan": {"amount_cents": -1}}), {"amount_cents": ["value_is_invalid"]}),
    (
        Call("POST", "/plans/pro/entitlements", {"entitlements": {"seats": {"sso": "perhaps"}}}),
        {"sso_privilege_value": ["value_is_invalid"]},
    ),
    (
        Call("PATCH", "/plans/pro/entitlements", {"entitlements": {"seats": {"max": "lots"}}}),
        {"max_privilege_value": ["value_is_invalid"]},
    ),
    (
        Call("PUT", f"/invoices/{INVOICE}", {"invoice": {"payment_status": "paid"}}),
        {"payment_status": ["value_is_invalid"]},
    ),
]


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """A metric, a feature with two privileges, a plan granting both, a free plan, a customer subscribed to the
    first, with an invoice, a wallet, an applied coupon and a credit note."""
    fake = FakeLago(api_key=API_KEY, clock=clock)
    fake.add_billable_metric("api_call")
    fake.add_feature(
        "seats", privileges=[{"code": "max", "value_type": "integer"}, {"code": "sso", "value_type": "boolean"}]
    )
    fake.add_plan(
        "pro",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "properties": {"amount": "0.01"}}],
        entitlements={"seats": {"max": 10, "sso": True}},
    )
    fake.add_plan("free")
    fake.add_customer("acme", name="Acme", currency="USD")
    fake.add_subscription("acme", "pro", external_id="sub")
    invoice = fake.add_invoice("acme", total_amount_cents=1234)
    fake.add_wallet("acme")
    fake.add_applied_coupon("acme", "welcome", amount_cents=100)
    fake.add_credit_note(invoice["lago_id"])
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client on the emulator, after one event (``tx_1``) was sent."""
    async with fake.client() as client:
        event = {**EVENT, "transaction_id": "tx_1"}
        assert (await client.post("/api/v1/events", json={"event": event})).status_code == 200
        yield client


def _filled(value: Any, fake: FakeLago) -> Any:
    """``value`` with the placeholders replaced by the fixture's ids."""
    if isinstance(value, str):
        return value.replace(INVOICE, fake.invoices[0]["lago_id"]).replace(
            METRIC_ID, fake.store.metrics["api_call"]["lago_id"]
        )
    if isinstance(value, list):
        return [_filled(v, fake) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v, fake) for k, v in value.items()}
    return value


async def send(client: httpx.AsyncClient, fake: FakeLago, call: Call) -> httpx.Response:
    return await client.request(
        call.method, "/api/v1" + _filled(call.path, fake), json=_filled(call.json, fake), params=call.params or None
    )


def _wrap_plan_entitlements(node: Any) -> Any:
    """``node`` with each plan's ``entitlements`` items wrapped as the spec types them (``PlanEntitlement``:
    ``{"entitlement": {...}}``); lago-api's PlanSerializer renders the entitlement objects themselves, as
    ``GET /plans/{code}/entitlements`` does, and so does the emulator."""
    if isinstance(node, list):
        return [_wrap_plan_entitlements(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _wrap_plan_entitlements(value) for key, value in node.items()}
    if "amount_cents" in out and "interval" in out and isinstance(out.get("entitlements"), list):
        out["entitlements"] = [{"entitlement": e} for e in out["entitlements"]]
    return out


def assert_matches_spec(response: httpx.Response) -> None:
    """Validate ``response`` against the spec, plan entitlements wrapped as it types them."""
    if response.headers.get("content-type", "").startswith("application/json"):
        body = _wrap_plan_entitlements(response.json())
        response = httpx.Response(response.status_code, json=body, request=response.request)
    assert_response_matches(response)


def _served(fake: FakeLago) -> set[tuple[str, str]]:
    app = fake._build_app()
    return {
        (method, route.path.removeprefix("/api/v1"))
        for route in app.routes
        if getattr(route, "path", "").startswith("/api/v1/")
        for method in (getattr(route, "methods", None) or set()) - {"HEAD"}
    }


def test_every_served_route_is_driven_here(fake: FakeLago) -> None:
    """The tables here name every /api/v1 route the emulator serves: a route added later must be added here too."""
    assert _served(fake) == set(SUCCESS)


@pytest.mark.parametrize("route", sorted(set(SUCCESS) - NOT_IN_SPEC), ids=lambda r: f"{r[0]} {r[1]}")
async def test_the_success_answer_matches_the_spec(
    route: tuple[str, str], fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """Each route's 200 answer validates against the spec's schema for that operation, and so does the request
    sent (its path, query and body are ones the spec allows). (GET /events_enriched, not in the spec:
    test_events_enriched_is_the_clickhouse_beta_list.)"""
    call = SUCCESS[route]
    response = await send(client, fake, call)
    assert response.status_code == 200, (str(call), response.text)
    assert_request_matches(response.request)
    if route in ANSWERS_THE_LIST:
        listed = await client.get(response.request.url.path.split("/entitlements")[0] + "/entitlements")
        assert response.json() == listed.json()
        response = httpx.Response(200, json=response.json(), request=listed.request)
    assert_matches_spec(response)


async def test_events_enriched_is_the_clickhouse_beta_list(clock: Clock) -> None:
    """``GET /events_enriched`` (not in the spec) is 403 endpoint_not_available on a Postgres store, and on
    ClickHouse a page of events with Lago's beta header."""
    postgres = FakeLago(api_key=API_KEY, clock=clock)
    async with postgres.client() as client:
        refused = await client.get("/api/v1/events_enriched")
    assert (refused.status_code, refused.json()) == (
        403,
        {"status": 403, "error": "Forbidden", "code": "endpoint_not_available"},
    )
    clickhouse = FakeLago(api_key=API_KEY, clock=clock, event_store="clickhouse")
    async with clickhouse.client() as client:
        assert (await client.post("/api/v1/events", json={"event": EVENT})).status_code == 200
        listed = await client.get("/api/v1/events_enriched")
    assert listed.status_code == 200
    assert listed.headers["X-Lago-Endpoint-Status"] == "beta"
    assert [e["transaction_id"] for e in listed.json()["events"]] == ["tx_2"]
    assert listed.json()["meta"]["total_count"] == 1


@pytest.mark.parametrize("route", sorted(SUCCESS), ids=lambda r: f"{r[0]} {r[1]}")
async def test_a_wrong_api_key_gets_the_specs_401(route: tuple[str, str], fake: FakeLago) -> None:
    """Every /api/v1 route answers a wrong key with Lago's 401 body, as the spec's ``Unauthorized`` response."""
    call = SUCCESS[route]
    async with fake.client(headers={"Authorization": "Bearer wrong"}) as client:
        response = await send(client, fake, call)
    assert response.status_code == 401
    assert response.json() == {"status": 401, "error": "Unauthorized"}
    if route not in NOT_IN_SPEC:
        assert_response_matches(response)


@pytest.mark.parametrize(("call", "code"), NOT_FOUND, ids=lambda v: str(v) if isinstance(v, Call) else "")
async def test_an_unknown_id_gets_the_specs_404(
    call: Call, code: str, fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """Each route with an id in its path (or naming a plan, metric or feature in its body) answers an unknown one
    with Lago's 404 ``<resource>_not_found``, as the spec's ``NotFound`` response."""
    response = await send(client, fake, call)
    assert response.status_code == 404, response.text
    assert response.json() == {"status": 404, "error": "Not Found", "code": code}
    assert_response_matches(response)


def test_every_route_with_an_id_has_a_404_case(fake: FakeLago) -> None:
    """NOT_FOUND drives each route with an id in its path, so no 404 answer goes unvalidated."""
    with_id = {route for route in _served(fake) if "{" in route[1]}
    driven = {
        (method, template)
        for method, template in with_id
        for call, _ in NOT_FOUND
        if call.method == method and _same_shape(call.path, template)
    }
    assert driven == with_id


@functools.lru_cache(maxsize=1)
def _spec_paths() -> dict[str, Any]:
    with SPEC_PATH.open("rb") as file:
        spec = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return spec["paths"]  # type: ignore[no-any-return]


def _spec_operation(method: str, template: str) -> dict[str, Any]:
    """The spec's operation for an emulator route (its path parameters may be named otherwise)."""
    for spec_template, operations in _spec_paths().items():
        parts, pattern = template.split("/"), spec_template.split("/")
        if len(parts) == len(pattern) and all(
            p == s or (p.startswith("{") and s.startswith("{")) for p, s in zip(parts, pattern, strict=True)
        ):
            return operations[method.lower()]  # type: ignore[no-any-return]
    raise AssertionError(f"{method} {template} is not in the spec")


def _same_shape(path: str, template: str) -> bool:
    parts, pattern = path.split("/"), template.split("/")
    return len(parts) == len(pattern) and all(p == t or t.startswith("{") for p, t in zip(parts, pattern, strict=True))


@pytest.mark.parametrize("call", MISSING_ROOT, ids=str)
async def test_a_body_without_its_root_key_gets_the_specs_400(
    call: Call, fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """A body without its root key (``customer``, ``event``, ``plan``...) is Lago's 400 BadRequest, as the
    spec's ``BadRequest`` response."""
    response = await send(client, fake, call)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("BadRequest: param is missing or the value is empty: ")
    assert_response_matches(response)


@pytest.mark.parametrize("call", ROOT_OPTIONAL, ids=str)
async def test_a_body_without_its_root_key_is_no_entitlements_where_lago_defaults_it(
    call: Call, fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """The entitlements routes read their root with a default (lago-api ``params.fetch(:entitlements, {})``): a body
    without it sets none, answered 200 as the spec says."""
    response = await send(client, fake, call)
    assert response.status_code == 200, response.text
    assert_response_matches(response)


@pytest.mark.parametrize(("call", "details"), UNPROCESSABLE, ids=lambda v: str(v) if isinstance(v, Call) else "")
async def test_an_invalid_request_gets_the_specs_422(
    call: Call, details: dict[str, Any], fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """A request Lago refuses is its 422 validation_errors naming the field, as the spec's ``UnprocessableEntity``
    response."""
    response = await send(client, fake, call)
    assert response.status_code == 422, response.text
    assert response.json() == {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": details,
    }
    assert_response_matches(response)


def test_the_4xx_tables_cover_every_write_route(fake: FakeLago) -> None:
    """MISSING_ROOT drives every route that takes a JSON body, and UNPROCESSABLE every route whose spec lists 422."""
    writes = {(m, t) for m, t in _served(fake) if m in ("POST", "PUT", "PATCH")}
    calls = MISSING_ROOT + ROOT_OPTIONAL
    assert {(m, t) for m, t in writes for c in calls if c.method == m and _same_shape(c.path, t)} == writes
    with_422 = {(m, t) for m, t in _served(fake) - NOT_IN_SPEC if "422" in _spec_operation(m, t)["responses"]}
    driven = {(m, t) for m, t in with_422 for c, _ in UNPROCESSABLE if c.method == m and _same_shape(c.path, t)}
    assert driven == with_422


# --- Request bodies the spec calls invalid ---------------------------------------------------------------------------

#: A required identifier given as a JSON object: Rails' ``permit(:key)`` drops a hash given for a scalar, so Lago
#: finds the field missing (422 value_is_mandatory); it must not be stored as the object's text
OBJECT_FOR_AN_IDENTIFIER: list[tuple[Call, dict[str, Any]]] = [
    (
        Call("POST", "/events", {"event": {**EVENT, "transaction_id": {"id": 1}}}),
        {"transaction_id": ["value_is_mandatory"]},
    ),
    (
        Call("POST", "/events", {"event": {**EVENT, "external_subscription_id": ["sub"]}}),
        {"external_subscription_id": ["value_is_mandatory"]},
    ),
    (Call("POST", "/events", {"event": {**EVENT, "code": {"code": "api_call"}}}), {"code": ["value_is_mandatory"]}),
    (
        Call("POST", "/events/batch", {"events": [EVENT, {**EVENT, "transaction_id": {"id": 1}}]}),
        {"1": {"transaction_id": ["value_is_mandatory"]}},
    ),
    (
        Call("POST", "/customers", {"customer": {"external_id": {"id": "acme"}}}),
        {"external_id": ["value_is_mandatory"]},
    ),
    (
        Call(
            "POST",
            "/subscriptions",
            {"subscription": {"external_customer_id": "acme", "plan_code": "pro", "external_id": ["s"]}},
        ),
        {"external_id": ["value_is_mandatory"]},
    ),
    (
        Call(
            "POST",
            "/subscriptions",
            {"subscription": {"external_customer_id": {"id": 1}, "plan_code": "pro", "external_id": "s"}},
        ),
        {"external_customer_id": ["value_is_mandatory"]},
    ),
    (
        Call(
            "POST",
            "/billable_metrics",
            {"billable_metric": {"name": "T", "code": ["t"], "aggregation_type": "count_agg"}},
        ),
        {"code": ["value_is_mandatory"]},
    ),
    (
        Call(
            "POST",
            "/billable_metrics",
            {"billable_metric": {"name": {"en": "T"}, "code": "t", "aggregation_type": "count_agg"}},
        ),
        {"name": ["value_is_mandatory"]},
    ),
    (Call("POST", "/features", {"feature": {"code": {"code": "sso"}}}), {"code": ["value_is_mandatory"]}),
    (Call("POST", "/plans", {"plan": {**PLAN_BODY["plan"], "code": ["team"]}}), {"code": ["value_is_mandatory"]}),
    (Call("POST", "/plans", {"plan": {**PLAN_BODY["plan"], "name": {"en": "Team"}}}), {"name": ["value_is_mandatory"]}),
]


@pytest.mark.parametrize(
    ("call", "details"), OBJECT_FOR_AN_IDENTIFIER, ids=lambda v: str(v) if isinstance(v, Call) else ""
)
async def test_an_object_for_a_required_string_is_the_422_lago_gives(
    call: Call, details: dict[str, Any], fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """A JSON object or array where the spec wants a required string (an event's transaction_id, a customer's
    external_id, a plan's code...) is Lago's 422 value_is_mandatory, not a 200 storing the object's Python text."""
    before = fake.snapshot()
    response = await send(client, fake, call)
    assert response.status_code == 422, response.text
    assert response.json()["error_details"] == details
    assert_response_matches(response)
    assert fake.snapshot() == before


#: A scalar of another type where the spec wants a string: Lago stores it in a string column, which casts it
#: (``123`` -> ``"123"``, ``true`` -> ``"t"``), and answers the string
SCALAR_FOR_A_STRING: list[tuple[Call, str, Any]] = [
    (Call("POST", "/customers", {"customer": {"external_id": "globex", "name": 123}}), "customer", "123"),
    (Call("POST", "/customers", {"customer": {"external_id": 42, "firstname": True}}), "customer", ("42", "t")),
    (
        Call(
            "POST",
            "/subscriptions",
            {"subscription": {"external_customer_id": "acme", "plan_code": "pro", "external_id": "s", "name": 7}},
        ),
        "subscription",
        "7",
    ),
    (Call("PUT", "/subscriptions/sub", {"subscription": {"name": 2026}}), "subscription", "2026"),
    (
        Call(
            "POST", "/billable_metrics", {"billable_metric": {"name": 5, "code": "t", "aggregation_type": "count_agg"}}
        ),
        "billable_metric",
        "5",
    ),
    (Call("PUT", "/billable_metrics/api_call", {"billable_metric": {"name": 6}}), "billable_metric", "6"),
    (Call("POST", "/features", {"feature": {"code": "sso", "name": 8}}), "feature", "8"),
    (Call("PUT", "/features/seats", {"feature": {"name": 9.5}}), "feature", "9.5"),
    (Call("POST", "/plans", {"plan": {**PLAN_BODY["plan"], "name": 10}}), "plan", "10"),
    (Call("PUT", "/plans/free", {"plan": {"name": 11}}), "plan", "11"),
]


@pytest.mark.parametrize(
    ("call", "root", "expected"), SCALAR_FOR_A_STRING, ids=lambda v: str(v) if isinstance(v, Call) else ""
)
async def test_a_number_for_a_string_comes_back_as_the_string_lago_stores(
    call: Call, root: str, expected: Any, fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """A number or a boolean given for a string field (a name, an external id) is answered as the string Lago's
    string column makes of it, so the answer still validates against the spec."""
    response = await send(client, fake, call)
    assert response.status_code == 200, response.text
    answered = response.json()[root]
    if isinstance(expected, tuple):
        assert (answered["external_id"], answered["firstname"]) == expected
    else:
        assert answered["name"] == expected
    assert_matches_spec(response)


#: An object where the spec wants an optional string, on an update: Rails' ``permit`` drops it, the field is kept
OBJECT_FOR_AN_OPTIONAL_STRING: list[tuple[Call, str, Any]] = [
    (Call("POST", "/customers", {"customer": {"external_id": "acme", "name": {"en": "X"}}}), "customer", "Acme"),
    (Call("PUT", "/subscriptions/sub", {"subscription": {"name": ["Main"]}}), "subscription", None),
    (
        Call("PUT", "/billable_metrics/api_call", {"billable_metric": {"name": {"en": "X"}}}),
        "billable_metric",
        "api_call",
    ),
    (Call("PUT", "/features/seats", {"feature": {"name": ["X"]}}), "feature", None),
    (Call("PUT", "/plans/free", {"plan": {"name": {"en": "X"}}}), "plan", "free"),
]


@pytest.mark.parametrize(
    ("call", "root", "kept"), OBJECT_FOR_AN_OPTIONAL_STRING, ids=lambda v: str(v) if isinstance(v, Call) else ""
)
async def test_an_object_for_an_optional_string_is_dropped_as_rails_permit_does(
    call: Call, root: str, kept: Any, fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """An object or array given for a name on an update is dropped (Rails' ``permit`` keeps scalars only): the name
    stays what it was and the answer validates against the spec, instead of echoing the object."""
    response = await send(client, fake, call)
    assert response.status_code == 200, response.text
    assert response.json()[root]["name"] == kept
    assert_matches_spec(response)
