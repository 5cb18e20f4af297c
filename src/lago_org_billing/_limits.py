"""Reading Lago's answers for the quota gate: the limits a subscription's entitlements set
(:func:`limits_from_entitlements`; :func:`subscription_entitlements`, which also tells a Lago serving none), the calls
and tokens of a ``current_usage`` answer (:func:`usage_totals`; :class:`_Unreadable` for a count it cannot trust),
and Lago's times.

Off the request path: a snapshot refresh (:meth:`~._quota.QuotaGate.fetch`) reads them, in the background or while a
cold org's request waits; the dashboard (:mod:`._dashboard`) reads them too.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from ._client import JSON, LagoClient
from ._errors import LagoAPIError, LagoNotFoundError
from ._ids import parse_time

if TYPE_CHECKING:
    from ._quota import QuotaConfig

__all__ = ["charges_metric", "limits_from_entitlements", "subscription_entitlements", "usage_totals"]

logger = logging.getLogger("lago_org_billing.quota")


def privileges_of(feature: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A feature's privileges (objects only), listed or keyed by their codes. lago-api in mid-2025 keyed them
    (``{"max_api_calls": {"code": ..., "value": 300}}``, its plan and subscription entitlement serializers): read as a
    list they were none, every org of such a Lago unlimited, and the migration took every plan privilege as removed
    for the donor (or, the plan's keyed too, none). The code inside wins; the key stands in for one left out."""
    privileges = feature.get("privileges")
    if isinstance(privileges, Mapping):
        privileges = [{"code": code, **p} if isinstance(p, Mapping) else p for code, p in privileges.items()]
    if not isinstance(privileges, list):
        return []
    return [privilege for privilege in privileges if isinstance(privilege, Mapping)]


def limits_from_entitlements(
    entitlements: Sequence[Mapping[str, Any]] | None, config: QuotaConfig
) -> dict[str, int | None]:
    """The limits a subscription's entitlements set (``value`` = override if any, else the plan value).

    Only privileges of ``config.feature_code`` named ``calls_privilege``/``tokens_privilege`` count; a
    privilege present with no value maps to ``None`` (unlimited); one whose value is no whole number >= 0 (a fraction,
    negative, a word, a boolean) is ignored, said once. Absent privileges are absent from the result.
    """
    found: dict[str, int | None] = {}
    for feature in entitlements if isinstance(entitlements, list) else ():
        # (entries not objects, a null among them from a drifting Lago: skipped, the others read)
        if not isinstance(feature, Mapping) or feature.get("code") != config.feature_code:
            continue
        for privilege in privileges_of(feature):
            code = privilege.get("code")
            if code not in (config.calls_privilege, config.tokens_privilege):
                continue
            value = privilege.get("value")
            if value is None:
                value = privilege.get("override_value")
            if value is None:
                value = privilege.get("plan_value")
            if value is None:  # no value: unlimited
                found[code] = None
                continue
            limit = _whole(value, f"entitlement {config.feature_code}.{code}")
            if limit is not None:  # a value that is not a whole number is ignored (logged), not "unlimited"
                found[code] = limit
    return found


#: Seconds a Lago that said it serves no entitlements is not asked for them again (per client): on such a Lago every
#: plan read would otherwise cost a second request. Asked again after that, in case it was upgraded meanwhile.
_UNSERVED_FOR = 3600.0
_unserved: weakref.WeakKeyDictionary[LagoClient, float] = weakref.WeakKeyDictionary()  # client -> ask again after
_unserved_said: weakref.WeakSet[LagoClient] = weakref.WeakSet()
#: When (monotonic) the client was last served entitlements: for ``_UNSERVED_FOR`` after it, no answer saying this
#: Lago has none is believed (a proxy's 404 during a deploy, an old pod of a rolling upgrade): that read fails instead.
_served: weakref.WeakKeyDictionary[LagoClient, float] = weakref.WeakKeyDictionary()
#: Clients whose last answer was a 404 that is not Lago's JSON: a second one in a row (no entitlements served between)
#: is needed before the whole client is switched to LAGO_PLAN_LIMITS for ``_UNSERVED_FOR``.
_unconfirmed: weakref.WeakSet[LagoClient] = weakref.WeakSet()


