"""Seeded random usage shown by the billing dashboard, checked against the Lago emulator and independent oracles.

From a fixed seed, each case makes a Lago plan (charges of the standard, graduated, package and percentage models,
some grouped by ``user_id`` and/or ``model``, a metric sometimes billed by two charges), in a currency with 2, 0 or 3
decimals or a code unknown to ISO 4217, an org whose id, users and models hold HTML metacharacters, quotes, unicode,
right-to-left overrides and control characters, and events of huge and fractional amounts. ``GET .../dashboard`` is
read through ``billing_routes()`` as JSON and as HTML, and checked:

* the JSON's figures against the emulator's current usage (amounts summed, units and events per metric) and the
  breakdown per user and per model against the events themselves (units, events) and the grouped usage of every
  charge grouped by that key (amounts), all in ``Decimal``;
* every amount shown in the HTML against integer arithmetic in the currency's ISO 4217 exponent;
* the HTML parsed with ``html.parser``: only the page's own tags and attributes, as many ``<`` as tags, and every
  text node and attribute equal to the JSON value it shows (so no value leaves its context).

``wants_html`` is checked on seeded Accept headers against RFC 9110's rule (a media type takes the quality of the most
specific range that matches it). What the seeds found is kept below as named cases.
"""

from __future__ import annotations

import random
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._dashboard import wants_html
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "dashboard-key"
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)  # (decimal sums that never round)
SEEDS = list(range(12))

#: ISO 4217 minor-unit exponents of the currencies drawn (``ZZZ``/``XQQ``: no such code, 2 decimals by default).
ISO_EXPONENT = {"USD": 2, "EUR": 2, "JPY": 0, "BHD": 3, "KWD": 3, "ZZZ": 2, "XQQ": 2}
#: Those Lago takes for a plan (its list has no 3-decimal currency); the others are put in the emulator's store.
LAGO_TAKES = {"USD", "EUR", "JPY"}

#: Names of users, models, metrics and plans: markup, entities, quotes, unicode, bidi and control characters.
NASTY = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "' onmouseover='x",
    "a&amp;b",
    "&lt;b&gt;",
    'O\'Brien "Bob"',
    "</td></tr></table><h1>",
    "<!-- x -->",
    "]]>",
    "ünï©ødé ß",
    "\u202eevil\u202c.exe",
    "عربي",
    "שלום",
    "x\u200by\u2028z",
    "tab\there",
    "bell\x07\x01",
    "del\x7f",
    "nul\x00byte",
    "cr\rlf\n",
    "\ufeffbom",
    "emoji 😀",
    "{{7*7}} ${x}",
    "ada",
    "gpt-4o",
]

#: Org ids Lago can address (no ``. / ? # % \`` or control character) but with markup, quotes and bidi overrides.
ORG_IDS = ["org_1", "org<b>&amp;\"'", "ørg ünï", "org\u202eRTL", "org😀", "org'; <x>", "عربي"]

#: The page's own tags and attributes: anything else came from data.
TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "span", "section", "dl", "dt", "dd", "time",
    "p", "div", "table", "thead", "tbody", "tr", "th", "td", "code",
}  # fmt: skip
ATTRIBUTES = {
    "lang", "charset", "name", "content", "id", "class", "style", "role", "aria-label", "aria-valuemin",
    "aria-valuemax", "aria-valuenow", "data-code", "data-cents", "data-limit", "data-metric", "data-key",
}  # fmt: skip


def money(cents: int, currency: str | None) -> str:
    """``cents`` (the currency's minor units) in units, by integer arithmetic: ``1,234.567 KWD``."""
    exponent = ISO_EXPONENT.get(currency or "", 2)
    whole, minor = divmod(abs(cents), 10**exponent)
    text = f"{'-' if cents < 0 else ''}{whole:,}" + (f".{minor:0{exponent}d}" if exponent else "")
    return f"{text} {currency or ''}".strip()


def json_number(value: Decimal) -> int | float:
    """A decimal as a JSON number: int when whole or past a float, else the nearest float."""
    whole = value.to_integral_value()
    return int(whole) if value == whole or abs(value) > Decimal(sys.float_info.max) else float(value)


