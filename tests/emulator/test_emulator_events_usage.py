"""FakeLago events (single, batch, dedup per event store) and current usage computation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest

from _pinned_clock import NOW, Clock
from lago_org_billing.testing import FakeLago, FakeLagoError

pytestmark = pytest.mark.anyio

T_NOW = int(NOW.timestamp())


def build(clock: Clock, event_store: str = "postgres") -> FakeLago:
    fake = FakeLago(api_key="k", event_store=event_store, clock=clock)
    fake.add_billable_metric("api_call")
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="tokens")
    fake.add_billable_metric("peak", aggregation_type="max_agg", field_name="value")
    fake.add_billable_metric("users", aggregation_type="unique_count_agg", field_name="user_id")
    fake.add_plan(
        "starter",
        amount_cents=1000,
        charges=[
            {"billable_metric_code": "api_call", "properties": {"amount": "0.01"}},
            {"billable_metric_code": "tokens", "properties": {"amount": "0.001"}},
            {"billable_metric_code": "peak", "properties": {"amount": "1"}},
            {"billable_metric_code": "users", "properties": {"amount": "5"}},
        ],
    )
    fake.add_subscription("org", "starter", external_id="sub", subscription_at="2026-01-10T00:00:00Z")
    return fake


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """Postgres event store, subscription ``sub`` of customer ``org`` on plan ``starter``."""
    return build(clock)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated raw client."""
    async with fake.client() as c:
        yield c


def event(tx: str, code: str = "api_call", ts: Any = T_NOW, sub: str = "sub", **properties: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "transaction_id": tx,
        "external_subscription_id": sub,
        "code": code,
        "properties": properties,
    }
    if ts is not None:
        data["timestamp"] = ts
    return data


def usage_by_code(fake: FakeLago) -> dict[str, dict[str, Any]]:
    body = fake.usage("org", "sub")["customer_usage"]
    return {u["billable_metric"]["code"]: u for u in body["charges_usage"]}


# Events -----------------------------------------------------------------------------------------


