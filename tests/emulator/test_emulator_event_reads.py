"""The Lago emulator (``lago_org_billing.testing``) as a user's test suite reads its events back, against lago-api
and the official OpenAPI spec.

* ``EventsQuery`` orders a Postgres store by ``timestamp DESC`` (a ``timestamp(6)`` column: microseconds) and a
  ClickHouse store by ``ingested_at DESC`` (``DateTime64(3)``: milliseconds), then ``transaction_id ASC``. The emulator
  cut timestamps to the millisecond and ingestion times to the second, so two events Lago tells apart tied and came
  back in transaction id order.
* On ClickHouse, ``events_raw`` and ``events_enriched`` keep ``properties`` as ``Map(String, String)``: ``GET /events``,
  ``GET /events/{id}`` and ``GET /events_enriched`` give every property value as text (``5`` reads ``"5"``); the
  ``POST`` answers keep the JSON types (an unsaved ``Event``). The emulator echoed the JSON types everywhere.
* On ClickHouse, ``POST /events`` and ``POST /events/batch`` answer an unsaved ``Event`` (``lago_id`` and
  ``created_at`` null), and ``Clickhouse::EventsRaw#id`` is the composite
  ``"<organization_id>-<external_subscription_id>-<transaction_id>-<ingested_at epoch>"`` (the spec's ``EventObject``
  says so). The emulator gave a UUID both times.
* ``Events::CreateBatchService#bulk_insert_events`` matches the inserted rows back by ``transaction_id`` alone: on a
  Postgres store a batch carrying one ``transaction_id`` for two subscriptions is refused (``value_already_exist`` on
  the second), and duplicates are only looked for once every event of the batch is valid.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from _openapi import assert_response_matches
from _pinned_clock import NOW, Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


def _event(tid: str, sub: str = "sub", **fields: Any) -> dict[str, Any]:
    return {"transaction_id": tid, "external_subscription_id": sub, "code": "tokens", **fields}


async def _post(client: httpx.AsyncClient, event: dict[str, Any]) -> httpx.Response:
    r = await client.post("/api/v1/events", json={"event": event})
    assert r.status_code == 200, r.text
    return r


# --------------------------------------------------------------------------- order of the listed events


async def test_postgres_lists_events_by_their_microsecond_timestamp() -> None:
    """Two events in the same millisecond but not the same microsecond: Lago lists the later one first whatever
    their transaction ids (``ORDER BY timestamp DESC`` on a ``timestamp(6)`` column)."""
    fake = FakeLago(api_key="k", clock=Clock(NOW))
    async with fake.client() as client:
        await _post(client, _event("a", timestamp="1773576000.1231"))
        await _post(client, _event("b", timestamp="1773576000.1239"))
        await _post(client, _event("c", timestamp="1773576000.1235"))
        r = await client.get("/api/v1/events")
    assert [e["transaction_id"] for e in r.json()["events"]] == ["b", "c", "a"]
    # (the answer still shows milliseconds, as iso8601(3) does)
    assert {e["timestamp"] for e in r.json()["events"]} == {"2026-03-15T12:00:00.123Z"}


async def test_postgres_lists_events_sent_without_timestamp_newest_first() -> None:
    """Without ``timestamp`` Lago stamps ``Time.current.to_f``: events received a fraction of a millisecond apart are
    listed newest first, not in transaction id order."""
    clock = Clock(NOW)
    fake = FakeLago(api_key="k", clock=clock)
    async with fake.client() as client:
        for step, tid in enumerate(["a", "b", "c"]):
            clock.now = NOW.replace(microsecond=100 + step * 200)
            await _post(client, _event(tid))
        r = await client.get("/api/v1/events")
    assert [e["transaction_id"] for e in r.json()["events"]] == ["c", "b", "a"]


async def test_clickhouse_lists_events_by_their_millisecond_ingestion() -> None:
    """``events_raw`` is ordered by ``ingested_at DESC`` (milliseconds) and ``events_enriched`` by ``enriched_at DESC``:
    an event received 100 ms after another comes first, and ``enriched_at`` shows the milliseconds."""
    clock = Clock(NOW.replace(microsecond=100_000))
    fake = FakeLago(api_key="k", event_store="clickhouse", clock=clock)
    async with fake.client() as client:
        await _post(client, _event("a", timestamp=1773576000))
        clock.now = NOW.replace(microsecond=200_000)
        await _post(client, _event("b", timestamp=1773576000))
        raw = await client.get("/api/v1/events")
        enriched = await client.get("/api/v1/events_enriched")
    assert [e["transaction_id"] for e in raw.json()["events"]] == ["b", "a"]
    assert [(e["transaction_id"], e["enriched_at"]) for e in enriched.json()["events"]] == [
        ("b", "2026-03-15T12:00:00.200Z"),
        ("a", "2026-03-15T12:00:00.100Z"),
    ]


# --------------------------------------------------------------------------- ClickHouse reads


PROPERTIES = {"tokens": 5, "ratio": 1.5, "cached": True, "model": "gpt", "meta": {"a": 1}}
AS_TEXT = {"tokens": "5", "ratio": "1.5", "cached": "true", "model": "gpt", "meta": '{"a":1}'}


async def test_clickhouse_reads_give_property_values_as_text() -> None:
    """``Map(String, String)``: what ``GET /events``, ``GET /events/{id}`` and ``GET /events_enriched`` read back is
    text; the ``POST`` answer (the event as received) keeps the JSON types."""
    fake = FakeLago(api_key="k", event_store="clickhouse", clock=Clock(NOW))
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="tokens")
    async with fake.client() as client:
        created = await _post(client, _event("t1", properties=PROPERTIES))
        listed = await client.get("/api/v1/events")
        shown = await client.get("/api/v1/events/t1")
        enriched = await client.get("/api/v1/events_enriched")
    assert created.json()["event"]["properties"] == PROPERTIES
    assert listed.json()["events"][0]["properties"] == AS_TEXT
    assert shown.json()["event"]["properties"] == AS_TEXT
    assert enriched.json()["events"][0]["properties"] == AS_TEXT
    assert (enriched.json()["events"][0]["value"], enriched.json()["events"][0]["decimal_value"]) == ("5", "5.0")


async def test_postgres_reads_keep_the_json_types() -> None:
    """A Postgres store keeps ``properties`` as ``jsonb``: what is read back is what was sent."""
    fake = FakeLago(api_key="k", clock=Clock(NOW))
    async with fake.client() as client:
        await _post(client, _event("t1", properties=PROPERTIES))
        listed = await client.get("/api/v1/events")
        shown = await client.get("/api/v1/events/t1")
    assert listed.json()["events"][0]["properties"] == PROPERTIES
    assert shown.json()["event"]["properties"] == PROPERTIES


async def test_clickhouse_event_ids_are_lagos() -> None:
    """The ``POST`` answers of a ClickHouse organization carry an unsaved event (``lago_id`` and ``created_at`` null);
    a read gives ``Clickhouse::EventsRaw#id``. Every answer validates against the spec."""
    clock = Clock(NOW.replace(microsecond=250_000))
    fake = FakeLago(api_key="k", event_store="clickhouse", clock=clock)
    async with fake.client() as client:
        single = await _post(client, _event("t1", properties={"tokens": 2}))
        batch = await client.post("/api/v1/events/batch", json={"events": [_event("t2"), _event("t3", sub="other")]})
        listed = await client.get("/api/v1/events", params={"external_subscription_id": "sub"})
        shown = await client.get("/api/v1/events/t3")
    for response in (single, batch, listed, shown):
        assert response.status_code == 200, response.text
        assert_response_matches(response)
    assert (single.json()["event"]["lago_id"], single.json()["event"]["created_at"]) == (None, None)
    assert [(e["lago_id"], e["created_at"]) for e in batch.json()["events"]] == [(None, None), (None, None)]
    org = fake.organization_id
    assert sorted(e["lago_id"] for e in listed.json()["events"]) == [
        f"{org}-sub-t1-1773576000",
        f"{org}-sub-t2-1773576000",
    ]
    assert shown.json()["event"]["lago_id"] == f"{org}-other-t3-1773576000"
    assert shown.json()["event"]["created_at"] == "2026-03-15T12:00:00Z"


