"""Second re-review of the emulator's ``current_usage`` group filters, ``events_enriched``, ``organization_id``,
``reset()`` and health routes, each checked against lago-api as ``lago-api.md`` cites it.

* ``UsageFilters.init_from_params``: ``group = params[:group] || params[:filter_by_group]`` (``group`` wins whole,
  and may be JSON too), each value kept as ``Array(v)`` (``null`` is ``[]``: nothing matches); the store compares
  ``properties->>key IN (values.map(&:to_s))`` (``true`` is ``"true"``, ``5`` is ``"5"``; a missing property never
  matches); ``Fees::ChargeService#aggregation_filters`` drops the filtered keys from the charge's pricing group
  keys, so a group filter on the only key gives no ``grouped_usage`` and several values of it are summed per the
  remaining keys.
* ``GET /events_enriched`` (ClickHouse): ``EventEnrichedSerializer``'s fields, the ``X-Lago-Endpoint-Status: beta``
  header ``index_enriched`` sets, the same pagination as ``/events``.
* ``reset()`` keeps the organization's webhook endpoint (a served emulator reused across tests kept delivering only
  until its first reset); ``GET /ready`` answers ``200 {"status":"ok"}`` (lago-api.md §1 "Health").
* Two emulators served over HTTP at once, each an organization with its own id in its webhook envelopes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)
ORG_A = "0b9f6f0e-1a90-4a90-8a90-00000000000a"
ORG_B = "0b9f6f0e-1a90-4a90-8a90-00000000000b"


def _fake(pricing_group_keys: list[str] | None = None, **kwargs: Any) -> FakeLago:
    fake = FakeLago(clock=lambda: NOW, **kwargs)
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="tokens")
    properties: dict[str, Any] = {"amount": "0.01"}
    if pricing_group_keys:
        properties["pricing_group_keys"] = pricing_group_keys
    fake.add_plan("llm", charges=[{"billable_metric_code": "tokens", "properties": properties}])
    fake.add_subscription("org", "llm", external_id="sub")
    return fake


def _batch(*props: dict[str, Any]) -> dict[str, Any]:
    return {
        "events": [
            {
                "transaction_id": str(i),
                "external_subscription_id": "sub",
                "code": "tokens",
                "timestamp": int(NOW.timestamp()),
                "properties": p,
            }
            for i, p in enumerate(props)
        ]
    }


async def _usage(fake: FakeLago, params: list[tuple[str, str]], *props: dict[str, Any]) -> dict[str, Any]:
    async with fake.client() as client:
        if props:
            assert (await client.post("/api/v1/events/batch", json=_batch(*props))).status_code == 200
        r = await client.get(
            "/api/v1/customers/org/current_usage", params=[("external_subscription_id", "sub"), *params]
        )
    assert r.status_code == 200, r.text
    return r.json()["customer_usage"]["charges_usage"][0]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- group filters


@pytest.mark.parametrize(
    "params",
    [
        [("group[user]", "u1")],
        [("filter_by_group", json.dumps({"user": "u1"}))],
        [("group[user][]", "u1")],
    ],
)
async def test_group_filter_on_the_only_pricing_key_leaves_no_grouping(params: list[tuple[str, str]]) -> None:
    """``aggregation_filters`` deletes the filtered keys from ``grouped_by``: with ``pricing_group_keys: ["user"]``
    and ``group[user]=u1`` nothing is left to group by, the fee's ``grouped_by`` is ``{}`` and ``grouped_usage`` is
    ``[]`` (the serializer lists groups only when a fee has one). The emulator still listed ``{"user": "u1"}``."""
    charge = await _usage(_fake(["user"]), params, {"user": "u1", "tokens": 10}, {"user": "u2", "tokens": 1000})
    assert (charge["units"], charge["events_count"], charge["amount_cents"]) == ("10.0", 1, 10)
    assert charge["grouped_usage"] == []


async def test_several_values_of_one_key_are_summed_per_the_other_keys() -> None:
    """Lago's own example (``ChargeService``): keys ``workspace`` and ``user``, ``filter_by_group {"workspace":
    ["A", "B"]}``: the usage stays granular per ``user`` only, A and B summed. The emulator split it per workspace
    too, so a per-user total over two workspaces read from ``grouped_usage`` came out halved."""
    charge = await _usage(
        _fake(["workspace", "user"]),
        [("filter_by_group", json.dumps({"workspace": ["A", "B"]}))],
        {"workspace": "A", "user": "u1", "tokens": 10},
        {"workspace": "B", "user": "u1", "tokens": 20},
        {"workspace": "B", "user": "u2", "tokens": 300},
        {"workspace": "C", "user": "u1", "tokens": 4000},
    )
    assert charge["units"] == "330.0"
    groups = {
        json.dumps(g["grouped_by"], sort_keys=True): (g["units"], g["events_count"]) for g in charge["grouped_usage"]
    }
    assert groups == {'{"user": "u1"}': ("30.0", 2), '{"user": "u2"}': ("300.0", 1)}


async def test_python_usage_view_drops_the_filtered_key_too() -> None:
    fake = _fake(["workspace", "user"])
    async with fake.client() as client:
        batch = _batch({"workspace": "A", "user": "u1", "tokens": 1}, {"workspace": "B", "user": "u1", "tokens": 2})
        assert (await client.post("/api/v1/events/batch", json=batch)).status_code == 200
    charge = fake.usage("org", "sub", group={"workspace": ["A", "B"]})["customer_usage"]["charges_usage"][0]
    assert [(g["grouped_by"], g["units"]) for g in charge["grouped_usage"]] == [({"user": "u1"}, "3.0")]


async def test_group_given_as_json_is_read() -> None:
    """``group = JSON.parse(group) if group.is_a?(String)`` applies to ``group`` as to ``filter_by_group``:
    ``?group={"user":"u1"}`` narrows the usage; the emulator ignored it and answered everyone's."""
    charge = await _usage(
        _fake(["user"]),
        [("group", json.dumps({"user": "u1"}))],
        {"user": "u1", "tokens": 10},
        {"user": "u2", "tokens": 1000},
    )
    assert charge["units"] == "10.0"