def plain(value: Any) -> str:
    """A JSON number as the page shows it: thousands separated, at most 2 decimals; null as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:,}" if isinstance(value, int) else str(value)


def rfc_wants_html(accept: str) -> bool:
    """RFC 9110 12.5.1: a type's quality is that of the most specific range naming it (``text/html``, ``text/*``,
    ``*/*``; ``application/xhtml+xml`` only when named); HTML when it ranks above JSON, or equal but named more
    specifically."""
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                quality = float(value)
        ranges[media.lower()] = max(quality, ranges.get(media.lower(), quality))

    def rank(*names: str) -> tuple[float, int]:
        for specificity, name in zip((3, 2, 1), names, strict=False):
            if name in ranges:
                return ranges[name], specificity
        return 0.0, 0

    html = max(rank("text/html", "text/*", "*/*"), rank("application/xhtml+xml"))
    json = rank("application/json", "application/*", "*/*")
    return html[0] > 0 and (html[0] > json[0] or (html[0] == json[0] and html[1] > json[1]))


def random_accept(rnd: random.Random) -> str:
    """An Accept header of a few ranges, some with a q-value."""
    media = ["text/html", "application/xhtml+xml", "application/json", "*/*", "application/*", "text/*"]
    media += ["application/xml", "image/webp", "text/plain"]
    parts = []
    for name in rnd.sample(media, rnd.randint(1, 5)):
        quality = rnd.choice([None, "1", "1.0", "0.9", "0.8", "0.5", "0.001", "0", "0.000"])
        parts.append(name if quality is None else f"{name}{rnd.choice([';', '; '])}q={quality}")
    return rnd.choice([",", ", "]).join(parts)


# ----------------------------------------------------------------------------------------------- scenario

METRICS = {"api_call": None, "tokens": "total_tokens", "gb": "gb"}  # code: the field a sum_agg metric sums


def charge(rnd: random.Random, code: str) -> dict[str, Any]:
    """A charge of ``code`` in a random model, grouped by a random choice of ``user_id`` and ``model``."""
    keys = rnd.choice([["user_id"], ["model"], ["user_id", "model"], ["model", "user_id"], []])
    properties: dict[str, Any] = {"pricing_group_keys": keys} if keys else {}
    models = ["standard", "graduated", "package"] + (["percentage"] if METRICS[code] else [])
    model = rnd.choice(models)
    price = rnd.choice(["0.01", "1", "0.001", "123456.789", "0.5", "1000000"])
    if model == "standard":
        properties["amount"] = price
    elif model == "graduated":
        properties["graduated_ranges"] = [
            {"from_value": 0, "to_value": 10, "per_unit_amount": price, "flat_amount": "1"},
            {"from_value": 11, "to_value": None, "per_unit_amount": "0.5", "flat_amount": "0"},
        ]
    elif model == "package":
        properties.update(amount=price, package_size=rnd.choice([1, 3, 100]), free_units=rnd.choice([0, 2]))
    else:
        properties.update(rate=rnd.choice(["1", "2.5", "0.1"]), fixed_amount=rnd.choice(["0", "0.5"]))
    return {"billable_metric_code": code, "charge_model": model, "properties": properties}


def build(seed: int) -> tuple[FakeLago, str, dict[str, Any]]:
    """The emulator with seed's plan, org and events; the org's id; the limits table (``LAGO_PLAN_LIMITS``)."""
    rnd = random.Random(seed)
    fake = FakeLago(api_key=API_KEY)
    for code, field in METRICS.items():
        aggregation = "sum_agg" if field else "count_agg"
        fake.add_billable_metric(code, name=rnd.choice(NASTY), aggregation_type=aggregation, field_name=field)
    currency = rnd.choice(list(ISO_EXPONENT))
    charges = [charge(rnd, code) for code in METRICS for _ in range(rnd.choice([1, 1, 2]))]
    plan_code = f"plan_{seed}"
    taken = currency in LAGO_TAKES
    fake.add_plan(
        plan_code,
        name=rnd.choice(NASTY),
        amount_cents=1000,
        amount_currency=currency if taken else "USD",
        charges=charges,
    )
    if not taken:  # (put behind the API, which refuses it: a currency a newer Lago may answer with)
        fake.store.plans[plan_code]["amount_currency"] = currency
    org_id = rnd.choice(ORG_IDS)
    fake.add_customer(org_id)
    fake.add_subscription(org_id, plan_code)
    users, models = rnd.sample(NASTY, 4), rnd.sample(NASTY, 3)
    for index in range(rnd.randint(0, 40)):
        code = rnd.choice(list(METRICS))
        properties: dict[str, Any] = {}
        if rnd.random() < 0.9:
            properties["user_id"] = rnd.choice(users)
        if rnd.random() < 0.9:
            properties["model"] = rnd.choice(models)
        if code == "tokens":
            properties["total_tokens"] = rnd.choice([1, 500, 10**9, 10**15])
        elif code == "gb":
            properties["gb"] = rnd.choice(["0.1", "0.2", "0.3", "1.25", "0.001", "12345678.9"])
        event = {"transaction_id": f"t{index}", "external_subscription_id": org_id, "code": code}
        fake.store.create_event({"event": {**event, "properties": properties}})
    limits: dict[str, Any] = {"max_api_calls": rnd.choice([1, 10, 10**6]), "max_gb": rnd.choice([1, 100, 10**30])}
    if rnd.random() < 0.4:  # a limits_provider's: any name, fractional and huge figures
        limits = {
            rnd.choice(NASTY): rnd.choice(
                [0, 3, "0.5", "1e400", {"limit": "0.3", "used": "0.1"}, {"limit": "1e400", "used": "0.1"}, {"limit": 7}]
            )
            for _ in range(3)
        } | {"max_gb": rnd.choice(["0.3", "12345679.3", 10**30, "1e400"])}
        return fake, org_id, {"provider": limits}
    return fake, org_id, {plan_code: limits}


