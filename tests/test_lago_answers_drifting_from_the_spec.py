"""Lago answers that drift from the spec, within what a tolerant reader takes (a Lago upgraded, or lagging behind).

Covered: counts as decimal strings (``events_count: "2.0"``), null entries in ``charges_usage`` / ``entitlements`` /
``privileges``, ``plan`` not an object, ``entitlements`` as an object, a subscription status this package does not know
(``activating``) against a documented one that is not active (``incomplete``), pagination ``next_page`` as a string or
float, a list key that is not a list, an event answered 200/204 without a body, empty and array bodies (the error names
the call, its status and what came), and customer ``metadata`` with null items or in object form. Billing never stops;
the quota gate decides (counts, or its fail policy, said once) rather than crash its refreshes; errors name the field
and what Lago sent.

Lago is the emulator, its answers reshaped at the network edge by :class:`Drifting`; shapes of one call alone are served
by pytest-httpx."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pytest_httpx import HTTPXMock
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from _lifespan import serving_lifespan
from _quota_app import Clock, Drifting, Edit, seed
from lago_org_billing import BillingSettings, LagoAPIError, LagoClient, OrgBilling, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "sk_drift_never_shown"
BASE = "http://lago.test"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on ``starter``: 3 calls a period (its entitlements)."""
    return seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=3)


def client_on(transport: httpx.AsyncBaseTransport) -> LagoClient:
    return LagoClient(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0), transport=transport)


def gate_on(client: LagoClient, clock: Clock, **changes: Any) -> QuotaGate:
    return QuotaGate(client.settings.replace(**changes), client, config=QuotaConfig(), clock=clock.time)


async def decisions(gate: QuotaGate, org_id: str, tries: int) -> list[bool]:
    """Whether each of ``tries`` calls in a row is allowed (each allowed one billed)."""
    allowed = []
    for _ in range(tries):
        decision = await gate.check(org_id)
        allowed.append(decision.allowed)
        if decision.allowed:
            gate.settle(org_id, decision, tokens=1, billed=True)
    return allowed


async def send_events(fake: FakeLago, clock: Clock, count: int) -> None:
    """``count`` calls of org_1 that Lago has counted already (a minute after its subscription started)."""
    clock.advance(60)
    async with client_on(fake.transport()) as client:
        for n in range(count):
            event = {"transaction_id": f"seen_{n}", "external_subscription_id": "org_1", "code": "api_call"}
            # (total_tokens as the middleware writes it, 0 without usage: Lago's sum counts only the events whose
            # field is a number)
            event["properties"] = {"total_tokens": 0}
            await client.create_event({**event, "timestamp": clock.time()})


def each_charge(change: Callable[[dict[str, Any]], None]) -> Edit:
    def edit(usage: dict[str, Any]) -> None:
        for charge in usage.get("charges_usage") or []:
            change(charge)

    return edit


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------- quota: counts and nulls


