"""The Lago emulator as a user's own pytest suite drives it, checked against Lago's documented behaviour.

* ``current_usage`` narrowed to one pricing group the way the official ``lago-python-client`` asks for it
  (``filter_by_group`` sent as a JSON object, which lago-api's ``UsageFilters.init_from_params`` parses), and with a
  group given several values (``UsageFilters`` keeps ``Array(v)``);
* two emulators in one process (pytest-xdist-like parallel instances, or two Lago organizations in one test) are
  two organizations: state, request logs and organization ids of their webhooks stay apart;
* ``GET /api/v1/events_enriched``, which lago-api.md §4 names as the way to tell the event store apart (403
  ``endpoint_not_available`` unless the organization stores events in ClickHouse).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from lago_python_client.client import Client

from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)


def _llm_fake(**kwargs: Any) -> FakeLago:
    """A sum metric on ``tokens`` priced per ``user`` group, subscription ``sub`` of customer ``org``."""
    fake = FakeLago(clock=lambda: NOW, **kwargs)
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="tokens")
    fake.add_plan(
        "llm",
        charges=[{"billable_metric_code": "tokens", "properties": {"amount": "0.01", "pricing_group_keys": ["user"]}}],
    )
    fake.add_subscription("org", "llm", external_id="sub")
    return fake


def _events(*rows: tuple[str, str, int]) -> dict[str, Any]:
    return {
        "events": [
            {
                "transaction_id": tx,
                "external_subscription_id": "sub",
                "code": "tokens",
                "timestamp": int(NOW.timestamp()),
                "properties": {"user": user, "tokens": tokens},
            }
            for tx, user, tokens in rows
        ]
    }


# --------------------------------------------------------------------------- current_usage narrowed to a group


async def test_filter_by_group_sent_as_json_narrows_the_usage() -> None:
    """lago-python-client's ``current_usage(filter_by_group={...})`` sends ``filter_by_group={"user":"u1"}`` (JSON);
    Lago parses it (``JSON.parse(group) if group.is_a?(String)``) and counts u1 alone. The emulator ignored it and
    answered everybody's usage, so a per-user quota check passed against FakeLago and failed against Lago."""
    fake = _llm_fake()
    async with fake.client() as client:
        batch = _events(("1", "u1", 10), ("2", "u2", 1000))
        assert (await client.post("/api/v1/events/batch", json=batch)).status_code == 200
        r = await client.get(
            "/api/v1/customers/org/current_usage",
            params={"external_subscription_id": "sub", "filter_by_group": json.dumps({"user": "u1"})},
        )
    assert r.status_code == 200, r.text
    charge = r.json()["customer_usage"]["charges_usage"][0]
    assert (charge["units"], charge["events_count"], charge["amount_cents"]) == ("10.0", 1, 10)
    # the filtered key leaves the grouping (lago-api removes filter_by_group's keys from the charge's grouped_by)
    assert [g["grouped_by"] for g in charge["grouped_usage"]] == []


async def test_group_with_several_values_counts_each() -> None:
    """``UsageFilters`` keeps each group value as ``Array(v)``: ``{"user": ["u1", "u2"]}`` (JSON) or
    ``group[user][]=u1&group[user][]=u2`` counts both users and leaves the third out."""
    fake = _llm_fake()
    async with fake.client() as client:
        batch = _events(("1", "u1", 10), ("2", "u2", 100), ("3", "u3", 1000))
        assert (await client.post("/api/v1/events/batch", json=batch)).status_code == 200
        as_json = await client.get(
            "/api/v1/customers/org/current_usage",
            params={"external_subscription_id": "sub", "filter_by_group": json.dumps({"user": ["u1", "u2"]})},
        )
        as_brackets = await client.get(
            "/api/v1/customers/org/current_usage",
            params=[("external_subscription_id", "sub"), ("group[user][]", "u1"), ("group[user][]", "u2")],
        )
    for r in (as_json, as_brackets):
        assert r.status_code == 200, r.text
        charge = r.json()["customer_usage"]["charges_usage"][0]
        assert (charge["units"], charge["events_count"]) == ("110.0", 2)
    assert fake.usage("org", "sub", group={"user": ["u1", "u3"]})["customer_usage"]["charges_usage"][0]["units"] == (
        "1010.0"
    )


async def test_malformed_filter_by_group_fails_like_lago() -> None:
    """A ``filter_by_group`` that is not a JSON object makes Lago's ``JSON.parse`` (or ``transform_values``) raise: a
    500 in Lago's documented 500 envelope that names the parameter, not Starlette's plain-text crash page."""
    fake = _llm_fake()
    async with fake.client() as client:
        for value in ("{not json", "[1, 2]"):
            r = await client.get(
                "/api/v1/customers/org/current_usage",
                params={"external_subscription_id": "sub", "filter_by_group": value},
            )
            assert r.status_code == 500
            body = r.json()
            assert (body["status"], body["data"]) == (500, {})
            assert "filter_by_group" in body["errors"][0]["message"]


