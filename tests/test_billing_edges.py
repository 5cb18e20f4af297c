"""OrgBilling and the client as callers use them directly: record_api_call's timestamp, updates and events whose answer
was lost (the client's retry meets what Lago applied), metadata limits and filters, subscription dates and plan
overrides, Lago's unhealthy answer."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from lago_org_billing import (
    BillingSettings,
    InvalidRequestError,
    LagoClient,
    LagoUnavailableError,
    LagoValidationError,
    OrgBilling,
)
from lago_org_billing._billing import customer_metadata

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc


@pytest.fixture
async def billing(fake_lago: Any, lago_client: LagoClient) -> AsyncIterator[OrgBilling]:
    """OrgBilling over the emulator, with an api_call metric and two plans."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.001"}}
    fake_lago.add_plan("starter", amount_cents=1000, charges=[charge])
    fake_lago.add_plan("pro", amount_cents=5000, charges=[charge])
    async with OrgBilling(client=lago_client) as service:
        yield service


class LoseAnswers(httpx.AsyncBaseTransport):
    """Passes every request to ``inner`` (so Lago applies it), then answers the first ``count`` requests that
    ``match`` with a 502 instead of Lago's answer: a proxy timing out, a connection cut after the commit."""

    def __init__(self, inner: httpx.AsyncBaseTransport, match: Callable[[httpx.Request], bool], count: int = 1):
        self.inner = inner
        self.match = match
        self.left = count
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        response = await self.inner.handle_async_request(request)
        if self.left > 0 and self.match(request):
            self.left -= 1
            await response.aread()
            return httpx.Response(502, text="<html>502 Bad Gateway</html>", headers={"content-type": "text/html"})
        return response


def _settings(base_url: str, api_key: str, **changes: Any) -> BillingSettings:
    values: dict[str, Any] = {"api_url": base_url, "api_key": api_key, "retry_backoff": 0.001, "max_retries": 3}
    values.update(changes)
    return BillingSettings(**values)


# --------------------------------------------------------------------------------------------- usage events


async def test_record_api_call_timestamp_is_the_event_time_not_a_property(fake_lago: Any, billing: OrgBilling) -> None:
    """record_api_call takes no ``timestamp``: ``timestamp=`` falls into ``**properties``, so the event is stamped
    *now* (billed in the wrong period) with a ``timestamp`` property, silently. A caller replaying a call made
    earlier, or retrying across processes (what record_usage's docstring asks on the ClickHouse store: pass the
    same timestamp), cannot: each retry is a new billable event there."""
    await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    # (an int of Unix seconds, as the seed's callers pass it, goes silently into properties; a datetime is refused
    # as "Event properties must be JSON-serialisable", which does not say timestamp is not a parameter)
    event = await billing.record_api_call("org_1", "tx_ts", "/v1/chat", "u1", tokens=3, timestamp=int(when.timestamp()))
    assert "timestamp" not in event["properties"]
    assert event["timestamp"].startswith("2026-01-02T03:04:05")


# ------------------------------------------------------------------------------------------------ customers


async def test_update_org_customer_after_a_lost_answer_is_not_an_error(fake_lago: Any) -> None:
    """POST /customers adding a metadata key is retried after a 502 although Lago applied it: the retry re-sends the
    new key without an id, Lago answers 422 key value_already_exist, and update_org_customer raises "fix the fields"
    while the update is in Lago. (create_org_customer handles that very 422; _update does not.) subscribe_org_to_plan
    completing a bare customer goes through the same path."""
    transport = LoseAnswers(
        fake_lago.transport(),
        lambda r: r.method == "POST" and r.url.path == "/api/v1/customers" and b'"region"' in r.content,
    )
    settings = _settings(fake_lago.base_url, fake_lago.api_key)
    async with OrgBilling(settings, client=LagoClient(settings, transport=transport)) as billing:
        await billing.create_org_customer("org_1", "Acme", user_id="u1")
        updated = await billing.update_org_customer("org_1", metadata={"region": "eu"})
    assert customer_metadata(updated)["region"] == "eu"


async def test_blank_metadata_value_is_refused_before_any_call(fake_lago: Any, billing: OrgBilling) -> None:
    """Lago's Metadata::CustomerMetadata validates ``value`` with ``presence: true``: a whitespace-only value is
    blank to Rails and answered 422 value_is_mandatory. check_metadata refuses a blank *key* (``key.strip()``) but
    lets a blank value through, although it promises "Lago's limits checked before any call"."""
    before = len(fake_lago.write_requests)
    with pytest.raises(InvalidRequestError):
        await billing.create_org_customer("org_1", "Acme", metadata={"note": "   "})
    assert len(fake_lago.write_requests) == before


async def test_subscribe_org_to_plan_subscribes_an_org_whose_customer_has_full_metadata(
    fake_lago: Any, billing: OrgBilling
) -> None:
    """The seed's one-call setup: an org whose customer exists already with its own 5 metadata items (Lago's
    maximum, e.g. written by a CRM sync) cannot be subscribed at all: completing the customer with billing_type and
    created_by_user_id makes 7 items, and InvalidRequestError ("7 items ... at most 5", items the caller never
    passed) is raised before the subscription is created. The org markers are a nice-to-have; the subscription is
    the point of the call."""
    fake_lago.add_customer("org_full", name="Full", metadata=[{"key": f"crm_{i}", "value": "x"} for i in range(5)])
    result = await billing.subscribe_org_to_plan("org_full", "starter", "Full", user_id="u1")
    assert result["subscription"]["plan_code"] == "starter"
    assert await billing.get_subscription("org_full") is not None


