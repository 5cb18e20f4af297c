"""Usage events as Lago takes them."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ._errors import InvalidRequestError
from ._ids import format_timestamp

__all__ = ["MAX_BATCH_SIZE", "event_payload", "normalize_event"]

#: Lago's ``POST /events/batch`` limit (``LAGO_EVENTS_BATCH_MAX_LENGTH``, 100 by default).
MAX_BATCH_SIZE = 100

#: The longest ``transaction_id``, ``external_subscription_id`` or ``code``, in bytes of UTF-8: Lago's Postgres event
#: store indexes them in btrees (``index_unique_transaction_id`` is organization, subscription and transaction id),
#: whose rows hold at most 2,704 bytes; a longer row is a 500 from Lago, not a 422.
MAX_ID_BYTES = 1024

#: ``precise_total_amount_cents`` is a ``decimal(40, 15)`` column: at most 25 digits before the point.
_MAX_AMOUNT = Decimal(10) ** 25

#: Postgres' ``numeric``, which Lago casts a property to when it sums it (``properties->>'field'``), holds at most
#: 131,072 digits before the point and 16,383 after it. A Decimal past them is refused: written out as plain text it
#: is as long as its exponent says (``Decimal("1E+99999999")``, 12 characters, is 100 MB of digits), and Lago could
#: not sum it anyway.
_MAX_ADJUSTED = 131_071
_MIN_EXPONENT = -16_383


def event_payload(
    *,
    transaction_id: str,
    external_subscription_id: str,
    code: str,
    properties: Mapping[str, Any] | None = None,
    timestamp: dt.datetime | float | int | str | Decimal | None = None,
    precise_total_amount_cents: str | Decimal | int | float | None = None,
) -> dict[str, Any]:
    """One event body for ``POST /events`` or an item of ``POST /events/batch``, validated.

    The timestamp is fixed here (now when omitted) as a string with millisecond precision, so that a resend is
    byte-identical: Lago's ClickHouse store deduplicates on ``transaction_id`` *and* ``timestamp``.
    """
    try:
        ids = "\n".join((transaction_id, external_subscription_id, code))
    except TypeError:  # (not strings: said by _check_id)
        ids = "\x00"
    if not (  # one pass for plain ids (ASCII, no NUL, all three within the size); the others one by one, said exactly
        ids.isascii()
        and len(ids) <= MAX_ID_BYTES
        and "\x00" not in ids
        and transaction_id.strip()
        and code.strip()
        and external_subscription_id
        and external_subscription_id == external_subscription_id.strip()
    ):
        for name, value in (
            ("transaction_id", transaction_id),
            ("external_subscription_id", external_subscription_id),
            ("code", code),
        ):
            _check_id(name, value)
        if external_subscription_id != external_subscription_id.strip():
            raise InvalidRequestError(
                f"Event external_subscription_id {external_subscription_id!r} has leading or trailing blanks: Lago "
                "strips them from the subscriptions it creates, so the event would never be billed."
            )
    payload: dict[str, Any] = {
        "transaction_id": transaction_id,
        "external_subscription_id": external_subscription_id,
        "code": code,
        "timestamp": _timestamp(timestamp),
        "properties": _check_properties(properties or {}),
    }
    if precise_total_amount_cents is not None:
        payload["precise_total_amount_cents"] = str(precise_total_amount_cents)
    return payload


def _timestamp(value: Any) -> str:
    """:func:`format_timestamp`, with a value of a type it cannot read (a date, bytes...) an
    :class:`InvalidRequestError` that says what to give, not the ``TypeError`` of ``Decimal(value)``."""
    try:
        return format_timestamp(value)
    except TypeError:
        hint = (
            ": a date is a day, not an instant; give its start in the zone you mean, e.g. "
            "datetime.combine(day, time(), tzinfo=timezone.utc)"
            if isinstance(value, dt.date)
            else ""
        )
        raise InvalidRequestError(
            f"Event timestamp {value!r} must be a timezone-aware datetime, or Unix seconds as a number or a decimal "
            f"string (now when omitted){hint}."
        ) from None


def _check_id(name: str, value: object) -> None:
    """An id field Lago can store: a non-empty string without NUL (Postgres text has none: a 500 from Lago) or lone
    surrogates (no UTF-8), at most :data:`MAX_ID_BYTES` long."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"Event {name} must be a non-empty string, got {value!r}.")
    if "\x00" in value:
        raise InvalidRequestError(
            f"Event {name} {value!r} contains a NUL character, which Lago's database cannot store (it answers 500)."
        )
    size = len(value)
    if not value.isascii():
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise InvalidRequestError(
                f"Event {name} {value!r} holds a lone surrogate (e.g. '\\ud800' from a client's JSON): no valid "
                "Unicode text, which cannot be sent."
            ) from None
    if size > MAX_ID_BYTES:
        raise InvalidRequestError(
            f"Event {name} is {size} bytes long (UTF-8); Lago's event index takes at most {MAX_ID_BYTES} bytes."
        )