def test_official_client_filter_by_group_over_http(fake_lago_server: Any) -> None:
    """The same through the official client and the served emulator, as a user's sync suite runs it."""
    fake = fake_lago_server
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="tokens")
    fake.add_plan(
        "llm",
        charges=[{"billable_metric_code": "tokens", "properties": {"amount": "0.01", "pricing_group_keys": ["user"]}}],
    )
    fake.add_subscription("org", "llm", external_id="sub")
    ts = int(fake.now().timestamp())
    with httpx.Client(base_url=fake.url, headers={"Authorization": f"Bearer {fake.api_key}"}) as raw:
        batch = _events(("1", "u1", 10), ("2", "u2", 1000))
        for event in batch["events"]:
            event["timestamp"] = ts
        assert raw.post("/api/v1/events/batch", json=batch).status_code == 200
    client = Client(api_key=fake.api_key, api_url=fake.url + "/", max_retries=0)
    with pytest.warns(DeprecationWarning):
        usage = client.customers.current_usage("org", "sub", filter_by_group={"user": "u1"})
    assert (usage.charges_usage[0].units, usage.charges_usage[0].events_count) == ("10.0", 1)


# --------------------------------------------------------------------------- two emulators in one process


async def test_two_emulators_in_one_process_are_two_organizations() -> None:
    """Parallel instances (pytest-xdist-like, or two Lago organizations in one test): objects, request logs, faults
    and webhooks stay apart, and ``organization_id=`` gives each its own id (the webhook envelope's
    ``organization_id``, by which a receiver serving several organizations tells them apart), and its own lago_ids."""
    a = FakeLago(api_key="key-a", organization_id="0b9f6f0e-1a90-4a90-8a90-00000000000a")
    b = FakeLago(api_key="key-b", organization_id="0b9f6f0e-1a90-4a90-8a90-00000000000b")
    a.inject_fault(status=503, count=1)  # type: ignore[attr-defined]
    async with a.client() as ca, b.client() as cb:
        assert (await cb.post("/api/v1/customers", json={"customer": {"external_id": "org"}})).status_code == 200
        assert (await ca.get("/api/v1/customers")).status_code == 503
        assert (await ca.post("/api/v1/customers", json={"customer": {"external_id": "org"}})).status_code == 200
        assert (await ca.get("/api/v1/customers", headers={"Authorization": "Bearer key-b"})).status_code == 401
    assert (a.organization_id, b.organization_id) == (
        "0b9f6f0e-1a90-4a90-8a90-00000000000a",
        "0b9f6f0e-1a90-4a90-8a90-00000000000b",
    )
    assert [w["organization_id"] for w in a.emitted_webhooks] == [a.organization_id]
    assert [w["organization_id"] for w in b.emitted_webhooks] == [b.organization_id]
    assert a.customers[0]["lago_id"] != b.customers[0]["lago_id"]
    assert [r.status for r in a.requests] == [503, 200, 401] and [r.status for r in b.requests] == [200]
    a.reset()  # resetting one organization between tests keeps its id and leaves the other alone
    assert a.organization_id == "0b9f6f0e-1a90-4a90-8a90-00000000000a" and a.customers == []
    assert [c["external_id"] for c in b.customers] == ["org"]
    delivery = a.webhook_dispatcher.envelope("customer.created", "customer", {})  # type: ignore[union-attr]
    assert delivery["organization_id"] == a.organization_id


def test_organization_id_must_be_a_uuid() -> None:
    """Lago's organization ids are UUIDs (the spec's ``organization_id: format: uuid``): anything else is refused."""
    from lago_org_billing.testing import FakeLagoError

    with pytest.raises(FakeLagoError, match="organization_id"):
        FakeLago(organization_id="acme")


# --------------------------------------------------------------------------- telling the event store apart


@pytest.mark.parametrize("event_store", ["postgres", "clickhouse"])
async def test_events_enriched_tells_the_event_store(event_store: str) -> None:
    """lago-api.md §4 "Detecting the store": ``GET /events_enriched`` is ``403 endpoint_not_available`` unless the
    organization stores events in ClickHouse (``ensure_organization_uses_clickhouse``); it was a 404 on both."""
    fake = _llm_fake(event_store=event_store)
    async with fake.client() as client:
        assert (await client.post("/api/v1/events/batch", json=_events(("1", "u1", 10)))).status_code == 200
        r = await client.get("/api/v1/events_enriched", params={"external_subscription_id": "sub"})
        unauthenticated = await client.get("/api/v1/events_enriched", headers={"Authorization": ""})
    assert unauthenticated.status_code == 401
    if event_store == "postgres":
        assert (r.status_code, r.json()) == (
            403,
            {"status": 403, "error": "Forbidden", "code": "endpoint_not_available"},
        )
    else:
        assert r.status_code == 200, r.text
        body = r.json()
        assert [e["transaction_id"] for e in body["events"]] == ["1"]
        assert body["meta"]["total_count"] == 1