@pytest.mark.parametrize("shape", [str, float, lambda n: f"{n}.0"], ids=["string", "float", "decimal-string"])
async def test_events_count_as_a_string_or_float_is_counted(
    fake: FakeLago, clock: Clock, shape: Callable[[int], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """``events_count`` written as Lago writes ``units`` ("2.0"), "2" or 2.0: Lago's 2 calls count (1 left of 3), the
    refresh never crashes into LAGO_FAIL_OPEN (every call of the org let through, a traceback at each refresh)."""
    await send_events(fake, clock, 2)
    lago = Drifting(fake, usage=each_charge(lambda charge: charge.update(events_count=shape(charge["events_count"]))))
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        assert await decisions(gate, "org_1", 3) == [True, False, False]
    assert gate.stats["fail_open"] == 0 and gate.stats["refresh_errors"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_count_that_is_no_number_is_said_naming_the_field_and_the_fail_policy_decides(
    fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``events_count: "many"``: the snapshot cannot be trusted; the fail policy decides (here: closed, 503), said
    once at WARNING naming the field and what Lago sent, without a traceback per refresh; the seed helper raises the
    same LagoAPIError (not "another worker is reading it")."""
    lago = Drifting(fake, usage=each_charge(lambda charge: charge.update(events_count="many")))
    async with client_on(lago) as client:
        gate = gate_on(client, clock, fail_open=False)
        for _ in range(3):
            decision = await gate.check("org_1")
            assert not decision.allowed and decision.status == 503
            clock.advance(10)  # (past failure_backoff: read again, failing again)
        with pytest.raises(LagoAPIError) as caught:
            await gate.snapshot("org_1")
    assert "events_count" in str(caught.value) and "'many'" in str(caught.value)
    said = [r.getMessage() for r in problems(caplog) if "events_count" in r.getMessage()]
    assert len(said) == 1 and "'many'" in said[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert API_KEY not in caplog.text


@pytest.mark.parametrize("units", ["lots", "-5", "NaN", True], ids=["word", "negative", "nan", "bool"])
async def test_token_units_that_are_no_count_are_said_and_the_fail_policy_decides(
    clock: Clock, units: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The token metric's ``units`` as no count of tokens (``"lots"``, negative, NaN, a boolean): as for
    ``events_count``, the snapshot cannot be trusted and the fail policy decides (closed here: 503), said once naming
    the field and what Lago sent. Taken as 0 tokens before: an org on a token limit was let through without one."""
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=None, starter_tokens=100)
    lago = Drifting(fake, usage=each_charge(lambda charge: charge.update(units=units)))
    async with client_on(lago) as client:
        gate = gate_on(client, clock, fail_open=False)
        for _ in range(3):
            decision = await gate.check("org_1")
            assert not decision.allowed and decision.status == 503
            clock.advance(10)  # (past failure_backoff: read again, failing again)
    said = [r.getMessage() for r in problems(caplog) if "units" in r.getMessage()]
    assert len(said) == 1 and repr(units)[:10] in said[0], said
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_null_entries_in_charges_entitlements_and_privileges_are_skipped(
    fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``charges_usage: [..., null]``, ``entitlements: [..., null]``, ``privileges: [..., null]`` and ``plan`` not
    an object: what can be read is read (3 calls, then 429), not a refresh crashing into LAGO_FAIL_OPEN."""

    def subscription(sub: dict[str, Any]) -> None:
        sub["entitlements"].append(None)
        for feature in sub["entitlements"]:
            if feature is not None:
                feature["privileges"].append(None)
        sub["plan"] = "starter"

    lago = Drifting(fake, subscription=subscription, usage=lambda usage: usage["charges_usage"].append(None))
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        assert await decisions(gate, "org_1", 5) == [True, True, True, False, False]
    assert gate.stats["fail_open"] == 0 and gate.stats["refresh_errors"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_entitlements_as_an_object_are_read_from_their_endpoint(fake: FakeLago, clock: Clock) -> None:
    """A subscription whose ``entitlements`` is an object (``{"api_quota": {...}}``) rather than the documented list:
    the limits come from ``GET /subscriptions/{id}/entitlements`` (3 calls), not a crash letting every call through."""
    lago = Drifting(fake, subscription=lambda sub: sub.update(entitlements={"api_quota": {"max_api_calls": 3}}))
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        assert await decisions(gate, "org_1", 5) == [True, True, True, False, False]
    assert gate.stats["fail_open"] == 0


# ------------------------------------------------------------------------------------- quota: statuses


async def test_a_status_this_package_does_not_know_applies_the_fail_policy_said_once(
    fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago answers the active-subscription read with ``status: "activating"`` (a value added after this package):
    not "no subscription" (402 to every paying org): the fail policy decides (open: served and counted), said once,
    naming the status."""
    lago = Drifting(fake, subscription=lambda sub: sub.update(status="activating"))
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        for _ in range(3):
            decision = await gate.check("org_1")
            assert decision.allowed and decision.status != 402
            clock.advance(10)
    assert gate.stats["fail_open"] == 3
    said = [r.getMessage() for r in problems(caplog) if "'activating'" in r.getMessage()]
    assert len(said) == 1 and "status" in said[0]


async def test_incomplete_a_documented_status_is_no_active_subscription(fake: FakeLago, clock: Clock) -> None:
    """``incomplete`` (payment-gated activation, documented) is not active: 402, as before."""
    lago = Drifting(fake, subscription=lambda sub: sub.update(status="incomplete"))
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        decision = await gate.check("org_1")
    assert not decision.allowed and decision.status == 402


# ------------------------------------------------------------------------------------- through the middleware


async def test_an_app_behind_the_middleware_is_gated_on_decimal_counts(fake: FakeLago, clock: Clock) -> None:
    """End to end (ASGI): Lago counted 2 of the 3 calls (``events_count: "2.0"``): one more is served and billed, the
    next answered 429; billing goes on."""
    await send_events(fake, clock, 2)

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    lago = Drifting(fake, usage=each_charge(lambda charge: charge.update(events_count=f"{charge['events_count']}.0")))
    settings = BillingSettings(api_url=BASE, api_key=API_KEY, org_header="X-Org-Id", retry_backoff=0.001)
    client = LagoClient(settings, transport=lago)
    gate = QuotaGate(settings, client, config=QuotaConfig(), clock=clock.time)  # (Lago's clock: the emulator's)
    app = Starlette(routes=[Route("/ok", ok)])
    middleware = OrgBillingMiddleware(app, settings=settings, client=client, quota=gate)
    try:
        async with serving_lifespan(middleware):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
                statuses = [(await http.get("/ok", headers={"X-Org-Id": "org_1"})).status_code for _ in range(2)]
            assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
        await client.aclose()
    assert statuses == [200, 429]
    assert len(fake.events) == 3


# ------------------------------------------------------------------------------------- client: lists and pages


def invoice_pages(httpx_mock: HTTPXMock, meta: Callable[[int], Any]) -> None:
    """Three pages of two invoices; ``meta(page)`` is each page's ``meta``."""

    def answer(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        items = [{"lago_id": f"inv_{page}_{n}"} for n in range(2)] if page <= 3 else []
        return httpx.Response(200, json={"invoices": items, "meta": meta(page)})

    httpx_mock.add_callback(answer, url=re.compile(r".*/api/v1/invoices.*"), is_reusable=True)


@pytest.mark.parametrize("shape", [str, float], ids=["string", "float"])
async def test_next_page_as_a_string_or_float_is_followed(httpx_mock: HTTPXMock, shape: Callable[[int], Any]) -> None:
    """``next_page: "2"`` or ``2.0`` (and counts so written): every invoice is listed, not a LagoAPIError saying the
    listing loops."""

    def meta(page: int) -> dict[str, Any]:
        later = shape(page + 1) if page < 3 else None
        return {"current_page": shape(page), "next_page": later, "total_pages": shape(3), "total_count": shape(6)}

    invoice_pages(httpx_mock, meta)
    async with OrgBilling(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0)) as billing:
        invoices = await billing.get_invoices("org_1", limit=10)
        page = await billing.client.list_invoices(per_page=2)
    assert [invoice["lago_id"] for invoice in invoices] == [f"inv_{p}_{n}" for p in (1, 2, 3) for n in range(2)]
    assert (page.next_page, page.total_pages, page.total_count) == (2, 3, 6)


async def test_a_list_that_is_an_object_is_an_error_naming_the_key(httpx_mock: HTTPXMock) -> None:
    """``{"invoices": {...}}`` where a list is documented: a LagoAPIError naming ``invoices`` and what Lago sent, not
    the object's keys handed out as invoices."""
    httpx_mock.add_response(json={"invoices": {"lago_id": "inv_1"}, "meta": {}}, is_reusable=True)
    async with OrgBilling(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0)) as billing:
        with pytest.raises(LagoAPIError) as caught:
            await billing.get_invoices("org_1")
    assert "'invoices'" in str(caught.value) and "inv_1" in str(caught.value)


async def test_entitlements_as_an_object_from_their_endpoint_are_an_error_naming_the_key(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(json={"entitlements": {"api_quota": {"max_api_calls": 3}}})
    async with client_on(httpx.AsyncHTTPTransport()) as client:
        with pytest.raises(LagoAPIError) as caught:
            await client.get_subscription_entitlements("org_1")
    assert "'entitlements'" in str(caught.value) and "max_api_calls" in str(caught.value)


# ------------------------------------------------------------------------------------- client: bodies


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_an_event_answered_without_a_body_is_recorded(httpx_mock: HTTPXMock, status: int) -> None:
    """``POST /events`` answered 200/202/204 with no body (an older Lago's ``head :ok``, a gateway): Lago took it,
    so record_usage answers the event as sent instead of raising (a caller retrying would bill it twice on a Lago
    that keys events by timestamp too)."""
    httpx_mock.add_response(method="POST", status_code=status)
    async with OrgBilling(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0)) as billing:
        event = await billing.record_usage("org_1", "api_call", transaction_id="tx_1", properties={"tokens": 3})
    assert event["transaction_id"] == "tx_1" and event["properties"]["tokens"] == 3


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (httpx.Response(204), ["204", "no body"]),
        (httpx.Response(200, json=[{"external_id": "org_1"}]), ["200", "list"]),
        (httpx.Response(200, json={"subscription": None}), ["200", "'subscription'", "None"]),
    ],
    ids=["204-no-body", "json-array", "null-object"],
)
async def test_a_body_that_is_not_the_object_names_the_call_its_status_and_what_came(
    httpx_mock: HTTPXMock, answer: httpx.Response, said: list[str]
) -> None:
    httpx_mock.add_response(status_code=answer.status_code, content=answer.content)
    async with client_on(httpx.AsyncHTTPTransport()) as client:
        with pytest.raises(LagoAPIError) as caught:
            await client.get_subscription("org_1")
    text = str(caught.value)
    assert "GET /api/v1/subscriptions/org_1" in text and all(part in text for part in said), text
    assert caught.value.status == answer.status_code and caught.value.path == "/api/v1/subscriptions/org_1"
    assert "LAGO_API_URL" in text and API_KEY not in text


# ------------------------------------------------------------------------------------- billing: customer metadata


async def test_metadata_with_null_items_is_read(httpx_mock: HTTPXMock) -> None:
    """A customer's ``metadata`` holding a null item: the others are read (an org customer), not a TypeError."""
    customer = {
        "external_id": "org_1",
        "metadata": [None, {"lago_id": "m1", "key": "billing_type", "value": "organization"}],
    }
    httpx_mock.add_response(method="GET", json={"customer": customer})
    async with OrgBilling(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0)) as billing:
        assert await billing.is_org_customer("org_1")


