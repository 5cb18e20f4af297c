"""Small helpers shared by the emulator modules: errors, time formatting, decimals, pagination."""

from __future__ import annotations

import calendar
import functools
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, TypeVar

import anyio
import httpx

from .._errors import InvalidRequestError
from .._ids import iso_datetime

JSON = dict[str, Any]

UTC = timezone.utc

_D = TypeVar("_D", date, datetime)


class ApiError(Exception):
    """A Lago error answer: an HTTP status and the exact JSON body Lago sends."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(f"{status} {dict(body)}")
        self.status = status
        self.body: JSON = dict(body)


class FakeLagoError(InvalidRequestError):
    """A FakeLago Python helper (``add_*``, ``seed``, ``usage``) was given input Lago would refuse.

    * **status** - the HTTP status the same call would get over the API.
    * **body** - the Lago error body.
    """

    def __init__(self, message: str, *, status: int = 422, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: JSON = dict(body or {})


def bad_request(key: str) -> ApiError:
    return ApiError(400, {"status": 400, "error": f"BadRequest: param is missing or the value is empty: {key}"})


def not_found(resource: str) -> ApiError:
    return ApiError(404, {"status": 404, "error": "Not Found", "code": f"{resource}_not_found"})


def not_allowed(code: str) -> ApiError:
    return ApiError(405, {"status": 405, "error": "Method Not Allowed", "code": code})


def validation_error(details: Mapping[str, Any]) -> ApiError:
    return ApiError(
        422,
        {
            "status": 422,
            "error": "Unprocessable Entity",
            "code": "validation_errors",
            "error_details": dict(details),
        },
    )


UNAUTHORIZED: JSON = {"status": 401, "error": "Unauthorized"}


# Time ------------------------------------------------------------------------------------------


def iso(dt: datetime | None) -> str | None:
    """Lago's default ``iso8601`` rendering: seconds precision, ``Z`` suffix."""
    if dt is None:
        return None
    return _whole_seconds(dt.astimezone(UTC)) + "Z"


def iso_ms(dt: datetime) -> str:
    """Event timestamps: milliseconds precision (``iso8601(3)``)."""
    dt = dt.astimezone(UTC)
    return f"{_whole_seconds(dt)}.{dt.microsecond // 1000:03d}Z"


#: A UTC second -> its text (``strftime`` was a tenth of an event's ingestion: three per event, mostly of one second).
_SECOND_TEXTS: dict[datetime, str] = {}


def _whole_seconds(dt: datetime) -> str:
    """``dt`` (in UTC) to the second as ``iso8601`` writes it, without its zone."""
    whole = dt.replace(microsecond=0)
    text = _SECOND_TEXTS.get(whole)
    if text is None:
        if len(_SECOND_TEXTS) >= 4096:  # bounded: the seconds in use
            _SECOND_TEXTS.clear()
        text = _SECOND_TEXTS[whole] = whole.strftime("%Y-%m-%dT%H:%M:%S")
    return text


