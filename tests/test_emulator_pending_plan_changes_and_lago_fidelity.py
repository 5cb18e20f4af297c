"""Review of the emulator against lago-api where a user's suite would see it differ.

A plan change on a subscription that has not started yet (``POST /subscriptions`` with the ``external_id`` of a
pending subscription and another ``plan_code``): lago-api ``PlanUpgradeService``/``PlanDowngradeService`` both call
``update_pending_subscription``, which sets ``current_subscription.plan = plan`` (the plan itself: the in-memory
``plan_overrides`` amounts are not saved with it), its ``name`` when one is given, then ``save!``, and sends no
webhook. The emulator sent ``subscription.updated``, kept the old name and moved the subscription to an override
plan of its own.
"""

from __future__ import annotations

from typing import Any

import pytest

from _openapi import assert_response_matches
from _pinned_clock import NOW, Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

LATER = "2026-04-10T00:00:00Z"


def _fake() -> FakeLago:
    fake = FakeLago(api_key="k", clock=Clock(NOW))
    fake.add_plan("basic", amount_cents=1000)
    fake.add_plan("pro", amount_cents=5000)
    fake.add_subscription("org", "basic", external_id="sub", subscription_at=LATER, name="Basic seat")
    return fake


async def _post_subscription(fake: FakeLago, **fields: Any) -> dict[str, Any]:
    body = {"subscription": {"external_customer_id": "org", "external_id": "sub", **fields}}
    async with fake.client() as client:
        response = await client.post("/api/v1/subscriptions", json=body)
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    subscription: dict[str, Any] = response.json()["subscription"]
    return subscription


@pytest.mark.parametrize("plan_code", ["pro", "basic_free"])
async def test_a_plan_change_before_the_start_sends_no_webhook(plan_code: str) -> None:
    """Upgrade or downgrade of a pending subscription: the same record on the new plan, no ``subscription.updated``."""
    fake = _fake()
    fake.add_plan("basic_free", amount_cents=0)
    before = fake.subscriptions[0]["lago_id"]
    sent = len(fake.emitted_webhooks)
    sub = await _post_subscription(fake, plan_code=plan_code)
    assert (sub["lago_id"], sub["status"], sub["plan_code"]) == (before, "pending", plan_code)
    assert sub["next_plan_code"] is None and sub["previous_plan_code"] is None
    assert fake.emitted_webhooks[sent:] == []


async def test_a_plan_change_before_the_start_takes_the_name_given() -> None:
    """``current_subscription.name = name if name.present?``: a new name is kept; none given keeps the old one."""
    fake = _fake()
    assert (await _post_subscription(fake, plan_code="pro"))["name"] == "Basic seat"
    assert (await _post_subscription(fake, plan_code="basic", name="  Basic again "))["name"] == "Basic again"


async def test_a_plan_change_before_the_start_ignores_plan_overrides() -> None:
    """The pending subscription is moved to the plan itself, at its own price: no override plan is made for it."""
    fake = _fake()
    plans = len(fake.store._plans_by_id)
    sub = await _post_subscription(fake, plan_code="pro", plan_overrides={"amount_cents": 4200})
    assert (sub["plan_code"], sub["plan_amount_cents"]) == ("pro", 5000)
    assert sub["plan"]["lago_id"] == fake.store.plans["pro"]["lago_id"]
    assert len(fake.store._plans_by_id) == plans