async def test_single_event_response_and_lookup(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """POST /events answers the event with a ms timestamp; GET finds it by transaction id, dots included."""
    r = await client.post("/api/v1/events", json={"event": event("req.1.a", ts="1767225600.123", tokens=3)})
    assert r.status_code == 200
    created = r.json()["event"]
    assert created["timestamp"] == "2026-01-01T00:00:00.123Z"
    assert (created["lago_customer_id"], created["lago_subscription_id"]) == (None, None)
    assert created["properties"] == {"tokens": 3}
    r = await client.get("/api/v1/events/req.1.a")
    found = r.json()["event"]
    assert found["lago_id"] == created["lago_id"]
    assert found["lago_subscription_id"] == fake.subscriptions[0]["lago_id"]
    assert (await client.get("/api/v1/events/nope")).json()["code"] == "event_not_found"


@pytest.mark.parametrize("ts", [1767225600, "1767225600", 1767225600.5, "1767225600.5"])
async def test_timestamp_formats(client: httpx.AsyncClient, ts: Any) -> None:
    """Integer, string and float seconds are accepted."""
    r = await client.post("/api/v1/events", json={"event": event("t", ts=ts)})
    assert r.json()["event"]["timestamp"].startswith("2026-01-01T00:00:00.")


async def test_event_validation(client: httpx.AsyncClient, clock: Clock) -> None:
    """Missing fields are value_is_mandatory, a bad timestamp invalid_format; omitted timestamp is now."""
    r = await client.post("/api/v1/events", json={"event": {"properties": {}}})
    assert r.status_code == 422
    assert r.json()["error_details"] == {
        "transaction_id": ["value_is_mandatory"],
        "external_subscription_id": ["value_is_mandatory"],
        "code": ["value_is_mandatory"],
    }
    r = await client.post("/api/v1/events", json={"event": event("t", ts="2026-01-01T00:00:00Z")})
    assert r.json()["error_details"] == {"timestamp": ["invalid_format"]}
    r = await client.post("/api/v1/events", json={"event": event("t2", ts=None)})
    assert r.json()["event"]["timestamp"] == "2026-03-15T12:00:00.000Z"


async def test_unknown_subscription_or_code_is_accepted_and_ignored(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Events for unknown subscriptions or codes are stored (200) but never counted."""
    assert (await client.post("/api/v1/events", json={"event": event("a", sub="ghost")})).status_code == 200
    assert (await client.post("/api/v1/events", json={"event": event("b", code="nope")})).status_code == 200
    assert len(fake.events) == 2
    assert usage_by_code(fake)["api_call"]["events_count"] == 0


async def test_postgres_duplicates(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Postgres store: a repeated (transaction_id, subscription) is 422; another subscription is fine."""
    assert (await client.post("/api/v1/events", json={"event": event("dup")})).status_code == 200
    r = await client.post("/api/v1/events", json={"event": event("dup", ts=T_NOW + 5)})
    assert r.status_code == 422
    assert r.json()["error_details"] == {"transaction_id": ["value_already_exist"]}
    assert (await client.post("/api/v1/events", json={"event": event("dup", sub="other")})).status_code == 200
    assert usage_by_code(fake)["api_call"]["units"] == "1.0"


async def test_clickhouse_duplicates_replace(clock: Clock) -> None:
    """ClickHouse store: a same-key copy replaces the first; a different timestamp is a new event."""
    fake = build(clock, "clickhouse")
    async with fake.client() as client:
        assert (await client.post("/api/v1/events", json={"event": event("d", "tokens", tokens=1)})).status_code == 200
        r = await client.post("/api/v1/events", json={"event": event("d", "tokens", tokens=7)})
        assert r.status_code == 200
        assert usage_by_code(fake)["tokens"]["units"] == "7.0"
        r = await client.post("/api/v1/events/batch", json={"events": [event("d", "tokens", tokens=2)] * 2})
        assert r.status_code == 200
        assert usage_by_code(fake)["tokens"]["units"] == "2.0"
        await client.post("/api/v1/events", json={"event": event("d", "tokens", ts=T_NOW + 1, tokens=5)})
    assert usage_by_code(fake)["tokens"]["units"] == "7.0"
    assert len(fake.events) == 2


async def test_batch_success_and_limits(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """A batch stores every event; empty and >100 batches are 422 with Lago's codes."""
    r = await client.post("/api/v1/events/batch", json={"events": [event(f"b{i}") for i in range(100)]})
    assert r.status_code == 200
    assert len(r.json()["events"]) == 100
    assert r.json()["events"][0]["lago_customer_id"] is None
    r = await client.post("/api/v1/events/batch", json={"events": []})
    assert r.json()["error_details"] == {"events": ["no_events"]}
    r = await client.post("/api/v1/events/batch", json={"events": [event(f"c{i}") for i in range(101)]})
    assert r.json()["error_details"] == {"events": ["too_many_events"]}
    assert len(fake.events) == 100


async def test_batch_is_atomic_with_per_index_errors(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """One bad event rejects the batch; errors are keyed by index. Duplicates (inside the batch included) are found by
    the insert, which runs only once every event is valid (CreateBatchService#post_validate_events)."""
    await client.post("/api/v1/events", json={"event": event("old")})
    batch = [event("ok1"), event("x", ts="soon"), event("old"), event("ok2"), event("ok2"), {"code": "api_call"}]
    r = await client.post("/api/v1/events/batch", json={"events": batch})
    assert r.status_code == 422
    assert r.json()["error_details"] == {
        "1": {"timestamp": ["invalid_format"]},
        "5": {"transaction_id": ["value_is_mandatory"], "external_subscription_id": ["value_is_mandatory"]},
    }
    valid = [b for i, b in enumerate(batch) if i not in (1, 5)]
    r = await client.post("/api/v1/events/batch", json={"events": valid})
    assert r.status_code == 422
    assert r.json()["error_details"] == {
        "1": {"transaction_id": ["value_already_exist"]},
        "3": {"transaction_id": ["value_already_exist"]},
    }
    assert [e["transaction_id"] for e in fake.events] == ["old"]


async def test_list_events(client: httpx.AsyncClient) -> None:
    """GET /events filters by subscription and code, newest first, paginated."""
    await client.post("/api/v1/events", json={"event": event("a", ts=T_NOW - 10)})
    await client.post("/api/v1/events", json={"event": event("b", ts=T_NOW)})
    await client.post("/api/v1/events", json={"event": event("c", code="tokens", tokens=1)})
    r = await client.get("/api/v1/events", params={"external_subscription_id": "sub", "code": "api_call"})
    body = r.json()
    assert [e["transaction_id"] for e in body["events"]] == ["b", "a"]
    assert body["meta"]["total_count"] == 2


async def test_list_events_pages_serialize_only_their_events(
    fake: FakeLago, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of a large store serializes that page alone (counting events must not cost a copy of all of them),
    and pages still come newest first with the right totals."""
    events = [event(f"t{n}", ts=T_NOW - n) for n in range(250)]
    for start in range(0, 250, 100):
        assert (await client.post("/api/v1/events/batch", json={"events": events[start : start + 100]})).is_success
    serialized: list[str] = []
    original = fake.store._serialize_event

    def counting(event: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        serialized.append(event["transaction_id"])
        return original(event, **kwargs)

    monkeypatch.setattr(fake.store, "_serialize_event", counting)
    body = (await client.get("/api/v1/events", params={"per_page": 1})).json()
    assert body["meta"]["total_count"] == 250 and [e["transaction_id"] for e in body["events"]] == ["t0"]
    assert serialized == ["t0"]
    body = (await client.get("/api/v1/events", params={"per_page": 100, "page": 3})).json()
    assert [e["transaction_id"] for e in body["events"]] == [f"t{n}" for n in range(200, 250)]


# Current usage ----------------------------------------------------------------------------------


async def test_current_usage_errors(client: httpx.AsyncClient) -> None:
    """Unknown customer is 404; missing or foreign subscription is 405 no_active_subscription."""
    r = await client.get("/api/v1/customers/ghost/current_usage", params={"external_subscription_id": "sub"})
    assert (r.status_code, r.json()["code"]) == (404, "customer_not_found")
    await client.post("/api/v1/customers", json={"customer": {"external_id": "other"}})
    for params in ({}, {"external_subscription_id": "nope"}):
        r = await client.get("/api/v1/customers/org/current_usage", params=params)
        assert r.status_code == 405
        assert r.json() == {"status": 405, "error": "Method Not Allowed", "code": "no_active_subscription"}
    r = await client.get("/api/v1/customers/other/current_usage", params={"external_subscription_id": "sub"})
    assert r.json()["code"] == "no_active_subscription"
    r = await client.get(
        "/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub", "billable_metric_code": "zz"}
    )
    assert r.json()["code"] == "charge_not_found"
    # full_usage needs a filter and a premium flag, off by default: Lago refuses it (the emulator ignored it)
    for extra in ({}, {"charge_code": "calls"}):
        r = await client.get(
            "/api/v1/customers/org/current_usage",
            params={"external_subscription_id": "sub", "full_usage": "true", **extra},
        )
        assert (r.status_code, r.json()["code"]) == (405, "full_usage_not_allowed")
    # Lago's dot fix covers /subscriptions/:id only: nested routes stop at "." (Rails' format), a 404
    r = await client.get("/api/v1/subscriptions/acme.com/entitlements")
    assert (r.status_code, r.json()["code"]) == (404, "resource_not_found")


async def test_usage_per_aggregation_type(client: httpx.AsyncClient) -> None:
    """count, sum, max and unique_count aggregate into decimal strings and standard amounts."""
    events = [
        event("a1"),
        event("a2"),
        event("a3"),
        event("t1", "tokens", tokens=100),
        event("t2", "tokens", tokens="50.5"),
        event("t3", "tokens"),
        event("p1", "peak", value=3),
        event("p2", "peak", value="7.25"),
        event("u1", "users", user_id="alice"),
        event("u2", "users", user_id="bob"),
        event("u3", "users", user_id="alice"),
        event("u4", "users", user_id="carol"),
        event("u5", "users", user_id="carol", operation_type="remove"),
    ]
    await client.post("/api/v1/events/batch", json={"events": events})
    r = await client.get(
        "/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub", "apply_taxes": "false"}
    )
    assert r.status_code == 200
    body = r.json()["customer_usage"]
    usage = {u["billable_metric"]["code"]: u for u in body["charges_usage"]}
    assert {code: (u["units"], u["events_count"], u["amount_cents"]) for code, u in usage.items()} == {
        "api_call": ("3.0", 3, 3),
        "tokens": ("150.5", 2, 15),  # (t3 has no tokens: a sum counts only the events with a number in its field)
        "peak": ("7.25", 2, 725),
        "users": ("2.0", 2, 1000),  # (a unique count's events_count is its number of values, as lago-api's)
    }
    assert body["amount_cents"] == body["total_amount_cents"] == 3 + 15 + 725 + 1000
    assert body["currency"] == "USD"
    assert usage["tokens"]["billable_metric"]["aggregation_type"] == "sum_agg"
    assert usage["api_call"]["filters"] == [] and usage["api_call"]["grouped_usage"] == []
    r = await client.get(
        "/api/v1/customers/org/current_usage",
        params={"external_subscription_id": "sub", "billable_metric_code": "peak"},
    )
    assert [u["billable_metric"]["code"] for u in r.json()["customer_usage"]["charges_usage"]] == ["peak"]


async def test_calendar_period_bounds(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Calendar monthly: only events of the current month count; bounds are the month's."""
    march_1 = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp())
    batch = [event("before", ts=march_1 - 1), event("first", ts=march_1), event("later", ts=T_NOW + 86400 * 10)]
    await client.post("/api/v1/events/batch", json={"events": batch})
    body = fake.usage("org", "sub")["customer_usage"]
    assert (body["from_datetime"], body["to_datetime"], body["issuing_date"]) == (
        "2026-03-01T00:00:00Z",
        "2026-03-31T23:59:59Z",
        "2026-03-31",  # the period's last day, as lago-api's current-usage request spec expects
    )
    assert usage_by_code(fake)["api_call"]["units"] == "2.0"


async def test_anniversary_and_other_intervals(clock: Clock) -> None:
    """Anniversary periods align on subscription_at; weekly and yearly calendar periods too."""
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_billable_metric("api_call")
    for interval in ("monthly", "weekly", "yearly"):
        fake.add_plan(interval, interval=interval, charges=[{"billable_metric_code": "api_call"}])
    fake.add_subscription(
        "a", "monthly", external_id="anniv", billing_time="anniversary", subscription_at="2026-01-20T08:00:00Z"
    )
    fake.add_subscription("b", "weekly", external_id="week", subscription_at="2026-01-01T00:00:00Z")
    fake.add_subscription("c", "yearly", external_id="year", subscription_at="2025-06-01T00:00:00Z")
    bounds = {
        sub: (u["customer_usage"]["from_datetime"], u["customer_usage"]["to_datetime"])
        for sub, u in (
            ("anniv", fake.usage("a", "anniv")),
            ("week", fake.usage("b", "week")),
            ("year", fake.usage("c", "year")),
        )
    }
    assert bounds == {
        "anniv": ("2026-02-20T00:00:00Z", "2026-03-19T23:59:59Z"),
        "week": ("2026-03-09T00:00:00Z", "2026-03-15T23:59:59Z"),
        "year": ("2026-01-01T00:00:00Z", "2026-12-31T23:59:59Z"),
    }
    clock.now = datetime(2026, 3, 20, 1, tzinfo=timezone.utc)
    assert fake.usage("a", "anniv")["customer_usage"]["from_datetime"] == "2026-03-20T00:00:00Z"


async def test_filters_and_grouped_usage(clock: Clock) -> None:
    """Charge filters split usage by metric filter values; pricing_group_keys give grouped_usage."""
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_billable_metric(
        "tokens",
        aggregation_type="sum_agg",
        field_name="tokens",
        filters=[{"key": "model", "values": ["gpt", "llama"]}],
    )
    fake.add_plan(
        "llm",
        charges=[
            {
                "billable_metric_code": "tokens",
                "properties": {"amount": "0.01", "pricing_group_keys": ["user"]},
                "filters": [
                    {"values": {"model": ["gpt"]}, "properties": {"amount": "0.1"}, "invoice_display_name": "GPT"},
                    {"values": {"model": ["llama"]}, "properties": {"amount": "0.02"}, "invoice_display_name": "Llama"},
                ],
            }
        ],
    )
    fake.add_subscription("org", "llm", external_id="sub")
    batch = [
        event("1", "tokens", tokens=10, model="gpt", user="u1"),
        event("2", "tokens", tokens=100, model="llama", user="u1"),
        event("3", "tokens", tokens=1000, model="other", user="u2"),
    ]
    async with fake.client() as client:
        assert (await client.post("/api/v1/events/batch", json={"events": batch})).status_code == 200
        r = await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
        charge = r.json()["customer_usage"]["charges_usage"][0]
        assert (charge["units"], charge["events_count"], charge["amount_cents"]) == ("1110.0", 3, 100 + 200 + 1000)
        filters = {f["invoice_display_name"]: f for f in charge["filters"]}
        assert {name: (f["units"], f["amount_cents"], f["values"]) for name, f in filters.items()} == {
            "GPT": ("10.0", 100, {"model": ["gpt"]}),
            "Llama": ("100.0", 200, {"model": ["llama"]}),
        }
        groups = {g["grouped_by"]["user"]: g for g in charge["grouped_usage"]}
        assert {u: (g["units"], g["amount_cents"], g["events_count"]) for u, g in groups.items()} == {
            "u1": ("110.0", 300, 2),
            "u2": ("1000.0", 1000, 1),
        }
        r = await client.get(
            "/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub", "group[user]": "u1"}
        )
        charge = r.json()["customer_usage"]["charges_usage"][0]
        # (the filtered key leaves the grouping: its only key here)
        assert (charge["units"], [g["grouped_by"] for g in charge["grouped_usage"]]) == ("110.0", [])


async def test_package_and_graduated_charges(clock: Clock) -> None:
    """Package charges round packages up; graduated charges price each tier."""
    fake = FakeLago(api_key="k", clock=clock)
    fake.add_billable_metric("api_call")
    fake.add_plan(
        "tiers",
        charges=[
            {
                "billable_metric_code": "api_call",
                "charge_model": "package",
                "properties": {"amount": "1", "package_size": 10, "free_units": 5},
            },
            {
                "billable_metric_code": "api_call",
                "charge_model": "graduated",
                "properties": {
                    "graduated_ranges": [
                        {"from_value": 0, "to_value": 10, "per_unit_amount": "0.1", "flat_amount": "1"},
                        {"from_value": 11, "to_value": None, "per_unit_amount": "0.05", "flat_amount": "0"},
                    ]
                },
            },
        ],
    )
    fake.add_subscription("org", "tiers", external_id="sub")
    async with fake.client() as client:
        await client.post("/api/v1/events/batch", json={"events": [event(f"e{i}") for i in range(26)]})
    usages = fake.usage("org", "sub")["customer_usage"]["charges_usage"]
    assert [u["amount_cents"] for u in usages] == [300, 100 + 100 + 80]
    assert [u["units"] for u in usages] == ["26.0", "26.0"]


async def test_usage_helper_raises_lago_errors(fake: FakeLago) -> None:
    """fake.usage() raises FakeLagoError with Lago's status and body."""
    with pytest.raises(FakeLagoError) as info:
        fake.usage("ghost", "sub")
    assert info.value.status == 404
    assert info.value.body["code"] == "customer_not_found"


@pytest.mark.parametrize("event_store", ["postgres", "clickhouse"])
@pytest.mark.parametrize("value", ["1" + "0" * 400, "-1" + "0" * 400, "9" * 60])
async def test_current_usage_of_huge_property_values_is_computed_not_a_crash(
    clock: Clock, event_store: str, value: str
) -> None:
    """A sum metric's property far past 28 digits (Lago's numeric columns take it, written in plain digits: its event
    store reads no exponent, "1e400" is no number there): current usage answers 200 with the amount in cents as a whole
    number, not a 500 from quantizing it in Decimal's default context."""
    fake = build(clock, event_store)
    async with fake.client() as c:
        assert (
            await c.post("/api/v1/events", json={"event": event("huge", code="tokens", tokens=value)})
        ).status_code == 200
        r = await c.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
    assert r.status_code == 200
    tokens = {u["billable_metric"]["code"]: u for u in r.json()["customer_usage"]["charges_usage"]}["tokens"]
    # 0.001 USD a token, in cents: a tenth of a cent each; negative units bill nothing (Fees::ChargeService)
    expected = max(int(Decimal(value) / 10), 0)
    assert tokens["amount_cents"] == expected or abs(tokens["amount_cents"] - expected) <= abs(expected) // 10**26