def parse_datetime(value: Any) -> datetime | None:
    """Parse an ISO 8601 string (``Z`` or offset, or a bare date); ``None`` when not parseable."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = iso_datetime(text)  # (a bare date too: ``date.fromisoformat`` reads week dates and more from 3.11 on)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def written_date(value: Any) -> date | None:
    """The calendar date of an ISO 8601 value as written, in its own offset (Ruby
    ``DateTime.iso8601(value).to_date``): ``2026-03-16T01:00:00+05:00`` is on 16 March, although it is
    15 March in UTC. A ``datetime`` gives its own date; ``None`` when not parseable."""
    if isinstance(value, datetime):
        return value.date()
    if parse_datetime(value) is None:
        return None
    text = str(value).strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return iso_datetime(text).date()  # (parse_datetime read it: iso_datetime reads it)


def day_start(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def add_months(dt: _D, months: int, *, day: int | None = None) -> _D:
    """``dt`` (a date or datetime) shifted by ``months``, on ``day`` (default ``dt.day``) clamped to the month."""
    total = dt.year * 12 + (dt.month - 1) + months
    year, month = divmod(total, 12)
    month += 1
    wanted = dt.day if day is None else day
    last = calendar.monthrange(year, month)[1]
    return dt.replace(year=year, month=month, day=min(wanted, last))


@functools.lru_cache(maxsize=256)
def zone(name: str | None) -> tzinfo:
    """The IANA time zone ``name`` (UTC for ``None``, ``"UTC"`` or a name the zone database lacks)."""
    if not name or name in ("UTC", "Etc/UTC"):
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return UTC


INTERVAL_MONTHS = {"monthly": 1, "quarterly": 3, "semiannual": 6, "yearly": 12}
YEARLY_FACTOR = {"weekly": 52, "monthly": 12, "quarterly": 4, "semiannual": 2, "yearly": 1}


def _period_days(interval: str, billing_time: str, anchor: date, today: date) -> tuple[date, date]:
    """First day of the period containing ``today`` and first day of the next one (local calendar days)."""
    if interval == "weekly":
        if billing_time == "anniversary":
            start = anchor + timedelta(days=((today - anchor).days // 7) * 7)
        else:  # Rails' beginning_of_week: Monday
            start = today - timedelta(days=today.weekday())
        return start, start + timedelta(days=7)
    months = INTERVAL_MONTHS.get(interval, 1)
    if billing_time == "anniversary":
        k = ((today.year - anchor.year) * 12 + (today.month - anchor.month)) // months
        start = add_months(anchor, k * months, day=anchor.day)
        if start > today:
            k -= 1
            start = add_months(anchor, k * months, day=anchor.day)
        return start, add_months(anchor, (k + 1) * months, day=anchor.day)
    start = date(today.year, ((today.month - 1) // months) * months + 1, 1)
    return start, add_months(start, months, day=1)


def local_day_start(day: date, tz: tzinfo) -> datetime:
    """Midnight of ``day`` in ``tz``, in UTC (Rails ``date.in_time_zone(tz)``)."""
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


def billing_period(
    interval: str, billing_time: str, anchor: datetime, now: datetime, tz: tzinfo = UTC
) -> tuple[datetime, datetime]:
    """The billing period containing ``now``: ``(start, end)`` in UTC, ``end`` being the last second.

    ``calendar`` periods start on the 1st of the month / quarter / half-year / year or on Monday;
    ``anniversary`` periods repeat from ``anchor`` (the subscription date). Lago counts the days in the
    customer's time zone ``tz`` (its ``applicable_timezone``) and shifts them to UTC: a calendar month of a
    customer in America/New_York runs from 05:00Z on the 1st (lago-api ``Subscriptions::DatesService``:
    ``billing_date`` and ``subscription_at`` are read ``in_time_zone(customer.applicable_timezone)``, and
    ``customer_timezone_shift`` turns the bounding days into UTC times, the end with ``end_of_day``).
    """
    first, following = _period_days(interval, billing_time, anchor.astimezone(tz).date(), now.astimezone(tz).date())
    last_second = datetime.combine(following - timedelta(days=1), time(23, 59, 59), tzinfo=tz)
    return local_day_start(first, tz), last_second.astimezone(UTC)


# Decimals --------------------------------------------------------------------------------------


def to_decimal(value: Any) -> Decimal | None:
    """A finite Decimal from an int / float / numeric string, else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, Decimal)):
        result = Decimal(value)
    elif isinstance(value, float):
        result = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            return None
    else:
        return None
    return result if result.is_finite() else None


def decimal_str(value: Decimal) -> str:
    """Ruby ``BigDecimal#to_s("F")``-like rendering used by Lago for units: ``"15.0"``, ``"1.5"``."""
    if value == value.to_integral_value():
        return f"{int(value)}.0"
    text = format(value.normalize(), "f")
    return text


def cents(value: Decimal) -> int:
    """Round an amount in cents half up (Ruby ``BigDecimal#round``), however large (units of ``1e400`` are summed by
    Lago's numeric columns: the default 28-digit context would raise on quantizing them)."""
    digits = max(value.adjusted() + 2, 28)
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP, context=Context(prec=digits)))


# Pagination ------------------------------------------------------------------------------------


KAMINARI_DEFAULT_PER_PAGE = 25  # (lago-api has no Kaminari initializer: its default_per_page stays 25)
_LEADING_INT = re.compile(r"\s*([+-]?\d+)", re.ASCII)  # (Ruby's \s and digits: ASCII ones)


def _ruby_to_i(value: Any) -> int:
    """Ruby ``String#to_i``: the leading integer (after blanks), 0 when there is none."""
    match = _LEADING_INT.match(str(value))
    return int(match.group(1)) if match else 0


def page_size(per_page: Any) -> int:
    """The page size of ``scope.page(page).per(params[:per_page] || 100)`` (Kaminari ``per``): a value not starting
    with a digit (``-1``, ``abc``, empty) leaves the default page size, 25; otherwise its leading digits (``12abc`` is
    12; no maximum). ``0`` is returned as is: Kaminari then cannot compute the current page (see :func:`paginate`)."""
    if per_page is None:
        return 100
    text = str(per_page)
    if not ("0" <= text[:1] <= "9"):  # (Ruby's /^\d/: an ASCII digit; "²" is none)
        return KAMINARI_DEFAULT_PER_PAGE
    return _ruby_to_i(text)


