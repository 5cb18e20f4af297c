"""Argument checks the constructors lacked, each a value taken that then meant something else, silently.

``OrgBillingMiddleware(pipeline=p, client=c)`` used ``p``'s client, never ``c`` (its transport, its key, its URL);
``idempotency_header="true"`` (or ``"None"``, ``"1"``, Django's ``HTTP_IDEMPOTENCY_KEY``) named a header no client
sends, so every client retry was billed again; ``BillingSettings(plan_limits={1: {...}})`` held a plan code no plan
has (Lago's codes are strings), so its limits never applied; ``EventPipeline(concurrency=10**30)`` was taken and
would start that many workers (and size the spool's window from it), and ``spool_window=10**30`` ended the background
delivery at its first load of the spool's backlog. Each is refused where it was written now, with a
``ConfigurationError`` naming the argument; what was right before is still taken.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from _lifespan import serving_lifespan
from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    EventPipeline,
    LagoClient,
    OrgBillingMiddleware,
    _delivery,
)
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

KEY = "test-key"


def _settings(**changes: Any) -> BillingSettings:
    return BillingSettings(api_key=KEY, api_url="http://lago.test", org_header="X-Org-Id", **changes)


def _lago() -> FakeLago:
    lago = FakeLago(api_key=KEY)
    lago.add_plan("starter", amount_cents=0)
    lago.add_subscription("org_a", "starter", external_id="org_a")
    return lago


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _app() -> Starlette:
    return Starlette(routes=[Route("/ok", _ok)])


# ------------------------------------------------------------------------------------------- client= with pipeline=


def test_a_client_given_with_a_pipeline_of_another_client_is_refused_naming_both() -> None:
    """A client given beside a pipeline is refused: the pipeline sends with its own client, and the gate asks that
    one too, so the given client (its key, its URL, its transport) went unused without a word."""
    lago = _lago()
    settings = _settings()
    pipeline = EventPipeline(LagoClient(settings, transport=lago.transport()))
    other = LagoClient(settings.replace(api_url="http://elsewhere.test"), transport=lago.transport())
    with pytest.raises(ConfigurationError) as caught:
        OrgBillingMiddleware(_app(), settings, pipeline=pipeline, client=other, quota=None)
    message = str(caught.value)
    assert "client=" in message and "pipeline=" in message, message


async def test_the_pipelines_own_client_given_beside_it_is_taken_and_bills() -> None:
    """The pipeline's own client given as client= too is taken (nothing goes unused): the org's request is billed
    once, through that client."""
    lago = _lago()
    settings = _settings()
    client = LagoClient(settings, transport=lago.transport())
    pipeline = EventPipeline(client, flush_interval=0.0)
    middleware = OrgBillingMiddleware(_app(), settings, pipeline=pipeline, client=client, quota=None)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http,
        serving_lifespan(middleware),
    ):
        answer = await http.get("/ok", headers={"X-Org-Id": "org_a"})
        await middleware.pipeline.flush(10)
    assert answer.status_code == 200
    assert [event["external_subscription_id"] for event in lago.events] == ["org_a"]
    await pipeline.aclose()


# ------------------------------------------------------------------------------------------- idempotency_header=


@pytest.mark.parametrize(
    "header", ["true", "True", "false", "1", "0", "yes", "on", "OFF", "enabled", "None", "none", "null", "NULL"]
)
def test_an_idempotency_header_set_like_a_switch_or_a_null_is_refused(header: str) -> None:
    """idempotency_header="true" (a switch read from the environment, meant "on") or "None" (str(None)) named a
    header no client sends: idempotency silently off, each client retry billed again."""
    with pytest.raises(ConfigurationError) as caught:
        OrgBillingMiddleware(_app(), _settings(), idempotency_header=header, transport=_lago().transport(), quota=None)
    message = str(caught.value)
    assert "idempotency_header" in message and "Idempotency-Key" in message and repr(header) in message, message


@pytest.mark.parametrize("header", ["HTTP_IDEMPOTENCY_KEY", "http_idempotency_key"])
def test_an_idempotency_header_given_by_its_wsgi_name_is_refused(header: str) -> None:
    """Django's HTTP_IDEMPOTENCY_KEY is not what clients send (as LAGO_ORG_HEADER refuses it): every retry billed."""
    with pytest.raises(ConfigurationError) as caught:
        OrgBillingMiddleware(_app(), _settings(), idempotency_header=header, transport=_lago().transport(), quota=None)
    assert "idempotency_header" in str(caught.value) and "Idempotency-Key" in str(caught.value)


