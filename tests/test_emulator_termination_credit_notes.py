"""Review of the emulator's termination of pay-in-advance plans (FakeLago credit notes on termination).

lago-api ``Subscriptions::TerminateService``: a subscription to a pay-in-advance plan terminated before the end of
the period it paid in advance gets a credit note for the unused days (``CreditNotes::CreateFromTermination``,
reason ``order_cancellation``), on the invoice of its last subscription fee, shaped by its
``on_termination_credit_note``:

* ``credit`` (Lago's default): ``credit_amount_cents`` = the unused days' price (``plan amount / period days`` a day,
  the days from the end of the termination's day to the end of the period);
* ``refund``: the part of it the customer paid is refunded (``paid share of the invoice - used days' price``, at
  most the unused price), the rest is a credit;
* ``offset``: the paid part is refunded, the rest is offset against the invoice (its ``total_due_amount_cents``
  shrinks by it);
* ``skip``: no credit note.

The emulator issued no credit note at all. ``on_termination_invoice=skip`` issues no termination invoice. Marking
an invoice paid (``PUT /invoices/{lago_id}`` with ``payment_status``, lago-api ``Invoices::UpdateService``: a
succeeded payment sets ``total_paid_amount_cents`` to the total) was not served (405), so a refund could not be
tested.

All subscriptions here: plan ``p`` at 3100 cents a month, paid in advance, calendar, started 1 March 2026 00:00 UTC
(March: 31 days, 100 cents a day), whose start invoice bills March in full: 3100.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from _openapi import assert_response_matches
from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = timezone.utc
MARCH = datetime(2026, 3, 1, tzinfo=UTC)
MID_MARCH = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


def _fake(*, pay_in_advance: bool = True, timezone_name: str | None = None) -> tuple[FakeLago, Clock]:
    clock = Clock(MARCH)
    fake = FakeLago(clock_jobs="boundary", api_key="k", clock=clock)
    fake.add_plan("p", amount_cents=3100, pay_in_advance=pay_in_advance)
    if timezone_name is not None:
        fake.add_customer("org", timezone=timezone_name)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    return fake, clock


async def _call(fake: FakeLago, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    async with fake.client() as client:
        response = await client.request(method, path, **kwargs)
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    body: dict[str, Any] = response.json()
    return body


async def _terminate(fake: FakeLago, **params: str) -> None:
    await _call(fake, "DELETE", "/api/v1/subscriptions/sub", params=params)


async def _credit_notes(fake: FakeLago) -> list[dict[str, Any]]:
    notes: list[dict[str, Any]] = (await _call(fake, "GET", "/api/v1/credit_notes"))["credit_notes"]
    return notes


async def _pay_start_invoice(fake: FakeLago) -> dict[str, Any]:
    (start,) = fake.invoices
    body = {"invoice": {"payment_status": "succeeded"}}
    invoice: dict[str, Any] = (await _call(fake, "PUT", f"/api/v1/invoices/{start['lago_id']}", json=body))["invoice"]
    return invoice


def _amounts(note: dict[str, Any]) -> tuple[int, int, int, int, int]:
    keys = ("total_amount_cents", "credit_amount_cents", "refund_amount_cents", "offset_amount_cents")
    return (*(int(note[k]) for k in keys), int(note["balance_amount_cents"]))  # type: ignore[return-value]


async def test_termination_credits_the_unused_days_by_default() -> None:
    """Terminated 15 March 12:00 with no ``on_termination_credit_note`` (Lago's default, ``credit``): the unused
    days run from the end of 15 March to 31 March, 31 - 15 = 16 days x 3100 / 31 = 1600 cents, all a credit: total
    1600, credit 1600, refund 0, offset 0, balance 1600, ``credit_status`` available, on the start invoice, one item
    of 1600 on its subscription fee. The termination invoice (charges only: none) is still issued; a
    ``credit_note.created`` webhook is sent."""
    fake, clock = _fake()
    (start,) = fake.invoices
    clock.now = MID_MARCH
    await _terminate(fake)
    (note,) = await _credit_notes(fake)
    assert _amounts(note) == (1600, 1600, 0, 0, 1600)
    assert note["credit_status"] == "available" and note["refund_status"] is None
    assert note["reason"] == "order_cancellation"
    assert note["lago_invoice_id"] == start["lago_id"]
    assert note["customer"]["external_id"] == "org"
    (item,) = note["items"]
    assert item["amount_cents"] == 1600
    invoice = (await _call(fake, "GET", f"/api/v1/invoices/{start['lago_id']}"))["invoice"]
    assert item["fee"]["lago_id"] == invoice["fees"][0]["lago_id"]
    assert len(fake.invoices) == 2
    assert [w["webhook_type"] for w in fake.emitted_webhooks if w["object_type"] == "credit_note"] == [
        "credit_note.created"
    ]


async def test_refund_of_an_unpaid_invoice_is_a_credit() -> None:
    """``refund`` on an invoice nobody paid: paid share 0 - used 15 days x 100 = -1500, nothing to refund, so the
    1600 stays a credit (lago-api ``calculate_refund``): credit 1600, refund 0."""
    fake, clock = _fake()
    clock.now = MID_MARCH
    await _terminate(fake, on_termination_credit_note="refund")
    (note,) = await _credit_notes(fake)
    assert _amounts(note) == (1600, 1600, 0, 0, 1600)


async def test_refund_of_a_paid_invoice_refunds_the_unused_days() -> None:
    """The start invoice marked paid (``PUT /invoices/{id}`` ``payment_status=succeeded``: ``total_paid_amount_cents``
    3100, due 0), then ``refund``: paid share 3100 x 3100/3100 = 3100, used 1-15 March = 15 days x 100 = 1500, so
    3100 - 1500 = 1600 may be refunded, at most the 1600 unused: refund 1600, credit 0, balance 0, ``refund_status``
    pending, ``credit_status`` available (Lago sets it on every credit note it makes)."""
    fake, clock = _fake()
    paid = await _pay_start_invoice(fake)
    assert (paid["payment_status"], paid["total_paid_amount_cents"], paid["total_due_amount_cents"]) == (
        "succeeded",
        3100,
        0,
    )
    clock.now = MID_MARCH
    await _terminate(fake, on_termination_credit_note="refund")
    (note,) = await _credit_notes(fake)
    assert _amounts(note) == (1600, 0, 1600, 0, 0)
    assert note["refund_status"] == "pending" and note["credit_status"] == "available"


async def test_offset_of_an_unpaid_invoice_reduces_what_it_still_owes() -> None:
    """``offset`` on the unpaid start invoice: nothing paid, nothing refunded; the 1600 unused is offset against the
    invoice: offset 1600, credit 0, refund 0; the invoice's ``total_due_amount_cents`` goes 3100 -> 1500 (its
    total stays 3100)."""
    fake, clock = _fake()
    (start,) = fake.invoices
    clock.now = MID_MARCH
    await _terminate(fake, on_termination_credit_note="offset")
    (note,) = await _credit_notes(fake)
    assert _amounts(note) == (1600, 0, 0, 1600, 0)
    invoice = (await _call(fake, "GET", f"/api/v1/invoices/{start['lago_id']}"))["invoice"]
    assert (invoice["total_amount_cents"], invoice["total_due_amount_cents"]) == (3100, 1500)


async def test_offset_of_a_paid_invoice_is_a_refund() -> None:
    """``offset`` once the start invoice is paid: as ``refund``, 3100 paid - 1500 used = 1600 refunded, 0 offset."""
    fake, clock = _fake()
    await _pay_start_invoice(fake)
    clock.now = MID_MARCH
    await _terminate(fake, on_termination_credit_note="offset")
    (note,) = await _credit_notes(fake)
    assert _amounts(note) == (1600, 0, 1600, 0, 0)


async def test_skip_issues_no_credit_note_and_skip_invoice_no_invoice() -> None:
    """``on_termination_credit_note=skip``: no credit note; ``on_termination_invoice=skip`` too: no termination
    invoice, only the start one."""
    fake, clock = _fake()
    clock.now = MID_MARCH
    await _terminate(fake, on_termination_credit_note="skip", on_termination_invoice="skip")
    assert await _credit_notes(fake) == []
    assert len(fake.invoices) == 1


async def test_invoice_skip_still_credits_the_unused_days() -> None:
    """``on_termination_invoice=skip`` alone: no termination invoice, the 1600 credit note all the same."""
    fake, clock = _fake()
    clock.now = MID_MARCH
    await _terminate(fake, on_termination_invoice="skip")
    assert len(fake.invoices) == 1
    (note,) = await _credit_notes(fake)
    assert _amounts(note) == (1600, 1600, 0, 0, 1600)


async def test_ending_at_reached_credits_per_the_subscription_setting() -> None:
    """``PUT /subscriptions/sub`` with ``ending_at`` 20 March 00:00 and ``on_termination_credit_note=refund``,
    the start invoice paid; read on 21 March: terminated at 20 March 00:00, unused 31 - 20 = 11 days = 1100,
    used 1-20 March = 20 days = 2000, 3100 - 2000 = 1100 refundable: refund 1100, credit 0."""
    fake, clock = _fake()
    await _pay_start_invoice(fake)
    body = {"subscription": {"ending_at": "2026-03-20T00:00:00Z", "on_termination_credit_note": "refund"}}
    await _call(fake, "PUT", "/api/v1/subscriptions/sub", json=body)
    clock.now = datetime(2026, 3, 21, tzinfo=UTC)
    (note,) = await _credit_notes(fake)
    assert _amounts(note) == (1100, 0, 1100, 0, 0)
    sub = (await _call(fake, "GET", "/api/v1/subscriptions/sub", params={"status": "terminated"}))["subscription"]
    assert sub["terminated_at"] == "2026-03-20T00:00:00Z"


async def test_customer_time_zone_counts_the_unused_days_locally() -> None:
    """A Los Angeles customer (UTC-7 in March after the 8th), terminated 15 March 01:00 UTC = 14 March 18:00 local:
    the end of that local day is 15 March 06:59:59 UTC (date 15 March), the period's local end 31 March 23:59:59
    PDT = 1 April 06:59:59 UTC (date 1 April), so 17 unused days. March's local period (1 March 08:00 UTC to 1
    April 07:00 UTC) has 31 days: 17 x 100 = 1700 (lago-api's own example, with a Los Angeles customer: 17 days)."""
    fake, clock = _fake(timezone_name="America/Los_Angeles")
    clock.now = datetime(2026, 3, 15, 1, 0, tzinfo=UTC)
    await _terminate(fake)
    (note,) = await _credit_notes(fake)
    assert _amounts(note)[:2] == (1700, 1700)


async def test_plan_paid_in_arrears_gets_no_credit_note() -> None:
    """A plan paid in arrears was not paid ahead: its termination bills the used days, no credit note."""
    fake, clock = _fake(pay_in_advance=False)
    clock.now = MID_MARCH
    await _terminate(fake)
    assert await _credit_notes(fake) == []


async def test_updating_an_unknown_invoice_is_a_404() -> None:
    """``PUT /invoices/{unknown}``: ``404 invoice_not_found``; a payment_status Lago does not know: 422."""
    fake, _ = _fake()
    (start,) = fake.invoices
    async with fake.client() as client:
        missing = await client.put(
            "/api/v1/invoices/00000000-0000-4000-8000-000000000000", json={"invoice": {"payment_status": "failed"}}
        )
        bad = await client.put(f"/api/v1/invoices/{start['lago_id']}", json={"invoice": {"payment_status": "paid"}})
    assert missing.status_code == 404 and missing.json()["code"] == "invoice_not_found"
    assert bad.status_code == 422, bad.text
