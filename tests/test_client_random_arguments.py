"""Every public ``LagoClient`` method called with random arguments, from fixed seeds, against the emulator.

Ids (customer, subscription, plan, metric, feature, privilege, transaction ids) are made of dots, ``..``, ``/``,
``%2F``, blanks, ``?``, ``#``, NFC and NFD text, control characters, NUL, lone surrogates, or are empty, very long or
not strings; dates are strings of several forms, junk, or ``date``/``datetime`` objects (naive, aware, other zones);
page arguments are 0, negative, huge, bools, strings; bodies and list filters have values JSON cannot carry, brackets
in metadata keys, and statuses Lago does not have. The oracle, for each call, is one of:

* the client refuses it before sending anything, with a :class:`LagoIntegrationError` naming the argument;
* every request it sends goes to the resource named (its path segments decode back to exactly the ids given, no id
  changes the path's shape or the query's: no traversal, no injection), validates against Lago's OpenAPI spec when
  the values passed through are valid there, and the call answers as documented, or with a :class:`LagoAPIError`
  (Lago's answer to values it refuses).

Any other exception, a request to another resource, or a query whose shape an argument changed is a defect. The
defects the seeds found are kept below as named regression cases.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import re
from collections.abc import Awaitable, Callable, Hashable, Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from openapi_core.exceptions import OpenAPIError

from _openapi import describe, load_spec, spec_request
from lago_org_billing import (
    BillingSettings,
    InvalidRequestError,
    LagoAPIError,
    LagoClient,
    LagoIntegrationError,
    LagoUnavailableError,
)
from lago_org_billing._client import Page
from lago_org_billing.testing import FakeLago
from test_client_wallets_coupons_credit_notes_and_page_arguments import Recorder

pytestmark = pytest.mark.anyio

API_KEY = "k"

#: Seeds of the random calls: fixed, so a failure is reproduced by its seed.
SEEDS = range(8)
CALLS_PER_SEED = 60

#: Pieces of random ids: what ids must never do to a URL, and text that must round-trip.
PIECES = [
    "org", "a", "Z9", "-", "_", ":", "@", "~", ";", ",", "&", "=", "+", "!", "$", "'", "(", "[", "]", "{", "|", "^",
    "`", '"', "<", ">", " ", ".", "..", "/", "%2F", "%", "%00", "?", "#", "\\", "\t", "\n", "\x00", "\x1f", "\x7f",
    "\x85", "\xa0", "\u2028", "\u200b", "\ufeff", "\u00e9", "e\u0301", "\u65e5\u672c", "\U0001f642", "\ud800",
    "\uff0f", "*",
]  # fmt: skip
#: Ids the emulator has (customers, their subscriptions); NFC and NFD spellings of one name are two ids.
SEEDED = ["org_1", "org \u00e9", "org e\u0301", "a:b@c", "x~y", "\u65e5\u672c", "tab\tin"]
PENDING = "later_1"  # a customer whose subscription has not started
SUBSCRIPTION_STATUSES = ("active", "pending", "terminated", "canceled", "incomplete")
NOT_IN_SPEC = "incomplete"  # a status Lago has (Subscription::STATUSES) that the spec's enums leave out
FUTURE = "2099-01-01T00:00:00Z"


# ----------------------------------------------------------------------------------------------- random arguments


def random_id(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, 0, 1, True, b"org", ["org"], {"id": "org"}, 1.5])
    if roll < 0.08:
        return ""
    if roll < 0.11:
        return "x" * rng.choice([255, 256, 1000, 5000])
    if roll < 0.45:
        return rng.choice([*SEEDED, PENDING])
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4)))


def page_argument(rng: random.Random) -> Any:
    if rng.random() < 0.7:
        return rng.choice([1, 2, 3, 1000])
    return rng.choice([0, -1, 10**12, 2**31 - 1, 2**31, True, False, "1", "2abc", 1.0, None, 1001])


def status(rng: random.Random) -> Any:
    return rng.choice(
        [None, "", *SUBSCRIPTION_STATUSES, "cancelled", "Active", "Pending", " pending", "junk", 1, True, ["active"]]
    )


def date_value(rng: random.Random) -> tuple[Any, bool]:
    """A date argument, and whether it is a date-time the spec takes."""
    return rng.choice(
        [
            (None, True),
            (FUTURE, True),
            ("2099-01-01T00:00:00+05:30", True),
            ("2099-01-01T00:00:00.123-08:00", True),
            ("2099-01-01T00:00:00", False),  # naive: UTC for Lago, no RFC 3339 date-time for the spec
            ("2099-01-01", False),
            ("01/02/2099", False),
            ("junk", False),
            ("", False),
            (dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc), False),
            (dt.datetime(2099, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=9))), False),
            (dt.datetime(2099, 1, 1), False),
            (dt.date(2099, 1, 1), False),
            (4070908800, False),
        ]
    )


def text_value(rng: random.Random) -> tuple[Any, bool]:
    """A value for a string field passed through, and whether the spec takes it there."""
    return rng.choice(
        [
            ("v", True),
            ("a&b=c#d?e", True),
            ("x" * 300, True),
            ("e\u0301 \u00e9 \U0001f642", True),
            ("", True),
            (None, False),
            (1, False),
            (True, False),
            (1.5, False),
            (["a", "b"], False),
            ({"k": "v"}, False),
            # JSON cannot carry these: refused before sending
            (float("nan"), False),
            (float("inf"), False),
            ("\ud800", False),
            (b"bytes", False),
            (Decimal("1.50"), False),
            (dt.date(2099, 1, 1), False),
            (dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc), False),
            ({1, 2}, False),
        ]
    )


def as_key(value: Any) -> Any:
    """A random id as a dict key (a list or dict id: its repr)."""
    return value if isinstance(value, Hashable) else repr(value)


def privilege_value(rng: random.Random) -> tuple[Any, bool]:
    value, _ = text_value(rng)
    return rng.choice([(5, True), (True, True), ("x", True), (value, False)])


# ---------------------------------------------------------------------------------------------- the emulator


def seeded_lago() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_feature("f", privileges=[{"code": "p", "value_type": "integer"}])
    fake.add_plan("starter", entitlements={"f": {"p": 10}})
    for external_id in SEEDED:
        fake.add_customer(external_id, currency="USD")
        fake.add_subscription(external_id, "starter", external_id=external_id)
    fake.add_customer(PENDING, currency="USD")
    fake.add_subscription(PENDING, "starter", external_id=PENDING, subscription_at=FUTURE)
    fake.add_invoice("org_1")
    fake.add_wallet("org_1", code="prepaid")
    fake.add_applied_coupon("org_1", "launch", amount_cents=100)
    return fake


@pytest.fixture
async def lago() -> Any:
    fake = seeded_lago()
    recorder = Recorder(fake.transport())
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001, max_retries=1)
    async with LagoClient(settings, transport=recorder) as client:
        yield client, recorder


# -------------------------------------------------------------------------------------------------- the oracle

Segment = str  # a path segment, as it must decode


@dataclasses.dataclass
class Call:
    """One random call and what it may do."""

    label: str
    run: Callable[[], Awaitable[Any]]
    #: what a refusal must name (one of them)
    names: tuple[str, ...]
    #: (method, path segments) of every request it may send: to the resource named, nothing else
    routes: list[tuple[str, tuple[Segment, ...]]]
    #: what its answer must be when Lago takes it
    answer: Callable[[Any], bool]
    #: query parameters, as Rack reads them ((name, [key, ...]) -> value), that a request must carry exactly
    query: dict[tuple[str, tuple[str, ...]], str] = dataclasses.field(default_factory=dict)
    #: whether every value passed through is one the spec takes (then each request must validate against it)
    spec: bool = True


_RACK_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")


def rack_key(name: str) -> tuple[str, tuple[str, ...]] | None:
    """A query parameter name as Rack reads it: ``metadata[k]`` is ``("metadata", ("k",))``; ``None`` when Rack
    cannot read it as written (a key holding a bracket)."""
    found = _RACK_KEY.fullmatch(name)
    if found is None:
        return None
    return found.group(1), tuple(re.findall(r"\[([^\[\]]*)\]", found.group(2)))


def problems_of(call: Call, requests: list[httpx.Request]) -> Iterator[str]:
    for request in requests:
        raw = request.url.raw_path.split(b"?")[0].decode("ascii")
        segments = tuple(unquote(segment, errors="strict") for segment in raw.split("/")[1:])
        if (request.method, segments) not in call.routes:
            yield f"{request.method} {raw} is not {call.routes}"
        for (name, keys), value in call.query.items():
            sent = [v for k, v in request.url.params.multi_items() if rack_key(k) == (name, keys)]
            if sent != [value]:
                yield f"query {name}{keys} sent as {sent}, given {value!r}: {request.url.query!r}"
        if call.spec:
            try:  # (on its raw path: _openapi's decoded one reads an id's "?" as the query's start)
                load_spec().validate_request(dataclasses.replace(spec_request(request), path=raw))
            except OpenAPIError as exc:
                yield f"{request.method} {request.url} {request.content[:200]!r} not valid: {describe(exc)[:600]}"


async def check(call: Call, recorder: Recorder) -> list[str]:
    before = len(recorder.requests)
    try:
        result = await call.run()
    except LagoIntegrationError as exc:
        sent = recorder.requests[before:]
        if not sent:
            message = str(exc)
            if not any(name in message for name in call.names):
                return [f"refused without naming {call.names}: {message}"]
            return []
        problems = list(problems_of(call, sent))
        if not isinstance(exc, LagoAPIError):
            problems.append(f"{type(exc).__name__} raised once sent: {exc}")
        elif isinstance(exc, LagoUnavailableError):
            problems.append(f"Lago failed on it (an outage to the caller): {exc}")
        return problems
    except Exception as exc:  # the defects this file is about
        return [f"{type(exc).__name__}: {exc!r}"[:400]]
    problems = list(problems_of(call, recorder.requests[before:]))
    if not call.answer(result):
        problems.append(f"answer not as documented: {result!r}"[:300])
    return problems


def is_page(result: Any) -> bool:
    return isinstance(result, Page) and isinstance(result.items, list)


async def consumed(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


def random_call(rng: random.Random, client: LagoClient, transactions: list[str]) -> Call:
    """One random call of a public method."""
    a, b, c = random_id(rng), random_id(rng), random_id(rng)
    v1 = ("api", "v1")
    kind = rng.randrange(32)
    if kind == 0:
        return Call(
            "get_customer",
            lambda: client.get_customer(a),
            ("external_id",),
            [("GET", (*v1, "customers", a))],
            lambda r: isinstance(r, dict) and r.get("external_id") == a,
        )
    if kind == 1:
        return Call(
            "delete_customer",
            lambda: client.delete_customer(a),
            ("external_id",),
            [("DELETE", (*v1, "customers", a))],
            lambda r: isinstance(r, dict) and r.get("external_id") == a,
        )
    if kind == 2:
        name, name_ok = text_value(rng)
        items = [
            {"key": rng.choice(["k", "plan", "x" * 30]), "value": value, "display_in_invoice": rng.random() < 0.5}
            for value, _ in (text_value(rng) for _ in range(rng.randint(0, 7)))
        ]
        body = {"external_id": a, "name": name, "metadata": items}
        valid = name_ok and all(isinstance(item["value"], str) and item["value"] != "\ud800" for item in items)
        return Call(
            "upsert_customer",
            lambda: client.upsert_customer(body),
            ("external_id", "name", "metadata"),
            [("POST", (*v1, "customers"))],
            lambda r: isinstance(r, dict) and r.get("external_id") == a,
            spec=valid and name != "\ud800",
        )
    if kind == 3:
        email, _ = text_value(rng)
        return Call(
            "update_customer",
            lambda: client.update_customer(a, email=email),
            ("external_id", "email"),
            [("POST", (*v1, "customers"))],
            lambda r: isinstance(r, dict) and r.get("external_id") == a,
            spec=False,  # (a random "email" is no email)
        )
    if kind == 4:
        term, term_ok = text_value(rng)
        key = rng.choice(["k", "a]b", "x][y", "", "[", "\u00e9", random_id(rng)])
        meta, meta_ok = text_value(rng)
        countries = rng.choice([["US"], ["US", "FR"], ["zz"], [None], [True], []])
        page, per_page = page_argument(rng), page_argument(rng)
        query: dict[tuple[str, tuple[str, ...]], str] = {}
        if isinstance(key, str) and isinstance(meta, str):
            query[("metadata", (key,))] = meta
        if isinstance(term, str):
            query[("search_term", ())] = term
        return Call(
            "list_customers",
            lambda: client.list_customers(
                page=page, per_page=per_page, search_term=term, metadata={key: meta}, countries=countries
            ),
            ("page", "per_page", "metadata", "search_term", "countries"),
            [("GET", (*v1, "customers"))],
            is_page,
            query,
            spec=term_ok and meta_ok and all(country in ("US", "FR") for country in countries),
        )
    if kind == 5:
        per_page = page_argument(rng)
        return Call(
            "iter_customers",
            lambda: consumed(client.iter_customers(per_page=per_page)),
            ("per_page",),
            [("GET", (*v1, "customers"))],
            lambda r: isinstance(r, list),
        )
    if kind == 6:
        wanted = status(rng)
        return Call(
            "get_subscription",
            lambda: client.get_subscription(a, status=wanted),
            ("external_id", "status"),
            [("GET", (*v1, "subscriptions", a))],
            lambda r: isinstance(r, dict) and r.get("external_id") == a,
            spec=wanted != NOT_IN_SPEC,
        )
    if kind == 7:
        return Call(
            "get_current_subscription",
            lambda: client.get_current_subscription(a),
            ("external_id",),
            [("GET", (*v1, "subscriptions", a))],
            lambda r: r is None or (isinstance(r, dict) and r.get("external_id") == a),
        )
    if kind == 8:
        wanted = status(rng)
        name, name_ok = text_value(rng)
        ending, ending_ok = date_value(rng)
        return Call(
            "update_subscription",
            lambda: client.update_subscription(a, status=wanted, name=name, ending_at=ending),
            ("external_id", "status", "name", "ending_at"),
            [("PUT", (*v1, "subscriptions", a))],
            lambda r: isinstance(r, dict) and r.get("external_id") == a,
            spec=wanted != NOT_IN_SPEC and name_ok and ending_ok,
        )
    if kind == 9:
        wanted = status(rng)
        on_invoice = rng.choice([None, "generate", "skip", "junk"])
        return Call(
            "terminate_subscription",
            lambda: client.terminate_subscription(a, status=wanted, on_termination_invoice=on_invoice),
            ("external_id", "status", "on_termination_invoice"),
            [("DELETE", (*v1, "subscriptions", a))],
            lambda r: isinstance(r, dict) and r.get("external_id") == a,
        )
    if kind == 10:
        start, start_ok = date_value(rng)
        ending, ending_ok = date_value(rng)
        plan = rng.choice(["starter", b])
        billing_time = rng.choice([None, "calendar", "anniversary", "Calendar"])
        return Call(
            "create_subscription",
            lambda: client.create_subscription(
                external_customer_id=a,
                plan_code=plan,
                external_id=c,
                subscription_at=start,
                ending_at=ending,
                billing_time=billing_time,
            ),
            ("external_customer_id", "external_id", "plan_code", "subscription_at", "ending_at", "billing_time"),
            [("POST", (*v1, "subscriptions"))],
            lambda r: isinstance(r, dict) and r.get("external_id") == c,
            spec=start_ok and ending_ok and isinstance(plan, str) and plan != "\ud800",
        )
    if kind == 11:
        statuses = rng.choice([None, [], [status(rng)], [status(rng), status(rng)], "active", ("pending",)])
        customer, plan = rng.choice([None, a]), rng.choice([None, b])
        page, per_page = page_argument(rng), page_argument(rng)
        query = {}
        if isinstance(customer, str):
            query[("external_customer_id", ())] = customer
        if isinstance(plan, str) and plan:
            query[("plan_code", ())] = plan
        return Call(
            "list_subscriptions",
            lambda: client.list_subscriptions(
                external_customer_id=customer, plan_code=plan, statuses=statuses, page=page, per_page=per_page
            ),
            ("statuses", "page", "per_page", "external_customer_id", "plan_code"),
            [("GET", (*v1, "subscriptions"))],
            is_page,
            query,
            spec=NOT_IN_SPEC not in (statuses or ()) and "" not in (customer, plan),
        )
    if kind == 12:
        statuses = rng.choice([None, [status(rng)], ["active", "terminated"]])
        per_page = page_argument(rng)
        return Call(
            "iter_subscriptions",
            lambda: consumed(client.iter_subscriptions(statuses=statuses, per_page=per_page)),
            ("statuses", "per_page"),
            [("GET", (*v1, "subscriptions"))],
            lambda r: isinstance(r, list),
            spec=NOT_IN_SPEC not in (statuses or ()),
        )
    if kind == 13:
        wanted = status(rng)
        return Call(
            "get_subscription_entitlements",
            lambda: client.get_subscription_entitlements(a, status=wanted),
            ("external_id", "status"),
            [("GET", (*v1, "subscriptions", a, "entitlements"))],
            lambda r: isinstance(r, list),
            spec=wanted != NOT_IN_SPEC,
        )
    if kind == 14:
        wanted = status(rng)
        value, value_ok = privilege_value(rng)
        feature, privilege = rng.choice(["f", as_key(b)]), rng.choice(["p", as_key(c)])
        entitlements: Any = rng.choice(
            [
                {feature: {privilege: value}},
                {feature: value},
                [{"code": feature, "privileges": privilege}],
                [(feature, {privilege: value})],
                None,
                "f",
            ]
        )
        valid = entitlements == {feature: {privilege: value}} and value_ok
        return Call(
            "update_subscription_entitlements",
            lambda: client.update_subscription_entitlements(a, entitlements, status=wanted),
            ("external_id", "status", "entitlements"),
            [("PATCH", (*v1, "subscriptions", a, "entitlements"))],
            lambda r: isinstance(r, list),
            spec=valid and wanted != NOT_IN_SPEC and all(isinstance(k, str) for k in (feature, privilege)),
        )
    if kind == 15:
        wanted = status(rng)
        return Call(
            "remove_subscription_entitlement",
            lambda: client.remove_subscription_entitlement(a, b, status=wanted),
            ("external_id", "feature code", "status"),
            [("DELETE", (*v1, "subscriptions", a, "entitlements", b))],
            lambda r: isinstance(r, dict),
            spec=False,  # (the spec has no query parameter on these DELETEs)
        )
    if kind == 16:
        removed = (*v1, "subscriptions", a, "entitlements", b) + (() if c is None else ("privileges", c))
        return Call(
            "remove_subscription_entitlement (privilege)",
            lambda: client.remove_subscription_entitlement(a, b, c),
            ("external_id", "feature code", "privilege code"),
            [("DELETE", removed)],
            lambda r: isinstance(r, dict),
        )
    if kind == 17:
        page, per_page = page_argument(rng), page_argument(rng)
        return Call(
            "list_features",
            lambda: client.list_features(page=page, per_page=per_page),
            ("page", "per_page"),
            [("GET", (*v1, "features"))],
            is_page,
        )
    if kind == 18:
        transaction_id = rng.choice([a, *transactions[-3:]]) if transactions else a
        return Call(
            "get_event",
            lambda: client.get_event(transaction_id),
            ("transaction_id",),
            [("GET", (*v1, "events", transaction_id))],
            lambda r: isinstance(r, dict) and r.get("transaction_id") == transaction_id,
        )
    if kind == 19:
        when, _ = date_value(rng)
        prop, prop_ok = text_value(rng)
        event = {"transaction_id": a, "external_subscription_id": b, "code": "api_call", "timestamp": when}
        event["properties"] = {"p": prop}

        async def create_event() -> Any:
            created = await client.create_event(event)
            transactions.append(a)
            return created

        return Call(
            "create_event",
            create_event,
            ("transaction_id", "external_subscription_id", "timestamp", "propert"),
            [("POST", (*v1, "events"))],
            lambda r: isinstance(r, dict),
            spec=prop_ok,
        )
    if kind == 20:
        events = [
            {"transaction_id": random_id(rng), "external_subscription_id": rng.choice(SEEDED), "code": "api_call"}
            for _ in range(rng.choice([0, 1, 3, 101]))
        ]
        return Call(
            "create_events",
            lambda: client.create_events(events),
            ("transaction_id", "event"),
            [("POST", (*v1, "events", "batch"))],
            lambda r: isinstance(r, list) and len(r) == len(events),
        )
    if kind == 21:
        body = rng.choice([b'{"events": []}', b"{}", b"not json", b'{"events": [{"code": 1}]}', b""])
        return Call(
            "send_event_batch_json",
            lambda: client.send_event_batch_json(body),
            ("body",),
            [("POST", (*v1, "events", "batch"))],
            lambda r: r is None,
            spec=False,  # (the body is the caller's bytes, sent as they are)
        )
    if kind == 22:
        getter = rng.choice(
            [
                ("get_billable_metric", client.get_billable_metric, "billable_metrics", "billable metric code"),
                ("get_plan", client.get_plan, "plans", "plan code"),
            ]
        )
        label, method, collection, what = getter
        return Call(
            label,
            lambda: method(a),
            (what,),
            [("GET", (*v1, collection, a))],
            lambda r: isinstance(r, dict) and r.get("code") == a,
        )
    if kind == 23:
        value, value_ok = privilege_value(rng)
        b, c = as_key(b), as_key(c)
        entitlements = rng.choice([{b: {c: value}}, {b: value}, [(b, {c: value})], None])
        return Call(
            "set_plan_entitlements",
            lambda: client.set_plan_entitlements(a, entitlements),
            ("plan code", "entitlements"),
            [("POST", (*v1, "plans", a, "entitlements"))],
            lambda r: isinstance(r, list),
            spec=entitlements == {b: {c: value}} and value_ok and isinstance(b, str) and isinstance(c, str),
        )
    if kind == 24:
        name, name_ok = text_value(rng)
        item: Any = rng.choice(
            [
                {"code": a, "name": name, "aggregation_type": "count_agg"},
                [("code", a)],
                None,
            ]
        )
        return Call(
            "create_billable_metric",
            lambda: client.create_billable_metric(item),
            ("billable_metric", "billable metric", "name", "code"),
            [("POST", (*v1, "billable_metrics"))],
            lambda r: isinstance(r, dict),
            spec=False,  # (random codes and names: Lago's to judge)
        )
    if kind == 25:
        amount = rng.choice([0, 100, -1, 1.5, "100", float("nan"), Decimal("100"), None])
        plan: Any = rng.choice(
            [
                {"code": a, "name": "n", "interval": "monthly", "amount_cents": amount, "amount_currency": "USD"},
                ["code", a],
            ]
        )
        return Call(
            "create_plan",
            lambda: client.create_plan(plan),
            ("plan", "amount_cents", "code"),
            [("POST", (*v1, "plans"))],
            lambda r: isinstance(r, dict),
            spec=False,
        )
    if kind == 26:
        feature: Any = rng.choice([{"code": a, "name": text_value(rng)[0]}, "f"])
        return Call(
            "create_feature",
            lambda: client.create_feature(feature),
            ("feature", "name", "code"),
            [("POST", (*v1, "features"))],
            lambda r: isinstance(r, dict),
            spec=False,
        )
    if kind == 27:
        metric = rng.choice([None, "", "api_call", c])
        taxes = rng.random() < 0.5
        query = {("external_subscription_id", ()): b} if isinstance(b, str) else {}
        if isinstance(metric, str) and metric:
            query[("billable_metric_code", ())] = metric
        return Call(
            "get_current_usage",
            lambda: client.get_current_usage(a, b, apply_taxes=taxes, billable_metric_code=metric),
            ("customer external_id", "external_subscription_id", "billable_metric_code"),
            [("GET", (*v1, "customers", a, "current_usage"))],
            lambda r: isinstance(r, dict),
            query,
        )
    if kind == 28:
        customer = rng.choice([None, a])
        since, _ = date_value(rng)
        day = rng.choice([None, dt.date(2026, 1, 1), "2026-01-01", "junk", since])
        page, per_page = page_argument(rng), page_argument(rng)
        # (an empty filter is sent as given, "external_customer_id=", which the spec does not allow: Lago, reading ""
        # as a value, filters by it and lists nothing)
        method = rng.choice(["list_invoices", "list_credit_notes"])
        query = {("external_customer_id", ()): customer} if isinstance(customer, str) else {}
        return Call(
            method,
            lambda: getattr(client, method)(
                external_customer_id=customer, issuing_date_from=day, page=page, per_page=per_page
            ),
            ("external_customer_id", "issuing_date_from", "page", "per_page"),
            [("GET", (*v1, method.removeprefix("list_")))],
            is_page,
            query,
            spec=day in (None, dt.date(2026, 1, 1), "2026-01-01") and customer != "",
        )
    if kind == 29:
        page, per_page = page_argument(rng), page_argument(rng)
        currency = rng.choice([None, "USD", "usd", ["USD"]])
        query = {("external_customer_id", ()): a} if isinstance(a, str) else {}
        return Call(
            "list_wallets",
            lambda: client.list_wallets(external_customer_id=a, page=page, per_page=per_page, currency=currency),
            ("external_customer_id", "page", "per_page", "currency"),
            [("GET", (*v1, "wallets"))],
            is_page,
            query,
            spec=currency in (None, "USD"),
        )
    if kind == 30:
        wanted = rng.choice([None, "active", "terminated", "Active", "canceled", "", 1])
        customer = rng.choice([None, a])
        page, per_page = page_argument(rng), page_argument(rng)
        return Call(
            "list_applied_coupons",
            lambda: client.list_applied_coupons(
                external_customer_id=customer, status=wanted, page=page, per_page=per_page
            ),
            ("status", "external_customer_id", "page", "per_page"),
            [("GET", (*v1, "applied_coupons"))],
            is_page,
            {("external_customer_id", ()): customer} if isinstance(customer, str) else {},
            spec=customer != "",
        )
    retry = rng.choice([True, False])
    if rng.random() < 0.5:
        return Call(
            "health",
            lambda: client.health(retry=retry),
            ("retry",),
            [("GET", ("health",))],
            lambda r: isinstance(r, dict),
            spec=False,  # (/health is outside the spec's /api/v1)
        )
    return Call(
        "get_webhook_public_key",
        lambda: client.get_webhook_public_key(retry=retry),
        ("retry",),
        [("GET", (*v1, "webhooks", "json_public_key"))],
        lambda r: isinstance(r, bytes),
    )


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_arguments_are_refused_before_sending_or_sent_to_the_resource_named(
    seed: int, lago: tuple[LagoClient, Recorder]
) -> None:
    """Each random call is refused before any request, naming the argument, or sends requests to the resource it
    names (ids decoding back exactly, the query shaped as given), valid against Lago's spec, and answers as
    documented or with Lago's error: never another exception."""
    client, recorder = lago
    rng = random.Random(seed)
    transactions: list[str] = []
    found: list[str] = []
    for number in range(CALLS_PER_SEED):
        call = random_call(rng, client, transactions)
        found.extend(f"seed {seed} call {number} {call.label}: {problem}" for problem in await check(call, recorder))
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------------- regressions the seeds found