def paginate(items: Sequence[Any], key: str, page: Any = None, per_page: Any = None) -> JSON:
    """Slice ``items`` like Kaminari and build Lago's ``meta`` block (lago-api ``Pagination#pagination_metadata``).

    ``page`` is Ruby's ``to_i`` of the value, 1 below 1; ``per_page`` is read by :func:`page_size`. With
    ``per_page=0`` and something to list, Kaminari raises ``ZeroPerPageOperation``: Lago answers 500."""
    page_n = max(_ruby_to_i(page), 1) if page is not None else 1
    size = page_size(per_page)
    total = len(items)
    if total and size == 0:
        message = (
            "Current page was incalculable. Perhaps you called .per(0)? (per_page=0: Lago cannot paginate with an empty"
            " page size; give per_page a positive number, e.g. 100)"
        )
        raise ApiError(500, {"status": 500, "errors": [{"message": message}], "data": {}})
    if total == 0:
        meta: JSON = {"current_page": 0, "next_page": None, "prev_page": None, "total_pages": 0, "total_count": 0}
        return {key: [], "meta": meta}
    total_pages = -(-total // size)
    chunk = list(items[(page_n - 1) * size : page_n * size])
    meta = {
        "current_page": page_n,
        "next_page": page_n + 1 if page_n < total_pages else None,
        "prev_page": page_n - 1 if page_n > 1 else None,
        "total_pages": total_pages,
        "total_count": total,
    }
    return {key: chunk, "meta": meta}


def drop_none(data: Mapping[str, Any], *keys: str) -> JSON:
    """Copy of ``data`` without ``keys`` whose value is ``None`` (fields the spec does not allow as null)."""
    return {k: v for k, v in data.items() if not (k in keys and v is None)}


def paginate_limited(items: Sequence[Any], key: str, page: Any, per_page: Any, limit: Any) -> JSON:
    """Slice ``items`` as lago-api ``PastUsageQuery`` does: ``scope.page(page).per(per_page || 100)`` and then
    ``.limit(periods_count.to_i)`` when ``periods_count`` is given, which keeps the page's offset but makes the limit
    the page size that Kaminari's ``current_page`` (``offset / limit + 1``) and ``total_pages`` are computed with.

    The query computes ``current_page`` even when nothing matched, so a page size of 0 (``per_page=0``, or a
    ``periods_count`` of 0 or not a number) is Kaminari's ``ZeroPerPageOperation``: a 500, as is a negative
    ``periods_count`` (PostgreSQL refuses a negative ``LIMIT``)."""
    if limit is None:
        if page_size(per_page) == 0:
            raise _zero_page_size("per_page")
        return paginate(items, key, page, per_page)
    page_n = max(_ruby_to_i(page), 1) if page is not None else 1
    size = page_size(per_page)
    count = _ruby_to_i(limit)
    if size == 0 or count <= 0:
        raise _zero_page_size("per_page" if size == 0 else "periods_count")
    offset = (page_n - 1) * size
    total = len(items)
    if total == 0:
        meta: JSON = {"current_page": 0, "next_page": None, "prev_page": None, "total_pages": 0, "total_count": 0}
        return {key: [], "meta": meta}
    current = offset // count + 1
    total_pages = -(-total // count)
    meta = {
        "current_page": current,
        "next_page": current + 1 if current < total_pages else None,
        "prev_page": current - 1 if current > 1 else None,
        "total_pages": total_pages,
        "total_count": total,
    }
    return {key: list(items[offset : offset + count]), "meta": meta}


def _zero_page_size(name: str) -> ApiError:
    message = (
        f"Current page was incalculable. Perhaps you called .per(0)? ({name} must be a positive number: Lago cannot "
        "paginate with an empty page size; give it a positive number, e.g. 12)"
    )
    return ApiError(500, {"status": 500, "errors": [{"message": message}], "data": {}})


class TimedASGITransport(httpx.ASGITransport):
    """``httpx.ASGITransport`` ignores timeouts: this one gives up at the request's read timeout, as a socket would
    (the emulator's in-process transport, and its webhooks delivered to an app in process)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        if timeout is None:
            return await super().handle_async_request(request)
        with anyio.move_on_after(timeout):
            return await super().handle_async_request(request)
        raise httpx.ReadTimeout(
            f"{request.url} did not answer within the read timeout ({timeout:g} s)", request=request
        )
