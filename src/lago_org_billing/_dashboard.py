"""The org billing dashboard: data (JSON) and a server-rendered HTML page (no script, no external asset).

:func:`dashboard_data` gathers the org's subscription, plan, current period, usage against each limit, and the
breakdown by user and by model. The breakdown comes from Lago's *grouped usage* (charges whose
``pricing_group_keys`` include ``user_id`` and/or ``model``) or, when given, from a local ledger
(``breakdown_provider``). :func:`render_html` turns the data into one self-contained page: inline CSS, bars as
styled ``div``\\s, every number in the HTML itself (it works with JavaScript disabled).
"""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Awaitable, Callable, Mapping
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any

from . import _checks as checks
from ._billing import OrgBilling
from ._errors import ConfigurationError
from ._limits import limits_from_entitlements, subscription_entitlements, usage_totals
from ._quota import QuotaConfig
from ._settings import env_file_of
from ._webhooks import _called

__all__ = [
    "BREAKDOWN_DIMENSIONS",
    "BreakdownProvider",
    "LimitsProvider",
    "dashboard_data",
    "render_html",
    "wants_html",
]

#: Limits may be ``{"max_api_calls": 300}`` or ``{"max_tokens": {"limit": 100000, "used": 4200}}``.
LimitsProvider = Callable[[str], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None]
#: A local ledger: ``{"by_user": [{"user_id": ..., "events": ..., "units": {...}}], "by_model": [...]}``.
BreakdownProvider = Callable[[str], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None]

#: Grouping keys the dashboard breaks usage down by, and the JSON key of each breakdown.
BREAKDOWN_DIMENSIONS = {"user_id": "by_user", "model": "by_model"}

#: Past it a float is infinite.
_FLOAT_END = Decimal(sys.float_info.max)
#: The largest number the dashboard shows as it is (4,000 digits; Python refuses to print an int past 4,300).
_LONGEST = Decimal(10**4000 - 1)
#: Rows shown in each breakdown table of the page, in their order (Lago's grouped usage: the most used first); the
#: JSON answer lists them all.
_MAX_ROWS = 200
#: Sums and unit conversions without rounding (the default context keeps 28 digits: a 30-digit count lost its last),
#: bounded all the same: at MAX_PREC, "1e999999999" + "1" is a billion digits to write out.
_EXACT = Context(prec=1_000, Emax=MAX_EMAX, Emin=MIN_EMIN)

#: Content-Security-Policy of the HTML page: it loads nothing and runs nothing.
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def _decimal(value: Any) -> Decimal | None:
    """Lago's decimal strings (``"12.0"``), and numbers, exactly; ``None`` for anything else (a word, NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _number(value: Any) -> int | float | None:
    """Lago's decimal strings (``"12.0"``) as JSON numbers: int when whole, or past a float (JSON has no inf)."""
    number = _decimal(value)
    if number is None:
        return None
    whole = number.to_integral_value()
    if number == whole or abs(number) >= _FLOAT_END:
        if abs(whole) > _LONGEST:  # (past what Python prints as text, 4,300 digits: held there, as "unlimited")
            return int(_LONGEST.copy_sign(whole))
        return int(whole)
    return float(number)