@asynccontextmanager
async def dashboard_client(fake: FakeLago, plan_limits: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    """``billing_routes()`` over the emulator, every caller allowed."""
    provided = plan_limits.pop("provider", None)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0, plan_limits=plan_limits)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(
            OrgBilling(client=lago),
            authorize=lambda request, org_id: True,
            limits_provider=None if provided is None else lambda org_id: provided,
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as client:
            yield client


async def read_dashboard(seed: int) -> tuple[FakeLago, dict[str, Any], str]:
    """The seed's dashboard as JSON and as HTML, and the emulator it read."""
    fake, org_id, plan_limits = build(seed)
    path = f"/organizations/{quote(org_id, safe='')}/dashboard"
    async with dashboard_client(fake, plan_limits) as client:
        as_json = await client.get(path, headers={"Accept": "application/json"})
        as_html = await client.get(path, headers={"Accept": "text/html,*/*;q=0.8"})
        rnd = random.Random(f"accept {seed}")
        accept, fmt = random_accept(rnd), rnd.choice([None, None, "html", "json"])
        negotiated = await client.get(path, headers={"Accept": accept}, params={"format": fmt} if fmt else {})
    assert as_json.status_code == 200 and as_html.status_code == 200, (as_json.text, as_html.text)
    assert as_html.headers["content-type"].startswith("text/html")
    assert as_json.headers["content-type"].startswith("application/json")
    html_wanted = fmt == "html" if fmt else rfc_wants_html(accept)
    assert negotiated.headers["content-type"].startswith("text/html" if html_wanted else "application/json"), accept
    assert negotiated.text == (as_html.text if html_wanted else as_json.text)  # (the same data either way)
    data: dict[str, Any] = as_json.json()
    assert data["org_id"] == org_id
    return fake, data, as_html.text


# ------------------------------------------------------------------------------------------------ oracles


def expected_metrics(usage: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per metric: its units and events (the same for each of its charges), the amounts of all its charges."""
    metrics: dict[str, dict[str, Any]] = {}
    for charge_usage in usage["charges_usage"]:
        code = charge_usage["billable_metric"]["code"]
        entry = metrics.setdefault(code, {"units": Decimal(0), "events": 0, "amount_cents": 0})
        entry["units"] = max(entry["units"], Decimal(charge_usage["units"]))
        entry["events"] = max(entry["events"], charge_usage["events_count"])
        entry["amount_cents"] += charge_usage["amount_cents"]
    return metrics


def expected_breakdown(fake: FakeLago, usage: Mapping[str, Any], dimension: str) -> dict[str, dict[str, Any]]:
    """Per value of ``dimension``: events and units from the events of the metrics some charge groups by it, and the
    amounts of every such charge's groups (``(none)`` for events without the property)."""
    grouped = [
        c for c in usage["charges_usage"] if any(dimension in g["grouped_by"] for g in c["grouped_usage"])
    ]  # fmt: skip
    codes = {c["billable_metric"]["code"] for c in grouped}
    rows: dict[str, dict[str, Any]] = {}

    def row(value: Any) -> dict[str, Any]:
        key = "(none)" if value is None else str(value)
        return rows.setdefault(key, {"events": 0, "amount_cents": 0, "units": {}})

    for event in fake.events:
        if event["code"] in codes:
            found = row(event["properties"].get(dimension))
            field = METRICS[event["code"]]
            found["events"] += 1
            units = found["units"].get(event["code"], Decimal(0))
            found["units"][event["code"]] = units + (Decimal(str(event["properties"][field])) if field else 1)
    for charge_usage in grouped:
        for group in charge_usage["grouped_usage"]:
            row(group["grouped_by"].get(dimension))["amount_cents"] += group["amount_cents"]
    return rows


def check_figures(fake: FakeLago, data: Mapping[str, Any]) -> None:
    """The JSON's figures are the emulator's usage, summed exactly."""
    usage = fake.usage(data["org_id"], data["subscription"]["external_id"])["customer_usage"]
    assert data["amount"]["amount_cents"] == usage["amount_cents"]
    assert data["amount"]["currency"] == usage["currency"]
    metrics = expected_metrics(usage)
    assert {m["code"] for m in data["metrics"]} == set(metrics)
    for metric in data["metrics"]:
        want = metrics[metric["code"]]
        got = {**metric, "units": Decimal(str(metric["units"]))}
        assert {key: got[key] for key in want} == want, metric["code"]
    for dimension, key in (("user_id", "by_user"), ("model", "by_model")):
        rows = expected_breakdown(fake, usage, dimension)
        got_rows = {row[dimension]: row for row in data[key]}
        assert set(got_rows) == set(rows), key
        for value, want in rows.items():
            got = got_rows[value]
            assert (got["events"], got["amount_cents"]) == (want["events"], want["amount_cents"]), (key, value)
            # exact: units are JSON numbers that read back as the Decimal sum (no float accumulation)
            assert {code: Decimal(str(units)) for code, units in got["units"].items()} == want["units"], (key, value)
            assert all(str(Decimal(str(units))) == str(units) for units in got["units"].values()), got["units"]
        assert [row["events"] for row in data[key]] == sorted((row["events"] for row in data[key]), reverse=True)
    for limit in data["limits"]:
        used = limit["used"]
        if limit["name"] == "max_api_calls":
            assert used == metrics["api_call"]["events"]
        elif limit["name"] == "max_gb":
            assert Decimal(str(used)) == metrics["gb"]["units"]
        if used is None or limit["limit"] is None:
            assert limit["remaining"] is None and limit["ratio"] is None and not limit["exceeded"]
            continue
        low, high = Decimal(str(used)), Decimal(str(limit["limit"]))
        remaining = max(EXACT.subtract(high, low), Decimal(0))  # in decimal, then a JSON number: no float error
        assert limit["remaining"] == json_number(remaining), limit
        assert limit["exceeded"] is (low >= high)


class Page(HTMLParser):
    """The elements of a page: tag, attributes and text (entities decoded), in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict[str, Any]] = []
        self.open: list[dict[str, Any]] = []
        self.tags = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags += 1
        element: dict[str, Any] = {"tag": tag, "attrs": dict(attrs), "text": "", "inside": []}
        for parent in self.open:
            parent["inside"].append(element)
        self.elements.append(element)
        if tag != "meta":  # (a void element: never closed)
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        self.tags += 1
        assert self.open and self.open[-1]["tag"] == tag, (tag, [e["tag"] for e in self.open])
        self.open.pop()

    def handle_data(self, data: str) -> None:
        for element in self.open:
            element["text"] += data

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.elements
            if tag in (None, e["tag"]) and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> dict[str, Any]:
        found = self.find(tag, **attrs)
        assert len(found) == 1, (attrs, found)
        return found[0]


def parse(page: str) -> Page:
    """The page parsed, its structure checked: only its own tags and attributes, one ``<`` per tag."""
    parser = Page()
    parser.feed(page)
    parser.close()
    assert not parser.open
    assert {e["tag"] for e in parser.elements} <= TAGS
    assert {name for e in parser.elements for name in e["attrs"]} <= ATTRIBUTES
    assert page.count("<") == parser.tags + 1  # (+ the doctype): no '<' of a value reached the page raw
    assert "<script" not in page.lower()
    return parser


def check_page(data: Mapping[str, Any], page: str) -> None:
    """Every value in the HTML is the JSON's, in its own text node or attribute."""
    html = parse(page)
    currency = data["amount"]["currency"]
    org_id = data["org_id"]
    assert html.one(id="org-id")["text"] == org_id
    assert [e["text"] for e in html.elements if e["tag"] == "title"] == [f"Billing · {org_id}"]
    plan = html.one(id="plan-name")
    assert plan["attrs"]["data-code"] == data["plan"]["code"]
    assert plan["text"] == f"{data['plan']['name']} ({data['plan']['code']}, {data['plan']['interval']})"
    assert html.one(id="status")["text"] == data["subscription"]["status"]
    amount = html.one(id="amount")
    assert (amount["attrs"]["data-cents"], amount["text"]) == (
        str(data["amount"]["amount_cents"]),
        money(data["amount"]["amount_cents"], currency),
    )
    for limit in data["limits"]:
        box = html.one(data_limit=limit["name"])
        spans = {e["attrs"].get("class"): e["text"] for e in box["inside"] if e["tag"] == "span"}
        shown = (spans["name"], spans["used"], spans["max"])
        assert shown == (limit["name"], plain(limit["used"]), plain(limit["limit"]))
        bar = next(e for e in box["inside"] if e["attrs"].get("role") == "progressbar")
        assert bar["attrs"]["aria-label"] == limit["name"]
        assert (bar["attrs"]["aria-valuenow"], bar["attrs"]["aria-valuemax"]) == (
            "" if limit["used"] is None else str(limit["used"]),
            "" if limit["limit"] is None else str(limit["limit"]),
        )
    for metric in data["metrics"]:
        row = html.one("tr", data_metric=metric["code"])
        cells = [e["text"] for e in row["inside"] if e["tag"] == "td"]
        assert cells == [
            metric["name"],
            plain(metric["units"]),
            plain(metric["events"]),
            money(metric["amount_cents"], currency),
        ]
    for dimension, key in (("user_id", "by_user"), ("model", "by_model")):
        section = html.one(id=key.replace("_", "-"))
        rows = [e for e in section["inside"] if e["tag"] == "tr" and "data-key" in e["attrs"]]
        assert [r["attrs"]["data-key"] for r in rows] == [row[dimension] for row in data[key]]
        codes = sorted({code for row in data[key] for code in row["units"]})
        heads = [e["text"] for e in section["inside"] if e["tag"] == "th"]
        assert heads == ([dimension, *codes, "Amount"] if rows else [])
        for element, row in zip(rows, data[key], strict=True):
            cells = [e for e in element["inside"] if e["tag"] == "td"]
            assert [c["attrs"].get("data-metric") for c in cells[1:-1]] == codes
            units = [plain(row["units"].get(code, 0)) for code in codes]
            want = [row[dimension], *units, money(row["amount_cents"], currency)]
            assert [c["text"] for c in cells] == want, (key, row)


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", SEEDS)
async def test_dashboard_figures_and_page_match_the_usage(seed: int) -> None:
    """The dashboard's JSON is Lago's current usage summed exactly, and its HTML shows every value of the JSON in its
    own context: amounts in the currency's exponent, names with markup, quotes, bidi and control characters inert."""
    fake, data, page = await read_dashboard(seed)
    check_figures(fake, data)
    check_page(data, page)


@pytest.mark.parametrize("seed", range(4))
def test_accept_negotiation_follows_rfc_precedence(seed: int) -> None:
    """wants_html ranks HTML and JSON by the most specific Accept range naming each (RFC 9110), ?format= first."""
    rnd = random.Random(seed)
    for _ in range(500):
        accept = random_accept(rnd)
        assert wants_html(accept) is rfc_wants_html(accept), accept
        assert wants_html(accept, "html") and not wants_html(accept, "json")


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        # JSON ranked below HTML by name, a wildcard above both: HTML (JSON took the wildcard's 1)
        ("text/html;q=0.8, application/json;q=0.5, */*", True),
        ("application/json;q=0, */*", True),  # JSON refused: it was served
        ("text/*", True),  # any text, not JSON: JSON was served
        ("text/html, */*", True),
        ("text/html;q=0.5, */*;q=0.5", True),
        ("application/json, text/html", False),
        ("*/*", False),
        ("", False),
        ("image/png", False),
        ("text/html;q=nan", False),
        ("text/html;q=0, */*", False),
    ],
)
def test_accept_quality_of_the_most_specific_range(accept: str, html: bool) -> None:
    """A type takes the quality of the most specific range naming it: a wildcard does not raise JSON above the
    q-value the header gives JSON by name, and text/* or */* make HTML acceptable."""
    assert wants_html(accept) is html


