"""LagoClient / OrgBilling against Lago's API: listings while Lago's lists change, and resends of upserts.

* ``iter_*`` page through Lago's offset pagination (``page``/``per_page``). Lago lists customers newest first
  (``CustomersQuery``: ``order(created_at: :desc)``), so a customer created while a listing runs pushes every item one
  place down: the first item of the next page is one already handed out (a repeat). A listing whose caller deletes
  what it was handed (clean-up loops) moves the others up: the items that slide into pages already read are never
  handed out (lost).
* ``upsert_customer`` is resent after a lost answer (a 502 once Lago applied it): with ``metadata`` items without
  ``id`` (the only way to add a key), the resend is refused ``422 {"key": ["value_already_exist"]}`` and the call
  raises "fix the fields" although Lago has exactly what was asked.
* ``update_subscription(id)`` with no field is sent, and Lago's ``400 param is missing`` says nothing to do.
* The emulator refuses ``{"entitlements": {}}`` (400) where Lago takes it (``params.fetch(:entitlements, {})``): a
  plan's entitlements cleared, a subscription's patched with nothing.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient

pytestmark = pytest.mark.anyio


def _settings(fake_lago: Any) -> BillingSettings:
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


class _LoseFirstAnswer(httpx.AsyncBaseTransport):
    """Lets the emulator apply every request, then answers the first ``method path`` with a proxy's 502 (its answer
    lost once Lago applied it)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, method: str, path: str) -> None:
        self.inner, self.method, self.path = inner, method, path
        self.lost = 0
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if request.method == self.method and request.url.path == self.path:
            self.sent += 1
            if not self.lost:
                self.lost += 1
                return httpx.Response(502, text="<html>Bad Gateway</html>", headers={"content-type": "text/html"})
        return response


# ------------------------------------------------------------------------------------------ listings that change


async def test_iter_customers_hands_out_each_customer_once_when_one_is_created_meanwhile(fake_lago: Any) -> None:
    """A customer created while ``iter_customers`` runs (a sign-up during an export) repeats none of the others."""
    for index in range(5):
        fake_lago.add_customer(f"org_{index}")
    async with LagoClient(_settings(fake_lago), transport=fake_lago.transport()) as lago:
        seen: list[str] = []
        async for customer in lago.iter_customers(per_page=2):
            seen.append(customer["external_id"])
            if len(seen) == 1:
                await lago.upsert_customer({"external_id": "org_new", "name": "New"})
    assert len(seen) == len(set(seen)), f"repeated: {seen}"
    assert {f"org_{index}" for index in range(5)} <= set(seen)


async def test_iter_customers_hands_out_every_customer_when_the_caller_deletes_each_one(fake_lago: Any) -> None:
    """A clean-up loop (``async for c in iter_customers(): await delete_customer(...)``) reaches every customer:
    none slides, unread, into a page already read."""
    for index in range(6):
        fake_lago.add_customer(f"org_{index}")
    async with LagoClient(_settings(fake_lago), transport=fake_lago.transport()) as lago:
        seen: list[str] = []
        async for customer in lago.iter_customers(per_page=2):
            seen.append(customer["external_id"])
            await lago.delete_customer(customer["external_id"])
        left = (await lago.list_customers()).items
    assert sorted(seen) == [f"org_{index}" for index in range(6)]
    assert left == []


# ------------------------------------------------------------------------------------------ resends of upserts


async def test_upsert_customer_with_metadata_applied_behind_a_lost_answer_is_answered_as_made(fake_lago: Any) -> None:
    """``upsert_customer`` with a metadata item, its first answer lost (Lago applied it): the client's own resend is
    refused ``value_already_exist`` on the key. The call answers the customer Lago has (what was asked), not a
    ``LagoValidationError`` telling the caller to fix fields nothing is wrong with."""
    transport = _LoseFirstAnswer(fake_lago.transport(), "POST", "/api/v1/customers")
    asked = {
        "external_id": "org_1",
        "name": "Acme",
        "metadata": [{"key": "billing_type", "value": "organization", "display_in_invoice": False}],
    }
    async with LagoClient(_settings(fake_lago), transport=transport) as lago:
        customer = await lago.upsert_customer(asked)
    assert transport.sent == 2  # the first attempt (applied, answer lost) and the client's resend
    assert customer["external_id"] == "org_1"
    assert [(item["key"], item["value"]) for item in customer["metadata"]] == [("billing_type", "organization")]


