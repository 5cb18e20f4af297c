"""Retry safety of LagoClient's and OrgBilling's writes when Lago may have applied a request whose answer was lost.

Covers: an event (``POST /events``) or a batch (``POST /events/batch``) ingested by a first attempt whose answer was
lost (a proxy's 502, a read timeout, a connection reset): the client's own resend is answered
``422 transaction_id value_already_exist`` by Lago's Postgres store, which the client raised as an error (and
``OrgBilling.record_usage`` then left the event out of the quota gate's count); a subscription made with
``plan_overrides`` (not resent by the client) whose answer was lost: the call raised "retry later", and the re-run it
advised replaced the new subscription (terminated and invoiced); a 429 (or 503) asking to wait longer than
``LAGO_RETRY_DEADLINE`` or than the caller's own deadline (an ``anyio.fail_after`` around the call): the error did not
say why it was not retried, or the client slept past the caller's deadline; resends carry byte-identical bodies.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import (
    BillingSettings,
    LagoClient,
    LagoRateLimitError,
    LagoUnavailableError,
    OrgBilling,
)
from lago_org_billing._gate import QuotaDecision

pytestmark = pytest.mark.anyio

#: how an answer is lost after Lago applied the request
LOSSES = ["502", "504", "read-timeout", "reset"]


class _LoseAnswers(httpx.AsyncBaseTransport):
    """Lets Lago (the emulator) apply every request, then loses the answer of the first ``count`` that ``match``:
    a proxy's 502/504, a read timeout, or a connection reset mid-answer. Records the bodies of the matching ones."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, match: Callable[[httpx.Request], bool], how: str, count: int = 1
    ) -> None:
        self.inner = inner
        self.match = match
        self.how = how
        self.left = count
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        response = await self.inner.handle_async_request(request)
        if not self.match(request):
            return response
        self.bodies.append(body)
        await response.aread()
        if self.left <= 0:
            return response
        self.left -= 1
        if self.how == "read-timeout":
            raise httpx.ReadTimeout("timed out reading the answer", request=request)
        if self.how == "reset":
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        return httpx.Response(int(self.how), text="<html>Bad Gateway</html>", headers={"content-type": "text/html"})


def _posts(path: str) -> Callable[[httpx.Request], bool]:
    return lambda request: request.method == "POST" and request.url.path == f"/api/v1{path}"


def _settings(fake_lago: Any, **changes: Any) -> BillingSettings:
    values: dict[str, Any] = {"api_url": fake_lago.base_url, "api_key": fake_lago.api_key, "retry_backoff": 0.001}
    values.update(changes)
    return BillingSettings(**values)


def _event(transaction_id: str) -> dict[str, Any]:
    return {
        "transaction_id": transaction_id,
        "external_subscription_id": "org_1",
        "code": "api_call",
        "timestamp": "1767225600.5",
        "properties": {"tokens": 12},
    }


# ------------------------------------------------------------------------------------------------------- events


@pytest.mark.parametrize("how", LOSSES)
async def test_an_event_ingested_behind_a_lost_answer_is_not_an_error(fake_lago: Any, how: str) -> None:
    """The client resends the event (same bytes): Lago answers that it has it, which is this call's success."""
    lose = _LoseAnswers(fake_lago.transport(), _posts("/events"), how)
    async with LagoClient(_settings(fake_lago), transport=lose) as lago:
        created = await lago.create_event(_event("tx_1"))
    assert created["transaction_id"] == "tx_1" and created["duplicate"] is True
    assert len(lose.bodies) == 2 and lose.bodies[0] == lose.bodies[1]
    assert [event["transaction_id"] for event in fake_lago.events] == ["tx_1"]


