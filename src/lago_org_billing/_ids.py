"""Ids that go into Lago URL paths, and event timestamps."""

from __future__ import annotations

import datetime as dt
import math
import re
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from urllib.parse import quote

from ._errors import InvalidIdentifierError, InvalidRequestError

__all__ = ["format_timestamp", "path_segment", "validate_id"]

# Rails splits a path segment at "." (``acme.com`` becomes id ``acme`` + format ``com``) on most Lago routes,
# and no route takes "/". "?" and "#" would end the path. Control characters and surrounding blanks never
# round-trip (Lago strips external ids).
_FORBIDDEN = re.compile(r"[./?#%\\\x00-\x1f\x7f\ud800-\udfff]")
MAX_ID_LENGTH = 255


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if Lago can address it in a URL path, else raise :class:`InvalidIdentifierError`."""
    if not isinstance(value, str):
        raise InvalidIdentifierError(f"{what} must be a string, got {type(value).__name__}.")
    if not value:
        raise InvalidIdentifierError(f"{what} must not be empty.")
    if value != value.strip():
        raise InvalidIdentifierError(f"{what} {value!r} has leading or trailing blanks; Lago would strip them.")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdentifierError(f"{what} is longer than {MAX_ID_LENGTH} characters.")
    bad = _FORBIDDEN.search(value)
    if bad:
        char = bad.group()
        why = {
            ".": "Rails reads 'acme.com' as id 'acme' in format 'com'",
            "/": "it separates path segments",
            "?": "it starts the query string",
            "#": "it starts the fragment",
            "%": "it starts an escape and proxies decode it",
            "\\": "proxies read it as '/'",
        }.get(
            char,
            "a lone surrogate, from JSON decoded by a client, is no UTF-8 text"
            if "\ud800" <= char <= "\udfff"
            else "a control character never round-trips",
        )
        raise InvalidIdentifierError(
            f"{what} {value!r} contains {char!r}, which Lago cannot take in a URL path ({why}). Use letters, digits, "
            "'-', '_', ':' or '@', e.g. map 'acme.com' to 'acme-com'."
        )
    return value


def path_segment(value: object, what: str = "id") -> str:
    """A validated id, percent-encoded for use as one URL path segment."""
    return quote(validate_id(value, what), safe="")


#: An ISO 8601 time in the extended or the basic format, with a fraction of any length (``.`` or ``,``) and an offset.
_ISO_TIME = re.compile(
    r"(\d{4})-?(\d{2})-?(\d{2})[T ](\d{2}):?(\d{2}):?(\d{2})(?:[.,](\d+))?(?:([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,  # (a time of other scripts' digits, which fromisoformat refuses, is no time: not read here either)
)


def _iso_time(found: re.Match[str]) -> dt.datetime:
    """The time :data:`_ISO_TIME` matched (a fraction past microseconds cut); ``ValueError`` when out of range."""
    year, month, day, hour, minute, second, fraction, sign, off_hours, off_minutes = found.groups()
    zone: dt.tzinfo | None = None
    if sign is not None:
        offset = dt.timedelta(hours=int(off_hours), minutes=int(off_minutes))
        zone = dt.timezone(-offset if sign == "-" else offset)
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    return dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=zone)


#: What 3.10's ``datetime.fromisoformat`` reads: ``YYYY-MM-DD``, then a separator, ``HH[:MM[:SS[.fff[fff]]]]`` and an
#: offset ``+HH:MM[:SS[.ffffff]]``. 3.11's reads more (week dates ``2026-W11-1``, ``20260315`` alone, ``T1230``,
#: ``+05``, ``Z``...): not read here on any Python, so that a time is read (or refused: the emulator's 422) the same on
#: every Python the package supports.
_FROMISOFORMAT_310 = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:.\d{2}(?::\d{2}(?::\d{2}(?:\.\d{3}(?:\d{3})?)?)?)?(?:[+-]\d{2}:\d{2}(?::\d{2}(?:\.\d{6})?)?)?)?",
    re.ASCII | re.DOTALL,
)


def iso_datetime(text: str) -> dt.datetime:
    """``datetime.fromisoformat(text)`` as Python 3.10 reads it, and what 3.10's does not read (a fraction of other
    than 3 or 6 digits, the basic format), on every Python; ``ValueError`` for anything else, or a time out of
    range."""
    found: re.Match[str] | None = None  # (matched once: kept for the fallback below)
    if _FROMISOFORMAT_310.fullmatch(text) is None:
        found = _ISO_TIME.fullmatch(text)
        if found is None:
            raise ValueError(f"Invalid isoformat string: {text!r}")
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        found = found or _ISO_TIME.fullmatch(text)  # (matched here only when 3.10's form matched above)
        if found is None:
            raise
        return _iso_time(found)


def ascii_digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits only, a number ``int()`` reads: ``str.isdigit()`` is also true of ``"²"`` (a
    Latin-1 header byte, a setting), which ``int()`` refuses."""
    return text.isascii() and text.isdigit()