@pytest.mark.parametrize("status", ["Pending", " pending", "canceled", "cancelled", "incomplete", "terminated", True])
async def test_terminate_refuses_a_status_lago_would_read_as_active(
    status: Any, lago: tuple[LagoClient, Recorder]
) -> None:
    """``terminate_subscription(status=...)`` with any status but ``pending`` or ``active`` is refused before sending.

    Lago's controller cancels the pending subscription for ``status == "pending"`` only and terminates the *active*
    one for any other value: ``status="Pending"`` (or ``"canceled"``, meaning to cancel) ended the subscription in
    use instead (the random calls sent ``status=' pending'``)."""
    client, recorder = lago
    with pytest.raises(InvalidRequestError, match=r"status must be one of 'active', 'pending' .*terminates the active"):
        await client.terminate_subscription("org_1", status=status)
    assert recorder.requests == []
    assert (await client.get_subscription("org_1"))["status"] == "active"
    canceled = await client.terminate_subscription(PENDING, status="pending")
    assert canceled["status"] == "canceled"
    assert (await client.terminate_subscription("org_1", status=""))["status"] == "terminated"  # ("": the default)


@pytest.mark.parametrize("status", ["Pending", "terminated", "canceled", "junk", 1])
async def test_update_subscription_refuses_a_status_lago_would_read_as_active(
    status: Any, lago: tuple[LagoClient, Recorder]
) -> None:
    """``update_subscription(status=...)`` takes ``active``, ``pending`` or ``incomplete``: with several subscriptions
    under one id, Lago updates the active one for any other value (a pending one's change applied to the one in
    use)."""
    client, recorder = lago
    with pytest.raises(InvalidRequestError, match=r"status must be one of 'active', 'pending', 'incomplete'"):
        await client.update_subscription("org_1", status=status, name="x")
    assert recorder.requests == []
    assert (await client.update_subscription(PENDING, status="pending", name="Later"))["name"] == "Later"