async def test_an_event_sent_again_by_the_caller_is_still_said_to_be_in_lago(fake_lago: Any) -> None:
    """Only the client's own resend is taken as success: a caller sending an ingested event again is told (as
    before), since nothing of this call reached Lago first."""
    from lago_org_billing import LagoValidationError

    async with LagoClient(_settings(fake_lago), transport=fake_lago.transport()) as lago:
        await lago.create_event(_event("tx_1"))
        with pytest.raises(LagoValidationError) as info:
            await lago.create_event(_event("tx_1"))
    assert info.value.is_duplicate_only


async def test_an_event_resent_after_a_429_was_not_applied_before(httpx_mock: HTTPXMock, waits: list[float]) -> None:
    """A 429 means Lago processed nothing: a duplicate answered to the resend is an earlier call's event, as if the
    caller had sent it again (raised)."""
    from lago_org_billing import LagoValidationError

    url = "http://lago.test/api/v1/events"
    httpx_mock.add_response(url=url, status_code=429, headers={"X-RateLimit-Reset": "0"})
    duplicate = {
        "status": 422,
        "code": "validation_errors",
        "error_details": {"transaction_id": ["value_already_exist"]},
    }
    httpx_mock.add_response(url=url, status_code=422, json=duplicate)
    async with LagoClient(BillingSettings(api_key="k", api_url="http://lago.test", retry_backoff=0.001)) as lago:
        with pytest.raises(LagoValidationError):
            await lago.create_event(_event("tx_1"))


@pytest.mark.parametrize("how", ["502", "read-timeout"])
async def test_a_batch_ingested_behind_a_lost_answer_is_not_an_error(fake_lago: Any, how: str) -> None:
    lose = _LoseAnswers(fake_lago.transport(), _posts("/events/batch"), how)
    async with LagoClient(_settings(fake_lago), transport=lose) as lago:
        created = await lago.create_events([_event("tx_1"), _event("tx_2")])
    assert [event["transaction_id"] for event in created] == ["tx_1", "tx_2"]
    assert all(event["duplicate"] is True for event in created)
    assert len(lose.bodies) == 2 and lose.bodies[0] == lose.bodies[1]
    assert sorted(event["transaction_id"] for event in fake_lago.events) == ["tx_1", "tx_2"]


async def test_record_usage_behind_a_lost_answer_is_counted_in_the_gate(fake_lago: Any) -> None:
    """OrgBilling.record_usage took the resend's 422 for an event recorded before: the quota gate never counted the
    call this record_usage made, and the org could exceed its limit until the gate's next snapshot."""
    settled: list[tuple[str, int, bool]] = []

    class Gate:
        token_metric = "tokens"

        def settle(self, org_id: str, decision: QuotaDecision, *, tokens: int = 0, billed: bool = True) -> None:
            settled.append((org_id, tokens, billed))

    settings = _settings(fake_lago)
    lose = _LoseAnswers(fake_lago.transport(), _posts("/events"), "502")
    async with OrgBilling(settings, client=LagoClient(settings, transport=lose), quota=Gate()) as billing:  # type: ignore[arg-type]
        answer = await billing.record_api_call("org_1", transaction_id="tx_1")
    assert answer["transaction_id"] == "tx_1"
    assert settled == [("org_1", 0, True)]
    assert len(fake_lago.events) == 1


# ------------------------------------------------------------------------------- customers and subscriptions


@pytest.mark.parametrize("how", LOSSES)
async def test_subscribe_converges_behind_lost_answers(fake_lago: Any, how: str) -> None:
    """The customer upsert and the subscription create are resent by the client (same bytes) and converge: one
    customer with its metadata, one active subscription, no invoice."""
    fake_lago.add_plan("starter", amount_cents=1000)
    settings = _settings(fake_lago)
    customers = _LoseAnswers(fake_lago.transport(), _posts("/customers"), how)
    lose = _LoseAnswers(customers, _posts("/subscriptions"), how)
    async with OrgBilling(settings, client=LagoClient(settings, transport=lose)) as billing:
        done = await billing.subscribe_org_to_plan("org_1", "starter", "Acme", "billing@acme.test", user_id="u_1")
    assert done["subscription"]["status"] == "active"
    assert sorted(item["key"] for item in done["customer"]["metadata"]) == ["billing_type", "created_by_user_id"]
    assert len(fake_lago.customers) == 1
    assert [s["status"] for s in fake_lago.subscriptions] == ["active"]
    assert fake_lago.invoices == []
    for bodies in (customers.bodies[:2], lose.bodies):
        assert len(bodies) == 2 and bodies[0] == bodies[1]


