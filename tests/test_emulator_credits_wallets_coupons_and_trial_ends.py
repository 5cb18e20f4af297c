"""Review of the emulator's invoices and credits (FakeLago against lago-api's ``Invoices::CalculateFeesService``).

Once an invoice's fees are computed, Lago deducts, in this order (``CalculateFeesService#call``):

* the customer's active applied coupons, before taxes (``Credits::AppliedCouponsService``,
  ``AppliedCoupons::AmountService``): a percentage of ``sub_total_excluding_taxes_amount_cents`` (rounded), or a fixed
  amount (at most that sub-total; a ``once`` coupon's remaining amount); ``coupons_amount_cents`` grows, the
  sub-total shrinks; a ``once`` coupon used up (or a percentage one) and a ``recurring`` one whose
  ``frequency_duration_remaining`` reaches 0 are terminated, a ``forever`` one never;
* the customer's available credit notes, oldest first (``Credits::CreditNoteService``): each gives at most what is
  left of the invoice, its ``balance_amount_cents`` shrinks (``credit_status`` ``consumed`` at 0), the invoice's
  ``credit_notes_amount_cents`` grows and its ``total_amount_cents`` shrinks;
* the customer's active wallets (``Credits::AppliedPrepaidCreditsService``): each pays at most its balance
  (``prepaid_credit_amount_cents``), through an outbound ``invoiced`` wallet transaction announced by
  ``wallet_transaction.created``;

then sets ``payment_status`` ``succeeded`` when nothing is left to pay, ``pending`` otherwise. The emulator did none
of it: seeded coupons, wallets and credit notes never reached an invoice, and a 0 invoice stayed ``pending``.

An upgrade of a pay-in-advance plan mid-period (``Subscriptions::PlanUpgradeService``, ``TerminateService`` with
``upgrade: true``, ``CreditNotes::CreateFromTermination``) credits the unused part of the old plan's period (from the
upgrade's day on) and bills the old subscription and the new plan's first period on one invoice, which that credit
note pays for; the emulator issued no credit note and two invoices.

A pay-in-advance plan with a free trial is not billed when it starts (``ActivateService``: ``pay_in_advance? &&
!in_trial_period?``) but when the trial ends (``Subscriptions::FreeTrialBillingService``), which also sends
``subscription.trial_ended``; the emulator billed it at the start and sent no webhook.

Plan ``p``: 3100 cents a month (100 a day in March), paid in advance; customer ``org``; 1 March 2026 UTC.
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from _openapi import SPEC_PATH, assert_response_matches, fix_spec
from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = timezone.utc
MARCH = datetime(2026, 3, 1, tzinfo=UTC)
MID_MARCH = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
APRIL = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)


@functools.lru_cache(maxsize=1)
def _webhook_schemas() -> tuple[Registry, dict[str, str]]:
    with SPEC_PATH.open("rb") as file:
        spec = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    fix_spec(spec)
    registry: Registry = Registry().with_resource("urn:lago-spec", DRAFT202012.create_resource(spec))
    by_type: dict[str, str] = {}
    for name, item in spec["webhooks"].items():
        schema = item["post"]["requestBody"]["content"]["application/json"]["schema"]
        by_type[schema["properties"]["webhook_type"]["enum"][0]] = name
    return registry, by_type


def _webhook_errors(fake: FakeLago) -> list[str]:
    """Where the emitted webhooks the spec describes break its schema."""
    registry, by_type = _webhook_schemas()
    errors: list[str] = []
    for envelope in fake.emitted_webhooks:
        name = by_type.get(envelope["webhook_type"])
        if name is None:
            continue
        ref = f"urn:lago-spec#/webhooks/{name}/post/requestBody/content/application~1json/schema"
        validator = jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)
        errors += [
            f"{envelope['webhook_type']} {list(e.path)}: {e.message[:160]}" for e in validator.iter_errors(envelope)
        ]
    return errors


def _fake(*, trial_period: int | None = None) -> tuple[FakeLago, Clock]:
    clock = Clock(MARCH)
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_plan(
        "p", amount_cents=3100, pay_in_advance=True, **({"trial_period": trial_period} if trial_period else {})
    )
    fake.add_plan("big", amount_cents=6200, pay_in_advance=True)
    fake.add_plan("arrears", amount_cents=3100)
    fake.add_customer("org", currency="USD")
    return fake, clock


async def _get(fake: FakeLago, path: str, **params: Any) -> dict[str, Any]:
    async with fake.client() as client:
        response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    body: dict[str, Any] = response.json()
    return body


async def _invoices(fake: FakeLago) -> list[dict[str, Any]]:
    """Every invoice of ``org`` as ``GET /invoices/{id}`` returns it, oldest first."""
    listed = (await _get(fake, "/api/v1/invoices", external_customer_id="org"))["invoices"]
    ids = [i["lago_id"] for i in sorted(listed, key=lambda i: i["sequential_id"])]
    return [(await _get(fake, f"/api/v1/invoices/{i}"))["invoice"] for i in ids]


def _totals(invoice: dict[str, Any]) -> tuple[int, ...]:
    keys = (
        "fees_amount_cents",
        "coupons_amount_cents",
        "sub_total_excluding_taxes_amount_cents",
        "credit_notes_amount_cents",
        "prepaid_credit_amount_cents",
        "total_amount_cents",
    )
    return tuple(int(invoice[k]) for k in keys)


def _types(fake: FakeLago) -> list[str]:
    return [w["webhook_type"] for w in fake.emitted_webhooks]


async def test_a_credit_note_pays_the_next_invoice_and_is_consumed() -> None:
    """A credit note of 900 on an earlier invoice, then a subscription to ``p`` on 1 March: its 3100 start invoice
    takes the 900 (``credit_notes_amount_cents`` 900, total 2200, one ``credits`` line of type ``credit_note``); the
    note's balance is 0, ``consumed``."""
    fake, _ = _fake()
    old = fake.add_invoice("org", total_amount_cents=4000, payment_status="succeeded")
    note = fake.add_credit_note(old["lago_id"], credit_amount_cents=900)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    invoice = (await _invoices(fake))[-1]
    assert _totals(invoice) == (3100, 0, 3100, 900, 0, 2200)
    assert invoice["total_due_amount_cents"] == 2200 and invoice["payment_status"] == "pending"
    (credit,) = invoice["credits"]
    assert credit["amount_cents"] == 900 and credit["before_taxes"] is False
    assert credit["item"] == {
        "lago_item_id": note["lago_id"],
        "type": "credit_note",
        "code": note["number"],
        "name": old["number"],
    }
    (listed,) = (await _get(fake, "/api/v1/credit_notes"))["credit_notes"]
    assert (listed["balance_amount_cents"], listed["credit_status"]) == (0, "consumed")


