"""Usage events as Lago takes them."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from ._errors import InvalidRequestError
from ._ids import format_timestamp

__all__ = ["MAX_BATCH_SIZE", "event_payload", "normalize_event"]

#: Lago's ``POST /events/batch`` limit (``LAGO_EVENTS_BATCH_MAX_LENGTH``, 100 by default).
MAX_BATCH_SIZE = 100


def event_payload(
    *,
    transaction_id: str,
    external_subscription_id: str,
    code: str,
    properties: Mapping[str, Any] | None = None,
    timestamp: dt.datetime | float | int | str | Decimal | None = None,
    precise_total_amount_cents: str | Decimal | int | None = None,
) -> dict[str, Any]:
    """One event body for ``POST /events`` or an item of ``POST /events/batch``, validated.

    The timestamp is fixed here (now when omitted) as a string with millisecond precision, so that a resend is
    byte-identical: Lago's ClickHouse store deduplicates on ``transaction_id`` *and* ``timestamp``.
    """
    for name, value in (
        ("transaction_id", transaction_id),
        ("external_subscription_id", external_subscription_id),
        ("code", code),
    ):
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"Event {name} must be a non-empty string, got {value!r}.")
    payload: dict[str, Any] = {
        "transaction_id": transaction_id,
        "external_subscription_id": external_subscription_id,
        "code": code,
        "timestamp": format_timestamp(timestamp),
        "properties": _check_properties(properties or {}),
    }
    if precise_total_amount_cents is not None:
        payload["precise_total_amount_cents"] = str(precise_total_amount_cents)
    return payload


def normalize_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a raw event mapping (as a user may build it) and fix its timestamp format."""
    unknown = set(event) - {
        "transaction_id",
        "external_subscription_id",
        "code",
        "properties",
        "timestamp",
        "precise_total_amount_cents",
    }
    if unknown:
        hint = " (Lago no longer accepts external_customer_id on events)" if "external_customer_id" in unknown else ""
        raise InvalidRequestError(f"Event has fields Lago does not accept: {sorted(unknown)}{hint}.")
    return event_payload(
        transaction_id=event.get("transaction_id"),  # type: ignore[arg-type]  # validated inside
        external_subscription_id=event.get("external_subscription_id"),  # type: ignore[arg-type]
        code=event.get("code"),  # type: ignore[arg-type]
        properties=event.get("properties"),
        timestamp=event.get("timestamp"),
        precise_total_amount_cents=event.get("precise_total_amount_cents"),
    )


def _check_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(properties, Mapping):
        raise InvalidRequestError(f"Event properties must be a mapping, got {type(properties).__name__}.")
    result = dict(properties)
    for key, value in result.items():
        if not isinstance(key, str):
            raise InvalidRequestError(f"Event property names must be strings, got {key!r}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"Event property {key!r} is {value!r}, which JSON cannot carry.")
    try:
        text = json.dumps(result, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"Event properties must be JSON-serialisable: {exc}.") from None
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate, as json.loads makes of a client's "\ud800": no UTF-8
            raise InvalidRequestError(
                "Event properties must be valid Unicode text: a value holds a lone surrogate (e.g. '\\ud800' from a "
                "client's JSON), which cannot be sent. Clean it (str.encode('utf-8', 'replace').decode())."
            ) from None
    return result
