"""Third re-review of the emulator's group filters, ``events_enriched`` and ``reset()`` (commit 3e35eed).

* ``Fees::ChargeService#aggregation_filters`` merges ``filter_by_group`` into each charge filter's
  ``matching_filters`` (``(filters[:matching_filters] || {}).merge(filter_by_group)``) after computing the filter's
  ignored filters from its own values: a group key that is also a charge-filter key *replaces* that filter's values,
  so every filter bucket not ignored counts the events of the group value (Lago's answer, double counted as it is).
  The emulator filtered the events first and kept each filter's own values.
* ``V1::Customers::ChargeUsageSerializer``: a charge's ``units`` and ``events_count`` are the sums of its fees (one
  per filter plus the default bucket), not the aggregation of all its events: a ``max_agg`` charge with filters
  reports the sum of each bucket's maximum.
* ``EventsQuery`` on ``events_enriched`` orders by ``enriched_at DESC, transaction_id ASC``: the emulator listed
  the store's insertion order reversed (ties not by transaction id; a replaced event kept its first place under
  its new ``enriched_at``).
* ``FakeLago.reset()`` with a dispatcher of the user's own that has only ``emit`` (as this repository's own tests
  set one) raised ``AttributeError``; a reset while the webhook worker was sending a batch let the rest of the batch
  go to the kept endpoint.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)


def _event(tid: str, **props: Any) -> dict[str, Any]:
    return {
        "transaction_id": tid,
        "external_subscription_id": "sub",
        "code": "tokens",
        "timestamp": int(NOW.timestamp()),
        "properties": props,
    }


def _filtered_fake(aggregation: str = "sum_agg", field: str = "tokens", **kwargs: Any) -> FakeLago:
    fake = FakeLago(clock=lambda: NOW, **kwargs)
    fake.add_billable_metric(
        "tokens",
        aggregation_type=aggregation,
        field_name=field,
        filters=[{"key": "model", "values": ["gpt-4", "llama"]}],
    )
    fake.add_plan(
        "llm",
        charges=[
            {
                "billable_metric_code": "tokens",
                "properties": {"amount": "0.5"},
                "filters": [
                    {"values": {"model": ["gpt-4"]}, "properties": {"amount": "1"}, "invoice_display_name": "GPT"},
                    {"values": {"model": ["llama"]}, "properties": {"amount": "2"}, "invoice_display_name": "Llama"},
                ],
            }
        ],
    )
    fake.add_subscription("org", "llm", external_id="sub")
    return fake


async def _usage(fake: FakeLago, params: list[tuple[str, str]], *events: dict[str, Any]) -> dict[str, Any]:
    async with fake.client() as client:
        if events:
            r = await client.post("/api/v1/events/batch", json={"events": list(events)})
            assert r.status_code == 200, r.text
        r = await client.get(
            "/api/v1/customers/org/current_usage", params=[("external_subscription_id", "sub"), *params]
        )
    assert r.status_code == 200, r.text
    return r.json()["customer_usage"]["charges_usage"][0]  # type: ignore[no-any-return]


def _by_filter(charge: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    return {f["invoice_display_name"]: (f["units"], f["events_count"], f["amount_cents"]) for f in charge["filters"]}


# --------------------------------------------------------------------------- charge filters x group filters


@pytest.mark.parametrize("params", [[("group[model]", "gpt-4")], [("filter_by_group", '{"model": "gpt-4"}')]])
async def test_group_on_a_charge_filter_key_replaces_each_filters_value(params: list[tuple[str, str]]) -> None:
    """lago-api merges the group into every filter's matching values: the Llama filter's ``model: [llama]`` becomes
    ``model: [gpt-4]`` (its ignored filters, computed from its own values, do not include GPT's), so both filters
    count the gpt-4 event, at their own prices, and the charge sums them; the default bucket ignores both filters.
    The emulator answered 10 units on GPT and nothing on Llama, hiding what Lago returns to such a query."""
    charge = await _usage(
        _filtered_fake(),
        params,
        _event("1", model="gpt-4", tokens=10),
        _event("2", model="llama", tokens=100),
        _event("3", tokens=1000),
    )
    assert _by_filter(charge) == {"GPT": ("10.0", 1, 1000), "Llama": ("10.0", 1, 2000)}
    assert (charge["units"], charge["events_count"], charge["amount_cents"]) == ("20.0", 2, 3000)


async def test_python_usage_view_merges_the_group_into_the_filters_too() -> None:
    fake = _filtered_fake()
    await _usage(fake, [], _event("1", model="gpt-4", tokens=10), _event("2", model="llama", tokens=100))
    charge = fake.usage("org", "sub", group={"model": "llama"})["customer_usage"]["charges_usage"][0]
    assert _by_filter(charge) == {"GPT": ("100.0", 1, 10000), "Llama": ("100.0", 1, 20000)}


async def test_group_on_another_key_still_narrows_each_filter() -> None:
    """A group key that no filter has is only added to each filter's matching values (the common case)."""
    charge = await _usage(
        _filtered_fake(),
        [("group[user]", "u1")],
        _event("1", model="gpt-4", user="u1", tokens=10),
        _event("2", model="llama", user="u2", tokens=100),
        _event("3", user="u1", tokens=1000),
    )
    assert _by_filter(charge) == {"GPT": ("10.0", 1, 1000), "Llama": ("0.0", 0, 0)}
    assert (charge["units"], charge["events_count"], charge["amount_cents"]) == ("1010.0", 2, 1000 + 50000)


async def test_a_filter_keeps_ignoring_by_its_own_values_when_the_group_replaces_one() -> None:
    """Filters ``model: [gpt-4]`` (GPT) and ``model: [gpt-4], region: [eu]`` (GPT EU, taking precedence), group
    ``region: us``: GPT matches gpt-4 in us and still ignores GPT EU's own values (gpt-4 in eu); GPT EU's region is
    replaced by us, so it counts gpt-4 in us too; the default bucket counts us events matching no filter."""
    fake = FakeLago(clock=lambda: NOW)
    fake.add_billable_metric(
        "tokens",
        aggregation_type="sum_agg",
        field_name="tokens",
        filters=[{"key": "model", "values": ["gpt-4", "llama"]}, {"key": "region", "values": ["eu", "us"]}],
    )
    fake.add_plan(
        "llm",
        charges=[
            {
                "billable_metric_code": "tokens",
                "properties": {"amount": "0"},
                "filters": [
                    {"values": {"model": ["gpt-4"]}, "properties": {"amount": "1"}, "invoice_display_name": "GPT"},
                    {
                        "values": {"model": ["gpt-4"], "region": ["eu"]},
                        "properties": {"amount": "3"},
                        "invoice_display_name": "GPT EU",
                    },
                ],
            }
        ],
    )
    fake.add_subscription("org", "llm", external_id="sub")
    events = (
        _event("1", model="gpt-4", region="eu", tokens=10),
        _event("2", model="gpt-4", region="us", tokens=100),
        _event("3", model="llama", region="us", tokens=1000),
    )
    charge = await _usage(fake, [("group[region]", "us")], *events)
    assert _by_filter(charge) == {"GPT": ("100.0", 1, 10000), "GPT EU": ("100.0", 1, 30000)}
    assert (charge["units"], charge["events_count"], charge["amount_cents"]) == ("1200.0", 3, 40000)
    # a group value equal to GPT EU's: GPT ignores those events, GPT EU has them, nothing counted twice
    charge = await _usage(fake, [("group[region]", "eu")])
    assert _by_filter(charge) == {"GPT": ("0.0", 0, 0), "GPT EU": ("10.0", 1, 3000)}
    assert charge["units"] == "10.0"


async def test_max_agg_with_filters_sums_the_maximum_of_each_bucket() -> None:
    """The serializer sums the fees' units: peak seats per region (filter) and outside any, added up. The emulator
    answered the maximum over every event of the charge."""
    charge = await _usage(
        _filtered_fake("max_agg", "seats"),
        [],
        _event("1", model="gpt-4", seats=5),
        _event("2", model="llama", seats=3),
        _event("3", seats=2),
        _event("4", model="gpt-4", seats=1),
    )
    assert _by_filter(charge) == {"GPT": ("5.0", 2, 500), "Llama": ("3.0", 1, 600)}
    assert (charge["units"], charge["events_count"], charge["amount_cents"]) == ("10.0", 4, 500 + 600 + 100)


# --------------------------------------------------------------------------- events_enriched order


async def test_events_enriched_orders_by_enriched_at_then_transaction_id() -> None:
    """``ORDER BY enriched_at DESC, transaction_id ASC``: one batch enriched at the same millisecond comes in
    transaction id order, and an event replaced later (ClickHouse keeps the latest copy) comes first."""
    now = [NOW]
    fake = FakeLago(clock=lambda: now[0], event_store="clickhouse")
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="tokens")
    fake.add_plan("llm", charges=[{"billable_metric_code": "tokens", "properties": {"amount": "1"}}])
    fake.add_subscription("org", "llm", external_id="sub")
    async with fake.client() as client:
        batch = [_event(t, tokens=1) for t in ("b", "c", "a")]
        assert (await client.post("/api/v1/events/batch", json={"events": batch})).status_code == 200
        r = await client.get("/api/v1/events_enriched")
        assert [e["transaction_id"] for e in r.json()["events"]] == ["a", "b", "c"]
        now[0] = NOW + timedelta(minutes=1)
        again = {"event": _event("c", tokens=7)}
        assert (await client.post("/api/v1/events", json=again)).status_code == 200
        page1 = await client.get("/api/v1/events_enriched", params={"per_page": 2})
        page2 = await client.get("/api/v1/events_enriched", params={"per_page": 2, "page": 2})
    events = page1.json()["events"] + page2.json()["events"]
    assert [(e["transaction_id"], e["value"]) for e in events] == [("c", "7"), ("a", "1"), ("b", "1")]
    stamps = [e["enriched_at"] for e in events]
    assert stamps == sorted(stamps, reverse=True)


