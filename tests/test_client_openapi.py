"""Every request LagoClient sends validates against Lago's official OpenAPI spec (path, query and body)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest

from _openapi import assert_request_matches
from lago_org_billing import BillingSettings, LagoClient, LagoNotFoundError

pytestmark = pytest.mark.anyio


class Recorder(httpx.AsyncBaseTransport):
    """Passes requests to the emulator and keeps each (request, response)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[httpx.Response] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.inner.handle_async_request(request)
        await response.aread()
        response.request = request
        self.exchanges.append(response)
        return response


async def test_every_client_request_matches_the_spec(fake_lago: Any) -> None:
    """The request of every API call (path, query parameters, JSON body) follows Lago's OpenAPI spec."""
    recorder = Recorder(fake_lago.transport())
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key)
    fake_lago.add_customer("org_2", name="Other")
    fake_lago.add_invoice("org_2")
    async with LagoClient(settings, transport=recorder) as lago:
        metric = await lago.create_billable_metric(
            {"name": "Calls", "code": "api_call", "aggregation_type": "sum_agg", "field_name": "total_tokens"}
        )
        await lago.get_billable_metric("api_call")
        await lago.create_plan(
            {
                "name": "Starter",
                "code": "starter",
                "interval": "monthly",
                "amount_cents": 1000,
                "amount_currency": "USD",
                "pay_in_advance": False,
                "charges": [
                    {"billable_metric_id": metric["lago_id"], "charge_model": "standard", "properties": {"amount": "1"}}
                ],
            }
        )
        await lago.get_plan("starter")
        await lago.create_feature(
            {
                "code": "api_quota",
                "name": "API quota",
                "privileges": [{"code": "max_api_calls", "value_type": "integer"}],
            }
        )
        await lago.set_plan_entitlements("starter", {"api_quota": {"max_api_calls": 300}})
        await lago.upsert_customer(
            {
                "external_id": "org_1",
                "name": "Acme",
                "email": "billing@acme.test",
                "metadata": [{"key": "billing_type", "value": "organization", "display_in_invoice": False}],
            }
        )
        await lago.update_customer("org_1", name="Acme Inc")
        await lago.get_customer("org_1")
        await lago.list_customers(per_page=10, search_term="Acme")
        await lago.create_subscription(
            external_customer_id="org_1",
            plan_code="starter",
            external_id="org_1",
            billing_time="calendar",
            subscription_at="2026-01-01T00:00:00Z",
        )
        await lago.get_subscription("org_1", status="active")
        # The spec marks ending_at as required on update (the server does not): null means "renews".
        await lago.update_subscription("org_1", name="Main", ending_at=None)
        await lago.list_subscriptions(external_customer_id="org_1", statuses=["active", "pending"])
        await lago.get_subscription_entitlements("org_1")
        await lago.update_subscription_entitlements("org_1", {"api_quota": {"max_api_calls": 500}})
        await lago.get_subscription_entitlements("org_1", status="active")
        await lago.update_subscription_entitlements("org_1", {"api_quota": {"max_api_calls": 400}}, status="active")
        await lago.list_features(per_page=1)
        await lago.remove_subscription_entitlement("org_1", "api_quota", "max_api_calls")
        now = dt.datetime.now(dt.timezone.utc)
        event = {"external_subscription_id": "org_1", "code": "api_call", "properties": {"total_tokens": 5}}
        await lago.create_event({**event, "transaction_id": "tx_1", "timestamp": now})
        await lago.create_events([{**event, "transaction_id": f"tx_b{i}"} for i in range(3)])
        await lago.get_event("tx_1")
        await lago.get_current_usage("org_1", "org_1", billable_metric_code="api_call")
        await lago.list_invoices(external_customer_id="org_2", per_page=5)
        await lago.get_webhook_public_key()
        await lago.terminate_subscription("org_1", on_termination_invoice="skip")
        await lago.delete_customer("org_2")
        with pytest.raises(LagoNotFoundError):
            await lago.get_customer("missing")
    api_calls = [r for r in recorder.exchanges if r.request.url.path.startswith("/api/v1/")]
    assert len(api_calls) == 29  # one request per call above
    for response in api_calls:  # (the emulator's answers are checked in tests/emulator/test_openapi_conformance.py)
        assert_request_matches(response.request)