def _whole(value: Any) -> int:
    """A count or an amount in cents as a whole number: Lago's integers, and a ledger's ``"150.5"`` (precise cents,
    rounded half up) or ``"3.0"``; anything else (``None``, a word, NaN) is 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _number(value)
    if number is None:
        return 0
    return int(Decimal(str(number)).to_integral_value(rounding=ROUND_HALF_UP))


async def dashboard_data(
    billing: OrgBilling,
    org_id: str,
    *,
    limits_provider: LimitsProvider | None = None,
    breakdown_provider: BreakdownProvider | None = None,
    config: QuotaConfig | None = None,
) -> dict[str, Any] | None:
    """The dashboard of ``org_id``, or ``None`` when it has no active subscription.

    Limits come from ``limits_provider(org_id)`` (sync or async), else from where the quota gate takes them: the
    subscription's entitlements (feature ``api_quota``), over ``LAGO_PLAN_LIMITS`` for the plan. The usage of a
    plain limit is derived from Lago's current usage as the gate counts it: ``max_api_calls`` counts the events of
    ``LAGO_EVENT_CODE``, ``max_tokens`` sums ``total_tokens`` in the token metric; another ``max_<code>`` is the
    units of billable metric ``<code>``; otherwise it is unknown (``null``) unless the provider gives
    ``{"limit": ..., "used": ...}``. ``config`` is the quota gate's :class:`QuotaConfig` (feature, privilege and token
    metric names; default: that of ``billing.quota``, else ``QuotaConfig.from_env()``).
    """
    settings = billing.settings
    subscription = await billing.get_subscription(org_id)
    if subscription is None:
        return None
    usage = await billing.get_current_usage(org_id) or {}
    raw_plan = subscription.get("plan")
    plan_object: Mapping[str, Any] = raw_plan if isinstance(raw_plan, Mapping) else {}
    plan_code = str(subscription.get("plan_code") or plan_object.get("code") or "")
    charges = [c for c in usage.get("charges_usage") or [] if isinstance(c, Mapping)]

    metrics: dict[str, dict[str, Any]] = {}
    for charge in charges:
        metric = charge.get("billable_metric") or {}
        code = str(metric.get("code") or "")
        if not code:
            continue
        entry = metrics.setdefault(
            code, {"code": code, "name": metric.get("name") or code, "units": 0, "events": 0, "amount_cents": 0}
        )
        # One entry per charge: a metric billed by two charges appears twice with the same units.
        entry["units"] = max(entry["units"], _number(charge.get("units")) or 0)
        entry["events"] = max(entry["events"], _whole(charge.get("events_count")))
        entry["amount_cents"] += _whole(charge.get("amount_cents"))

    if config is None:
        gate_config = getattr(billing.quota, "config", None)
        config = (
            gate_config
            if isinstance(gate_config, QuotaConfig)
            else QuotaConfig.from_env(env_file=env_file_of(settings))
        )
    raw_limits: Mapping[str, Any] | None = None
    limits_source = "none"
    if limits_provider is not None:
        raw_limits = await _called(limits_provider, org_id)
        if raw_limits is not None and not isinstance(raw_limits, Mapping):
            raise ConfigurationError(
                f"billing_routes(limits_provider=...) returned {_shown(raw_limits)} for org {org_id!r}: return a "
                'mapping of limit names to limits ({"max_api_calls": 300} or {"max_gb": {"limit": 5, "used": 1.2}}), '
                "or None for the plan's limits"
            )
        limits_source = "provider"
    if raw_limits is None:
        table = settings.plan_limits.get(plan_code) or {}
        entitlements = await subscription_entitlements(
            billing.client, subscription, str(subscription.get("external_id"))
        )
        granted = limits_from_entitlements(entitlements, config)
        if table or granted:
            raw_limits = {**table, **granted}
            limits_source = "entitlements" if granted else "LAGO_PLAN_LIMITS"
    # what the gate counts: the calls of LAGO_EVENT_CODE, the total_tokens summed in the token metric
    calls, tokens = usage_totals(usage, settings.event_code, config.token_metric or settings.event_code)
    counted: dict[str, int | None] = {config.tokens_privilege: tokens}
    if settings.event_code in metrics:
        counted[config.calls_privilege] = calls
    limits = [_limit(name, value, metrics, counted) for name, value in (raw_limits or {}).items()]

    breakdown: dict[str, list[dict[str, Any]]] = {key: [] for key in BREAKDOWN_DIMENSIONS.values()}
    breakdown_source = "none"
    ledger = await _called(breakdown_provider, org_id) if breakdown_provider is not None else None
    if ledger is not None:
        _check_ledger(ledger, org_id)
    if ledger:
        breakdown_source = "ledger"
        for dimension, key in BREAKDOWN_DIMENSIONS.items():
            breakdown[key] = [_ledger_row(dimension, row) for row in ledger.get(key) or ()]
    elif any(charge.get("grouped_usage") for charge in charges):
        breakdown_source = "lago_grouped_usage"
        breakdown = _grouped_breakdown(charges)

    return {
        "org_id": org_id,
        "subscription": {
            key: subscription.get(key)
            for key in ("external_id", "status", "plan_code", "next_plan_code", "downgrade_plan_date", "started_at")
        },
        "plan": {
            "code": plan_code,
            "name": plan_object.get("name") or plan_code,
            "interval": plan_object.get("interval"),
            "amount_cents": plan_object.get("amount_cents", subscription.get("plan_amount_cents")),
            "currency": plan_object.get("amount_currency", subscription.get("plan_amount_currency")),
        },
        "period": {
            "from": usage.get("from_datetime") or subscription.get("current_billing_period_started_at"),
            "to": usage.get("to_datetime") or subscription.get("current_billing_period_ending_at"),
            "issuing_date": usage.get("issuing_date"),
        },
        "amount": {
            "amount_cents": _whole(usage.get("amount_cents")),
            "total_amount_cents": _whole(usage.get("total_amount_cents")),
            "currency": usage.get("currency") or plan_object.get("amount_currency"),
        },
        "limits": limits,
        "limits_source": limits_source,
        "metrics": list(metrics.values()),
        **breakdown,
        "breakdown_source": breakdown_source,
    }


def _limit(
    name: str, value: Any, metrics: Mapping[str, Mapping[str, Any]], counted: Mapping[str, int | None]
) -> dict[str, Any]:
    used: int | float | None = None
    if isinstance(value, Mapping):
        limit = _number(value.get("limit"))
        used = _number(value.get("used"))
    else:
        limit = _number(value)
    if used is None:
        if counted.get(name) is not None:
            used = counted[name]
        elif name.startswith("max_") and name[4:] in metrics:
            used = metrics[name[4:]]["units"]
    ratio: float | None = None if used is None or limit is None else 1.0
    remaining: int | float | None = None
    if used is not None and limit is not None:
        # exactly, in decimal: a float subtraction left 0.19999999999999998 of a 0.3 GB limit with 0.1 used
        remaining = max(_number(_EXACT.subtract(_exact(limit), _exact(used))) or 0, 0)
        try:
            ratio = used / limit if limit else 1.0
        except OverflowError:  # past a float (a "1e400" from a provider or summed in Lago): exactly, then capped
            ratio = _capped(Decimal(used) / Decimal(limit)) if limit else 1.0
    # (below the limit the ratio is rounded down: 199 of 200 is 0.995, not 1.0 beside "exceeded": false)
    exceeded = bool(used is not None and limit is not None and used >= limit)
    return {
        "name": name,
        "limit": limit,
        "used": used,
        "remaining": remaining,
        "ratio": None
        if ratio is None
        else round(ratio, 4)
        if exceeded
        else min(math.floor(ratio * 10_000), 9_999) / 10_000,
        "exceeded": exceeded,
    }


def _exact(number: int | float) -> Decimal:
    """A JSON number of :func:`_number` as the decimal it was read from (a float by its shortest repr: 0.1, not
    0.1000000000000000055...)."""
    return Decimal(repr(number)) if isinstance(number, float) else Decimal(number)


def _capped(value: Decimal) -> float:
    """``value`` as a float JSON can carry (the largest finite one past it)."""
    return max(min(float(value), sys.float_info.max), -sys.float_info.max)


def _check_ledger(ledger: Any, org_id: str) -> None:
    """A ``breakdown_provider``'s answer is a mapping of lists of row mappings, or a clear error (its rows were
    skipped, and the page showed empty tables "from the local usage ledger")."""
    problem = None
    if not isinstance(ledger, Mapping):
        problem = f"returned {_shown(ledger)}"
    else:
        for key in BREAKDOWN_DIMENSIONS.values():
            rows = ledger.get(key)
            if rows is None:
                continue
            if not isinstance(rows, (list, tuple)):
                problem = f"returned {key} as {_shown(rows)}"
                break
            odd = next((row for row in rows if not isinstance(row, Mapping)), None)
            if odd is not None:
                problem = f"returned a row of {key} as {_shown(odd)}"
                break
    if problem is not None:
        raise ConfigurationError(
            f"billing_routes(breakdown_provider=...) {problem} for org {org_id!r}: return "
            '{"by_user": [{"user_id": ..., "events": ..., "amount_cents": ..., "units": {"<metric code>": ...}}, ...], '
            '"by_model": [{"model": ..., ...}, ...]}, or None for Lago\'s grouped usage'
        )


def _shown(value: Any) -> str:
    text = checks._shown(value)  # (repr, or a size for an int Python will not print)
    return f"a {type(value).__name__} ({text if len(text) <= 80 else text[:77] + '...'})"


def _ledger_row(dimension: str, row: Mapping[str, Any]) -> dict[str, Any]:
    raw_units = row.get("units")
    units: Mapping[str, Any] = raw_units if isinstance(raw_units, Mapping) else {}
    return {
        dimension: str(row.get(dimension) if row.get(dimension) is not None else row.get("key")),
        "events": _whole(row.get("events")),
        "amount_cents": _whole(row.get("amount_cents")),
        "units": {str(code): _number(value) or 0 for code, value in units.items()},
    }


def _grouped_breakdown(charges: list[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Sum Lago's ``grouped_usage`` per user and per model. The events and units of a metric come from one of its
    charges grouped by the dimension (a metric billed by two charges counts the same events twice); its amount is
    every such charge's (a standard fee and a percentage on the same metric are both the user's spend)."""
    rows: dict[str, dict[str, dict[str, Any]]] = {dimension: {} for dimension in BREAKDOWN_DIMENSIONS}
    taken: set[tuple[str, str]] = set()
    for charge in charges:
        code = str((charge.get("billable_metric") or {}).get("code") or "")
        groups = [g for g in charge.get("grouped_usage") or [] if isinstance(g, Mapping)]
        for dimension in BREAKDOWN_DIMENSIONS:
            if not any(dimension in (g.get("grouped_by") or {}) for g in groups):
                continue
            counted = (code, dimension) in taken
            taken.add((code, dimension))
            for group in groups:
                value = (group.get("grouped_by") or {}).get(dimension)
                key = "(none)" if value is None else str(value)
                row = rows[dimension].setdefault(key, {dimension: key, "events": 0, "amount_cents": 0, "units": {}})
                row["amount_cents"] += _whole(group.get("amount_cents"))
                if not counted:
                    row["events"] += _whole(group.get("events_count"))
                    # summed exactly, made a JSON number once: floats would show 0.1 + 0.2 GB as 0.30000000000000004
                    units = _decimal(group.get("units")) or Decimal(0)
                    row["units"][code] = _EXACT.add(row["units"].get(code, Decimal(0)), units)
    for by_key in rows.values():
        for row in by_key.values():
            row["units"] = {code: _number(units) or 0 for code, units in row["units"].items()}
    return {
        key: sorted(rows[dimension].values(), key=lambda row: (-row["events"], row[dimension]))
        for dimension, key in BREAKDOWN_DIMENSIONS.items()
    }