# --------------------------------------------------------------------------- reset


def test_reset_with_an_emit_only_dispatcher() -> None:
    """A dispatcher of the user's own with ``emit`` only (as ``test_emulator_api`` sets one): ``reset()`` raised
    ``AttributeError: 'Dispatcher' object has no attribute 'reset'``; it forgets the emulator's data and leaves the
    dispatcher alone."""
    calls: list[str] = []

    class Dispatcher:
        def emit(self, webhook_type: str, object_type: str, obj: Any) -> None:
            calls.append(webhook_type)

    fake = FakeLago(clock=lambda: NOW)
    fake.webhook_dispatcher = Dispatcher()  # type: ignore[assignment]
    fake.add_customer("before")
    fake.reset()
    assert fake.customers == [] and fake.emitted_webhooks == []
    fake.add_customer("after")
    assert calls == ["customer.created", "customer.created"]


async def test_clickhouse_events_list_ties_by_transaction_id_and_keeps_a_replaced_events_place() -> None:
    """``GET /events`` on ClickHouse: ``ORDER BY ingested_at DESC, transaction_id ASC``; a batch stored at once came
    in reverse insertion order. A replaced event keeps its first copy's place (its ingestion), as before."""
    now = [NOW]
    fake = FakeLago(clock=lambda: now[0], event_store="clickhouse")
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="tokens")
    fake.add_plan("llm", charges=[{"billable_metric_code": "tokens", "properties": {"amount": "1"}}])
    fake.add_subscription("org", "llm", external_id="sub")
    async with fake.client() as client:
        batch = [_event(t, tokens=1) for t in ("b", "c", "a")]
        assert (await client.post("/api/v1/events/batch", json={"events": batch})).status_code == 200
        now[0] = NOW + timedelta(minutes=1)
        assert (await client.post("/api/v1/events", json={"event": _event("d", tokens=1)})).status_code == 200
        now[0] = NOW + timedelta(minutes=2)
        assert (await client.post("/api/v1/events", json={"event": _event("b", tokens=9)})).status_code == 200
        r = await client.get("/api/v1/events")
    # (events_raw keeps properties as Map(String, String): the values read back are text)
    assert [(e["transaction_id"], e["properties"]["tokens"]) for e in r.json()["events"]] == [
        ("d", "1"),
        ("a", "1"),
        ("b", "9"),
        ("c", "1"),
    ]


async def test_reset_during_a_delivery_run_sends_nothing_more_of_the_old_batch() -> None:
    """A served emulator's background worker had taken the queue when a test's ``POST /_emulator/reset`` came: the
    rest of that batch was still sent, now that the endpoint is kept, to the next test's receiver (webhooks of
    objects the reset forgot). Before 3e35eed the same reset made the run raise (no endpoint left)."""
    fake = FakeLago(clock=lambda: NOW)
    received: list[str] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(json.loads(await request.body())["customer"]["external_id"])
        if len(received) == 1:
            fake.reset()  # the next test starts while the worker is sending
        return JSONResponse({})

    dispatcher: Any = fake.webhook_dispatcher
    app = Starlette(routes=[Route("/hooks", hook, methods=["POST"])])
    dispatcher.configure(url="http://receiver/hooks", app=app, signature="hmac")
    fake.add_customer("a")
    fake.add_customer("b")
    sent = await dispatcher.deliver_pending()
    assert received == ["a"]
    assert [d.payload["customer"]["external_id"] for d in sent] == ["a"]
    fake.add_customer("c")
    await dispatcher.deliver_pending()
    assert received == ["a", "c"]
    assert [d.payload["customer"]["external_id"] for d in dispatcher.deliveries] == ["c"]