@pytest.mark.parametrize("how", LOSSES)
@pytest.mark.parametrize("discount", [500, 1500])
async def test_a_subscription_with_plan_overrides_made_behind_a_lost_answer_is_returned(
    fake_lago: Any, how: str, discount: int
) -> None:
    """The client does not resend a create with plan_overrides (Lago would read it as a plan change). The call raised
    "retry later", and the re-run it advised replaced the negotiated subscription just made: terminated and invoiced
    (a cheaper override), or a downgrade scheduled (a dearer one). It now reads back what Lago made."""
    fake_lago.add_plan("starter", amount_cents=1000)
    settings = _settings(fake_lago)
    lose = _LoseAnswers(fake_lago.transport(), _posts("/subscriptions"), how)
    async with OrgBilling(settings, client=LagoClient(settings, transport=lose)) as billing:
        done = await billing.subscribe_org_to_plan(
            "org_1", "starter", "Acme", plan_overrides={"amount_cents": discount}
        )
        assert done["subscription"]["status"] == "active" and done["subscription"]["plan_code"] == "starter"
        assert len(lose.bodies) == 1
        again = await billing.subscribe_org_to_plan("org_1", "starter", "Acme")  # (a re-run converges too)
    assert again["subscription"]["lago_id"] == done["subscription"]["lago_id"]
    assert [s["status"] for s in fake_lago.subscriptions] == ["active"]
    assert fake_lago.invoices == []


@pytest.mark.parametrize(("first", "then"), [("starter", "pro"), ("pro", "starter")])
async def test_a_plan_change_with_overrides_behind_a_lost_answer_is_returned(
    fake_lago: Any, first: str, then: str
) -> None:
    """An org moved to another plan at a negotiated price, the answer lost: the upgrade Lago made (a new subscription)
    or the downgrade it scheduled (``next_plan_code``) is read back rather than "retry later" raised."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_plan("pro", amount_cents=5000)
    settings = _settings(fake_lago)
    lose = _LoseAnswers(fake_lago.transport(), _posts("/subscriptions"), "502", count=0)
    async with OrgBilling(settings, client=LagoClient(settings, transport=lose)) as billing:
        subscribed = await billing.subscribe_org_to_plan("org_1", first, "Acme")
        lose.left = 1
        changed = await billing.create_subscription("org_1", then, plan_overrides={"amount_cents": 4000})
    if then == "pro":  # an upgrade: a new subscription at once
        assert changed["plan_code"] == "pro" and changed["lago_id"] != subscribed["subscription"]["lago_id"]
    else:  # a downgrade: the current one, the change scheduled
        assert changed["lago_id"] == subscribed["subscription"]["lago_id"] and changed["next_plan_code"] == "starter"
    assert len(lose.bodies) == 2  # (the subscribe's, then this one's: not resent)


class _Refuse(httpx.AsyncBaseTransport):
    """Answers the requests that ``match`` with a 503 without passing them on (Lago never saw them)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, match: Callable[[httpx.Request], bool]) -> None:
        self.inner = inner
        self.match = match

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.match(request):
            return httpx.Response(503, json={"status": 503, "error": "Service Unavailable"})
        return await self.inner.handle_async_request(request)