# ----------------------------------------------------------------------------------------------- HTML


def wants_html(accept: str, format_param: str | None = None) -> bool:
    """HTML when ``?format=html``, or when the Accept header prefers ``text/html`` to JSON (browsers).

    Each type takes the quality of the most specific range that names it (RFC 9110 12.5.1: ``application/json;q=0.5,
    */*`` ranks JSON 0.5, not 1); ``application/xhtml+xml`` counts as HTML when named. On a tie the type named more
    specifically wins (``text/html, */*`` is HTML), else JSON (``*/*``, no header)."""
    if format_param:
        return format_param.lower() == "html"
    qualities: dict[str, float] = {}
    for part in accept.lower().split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
                quality = min(max(quality, 0.0), 1.0) if quality == quality else 0.0  # (NaN: not acceptable)
        media = media.strip()
        qualities[media] = max(qualities.get(media, quality), quality)

    def preference(media: str, *ranges: str) -> tuple[float, int]:
        """(quality, specificity) of the most specific of ``media`` and its ``ranges`` the header names."""
        for specificity, name in enumerate((media, *ranges)):
            if name in qualities:
                return qualities[name], -specificity
        return 0.0, -len(ranges) - 1

    as_html = max(preference("text/html", "text/*", "*/*"), preference("application/xhtml+xml"))
    as_json = preference("application/json", "application/*", "*/*")
    return as_html[0] > 0 and as_html > as_json


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


