"""Review of the Lago emulator's fidelity to Lago (lago-api as docs/lago-api.md and the OpenAPI describe it).

Covers what the emulator answered differently from Lago for calls users make:

* currencies: a subscription whose plan (or ``plan_overrides.amount_currency``) is in another currency than its
  customer's is refused with ``422 {"currency": ["currencies_does_not_match"]}``; a customer without a currency takes
  its first plan's; the currency of a customer that has subscriptions or invoices cannot be changed by the upsert
  (lago-api ``Customers::UpdateCurrencyService``, ``Customer#editable?``);
* pending subscriptions: a subscription_at on today's date (customer's time zone) is active at once; a later one is
  started by the clock job at the start of its day; moving a pending one to the past or to today activates it;
* error precedence and codes: an unknown plan is always 404; ``finalize_zero_amount_invoice`` null is accepted and an
  unknown value is ``invalid_value``, alone;
* pagination as Kaminari reads ``per_page`` (default 25 for junk, leading digits, 500 for 0);
* charge models: volume ranges for fractional units, percentage's per-event fixed fee, dynamic pricing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from lago_org_billing.testing import FakeLago, FakeLagoError

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock(NOW)


@pytest.fixture
def fake(clock: _Clock) -> FakeLago:
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_billable_metric("api_call")
    fake.add_plan("usd_small", amount_cents=1000)
    fake.add_plan("usd_big", amount_cents=5000)
    fake.add_plan("eur_big", amount_cents=9000, amount_currency="EUR")
    fake.add_plan("eur_small", amount_cents=100, amount_currency="EUR")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    async with fake.client() as c:
        yield c


async def subscribe(
    client: httpx.AsyncClient, plan: str, *, customer: str = "org", ext: str = "sub", **extra: Any
) -> httpx.Response:
    body = {"subscription": {"external_customer_id": customer, "plan_code": plan, "external_id": ext, **extra}}
    return await client.post("/api/v1/subscriptions", json=body)


CURRENCY_MISMATCH = {
    "status": 422,
    "error": "Unprocessable Entity",
    "code": "validation_errors",
    "error_details": {"currency": ["currencies_does_not_match"]},
}


# Currencies ----------------------------------------------------------------------------------------------------


async def test_a_plan_in_another_currency_than_the_customer_s_is_refused(
    client: httpx.AsyncClient, fake: FakeLago
) -> None:
    """Customer in EUR, plan in USD: Lago answers 422 currencies_does_not_match and creates nothing."""
    fake.add_customer("org", currency="EUR")
    response = await subscribe(client, "usd_small")
    assert (response.status_code, response.json()) == (422, CURRENCY_MISMATCH)
    assert fake.subscriptions == []
    assert (await subscribe(client, "eur_small")).status_code == 200


async def test_a_customer_without_currency_takes_its_first_plan_s(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """A new (or currency-less) customer gets the plan's currency; a plan in another currency is then refused, on
    another subscription of the same customer as on an upgrade."""
    assert (await subscribe(client, "usd_small")).status_code == 200
    assert (await client.get("/api/v1/customers/org")).json()["customer"]["currency"] == "USD"
    fake.add_customer("bare")
    assert (await subscribe(client, "usd_small", customer="bare", ext="bare_sub")).status_code == 200
    assert fake.add_customer("bare")["currency"] == "USD"

    other = await subscribe(client, "eur_small", ext="sub2")
    assert (other.status_code, other.json()) == (422, CURRENCY_MISMATCH)
    upgrade = await subscribe(client, "eur_big")  # (the same external_id: an upgrade, refused all the same)
    assert (upgrade.status_code, upgrade.json()) == (422, CURRENCY_MISMATCH)
    [sub] = [s for s in fake.subscriptions if s["external_id"] == "sub"]
    assert (sub["status"], sub["plan_code"]) == ("active", "usd_small")


async def test_plan_overrides_currency_is_the_one_checked(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """``plan_overrides.amount_currency`` replaces the plan's currency before the check."""
    fake.add_customer("org", currency="EUR")
    response = await subscribe(client, "usd_small", plan_overrides={"amount_currency": "EUR"})
    assert response.status_code == 200, response.text
    assert response.json()["subscription"]["plan_amount_currency"] == "EUR"
    fake.add_customer("usd", currency="USD")
    refused = await subscribe(client, "usd_small", customer="usd", ext="s2", plan_overrides={"amount_currency": "EUR"})
    assert (refused.status_code, refused.json()) == (422, CURRENCY_MISMATCH)


