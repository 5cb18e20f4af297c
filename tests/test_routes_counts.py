"""Token counts taken from an event's properties, usage recorded
through the routes counted by the middleware's gate, the dashboard's gate config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from _quota_app import Clock, chat
from lago_org_billing import (
    BillingSettings,
    InvalidRequestError,
    LagoClient,
    OrgBilling,
    OrgBillingMiddleware,
    billing_routes,
)
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "rereview-routes-key"
ORG = {"X-Org-Id": "org_1"}


def allow_all(request: Any, org_id: str) -> bool:
    return True


async def _routes(fake: FakeLago) -> AsyncIterator[tuple[OrgBilling, httpx.AsyncClient]]:
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "api_call", "properties": {"amount": "1"}}
    fake.add_plan("starter", amount_cents=0, charges=[charge])
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago)
        await billing.subscribe_org_to_plan("org_1", "starter", "Org 1")
        router = billing_routes(billing, authorize=allow_all)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as http:
            yield billing, http


# ------------------------------------------------------------------------------- token counts in properties


@pytest.mark.parametrize(
    ("properties", "total"),
    [
        # Python's json writes a float count as 500.0 (a count computed with /, or from a float header): whole
        ({"input_tokens": 500.0, "output_tokens": 20.0}, 520),
        ({"input_tokens": "500", "output_tokens": "20"}, 520),  # counts read from headers, as strings
        ({"total_tokens": "520"}, 520),
        # a null or 0 total next to the parts (an SDK's usage object with total_tokens unset): the parts are the count,
        # as with the arguments (tokens=0, input_tokens=5, output_tokens=7 records 12)
        ({"total_tokens": None, "input_tokens": 5, "output_tokens": 7}, 12),
        ({"total_tokens": 0, "input_tokens": 5, "output_tokens": 7}, 12),
    ],
)
async def test_token_counts_of_the_properties_are_billed_as_whole_numbers(
    properties: dict[str, Any], total: int
) -> None:
    """POST /usage/record {"properties": {"input_tokens": 500.0, "output_tokens": 20.0}}: recorded total_tokens 0 (the
    parts were summed only when JSON integers): 520 tokens never billed; a null total_token next to its parts was
    recorded null, and a numeric string was recorded as a string the gate did not count."""
    fake = FakeLago(api_key=API_KEY)
    async for _billing, http in _routes(fake):
        response = await http.post("/organizations/org_1/usage/record", json={"properties": properties})
        assert response.status_code == 201, response.text
        usage = (await http.get("/organizations/org_1/usage/current")).json()["usage"]
    [event] = fake.events
    assert event["properties"]["total_tokens"] == total
    assert usage["charges_usage"][0]["units"] in (str(total), f"{total}.0")


@pytest.mark.parametrize(
    "properties",
    [
        {"total_tokens": -500},  # a credit: lowers the org's bill
        {"total_tokens": True},
        {"total_tokens": 1.5},
        {"total_tokens": "many"},
        {"total_tokens": 2**64},  # past what a JSON reader keeps exact
    ],
)
async def test_record_api_call_refuses_token_properties_that_are_not_counts(properties: dict[str, Any]) -> None:
    """OrgBilling.record_api_call(org, tx, total_tokens=-500) refuses tokens=-500 but recorded total_tokens -500
    (a sum_agg credit: the org's bill lowered), True, 1.5 or "many" as they were: the properties' counts now meet the
    arguments' rule (a whole number from 0 to 2**53 - 1)."""
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago)
        with pytest.raises(InvalidRequestError, match="whole number"):
            await billing.record_api_call("org_1", "tx_1", "/v1/chat", "ada", **properties)
    assert fake.events == []


