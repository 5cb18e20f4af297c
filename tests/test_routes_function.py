"""billing_routes() used as an app developer would, behind OrgBillingMiddleware, against
the emulator: what the dashboard shows next to what the gate enforces, amounts in currency units, usage recorded
through the routes counted by the gate at once."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from _quota_app import Clock, chat
from lago_org_billing import BillingSettings, LagoClient, OrgBilling, OrgBillingMiddleware, billing_routes
from lago_org_billing._dashboard import render_html
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "review-routes-key"
ORG = {"X-Org-Id": "org_1"}


def allow_all(request: Any, org_id: str) -> bool:
    return True


@dataclass
class App:
    fake: FakeLago
    http: httpx.AsyncClient
    middleware: OrgBillingMiddleware


def _seed(fake: FakeLago, *, feature: str = "api_quota", privilege: str = "max_api_calls", calls: int = 3) -> None:
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_feature(feature, privileges=[{"code": privilege, "value_type": "integer"}])
    charge = {"billable_metric_code": "api_call", "properties": {"amount": "0"}}
    fake.add_plan("starter", amount_cents=1000, charges=[charge], entitlements={feature: {privilege: calls}})
    fake.add_plan("pro", amount_cents=5000, charges=[charge], entitlements={feature: {privilege: 1000}})
    fake.add_customer("org_1")
    fake.add_subscription("org_1", "starter")


async def _app(fake: FakeLago, clock: Clock, **middleware_options: Any) -> AsyncIterator[App]:
    """An API (/v1/chat) and the billing routes (/billing, excluded as the README says) behind the middleware."""
    settings = BillingSettings(
        api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", max_retries=0, exclude_paths=("/billing",)
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=allow_all)
        app = Starlette(routes=[Route("/v1/chat", chat), Mount("/billing", app=router)])
        if "quota_config" not in middleware_options:
            middleware_options["quota"] = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(app, settings, client=lago, **middleware_options)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            yield App(fake, http, middleware)
        await middleware.aclose()


# ------------------------------------------------------------------------------ dashboard vs the gate's config


async def test_dashboard_shows_the_limit_the_gate_enforces_with_a_quota_config_given_in_code() -> None:
    """OrgBillingMiddleware(app, quota_config=QuotaConfig(feature_code=..., calls_privilege=...)) (the README's way in
    code; LAGO_QUOTA_* then unread): the gate blocked the org's 3rd call while its dashboard said "No limits are
    configured for this plan": the dashboard read QuotaConfig.from_env(), not the gate's config."""
    clock = Clock()  # (the automatic gate runs on the real time: so does the emulator here)
    fake = FakeLago(api_key=API_KEY)
    _seed(fake, feature="llm_limits", privilege="requests", calls=2)
    config = QuotaConfig(feature_code="llm_limits", calls_privilege="requests")
    async for app in _app(fake, clock, quota_config=config):
        statuses = [(await app.http.get("/v1/chat", headers=ORG)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert await app.middleware.pipeline.flush(5)
        data = (await app.http.get("/billing/organizations/org_1/dashboard", headers=ORG)).json()
        page = (await app.http.get("/billing/organizations/org_1/dashboard?format=html", headers=ORG)).text
    limits = {limit["name"]: limit for limit in data["limits"]}
    assert limits["requests"].items() >= {"limit": 2, "used": 2, "exceeded": True}.items()
    assert data["limits_source"] == "entitlements"
    assert "No limits are configured" not in page


# ------------------------------------------------------------------------------------------- currency units


@pytest.mark.parametrize(
    ("cents", "currency", "shown"),
    [
        (123_456, "USD", "1,234.56 USD"),
        (1_500, "JPY", "1,500 JPY"),  # Lago's amount_cents are the currency's subunits: the yen has none
        (52_000, "KRW", "52,000 KRW"),
        (1_234, "KWD", "1.234 KWD"),  # three decimals (fils)
        (1_234, None, "12.34"),
    ],
)
def test_dashboard_amounts_are_in_the_currencys_units(cents: int, currency: str | None, shown: str) -> None:
    """Lago's amount_cents are subunits of the currency (Money's subunit_to_unit: 1 for JPY, 1000 for KWD): a bill of
    1,500 yen was shown as "15.00 JPY", one of 1.234 KWD as "12.34 KWD"."""
    data = {
        "org_id": "org_1",
        "amount": {"amount_cents": cents, "currency": currency},
        "metrics": [{"code": "api_call", "name": "API calls", "units": 1, "events": 1, "amount_cents": cents}],
        "by_user": [{"user_id": "ada", "events": 1, "amount_cents": cents, "units": {"api_call": 1}}],
    }
    page = render_html(data)
    assert re.search(r'id="amount"[^>]*>' + re.escape(shown) + "<", page), page
    assert page.count(f">{shown}<") == 3  # usage so far, the metric's row, the user's row


# ------------------------------------------------------------------------------- usage recorded by the routes


async def test_usage_recorded_through_the_routes_counts_against_the_quota_at_once() -> None:
    """POST /usage/record of LAGO_EVENT_CODE events (a batch job's calls): the gate did not count them until its next
    snapshot of Lago (LAGO_USAGE_CACHE_TTL), so an org at its limit kept being served; OrgBilling(quota=) counts what
    it records at once, the routes did not (limit 3: one call, two recorded, the next call must be refused)."""
    clock = Clock()
    fake = FakeLago(api_key=API_KEY, clock=clock.now)
    _seed(fake, calls=3)
    async for app in _app(fake, clock):
        assert (await app.http.get("/v1/chat", headers=ORG)).status_code == 200
        assert await app.middleware.pipeline.flush(5)
        for n in range(2):
            body = {"transaction_id": f"batch-{n}", "user_id": "job"}
            recorded = await app.http.post("/billing/organizations/org_1/usage/record", json=body, headers=ORG)
            assert recorded.status_code == 201, recorded.text
        again = await app.http.post(
            "/billing/organizations/org_1/usage/record",
            json={"transaction_id": "batch-1", "user_id": "job"},
            headers=ORG,
        )
        assert (again.status_code, again.json()["duplicate"]) == (200, True)  # a retry is not counted twice
        over = await app.http.get("/v1/chat", headers=ORG)
    assert over.status_code == 429, over.text
    assert len(fake.events) == 3


# ------------------------------------------------------------------------------------- tokens in properties


@pytest.mark.parametrize(
    ("body", "total"),
    [
        ({"properties": {"total_tokens": 500}}, 500),
        ({"properties": {"input_tokens": 5, "output_tokens": 7}}, 12),
        ({"properties": {"total_tokens": 500, "input_tokens": 5}}, 500),
        ({"input_tokens": 5, "output_tokens": 7}, 12),
        ({"tokens": 10, "properties": {"total_tokens": 500}}, 10),  # the explicit count wins
        ({}, 0),
    ],
)
async def test_recorded_api_calls_keep_the_token_counts_of_their_properties(body: dict[str, Any], total: int) -> None:
    """POST /usage/record {"properties": {"total_tokens": 500}} (an api_call whose properties carry Lago's own field)
    was recorded with total_tokens 0: the 500 tokens were never billed. So were input/output tokens given as
    properties."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_plan(
        "starter", amount_cents=0, charges=[{"billable_metric_code": "api_call", "properties": {"amount": "1"}}]
    )
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago)
        await billing.subscribe_org_to_plan("org_1", "starter", "Org 1")
        router = billing_routes(billing, authorize=allow_all)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as http:
            response = await http.post("/organizations/org_1/usage/record", json=body)
            assert response.status_code == 201, response.text
            usage = (await http.get("/organizations/org_1/usage/current")).json()["usage"]
    [event] = fake.events
    assert event["properties"]["total_tokens"] == total
    assert usage["charges_usage"][0]["units"] in (str(total), f"{total}.0")


async def test_record_api_call_keeps_a_total_tokens_property() -> None:
    """OrgBilling.record_api_call(org, tx, total_tokens=300) (extra properties are kwargs) recorded total_tokens 0."""
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago)
        await billing.record_api_call("org_1", "tx_1", "/v1/chat", "ada", total_tokens=300)
        await billing.record_api_call("org_1", "tx_2", "/v1/chat", "ada", tokens=40, total_tokens=300)
    assert [event["properties"]["total_tokens"] for event in fake.events] == [300, 40]


# ------------------------------------------------------------------------------------------ invoice history


async def test_invoices_page_through_the_whole_history() -> None:
    """GET /invoices listed the latest ``limit`` (at most 100) and nothing older, without saying more exist: an org's
    invoice history past its 100 latest invoices could not be read. ``?page=`` pages through it and ``meta`` says
    where the list stands (Lago's pagination)."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_customer("org_1")
    for day in range(1, 13):
        fake.add_invoice("org_1", issuing_date=f"2025-{day:02d}-01", total_amount_cents=day)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=allow_all)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as http:
            first = (await http.get("/organizations/org_1/invoices?limit=5")).json()
            last = (await http.get("/organizations/org_1/invoices?limit=5&page=3")).json()
            beyond = (await http.get("/organizations/org_1/invoices?limit=5&page=4")).json()
            bad = [
                (await http.get(f"/organizations/org_1/invoices?page={page}")).status_code for page in ("0", "x", "")
            ]
    assert [i["total_amount_cents"] for i in first["invoices"]] == [12, 11, 10, 9, 8]  # latest first
    assert first["meta"] == {"page": 1, "next_page": 2, "total_pages": 3, "total_count": 12}
    assert [i["total_amount_cents"] for i in last["invoices"]] == [2, 1]
    assert last["meta"]["next_page"] is None
    assert beyond["invoices"] == []
    assert bad == [422, 422, 422]