def _serves_no_entitlements(exc: LagoAPIError) -> bool:
    """Whether ``exc``, the answer to ``GET /subscriptions/{id}/entitlements`` of a subscription just read, says this
    Lago has no entitlements: a version before them (its catch-all route: ``404 resource_not_found``; or, behind a
    proxy, a 404 that is not Lago's JSON), or one where they were premium-only (2025: ``403 feature_unavailable`` on a
    free licence). Not ``subscription_not_found`` (it ended meanwhile)."""
    if exc.status == 404:
        return exc.code in (None, "resource_not_found")
    return exc.status == 403 and exc.code == "feature_unavailable"


async def subscription_entitlements(
    client: LagoClient, subscription: Mapping[str, Any], external_id: str
) -> list[JSON] | None:
    """The entitlements of subscription ``external_id``: those Lago embeds in it, else (an older Lago) fetched; ``[]``
    when none; ``None`` when this Lago serves none (older than entitlements, or premium-only there: said once per
    client, and not asked again for an hour), so that limits come from ``LAGO_PLAN_LIMITS`` alone.

    Not from one odd answer: within an hour of entitlements served, an answer saying there are none is raised (the
    org keeps its snapshot: not every org left unlimited for an hour); a 404 that is not Lago's JSON (a proxy's) is
    taken for this read only, and for the whole client once a second comes in a row."""
    entitlements: list[JSON] | None = subscription.get("entitlements")
    if not isinstance(entitlements, list):  # (none embedded, or not the documented list: read from their endpoint)
        entitlements = None
        if _unserved.get(client, 0.0) > time.monotonic():
            return None
        try:
            entitlements = await client.get_subscription_entitlements(external_id)
        except LagoAPIError as exc:
            if not _serves_no_entitlements(exc):
                if isinstance(exc, LagoNotFoundError):
                    return []  # (the subscription ended since it was read)
                raise
            if _served.get(client, -math.inf) > time.monotonic() - _UNSERVED_FOR:
                raise  # (this Lago served entitlements within the hour: not believed)
            if exc.code is None and client not in _unconfirmed:
                _unconfirmed.add(client)  # (this read only: the client's next read asks again)
            else:
                _unserved[client] = time.monotonic() + _UNSERVED_FOR
            if client not in _unserved_said:
                _unserved_said.add(client)
                logger.warning(
                    "Lago serves no entitlements (its subscriptions have none, and GET /subscriptions/{id}/"
                    "entitlements answered %s%s: a Lago version before entitlements, or one where they are "
                    "premium-only): quota limits come from LAGO_PLAN_LIMITS alone, and a plan missing from it is "
                    "unlimited. Upgrade Lago to use entitlements; asked again every hour; said once.",
                    exc.status,
                    f" {exc.code}" if exc.code else " (not Lago's JSON)",
                )
            return None
        _served[client] = time.monotonic()
        _unconfirmed.discard(client)
    return entitlements


#: The largest count or limit read from Lago; larger ones are taken as it. No Lago counts that many calls or tokens in
#: a period (this package sends no token count past it either), the Redis script's numbers (doubles) are exact up to
#: it (a count past 2**63 came back from it as -2**63), and a number of thousands of digits can be neither printed in
#: a header (Python prints no int past 4,300 digits) nor read cheaply (``int(Decimal("1e1000000"))``: seconds of the
#: event loop). An org over it stays over any limit, and a limit of it is as good as none.
_LARGEST = 2**53 - 1