@pytest.mark.parametrize("properties", [{"total_tokens": 1.5}, {"total_tokens": "many"}, {"input_tokens": True}])
async def test_the_route_refuses_token_properties_that_are_not_counts(properties: dict[str, Any]) -> None:
    """The same through POST /usage/record: a 422 naming the count, not an event Lago sums as it can."""
    fake = FakeLago(api_key=API_KEY)
    async for _billing, http in _routes(fake):
        response = await http.post("/organizations/org_1/usage/record", json={"properties": properties})
    assert response.status_code == 422, response.text
    assert "whole number" in response.text
    assert fake.events == []


# ------------------------------------------------------------------- the gate when invalidate= is a function


async def _app(
    fake: FakeLago, clock: Clock, invalidated: list[str], **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = BillingSettings(
        api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", max_retries=0, exclude_paths=("/billing",)
    )

    async def invalidate(org_id: str) -> None:  # e.g. the app's own caches too
        invalidated.append(org_id)

    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=allow_all, invalidate=invalidate)
        app = Starlette(routes=[Route("/v1/chat", chat), Mount("/billing", app=router)])
        middleware = OrgBillingMiddleware(app, settings, client=lago, **options)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            yield http
        await middleware.aclose()


def _seed(fake: FakeLago, *, feature: str, privilege: str, calls: int) -> None:
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_feature(feature, privileges=[{"code": privilege, "value_type": "integer"}])
    charge = {"billable_metric_code": "api_call", "properties": {"amount": "0"}}
    fake.add_plan("starter", amount_cents=1000, charges=[charge], entitlements={feature: {privilege: calls}})
    fake.add_customer("org_1")
    fake.add_subscription("org_1", "starter")


async def test_usage_recorded_through_the_routes_is_counted_when_invalidate_is_a_function() -> None:
    """billing_routes(..., invalidate=async_fn) behind OrgBillingMiddleware(quota=gate): the recorded usage was not
    counted by the gate (``_gate()`` returned the function, which has no ``settle``), so an org at its limit kept
    being served until the next snapshot."""
    clock = Clock()
    fake = FakeLago(api_key=API_KEY, clock=clock.now)
    _seed(fake, feature="api_quota", privilege="max_api_calls", calls=3)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", max_retries=0)
    invalidated: list[str] = []
    async with LagoClient(settings, transport=fake.transport()) as gate_lago:
        gate = QuotaGate(settings, gate_lago, config=QuotaConfig(), clock=clock.time)
        async for http in _app(fake, clock, invalidated, quota=gate):
            assert (await http.get("/v1/chat", headers=ORG)).status_code == 200
            for n in range(2):
                body = {"transaction_id": f"batch-{n}"}
                recorded = await http.post("/billing/organizations/org_1/usage/record", json=body, headers=ORG)
                assert recorded.status_code == 201, recorded.text
            over = await http.get("/v1/chat", headers=ORG)
    assert over.status_code == 429, over.text


async def test_dashboard_reads_the_gates_config_when_invalidate_is_a_function() -> None:
    """The dashboard names the limits of the gate's QuotaConfig (quota_config= in code): with invalidate= a function
    it read QuotaConfig.from_env() instead and said "no limits" for an org the gate was blocking."""
    clock = Clock()
    fake = FakeLago(api_key=API_KEY)
    _seed(fake, feature="llm_limits", privilege="requests", calls=2)
    config = QuotaConfig(feature_code="llm_limits", calls_privilege="requests")
    invalidated: list[str] = []
    async for http in _app(fake, clock, invalidated, quota_config=config):
        data = (await http.get("/billing/organizations/org_1/dashboard", headers=ORG)).json()
        # a setup still calls the function given
        setup = await http.post(
            "/billing/organizations/org_1/setup", json={"name": "Org 1", "plan_code": "starter"}, headers=ORG
        )
    limits = {limit["name"]: limit for limit in data["limits"]}
    assert "requests" in limits, data
    assert limits["requests"]["limit"] == 2
    assert setup.status_code < 300, setup.text
    assert invalidated == ["org_1"]
