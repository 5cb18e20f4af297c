"""ISO 8601 times read the same on every Python the package supports (``requires-python >= 3.10``).

``datetime.fromisoformat`` reads much more from Python 3.11 on (week dates, ``20260315`` alone, ``T1230``, ``+05``
offsets, offsets with seconds' fractions) than 3.10's, and ``date.fromisoformat`` too: the emulator answered
``POST /subscriptions`` with ``"subscription_at": "2026-W11-1"`` 200 on 3.11+ (subscribed from 9 March) and 422 on
3.10, and Lago itself refuses a week date (ActiveSupport's ``Time.zone.iso8601`` needs a year, month and day).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from lago_org_billing._ids import iso_datetime, parse_time
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._util import parse_datetime, written_date

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc

#: Read by every Python's ``fromisoformat`` or by the package's own basic-format reading.
READ = [
    ("2026-03-15", dt.datetime(2026, 3, 15, tzinfo=UTC)),
    ("2026-03-15T12", dt.datetime(2026, 3, 15, 12, tzinfo=UTC)),
    ("2026-03-15 12:30", dt.datetime(2026, 3, 15, 12, 30, tzinfo=UTC)),
    ("2026-03-15T12:30:45Z", dt.datetime(2026, 3, 15, 12, 30, 45, tzinfo=UTC)),
    ("2026-03-15T12:30:45.123456789Z", dt.datetime(2026, 3, 15, 12, 30, 45, 123456, tzinfo=UTC)),
    ("2026-03-15T12:30:45,5+05:30", dt.datetime(2026, 3, 15, 7, 0, 45, 500000, tzinfo=UTC)),
    ("20260315T123045Z", dt.datetime(2026, 3, 15, 12, 30, 45, tzinfo=UTC)),
]

#: Read by 3.11's ``fromisoformat`` (or ``date.fromisoformat``) only: refused on every Python.
REFUSED = [
    "2026-W11-1",
    "2026-W11",
    "2026-W11-1T00:00:00Z",
    "20260315",
    "20260315T1230",
    "2026-03-15T1230",
    "2026-03-15T12:30:45+05",
    "2026-03-15T12:30:45.123+01",
    "2026-03-15T12:30:45+05:30:15.5",
]


@pytest.mark.parametrize(("text", "expected"), READ)
def test_a_time_every_python_reads(text: str, expected: dt.datetime) -> None:
    assert parse_datetime(text) == expected
    assert parse_time(text) == expected
    assert written_date(text) == dt.date(2026, 3, 15)  # (in its own offset)


@pytest.mark.parametrize("text", REFUSED)
def test_a_time_only_newer_pythons_read_is_refused_on_every_python(text: str) -> None:
    assert parse_datetime(text) is None
    assert parse_time(text) is None
    assert written_date(text) is None
    with pytest.raises(ValueError):
        iso_datetime(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("subscription_at", ["2026-W11-1", "2026-W11-1T00:00:00Z"])
async def test_the_emulator_refuses_a_week_date_as_lago_does(subscription_at: str) -> None:
    fake = FakeLago(api_key="k")
    fake.add_plan("p", amount_cents=0)
    fake.add_customer(external_id="c")
    body: dict[str, Any] = {
        "subscription": {
            "external_customer_id": "c",
            "plan_code": "p",
            "external_id": "s",
            "subscription_at": subscription_at,
        }
    }
    async with fake.client() as client:
        response = await client.post("/api/v1/subscriptions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error_details"] == {"subscription_at": ["invalid_date"]}


@pytest.mark.parametrize("day", ["20260315", "2026-W11-1", "2026-W11-7", " 20260315 "])
async def test_an_invoice_issuing_date_only_newer_pythons_read_is_ignored_on_every_python(day: str) -> None:
    """``GET /invoices?issuing_date_from=...&issuing_date_to=...``: Lago filters by a day it reads with Ruby's
    ``Date.strptime(value)`` (``%F``, ``YYYY-MM-DD``) and ignores any other text (``InvoiceIndex``, ``valid_date?``).
    The emulator read the days with ``date.fromisoformat``: on 3.11+ ``20260315`` and week dates filtered the list,
    on 3.10 they were ignored."""
    fake = FakeLago(api_key="k")
    fake.add_customer(external_id="c")
    for issued in ("2026-03-01", "2026-03-15", "2026-03-31"):
        fake.add_invoice("c", issuing_date=issued)
    async with fake.client() as client:
        listed = []
        for params in ({}, {"issuing_date_from": day}, {"issuing_date_to": day}):
            response = await client.get("/api/v1/invoices", params=params)
            assert response.status_code == 200, response.text
            listed.append(sorted(invoice["issuing_date"] for invoice in response.json()["invoices"]))
        by_day = await client.get("/api/v1/invoices", params={"issuing_date_from": "2026-03-15"})
    assert listed == [["2026-03-01", "2026-03-15", "2026-03-31"]] * 3
    assert sorted(invoice["issuing_date"] for invoice in by_day.json()["invoices"]) == ["2026-03-15", "2026-03-31"]