def two_charges_fake(charges: list[dict[str, Any]], events: list[dict[str, Any]]) -> FakeLago:
    """org_1 on a plan of ``charges`` over a ``gb`` sum metric, with ``events``' properties."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("gb", aggregation_type="sum_agg", field_name="gb")
    fake.add_plan("p", charges=charges)
    fake.add_customer("org_1")
    fake.add_subscription("org_1", "p")
    for index, properties in enumerate(events):
        event = {"transaction_id": f"t{index}", "external_subscription_id": "org_1", "code": "gb"}
        fake.store.create_event({"event": {**event, "properties": properties}})
    return fake


async def test_breakdown_amount_sums_every_charge_of_a_metric() -> None:
    """A user's amount is every charge of a metric grouped by user (a per-GB fee and a percentage on the same
    metric), while the metric's units and events count once: the second charge's amount was left out."""
    grouped = {"pricing_group_keys": ["user_id"]}
    fee = {"billable_metric_code": "gb", "charge_model": "standard", "properties": {"amount": "1", **grouped}}
    cut = {"billable_metric_code": "gb", "charge_model": "percentage", "properties": {"rate": "10", **grouped}}
    fake = two_charges_fake([fee, cut], [{"user_id": "ada", "gb": 30}, {"user_id": "bob", "gb": 10}])
    async with dashboard_client(fake, {}) as client:
        data = (await client.get("/organizations/org_1/dashboard")).json()
    assert data["amount"]["amount_cents"] == 4400  # $40 of GB and 10% of 40
    by_user = {row["user_id"]: row for row in data["by_user"]}
    assert by_user["ada"] == {"user_id": "ada", "events": 1, "amount_cents": 3300, "units": {"gb": 30}}
    assert by_user["bob"] == {"user_id": "bob", "events": 1, "amount_cents": 1100, "units": {"gb": 10}}


async def test_breakdown_units_are_summed_exactly() -> None:
    """Fractional units of one user across models are summed as decimals: 0.1 + 0.2 GB is 0.3, not the float sum
    0.30000000000000004."""
    grouped = {"pricing_group_keys": ["user_id", "model"]}
    charge_ = {"billable_metric_code": "gb", "charge_model": "standard", "properties": {"amount": "0", **grouped}}
    events = [{"user_id": "ada", "model": "a", "gb": "0.1"}, {"user_id": "ada", "model": "b", "gb": "0.2"}]
    events += [{"user_id": "bob", "model": "a", "gb": "12345678.9"}, {"user_id": "bob", "model": "b", "gb": "0.3"}]
    fake = two_charges_fake([charge_], events)
    async with dashboard_client(fake, {}) as client:
        data = (await client.get("/organizations/org_1/dashboard")).json()
    by_user = {row["user_id"]: row["units"] for row in data["by_user"]}
    assert by_user == {"ada": {"gb": 0.3}, "bob": {"gb": 12345679.2}}


@pytest.mark.parametrize(
    ("given", "remaining"),
    [
        ({"limit": "0.3", "used": "0.1"}, 0.2),  # was 0.19999999999999998
        ({"limit": "12345679.3", "used": "12345679.2"}, 0.1),  # was 0.09999999962747097
        ({"limit": "1e400", "used": "0.1"}, 10**400),
    ],
)
async def test_limit_remaining_is_exact(given: dict[str, Any], remaining: int | float) -> None:
    """A limit's remaining is the limit minus the usage in decimal (what the JSON shows of both), never a float
    subtraction's artefact, and past a float still a JSON number."""
    fake = two_charges_fake([{"billable_metric_code": "gb", "properties": {"amount": "1"}}], [])
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(
            OrgBilling(client=lago), authorize=lambda request, org_id: True, limits_provider=lambda org_id: {"q": given}
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as client:
            response = await client.get("/organizations/org_1/dashboard")
    assert response.status_code == 200
    assert response.json()["limits"][0]["remaining"] == remaining


async def test_huge_amounts_are_shown_to_the_last_subunit() -> None:
    """An amount past 28 digits (a ledger's) is shown exactly in the currency's units, not rounded to 28 digits."""
    fake = two_charges_fake([{"billable_metric_code": "gb", "properties": {"amount": "1"}}], [])
    ledger = {"by_user": [{"user_id": "ada", "events": 1, "amount_cents": 10**30 + 1}], "by_model": []}
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(
            OrgBilling(client=lago), authorize=lambda request, org_id: True, breakdown_provider=lambda org_id: ledger
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as client:
            page = (await client.get("/organizations/org_1/dashboard?format=html")).text
    cells = [e["text"] for e in parse(page).one(id="by-user")["inside"] if e["tag"] == "td"]
    assert cells[-1] == money(10**30 + 1, "USD") == "10,000,000,000,000,000,000,000,000,000.01 USD"
