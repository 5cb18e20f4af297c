"""Event timestamps and amounts do not depend on the caller's :mod:`decimal` context.

A money application commonly sets its thread's context (a small precision, ``ROUND_FLOOR``, a trapped ``Inexact``):
the event helpers must still give the same timestamp text for the same instant, and refuse only with an
:class:`InvalidRequestError`.
"""

from __future__ import annotations

import decimal
from decimal import Context, Decimal, localcontext

import pytest

from lago_org_billing._errors import InvalidRequestError
from lago_org_billing._events import event_payload, normalize_event
from lago_org_billing._ids import format_timestamp

_EVENT = {"transaction_id": "tx_1", "external_subscription_id": "org_1_main", "code": "api_call"}

_CONTEXTS = [
    pytest.param(Context(prec=6), id="prec-6"),
    pytest.param(Context(rounding=decimal.ROUND_FLOOR), id="floor"),
    pytest.param(Context(rounding=decimal.ROUND_CEILING), id="ceiling"),
    pytest.param(Context(traps=[decimal.Inexact, decimal.Rounded]), id="trapped-inexact"),
]


@pytest.mark.parametrize("context", _CONTEXTS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1767225600, "1767225600.000"),
        ("1767225600.1235", "1767225600.124"),
        (Decimal("1767225600.1235"), "1767225600.124"),
        ("1767225600.1225", "1767225600.122"),
    ],
)
def test_timestamp_text_is_the_same_in_any_caller_context(context: Context, value: object, expected: str) -> None:
    assert format_timestamp(value) == expected  # type: ignore[arg-type]
    with localcontext(context):
        assert format_timestamp(value) == expected  # type: ignore[arg-type]
        assert event_payload(**_EVENT, timestamp=value)["timestamp"] == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("context", _CONTEXTS)
def test_amount_is_checked_exactly_in_any_caller_context(context: Context) -> None:
    with localcontext(context):
        sent = normalize_event({**_EVENT, "precise_total_amount_cents": "12345678.91"})
        assert sent["precise_total_amount_cents"] == "12345678.91"
        with pytest.raises(InvalidRequestError, match="under 10\\*\\*25"):
            normalize_event({**_EVENT, "precise_total_amount_cents": "1e25"})


def test_amount_just_under_the_limit_past_the_default_precision_is_kept() -> None:
    # 25 digits before the point and 5 after: 30 digits, past the default context's 28, still under 10**25
    amount = "9999999999999999999999999.99999"
    assert normalize_event({**_EVENT, "precise_total_amount_cents": amount})["precise_total_amount_cents"] == amount
