"""``OrgBilling`` and the ``LagoClient`` calls it makes, with the emulator (and a transport wrapping it only to
reproduce faults and answers of Lago's the emulator does not make):

* ``record_usage`` of the quota gate's token metric with ``total_tokens`` written as ``500.0``, ``"500"`` or
  ``Decimal("500")`` (Lago sums each as 500) counted 0 tokens in the gate;
* ``record_api_call`` / ``record_usage`` without a ``transaction_id`` (one is generated) failing after Lago took the
  event behind a lost answer: the error names no transaction id, so the caller's retry is a second, billed event;
* an org subscription waiting for its payment (``incomplete``): ``create_subscription`` / ``subscribe_org_to_plan``
  relayed Lago's ``422 subscription_incomplete`` as "fix the fields its error details name", and ``change_plan`` said
  "no active subscription: use create_subscription" (which then fails);
* ``change_plan`` under a ``LAGO_API_URL`` Lago is not served at (its catch-all ``404 resource_not_found``) said
  "no active subscription to change: use create_subscription" instead of naming ``LAGO_API_URL``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from lago_org_billing import (
    BillingSettings,
    LagoAPIError,
    LagoClient,
    LagoIntegrationError,
    LagoValidationError,
    OrgBilling,
    QuotaDecision,
)

pytestmark = pytest.mark.anyio


def _settings(fake_lago: Any, **changes: Any) -> BillingSettings:
    values: dict[str, Any] = {"api_url": fake_lago.base_url, "api_key": fake_lago.api_key, "retry_backoff": 0.001}
    values.update(changes)
    return BillingSettings(**values)


class _SpyGate:
    """A quota gate that records what OrgBilling counts in it (its token metric is the event code, as by default)."""

    token_metric = "api_call"

    def __init__(self) -> None:
        self.settled: list[tuple[str, int, bool]] = []

    def settle(self, org_id: str, decision: QuotaDecision, *, tokens: int = 0, billed: bool = True) -> None:
        self.settled.append((org_id, tokens, billed))


# ------------------------------------------------------------------------------------------ quota counting


@pytest.mark.parametrize("total", [500.0, "500", Decimal("500")], ids=["float", "text", "decimal"])
async def test_record_usage_counts_in_the_gate_the_tokens_lago_sums(
    fake_lago: Any, lago_client: LagoClient, total: object
) -> None:
    """The gate's token metric sums ``total_tokens`` (README); Lago casts the property to numeric, so 500.0, "500" and
    Decimal("500") (sent as "500") each bill 500 tokens. ``OrgBilling._count`` took only a Python ``int``: the gate
    counted 0 tokens, and the org could go past its token limit until the gate's next read of Lago
    (``LAGO_USAGE_CACHE_TTL``). ``record_api_call`` already reads such counts (``_property_count``)."""
    gate = _SpyGate()
    async with OrgBilling(client=lago_client, quota=gate) as billing:  # type: ignore[arg-type]
        await billing.record_usage("org_1", "api_call", "tx_1", {"total_tokens": total})
    assert len(fake_lago.events) == 1
    assert Decimal(str(fake_lago.events[0]["properties"]["total_tokens"])) == 500  # what Lago sums
    assert gate.settled == [("org_1", 500, True)]


# ------------------------------------------------------------------------------- generated transaction ids


class _TakenThenDown(httpx.AsyncBaseTransport):
    """Lago takes the first ``POST /events`` but its answer is lost (a 502 of the proxy in front), then Lago is
    unreachable (every later request: connection refused)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.taken = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        if self.taken:
            raise httpx.ConnectError("connection refused", request=request)
        if request.method == "POST" and request.url.path == "/api/v1/events":
            self.taken = True
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return httpx.Response(502, text="<html>502 Bad Gateway</html>", headers={"content-type": "text/html"})
        return await self.inner.handle_async_request(request)


async def test_a_failed_record_without_transaction_id_names_the_id_lago_may_hold(fake_lago: Any) -> None:
    """``record_api_call(org_id, endpoint=..., tokens=...)`` (the seed's call, without a transaction id: one is
    generated) whose event Lago took, its answer lost, then Lago unreachable: the call raises "Check LAGO_API_URL
    ... and that Lago is up". The caller cannot know the generated id, so its retry makes a new event and Lago bills
    the call twice. The error must name the transaction id (and timestamp) to resend with."""
    settings = _settings(fake_lago, max_retries=2)
    transport = _TakenThenDown(fake_lago.transport())
    async with OrgBilling(settings, transport=transport) as billing:
        with pytest.raises(LagoIntegrationError) as caught:
            await billing.record_api_call("org_1", endpoint="/v1/chat", user_id="u_1", tokens=120)
    assert len(fake_lago.events) == 1  # Lago has it
    held = fake_lago.events[0]["transaction_id"]
    assert held in str(caught.value), str(caught.value)


# --------------------------------------------------------------------------- subscriptions waiting for payment