async def test_group_given_as_malformed_json_is_lagos_500_naming_group() -> None:
    fake = _fake(["user"])
    async with fake.client() as client:
        r = await client.get(
            "/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub", "group": "{oops"}
        )
    assert r.status_code == 500
    assert "group" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize(
    "params",
    [
        [("group[user]", "u1"), ("filter_by_group", json.dumps({"user": "u2"}))],
        [("group[user]", "u1"), ("filter_by_group[workspace]", "B")],
        [("filter_by_group[user]", "u2"), ("group", json.dumps({"user": "u1"}))],
    ],
)
async def test_group_wins_over_filter_by_group_whole(params: list[tuple[str, str]]) -> None:
    """``params[:group] || params[:filter_by_group]``: when ``group`` is given the deprecated one is not read at all
    (not merged key by key, as the emulator did)."""
    charge = await _usage(
        _fake(["user"]),
        params,
        {"user": "u1", "workspace": "A", "tokens": 10},
        {"user": "u2", "workspace": "B", "tokens": 1000},
    )
    assert charge["units"] == "10.0"


async def test_null_group_value_matches_nothing() -> None:
    """``Array(nil)`` is ``[]``: ``{"user": null}`` matches no event (``IN ()``), not the events without a user; a
    ``null`` among several values is ``""`` (``nil.to_s``), which a missing property (SQL NULL) does not match."""
    fake = _fake()
    props = ({"tokens": 10}, {"user": "", "tokens": 100}, {"user": "u1", "tokens": 1000})
    assert (await _usage(fake, [("filter_by_group", '{"user": null}')], *props))["units"] == "0.0"
    assert (await _usage(fake, [("filter_by_group", '{"user": [null, "u1"]}')]))["units"] == "1100.0"


async def test_json_scalars_compare_as_lago_texts_them() -> None:
    """``values.map(&:to_s)`` against ``properties->>key``: JSON ``5`` and ``true`` match the property ``5``/``"5"``
    and ``true``/``"true"``; an empty list matches nothing; an empty object filters nothing; an unknown key matches
    nothing."""
    fake = _fake()
    props = (
        {"n": 5, "flag": True, "tokens": 1},
        {"n": "5", "flag": "true", "tokens": 10},
        {"n": 6, "flag": False, "tokens": 100},
    )
    assert (await _usage(fake, [("filter_by_group", '{"n": 5}')], *props))["units"] == "11.0"
    assert (await _usage(fake, [("filter_by_group", '{"flag": true}')]))["units"] == "11.0"
    assert (await _usage(fake, [("filter_by_group", '{"flag": false, "n": [6, 7]}')]))["units"] == "100.0"
    assert (await _usage(fake, [("filter_by_group", '{"n": []}')]))["units"] == "0.0"
    assert (await _usage(fake, [("filter_by_group", "{}")]))["units"] == "111.0"
    assert (await _usage(fake, [("filter_by_group", '{"nope": "x"}')]))["units"] == "0.0"


# --------------------------------------------------------------------------- events_enriched