@pytest.mark.parametrize(
    "call",
    [
        lambda client, status: client.get_subscription("org_1", status=status),
        lambda client, status: client.get_current_subscription("org_1") if status is None else None,
        lambda client, status: client.get_subscription_entitlements("org_1", status=status),
        lambda client, status: client.update_subscription_entitlements("org_1", {"f": {"p": 5}}, status=status),
        lambda client, status: client.remove_subscription_entitlement("org_1", "f", "p", status=status),
    ],
    ids=["get", "get_current", "entitlements", "update_entitlements", "remove_entitlement"],
)
async def test_a_subscription_status_lago_does_not_have_is_refused(
    call: Callable[[LagoClient, Any], Any], lago: tuple[LagoClient, Recorder]
) -> None:
    """A status Lago's subscriptions do not have (``cancelled``, ``Active``) is refused naming Lago's statuses: Lago
    answered 404, read as "no such subscription" (``get_subscription`` said to check the id)."""
    client, recorder = lago
    for status in ("cancelled", "Active", " active", 1, True):
        coroutine = call(client, status)
        if coroutine is None:
            continue
        with pytest.raises(InvalidRequestError, match=r"status must be one of 'active', .*'canceled'.*404"):
            await coroutine
    assert recorder.requests == []
    for status in (None, "", "active"):
        coroutine = call(client, status)
        if coroutine is not None:
            await coroutine