#: Subunits per unit of the currencies where it is not 100 (the Money gem's ``subunit_to_unit``, which Lago's
#: ``amount_cents`` are counted in): a yen has none, a Kuwaiti dinar 1,000 fils, an ouguiya 5 khoums (Lago takes its
#: old code, MRO, which the Money gem counts so), a Chilean unidad de fomento 10,000 (ISO 4217's 4 decimals, the Money
#: gem's since 6.6: Lago bills 1 UF as 10000 "cents", which showed as 100.00 CLF).
_SUBUNITS = {
    **dict.fromkeys("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split(), 1),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 1000),
    "CLF": 10_000,
    "MGA": 5,
    "MRO": 5,
    "MRU": 5,
}
_DECIMALS = {1: 0, 5: 1, 100: 2, 1000: 3, 10_000: 4}


def subunits_per_unit(currency: Any) -> int:
    """How many of Lago's ``amount_cents`` make one unit of ``currency`` (100 but for the currencies above)."""
    return _SUBUNITS.get(str(currency or "").upper(), 100)


def _money(cents: Any, currency: Any) -> str:
    """An amount in Lago's ``amount_cents`` (the currency's subunits) shown in the currency's units."""
    if cents is None:
        return "—"
    subunits = subunits_per_unit(currency)
    value = _EXACT.divide(Decimal(int(cents)), subunits)
    return f"{value:,.{_DECIMALS[subunits]}f} {currency or ''}".strip()


_STYLE = """
:root{color-scheme:light dark;--fg:#1c2330;--muted:#5b6675;--line:#d8dee6;--bar:#2f7d5b;--warn:#b7791f;--over:#c53030}
*{box-sizing:border-box}body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:var(--fg)}
main{max-width:960px;margin:0 auto;padding:24px}h1{font-size:1.5rem;margin:0 0 16px}
h2{font-size:1.1rem;margin:28px 0 8px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}dt{color:var(--muted)}dd{margin:0}
.limit{margin:10px 0}.limit .head{display:flex;justify-content:space-between;gap:12px}
.track{height:12px;background:var(--line);border-radius:6px;overflow:hidden;margin-top:4px}
.fill{height:100%;background:var(--bar)}.fill.warn{background:var(--warn)}.fill.over{background:var(--over)}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:var(--muted)}
"""


def render_html(data: Mapping[str, Any]) -> str:
    """The dashboard as one self-contained HTML page (every value escaped)."""
    plan = data.get("plan") or {}
    period = data.get("period") or {}
    amount = data.get("amount") or {}
    subscription = data.get("subscription") or {}
    org_id = data.get("org_id")
    interval = f", {_e(plan['interval'])}" if plan.get("interval") else ""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Billing · {_e(org_id)}</title><style>{_STYLE}</style></head><body><main>",
        f'<h1>Billing for <span id="org-id">{_e(org_id)}</span></h1>',
        '<section id="plan"><dl>',
        f'<dt>Plan</dt><dd id="plan-name" data-code="{_e(plan.get("code"))}">{_e(plan.get("name"))}'
        f' <span class="muted">({_e(plan.get("code"))}{interval})</span></dd>',
        f'<dt>Status</dt><dd id="status">{_e(subscription.get("status"))}</dd>',
    ]
    if subscription.get("next_plan_code"):
        parts.append(
            f'<dt>Next plan</dt><dd id="next-plan">{_e(subscription["next_plan_code"])}'
            f' <span class="muted">from {_e(subscription.get("downgrade_plan_date"))}</span></dd>'
        )
    parts += [
        f'<dt>Period</dt><dd id="period"><time id="period-from">{_e(period.get("from"))}</time> → '
        f'<time id="period-to">{_e(period.get("to"))}</time></dd>',
        f'<dt>Usage so far</dt><dd id="amount" data-cents="{_e(amount.get("amount_cents"))}">'
        f"{_e(_money(amount.get('amount_cents'), amount.get('currency')))}</dd>",
        "</dl></section>",
        '<section id="limits"><h2>Usage against limits</h2>',
    ]
    limits = data.get("limits") or []
    if not limits:
        parts.append('<p class="muted">No limits are configured for this plan.</p>')
    for limit in limits:
        ratio = limit.get("ratio")
        width = 0.0 if ratio is None else min(max(float(ratio), 0.0), 1.0) * 100
        level = " over" if limit.get("exceeded") else " warn" if ratio is not None and ratio >= 0.8 else ""
        # (rounded down below the limit: 100% says it is reached, as the bar's colour does)
        shown = min(float(ratio), 1e6) * 100 if ratio is not None else 0.0
        shown = shown if limit.get("exceeded") else min(math.floor(shown), 99)
        percent = "" if ratio is None else f' <span class="pct">({shown:.0f}%)</span>'
        parts.append(
            f'<div class="limit" data-limit="{_e(limit.get("name"))}"><div class="head">'
            f'<span class="name">{_e(limit.get("name"))}</span><span><span class="used">{_e(_fmt(limit.get("used")))}'
            f'</span> / <span class="max">{_e(_fmt(limit.get("limit")))}</span>{percent}</span></div>'
            f'<div class="track" role="progressbar" aria-label="{_e(limit.get("name"))}" aria-valuemin="0"'
            f' aria-valuemax="{_e(limit.get("limit"))}" aria-valuenow="{_e(limit.get("used"))}">'
            f'<div class="fill{level}" style="width:{width:.1f}%"></div></div></div>'
        )
    parts.append("</section>")
    metrics = data.get("metrics") or []
    if metrics:
        parts.append(
            '<section id="metrics"><h2>Usage by metric</h2><table><thead><tr><th>Metric</th>'
            '<th class="num">Units</th><th class="num">Events</th><th class="num">Amount</th></tr></thead><tbody>'
        )
        for metric in metrics:
            parts.append(
                f'<tr data-metric="{_e(metric["code"])}"><td>{_e(metric["name"])}</td>'
                f'<td class="num units">{_e(_fmt(metric["units"]))}</td><td class="num events">'
                f'{_e(_fmt(metric["events"]))}</td><td class="num">'
                f"{_e(_money(metric['amount_cents'], amount.get('currency')))}</td></tr>"
            )
        parts.append("</tbody></table></section>")
    for dimension, key in BREAKDOWN_DIMENSIONS.items():
        parts.append(_breakdown_table(dimension, key, data.get(key) or [], amount.get("currency")))
    source = {
        "lago_grouped_usage": "Breakdown from Lago grouped usage.",
        "ledger": "Breakdown from the local usage ledger.",
    }.get(str(data.get("breakdown_source")), "")
    parts.append(f'<p class="muted" id="source">{_e(source)}</p></main></body></html>')
    return "".join(parts)