async def test_a_credit_note_larger_than_the_invoice_keeps_the_rest_for_the_next_one() -> None:
    """A 5000 credit note: the 3100 start invoice takes 3100 (total 0, ``succeeded``), 1900 stay available; April's
    3100 takes them (total 1200) and the note is consumed."""
    fake, clock = _fake()
    old = fake.add_invoice("org", total_amount_cents=9000, payment_status="succeeded")
    fake.add_credit_note(old["lago_id"], credit_amount_cents=5000)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    (_, start) = await _invoices(fake)
    assert _totals(start) == (3100, 0, 3100, 3100, 0, 0)
    assert (start["payment_status"], start["total_due_amount_cents"]) == ("succeeded", 0)
    (note,) = (await _get(fake, "/api/v1/credit_notes"))["credit_notes"]
    assert (note["balance_amount_cents"], note["credit_status"]) == (1900, "available")
    clock.now = APRIL
    april = (await _invoices(fake))[-1]
    assert _totals(april) == (3100, 0, 3100, 1900, 0, 1200)
    (note,) = (await _get(fake, "/api/v1/credit_notes"))["credit_notes"]
    assert (note["balance_amount_cents"], note["credit_status"]) == (0, "consumed")


async def test_a_termination_credit_note_pays_the_customers_next_subscription() -> None:
    """``sub`` on ``p`` terminated 15 March 12:00: a 1600 credit note (16 unused days). A new subscription ``sub2`` on
    ``p`` the same day: its start invoice bills 15-31 March, 17 days = 1700, of which the note pays 1600: total 100.
    The termination invoice (no charges, 0) is ``succeeded`` and takes no credit."""
    fake, clock = _fake()
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    clock.now = MID_MARCH
    async with fake.client() as client:
        assert (await client.delete("/api/v1/subscriptions/sub")).status_code == 200
    fake.add_subscription("org", "p", external_id="sub2")
    start, termination, second = await _invoices(fake)
    assert _totals(termination) == (0, 0, 0, 0, 0, 0) and termination["payment_status"] == "succeeded"
    assert _totals(second) == (1700, 0, 1700, 1600, 0, 100)
    (note,) = (await _get(fake, "/api/v1/credit_notes"))["credit_notes"]
    assert note["lago_invoice_id"] == start["lago_id"]
    assert (note["balance_amount_cents"], note["credit_status"]) == (0, "consumed")
    assert not _webhook_errors(fake)