async def test_list_subscriptions_refuses_statuses_lago_does_not_have(lago: tuple[LagoClient, Recorder]) -> None:
    """A ``statuses`` list naming a status Lago does not have is refused: Lago ignores such a list and lists other
    subscriptions than those asked (the active ones, or every one), as the ones of that status."""
    client, recorder = lago
    for statuses in (["cancelled"], ["active", "Pending"], [" pending"], [None], [True]):
        with pytest.raises(InvalidRequestError, match=r"statuses must name Lago's subscription statuses"):
            await client.list_subscriptions(statuses=statuses)
        with pytest.raises(InvalidRequestError, match=r"statuses must name"):
            client.iter_subscriptions(statuses=statuses)
    assert recorder.requests == []
    page = await client.list_subscriptions(statuses=["pending"])
    assert [item["external_id"] for item in page.items] == [PENDING]


async def test_list_applied_coupons_refuses_a_status_lago_ignores(lago: tuple[LagoClient, Recorder]) -> None:
    """An applied coupon's ``status`` is ``active`` or ``terminated``: Lago ignores another (``AppliedCouponsQuery``
    filters only on a status it has) and lists every coupon, terminated ones too, as the ones asked."""
    client, recorder = lago
    for status in ("Active", "canceled", " active", 1):
        with pytest.raises(InvalidRequestError, match=r"status must be 'active' or 'terminated'"):
            await client.list_applied_coupons(status=status)
        with pytest.raises(InvalidRequestError, match=r"status must be 'active' or 'terminated'"):
            client.iter_applied_coupons(status=status)
    assert recorder.requests == []
    assert len((await client.list_applied_coupons(status="active")).items) == 1
    assert len((await client.list_applied_coupons(status="")).items) == 1  # ("": no filter, as None)
    assert "status" not in recorder.requests[-1].url.params