async def test_the_currency_of_a_customer_with_subscriptions_cannot_change(
    client: httpx.AsyncClient, fake: FakeLago
) -> None:
    """Upsert with another currency: accepted while the customer has no subscription nor invoice, then 422."""
    fake.add_customer("org", currency="EUR")
    assert fake.add_customer("org", currency="USD")["currency"] == "USD"  # (still editable)
    assert (await subscribe(client, "usd_small")).status_code == 200
    response = await client.post("/api/v1/customers", json={"customer": {"external_id": "org", "currency": "EUR"}})
    assert (response.status_code, response.json()) == (422, CURRENCY_MISMATCH)
    same = await client.post("/api/v1/customers", json={"customer": {"external_id": "org", "currency": "USD"}})
    assert same.status_code == 200
    # a terminated subscription still makes the customer non editable
    assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 200
    again = await client.post("/api/v1/customers", json={"customer": {"external_id": "org", "currency": "EUR"}})
    assert again.status_code == 422
    fake.add_invoice("billed", currency="USD")
    with pytest.raises(FakeLagoError) as raised:
        fake.add_customer("billed", currency="EUR")
    assert raised.value.body == CURRENCY_MISMATCH


# Pending subscriptions: Lago starts them by day, in the customer's time zone -----------------------------------