async def test_a_create_with_overrides_lago_did_not_apply_still_raises(fake_lago: Any) -> None:
    """Nothing made (the create never reached Lago): the read-back finds nothing new and the error stands."""
    fake_lago.add_plan("starter", amount_cents=1000)
    settings = _settings(fake_lago)
    refuse = _Refuse(fake_lago.transport(), _posts("/subscriptions"))
    async with OrgBilling(settings, client=LagoClient(settings, transport=refuse)) as billing:
        await billing.create_org_customer("org_1", "Acme")
        with pytest.raises(LagoUnavailableError, match="may have applied it"):
            await billing.create_subscription("org_1", "starter", plan_overrides={"amount_cents": 500})
    assert fake_lago.subscriptions == []


async def test_a_write_not_resent_says_lago_may_have_applied_it(httpx_mock: HTTPXMock) -> None:
    """ "Retry later" alone, on a write the client does not resend because Lago may have applied it, invites the
    duplicate the client avoided: the error says to read back first."""
    httpx_mock.add_response(status_code=502)
    async with LagoClient(BillingSettings(api_key="k", api_url="http://lago.test", retry_backoff=0.001)) as lago:
        with pytest.raises(LagoUnavailableError, match="may have applied it") as info:
            await lago.create_subscription(
                external_customer_id="org_1", plan_code="starter", external_id="org_1", plan_overrides={"x": 1}
            )
    assert "read back" in str(info.value).lower()
    assert len(httpx_mock.get_requests()) == 1


# ------------------------------------------------------------------------------- waits longer than the deadline


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)

    monkeypatch.setattr(anyio, "sleep", sleep)
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    monkeypatch.setattr(random, "random", lambda: 0.0)
    return asked


@pytest.mark.parametrize(("status", "header"), [(429, "Retry-After"), (429, "X-RateLimit-Reset"), (503, "Retry-After")])
async def test_a_wait_longer_than_the_retry_deadline_is_said(httpx_mock: HTTPXMock, status: int, header: str) -> None:
    httpx_mock.add_response(status_code=status, headers={header: "120"})
    settings = BillingSettings(api_key="k", api_url="http://lago.test", retry_deadline=5)
    async with LagoClient(settings) as lago:
        with pytest.raises((LagoRateLimitError, LagoUnavailableError)) as info:
            await lago.create_event(_event("tx_1"))
    message = str(info.value)
    assert "120 s" in message and "LAGO_RETRY_DEADLINE" in message, message
    assert info.value.retry_after == 120.0  # type: ignore[attr-defined]
    assert len(httpx_mock.get_requests()) == 1


async def test_a_429_asking_longer_than_the_callers_deadline_fails_at_once(
    httpx_mock: HTTPXMock, waits: list[float]
) -> None:
    """A caller bounding the call (anyio.fail_after(2)) got its own TimeoutError after the client slept towards a
    20 s reset: no word of Lago's 429. It fails at once, with Lago's error saying why."""
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "20"}, is_reusable=True)
    async with LagoClient(BillingSettings(api_key="k", api_url="http://lago.test", retry_backoff=0.001)) as lago:
        with anyio.fail_after(2), pytest.raises(LagoRateLimitError) as info:
            await lago.create_event(_event("tx_1"))
    assert waits == []
    assert "20 s" in str(info.value) and "deadline" in str(info.value)
    assert len(httpx_mock.get_requests()) == 1


async def test_a_429_within_the_callers_deadline_is_waited(httpx_mock: HTTPXMock, waits: list[float]) -> None:
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "1"})
    httpx_mock.add_response(json={"event": {**_event("tx_1"), "lago_id": "e1"}})
    async with LagoClient(BillingSettings(api_key="k", api_url="http://lago.test", retry_backoff=0.001)) as lago:
        with anyio.fail_after(5):
            created = await lago.create_event(_event("tx_1"))
    assert created["lago_id"] == "e1" and waits == [1.0]
    first, second = (json.loads(request.content) for request in httpx_mock.get_requests())
    assert first == second
