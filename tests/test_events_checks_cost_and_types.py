"""The event content checks (NUL, surrogates, id sizes, amounts, timestamps, subscription id templates), checked
again: what they cost per event, what legitimate values they refuse, and what a refusal loses."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, InvalidRequestError, OrgBillingMiddleware, _events
from lago_org_billing._events import event_payload, normalize_event

pytestmark = pytest.mark.anyio

IDS: dict[str, Any] = {"transaction_id": "tx_1", "external_subscription_id": "org_a", "code": "api_call"}


# ------------------------------------------------------------------------------------- no false refusals


@pytest.mark.parametrize(
    "properties",
    [
        {"model": "Qwen2.5-72B-Instruct \u2014 \u4e2d\u6587", "user_id": "\U0001f469\u200d\U0001f4bb ada"},
        {"prompt": 'Answer the user\'s "question".\n' * 2000},
        {"tokens": "1500", "ratio": "0.25", "big": 10**30},
        {"tags": [["a", 1], {"b": [None, True, 1.5]}], "pair": (1, 2)},
        {"code": "print('\\u0000')", "tail": "x\\", "next": "u0000"},  # text that only looks like an escaped NUL
    ],
    ids=["unicode", "long-prompt", "numbers-as-text", "nested", "escaped-nul-lookalike"],
)
def test_legitimate_property_values_are_kept_as_given(properties: dict[str, Any]) -> None:
    event = event_payload(**IDS, properties=properties)
    assert json.loads(json.dumps(event["properties"])) == json.loads(json.dumps(properties))


@pytest.mark.parametrize(
    ("value", "sent"),
    [(Decimal("0.0042"), "0.0042"), (Decimal("1E+3"), "1000"), (Decimal("-2.50"), "-2.50"), (Decimal(7), "7")],
)
def test_a_decimal_property_is_sent_exactly_not_refused(value: Decimal, sent: str) -> None:
    """Money comes as Decimal (SQLAlchemy Numeric, pydantic condecimal): it was refused ("not JSON serializable"),
    and an event_properties hook giving one lost all its properties. Sent as its exact decimal text, which Lago
    aggregates as the number (``properties->>'field'`` cast to numeric), at any depth."""
    event = event_payload(**IDS, properties={"cost": value, "lines": [{"cost": value}]})
    assert event["properties"] == {"cost": sent, "lines": [{"cost": sent}]}
    assert json.loads(json.dumps(event))["properties"]["cost"] == sent  # what the pipeline encodes later


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("-Infinity"), Decimal("sNaN")])
def test_a_decimal_property_that_is_no_number_is_still_refused(value: Decimal) -> None:
    with pytest.raises(InvalidRequestError, match="cost"):
        event_payload(**IDS, properties={"cost": value})
    with pytest.raises(InvalidRequestError, match=r"'nested\[0\]' is Decimal"):
        event_payload(**IDS, properties={"nested": [value]})


def test_other_values_json_cannot_carry_are_still_refused() -> None:
    with pytest.raises(InvalidRequestError, match="JSON-serialisable"):
        event_payload(**IDS, properties={"when": object()})


async def test_an_event_properties_hook_giving_a_decimal_keeps_its_properties(fake_lago: Any) -> None:
    """The hook's cost (a Decimal read from the app's database) reaches Lago and is summed there; before, the event
    went out without any of the hook's properties (logged once, then every 1000th)."""
    fake_lago.add_billable_metric("cost_cents", aggregation_type="sum_agg", field_name="cost")
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
        event_properties=lambda scope, identity: {"cost": Decimal("0.0042"), "team": "search"},
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            assert (await client.get("/chat", headers={"X-Org-Id": "org_a"})).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert event["properties"]["cost"] == "0.0042" and event["properties"]["team"] == "search"
    assert event["properties"]["total_tokens"] == 7
    assert middleware.stats.get("event_properties_errors", 0) == 0


def test_deeply_nested_properties_are_an_invalid_request_not_a_recursion_error() -> None:
    """A RecursionError from the JSON encoder escaped as such: record_usage raised a non-InvalidRequestError, and
    an event_properties hook's document lost the request's whole event (dead-lettered) instead of its properties."""
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidRequestError, match="nested"):
        event_payload(**IDS, properties={"doc": deep})


# ------------------------------------------------------------------------------ subscription id templates