def render_no_subscription_html(org_id: str) -> str:
    """The page of an org without an active subscription (``billing_routes``' 404): it says so, and nothing else. It
    was the dashboard's page over empty data: "Plan ()", "No limits are configured for this plan", and a hint telling
    the org's admin to group Lago's charges by ``pricing_group_keys`` or give a ledger (an operator's remedy, for a
    plan with usage)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Billing · {_e(org_id)}</title><style>{_STYLE}</style></head><body><main>"
        f'<h1>Billing for <span id="org-id">{_e(org_id)}</span></h1>'
        '<section id="plan"><dl><dt>Status</dt><dd id="status">no active subscription</dd></dl>'
        '<p class="muted">This org has no active subscription: there is no plan, limit or usage to show.</p>'
        "</section></main></body></html>"
    )


def _breakdown_table(dimension: str, key: str, rows: list[Mapping[str, Any]], currency: Any) -> str:
    title = {"user_id": "By user", "model": "By model"}.get(dimension, dimension)
    section_id = key.replace("_", "-")
    if not rows:
        return (
            f'<section id="{section_id}"><h2>{title}</h2><p class="muted">No breakdown: group the charge by '
            f"<code>{_e(dimension)}</code> in Lago (pricing_group_keys) or give a ledger.</p></section>"
        )
    more = len(rows) - _MAX_ROWS
    rows = rows[:_MAX_ROWS]  # (a page of thousands of rows is megabytes, rendered on the event loop)
    codes = sorted({code for row in rows for code in (row.get("units") or {})})
    head = "".join(f'<th class="num">{_e(code)}</th>' for code in codes)
    out = [
        f'<section id="{section_id}"><h2>{title}</h2><table><thead><tr><th>{_e(dimension)}</th>'
        f'{head}<th class="num">Amount</th></tr></thead><tbody>'
    ]
    for row in rows:
        units = row.get("units") or {}
        cells = "".join(
            f'<td class="num" data-metric="{_e(code)}">{_e(_fmt(units.get(code, 0)))}</td>' for code in codes
        )
        out.append(
            f'<tr data-key="{_e(row.get(dimension))}"><td>{_e(row.get(dimension))}</td>{cells}'
            f'<td class="num">{_e(_money(row.get("amount_cents"), currency))}</td></tr>'
        )
    if more > 0:
        out.append(
            f'<tr class="more"><td colspan="{len(codes) + 2}">and {more:,} more (the JSON answer, ?format=json, '
            "lists them all)</td></tr>"
        )
    out.append("</tbody></table></section>")
    return "".join(out)
