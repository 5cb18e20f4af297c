"""LagoClient and OrgBilling called directly: subscription dates in the customer's time zone, partly duplicate batches,
creators with email ids, two users creating one org's customer at once."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lago_org_billing import InvalidRequestError, LagoClient, LagoValidationError, OrgBilling
from lago_org_billing._billing import customer_metadata

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc


@pytest.fixture
async def billing(fake_lago: Any, lago_client: LagoClient) -> AsyncIterator[OrgBilling]:
    """OrgBilling over the emulator, with an api_call metric (sum of total_tokens) and a starter plan."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.001"}}
    fake_lago.add_plan("starter", amount_cents=1000, charges=[charge])
    async with OrgBilling(client=lago_client) as service:
        yield service


@pytest.mark.parametrize(
    ("timezone", "midnight"),
    [
        ("Asia/Tokyo", "2026-02-28T15:00:00Z"),
        ("America/New_York", "2026-03-01T05:00:00Z"),
        (None, "2026-03-01T00:00:00Z"),
    ],
)
async def test_subscription_at_as_a_date_starts_that_day_in_the_customers_timezone(
    fake_lago: Any, billing: OrgBilling, timezone: str | None, midnight: str
) -> None:
    """``subscription_at=date(2026, 3, 1)`` for a Tokyo customer starts on 1 March in Tokyo (Lago counts billing days
    in the customer's time zone), not at 09:00 there (its first 9 hours of usage unbilled) nor, for New York, on the
    evening of 28 February (a one-day February period, its plan fee prorated, on an invoice of its own)."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    fields: dict[str, Any] = {"timezone": timezone} if timezone else {}
    await billing.create_org_customer("org_1", "Acme", **fields)
    subscription = await billing.create_subscription("org_1", "starter", subscription_at=dt.date(2026, 3, 1))
    assert subscription["subscription_at"] == midnight
    fake_lago.clock = lambda: dt.datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert (await billing.get_subscription("org_1"))["current_billing_period_started_at"] == midnight  # type: ignore[index]


async def test_subscription_at_date_of_an_org_without_customer_is_utc(fake_lago: Any, billing: OrgBilling) -> None:
    """No customer yet (Lago creates it, in UTC by default): the day starts at 00:00 UTC, one call to Lago more."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    subscription = await billing.create_subscription("org_2", "starter", subscription_at=dt.date(2026, 3, 1))
    assert subscription["subscription_at"] == "2026-03-01T00:00:00Z"