async def test_upgrading_a_pay_in_advance_plan_credits_the_unused_days_on_one_invoice() -> None:
    """``sub`` on ``p`` (paid 3100 for March) upgraded on 15 March 12:00 to ``big`` (6200, 200 a day): the unused
    part of ``p`` runs from 15 March (the upgrade's day is paid by the new plan) to 31 March, 17 days = 1700,
    credited (reason ``order_cancellation``); one invoice bills the old subscription (nothing left) and ``big`` for
    15-31 March, 17 x 200 = 3400, of which the credit note pays 1700: total 1700. Webhooks: ``credit_note.created``
    before that ``invoice.created``."""
    fake, clock = _fake()
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    clock.now = MID_MARCH
    new = fake.add_subscription("org", "big", external_id="sub")
    start, upgrade = await _invoices(fake)
    (note,) = (await _get(fake, "/api/v1/credit_notes"))["credit_notes"]
    assert note["lago_invoice_id"] == start["lago_id"] and note["reason"] == "order_cancellation"
    assert (note["total_amount_cents"], note["credit_amount_cents"]) == (1700, 1700)
    assert (note["balance_amount_cents"], note["credit_status"]) == (0, "consumed")
    assert _totals(upgrade) == (3400, 0, 3400, 1700, 0, 1700)
    assert {s["plan_code"] for s in upgrade["subscriptions"]} == {"p", "big"}
    (fee,) = [f for f in upgrade["fees"] if f["item"]["type"] == "subscription"]
    assert (fee["lago_subscription_id"], fee["amount_cents"]) == (new["lago_id"], 3400)
    created = [t for t in _types(fake) if t in ("credit_note.created", "invoice.created")]
    assert created == ["invoice.created", "credit_note.created", "invoice.created"]
    assert not _webhook_errors(fake)


async def test_a_wallet_pays_the_invoice_and_announces_its_transaction() -> None:
    """A wallet of 10 credits (1000 cents): the 3100 start invoice takes them (``prepaid_credit_amount_cents`` 1000,
    total 2100); the wallet's balance is 0 and its ``consumed_credits`` 10; a ``wallet_transaction.created`` webhook
    (outbound, ``invoiced``, settled, 10 credits, on that invoice) is sent before ``invoice.created``."""
    fake, _ = _fake()
    wallet = fake.add_wallet("org", credits_balance="10.0")
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    (invoice,) = await _invoices(fake)
    assert _totals(invoice) == (3100, 0, 3100, 0, 1000, 2100)
    (listed,) = (await _get(fake, "/api/v1/wallets", external_customer_id="org"))["wallets"]
    assert (listed["balance_cents"], listed["credits_balance"], listed["consumed_credits"]) == (0, "0.0", "10.0")
    assert listed["ongoing_balance_cents"] == 0 and listed["last_consumed_credit_at"] is not None
    (transaction,) = [
        w["wallet_transaction"] for w in fake.emitted_webhooks if w["object_type"] == "wallet_transaction"
    ]
    assert transaction["lago_wallet_id"] == wallet["lago_id"] and transaction["lago_invoice_id"] == invoice["lago_id"]
    assert (transaction["transaction_type"], transaction["transaction_status"], transaction["status"]) == (
        "outbound",
        "invoiced",
        "settled",
    )
    assert (transaction["amount"], transaction["credit_amount"]) == ("10.0", "10.0")
    types = _types(fake)
    assert types.index("wallet_transaction.created") < len(types) - 1 - types[::-1].index("invoice.created")
    assert not _webhook_errors(fake)


async def test_a_wallet_larger_than_the_invoice_keeps_its_rest() -> None:
    """A wallet of 50 credits (rate 1: 5000 cents): the 3100 invoice takes 3100 (total 0, ``succeeded``),
    1900 cents (19 credits) stay."""
    fake, _ = _fake()
    fake.add_wallet("org", credits_balance="50.0")
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    (invoice,) = await _invoices(fake)
    assert _totals(invoice) == (3100, 0, 3100, 0, 3100, 0) and invoice["payment_status"] == "succeeded"
    (wallet,) = (await _get(fake, "/api/v1/wallets", external_customer_id="org"))["wallets"]
    assert (wallet["balance_cents"], wallet["credits_balance"], wallet["consumed_credits"]) == (1900, "19.0", "31.0")


