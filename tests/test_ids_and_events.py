from __future__ import annotations

import datetime as dt

import pytest

from lago_org_billing import InvalidIdentifierError, InvalidRequestError
from lago_org_billing._events import event_payload, normalize_event
from lago_org_billing._ids import format_timestamp, path_segment, validate_id


@pytest.mark.parametrize("value", ["org_123", "9f1c2d3e-aaaa-bbbb-cccc-1234567890ab", "acme:eu", "user@acme"])
def test_valid_ids_pass(value: str) -> None:
    """Ids made of letters, digits, '-', '_', ':' and '@' are accepted."""
    assert validate_id(value) == value


@pytest.mark.parametrize("value", ["", " org", "org ", "acme.com", "a/b", "a?b", "a#b", "a%2Fb", "a\nb", "x" * 256])
def test_unaddressable_ids_are_rejected(value: str) -> None:
    """Ids Lago cannot take in a URL path get a clear error before any call."""
    with pytest.raises(InvalidIdentifierError):
        validate_id(value, "org_id")


def test_dotted_id_error_explains_rails_format_split() -> None:
    """The error for a dotted id says why and what to do."""
    with pytest.raises(InvalidIdentifierError, match="acme-com"):
        validate_id("acme.com", "org_id")


def test_path_segment_percent_encodes() -> None:
    """Path segments are percent-encoded."""
    assert path_segment("user@acme:eu") == "user%40acme%3Aeu"


def test_non_string_id_is_rejected() -> None:
    """An int id is a clear error, not a silent str()."""
    with pytest.raises(InvalidIdentifierError, match="string"):
        validate_id(123)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1651240791.123, "1651240791.123"),
        (1651240791, "1651240791.000"),
        ("1651240791.5", "1651240791.500"),
        (dt.datetime(2026, 1, 1, 0, 0, 0, 123999, tzinfo=dt.timezone.utc), "1767225600.123"),
        (dt.datetime(2026, 1, 1, 1, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))), "1767225600.000"),
    ],
)
def test_timestamps_keep_milliseconds(value: object, expected: str) -> None:
    """Timestamps go out as strings with millisecond precision, never truncated integers."""
    assert format_timestamp(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [dt.datetime(2026, 1, 1), "yesterday", float("nan"), -1, True, 1_700_000_000_000])
def test_bad_timestamps_are_rejected(value: object) -> None:
    """Naive datetimes, garbage, negative and millisecond values are clear errors."""
    with pytest.raises(InvalidRequestError):
        format_timestamp(value)  # type: ignore[arg-type]


def test_event_payload_fixes_timestamp_once() -> None:
    """An event built without a timestamp gets one, fixed, as a string."""
    payload = event_payload(transaction_id="tx_1", external_subscription_id="org_1", code="api_call")
    assert isinstance(payload["timestamp"], str)
    assert payload["properties"] == {}
    assert normalize_event(payload) == payload


@pytest.mark.parametrize(
    "event",
    [
        {"transaction_id": "", "external_subscription_id": "s", "code": "c"},
        {"transaction_id": "t", "code": "c"},
        {"transaction_id": "t", "external_subscription_id": "s", "code": "c", "external_customer_id": "x"},
        {"transaction_id": "t", "external_subscription_id": "s", "code": "c", "properties": {"x": object()}},
        {"transaction_id": "t", "external_subscription_id": "s", "code": "c", "properties": {"x": float("inf")}},
        {"transaction_id": "t", "external_subscription_id": "s", "code": "c", "properties": [1]},
    ],
)
def test_bad_events_are_rejected(event: dict[str, object]) -> None:
    """Events Lago would reject (or that could not be serialised) fail before sending."""
    with pytest.raises(InvalidRequestError):
        normalize_event(event)