@pytest.mark.parametrize("template", ["org {org_id}", "{org_id} main", "acme main {org_id} eu"])
def test_a_template_with_blanks_inside_the_id_is_accepted(template: str) -> None:
    """The subscription id 'org acme' has no blank around it (Lago strips only the ends, and validate_id takes it);
    the check refused any blank at either end of the template's text *parts*: a ConfigurationError at startup."""
    settings = BillingSettings(api_url="http://127.0.0.1:9", api_key="k", subscription_id_template=template)
    assert settings.subscription_id_for("acme") == template.format(org_id="acme")


@pytest.mark.parametrize("template", [" {org_id}", "{org_id} ", "\u00a0sub_{org_id}", "{org_id}_main\u3000"])
def test_a_template_whose_ids_end_in_blanks_is_still_refused(template: str) -> None:
    with pytest.raises(ConfigurationError, match="blanks"):
        BillingSettings(api_url="http://127.0.0.1:9", api_key="k", subscription_id_template=template)


# ------------------------------------------------------------------------------------------------- cost


def test_plain_ascii_ids_take_the_cheap_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooked middleware event, record_usage and every event of the client go through these checks: ids of
    plain ASCII within the size are checked together in one pass, the per-id checks (a call each) only for what
    might be wrong (they cost ~0.2 µs an event, about as much as the whole check did before)."""
    calls: list[str] = []
    checked = _events._check_id

    def spy(name: str, value: object) -> None:
        calls.append(name)
        checked(name, value)

    monkeypatch.setattr(_events, "_check_id", spy)
    event_payload(transaction_id="req_" + "0" * 32, external_subscription_id="org_a", code="api_call")
    normalize_event({**IDS, "properties": {"k": "v"}})
    assert calls == []
    event_payload(transaction_id="tx_\u00e9", external_subscription_id="org_a", code="api_call")  # not ASCII: each
    assert calls == ["transaction_id", "external_subscription_id", "code"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"transaction_id": ""}, "transaction_id"),
        ({"transaction_id": " "}, "transaction_id"),
        ({"code": "\t"}, "code"),
        ({"external_subscription_id": ""}, "external_subscription_id"),
        ({"external_subscription_id": "org_a "}, "blanks"),
        ({"external_subscription_id": "\norg_a"}, "blanks"),
        ({"code": None}, "code"),
        ({"transaction_id": 12}, "transaction_id"),
        ({"code": "api\x00call"}, "NUL"),
        ({"transaction_id": "t" * 1025}, "1024 bytes"),
        ({"transaction_id": "\u00e9" * 513}, "1024 bytes"),
        ({"code": "a\ud800"}, "surrogate"),
    ],
)
def test_the_cheap_path_refuses_what_the_per_id_checks_refuse(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        event_payload(**{**IDS, **changes})


@pytest.mark.parametrize(
    "ids",
    [
        {"transaction_id": "t" * 1024, "external_subscription_id": "s" * 1024, "code": "c" * 1024},
        {"transaction_id": " tx", "external_subscription_id": "org \u00e9", "code": "api_call"},
    ],
)
def test_the_cheap_path_keeps_what_the_per_id_checks_keep(ids: dict[str, Any]) -> None:
    assert {key: event_payload(**ids)[key] for key in ids} == ids


# ------------------------------------------------------------------------------ a refusal loses nothing


async def test_an_event_refused_when_built_is_dead_lettered_with_the_reason_and_the_request_served(
    fake_lago: Any,
) -> None:
    """An org id of 255 four-byte characters (printable: a valid org id) under '{org_id}-main' makes a subscription id
    of 1,025 bytes: the hooked event (checked by event_payload) is refused in the background, off the request's
    path. The request is answered; the event is kept in the dead letters with why, not dropped."""
    org_id = "\U0001f600" * 255
    settings = BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        quota_mode="off",
        subscription_id_template="{org_id}-main",
    )

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/chat", chat)]),
        settings=settings,
        transport=fake_lago.transport(),
        event_properties=lambda scope, identity: {"team": "search"},
    )

    async def with_org(scope: Any, receive: Any, send: Any) -> None:  # (the app's auth: request.state.org_id)
        scope.setdefault("state", {})["org_id"] = org_id
        await middleware(scope, receive, send)

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_org), base_url="http://t") as client:
            assert (await client.get("/chat")).status_code == 200
        assert await middleware.pipeline.flush(5)
        [letter] = middleware.pipeline.dead_letters()
    finally:
        await middleware.aclose()
    assert "1024 bytes" in letter.reason and "external_subscription_id" in letter.reason
    assert fake_lago.events == []
    assert middleware.stats["event_errors"] == 1