class _LagoRefusesBesideIncomplete(httpx.AsyncBaseTransport):
    """The emulator, answering ``POST /subscriptions`` as Lago's ``Subscriptions::CreateService`` does when the
    customer has an ``incomplete`` subscription under that external_id (``422 {"subscription":
    ["subscription_incomplete"]}``); the emulator has no activation rules and would create a second subscription."""

    def __init__(self, fake_lago: Any) -> None:
        self.fake_lago = fake_lago
        self.inner: httpx.AsyncBaseTransport = fake_lago.transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        if request.method == "POST" and request.url.path == "/api/v1/subscriptions":
            body = json.loads(request.content)["subscription"]
            if any(
                s["external_id"] == body["external_id"]
                and s["status"] == "incomplete"
                and s["external_customer_id"] == body["external_customer_id"]
                for s in self.fake_lago.subscriptions
            ):
                return httpx.Response(
                    422,
                    json={
                        "status": 422,
                        "error": "Unprocessable Entity",
                        "code": "validation_errors",
                        "error_details": {"subscription": ["subscription_incomplete"]},
                    },
                )
        return await self.inner.handle_async_request(request)


def _incomplete(fake_lago: Any, org_id: str) -> dict[str, Any]:
    """The org's subscription made ``incomplete`` (what ``activation_rules`` of type payment make; the emulator has
    no path to it), as test_billing_setup_arguments_and_incomplete_terminate.py does."""
    fake_lago.add_customer(org_id, name="Acme", email="billing@acme.test")
    fake_lago.add_subscription(org_id, "starter", external_id=org_id, subscription_at="2030-01-01T00:00:00Z")
    stored = next(s for s in fake_lago.store.subscriptions if s["external_id"] == org_id)
    stored["status"] = "incomplete"
    fake_lago.store._file_under_plan(stored)
    return stored


async def test_subscribing_an_org_whose_subscription_waits_for_its_payment_says_so(fake_lago: Any) -> None:
    """An org set up with ``activation_rules=[{"type": "payment", ...}]`` has an ``incomplete`` subscription until its
    payment: running its setup again (or subscribing it another way) gets Lago's ``422 subscription_incomplete``,
    relayed as "Lago refused the values sent: fix the fields its error details name". There is no field to fix: it
    must say the subscription waits for its payment, as ``terminate_subscription`` of it does."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_plan("pro", amount_cents=5000)
    _incomplete(fake_lago, "org_1")
    async with OrgBilling(_settings(fake_lago), transport=_LagoRefusesBesideIncomplete(fake_lago)) as billing:
        for call in (
            lambda: billing.subscribe_org_to_plan("org_1", "starter", "Acme"),
            lambda: billing.create_subscription("org_1", "pro"),
        ):
            with pytest.raises(LagoValidationError) as caught:
                await call()
            text = str(caught.value)
            assert "fix the fields" not in text, text
            assert "incomplete" in text and "payment" in text, text
    assert [s["status"] for s in fake_lago.subscriptions] == ["incomplete"]


async def test_change_plan_of_an_org_whose_subscription_waits_for_its_payment_says_so(fake_lago: Any) -> None:
    """``change_plan`` of that org said "has no active subscription to change: use create_subscription", and
    create_subscription then fails (Lago's 422 subscription_incomplete): the error must say the subscription is
    incomplete, waiting for its payment."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_plan("pro", amount_cents=5000)
    _incomplete(fake_lago, "org_1")
    async with OrgBilling(_settings(fake_lago), transport=_LagoRefusesBesideIncomplete(fake_lago)) as billing:
        with pytest.raises(LagoAPIError) as caught:
            await billing.change_plan("org_1", "pro")
    text = str(caught.value)
    assert "use create_subscription" not in text, text
    assert "incomplete" in text and "payment" in text, text


# ------------------------------------------------------------------------------------------ wrong LAGO_API_URL


async def test_change_plan_under_a_wrong_lago_url_names_lago_api_url(fake_lago: Any) -> None:
    """LAGO_API_URL under a path Lago is not served at: Lago answers every call with its catch-all ``404
    resource_not_found``. ``get_customer``, ``get_subscription``, ``terminate_subscription``... say to check
    LAGO_API_URL (test_billing_reruns_lost_answers_and_errors.py), but ``change_plan`` reads the org's subscription
    with ``LagoClient.get_current_subscription``, which takes any 404 for "no such subscription": it answered "Org
    'org_1' has no active subscription to change: use create_subscription"."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_plan("pro", amount_cents=5000)
    fake_lago.add_customer("org_1", name="Acme")
    fake_lago.add_subscription("org_1", "starter", external_id="org_1")
    async with OrgBilling(
        _settings(fake_lago, api_url=fake_lago.base_url + "/lago"), transport=fake_lago.transport()
    ) as billing:
        with pytest.raises(LagoAPIError, match="LAGO_API_URL") as caught:
            await billing.change_plan("org_1", "pro")
    assert "use create_subscription" not in str(caught.value)
    assert [(s["plan_code"], s["status"]) for s in fake_lago.subscriptions] == [("starter", "active")]


def test_an_event_not_queued_beside_a_spool_does_not_advise_setting_the_spool() -> None:
    """``record_usage_nowait`` refused by a pipeline with a SQLite spool (its events waiting for the next commit): the
    error told the user to set LAGO_SPOOL_PATH, which they had, and blamed Lago. It names the spool's commits now."""
    from types import SimpleNamespace

    from lago_org_billing._billing import _not_queued

    spooled = SimpleNamespace(closed=False, outbox=SimpleNamespace(capacity=10, durable=True))
    text = str(_not_queued(spooled, "tx_1"))  # type: ignore[arg-type]
    assert "LAGO_SPOOL_PATH" not in text and "spool's next commit" in text, text
    in_memory = SimpleNamespace(closed=False, outbox=SimpleNamespace(capacity=10, durable=False))
    assert "LAGO_SPOOL_PATH" in str(_not_queued(in_memory, "tx_1"))  # type: ignore[arg-type]