async def test_upsert_customer_adding_a_metadata_key_behind_a_lost_answer_is_answered_as_made(fake_lago: Any) -> None:
    """The same on an existing customer: a key added (its item without ``id``, the others with theirs), the answer
    lost once Lago added it; the resend's ``value_already_exist`` is this call's own key, not an error."""
    fake_lago.add_customer("org_1", name="Acme")
    async with LagoClient(_settings(fake_lago), transport=fake_lago.transport()) as plain:
        first = await plain.upsert_customer(
            {"external_id": "org_1", "metadata": [{"key": "a", "value": "1", "display_in_invoice": False}]}
        )
    kept = [{"id": item["lago_id"], "key": item["key"], "value": item["value"]} for item in first["metadata"]]
    transport = _LoseFirstAnswer(fake_lago.transport(), "POST", "/api/v1/customers")
    async with LagoClient(_settings(fake_lago), transport=transport) as lago:
        customer = await lago.upsert_customer(
            {"external_id": "org_1", "metadata": [*kept, {"key": "b", "value": "2", "display_in_invoice": False}]}
        )
    assert transport.sent == 2
    assert sorted((item["key"], item["value"]) for item in customer["metadata"]) == [("a", "1"), ("b", "2")]


# ------------------------------------------------------------------------------------------ empty writes


class _Recorder(httpx.AsyncBaseTransport):
    """Passes requests to the emulator and keeps them."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


async def test_update_subscription_without_fields_is_refused_before_any_request(fake_lago: Any) -> None:
    """``update_subscription("org_a")`` (no field to change) raises ``InvalidRequestError`` naming what it takes;
    sent, Lago answers ``400 param is missing or the value is empty: subscription``, which says nothing to do."""
    from lago_org_billing._errors import InvalidRequestError

    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    recorder = _Recorder(fake_lago.transport())
    async with LagoClient(_settings(fake_lago), transport=recorder) as lago:
        with pytest.raises(InvalidRequestError):
            await lago.update_subscription("org_a")
    assert recorder.requests == []


def _plan_with_entitlement(fake_lago: Any) -> None:
    fake_lago.add_feature("api_quota", privileges=[{"code": "max_api_calls", "value_type": "integer"}])
    fake_lago.add_plan("starter", amount_cents=0, entitlements={"api_quota": {"max_api_calls": 300}})
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")


async def test_the_emulator_clears_a_plans_entitlements_set_to_none(fake_lago: Any) -> None:
    """``set_plan_entitlements("starter", {})`` (``POST /plans/starter/entitlements {"entitlements": {}}``) removes
    every entitlement of the plan, as Lago does (``params.fetch(:entitlements, {})``; ``PlanEntitlementsCreateService``
    deletes them all, then ``return if entitlements_params.blank?``). The emulator answered ``400 param is missing``,
    so code that works on Lago fails its tests on FakeLago."""
    _plan_with_entitlement(fake_lago)
    async with LagoClient(_settings(fake_lago), transport=fake_lago.transport()) as lago:
        assert await lago.set_plan_entitlements("starter", {}) == []
        assert await lago.get_subscription_entitlements("org_a") == []


async def test_the_emulator_answers_an_empty_subscription_entitlements_patch_unchanged(fake_lago: Any) -> None:
    """``update_subscription_entitlements("org_a", {})`` (``PATCH ... {"entitlements": {}}``) changes nothing and is
    answered with the subscription's entitlements, as Lago does (``params.fetch(:entitlements, {})``, a partial
    update of none), not ``400``."""
    _plan_with_entitlement(fake_lago)
    async with LagoClient(_settings(fake_lago), transport=fake_lago.transport()) as lago:
        before = await lago.get_subscription_entitlements("org_a")
        assert before  # (the plan's api_quota)
        assert await lago.update_subscription_entitlements("org_a", {}) == before