def printable(text: str) -> str:
    """``text`` with each character that cannot be printed written as its escape (``\\n``, ``\\x1b``, ``\\ud800``): for
    a log line or a listing, where a line break would forge a line, a terminal escape drive the terminal, and a lone
    surrogate (a JSON ``"\\ud800"``, a file name that is no UTF-8) stop the output with ``UnicodeEncodeError``."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def parse_time(value: object) -> dt.datetime | None:
    """Lago's ISO 8601 time (``2026-03-01T00:00:00Z``, ``...00.123+01:00``) as an aware datetime, UTC when it names no
    offset; None when absent, blank or unreadable. Any fraction's length, on every Python (3.10's ``fromisoformat``
    reads 3 or 6 digits only: a time with nanoseconds was read as no time there)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = iso_datetime(value.strip().replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.timezone.utc)


def format_timestamp(value: dt.datetime | float | int | str | Decimal | None = None) -> str:
    """An event timestamp as Lago wants it: Unix seconds as a string with millisecond precision.

    ``None`` means now. Datetimes must be timezone-aware. Floats are never truncated to whole seconds
    (the official client's ``int`` coercion loses the milliseconds).
    """
    if value is None:
        value = dt.datetime.now(dt.timezone.utc)
    if type(value) is float and 0 < value < 10**11:  # the hot path (time.time()): exact to the millisecond
        # (not 0: -0.0 is >= 0 too, and its f"{:.3f}" is "-0.000"; both zeros take the path below)
        return f"{value:.3f}"
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise InvalidRequestError(
                "Event timestamps must be timezone-aware datetimes (e.g. datetime.now(timezone.utc))."
            )
        micros = (value - _EPOCH) // dt.timedelta(microseconds=1)
        if not 0 <= micros < 10**17:  # the range numbers are held to (below): Unix seconds >= 0, under 10**11
            raise InvalidRequestError(
                f"Event timestamp {value.isoformat()} is out of range: Lago takes Unix seconds from 1970 on, and "
                "this package refuses those past 10**11 (year 5138) as milliseconds."
            )
        return f"{micros // 1000 // 1000}.{micros // 1000 % 1000:03d}"
    if isinstance(value, bool):
        raise InvalidRequestError("Event timestamp must be a number of seconds or a datetime, not a bool.")
    try:
        number = Decimal(str(value).strip()) if isinstance(value, (str, float, int)) else Decimal(value)
    except (InvalidOperation, ValueError):
        raise InvalidRequestError(f"Event timestamp {value!r} is not a number of Unix seconds.") from None
    if not number.is_finite() or number < 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidRequestError(f"Event timestamp {value!r} must be a finite number of Unix seconds >= 0.")
    if number > 10**11:
        raise InvalidRequestError(
            f"Event timestamp {value!r} looks like milliseconds; Lago takes seconds (divide by 1000)."
        )
    # (copy_abs: a negative zero, -0.0, "-0" or Decimal("-0.00"), passed the check above, and Lago's timestamp is never
    # "-0.000"; any other negative was refused, even one rounding to 0. Rounded in a context of its own: the caller's
    # thread context (a money app's prec=6, ROUND_FLOOR or a trapped Inexact) made 1767225600 a
    # decimal.InvalidOperation, and a resend from another thread a different timestamp)
    return f"{number.copy_abs().quantize(_MILLISECOND, context=_TIMESTAMP_CONTEXT)}"


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MILLISECOND = Decimal("0.001")
#: Seconds under 10**11 to the millisecond are 15 digits at most; no trap: rounding is what the quantize is for.
_TIMESTAMP_CONTEXT = Context(prec=28, rounding=ROUND_HALF_EVEN, traps=[])
