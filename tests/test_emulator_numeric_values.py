"""Which event property values the emulator's sum, max, latest and weighted sum read as numbers: those lago-api reads.

lago-api's event store (``Events::Stores::PostgresStore`` with ``numeric_property``, set by ``SumService``,
``MaxService``, ``LatestService`` and ``WeightedSumService``) keeps only the events whose property's text
(``properties ->> field``) matches ``^-?\\d+(\\.\\d+)?$``; the others are left out of the units and of
``events_count``, never refused at ingestion. The emulator read values with ``Decimal``, which takes "1e3", " 5",
"+5", "5.", ".5", "1_000", "5\\n" and other scripts' digits: it billed (and counted) events Lago leaves out.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from _openapi import assert_response_matches
from _pinned_clock import Clock
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = timezone.utc
MARCH = datetime(2026, 3, 1, tzinfo=UTC)

#: (a property's value, the number Lago reads in it or None when Lago leaves the event out)
VALUES: list[tuple[Any, Decimal | None]] = [
    # numbers as Lago reads them: JSON numbers, and text of ASCII digits with an optional "-" and fraction
    (5, Decimal(5)),
    (2.5, Decimal("2.5")),
    ("5", Decimal(5)),
    ("-5.25", Decimal("-5.25")),
    ("007", Decimal(7)),
    ("-0", Decimal(0)),
    ("12.50", Decimal("12.5")),
    ("0.000001", Decimal("0.000001")),
    ("1234567890.123456789", Decimal("1234567890.123456789")),
    # text Decimal reads but Lago's regex does not (the emulator billed these)
    ("1e3", None),
    (" 5", None),
    ("5 ", None),
    ("+5", None),
    ("5.", None),
    (".5", None),
    ("1_000", None),
    ("5\n", None),
    ("\u0663", None),  # ARABIC-INDIC DIGIT THREE
    # neither reads these (kept as guards)
    ("NaN", None),
    ("Infinity", None),
    ("-Infinity", None),
    ("1,5", None),
    ("--5", None),
    ("-", None),
    ("", None),
    ("abc", None),
    ("0x10", None),
    (True, None),
    (None, None),
    ([5], None),
    ({"v": 5}, None),
]

#: each aggregation's metric code and the value of the event sent before the one tested
BASES = {"sum_agg": ("s", 10), "max_agg": ("x", 0), "latest_agg": ("l", 7), "weighted_sum_agg": ("w", 10)}


def _expected(aggregation: str, number: Decimal | None) -> tuple[Decimal, int]:
    """The units (``total_aggregated_units`` for the weighted sum, whose ``units`` weigh by time) and events count
    Lago's event store gives: the base event's alone when it leaves the tested one out."""
    base = Decimal(BASES[aggregation][1])
    if number is None:
        return base, 1
    units = {"sum_agg": base + number, "max_agg": max(base, number), "latest_agg": number}.get(aggregation)
    if units is None:  # the weighted sum's plain sum (lago-api's ``variation``)
        return base + number, 2
    return max(units, Decimal(0)), 2  # (negative units bill nothing: Fees::ChargeService#init_fee)


@pytest.mark.parametrize(("value", "number"), VALUES, ids=[repr(v) for v, _ in VALUES])
async def test_only_what_lagos_numeric_condition_matches_is_aggregated(value: Any, number: Decimal | None) -> None:
    clock = Clock(MARCH)
    fake = FakeLago(api_key="k", clock=clock)
    charges = []
    for aggregation, (code, _) in BASES.items():
        fake.add_billable_metric(code, aggregation_type=aggregation, field_name="v")
        charges.append({"billable_metric_code": code, "charge_model": "standard", "properties": {"amount": "1"}})
    fake.add_plan("p", charges=charges)
    fake.add_subscription("org", "p", external_id="sub", subscription_at=MARCH.isoformat())
    clock.now = datetime(2026, 3, 10, tzinfo=UTC)
    events = []
    for code, base in BASES.values():
        for day, v in ((2, base), (3, value)):
            at = datetime(2026, 3, day, tzinfo=UTC).timestamp()
            events.append(
                {
                    "transaction_id": f"{code}{day}",
                    "external_subscription_id": "sub",
                    "code": code,
                    "timestamp": at,
                    "properties": {"v": v},
                }
            )
    async with fake.client() as client:
        sent = await client.post("/api/v1/events/batch", json={"events": events})
        assert sent.status_code == 200, sent.text  # (never refused: Lago leaves the event out when it aggregates)
        response = await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "sub"})
    assert response.status_code == 200, response.text
    assert_response_matches(response)
    usage = {c["billable_metric"]["code"]: c for c in response.json()["customer_usage"]["charges_usage"]}
    for aggregation, (code, _) in BASES.items():
        units, count = _expected(aggregation, number)
        got = usage[code]
        read = got["total_aggregated_units"] if aggregation == "weighted_sum_agg" else got["units"]
        assert (Decimal(read), got["events_count"]) == (units, count), (aggregation, got)