async def test_usage_on_the_first_local_hours_of_a_date_subscription_is_billed(
    fake_lago: Any, billing: OrgBilling
) -> None:
    """A Tokyo org subscribed from 1 March (a date): a call at 01:00 on 1 March in Tokyo is in its usage."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    await billing.create_org_customer("org_1", "Acme", timezone="Asia/Tokyo")
    await billing.create_subscription("org_1", "starter", subscription_at=dt.date(2026, 3, 1))
    fake_lago.clock = lambda: dt.datetime(2026, 3, 10, 12, tzinfo=UTC)
    early = dt.datetime(2026, 2, 28, 16, tzinfo=UTC)  # 1 March, 01:00 in Tokyo
    await billing.record_api_call("org_1", "tx_early", "/v1/chat", "u_1", tokens=1000, timestamp=early)
    usage = await billing.get_current_usage("org_1")
    assert usage is not None
    assert [charge["units"] for charge in usage["charges_usage"]] == ["1000.0"]


async def test_ending_at_as_a_datetime_is_sent_not_a_type_error(fake_lago: Any, billing: OrgBilling) -> None:
    """``ending_at`` takes what ``subscription_at`` takes: an aware datetime is sent as ISO 8601 (it was a TypeError
    from the JSON encoder, raised after subscribe_org_to_plan had created the customer); a naive one is refused before
    any call."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    with pytest.raises(InvalidRequestError, match="ending_at"):
        await billing.subscribe_org_to_plan("org_n", "starter", "Naive", ending_at=dt.datetime(2027, 1, 1))
    assert fake_lago.customers == []
    end = dt.datetime(2027, 1, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    result = await billing.subscribe_org_to_plan("org_1", "starter", "Acme", ending_at=end)
    assert result["subscription"]["ending_at"] == "2027-01-01T00:00:00Z"


async def test_a_batch_partly_already_in_lago_does_not_say_nothing_to_fix(
    fake_lago: Any, lago_client: LagoClient
) -> None:
    """Lago's batches are atomic: when one event of a batch is already in Lago (Postgres store), the 422 rejects the
    others too. The error must not say the events are in Lago (``is_duplicate_only``, "nothing to fix"): the caller
    would drop the events that were never ingested."""
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_1", "starter", external_id="org_1")
    event = {"external_subscription_id": "org_1", "code": "api_call", "timestamp": "1767225600.000"}
    await lago_client.create_events([{**event, "transaction_id": "tx_1"}])
    with pytest.raises(LagoValidationError) as info:
        await lago_client.create_events([{**event, "transaction_id": "tx_1"}, {**event, "transaction_id": "tx_2"}])
    assert [e["transaction_id"] for e in fake_lago.events] == ["tx_1"]  # tx_2 was not ingested
    assert not info.value.is_duplicate_only
    assert "nothing to fix" not in str(info.value)
    assert "not ingested" in str(info.value) and "[1]" in str(info.value)
    assert info.value.failed_indexes() == {0: {"transaction_id": ["value_already_exist"]}}
    # every event of the batch already in Lago: that is still the harmless resend
    with pytest.raises(LagoValidationError) as info:
        await lago_client.create_events([{**event, "transaction_id": "tx_1"}])
    assert info.value.is_duplicate_only


async def test_the_creating_user_may_be_an_email_or_any_id_lago_keeps_in_metadata(
    fake_lago: Any, billing: OrgBilling
) -> None:
    """The creating user's id is a metadata value, never a URL path: an email (``alice.smith@acme.test``, dots) or a
    dotted id is kept in ``created_by_user_id`` (it was refused as "Lago cannot take it in a URL path", so setting
    up the org failed); Lago's metadata limit (100 characters) is still checked before any call."""
    result = await billing.subscribe_org_to_plan(
        "org_1", "starter", "Acme", "billing@acme.test", user_id="alice.smith@acme.test"
    )
    assert customer_metadata(result["customer"])["created_by_user_id"] == "alice.smith@acme.test"
    fake_lago.add_customer("org_2", name="Bare")  # made by Lago for a subscription: no creator yet
    result = await billing.subscribe_org_to_plan("org_2", "starter", "Two", user_id="kc/realm.user")
    assert customer_metadata(result["customer"])["created_by_user_id"] == "kc/realm.user"
    customer = await billing.create_org_customer("org_3", "Three", user_id="bob.jones")
    assert customer_metadata(customer)["created_by_user_id"] == "bob.jones"
    with pytest.raises(InvalidRequestError, match="100"):
        await billing.create_org_customer("org_4", "Four", user_id="u" * 101)
    assert await billing.get_customer("org_4") is None


class ConcurrentCreate(httpx.AsyncBaseTransport):
    """The first ``POST /customers`` loses Lago's insert race to a concurrent request of another user (made here
    first, in the emulator): Lago answers ``RecordNotUnique`` as ``422 {"external_id": ["value_already_exist"]}``."""

    def __init__(self, fake_lago: Any) -> None:
        self.fake_lago = fake_lago
        self.inner: httpx.AsyncBaseTransport = fake_lago.transport()
        self.raced = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        if not self.raced and request.method == "POST" and request.url.path == "/api/v1/customers":
            self.raced = True
            body = json.loads(request.content)["customer"]
            self.fake_lago.add_customer(
                body["external_id"],
                name="Acme (other tab)",
                metadata=[
                    {"key": "billing_type", "value": "organization", "display_in_invoice": False},
                    {"key": "created_by_user_id", "value": "u_first", "display_in_invoice": False},
                ],
            )
            error = {"external_id": ["value_already_exist"]}
            payload = {
                "status": 422,
                "error": "Unprocessable Entity",
                "code": "validation_errors",
                "error_details": error,
            }
            return httpx.Response(422, json=payload)
        return await self.inner.handle_async_request(request)


async def test_two_users_creating_the_org_customer_at_once_both_get_it(fake_lago: Any, lago_settings: Any) -> None:
    """Two users set the same org up at once (or the client's retry overlaps its first, timed-out attempt): Lago's
    unique index refuses the second insert with ``422 external_id value_already_exist``. The customer exists, made
    by the other call: ``create_org_customer`` returns it (the first user stays its creator), it is no validation
    error of the caller's fields."""
    fake_lago.add_plan("starter", amount_cents=1000)
    async with OrgBilling(lago_settings, transport=ConcurrentCreate(fake_lago)) as billing:
        result = await billing.subscribe_org_to_plan("org_1", "starter", "Acme", "b@acme.test", user_id="u_second")
    metadata = customer_metadata(result["customer"])
    assert metadata == {"billing_type": "organization", "created_by_user_id": "u_first"}
    assert result["subscription"]["plan_code"] == "starter"
    assert len(fake_lago.customers) == 1
