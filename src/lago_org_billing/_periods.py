"""Billing-period arithmetic of the quota gate: a snapshot's counter period (:func:`period_key`), the estimated end
of the next period (:func:`next_period_end`: calendar or anniversary billing, in the customer's time zone inferred from
Lago's bounds), the calendar period of a subscription when Lago gives none, and the rollover at a period's end
(:func:`rolls_over`, :func:`provisional`; see "Billing-period rollover" in :mod:`._quota`).

On the request path: :func:`period_key` names the counter period of each check, and at the first request past a
period's end the in-process backend's reserve (:mod:`._quota_local`) rolls the snapshot over with :func:`rolls_over` and
:func:`provisional` (the Redis script of :mod:`._quota_redis` does the same in Lua). The rest runs when a snapshot is
read from Lago (:meth:`~._quota.QuotaGate.fetch`).
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import functools

from ._snapshots import Snapshot

__all__ = [
    "CALENDAR_ANCHOR",
    "before_period",
    "next_period_end",
    "period_key",
    "period_start",
    "provisional",
    "rolls_over",
]


def period_key(snapshot: Snapshot | None) -> str:
    if snapshot is None or not snapshot.active:
        return ""
    key = _period_keys.get(snapshot.period_start)
    if key is None:
        if len(_period_keys) >= 1024:
            _period_keys.clear()
        key = _period_keys[snapshot.period_start] = repr(snapshot.period_start)
    return key


_period_keys: dict[float, str] = {}  # period start -> its key (asked on every request: repr() costs more)

#: The counter period of an org's local records while its snapshot's period has not started (see ``NOT_STARTED``):
#: nothing is counted under it (Lago ignores the events dated before the start), and the gate's fast paths, which
#: need the records' period to be the snapshot's or a settle's, leave such an org to ``LocalBackend``.
_BEFORE_START = "before start"


def before_period(period: str, bucket: int | None) -> bool:
    """Whether a call reserved in second ``bucket`` was reserved before the counter period ``period`` (a
    :func:`period_key`) began: not when none was reserved (``None``), nor without a period."""
    if bucket is None or not period:
        return False
    start = period_start(period)
    return start is not None and bucket < start


@functools.lru_cache(maxsize=1024)
def period_start(period: str) -> int | None:
    """The second the counter period ``period`` (a :func:`period_key`) began; ``None`` for what is no period's key (the
    records of a subscription not started yet). Cached: asked for each gated event and settle."""
    try:
        return int(float(period))
    except ValueError:
        return None


#: ``Snapshot.anchor`` of a subscription billed on calendar periods (an anniversary's is its ``subscription_at``; 0:
#: the billing time is not known).
CALENDAR_ANCHOR = -1.0

#: Months per plan interval (``weekly`` is 7 days; an unknown interval: the old period's length).
_INTERVAL_MONTHS = {"monthly": 1, "quarterly": 3, "semiannual": 6, "yearly": 12}


def _local(timestamp: float, other_day: bool = False) -> tuple[dt.datetime, float]:
    """A period bound in its customer's time zone, and that zone's UTC offset (seconds), inferred from the bound:
    Lago's periods start and end at local midnight, so the offset is the one putting the bound there, from UTC-10:15
    to UTC+13:45 (offsets a day apart share their midnights: UTC-11 is taken as UTC+13, New Zealand's summer, UTC-12
    as UTC+12, and UTC+14 as UTC-10, Hawaii). ``other_day``: the offset a day apart instead (UTC+14, Kiritimati; UTC-11,
    American Samoa; UTC-12, Rails' "International Date Line West"), which :func:`next_period_end` takes when only it
    puts the bound on the billing day (or both do, and only it the period's start)."""
    second_of_day = timestamp % 86400
    offset = -second_of_day if second_of_day < _EAST_FROM else 86400 - second_of_day
    if other_day:
        offset += 86400 if offset < 0 else -86400
    return dt.datetime.fromtimestamp(timestamp + offset, dt.timezone.utc), offset


#: Local midnights this many seconds after a UTC midnight or more are taken as those of a zone east of UTC (up to
#: Chatham's +13:45 summer), earlier ones as those of a zone west of it (down to Hawaii's -10).
_EAST_FROM = 36900


def _day_of(timestamp: float, offset: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp + offset, dt.timezone.utc)


def _months_on(at: dt.datetime, months: int, day: int) -> dt.datetime:
    """``at`` moved ``months`` months on, to billing ``day`` of that month (its last day, when shorter)."""
    index = at.month - 1 + months
    year, month = at.year + index // 12, index % 12 + 1
    return at.replace(year=year, month=month, day=min(day, calendar.monthrange(year, month)[1]))


def _add_months(start: float, end: float, months: int, anchor: float = 0.0, other_day: bool = False) -> float:
    """``end`` plus ``months`` months, in the customer's time zone, on the billing day: the end's, or, when the end
    falls on a short month's last day, a later one. An anniversary subscription's is ``anchor``'s local day (Nov 30 to
    Feb 28 goes on to May 31 for a day 31), taken alone: a period's start may be a first period's exact
    ``started_at`` or an upgrade's, which a time within an hour of a midnight would show as the next day's. Without an
    anchor, the start's day when the start is a local midnight (anniversary day 31: Jan 31 to Feb 28 goes on to Mar
    31). An anchor within an hour of a local midnight (not at one) may be a day off, a DST change since moving it
    across the midnight: its day read at the end's offset, unless the end (a short month's last day, later than the
    day read) or the start (a local midnight on an unclipped day) shows the other one; a first period begun at 23:00
    sharp is taken for one begun at a midnight an hour east. An hour off across a DST change, until Lago is read.
    ``other_day``: in the zone a day apart from the one the end suggests (see :func:`_local`)."""
    at, offset = _local(end, other_day)
    day = at.day
    if day == calendar.monthrange(at.year, at.month)[1]:
        begun, begun_offset = _local(start, other_day)
        if not anchor:
            if abs(begun_offset - offset) <= 3600:  # (a local midnight, the zone's offset maybe changed since)
                day = max(day, begun.day)
        else:
            billing_day = _day_of(anchor, offset).day
            local_time = (anchor + offset) % 86400
            if 0 < local_time < 3600 or local_time >= 82800:  # (within an hour of a midnight: a DST change since?)
                other_offset = offset + (3600 if local_time >= 82800 else -3600)
                other = _day_of(anchor, other_offset).day
                if billing_day < day <= other:
                    # the end, a short month's last day, is not on the day read (Jan 31 23:30 in London's winter,
                    # read in summer: Feb 1, for a period ending Apr 30) but on the other one: Jul 30 was estimated
                    billing_day = other
                elif begun_offset in (offset, other_offset):
                    # (a first period's start, the anchor itself, shows a midnight of the season an hour east when it
                    # is one, a subscription made at a summer midnight, read in winter; or when made at 23:00 sharp:
                    # a day off then, until Lago is read, as the more usual summer midnight is kept right)
                    first_day = min(billing_day, calendar.monthrange(begun.year, begun.month)[1])
                    if begun.day == other != first_day and other >= day:
                        # the start shows the other day: a local midnight at the end's offset or one an hour off (not
                        # an exact time, a first period's or an upgrade's, half an hour off) on that day, which the
                        # first day, clipped by a short month, would not be; and the end, on a short month's last day,
                        # does not rule it out (Aug 31 at 23:00 is a midnight of Sep 1 an hour east: Aug 28 was
                        # estimated for a period ending Feb 28)
                        billing_day = other
                    else:  # (a start on the billing day or clipped: not later)
                        billing_day = max(billing_day, begun.day)
            day = max(day, billing_day)
    return _months_on(at, months, day).timestamp() - offset


def _on_billing_day(end: float, anchor: float, other_day: bool = False) -> bool:
    """Whether the period bound ``end``, read in the zone :func:`_local` infers for it (or the one a day apart), falls
    on a day Lago ends periods of a plan counted in months: the 1st with calendar billing (``CALENDAR_ANCHOR``), else
    the anchor's day in that zone, or the last day of a month shorter than it. Only asked of the zones whose midnights
    a zone a day apart shares (UTC-10 and beyond, UTC+12, UTC+13 and beyond), and of a known billing time: otherwise
    the end's own zone is kept, whatever its day."""
    at, offset = _local(end)
    if (-36000 < offset < 46800 and offset != 43200) or not anchor:
        return not other_day
    if other_day:
        at, offset = _local(end, True)
    if anchor < 0:
        return at.day == 1
    return at.day == min(_day_of(anchor, offset).day, calendar.monthrange(at.year, at.month)[1])


def _other_day(start: float, end: float, anchor: float) -> bool:
    """Whether the customer is in the zone a day apart from the one the end suggests (see :func:`_local`): only it
    puts the end on the billing day, or both do (an anniversary on a day both zones' months have: American Samoa's
    28th is Tonga's 29th) and only it the period's start, a local midnight on the billing day (or a short month's
    last) unless it is the first period's exact start (the anchor) or an upgrade's. When both fit the start too,
    the snapshot is the same in both zones: the end's own is kept (a day off until Lago is read, if wrong)."""
    if _on_billing_day(end, anchor, other_day=True):
        if not _on_billing_day(end, anchor):
            return True
        if anchor > 0 and start != anchor and (end - start) % 86400 == 0:  # (a local midnight in both zones)
            return _on_billing_day(start, anchor, other_day=True) and not _on_billing_day(start, anchor)
    return False


def next_period_end(snapshot: Snapshot) -> float:
    """The estimated end of the period after ``snapshot``'s when its subscription is known to go on into it, else
    0.0: not active, ending (``ending_at``) at or before the period end, or switching to another plan there."""
    start, end = snapshot.period_start, snapshot.period_end
    if not snapshot.active or snapshot.next_plan_code or end <= start or 0 < snapshot.ending_at <= end:
        return 0.0
    months = _INTERVAL_MONTHS.get(snapshot.interval)
    if months is not None:
        anchor = max(snapshot.anchor, 0.0)
        try:
            estimate = _add_months(start, end, months, anchor)
            if _other_day(start, end, snapshot.anchor):
                # the end is a midnight of two zones a day apart (UTC-10 and Kiritimati's UTC+14, UTC+13 and American
                # Samoa's UTC-11, UTC+12 and UTC-12): only the other one puts it (or its start) on the billing day
                # (the 1st; an anniversary's day, or a short month's last), so the customer is there (its quarter
                # ending on Oct 1 was estimated to end Dec 31)
                estimate = _add_months(start, end, months, anchor, other_day=True)
        except (OverflowError, ValueError):  # (a period or anchor at the calendar's ends, year 9999: no estimate)
            return 0.0
    elif snapshot.interval == "weekly":
        estimate = end + 7 * 86400.0
    else:
        estimate = end + (end - start)
    return min(estimate, snapshot.ending_at) if snapshot.ending_at else estimate


#: Seconds after a period's end a snapshot of it may still be rolled over (as long as Redis keeps it: its expiry
#: margin). Later, the next period's usage is what Lago counted meanwhile, not the 0 of a period start.
_ROLLOVER_WINDOW = 3600.0


def _calendar_period(now: float, interval: str, anchor: float | None = None) -> tuple[float, float]:
    """The calendar billing period (Lago's default, here in UTC) of ``interval`` (a month when unknown) holding
    ``now``: the period of a subscription when Lago gives none. With ``anchor`` (an anniversary subscription's
    ``subscription_at``), the period repeating from that day instead. Stable across reads, so that the counts kept
    under it (all of them when Lago counts nothing) go on, not made up anew (usage back to 0) at each refresh."""
    at = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    day = at if anchor is None else dt.datetime.fromtimestamp(anchor, dt.timezone.utc)
    day = day.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "weekly":
        monday = at - dt.timedelta(days=at.weekday() if anchor is None else (at - day).days % 7)
        return monday.timestamp(), (monday + dt.timedelta(days=7)).timestamp()
    months = _INTERVAL_MONTHS.get(interval, 1)
    if anchor is None or day > at:
        day = at.replace(month=1, day=1)  # (calendar periods: those of an anniversary on Jan 1)

    def nth(k: int) -> dt.datetime:  # the anchor's day, k intervals on (a short month's last day for a day 31)
        return _months_on(day, k * months, day.day)

    k = ((at.year - day.year) * 12 + at.month - day.month) // months
    if nth(k) > at:
        k -= 1
    return nth(k).timestamp(), nth(k + 1).timestamp()


def rolls_over(snapshot: Snapshot, now: float) -> bool:
    """Whether ``snapshot``, its period over at ``now``, is passed on to a provisional snapshot of the next period:
    its subscription goes on into it (``next_period_end``), and the boundary is recent. An org first seen again weeks
    into the period (its calls served by other workers, other services) is cold instead: read from Lago, or the fail
    policy, not decided on a usage of 0 for as long as Lago is down."""
    return snapshot.next_period_end > now and now < snapshot.period_end + _ROLLOVER_WINDOW


def provisional(snapshot: Snapshot, now: float) -> Snapshot:
    """The snapshot of the period after ``snapshot``'s (over at ``now``), until Lago is read: usage base 0, due at
    once. Its version is derived from the old one (the Redis backend makes the same, atomically)."""
    return dataclasses.replace(
        snapshot,
        period_start=snapshot.period_end,
        period_end=snapshot.next_period_end,
        next_period_end=0.0,
        base_calls=0,
        base_tokens=0,
        unsure_calls=0,
        unsure_tokens=0,
        refresh_at=now,
        version=snapshot.version + "+",
    )
