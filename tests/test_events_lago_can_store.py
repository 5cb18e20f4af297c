"""Event content: what the package puts in an event against what Lago stores and bills.

Lago's Postgres event store cannot hold a NUL character: ``transaction_id``, ``code`` and
``external_subscription_id`` are ``text`` columns (the ``pg`` driver raises "string contains null byte") and
``properties`` is ``jsonb`` (``\\u0000`` is "unsupported Unicode escape sequence"). Neither error is rescued by
``Events::CreateService``: Lago answers 500, which this package retries (and then dead-letters) instead of telling
the caller. A lone surrogate cannot be encoded at all. ``precise_total_amount_cents`` goes into a ``decimal`` column
through Rails' cast, which turns ``"12,5"`` into 12 and ``"abc"`` into 0 without a word.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    InvalidRequestError,
    LagoClient,
    OrgBilling,
    OrgBillingMiddleware,
)
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload, normalize_event
from lago_org_billing._ids import format_timestamp
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "review-event-content-key"
ADMIN = {"X-Admin-Of": "org_acme"}
URL = "/billing/organizations/org_acme/usage/record"
IDS: dict[str, Any] = {"transaction_id": "tx_1", "external_subscription_id": "org_a", "code": "api_call"}


def _lago() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", amount_cents=0)
    fake.add_subscription("org_acme", "starter", external_id="org_acme")
    fake.add_subscription("org_a", "starter", external_id="org_a")
    return fake


def _settings(fake: FakeLago, **kwargs: Any) -> BillingSettings:
    return BillingSettings(api_url=fake.base_url, api_key=API_KEY, retry_backoff=0.001, max_retries=0, **kwargs)


# ------------------------------------------------------------------------------------------- NUL and surrogates


@pytest.mark.parametrize("field", ["transaction_id", "external_subscription_id", "code"])
@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800b"])
def test_an_id_lago_cannot_store_is_refused_with_a_clear_error(field: str, bad: str) -> None:
    """A NUL (Postgres text refuses it: Lago answers 500, retried in vain) or a lone surrogate (no UTF-8: a raw
    UnicodeEncodeError from httpx) in an event's ids is an InvalidRequestError naming the field."""
    with pytest.raises(InvalidRequestError, match=field):
        event_payload(**{**IDS, field: bad})


@pytest.mark.parametrize(
    "properties",
    [{"model": "gpt\x00-4o"}, {"k\x00": 1}, {"nested": {"list": ["\x00"]}}],
    ids=["value", "key", "nested"],
)
def test_a_nul_in_properties_is_refused(properties: dict[str, Any]) -> None:
    """Lago's jsonb column refuses \\u0000 anywhere in the document (a 500): refused before sending."""
    with pytest.raises(InvalidRequestError, match="NUL"):
        event_payload(**IDS, properties=properties)


def test_text_that_only_looks_like_an_escaped_nul_is_kept() -> None:
    """A backslash followed by 'u0000' is ordinary text (JSON escapes it as \\\\u0000), not a NUL."""
    event = event_payload(**IDS, properties={"note": "\\u0000 and \\\\u0000", "ok": "tab\there"})
    assert event["properties"]["note"] == "\\u0000 and \\\\u0000"


def test_a_blank_padded_subscription_id_is_refused() -> None:
    """Lago strips subscriptions' external ids when it creates them, so an event for ' org_a ' never bills."""
    with pytest.raises(InvalidRequestError, match="external_subscription_id"):
        normalize_event({**IDS, "external_subscription_id": " org_a "})


async def test_record_usage_refuses_a_surrogate_transaction_id_before_sending() -> None:
    """OrgBilling.record_usage: an InvalidRequestError, not httpx's UnicodeEncodeError; Lago is not asked."""
    fake = _lago()
    async with OrgBilling(_settings(fake), transport=fake.transport()) as billing:
        with pytest.raises(InvalidRequestError, match="transaction_id"):
            await billing.record_usage("org_a", "api_call", "tx_\ud800", {})
        with pytest.raises(InvalidRequestError, match="transaction_id"):
            await billing.record_api_call("org_a", "tx_\x00", tokens=3)
    assert fake.events == []


async def test_record_usage_nowait_refuses_at_the_call_not_in_the_dead_letters() -> None:
    """The _nowait variants raise at once: not a transaction id handed back for an event that can never land."""
    fake = _lago()
    async with LagoClient(_settings(fake), transport=fake.transport()) as client:
        pipeline = EventPipeline(client)
        billing = OrgBilling(client=client, pipeline=pipeline)
        with pytest.raises(InvalidRequestError, match="transaction_id"):
            billing.record_usage_nowait("org_a", "api_call", "tx_\x00")
        with pytest.raises(InvalidRequestError, match="NUL"):
            billing.record_api_call_nowait("org_a", "tx_2", model="gpt\x00")
        assert pipeline.metrics.recorded == 0


@pytest.fixture
async def routes_client() -> AsyncIterator[tuple[FakeLago, httpx.AsyncClient]]:
    fake = _lago()

    def admin_of(request: Request, org_id: str) -> bool:
        return org_id in request.headers.get("x-admin-of", "").split(",")

    async with LagoClient(_settings(fake), transport=fake.transport()) as lago:
        app = Starlette(routes=[Mount("/billing", app=billing_routes(OrgBilling(client=lago), authorize=admin_of))])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            yield fake, client