async def test_a_subscription_at_later_today_is_active_at_once(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """CreateService#create_subscription: subscription_at on today's date (customer's time zone) is activated at once
    (``handle_today_subscription``), with that subscription_at as started_at; only a later day is ``pending``."""
    response = await subscribe(client, "usd_small", subscription_at="2026-03-15T18:00:00Z")
    sub = response.json()["subscription"]
    assert (sub["status"], sub["started_at"]) == ("active", "2026-03-15T18:00:00Z")
    assert [w["webhook_type"] for w in fake.emitted_webhooks if w["object_type"] == "subscription"] == [
        "subscription.started"
    ]
    tomorrow = (await subscribe(client, "usd_small", ext="s2", subscription_at="2026-03-16T00:00:00Z")).json()
    assert tomorrow["subscription"]["status"] == "pending"


async def test_a_pending_subscription_starts_when_its_day_begins(
    client: httpx.AsyncClient, fake: FakeLago, clock: _Clock
) -> None:
    """Clock::ActivateSubscriptionsJob (every 5 minutes) activates the pending subscriptions whose subscription_at
    falls on today's date in the customer's time zone, with the job's time as started_at: a subscription at 15:00 on
    20 March is active from the start of 20 March, not from 15:00."""
    sub = (await subscribe(client, "usd_small", subscription_at="2026-03-20T15:00:00Z")).json()["subscription"]
    assert sub["status"] == "pending"
    clock.now = datetime(2026, 3, 19, 23, 59, tzinfo=timezone.utc)
    assert (await client.get("/api/v1/subscriptions/sub", params={"status": "pending"})).status_code == 200
    clock.now = datetime(2026, 3, 20, 9, 0, tzinfo=timezone.utc)
    active = (await client.get("/api/v1/subscriptions/sub")).json()["subscription"]
    assert (active["status"], active["started_at"]) == ("active", "2026-03-20T00:00:00Z")
    assert active["subscription_at"] == "2026-03-20T15:00:00Z"


async def test_the_day_of_a_pending_subscription_is_the_customer_s(
    client: httpx.AsyncClient, fake: FakeLago, clock: _Clock
) -> None:
    """For a Tokyo customer, 2026-03-15T16:00:00Z is 16 March (01:00 in Tokyo): pending at 21:00 Tokyo on the 15th,
    active from Tokyo's midnight (15:00Z)."""
    fake.add_customer("org", timezone="Asia/Tokyo")
    sub = (await subscribe(client, "usd_small", subscription_at="2026-03-15T16:00:00Z")).json()["subscription"]
    assert sub["status"] == "pending"
    clock.now = datetime(2026, 3, 15, 15, 30, tzinfo=timezone.utc)
    active = (await client.get("/api/v1/subscriptions/sub")).json()["subscription"]
    assert (active["status"], active["started_at"]) == ("active", "2026-03-15T15:00:00Z")


async def test_moving_a_pending_subscription_to_now_or_the_past_activates_it(
    client: httpx.AsyncClient, fake: FakeLago
) -> None:
    """UpdateService#process_subscription_at_change: a pending subscription moved to a past time is active from that
    time; one moved to later today is started by the next clock run (now)."""
    await subscribe(client, "usd_small", subscription_at="2026-04-01T00:00:00Z")
    body = {"subscription": {"subscription_at": "2026-03-15T06:00:00Z"}}
    moved = await client.put("/api/v1/subscriptions/sub", params={"status": "pending"}, json=body)
    assert moved.status_code == 200, moved.text
    assert (moved.json()["subscription"]["status"], moved.json()["subscription"]["started_at"]) == (
        "active",
        "2026-03-15T06:00:00Z",
    )
    await subscribe(client, "usd_small", ext="s2", subscription_at="2026-04-01T00:00:00Z")
    body = {"subscription": {"subscription_at": "2026-03-15T20:00:00Z"}}
    later = (await client.put("/api/v1/subscriptions/s2", params={"status": "pending"}, json=body)).json()
    assert (later["subscription"]["status"], later["subscription"]["started_at"]) == ("active", "2026-03-15T12:00:00Z")


# Error precedence and codes ----------------------------------------------------------------------------------


async def test_an_unknown_plan_is_404_whatever_else_is_wrong(client: httpx.AsyncClient) -> None:
    """Subscriptions::ValidateService#valid? returns at ``valid_plan?`` before the dates are looked at, and the
    missing ids or a bad billing_time only fail later: an unknown plan_code is always 404 plan_not_found."""
    for extra in (
        {"ending_at": "2026-03-15T20:00:00Z"},
        {"subscription_at": "not a date"},
        {"billing_time": "weekly"},
        {"external_id": ""},
        {"on_termination_invoice": "maybe"},
    ):
        response = await subscribe(client, "no_such_plan", **extra)
        assert (response.status_code, response.json().get("code")) == (404, "plan_not_found"), extra


async def test_finalize_zero_amount_invoice_as_lago_checks_it(client: httpx.AsyncClient) -> None:
    """UpsertFromApiService: ``null`` is accepted (stored as ``inherit``); an unknown value is refused alone, before
    the other fields, with the code ``invalid_value``."""
    body = {"customer": {"external_id": "org", "finalize_zero_amount_invoice": None}}
    response = await client.post("/api/v1/customers", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["customer"]["finalize_zero_amount_invoice"] == "inherit"
    body = {"customer": {"external_id": "org", "finalize_zero_amount_invoice": "never", "name": "x" * 300}}
    refused = await client.post("/api/v1/customers", json=body)
    assert (refused.status_code, refused.json()["error_details"]) == (
        422,
        {"finalize_zero_amount_invoice": ["invalid_value"]},
    )


# Pagination (Kaminari's page/per as lago-api's BaseQuery#paginate calls them) -------------------------------------


async def test_per_page_is_read_as_kaminari_reads_it(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """``per(per_page)``: a value not starting with a digit (``-1``, ``abc``, empty) leaves Kaminari's default page
    size, 25 (lago-api has no Kaminari config); ``12abc`` is 12; there is no maximum; ``0`` makes Kaminari raise
    (``ZeroPerPageOperation``): a 500 once there is something to list; a page past the end is empty."""
    for n in range(30):
        fake.add_invoice(f"c{n:02d}", total_amount_cents=n)

    async def meta(per_page: str, page: str = "1") -> tuple[int, Any]:
        response = await client.get("/api/v1/invoices", params={"per_page": per_page, "page": page})
        body = response.json()
        return response.status_code, (len(body["invoices"]), body["meta"]) if response.status_code == 200 else body

    for junk in ("-1", "abc", ""):
        status, (count, page_meta) = await meta(junk)
        assert (status, count, page_meta["total_pages"]) == (200, 25, 2), junk
    status, (count, page_meta) = await meta("12abc")
    assert (count, page_meta["total_pages"], page_meta["next_page"]) == (12, 3, 2)
    status, (count, page_meta) = await meta("1000")
    assert (count, page_meta["total_pages"]) == (30, 1)
    status, (count, page_meta) = await meta("10", page="7")
    assert (count, page_meta["current_page"], page_meta["next_page"], page_meta["prev_page"]) == (0, 7, None, 6)
    status, body = await meta("0")
    assert status == 500 and body["status"] == 500
    empty = await client.get("/api/v1/customers", params={"per_page": "0", "search_term": "nobody"})
    assert (empty.status_code, empty.json()["meta"]["total_count"]) == (200, 0)


# Charge models ---------------------------------------------------------------------------------------------------


async def test_volume_percentage_fixed_fee_and_dynamic_charges(clock: _Clock) -> None:
    """lago-api ChargeModels: VolumeService matches ``from_value <= units.ceil`` (so 100.5 GB falls in the range from
    101, not in none); PercentageService adds ``fixed_amount`` per event; DynamicService bills the sum of the events'
    ``precise_total_amount_cents``. The emulator billed 0 for all three."""
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_billable_metric("gb", aggregation_type="sum_agg", field_name="gb")
    fake.add_plan(
        "models",
        charges=[
            {
                "billable_metric_code": "gb",
                "charge_model": "volume",
                "properties": {
                    "volume_ranges": [
                        {"from_value": 0, "to_value": 100, "per_unit_amount": "1", "flat_amount": "0"},
                        {"from_value": 101, "to_value": None, "per_unit_amount": "0.5", "flat_amount": "2"},
                    ]
                },
            },
            {
                "billable_metric_code": "gb",
                "charge_model": "percentage",
                "properties": {"rate": "10", "fixed_amount": "0.3"},
            },
            {"billable_metric_code": "gb", "charge_model": "dynamic", "properties": {}},
        ],
    )
    fake.add_subscription("org", "models", external_id="sub")
    events = [
        {
            "transaction_id": "a",
            "external_subscription_id": "sub",
            "code": "gb",
            "properties": {"gb": "60.25"},
            "precise_total_amount_cents": "120.4",
        },
        {
            "transaction_id": "b",
            "external_subscription_id": "sub",
            "code": "gb",
            "properties": {"gb": "40.25"},
            "precise_total_amount_cents": "79.2",
        },
    ]
    async with fake.client() as client:
        assert (await client.post("/api/v1/events/batch", json={"events": events})).status_code == 200
    usages = fake.usage("org", "sub")["customer_usage"]["charges_usage"]
    assert [u["units"] for u in usages] == ["100.5"] * 3
    volume, percentage, dynamic = (u["amount_cents"] for u in usages)
    assert volume == 100.5 * 50 + 200  # 100.5 x 0.50 + 2.00
    assert percentage == 1005 + 60  # 10 % of 100.5 + 2 x 0.30
    assert dynamic == 200  # 120.4 + 79.2 cents