# -------------------------------------------------------------------------------------------- subscriptions


async def test_subscription_at_as_a_date_is_not_an_attribute_error(billing: OrgBilling) -> None:
    """``create_subscription(org_id, plan_code, billing_time, subscription_at)``: a ``datetime.date`` (the natural
    value for "start on the 1st") raises AttributeError ('datetime.date' object has no attribute 'tzinfo') from
    _iso, not an error of the package saying what to pass."""
    subscription = await billing.create_subscription("org_d", "starter", subscription_at=dt.date(2026, 1, 1))
    assert subscription["subscription_at"].startswith("2026-01-01")


async def test_a_subscription_with_plan_overrides_is_not_retried_blindly() -> None:
    """Lago (create_service.rb #upgrade?) compares ``plan.id`` with the current subscription's plan id; with
    ``plan_overrides`` that plan is the override child, so a repeated POST is an *upgrade*: the subscription just
    made is terminated (termination invoice) and a new record replaces it. The client retries POST /subscriptions
    on a 502 like an idempotent call, so a lost answer makes Lago create the overridden subscription twice."""
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/v1/subscriptions":
            posts.append(request)
            if len(posts) == 1:  # applied by Lago, answer lost on the way back
                return httpx.Response(502, text="bad gateway")
            body = json.loads(request.content)["subscription"]
            return httpx.Response(200, json={"subscription": {**body, "status": "active", "lago_id": "s2"}})
        return httpx.Response(404, json={"status": 404, "error": "Not Found", "code": "subscription_not_found"})

    settings = _settings("http://lago.test", "k")
    async with LagoClient(settings, transport=httpx.MockTransport(handler)) as lago:
        try:
            await lago.create_subscription(
                external_customer_id="org_1",
                plan_code="starter",
                external_id="org_1",
                plan_overrides={"amount_cents": 500},
            )
        except LagoUnavailableError:
            pass
    assert len(posts) == 1


# ---------------------------------------------------------------------------------------------------- lists


async def test_metadata_filters_of_lists_reach_lago_as_metadata_key(fake_lago: Any, lago_client: LagoClient) -> None:
    """Lago filters customers and invoices with ``metadata[key]=value`` (OAS). ``list_customers(metadata={...})``
    sends ``metadata={'billing_type': 'organization'}`` (str of the dict), which Lago ignores: every customer comes
    back, users included, as if they were org customers. It should send ``metadata[billing_type]=organization``
    (or refuse the dict)."""
    fake_lago.add_customer("org_1", name="Org", metadata=[{"key": "billing_type", "value": "organization"}])
    fake_lago.add_customer("user_1", name="User")
    page = await lago_client.list_customers(metadata={"billing_type": "organization"})
    assert [customer["external_id"] for customer in page.items] == ["org_1"]


# ------------------------------------------------------------------------------------------- health, errors


async def test_health_says_why_lago_is_unhealthy() -> None:
    """Lago's /health answers an unhealthy database with ``500 {"message": "Unhealthy", "details": "<error>",
    "version": ...}``. check_lago_health reports "500 Internal Server Error ... retry later" and version None: the
    reason and the version Lago gave are dropped (the ``details`` branch only runs on a 2xx, which Lago never sends
    for an unhealthy instance)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(
                500,
                json={
                    "version": "v1.30.0",
                    "github_url": "https://github.com/getlago/lago",
                    "message": "Unhealthy",
                    "details": "PG::ConnectionBad: could not connect to server",
                },
            )
        return httpx.Response(200, json={"customers": [], "meta": {}})

    settings = _settings("http://lago.test", "k", max_retries=0)
    async with OrgBilling(settings, client=LagoClient(settings, transport=httpx.MockTransport(handler))) as billing:
        report = await billing.check_lago_health()
    assert report["healthy"] is False
    assert "PG::ConnectionBad" in (report["error"] or "")


async def test_an_event_ingested_behind_a_lost_answer_is_not_reported_as_bad_fields(fake_lago: Any) -> None:
    """create_event retries POST /events after a 502 although Lago stored the event; the retry gets Lago's 422
    transaction_id value_already_exist and the caller is told "Lago refused the values sent: fix the fields its error
    details name": the event *is* in Lago and nothing is to be fixed (a caller following the advice changes the
    transaction_id and bills twice). The client should take its own retry's duplicate as delivered, or at least say
    the event is already in Lago."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_customer("org_1", name="Acme")
    fake_lago.add_subscription("org_1", "starter", external_id="org_1")
    transport = LoseAnswers(fake_lago.transport(), lambda r: r.method == "POST" and r.url.path == "/api/v1/events")
    settings = _settings(fake_lago.base_url, fake_lago.api_key)
    event = {"transaction_id": "tx_lost", "external_subscription_id": "org_1", "code": "api_call", "properties": {}}
    async with LagoClient(settings, transport=transport) as lago:
        try:
            await lago.create_event(event)
        except LagoValidationError as exc:
            assert "fix the fields" not in str(exc)
            assert "already" in str(exc)
    assert [e["transaction_id"] for e in fake_lago.events] == ["tx_lost"]