async def test_metadata_as_an_object_is_read_and_kept_on_update(httpx_mock: HTTPXMock) -> None:
    """``metadata`` as an object (``{"billing_type": "organization"}``) rather than the list of items: read as such,
    and an update sends those keys again (an update without them deletes them in Lago)."""
    customer = {"external_id": "org_1", "metadata": {"billing_type": "organization", "created_by_user_id": "u_1"}}
    httpx_mock.add_response(method="GET", json={"customer": customer}, is_reusable=True)
    httpx_mock.add_response(method="POST", json={"customer": customer})
    async with OrgBilling(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0)) as billing:
        assert await billing.is_org_customer("org_1")
        await billing.update_org_customer("org_1", metadata={"team": "core"})
    sent = json.loads(httpx_mock.get_requests(method="POST")[0].content)["customer"]["metadata"]
    assert {item["key"]: item["value"] for item in sent} == {
        "billing_type": "organization",
        "created_by_user_id": "u_1",
        "team": "core",
    }


async def test_a_metadata_item_without_a_value_is_not_written_back_as_the_text_none(httpx_mock: HTTPXMock) -> None:
    """An item ``{"key": "note", "value": null}``: an update of other keys does not write ``"None"`` into it."""
    items = [
        {"lago_id": "m1", "key": "note", "value": None},
        {"lago_id": "m2", "key": "billing_type", "value": "organization"},
    ]
    httpx_mock.add_response(method="GET", json={"customer": {"external_id": "org_1", "metadata": items}})
    httpx_mock.add_response(method="POST", json={"customer": {"external_id": "org_1", "metadata": items}})
    async with OrgBilling(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0)) as billing:
        await billing.update_org_customer("org_1", metadata={"team": "core"})
    sent = json.loads(httpx_mock.get_requests(method="POST")[0].content)["customer"]["metadata"]
    assert "None" not in [item["value"] for item in sent]
    assert {item["key"]: item["value"] for item in sent} == {"billing_type": "organization", "team": "core"}