@pytest.mark.parametrize(
    "body",
    [
        b'{"transaction_id": "tx_\\u0000"}',
        b'{"transaction_id": "tx_\\ud800"}',
        b'{"properties": {"region": "eu\\u0000"}}',
        b'{"model": "gpt\\u0000"}',
    ],
    ids=["nul-id", "surrogate-id", "nul-property", "nul-model"],
)
async def test_usage_record_answers_422_for_values_lago_cannot_store(
    routes_client: tuple[FakeLago, httpx.AsyncClient], body: bytes
) -> None:
    """POST .../usage/record: a 422 naming the problem, not a 500 (surrogate) or a 201/503 for an event Lago's
    Postgres refuses with a 500 (and a '503: retry with this transaction_id' that can never succeed)."""
    fake, client = routes_client
    headers = {**ADMIN, "Content-Type": "application/json"}
    response = await client.post(URL, content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert fake.events == []


async def test_an_event_properties_hook_giving_a_nul_bills_the_request_without_them(fake_lago: Any) -> None:
    """The middleware's hook is the app's code: an event carrying its NUL would fail in Lago (a 500, then the dead
    letters: the request unbilled); it is billed without the hook's properties, as for any invalid ones."""
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", quota_mode="off"
    )

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"model": "gpt-4o", "usage": {"prompt_tokens": 3, "completion_tokens": 4}})

    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/chat", chat)]),
        settings=settings,
        transport=fake_lago.transport(),
        event_properties=lambda scope, identity: {"tenant": "t\x00"},
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            assert (await client.get("/chat", headers={"X-Org-Id": "org_a"})).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert "\x00" not in json.dumps(event, ensure_ascii=False) and "\\u0000" not in json.dumps(event)
    assert event["properties"]["total_tokens"] == 7 and "tenant" not in event["properties"]
    assert middleware.stats["event_properties_errors"] == 1


# ------------------------------------------------------------------------------------------------ long ids


@pytest.mark.parametrize("transaction_id", ["t" * 1025, "\u00e9" * 513, "\U0001f600" * 257])
def test_a_transaction_id_over_lagos_index_limit_is_refused(transaction_id: str) -> None:
    """Postgres' btree index (organization_id, external_subscription_id, transaction_id) takes at most 2,704 bytes
    a row: a longer id is a 500 (retried, then dead-lettered). Capped at 1,024 bytes of UTF-8, said plainly."""
    with pytest.raises(InvalidRequestError, match="1024 bytes"):
        event_payload(**{**IDS, "transaction_id": transaction_id})


def test_a_long_transaction_id_within_the_limit_is_kept() -> None:
    transaction_id = "t" * 1024
    assert event_payload(**{**IDS, "transaction_id": transaction_id})["transaction_id"] == transaction_id


# -------------------------------------------------------------------------------- precise_total_amount_cents


@pytest.mark.parametrize("value", ["12,5", "abc", "", " ", True, float("nan"), Decimal("NaN"), "Infinity", "1e400000"])
def test_a_precise_total_amount_lago_would_cast_to_zero_is_refused(value: Any) -> None:
    """Rails casts a decimal column with String#to_d: '12,5' is billed 12 and 'abc' 0, silently; NaN and
    Infinity are no amounts either. Refused."""
    with pytest.raises(InvalidRequestError, match="precise_total_amount_cents"):
        normalize_event({**IDS, "precise_total_amount_cents": value})


@pytest.mark.parametrize(
    ("value", "sent"),
    [("1234.56", "1234.56"), (" 12.5 ", "12.5"), (Decimal("1E+3"), "1000"), (12, "12"), (0.5, "0.5"), ("-3", "-3")],
)
def test_a_precise_total_amount_goes_out_as_a_plain_decimal_string(value: Any, sent: str) -> None:
    assert normalize_event({**IDS, "precise_total_amount_cents": value})["precise_total_amount_cents"] == sent


# ------------------------------------------------------------------------------------------------ timestamps


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=dt.timezone.utc),  # was sent as "-1.500" (-1.5 s)
        dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc),
        dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc),  # past the 10**11 s that numbers are held to
    ],
)
def test_datetimes_are_held_to_the_range_numbers_are(value: dt.datetime) -> None:
    """A number below 0 or above 10**11 s is refused; a datetime there was sent (and one before 1970 wrongly:
    23:59:59.5 on 31 Dec 1969 went out as -1.500 s instead of -0.500 s)."""
    with pytest.raises(InvalidRequestError, match="timestamp"):
        format_timestamp(value)


def test_datetimes_in_range_keep_their_milliseconds() -> None:
    stamp = dt.datetime(2026, 3, 1, 5, 0, 0, 999_999, tzinfo=dt.timezone(dt.timedelta(hours=5)))
    assert format_timestamp(stamp) == "1772323200.999"
    assert format_timestamp(dt.datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=dt.timezone.utc)) == "0.001"


# ------------------------------------------------------------------------ defects in files not owned here


def test_a_subscription_id_template_no_lago_path_can_take_is_refused_at_startup() -> None:
    """LAGO_SUBSCRIPTION_ID_TEMPLATE='{org_id}.main' is accepted, then every request of every org is a 402 (the
    gate cannot address 'org_a.main'), with a warning blaming the org ids, and OrgBilling.record_usage raises."""
    with pytest.raises(ConfigurationError, match="LAGO_SUBSCRIPTION_ID_TEMPLATE"):
        BillingSettings(api_url="http://127.0.0.1:9", api_key="k", subscription_id_template="{org_id}.main")


async def test_an_empty_transaction_id_is_refused_not_replaced() -> None:
    """record_usage(transaction_id='') (an unset header read as '') sends a fresh random id each call: the caller's
    retries are billed again. None asks for a generated id; '' is a mistake."""
    fake = _lago()
    async with OrgBilling(_settings(fake), transport=fake.transport()) as billing:
        with pytest.raises(InvalidRequestError, match="transaction_id"):
            await billing.record_usage("org_a", "api_call", "", {})
