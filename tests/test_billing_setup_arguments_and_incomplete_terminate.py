"""Found by an audit of ``OrgBilling``:

- ``subscribe_org_to_plan`` checks its arguments before anything is written (its docstring), but a ``billing_time``
  Lago does not take was refused once the org's customer was created, and ``external_id=`` (or
  ``external_customer_id=``) among its subscription fields raised a bare ``TypeError`` from the client, also after
  the customer was written. Both are an ``InvalidRequestError`` now, nothing written; ``create_subscription`` too.
- ``terminate_subscription`` of an ``incomplete`` subscription (payment-gated; Lago refuses to end it: 422
  ``subscription_incomplete``) said it "is neither active nor pending, and never was ... subscribe the org first":
  it says it is waiting for its payment, and what to do.
- ``record_usage`` of an event of another metric under a ``transaction_id`` Lago's Postgres store holds for the
  subscription was answered ``{"duplicate": True}`` and never billed: refused, saying to give it its own id.
"""

from __future__ import annotations

import datetime as dt

import pytest

from lago_org_billing import BillingSettings, InvalidRequestError, LagoClient, LagoValidationError, OrgBilling
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


def _lago() -> FakeLago:
    lago = FakeLago(api_key="k")
    lago.add_plan("starter", amount_cents=1000)
    return lago


def _billing(lago: FakeLago) -> OrgBilling:
    settings = BillingSettings(api_url="http://lago.test", api_key="k")
    return OrgBilling(client=LagoClient(settings, transport=lago.transport()))


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"billing_time": "yearly"}, "billing_time must be 'calendar' or 'anniversary'"),
        ({"billing_time": None}, "billing_time must be"),
        ({"external_id": "org_a_main"}, "external_id cannot be given"),
        ({"external_customer_id": "org_b"}, "external_customer_id cannot be given"),
    ],
)
async def test_a_setup_refused_for_its_arguments_writes_nothing(fields: dict[str, object], said: str) -> None:
    lago = _lago()
    async with _billing(lago) as billing:
        with pytest.raises(InvalidRequestError, match=said):
            await billing.subscribe_org_to_plan("org_a", "starter", "Acme", **fields)
        with pytest.raises(InvalidRequestError, match=said):
            await billing.create_subscription("org_a", "starter", **fields)  # type: ignore[arg-type]
    assert lago.customers == [] and lago.subscriptions == []
    assert all(request.method == "GET" for request in lago.requests)


async def test_anniversary_billing_is_taken() -> None:
    lago = _lago()
    async with _billing(lago) as billing:
        made = await billing.subscribe_org_to_plan("org_a", "starter", "Acme", billing_time="anniversary")
    assert made["subscription"]["billing_time"] == "anniversary"


async def test_terminating_an_incomplete_subscription_says_it_waits_for_its_payment() -> None:
    lago = _lago()
    async with _billing(lago) as billing:
        await billing.subscribe_org_to_plan(
            "org_a", "starter", "Acme", subscription_at=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
        )
        stored = next(s for s in lago.store.subscriptions if s["external_id"] == "org_a")
        stored["status"] = "incomplete"  # (what activation_rules of type payment make; the emulator has no path)
        lago.store._file_under_plan(stored)
        with pytest.raises(LagoValidationError) as info:
            await billing.terminate_subscription("org_a")
    text = str(info.value)
    assert "incomplete" in text and "payment" in text and "never was" not in text, text
    assert info.value.details == {"base": ["subscription_incomplete"]}
    assert stored["status"] == "incomplete"


async def test_an_event_of_another_metric_under_a_used_transaction_id_is_refused_not_called_a_duplicate() -> None:
    """Lago's Postgres store takes one event per ``transaction_id`` and subscription, whatever its code: a request's
    second event (another metric) given the first's id was answered ``{"duplicate": True}`` and never billed. It is
    refused, saying to give it its own id; the same event sent again is still a duplicate."""
    lago = _lago()
    lago.add_billable_metric("api_call", aggregation_type="count_agg")
    lago.add_billable_metric("api_tokens", aggregation_type="sum_agg", field_name="tokens")
    async with _billing(lago) as billing:
        await billing.subscribe_org_to_plan("org_a", "starter", "Acme")
        await billing.record_usage("org_a", "api_call", transaction_id="req_42", timestamp=1_900_000_000)
        again = await billing.record_usage("org_a", "api_call", transaction_id="req_42", timestamp=1_900_000_000)
        assert again["duplicate"] is True
        with pytest.raises(LagoValidationError, match="its own transaction_id") as info:
            await billing.record_usage("org_a", "api_tokens", transaction_id="req_42", properties={"tokens": 1500})
        assert "'api_call'" in str(info.value)
        made = await billing.record_usage(
            "org_a", "api_tokens", transaction_id="req_42:tokens", properties={"tokens": 1}
        )
        assert not made.get("duplicate")
    assert sorted((e["transaction_id"], e["code"]) for e in lago.events) == [
        ("req_42", "api_call"),
        ("req_42:tokens", "api_tokens"),
    ]