@pytest.mark.parametrize("header", ["", "  "])
def test_an_empty_idempotency_header_is_refused(header: str) -> None:
    """An empty idempotency_header (an unset variable read as "") is refused, not taken as off."""
    with pytest.raises(ConfigurationError, match="idempotency_header"):
        OrgBillingMiddleware(_app(), _settings(), idempotency_header=header, transport=_lago().transport(), quota=None)


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Nonce", "Nonexistent-Key", "X-True-Key", "K"])
async def test_real_idempotency_headers_still_make_a_retry_billed_once(header: str) -> None:
    """Header names that merely start like a switch word (or is one letter) are still taken: a client's retry with
    the same key is billed once."""
    lago = _lago()
    middleware = OrgBillingMiddleware(
        _app(), _settings(), idempotency_header=header, transport=lago.transport(), quota=None
    )
    sent = {"X-Org-Id": "org_a", header: "key-1"}
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http,
        serving_lifespan(middleware),
    ):
        assert (await http.get("/ok", headers=sent)).status_code == 200
        assert (await http.get("/ok", headers=sent)).status_code == 200
        await middleware.pipeline.flush(10)
    assert len({event["transaction_id"] for event in lago.events}) == 1, lago.events


# ------------------------------------------------------------------------------------------- plan_limits keys


@pytest.mark.parametrize(
    ("limits", "shown"),
    [
        ({1: {"max_api_calls": 5}}, "1"),
        ({"starter": {"max_api_calls": 5}, None: {"max_api_calls": 1}}, "None"),
        ({b"starter": {"max_api_calls": 5}}, "b'starter'"),
        ({"starter": {1: 5}}, "1"),
        ({"starter": {("max_api_calls",): 5}}, "('max_api_calls',)"),
    ],
)
def test_plan_limits_with_a_key_that_is_no_string_are_refused_naming_it(limits: Any, shown: str) -> None:
    """BillingSettings(plan_limits={1: {...}}) was taken: Lago's plan codes (and the limits' names) are strings, so
    an int key never matched and the plan's fallback limits never applied."""
    with pytest.raises(ConfigurationError) as caught:
        _settings(plan_limits=limits)
    assert caught.value.variable == "LAGO_PLAN_LIMITS"
    assert shown in str(caught.value) and "string" in str(caught.value), str(caught.value)


def test_plan_limits_with_string_keys_are_still_taken() -> None:
    """String plan codes and limit names are taken as given (a whole float read as an int, as before)."""
    settings = _settings(plan_limits={"starter": {"max_api_calls": 5.0}, "pro": {}})
    assert settings.plan_limits == {"starter": {"max_api_calls": 5}, "pro": {}}
    assert settings.replace(api_timeout=3).plan_limits == settings.plan_limits


# ------------------------------------------------------------------------------------------- concurrency=


@pytest.mark.parametrize("concurrency", [10**30, 10**6, "the maximum + 1"])
def test_a_pipeline_concurrency_past_the_maximum_is_refused(concurrency: int | str) -> None:
    """EventPipeline(concurrency=10**30) was taken: it would start that many worker tasks, and with a spool size its
    window of rows from it (past what SQLite can bind)."""
    maximum = _delivery.MAX_CONCURRENCY
    client = LagoClient(_settings(), transport=_lago().transport())
    with pytest.raises(ConfigurationError) as caught:
        EventPipeline(client, concurrency=maximum + 1 if isinstance(concurrency, str) else concurrency)
    assert "concurrency" in str(caught.value) and str(maximum) in str(caught.value), str(caught.value)


async def test_a_pipeline_at_the_maximum_concurrency_delivers() -> None:
    """The maximum itself is taken and delivers."""
    lago = _lago()
    pipeline = EventPipeline(LagoClient(_settings(), transport=lago.transport()), concurrency=_delivery.MAX_CONCURRENCY)
    async with pipeline:
        pipeline.submit(
            {"transaction_id": "tx-1", "external_subscription_id": "org_a", "code": "api_call", "properties": {}}
        )
        await pipeline.flush(10)
    assert [event["transaction_id"] for event in lago.events] == ["tx-1"]


def test_a_spool_window_past_what_sqlite_can_count_is_refused(tmp_path: Any) -> None:
    """EventPipeline(spool_window=10**30) was taken: the first load of a backlog from the spool bound it as SQLite's
    LIMIT and raised OverflowError, ending the background delivery (the events left in the file)."""
    client = LagoClient(_settings(), transport=_lago().transport())
    with pytest.raises(ConfigurationError, match=r"spool_window"):
        EventPipeline(client, spool_path=str(tmp_path / "spool.db"), spool_window=10**30)
    assert EventPipeline(client, spool_path=str(tmp_path / "spool.db"), spool_window=2**63 - 1).outbox is not None
