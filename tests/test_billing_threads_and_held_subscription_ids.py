"""OrgBilling as a demanding SaaS developer uses it (review of src/lago_org_billing/_billing.py).

Covers:

* ``record_*_nowait`` called from many threads at once (sync endpoints run in a thread pool): the memo of first
  timestamps per caller transaction id is shared, and an unlocked ``TTLCache`` raised ``KeyError`` /
  ``RuntimeError`` out of the call once full, the event never queued;
* an org's subscription ``external_id`` (from ``LAGO_SUBSCRIPTION_ID_TEMPLATE``) held by another Lago customer (a
  legacy user's subscription named like the org): ``get_subscription`` must not answer it as the org's,
  ``change_plan`` and ``terminate_subscription`` must not change or end it, and ``create_subscription`` says who
  holds the id and what to do instead of "fix the fields its error details name".
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from cachetools import TTLCache

from lago_org_billing import (
    BillingSettings,
    EventPipeline,
    InvalidRequestError,
    LagoClient,
    LagoValidationError,
    OrgBilling,
)

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------------------- nowait from threads


def test_nowait_from_many_threads_queues_every_event(
    fake_lago: Any, lago_settings: BillingSettings, busy_threads: None
) -> None:
    """A sync endpoint (Starlette/FastAPI run ``def`` endpoints in a thread pool) records each call with its request
    id as transaction id. Once the memo of first timestamps is full (100,000 ids: a busy day), every call evicts, and
    two threads evicting at once broke the unlocked cache: ``KeyError``/``RuntimeError`` out of
    ``record_api_call_nowait``, the event lost. Every call must return its id and every event be queued."""
    threads_count, per_thread = 6, 2_500
    billing = OrgBilling(lago_settings, transport=fake_lago.transport())
    billing.pipeline = EventPipeline(billing.client, memory_capacity=threads_count * per_thread)  # never run
    billing.client._first_timestamps = TTLCache(maxsize=32, ttl=86_400)  # full at once, as after a busy day
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def work(worker: int) -> None:
        start.wait()
        for i in range(per_thread):
            try:
                billing.record_api_call_nowait("org_1", f"req_{worker}_{i}", "/v1/chat", "u_1", tokens=3)
            except BaseException as exc:  # each failure is what this test counts
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert billing.pipeline.metrics.recorded == threads_count * per_thread
    assert billing.pipeline.metrics.dropped == 0


# ------------------------------------------------------------------ a subscription id held by another customer


@pytest.fixture
async def held(fake_lago: Any, lago_client: LagoClient) -> Any:
    """OrgBilling, and a legacy user's active subscription whose external_id is org_1's subscription id."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_plan("pro", amount_cents=5000)
    fake_lago.add_customer("user_1", name="Legacy user")
    fake_lago.add_subscription("user_1", "starter", external_id="org_1")
    async with OrgBilling(client=lago_client) as billing:
        yield billing


def _user_subscription(fake_lago: Any) -> list[tuple[str, str, str]]:
    return [(s["external_customer_id"], s["plan_code"], s["status"]) for s in fake_lago.subscriptions]


async def test_get_subscription_of_an_id_held_by_another_customer_is_not_the_orgs(
    fake_lago: Any, held: OrgBilling
) -> None:
    """The org has no subscription: another customer's, under the same external_id, is not shown as the org's (a
    billing page of org_1 would show a stranger's plan)."""
    assert await held.get_subscription("org_1") is None


async def test_change_plan_never_changes_another_customers_subscription(fake_lago: Any, held: OrgBilling) -> None:
    """change_plan("org_1", ...) upgraded user_1's subscription (it sent that customer's id back to Lago)."""
    with pytest.raises(InvalidRequestError, match="user_1"):
        await held.change_plan("org_1", "pro")
    assert _user_subscription(fake_lago) == [("user_1", "starter", "active")]


async def test_terminate_never_ends_another_customers_subscription(fake_lago: Any, held: OrgBilling) -> None:
    """terminate_subscription("org_1") ended user_1's subscription (the owner was checked only when the subscription
    id was given)."""
    with pytest.raises(InvalidRequestError, match="user_1"):
        await held.terminate_subscription("org_1")
    assert _user_subscription(fake_lago) == [("user_1", "starter", "active")]


async def test_subscribing_an_org_whose_subscription_id_is_held_says_who_holds_it(
    fake_lago: Any, held: OrgBilling
) -> None:
    """Lago refuses the create (422 external_id value_already_exist). The caller sent no external_id: "fix the
    fields its error details name" is no help. The error (still a LagoValidationError) names the holder and the way
    out."""
    for call in (
        lambda: held.create_subscription("org_1", "starter"),
        lambda: held.create_subscription("org_1", "pro", plan_overrides={"amount_cents": 100}),
    ):
        with pytest.raises(LagoValidationError) as caught:
            await call()
        message = str(caught.value)
        assert "user_1" in message and "LAGO_SUBSCRIPTION_ID_TEMPLATE" in message
        assert "fix the fields" not in message
        assert caught.value.details == {"external_id": ["value_already_exist"]}
    assert _user_subscription(fake_lago) == [("user_1", "starter", "active")]