def _whole(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        number = None if isinstance(value, bool) else Decimal(str(value))
    except InvalidOperation:
        number = None
    if number is None:
        _ignored(what, value, "is not a number")
        return None
    # A fraction is no whole number either (a string privilege's "0.5", "99.99"): cut to one, "0.5" was a limit of 0
    # that refused every call of the org, silently. (to_integral_value is cheap at any exponent: "1e-999999999" too.)
    if not number.is_finite() or number < 0 or number != number.to_integral_value():
        _ignored(what, value, "is not a whole number >= 0")
        return None
    return _LARGEST if number > _LARGEST else int(number)


def _ignored(what: str, value: Any, why: str) -> None:
    """A limit Lago gives that is no limit, said once per limit and value (it comes at every plan read of every org
    on the plan, each ``plan_ttl``): not a line per org every five minutes."""
    key = (what, repr(value)[:60])
    if key not in _ignored_said:
        if len(_ignored_said) >= 1024:
            _ignored_said.clear()
        _ignored_said.add(key)
        logger.warning(
            "Ignoring %s: %s %s (its plan's LAGO_PLAN_LIMITS entry applies, else no limit); said once.",
            what,
            key[1],
            why,
        )


_ignored_said: set[tuple[str, str]] = set()


class _Unreadable(LagoAPIError):
    """A Lago answer this gate cannot decide on (a count that is no number, a status it does not know): the fail
    policy decides meanwhile. Said once per ``kind`` per gate, not at every refresh."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, status=200)
        self.kind = kind


def _events_count(value: Any, index: int, metric: str) -> int:
    """A charge's ``events_count``: a count as Lago writes it (``12``), or as it writes ``units`` (``"12.0"``, a
    float); ``null`` or absent is 0. Anything else is :class:`_Unreadable`: a count taken as 0 would let the org
    past its limit."""
    return _count(value, index, metric, "events_count", "events")


def _units(value: Any, index: int, metric: str) -> int:
    """The token metric's ``units`` (a decimal string, ``"1234.0"``; ``null`` or absent is 0). Anything else is
    :class:`_Unreadable`, as for :func:`_events_count`: tokens taken as 0 would let the org past its token limit."""
    return _count(value, index, metric, "units", "tokens")


def _count(value: Any, index: int, metric: str, field: str, of: str) -> int:
    if value is None or value == "":
        return 0
    number: Decimal | None = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = Decimal(value.strip() if isinstance(value, str) else value)
        except (InvalidOperation, ValueError):
            number = None
    if number is None or not number.is_finite() or number < 0:
        raise _Unreadable(
            f"Lago's current_usage has charges_usage[{index}].{field} {str(value)[:60]!r} (metric {metric!r}), not a "
            f"count of {of}: the usage of orgs on such answers is unknown, so LAGO_FAIL_OPEN decides for them until "
            "Lago answers a count. Check what stands between this app and Lago (LAGO_API_URL) and Lago's version.",
            field,
        )
    return _LARGEST if number > _LARGEST else int(number)


def _timestamp(value: Any) -> float | None:
    parsed = parse_time(value)
    return None if parsed is None else parsed.timestamp()


def _iso(timestamp: float) -> str:
    """``timestamp`` as ISO 8601 in UTC; one past the calendar's ends (a period ending at 9999-12-31T23:59:59Z ends in
    year 10000, one begun at 0001-01-01T00:00:00+14:00 began in year 0) as the end it passed, not a ValueError in the
    request naming it."""
    try:
        at = dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)
    except (OverflowError, ValueError, OSError):
        at = dt.datetime.max if timestamp > 0 else dt.datetime.min
        at = at.replace(microsecond=0, tzinfo=dt.timezone.utc)
    return at.isoformat().replace("+00:00", "Z")


def usage_totals(usage: Mapping[str, Any], calls_metric: str, token_metric: str) -> tuple[int, int | None]:
    """(calls, tokens) of a ``customer_usage`` object. A metric used by several charges appears once per
    charge: the largest figure is taken, not the sum. Tokens are ``None`` when the token metric is not a
    ``sum_agg`` (its units would not be tokens)."""
    calls = 0
    tokens: int | None = None
    charges = usage.get("charges_usage")
    for index, charge in enumerate(charges if isinstance(charges, list) else ()):
        if not isinstance(charge, Mapping):  # (a null among them, from a drifting Lago: skipped)
            continue
        metric = charge.get("billable_metric")
        metric = metric if isinstance(metric, Mapping) else {}
        code = metric.get("code")
        if code == calls_metric:
            calls = max(calls, _events_count(charge.get("events_count"), index, code))
        if code == token_metric and metric.get("aggregation_type", "sum_agg") == "sum_agg":
            tokens = max(tokens or 0, _units(charge.get("units"), index, code))
    return calls, tokens


def charges_metric(usage: Mapping[str, Any], code: str) -> bool:
    """Whether the ``customer_usage`` object ``usage`` has a charge on the metric ``code``: whether Lago counts its
    events at all. Not whether the answer is empty: read without ``billable_metric_code`` (a token metric of its own,
    limited too), or from a Lago that ignores it (before that filter: ``filter_by_charge_code`` only), it lists the
    plan's other charges, or none; a plan charging no calls was taken for 0 calls counted in Lago, the org's own
    records dropped as counted there at each read: its calls limit was never reached."""
    charges = usage.get("charges_usage")
    for charge in charges if isinstance(charges, list) else ():
        metric = charge.get("billable_metric") if isinstance(charge, Mapping) else None
        if isinstance(metric, Mapping) and metric.get("code") == code:
            return True
    return False