async def test_events_enriched_answers_the_enriched_serializer_with_the_beta_header() -> None:
    """``index_enriched`` calls ``set_beta_header!`` and renders ``V1::EventEnrichedSerializer`` (``transaction_id``,
    ``external_subscription_id``, ``code``, ``timestamp``, ``enriched_at``, ``value``, ``decimal_value``,
    ``precise_total_amount_cents``, ``properties``); the 403 comes from a before_action, without the header. The
    emulator answered ``/events``' serializer (``lago_id``, ``created_at``...) without the header."""
    fake = _fake(event_store="clickhouse")
    async with fake.client() as client:
        assert (
            await client.post("/api/v1/events/batch", json=_batch(*({"tokens": i} for i in range(3))))
        ).status_code == 200
        page = await client.get("/api/v1/events_enriched", params={"per_page": 2, "page": 2})
        events = await client.get("/api/v1/events", params={"per_page": 2, "page": 2})
    assert page.status_code == 200, page.text
    assert page.headers.get("x-lago-endpoint-status") == "beta"
    assert "x-lago-endpoint-status" not in events.headers
    body = page.json()
    assert body["meta"] == events.json()["meta"]
    (event,) = body["events"]
    assert set(event) == {
        "transaction_id",
        "external_subscription_id",
        "code",
        "timestamp",
        "enriched_at",
        "value",
        "decimal_value",
        "precise_total_amount_cents",
        "properties",
    }
    assert event["transaction_id"] == events.json()["events"][0]["transaction_id"]
    assert (event["value"], event["properties"]) == (str(event["properties"]["tokens"]), event["properties"])
    postgres = _fake()
    async with postgres.client() as client:
        forbidden = await client.get("/api/v1/events_enriched")
    assert forbidden.status_code == 403 and "x-lago-endpoint-status" not in forbidden.headers


# --------------------------------------------------------------------------- reset, health


def _receiver() -> tuple[Starlette, list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(json.loads(await request.body()))
        return JSONResponse({})

    return Starlette(routes=[Route("/hooks", hook, methods=["POST"])]), received


async def test_reset_keeps_the_webhook_endpoint() -> None:
    """A user keeps one emulator for a session and resets it between tests: Lago keeps an organization's webhook
    endpoint when its data goes, so webhooks keep arriving after ``reset()`` (they silently stopped: the reset forgot
    the URL). The queue and the delivery log are forgotten; ``DELETE /_emulator/webhooks`` still forgets all."""
    app, received = _receiver()
    fake = FakeLago(clock=lambda: NOW)
    dispatcher: Any = fake.webhook_dispatcher
    dispatcher.configure(url="http://receiver/hooks", app=app, signature="hmac", hmac_key="k")
    fake.add_customer("before")
    fake.reset()
    assert dispatcher.pending == [] and dispatcher.deliveries == []
    fake.add_customer("after")
    await dispatcher.deliver_pending()
    assert [w["customer"]["external_id"] for w in received] == ["after"]
    assert (dispatcher.url, dispatcher.signature, dispatcher.hmac_key) == ("http://receiver/hooks", "hmac", "k")
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        assert (await client.post("/_emulator/reset")).status_code == 200
        assert dispatcher.enabled
        assert (await client.delete("/_emulator/webhooks")).status_code == 200
    assert not dispatcher.enabled


async def test_ready_answers_like_lago() -> None:
    """lago-api.md §1 Health: ``GET /ready`` is ``200 {"status":"ok"}`` (no auth, outside ``/api/v1``), which
    deployment probes and wait-for-Lago scripts poll; the emulator answered 404."""
    fake = FakeLago()
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        r = await client.get("/ready")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


# --------------------------------------------------------------------------- two served organizations


@pytest.fixture
def two_served() -> Iterator[tuple[tuple[FakeLago, str], tuple[FakeLago, str]]]:
    a = FakeLago(api_key="key-a", organization_id=ORG_A)
    b = FakeLago(api_key="key-b", organization_id=ORG_B)
    with serve_in_thread(a) as url_a, serve_in_thread(b) as url_b:
        yield (a, url_a), (b, url_b)


def test_two_served_emulators_are_two_organizations(two_served: Any) -> None:
    """Both served at once: each answers with its own key, state and organization id (webhook envelopes, the
    dispatcher's configuration), and names its own URL as JWT issuer."""
    (a, url_a), (b, url_b) = two_served
    assert url_a != url_b
    app, received = _receiver()
    for fake in (a, b):
        fake.webhook_dispatcher.configure(url="http://receiver/hooks", app=app)  # type: ignore[union-attr]
    with httpx.Client(base_url=url_a, headers={"Authorization": "Bearer key-a"}) as ca:
        assert ca.post("/api/v1/customers", json={"customer": {"external_id": "x"}}).status_code == 200
        assert ca.get("/api/v1/customers", headers={"Authorization": "Bearer key-b"}).status_code == 401
        assert ca.get("/_emulator/webhooks").json()["webhooks"]["organization_id"] == ORG_A
    with httpx.Client(base_url=url_b, headers={"Authorization": "Bearer key-b"}) as cb:
        assert cb.get("/api/v1/customers").json()["customers"] == []
        assert cb.post("/api/v1/customers", json={"customer": {"external_id": "y"}}).status_code == 200
        assert cb.get("/_emulator/webhooks").json()["webhooks"]["organization_id"] == ORG_B
    a.webhook_dispatcher.wait_delivered(1)  # type: ignore[union-attr]
    b.webhook_dispatcher.wait_delivered(1)  # type: ignore[union-attr]
    by_org = {w["organization_id"]: w["customer"]["external_id"] for w in received}
    assert by_org == {ORG_A: "x", ORG_B: "y"}
    assert (a.webhook_dispatcher.issuer, b.webhook_dispatcher.issuer) == (url_a, url_b)  # type: ignore[union-attr]