def _check_amount(value: object) -> str | None:
    """``precise_total_amount_cents`` of a user's event (:func:`normalize_event`) as a plain decimal string. Lago
    casts it with Rails' ``String#to_d``, which bills ``"12,5"`` as 12 and ``"abc"`` as 0 without a word: anything but
    a finite number is refused here."""
    if value is None:
        return None
    number: Decimal | None = None
    if isinstance(value, (str, int, float, Decimal)) and not isinstance(value, bool):
        try:
            text = value.strip() if isinstance(value, str) else str(value) if isinstance(value, float) else value
            number = Decimal(text)
        except (InvalidOperation, ValueError):
            number = None
    if (
        number is None
        or not number.is_finite()
        # (copy_abs, not abs(): exact, where abs() rounds to the caller's context, which refused 25-digit amounts just
        # under the limit past its precision, and raised decimal.Inexact where a caller traps it)
        or number.copy_abs() >= _MAX_AMOUNT
        or number.as_tuple().exponent < _MIN_EXPONENT  # type: ignore[operator]  # (an int: the number is finite)
    ):
        raise InvalidRequestError(
            f"Event precise_total_amount_cents must be a finite number of cents (a decimal string such as "
            f"'1234.56', under 10**25, at most 16383 digits after the point), got {value!r}."
        )
    return f"{number:f}"


def normalize_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a raw event mapping (as a user may build it) and fix its timestamp format."""
    if not isinstance(event, Mapping):
        raise InvalidRequestError(
            "An event is a mapping such as {'transaction_id': ..., 'external_subscription_id': ..., 'code': ..., "
            f"'properties': {{...}}}}, got {type(event).__name__}: nothing was sent."
        )
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
        precise_total_amount_cents=_check_amount(event.get("precise_total_amount_cents")),
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
        try:
            text = json.dumps(result, allow_nan=False, ensure_ascii=False)
        except TypeError as exc:  # a Decimal (money from a database) is sent as its exact text; anything else refused
            plain = _decimals_as_text(result, "")
            if plain is result:
                raise InvalidRequestError(f"Event properties must be JSON-serialisable: {exc}.") from None
            result = plain
            text = json.dumps(result, allow_nan=False, ensure_ascii=False)
        # A NUL is JSON's escape "\\u0000" (or text ending with a backslash goes on with "u0000"): no backslash, no
        # NUL, found with one memchr (most events), not a search of the whole text
        path = _nul_path(result) if "\\" in text and "\\u0000" in text else None
    except InvalidRequestError:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"Event properties must be JSON-serialisable: {exc}.") from None
    except RecursionError:
        raise InvalidRequestError("Event properties are nested too deeply to be sent as JSON.") from None
    if path is not None:
        raise InvalidRequestError(
            f"Event property {path} contains a NUL character (\\u0000), which Lago's database cannot store (it "
            "answers 500). Remove it (value.replace('\\x00', ''))."
        )
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate, as json.loads makes of a client's "\ud800": no UTF-8
            raise InvalidRequestError(
                "Event properties must be valid Unicode text: a value holds a lone surrogate (e.g. '\\ud800' from a "
                "client's JSON), which cannot be sent. Clean it (str.encode('utf-8', 'replace').decode())."
            ) from None
    return result


def _decimals_as_text(value: Any, path: str) -> Any:
    """``value`` with its finite :class:`~decimal.Decimal`\\ s (at any depth) as plain decimal strings, which Lago
    aggregates as the numbers they are (``properties->>'field'`` cast to numeric), exactly; ``value`` itself when it
    holds none. A NaN or an infinity is refused, as a float's is."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidRequestError(f"Event property {path!r} is {value!r}, which JSON cannot carry.")
        # (a zero's exponent past numeric's is written "0": kept)
        if (value and value.adjusted() > _MAX_ADJUSTED) or value.as_tuple().exponent < _MIN_EXPONENT:  # type: ignore[operator]
            raise InvalidRequestError(
                f"Event property {path!r} is {value!r}, past what Lago can sum as a number (Postgres numeric: "
                "131072 digits before the point, 16383 after it). Round it (value.quantize(Decimal('0.0001'))) "
                "or leave it out."
            )
        return f"{value:f}"
    if isinstance(value, dict):
        items = {key: _decimals_as_text(item, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
        return value if all(items[key] is item for key, item in value.items()) else items
    if isinstance(value, (list, tuple)):
        listed = [_decimals_as_text(item, f"{path}[{index}]") for index, item in enumerate(value)]
        return value if all(new is old for new, old in zip(listed, value, strict=True)) else listed
    return value


def _nul_path(value: object, path: str = "") -> str | None:
    """Where a NUL is in a JSON document of properties (a key or a string value, at any depth), or ``None``."""
    if isinstance(value, str):
        return repr(path) if "\x00" in value else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return repr(where) + " (its name)"
            found = _nul_path(item, where)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None
