"""An event timestamp is never written as negative zero.

``format_timestamp(-0.0)`` was ``"-0.000"``: -0.0 passed the hot path's ``0 <= value`` and ``f"{-0.0:.3f}"`` keeps
the sign; ``"-0"``, ``"-0.0"`` and ``Decimal("-0")`` passed the slow path's ``number < 0`` check and kept theirs
through ``quantize``. Any other negative is refused, even one that would round to zero.
"""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any

import pytest

from lago_org_billing import InvalidRequestError, LagoClient, OrgBilling
from lago_org_billing._ids import format_timestamp

NEGATIVE_ZEROS: list[Any] = [-0.0, "-0", "-0.0", " -0.000 ", "-0e5", Decimal("-0"), Decimal("-0.00"), Decimal("-0E+3")]


@pytest.mark.parametrize("value", NEGATIVE_ZEROS, ids=repr)
def test_a_negative_zero_is_written_as_zero(value: Any) -> None:
    assert format_timestamp(value) == "0.000"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, "0.000"),
        (0, "0.000"),
        ("0", "0.000"),
        (Decimal("0E-10"), "0.000"),
        (1e-9, "0.000"),
        (5e-324, "0.000"),
        ("0.0004", "0.000"),
        (Decimal("1E-30"), "0.000"),
        (0.0015, "0.002"),  # (the float's exact binary value, 0.00150000000000000003..., rounds up)
        (1.0, "1.000"),
    ],
    ids=repr,
)
def test_zero_and_tiny_timestamps(value: Any, expected: str) -> None:
    assert format_timestamp(value) == expected


@pytest.mark.parametrize("value", [-1e-9, -5e-324, "-0.0004", "-1e-10", Decimal("-1E-30"), -1, "-0.001"], ids=repr)
def test_a_negative_timestamp_is_refused_even_when_it_rounds_to_zero(value: Any) -> None:
    with pytest.raises(InvalidRequestError, match=">= 0"):
        format_timestamp(value)


def test_no_timestamp_is_written_negative() -> None:
    """Random floats, their texts and Decimals around 0 (and each zero's sign flipped): each is refused (a negative)
    or written without a "-"."""
    rng = random.Random(32)
    values: list[Any] = [0.0, -0.0]
    for _ in range(2000):
        number = rng.choice([-1, 1]) * rng.random() * 10.0 ** rng.randint(-330, 2)
        values += [number, repr(number), Decimal(repr(number)), Decimal(repr(number)).quantize(Decimal("0.001"))]
    for value in values:
        try:
            text = format_timestamp(value)
        except InvalidRequestError:
            assert Decimal(str(value)) < 0, value
            continue
        assert not text.startswith("-"), (value, text)
        assert Decimal(text) == Decimal(str(value)).quantize(Decimal("0.001")) or isinstance(value, float), value


@pytest.mark.anyio
async def test_record_usage_at_negative_zero_sends_zero(fake_lago: Any, lago_client: LagoClient) -> None:
    """Through OrgBilling to the emulator: the event goes out with ``"0.000"``."""
    async with OrgBilling(client=lago_client) as billing:
        await billing.record_usage("org_1", "api_call", "tx_1", {"total_tokens": 1}, timestamp=-0.0)
    (sent,) = [r for r in fake_lago.requests if r.method == "POST" and r.path.endswith("/events")]
    assert sent.body["event"]["timestamp"] == "0.000"
    assert format_timestamp(dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) == "0.000"