async def test_postgres_event_ids_stay_uuids() -> None:
    """A Postgres store saves the event: its ``lago_id`` and ``created_at`` are in the ``POST`` answer."""
    fake = FakeLago(api_key="k", clock=Clock(NOW))
    async with fake.client() as client:
        single = await _post(client, _event("t1"))
        shown = await client.get("/api/v1/events/t1")
    assert single.json()["event"]["lago_id"] == shown.json()["event"]["lago_id"]
    assert single.json()["event"]["created_at"] == "2026-03-15T12:00:00Z"


# --------------------------------------------------------------------------- batch duplicates (Postgres store)


async def test_postgres_batch_refuses_one_transaction_id_for_two_subscriptions() -> None:
    """``bulk_insert_events`` indexes the inserted rows by ``transaction_id``: the second event of a batch reusing a
    transaction id, even for another subscription, finds no row and the batch is rolled back. Sent one by one, both
    are accepted (the unique index includes ``external_subscription_id``)."""
    fake = FakeLago(api_key="k", clock=Clock(NOW))
    async with fake.client() as client:
        r = await client.post("/api/v1/events/batch", json={"events": [_event("t1", sub="a"), _event("t1", sub="b")]})
        assert r.status_code == 422, r.text
        assert r.json()["error_details"] == {"1": {"transaction_id": ["value_already_exist"]}}
        assert fake.events == []
        await _post(client, _event("t1", sub="a"))
        await _post(client, _event("t1", sub="b"))
    assert len(fake.events) == 2


async def test_postgres_batch_reports_duplicates_only_once_the_events_are_valid() -> None:
    """``validate_events`` runs first and returns its errors alone: a duplicate next to an invalid event is not
    reported (it is looked for by the insert, which does not run)."""
    fake = FakeLago(api_key="k", clock=Clock(NOW))
    async with fake.client() as client:
        await _post(client, _event("t1"))
        r = await client.post(
            "/api/v1/events/batch", json={"events": [_event("t1"), _event("t2", timestamp="not a time")]}
        )
    assert r.status_code == 422, r.text
    assert r.json()["error_details"] == {"1": {"timestamp": ["invalid_format"]}}