async def test_coupons_credit_notes_and_wallets_apply_in_lagos_order() -> None:
    """A 10% ``once`` coupon, a 500 credit note and a 10-credit wallet on a 3100 invoice: the coupon first, before
    taxes (310: sub-total 2790), then the note (500: 2290), then the wallet (1000: total 1290). The percentage
    ``once`` coupon is then terminated."""
    fake, _ = _fake()
    fake.add_applied_coupon("org", "ten", percentage_rate="10.0", frequency="once")
    old = fake.add_invoice("org", total_amount_cents=900, payment_status="succeeded")
    fake.add_credit_note(old["lago_id"], credit_amount_cents=500)
    fake.add_wallet("org", credits_balance="10.0")
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    invoice = (await _invoices(fake))[-1]
    assert _totals(invoice) == (3100, 310, 2790, 500, 1000, 1290)
    assert invoice["sub_total_including_taxes_amount_cents"] == 2790
    kinds = [(c["item"]["type"], c["amount_cents"], c["before_taxes"]) for c in invoice["credits"]]
    assert kinds == [("coupon", 310, True), ("credit_note", 500, False)]
    (coupon,) = (await _get(fake, "/api/v1/applied_coupons", external_customer_id="org"))["applied_coupons"]
    assert coupon["status"] == "terminated" and coupon["terminated_at"] is not None


async def test_a_recurring_fixed_coupon_discounts_its_number_of_invoices() -> None:
    """A 500-cent coupon ``recurring`` for 2 invoices: March's 3100 start invoice and April's each get 500 off; its
    ``frequency_duration_remaining`` goes 2 -> 1 -> 0 and it is terminated; May's invoice is whole."""
    fake, clock = _fake()
    fake.add_applied_coupon("org", "fivehundred", amount_cents=500, frequency="recurring", frequency_duration=2)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    (coupon,) = (await _get(fake, "/api/v1/applied_coupons"))["applied_coupons"]
    assert (coupon["status"], coupon["frequency_duration_remaining"]) == ("active", 1)
    clock.now = datetime(2026, 5, 1, 0, 0, 1, tzinfo=UTC)
    assert [_totals(i)[1:3] for i in await _invoices(fake)] == [(500, 2600), (500, 2600), (0, 3100)]
    (coupon,) = (await _get(fake, "/api/v1/applied_coupons"))["applied_coupons"]
    assert (coupon["status"], coupon["frequency_duration_remaining"]) == ("terminated", 0)


async def test_a_once_fixed_coupon_spreads_its_amount_and_a_forever_one_stays() -> None:
    """A 4000-cent ``once`` coupon: March's 3100 takes 3100 (sub-total 0, ``succeeded``), April's the 900 left,
    then it is terminated; a ``forever`` 100-cent coupon applied after it gives nothing while the invoice is at 0,
    then 100 in April, and stays active."""
    fake, clock = _fake()
    fake.add_applied_coupon("org", "big_once", amount_cents=4000, frequency="once")
    clock.now = datetime(2026, 3, 1, 0, 0, 1, tzinfo=UTC)
    fake.add_applied_coupon("org", "always", amount_cents=100, frequency="forever")
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    (march,) = await _invoices(fake)
    assert _totals(march)[:3] == (3100, 3100, 0) and march["payment_status"] == "succeeded"
    coupons = {c["coupon_code"]: c for c in (await _get(fake, "/api/v1/applied_coupons"))["applied_coupons"]}
    assert (coupons["big_once"]["status"], coupons["big_once"]["amount_cents_remaining"]) == ("active", 900)
    clock.now = APRIL
    (_, april) = await _invoices(fake)
    assert _totals(april)[:3] == (3100, 1000, 2100)
    coupons = {c["coupon_code"]: c for c in (await _get(fake, "/api/v1/applied_coupons"))["applied_coupons"]}
    assert coupons["big_once"]["status"] == "terminated" and coupons["always"]["status"] == "active"


async def test_a_trial_on_a_pay_in_advance_plan_is_billed_when_it_ends() -> None:
    """``p`` with a 5-day trial from 10 March: nothing is invoiced at the start; on 15 March (the trial's end) the
    invoice bills 15-31 March, 17 days = 1700, and ``subscription.trial_ended`` is sent with ``trial_ended_at``."""
    fake, clock = _fake(trial_period=5)
    start = datetime(2026, 3, 10, tzinfo=UTC)
    clock.now = start
    fake.add_subscription("org", "p", external_id="sub", subscription_at=start.isoformat())
    assert await _invoices(fake) == []
    clock.now = datetime(2026, 3, 15, 0, 0, 1, tzinfo=UTC)
    (invoice,) = await _invoices(fake)
    assert invoice["fees_amount_cents"] == 1700 and invoice["issuing_date"] == "2026-03-15"
    ended = [w["subscription"] for w in fake.emitted_webhooks if w["webhook_type"] == "subscription.trial_ended"]
    assert [s["trial_ended_at"] for s in ended] == ["2026-03-15T00:00:00Z"]
    assert not _webhook_errors(fake)