def _self_containing() -> dict[str, Any]:
    body: dict[str, Any] = {"name": "loop"}
    body["again"] = body
    return body


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (
            lambda c: c.update_subscription("org_1", ending_at=dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc)),
            r"subscription\.ending_at is datetime\.datetime\(2099.*\(datetime\).*ISO 8601",
        ),
        (
            lambda c: c.create_subscription(
                external_customer_id="org_1", plan_code="starter", external_id="s2", subscription_at=dt.date(2099, 1, 1)
            ),
            r"subscription\.subscription_at is datetime\.date\(2099, 1, 1\).*isoformat",
        ),
        (
            lambda c: c.upsert_customer(
                {"external_id": "org_1", "metadata": [{"key": "k", "value": Decimal("1.50"), "display_in_invoice": 0}]}
            ),
            r"customer\.metadata\[0\]\.value is Decimal\('1\.50'\).*str\(value\)",
        ),
        (lambda c: c.update_customer("org_1", email=b"a@b.c"), r"customer\.email is b'a@b\.c' \(bytes\).*a str"),
        (
            lambda c: c.create_plan({"code": "p2", "name": "P", "amount_cents": float("nan")}),
            r"plan\.amount_cents is nan.*finite number",
        ),
        (lambda c: c.set_plan_entitlements("starter", {"f": {"p": {5}}}), r"entitlements\.f\.p is \{5\} \(set\)"),
        (lambda c: c.update_subscription("org_1", name="\ud800"), r"subscription\.name '\\ud800' holds a lone"),
        (lambda c: c.update_customer("org_1", data=_self_containing()), r"customer\.data\.again contains itself"),
    ],
    ids=["datetime", "date", "decimal", "bytes", "nan", "set", "surrogate", "cycle"],
)
async def test_a_body_value_json_cannot_carry_is_refused_naming_the_field(
    call: Callable[[LagoClient], Awaitable[Any]], said: str, lago: tuple[LagoClient, Recorder]
) -> None:
    """A value JSON cannot carry anywhere in a request body (a ``datetime`` for ``ending_at``, a ``Decimal`` metadata
    value, NaN, bytes, a set, a lone surrogate, a body containing itself) is an :class:`InvalidRequestError` naming
    its place in the body and what to pass instead, raised before anything is sent: httpx raised a ``TypeError`` or
    ``ValueError`` naming no field (``update_subscription(ending_at=datetime)``)."""
    client, recorder = lago
    with pytest.raises(InvalidRequestError, match=said):
        await call(client)
    assert recorder.requests == []


async def test_a_body_is_sent_as_httpx_json_sent_it(lago: tuple[LagoClient, Recorder]) -> None:
    """The body the client encodes itself is byte for byte what httpx's ``json=`` sent: compact UTF-8 JSON (no
    ``\\u`` escapes), ``Content-Type: application/json``."""
    client, recorder = lago
    body = {"external_id": "org_1", "name": "Acm\u00e9 \U0001f642", "metadata": []}
    await client.upsert_customer(body)
    [request] = recorder.requests
    assert request.content == httpx.Request("POST", "http://x", json={"customer": body}).content
    assert request.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda c: c.get_customer("org\ud800"), r"customer external_id 'org\\ud800' contains .* lone surrogate"),
        (lambda c: c.delete_customer("\ud800"), r"customer external_id '\\ud800' contains .* lone surrogate"),
        (lambda c: c.get_subscription("s\ud800"), r"subscription external_id 's\\ud800' contains .* lone surrogate"),
        (lambda c: c.get_plan("\ud800x"), r"plan code '\\ud800x' contains .* lone surrogate"),
        (lambda c: c.remove_subscription_entitlement("org_1", "f", "\ud800"), r"privilege code"),
        (lambda c: c.get_event("tx\ud800"), r"transaction_id 'tx\\ud800' holds a lone surrogate"),
        (lambda c: c.get_current_usage("org_1", "org\ud800"), r"subscription_id 'org\\ud800' contains"),
        (lambda c: c.list_customers(search_term="\ud800"), r"query parameter search_term '\\ud800' holds a lone"),
        (lambda c: c.list_invoices(external_customer_id="o\ud800"), r"query parameter external_customer_id"),
    ],
    ids=["get_customer", "delete_customer", "get_subscription", "get_plan", "privilege", "event", "usage", "search",
         "invoices"],
)  # fmt: skip
async def test_an_id_or_filter_with_a_lone_surrogate_is_refused_naming_it(
    call: Callable[[LagoClient], Awaitable[Any]], said: str, lago: tuple[LagoClient, Recorder]
) -> None:
    """An id or a filter holding a lone surrogate (``'\\ud800'``, as JSON decoded from a client may hold) is refused
    as an :class:`InvalidRequestError` naming it: its percent-encoding raised a bare ``UnicodeEncodeError``
    (``get_event``, ``get_customer``)."""
    client, recorder = lago
    with pytest.raises(InvalidRequestError, match=said):
        await call(client)
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda c: c.upsert_customer(None), r"customer must be a mapping such as \{'external_id'.*NoneType"),
        (lambda c: c.create_plan(["code", "p2"]), r"plan must be a mapping .*got list"),
        (lambda c: c.create_billable_metric([("code", "m2")]), r"billable_metric must be a mapping"),
        (lambda c: c.create_feature("f"), r"feature must be a mapping .*got str"),
        (
            lambda c: c.set_plan_entitlements("starter", [{"code": "f", "privileges": [{"code": "p", "value": 5}]}]),
            r"entitlements must be a mapping such as \{'api_quota': \{'max_api_calls': 300\}\}, got list",
        ),
        (
            lambda c: c.update_subscription_entitlements("org_1", [("f", {"p": 5})]),
            r"entitlements must be a mapping",
        ),
        (lambda c: c.update_subscription_entitlements("org_1", {"f": 5}), r"entitlements\['f'\] must be a mapping"),
    ],
    ids=["customer", "plan", "metric", "feature", "plan_entitlements_list", "pairs", "bare_value"],
)
async def test_an_argument_that_is_not_the_mapping_documented_is_refused(
    call: Callable[[LagoClient], Awaitable[Any]], said: str, lago: tuple[LagoClient, Recorder]
) -> None:
    """A customer, plan, metric or feature that is not a mapping, and entitlements not shaped ``{"feature":
    {"privilege": value}}``, are refused naming the argument: they raised ``AttributeError``, ``TypeError`` or
    ``ValueError`` from ``dict()``, and entitlements given as a list of two-key objects were sent as
    ``{"code": "privileges"}``; a feature mapped to a bare value was taken by the emulator as no privilege at all
    (``create_plan``, ``update_subscription_entitlements``)."""
    client, recorder = lago
    with pytest.raises(InvalidRequestError, match=said):
        await call(client)
    assert recorder.requests == []


@pytest.mark.parametrize("key", ["a][b", "x]", "[", ""])
async def test_a_metadata_filter_key_holding_a_bracket_is_refused(key: str, lago: tuple[LagoClient, Recorder]) -> None:
    """``list_customers(metadata={"a][b": "x"})`` was sent as ``metadata[a][b]=x``, which Lago (Rack) reads as the
    nested filter ``metadata: {a: {b: x}}``, not the key ``a][b``; an empty key as ``metadata[]``, a list."""
    client, recorder = lago
    with pytest.raises(InvalidRequestError, match=r"metadata filter key .* cannot be sent.*without brackets"):
        await client.list_customers(metadata={key: "x"})
    with pytest.raises(InvalidRequestError, match=r"metadata filter key"):
        await client.list_invoices(metadata={key: "x"})
    assert recorder.requests == []
    await client.list_customers(metadata={"plan": "pro", "gone": None})
    [request] = recorder.requests
    assert request.url.params.multi_items()[:2] == [("metadata[plan]", "pro"), ("metadata[gone]", "")]
