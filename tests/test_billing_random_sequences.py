"""Seeded random sequences of ``OrgBilling`` calls against the Lago emulator, checked step by step against a model.

Each seed draws a sequence of calls (customers, subscriptions, plan changes, terminations, usage through the direct
and the ``nowait`` paths, current usage, invoices, the one-user migration, the health probe) with varied and hostile
arguments: org ids with dots, slashes, unicode, blanks, NULs, lone surrogates and lengths of 255 and 256; names and
emails with odd characters; plan codes Lago has and has not; metadata over Lago's limits; token counts out of range.
Some steps run the same call twice at once for one org (an anyio task group), some run under a fault of the
emulator's (a 503 or a dropped connection that the client's retries absorb, a 429 with ``X-RateLimit-Reset``, an
outage), or with the answer of a write lost after Lago applied it. Each seed also draws the subscription id template
(``{org_id}_main`` makes the 255-character org's id too long: refused, named) and the event store (Postgres refuses a
duplicate; ClickHouse takes it and keeps one per id, timestamp and code). One seed runs the emulator served over HTTP.

The model holds what Lago should have: each org's customer (name, email, metadata), its subscription (plan, the
downgrade it has scheduled, when it started), the events of each subscription (code, tokens, time) and the legacy
users, and what the quota gate (a double) should have been told. After each step: the call's answer or error agrees
with the model (bad input raises an ``InvalidRequestError`` naming the argument, before any write; never a
``KeyError``/``TypeError`` or an httpx error; a retry or a concurrent twin never duplicates a customer, a
subscription or an event), the emulator's state read through its own views agrees with the model, the gate counted
each event Lago keeps once, and a call that changed a subscription invalidated the org's state in the gate.

Time never passes for real: the client's back-offs and rate-limit waits move the fault clock instead, and the
emulator's clock is pinned, moved a minute per step.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from lago_org_billing import (
    BillingSettings,
    EventPipeline,
    InvalidIdentifierError,
    InvalidRequestError,
    LagoClient,
    LagoIntegrationError,
    LagoNotFoundError,
    LagoUnavailableError,
    OrgBilling,
)
from lago_org_billing._billing import customer_metadata
from lago_org_billing._ids import validate_id
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._faults import install_faults
from lago_org_billing.testing._server import install_controls, serve_in_thread

pytestmark = pytest.mark.anyio

API_KEY = "random-sequences-key"
# (RS_SEEDS, RS_SERVED, RS_STEPS widen a run by hand, e.g. RS_SEEDS=500 RS_STEPS=80: CI runs the defaults)
SEEDS = range(int(os.environ.get("RS_SEEDS", "10")))
SERVED_SEEDS = range(1000, 1000 + int(os.environ.get("RS_SERVED", "1")))
STEPS = int(os.environ.get("RS_STEPS", "45"))
START = dt.datetime(2031, 5, 10, 8, 0, tzinfo=dt.timezone.utc)

PLANS = {"free": 0, "starter": 1_000, "pro": 5_000}
MISSING_PLANS = ("ghost", "Pro", "starter-x")
BAD_PLANS: tuple[Any, ...] = ("bad.plan", "a/b", "", " pro", "pro\x00", 7, None)
ORGS = ("org_1", "Ärger-組織", "o@x:eu", "x" * 255, "🦊" * 200)
BAD_ORGS: tuple[Any, ...] = (
    "acme.com", "a/b", " org_1", "org_1 ", "", "x" * 256, "o?x", "o#x", "50%", "a\\b", "a\x00b", "a\ud800", 42, None,
)  # fmt: skip
USERS = ("u1", "user.with.dots@x.test", "用户", "d'arcy")
BAD_USERS: tuple[Any, ...] = ("u" * 101, "   ", 4.5)
#: Creators' ids that are not text: kept as their text (as record_api_call writes a user id).
ID_USERS: tuple[Any, ...] = (5, uuid.UUID(int=7))
NAMES = ("Acme", "Ünïcode 組織", "O'Brien & Sons <x>", "n" * 255, "tab\there")
BAD_NAMES: tuple[Any, ...] = ("", "   ", "n" * 256, "a\x00b", "\ud800", 5)
EMAILS = ("a@b.test", "üser+tag@例え.jp", "o'brien@x.test")
BAD_EMAILS: tuple[Any, ...] = ("no-at", " a@b.test", "a\x00@b.test", "", 7)
METADATA: tuple[Any, ...] = ({"tier": "gold"}, {"region": "eu", "tier": "silver"}, {"note": "ü 組"}, {"k5": "v"})
BAD_METADATA: tuple[Any, ...] = (
    {"k" * 21: "v"}, {"x": 5}, {"x": "  "}, {"x": "v" * 101}, {f"m{i}": "v" for i in range(6)}, [("tier", "gold")],
    "tier=gold", {"x": "a\x00"},
)  # fmt: skip
TXS = ("tx_1", "tx_2", "tx.dots/slash ü", "t" * 300)
BAD_TXS: tuple[Any, ...] = ("", "   ", "a\x00", 9)
LEGACY_USERS = {"legacy_1": "starter", "legacy.dotted": "pro"}
TEMPLATES = ("{org_id}", "{org_id}", "{org_id}_main", "sub:{org_id}")


# ------------------------------------------------------------------------------------------------------------ model


@dataclasses.dataclass
class Customer:
    name: str | None
    email: str | None
    metadata: dict[str, str]


@dataclasses.dataclass
class Subscription:
    plan: str
    next_plan: str | None
    started: dt.datetime


@dataclasses.dataclass
class Event:
    code: str
    tokens: int
    at: dt.datetime | None  # None: stamped by the client's clock (real time, before every subscription here)


@dataclasses.dataclass
class Model:
    customers: dict[str, Customer] = dataclasses.field(default_factory=dict)
    subscriptions: dict[str, Subscription] = dataclasses.field(default_factory=dict)
    events: dict[tuple[Any, ...], Event] = dataclasses.field(default_factory=dict)  # by Model.event_key
    legacy: dict[str, str | None] = dataclasses.field(default_factory=dict)  # user id -> its active plan
    #: what the quota gate was told per org (calls, tokens), and the caller-given events it counted (event_key's)
    counted: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    counted_keys: set[tuple[Any, ...]] = dataclasses.field(default_factory=set)
    template: str = "{org_id}"  # LAGO_SUBSCRIPTION_ID_TEMPLATE
    store: str = "postgres"  # the emulator's event store: its duplicates refused (422), or replaced (ClickHouse)

    def copy(self) -> Model:
        return Model(
            {k: dataclasses.replace(v, metadata=dict(v.metadata)) for k, v in self.customers.items()},
            {k: dataclasses.replace(v) for k, v in self.subscriptions.items()},
            dict(self.events),
            dict(self.legacy),
            Counter(self.counted),
            set(self.counted_keys),
            self.template,
            self.store,
        )

    def sub_id(self, org: str) -> str:
        """The org's subscription external_id; one longer than Lago's 255 characters is refused, naming it."""
        external_id = self.template.format(org_id=org)
        if len(external_id) > 255:
            raise Refused("subscription id", identifier=True)
        return external_id

    def event_key(self, org: str, tx: str, at: dt.datetime | None, code: str) -> tuple[Any, ...]:
        """What the store deduplicates on: the transaction id; on ClickHouse its timestamp and code too (a retry
        without a timestamp reuses the first call's, which the client remembers)."""
        return (org, tx) if self.store == "postgres" else self.full_key(org, tx, at, code)

    @staticmethod
    def full_key(org: str, tx: str, at: dt.datetime | None, code: str) -> tuple[Any, ...]:
        return (org, tx, at or "first", code)

    def count(self, org: str, code: str, tokens: Any, key: tuple[Any, ...] | None) -> None:
        """The quota gate told of an event (a caller-given one, ``key``, once: Lago keeps it once)."""
        if key is not None:
            if key in self.counted_keys:
                return
            self.counted_keys.add(key)
        if code == "api_call":
            self.counted[(org, "calls")] += 1
            self.counted[(org, "tokens")] += tokens if type(tokens) is int and tokens > 0 else 0

    def usage(self, org: str) -> int:
        """Tokens of ``api_call`` events in the org's current subscription (Lago ignores those before its start, and
        bills a negative sum as 0 units)."""
        sub = self.subscriptions[org]
        return max(
            0,
            sum(
                e.tokens
                for (o, *_), e in self.events.items()
                if o == org and e.code == "api_call" and e.at is not None and e.at >= sub.started
            ),
        )


class Refused(Exception):
    """The model's verdict that the call must raise ``InvalidRequestError`` naming one of ``names``."""

    def __init__(self, *names: str, identifier: bool = False) -> None:
        super().__init__(names)
        self.names = names
        self.identifier = identifier


class Raises(Exception):
    """The model's verdict that the call must raise ``kind`` (an answer of Lago's), the model unchanged."""

    def __init__(self, kind: type[BaseException]) -> None:
        super().__init__(kind)
        self.kind = kind


def _id(value: Any, name: str) -> str:
    if not isinstance(value, str) or value in BAD_ORGS or value in BAD_PLANS:
        raise Refused(name, identifier=True)
    return value


def _refuse(**bad: bool) -> None:
    """Arguments checked before any call, in any order: the error names one of those at fault."""
    names = [name for name, wrong in bad.items() if wrong]
    if names:
        raise Refused(*names, identifier=names == ["org_id"])


def _addressable(value: Any) -> bool:
    """Whether Lago can take ``value`` in a URL path (the package's rule, ``validate_id``)."""
    try:
        validate_id(value)
    except InvalidIdentifierError:
        return False
    return True


def _ids(**values: Any) -> None:
    """Ids checked before any call, in any order: the error names one of those at fault."""
    bad = [name for name, value in values.items() if not isinstance(value, str) or value in (*BAD_ORGS, *BAD_PLANS)]
    if bad:
        raise Refused(*bad, identifier=True)


def _name(value: Any) -> str:
    if value in BAD_NAMES or not isinstance(value, str):
        raise Refused("org_name")
    return str(value)


def _email(value: Any) -> str | None:
    if value is not None and (value in BAD_EMAILS or not isinstance(value, str)):
        raise Refused("email")
    return value


def _metadata(values: Any) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise Refused("metadata")
    return dict(values)


def _check_metadata(values: dict[str, Any], user_id: Any = None) -> None:
    """Lago's limits; a bad ``created_by_user_id`` is named by its key (which names the argument too)."""
    if len(values) > 5:
        raise Refused("metadata")
    for key, value in values.items():
        bad = not isinstance(value, str) or not value.strip() or len(value) > 100 or "\x00" in value
        if len(key) > 20 or bad:
            raise Refused("user_id" if key == "created_by_user_id" else "metadata")  # (created_by_user_id too)


def _creator(user: Any) -> Any:
    """The creating user's id as ``created_by_user_id`` holds it: text as given, an integer or a UUID as its text."""
    if user is None or isinstance(user, str):
        return user
    if isinstance(user, (int, uuid.UUID)) and not isinstance(user, bool):
        return str(user)
    raise Refused("user_id")


# ---------------------------------------------------------------------------------------------------- the world


class LoseAnswers(httpx.AsyncBaseTransport):
    """Passes every request to the emulator (Lago applies it), then answers the next ``left`` writes with a proxy's
    502 instead of Lago's answer: the commit made, its answer lost."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.left = 0
        self.writes = 0  # (sent: a served emulator's request log may record one after its answer is read)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.writes += request.method != "GET"
        response = await self.inner.handle_async_request(request)
        if self.left > 0 and request.method != "GET":
            self.left -= 1
            await response.aread()
            return httpx.Response(502, text="<html>502 Bad Gateway</html>", headers={"content-type": "text/html"})
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Gate:
    """A quota gate's double: what OrgBilling tells it of the usage it records, and the orgs it invalidates."""

    def __init__(self) -> None:
        self.counted: Counter[tuple[str, str]] = Counter()
        self.invalidated: list[str] = []

    def settle(self, org_id: str, decision: Any, *, tokens: int, billed: bool) -> None:
        self.counted[(org_id, "calls")] += int(billed)
        self.counted[(org_id, "tokens")] += tokens

    def invalidate(self, org_id: str) -> None:
        self.invalidated.append(org_id)


@dataclasses.dataclass
class World:
    rng: random.Random
    fake: FakeLago
    gate: Gate
    now: list[dt.datetime]
    model: Model
    billing: OrgBilling = dataclasses.field(init=False)  # (these three: made by _connect)
    pipeline: EventPipeline = dataclasses.field(init=False)
    lose: LoseAnswers = dataclasses.field(init=False)
    fault: str = "none"
    fault_kind: str = "none"  # (of a transient fault: 503, drop or 429)
    log: list[str] = dataclasses.field(default_factory=list)

    @property
    def at(self) -> dt.datetime:
        return self.now[0]


def pick(rng: random.Random, good: tuple[Any, ...], bad: tuple[Any, ...], p_bad: float = 0.12) -> Any:
    return rng.choice(bad) if rng.random() < p_bad else rng.choice(good)


# -------------------------------------------------------------------------------------------------- operations
#
# Each operation draws its arguments and returns (description, call, expect): ``call`` makes the call; ``expect``
# applies the call's effect to a copy of the model and returns a check of its answer, or raises Refused/Raises.

Check = Callable[[Any], None]
Op = tuple[str, Callable[[], Any], Callable[[Model], Check]]


def _no_check(result: Any) -> None:
    pass


def op_create_customer(w: World) -> Op:
    rng = w.rng
    org, name = pick(rng, ORGS, BAD_ORGS), pick(rng, NAMES, BAD_NAMES)
    email = pick(rng, (None, *EMAILS), BAD_EMAILS)
    user = pick(rng, (None, *USERS), BAD_USERS)
    metadata = pick(rng, (None, None, *METADATA), BAD_METADATA)

    def expect(m: Model) -> Check:
        _id(org, "org_id")
        wanted = _metadata(metadata)
        wanted["billing_type"] = "organization"
        if user is not None:
            wanted["created_by_user_id"] = user
        _check_metadata(wanted)
        existing = m.customers.get(org)
        if existing is None:
            m.customers[org] = Customer(_name(name), _email(email), wanted)
        else:
            if "created_by_user_id" in existing.metadata:
                wanted.pop("created_by_user_id", None)
            merged = {**existing.metadata, **wanted}
            new_name, new_email = _name(name), _email(email)
            _check_metadata(merged)
            existing.name, existing.metadata = new_name, merged
            if new_email is not None:
                existing.email = new_email
        return lambda result: _same_customer(result, m.customers[org])

    call = lambda: w.billing.create_org_customer(org, name, email, user, metadata)  # noqa: E731
    return f"create_org_customer({org!r:.30}, {name!r:.20}, {email!r}, {user!r:.20}, {metadata!r:.40})", call, expect


def op_update_customer(w: World) -> Op:
    rng = w.rng
    org = pick(rng, ORGS, BAD_ORGS)
    name = pick(rng, (None, None, *NAMES), BAD_NAMES)
    email = pick(rng, (None, None, *EMAILS), BAD_EMAILS)
    metadata = pick(rng, (None, {"tier": None}, {"region": None, "seat": "3"}, *METADATA), BAD_METADATA)

    def expect(m: Model) -> Check:
        _id(org, "org_id")
        existing = m.customers.get(org)
        if existing is None:
            raise Raises(LagoNotFoundError)
        changes = _metadata(metadata)
        new_name = None if name is None else _name(name)
        new_email = _email(email)
        merged = {k: v for k, v in {**existing.metadata, **changes}.items() if v is not None}
        if changes:
            _check_metadata(merged)
        if new_name is not None:
            existing.name = new_name
        if new_email is not None:
            existing.email = new_email
        existing.metadata = merged
        return lambda result: _same_customer(result, existing)

    call = lambda: w.billing.update_org_customer(org, name, email, metadata)  # noqa: E731
    return f"update_org_customer({org!r:.30}, {name!r:.20}, {email!r}, {metadata!r:.40})", call, expect


def op_get_or_create(w: World) -> Op:
    rng = w.rng
    org, name = pick(rng, ORGS, BAD_ORGS), pick(rng, NAMES, BAD_NAMES)
    email, user = pick(rng, (None, *EMAILS), BAD_EMAILS), pick(rng, (None, *USERS, *ID_USERS), BAD_USERS)

    def expect(m: Model) -> Check:
        _id(org, "org_id")
        existing = m.customers.get(org)
        if existing is not None:  # (returned as it is, whatever the other arguments)
            return lambda result: _same_customer(result, existing)
        wanted: dict[str, Any] = {"billing_type": "organization"}
        if user is not None:
            wanted["created_by_user_id"] = _creator(user)
        _check_metadata(wanted)
        m.customers[org] = Customer(_name(name), _email(email), wanted)
        return lambda result: _same_customer(result, m.customers[org])

    call = lambda: w.billing.get_or_create_customer(org, name, email, user)  # noqa: E731
    return f"get_or_create_customer({org!r:.30}, {name!r:.20}, {email!r}, {user!r:.20})", call, expect


def op_get_customer(w: World) -> Op:
    org = pick(w.rng, ORGS, BAD_ORGS)

    def expect(m: Model) -> Check:
        _id(org, "org_id")
        existing = m.customers.get(org)
        if existing is None:
            return lambda result: _equal(result, None)
        return lambda result: _same_customer(result, existing)

    return f"get_customer({org!r:.30})", lambda: w.billing.get_customer(org), expect


def op_is_org_customer(w: World) -> Op:
    org = pick(w.rng, (*ORGS, *LEGACY_USERS), BAD_ORGS, p_bad=0.25)

    def expect(m: Model) -> Check:
        if not isinstance(org, str):
            raise Refused("external_id", identifier=True)
        if org in ("", " org_1", "org_1 ", "x" * 256):  # (unusable as any customer's id: said)
            raise Refused("external_id", identifier=True)
        customer = m.customers.get(org)
        marked = customer is not None and customer.metadata.get("billing_type") == "organization"
        return lambda result: _equal(result, marked)

    return f"is_org_customer({org!r:.30})", lambda: w.billing.is_org_customer(org), expect


def _subscribe(m: Model, org: str, plan: str, at: dt.datetime) -> None:
    """Lago's POST /subscriptions for the org's own id: new, same plan (no-op), upgrade (at once: a new record, the
    downgrade scheduled dropped) or downgrade (scheduled for the period's end)."""
    if plan not in PLANS:
        raise Raises(LagoNotFoundError)
    current = m.subscriptions.get(org)
    if org not in m.customers:  # (Lago makes a bare customer for a subscription of an unknown one)
        m.customers[org] = Customer(None, None, {})
    if current is None:
        m.subscriptions[org] = Subscription(plan, None, at)
    elif plan == current.plan:
        pass
    elif PLANS[plan] >= PLANS[current.plan]:
        m.subscriptions[org] = Subscription(plan, None, at)
    else:
        current.next_plan = plan


def op_create_subscription(w: World) -> Op:
    rng, at = w.rng, w.at
    org = pick(rng, ORGS, BAD_ORGS)
    plan = pick(rng, (*PLANS, *PLANS, *MISSING_PLANS), BAD_PLANS)

    def expect(m: Model) -> Check:
        _ids(org_id=org, plan_code=plan)
        m.sub_id(org)
        _subscribe(m, org, plan, at)
        return lambda result: _same_subscription(result, org, m.subscriptions[org], m.template)

    call = lambda: w.billing.create_subscription(org, plan)  # noqa: E731
    return f"create_subscription({org!r:.30}, {plan!r})", call, expect


def op_subscribe(w: World) -> Op:
    rng, at = w.rng, w.at
    org, plan = pick(rng, ORGS, BAD_ORGS), pick(rng, (*PLANS, *PLANS, *MISSING_PLANS), BAD_PLANS)
    name, email = pick(rng, NAMES, BAD_NAMES), pick(rng, (None, *EMAILS), BAD_EMAILS)
    user = pick(rng, (None, *USERS, *ID_USERS), BAD_USERS)

    def expect(m: Model) -> Check:
        _ids(org_id=org, plan_code=plan)
        creator = _creator(user)  # (checked before any call)
        m.sub_id(org)
        existing = m.customers.get(org)
        if existing is None:
            wanted: dict[str, Any] = {"billing_type": "organization"}
            if user is not None:
                wanted["created_by_user_id"] = creator
            customer = Customer(_name(name), _email(email), wanted)
            _check_metadata(wanted)
            if plan not in PLANS:
                raise Raises(LagoNotFoundError)
            m.customers[org] = customer
        else:
            wanted = {"billing_type": "organization"}
            if user is not None:
                wanted["created_by_user_id"] = creator
            missing = {k: v for k, v in wanted.items() if k not in existing.metadata}
            room = max(5 - len(existing.metadata), 0)
            missing = dict(list(missing.items())[:room])
            new_name = None if existing.name else _name(name)
            new_email = None if existing.email else _email(email)
            merged = {**existing.metadata, **missing}
            _check_metadata(merged)
            current = m.subscriptions.get(org)
            if plan not in PLANS and (new_name or new_email or missing) and (current is None or current.plan != plan):
                raise Raises(LagoNotFoundError)  # (read before the customer is completed: nothing written)
            existing.name = new_name or existing.name
            existing.email = new_email or existing.email
            existing.metadata = merged
        customer = m.customers[org]
        _subscribe(m, org, plan, at)

        def check(result: Any) -> None:
            _same_customer(result["customer"], customer)
            _same_subscription(result["subscription"], org, m.subscriptions[org], m.template)

        return check

    call = lambda: w.billing.subscribe_org_to_plan(org, plan, name, email, user)  # noqa: E731
    return f"subscribe_org_to_plan({org!r:.30}, {plan!r}, {name!r:.20}, {email!r}, {user!r:.20})", call, expect


def op_change_plan(w: World) -> Op:
    rng, at = w.rng, w.at
    org, plan = pick(rng, ORGS, BAD_ORGS), pick(rng, (*PLANS, *PLANS, *MISSING_PLANS), BAD_PLANS)

    def expect(m: Model) -> Check:
        _ids(org_id=org, plan_code=plan)
        m.sub_id(org)
        current = m.subscriptions.get(org)
        if current is None:
            raise Raises(LagoNotFoundError)
        if plan == current.plan:
            current.next_plan = None  # (back to it: the scheduled downgrade canceled)
        else:
            _subscribe(m, org, plan, at)
        return lambda result: _same_subscription(result, org, m.subscriptions[org], m.template)

    return f"change_plan({org!r:.30}, {plan!r})", lambda: w.billing.change_plan(org, plan), expect


def op_terminate(w: World) -> Op:
    rng = w.rng
    org = pick(rng, ORGS, BAD_ORGS)
    invoice = rng.choice((None, None, "generate", "skip", "bogus"))
    other = rng.choice((*ORGS, *LEGACY_USERS))
    given: Any = rng.choice((None, None, None, "own", "other", rng.choice(("a/b", "", 5))))
    if given == "own" and isinstance(org, str):
        given = w.model.template.format(org_id=org)
    elif given == "other":
        given = other if other in LEGACY_USERS else w.model.template.format(org_id=other)

    def expect(m: Model) -> Check:
        bad_given = given is not None and not _addressable(given)
        _refuse(org_id=not isinstance(org, str) or org in BAD_ORGS, subscription_id=bad_given)
        external_id = m.sub_id(org) if given is None else given
        owner = {m.template.format(org_id=o): o for o in ORGS}.get(external_id)
        legacy_plan = m.legacy.get(external_id)
        if external_id in LEGACY_USERS:
            current = Subscription(legacy_plan, None, START) if legacy_plan else None
        else:
            current = m.subscriptions.get(owner) if owner is not None else None
        if current is None:
            raise Raises(LagoNotFoundError)
        refused = [
            name for name, bad in (("on_termination_invoice", invoice == "bogus"), ("belongs to", owner != org)) if bad
        ]
        if refused:  # (another customer's subscription is never ended as the org's)
            raise Refused(*refused)
        del m.subscriptions[org]

        def check(result: Any) -> None:
            ended = (result["external_id"], result["status"], result["plan_code"])
            assert ended == (external_id, "terminated", current.plan), result

        return check

    call = lambda: w.billing.terminate_subscription(org, given, on_termination_invoice=invoice)  # noqa: E731
    return f"terminate_subscription({org!r:.30}, {given!r:.30}, on_termination_invoice={invoice!r})", call, expect


def op_get_subscription(w: World) -> Op:
    org = pick(w.rng, ORGS, BAD_ORGS)

    def expect(m: Model) -> Check:
        _id(org, "org_id")
        m.sub_id(org)
        current = m.subscriptions.get(org)
        if current is None:
            return lambda result: _equal(result, None)
        return lambda result: _same_subscription(result, org, current, m.template)

    return f"get_subscription({org!r:.30})", lambda: w.billing.get_subscription(org), expect


def _stamp(w: World) -> tuple[Any, dt.datetime | None, bool]:
    """A timestamp argument, the time the event gets, and whether it is refused."""
    kind = w.rng.random()
    if kind < 0.55:
        return w.at, w.at, False
    if kind < 0.7:
        return w.at.timestamp(), w.at, False
    if kind < 0.9:
        return None, None, False
    return w.rng.choice(("yesterday", dt.date(2031, 5, 1), dt.datetime(2031, 5, 1))), None, True


def _tokens(rng: random.Random) -> tuple[Any, bool]:
    if rng.random() < 0.1:
        return rng.choice((-1, 1.5, 2**53, True, "7")), True
    return rng.choice((0, 1, 7, 1_000, 2**53 - 1)), False


def _long_sub(m: Model, org: Any) -> bool:
    return isinstance(org, str) and org not in BAD_ORGS and len(m.template.format(org_id=org)) > 255


def _record(m: Model, org: str, tx: str | None, code: str, tokens: int, at: dt.datetime | None, fault: str) -> Check:
    """One event recorded: kept once per store key (see Model.event_key). On Postgres a repeat is refused by Lago and
    answered as a duplicate; on ClickHouse it replaces the first (the last one's values kept)."""
    key = None if tx is None else m.event_key(org, tx, at, code)
    known = key is not None and key in m.events
    clickhouse = m.store == "clickhouse"
    if key is not None and (clickhouse or not known):
        m.events[key] = Event(code, tokens, at)
    lost = fault == "lost"
    # A duplicate Lago refuses is not counted; one it replaces, once. After a failure Lago may have applied (a 5xx, a
    # connection dropped, an answer lost), the client's resend refused as a duplicate is this call's own first attempt
    # as far as it can tell (create_event answers it as recorded): counted, once.
    if tx is not None and (not known or fault in ("503", "drop", "lost")):
        m.count(org, code, tokens, m.full_key(org, tx, at, code))
    firsts = [] if known or clickhouse else [True]  # (of twins run at once, one is first: the other a duplicate)

    def check(result: Any) -> None:
        assert result["external_subscription_id"] == m.sub_id(org) and result["code"] == code, result
        assert result["properties"]["org_id"] == org
        if tx is None:  # (a generated id: a new event, which the model learns here)
            generated = m.event_key(org, result["transaction_id"], at, code)
            assert generated not in m.events
            m.events[generated] = Event(code, tokens, at)
            m.count(org, code, tokens, None)
        else:
            assert result["transaction_id"] == tx
            # (lost: the resend after the answer lost is answered as a duplicate, as create_event promises)
            assert bool(result.get("duplicate")) != bool(firsts) or (lost and firsts) or clickhouse, result
            assert not (clickhouse and result.get("duplicate")), result
            if firsts:
                firsts.pop()

    return check


def op_record_usage(w: World) -> Op:
    rng = w.rng
    org = pick(rng, ORGS, BAD_ORGS, p_bad=0.08)
    tx = pick(rng, (None, *TXS), BAD_TXS, p_bad=0.08)
    code = pick(rng, ("api_call", "api_call", "other_metric"), ("", "  ", 3), p_bad=0.08)
    tokens = rng.choice((0, 1, 7, 1_000, 2**53 - 1, -1))  # (a property: sent as given, Lago's to read)
    properties: Any = {"total_tokens": tokens, "user_id": rng.choice(USERS)}
    if rng.random() < 0.05:
        properties = rng.choice((["total_tokens", 3], "tokens=3"))
    stamp, at, bad_stamp = _stamp(w)

    def expect(m: Model) -> Check:
        _refuse(
            org_id=not isinstance(org, str) or org in BAD_ORGS,
            properties=not isinstance(properties, dict),
            transaction_id=tx in BAD_TXS,
            code=code not in ("api_call", "other_metric"),
            timestamp=bad_stamp,
            **{"subscription id": _long_sub(m, org)},
        )
        return _record(m, org, tx, code, tokens, at, w.fault_kind)

    call = lambda: w.billing.record_usage(org, code, tx, properties, stamp)  # noqa: E731
    return f"record_usage({org!r:.30}, {code!r}, {tx!r:.30}, {properties!r:.40}, {stamp!r})", call, expect


def op_record_api_call(w: World) -> Op:
    rng = w.rng
    org = pick(rng, ORGS, BAD_ORGS, p_bad=0.08)
    tx = pick(rng, (None, *TXS), BAD_TXS, p_bad=0.08)
    tokens, bad_tokens = _tokens(rng)
    split = rng.random() < 0.3
    user: Any = pick(rng, (None, *USERS, 42), (4.5, b"u", ["u"]), p_bad=0.08)
    endpoint: Any = pick(rng, (None, "/v1/chat/{id}", "/ü/../x"), (3, b"/x"), p_bad=0.05)
    stamp, at, bad_stamp = _stamp(w)

    def expect(m: Model) -> Check:
        _refuse(
            tokens=bad_tokens,
            user_id=user in (4.5, b"u") or isinstance(user, list),
            endpoint=endpoint in (3, b"/x"),
            org_id=not isinstance(org, str) or org in BAD_ORGS,
            transaction_id=tx in BAD_TXS,
            timestamp=bad_stamp,
            **{"subscription id": _long_sub(m, org)},
        )
        return _record(m, org, tx, "api_call", tokens, at, w.fault_kind)

    if split:
        call = lambda: w.billing.record_api_call(  # noqa: E731
            org, tx, endpoint, user, input_tokens=tokens, output_tokens=0, timestamp=stamp
        )
    else:
        call = lambda: w.billing.record_api_call(org, tx, endpoint, user, tokens, timestamp=stamp)  # noqa: E731
    return f"record_api_call({org!r:.30}, {tx!r:.30}, {endpoint!r}, {user!r}, {tokens!r}, {stamp!r})", call, expect


def op_record_nowait(w: World) -> Op:
    rng = w.rng
    org = pick(rng, ORGS, BAD_ORGS, p_bad=0.08)
    tx = pick(rng, (None, *TXS), BAD_TXS, p_bad=0.08)
    tokens, bad_tokens = _tokens(rng)
    stamp, at, bad_stamp = _stamp(w)

    def expect(m: Model) -> Check:
        _refuse(
            tokens=bad_tokens,
            org_id=not isinstance(org, str) or org in BAD_ORGS,
            transaction_id=tx in BAD_TXS,
            timestamp=bad_stamp,
            **{"subscription id": _long_sub(m, org)},
        )
        key = None if tx is None else m.event_key(org, tx, at, "api_call")
        if key is not None and (m.store == "clickhouse" or key not in m.events):
            m.events[key] = Event("api_call", tokens, at)
        if tx is not None:  # (counted when queued: once per id and timestamp, whatever Lago then keeps)
            m.count(org, "api_call", tokens, m.full_key(org, tx, at, "api_call"))

        def check(result: Any) -> None:
            if tx is None:
                m.events[m.event_key(org, result, at, "api_call")] = Event("api_call", tokens, at)
                m.count(org, "api_call", tokens, None)
            else:
                assert result == tx

        return check

    async def call() -> Any:
        answer = w.billing.record_api_call_nowait(org, tx, "/v1/x", "u1", tokens, timestamp=stamp)
        assert await w.pipeline.flush(10), "the pipeline did not deliver"
        return answer

    return f"record_api_call_nowait({org!r:.30}, {tx!r:.30}, {tokens!r}, {stamp!r})", call, expect


def op_current_usage(w: World) -> Op:
    org = pick(w.rng, ORGS, BAD_ORGS)

    def expect(m: Model) -> Check:
        _id(org, "org_id")
        m.sub_id(org)
        if org not in m.subscriptions:
            return lambda result: _equal(result, None)
        tokens = m.usage(org)

        def check(result: Any) -> None:
            units = {c["billable_metric"]["code"]: Decimal(c["units"]) for c in result["charges_usage"]}
            assert units.get("api_call", Decimal(0)) == tokens, (units, tokens)

        return check

    return f"get_current_usage({org!r:.30})", lambda: w.billing.get_current_usage(org), expect


def op_invoices(w: World) -> Op:
    org = pick(w.rng, ORGS, BAD_ORGS)
    limit: Any = pick(w.rng, (1, 2, 10), (0, -1, True, 1.5, "5"), p_bad=0.2)

    def expect(m: Model) -> Check:
        if limit in (0, -1, 1.5, "5") or limit is True:
            raise Refused("limit")
        _id(org, "org_id")
        held = [i for i in w.fake.invoices if i["customer"]["external_id"] == org]

        def check(result: Any) -> None:
            assert len(result) == min(limit, len(held))
            assert all(i["customer"]["external_id"] == org for i in result)

        return check

    return f"get_invoices({org!r:.30}, {limit!r})", lambda: w.billing.get_invoices(org, limit), expect


def op_migrate(w: World) -> Op:
    rng, at = w.rng, w.at
    user: Any = rng.choice((*LEGACY_USERS, "nobody")) if rng.random() > 0.1 else rng.choice(("a/b", "", 5))
    org, name = pick(rng, ORGS[:3], BAD_ORGS, p_bad=0.08), pick(rng, NAMES[:3], BAD_NAMES, p_bad=0.05)

    def expect(m: Model) -> Check:
        if not isinstance(user, str) or user in ("a/b", "", "legacy.dotted"):  # (Lago cannot address a dotted id)
            raise Refused("user_id")
        if not isinstance(org, str) or org in BAD_ORGS:
            raise Refused("org_id")
        if not isinstance(name, str) or name in ("", "   ", "n" * 256, "a\x00b"):
            raise Refused("org_name")
        if name == "\ud800" and m.customers.get(org, Customer(None, None, {})).name is None:  # (the name is sent:
            # refused by the client's check of customer.name, not the mapping's)
            raise Refused("org_name", "name")
        plan = m.legacy.get(user)  # (none: a user without a customer, or migrated: the org gets its customer only)
        if user in m.legacy:
            m.legacy[user] = None
        customer = m.customers.get(org)
        if customer is None:
            customer = m.customers[org] = Customer(name, None, {})
        if org not in m.subscriptions and plan is not None:
            m.subscriptions[org] = Subscription(plan, None, at)
        customer.metadata = {}  # (taken from Lago once answered; its keys checked there)

        def check(result: Any) -> None:
            meta = customer_metadata(result["customer"])
            assert meta["billing_type"] == "organization", result
            if len(meta) < 5:  # (else its own items fill Lago's 5: the migration warns instead)
                assert user in meta["migrated_from_user"], result
            else:
                assert "migrated_from_user" in meta or result["warnings"], result
            customer.metadata = meta
            customer.name = result["customer"].get("name") or None
            customer.email = result["customer"].get("email") or None
            if org in m.subscriptions:
                _same_subscription(result["subscription"], org, m.subscriptions[org], m.template)
            else:
                assert result["subscription"] is None, result

        return check

    call = lambda: w.billing.migrate_user_to_org(user, org, name, on_termination_invoice="skip")  # noqa: E731
    return f"migrate_user_to_org({user!r}, {org!r:.30}, {name!r:.20})", call, expect


def op_health(w: World) -> Op:
    def expect(m: Model) -> Check:
        def check(result: Any) -> None:
            if w.fault == "none":
                assert result["healthy"] is True and result["error"] is None, result
            elif w.fault == "outage":
                assert result["healthy"] is False and result["error"], result

        return check

    return "check_lago_health()", lambda: w.billing.check_lago_health(), expect


OPERATIONS: list[tuple[Callable[[World], Op], int]] = [
    (op_create_customer, 6),
    (op_update_customer, 4),
    (op_get_or_create, 2),
    (op_get_customer, 2),
    (op_is_org_customer, 2),
    (op_create_subscription, 5),
    (op_subscribe, 6),
    (op_change_plan, 6),
    (op_terminate, 4),
    (op_get_subscription, 2),
    (op_record_usage, 5),
    (op_record_api_call, 5),
    (op_record_nowait, 2),
    (op_current_usage, 4),
    (op_invoices, 1),
    (op_migrate, 2),
    (op_health, 1),
]
#: Calls that write more than once or delete, which a transient fault may fail (the DELETE is never resent).
MAY_FAIL_TRANSIENT = {"terminate_subscription", "change_plan", "migrate_user_to_org", "check_lago_health"}
#: Calls that change the org's subscription: the quota gate's state of the org is dropped.
CHANGING = {
    "create_subscription", "subscribe_org_to_plan", "change_plan", "terminate_subscription", "migrate_user_to_org",
}  # fmt: skip
#: Calls whose twin run at once may be refused: the first ended what the second meant to end.
TWIN_MAY_FAIL = {"terminate_subscription", "migrate_user_to_org"}


# ------------------------------------------------------------------------------------------------------ checks


def _equal(result: Any, expected: Any) -> None:
    assert result == expected, (result, expected)


def _same_customer(result: Any, customer: Customer) -> None:
    assert (result.get("name") or None, result.get("email") or None) == (customer.name, customer.email), result
    assert customer_metadata(result) == customer.metadata, (customer_metadata(result), customer.metadata)


def _same_subscription(result: Any, org: str, sub: Subscription, template: str) -> None:
    assert result["external_id"] == template.format(org_id=org) and result["external_customer_id"] == org, result
    assert (result["plan_code"], result.get("next_plan_code")) == (sub.plan, sub.next_plan), (result, sub)
    assert result["status"] == "active", result


def check_state(w: World) -> None:
    """The emulator's state, through its own views, is the model's; so is what the quota gate was told."""
    m = w.model
    assert +w.gate.counted == +m.counted, (w.gate.counted, m.counted)
    customers = {c["external_id"]: c for c in w.fake.customers}
    assert set(customers) == set(m.customers) | set(LEGACY_USERS), sorted(customers)
    for org, customer in m.customers.items():
        _same_customer(customers[org], customer)
    subscriptions = w.fake.subscriptions
    owners = {m.template.format(org_id=org): org for org in ORGS if not _long_sub(m, org)}
    assert {s["external_id"] for s in subscriptions} <= {*owners, *LEGACY_USERS}, subscriptions
    for external_id in {*owners, *LEGACY_USERS}:
        mine = [s for s in subscriptions if s["external_id"] == external_id and s["status"] in ("active", "pending")]
        active = [s for s in mine if s["status"] == "active"]
        pending = [s["plan_code"] for s in mine if s["status"] == "pending"]
        if external_id in LEGACY_USERS:
            plan = m.legacy[external_id]
            assert [s["plan_code"] for s in active] == ([plan] if plan else []), mine
            continue
        org = owners[external_id]
        sub = m.subscriptions.get(org)
        if sub is None:
            assert mine == [], mine
            continue
        assert len(active) == 1, mine
        _same_subscription(active[0], org, sub, m.template)
        assert pending == ([sub.next_plan] if sub.next_plan else []), mine
    seen: set[tuple[str, ...]] = set()
    stored: Counter[tuple[Any, ...]] = Counter()
    for event in w.fake.events:
        external_id, tx, stamp = event["external_subscription_id"], event["transaction_id"], event["timestamp"]
        dedup = (external_id, tx) if m.store == "postgres" else (external_id, tx, stamp, event["code"])
        assert dedup not in seen, f"event {dedup} stored twice"
        seen.add(dedup)
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        at = moment if moment >= START else None  # (before: the client's clock, real time)
        tokens = int(event["properties"].get("total_tokens") or 0)
        stored[(owners.get(external_id, external_id), tx, event["code"], tokens, at)] += 1
    expected = Counter((key[0], key[1], e.code, e.tokens, e.at) for key, e in m.events.items())
    assert stored == expected, (stored - expected, expected - stored)


# ------------------------------------------------------------------------------------------------------- steps


def _faults(w: World, twin: bool) -> None:
    """Draw this step's fault: none, one absorbed by the client's retries, a rate limit, an outage or an answer lost."""
    roll = w.rng.random()
    w.fault = w.fault_kind = "none"
    if roll < 0.08:
        w.fake.inject_fault(503, count=w.rng.choice((1, 2)))  # type: ignore[attr-defined]
        w.fault, w.fault_kind = "transient", "503"
    elif roll < 0.13:
        w.fake.inject_fault(drop=True, count=1)  # type: ignore[attr-defined]
        w.fault, w.fault_kind = "transient", "drop"
    elif roll < 0.18 and not twin:  # (twins share the window: one may use up the other's retries, as Lago would)
        w.fake.inject_fault(rate_limit={"limit": w.rng.choice((1, 2)), "reset": 1})  # type: ignore[attr-defined]
        w.fault, w.fault_kind = "transient", "429"
    elif roll < 0.22:
        w.fake.inject_fault(503)  # type: ignore[attr-defined]
        w.fault = "outage"
    elif roll < 0.3:
        w.lose.left = 1
        w.fault = w.fault_kind = "lost"


async def run_step(w: World) -> None:
    (make,) = w.rng.choices([op for op, _ in OPERATIONS], weights=[weight for _, weight in OPERATIONS])
    description, call, expect = make(w)
    kind = description.split("(")[0]
    twin = kind != "record_api_call_nowait" and w.rng.random() < 0.15
    _faults(w, twin)
    if kind == "record_api_call_nowait" and w.fault == "outage":
        w.fake.clear_faults()  # type: ignore[attr-defined]
        w.fault = w.fault_kind = "none"  # (the pipeline waits an outage out: not this test's to wait for)
    w.log.append(f"{description}{' x2' if twin else ''} [{w.fault}]")
    after = w.model.copy()  # (the model itself stays as it was unless the call succeeds)
    writes, invalidated = w.lose.writes, len(w.gate.invalidated)
    verdict: Check | Exception
    try:
        verdict = expect(after)
    except (Refused, Raises) as exc:
        verdict = exc
    results: list[Any] = []

    async def one() -> None:
        try:
            results.append(await call())
        except Exception as exc:  # (compared with the verdict below)
            results.append(exc)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(one)
        if twin:
            tasks.start_soon(one)
    w.fake.clear_faults()  # type: ignore[attr-defined]
    w.lose.left = 0

    for result in results:
        if isinstance(result, Exception) and not isinstance(result, LagoIntegrationError):
            raise AssertionError(f"{type(result).__name__} escaped, not a LagoIntegrationError: {result!r}") from result
    failed = [r for r in results if isinstance(r, Exception)]
    if isinstance(verdict, Refused):
        for result in results:
            wanted = InvalidIdentifierError if verdict.identifier else InvalidRequestError
            if w.fault == "outage" and isinstance(result, LagoUnavailableError):
                continue  # (a read made before the argument is needed: Lago down first)
            assert isinstance(result, wanted), f"expected {wanted.__name__} naming {verdict.names}, got {result!r}"
            assert any(name in str(result) for name in verdict.names), f"{result} names none of {verdict.names}"
        assert w.lose.writes == writes, "a refused call wrote to Lago"
        check_state(w)
        return
    if isinstance(verdict, Raises):
        for result in results:
            allowed = (verdict.kind, LagoUnavailableError) if w.fault != "none" else (verdict.kind,)
            assert isinstance(result, allowed), f"expected {verdict.kind.__name__}, got {result!r}"
        check_state(w)
        return
    ok = [r for r in results if not isinstance(r, Exception)]
    if failed:
        may_fail = w.fault == "outage" or (w.fault == "transient" and kind in MAY_FAIL_TRANSIENT)
        if not may_fail and not (twin and kind in TWIN_MAY_FAIL and len(ok) == 1):
            raise AssertionError(f"{description} failed: {failed[0]!r}") from failed[0]
        if not ok:
            assert all(isinstance(r, LagoUnavailableError) for r in failed), failed
            if kind != "migrate_user_to_org":  # (a migration stopped midway is resumed by its next run)
                check_state(w)
            else:
                _resync(w)
            return
    # (twins' answers in either order: the one Lago recorded first, then the one it had already)
    for result in sorted(ok, key=lambda r: isinstance(r, dict) and bool(r.get("duplicate"))):
        verdict(result)
    if kind in CHANGING:  # (the org decided on its new plan at once, not after LAGO_USAGE_CACHE_TTL)
        assert len(w.gate.invalidated) > invalidated, f"{description} left the quota gate's state of the org"
    w.model = after
    check_state(w)


def _resync(w: World) -> None:
    """After a migration stopped midway: the model takes what Lago holds for what the migration touches (its next
    run resumes it), everything else still checked."""
    customers = {c["external_id"]: c for c in w.fake.customers}
    for org in ORGS:
        if org in customers:
            c = customers[org]
            w.model.customers[org] = Customer(c.get("name") or None, c.get("email") or None, customer_metadata(c))
    for user in LEGACY_USERS:
        active = [s for s in w.fake.subscriptions if s["external_id"] == user and s["status"] == "active"]
        w.model.legacy[user] = active[0]["plan_code"] if active else None
    for org in ORGS:
        active = [s for s in w.fake.subscriptions if s["external_id"] == org and s["status"] == "active"]
        if active and org not in w.model.subscriptions:
            started = dt.datetime.fromisoformat(active[0]["started_at"].replace("Z", "+00:00"))
            w.model.subscriptions[org] = Subscription(active[0]["plan_code"], None, started)
    check_state(w)


def _world(seed: int, monkeypatch: pytest.MonkeyPatch) -> World:
    """The seed's world: its template and event store, the emulator (plans, legacy users), and OrgBilling on it."""
    fault_clock = [0.0]

    async def no_wait(seconds: float) -> None:  # the client's back-offs and rate-limit waits: the fault clock moves
        fault_clock[0] += max(float(seconds), 0.0)
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(anyio, "sleep", no_wait)
    rng = random.Random(seed)
    model = Model(template=rng.choice(TEMPLATES), store=rng.choice(("postgres", "postgres", "clickhouse")))
    fake = install_controls(FakeLago(api_key=API_KEY, event_store=model.store))
    install_faults(fake, clock=lambda: fault_clock[0])
    now = [START]
    fake.clock = lambda: now[0]
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_billable_metric("other_metric", aggregation_type="count_agg")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.001"}}
    for code, amount in PLANS.items():
        fake.add_plan(code, amount_cents=amount, charges=[charge])
    for user, plan in LEGACY_USERS.items():
        fake.add_customer(user, name=f"legacy {user}")
        fake.add_subscription(user, plan, external_id=user)
        model.legacy[user] = plan
    return World(rng, fake, Gate(), now, model)


def _connect(w: World, url: str | None) -> LagoClient:
    """OrgBilling on the emulator: in process, or over HTTP at ``url`` (a dropped connection is a socket closed)."""
    settings = BillingSettings(
        api_url=url or w.fake.base_url,
        api_key=API_KEY,
        retry_backoff=0.001,
        max_retries=3,
        subscription_id_template=w.model.template,
    )
    w.lose = LoseAnswers(w.fake.transport() if url is None else httpx.AsyncHTTPTransport())
    client = LagoClient(settings, transport=w.lose)
    w.pipeline = EventPipeline(client, flush_interval=0)
    w.billing = OrgBilling(settings, client=client, pipeline=w.pipeline, quota=w.gate)  # type: ignore[arg-type]
    return client


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_call_sequences_agree_with_the_model(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded sequence of calls, each checked against the model and the emulator's state after it."""
    w = _world(seed, monkeypatch)
    await _run(w, seed, _connect(w, None))


@pytest.mark.parametrize("seed", SERVED_SEEDS)
async def test_random_call_sequences_served_over_http(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, with the emulator served by uvicorn on 127.0.0.1: real connections, dropped by closing them."""
    w = _world(seed, monkeypatch)
    with serve_in_thread(w.fake) as url:
        await _run(w, seed, _connect(w, url))


async def _run(w: World, seed: int, client: LagoClient) -> None:
    async with client, anyio.create_task_group() as tasks:
        await tasks.start(w.pipeline.run)
        try:
            for _ in range(STEPS):
                await run_step(w)
                w.now[0] += dt.timedelta(minutes=1)
        except Exception as exc:
            raise AssertionError(f"{exc!r}\nseed {seed}, steps:\n  " + "\n  ".join(w.log)) from exc
        finally:
            await w.pipeline.aclose()


# ------------------------------------------------------------------------------------- the defects the model found


@pytest.fixture
async def plain(fake_lago: Any) -> Any:
    """OrgBilling on the emulator (plans free/starter/pro), its client's writes' answers lost on demand."""
    for code, amount in PLANS.items():
        fake_lago.add_plan(code, amount_cents=amount)
    lose = LoseAnswers(fake_lago.transport())
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)
    async with LagoClient(settings, transport=lose) as client, OrgBilling(settings, client=client) as billing:
        yield billing, lose


@pytest.mark.parametrize("org_id", ["acme.com", "o?x", " org_1", "", 42])
async def test_an_org_id_lago_cannot_address_is_named_org_id(fake_lago: Any, plain: Any, org_id: Any) -> None:
    """get_customer/update_org_customer named the client's ``customer external_id``, no argument of theirs."""
    billing, _ = plain
    with pytest.raises(InvalidIdentifierError, match=r"^org_id"):
        await billing.get_customer(org_id)
    with pytest.raises(InvalidIdentifierError, match=r"^org_id"):
        await billing.update_org_customer(org_id, "Acme")
    assert fake_lago.requests == []


async def test_terminate_names_a_bad_org_id_or_subscription_id_before_any_call(fake_lago: Any, plain: Any) -> None:
    """With ``subscription_id`` given, the org id went unchecked (another org's subscription was read, and refused as
    "not org 'a/b'"), and a subscription id Lago cannot address was named as the client's "subscription external_id"."""
    billing, _ = plain
    await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
    requests = len(fake_lago.requests)
    with pytest.raises(InvalidIdentifierError, match=r"^org_id"):
        await billing.terminate_subscription("a/b", "org_1")
    for given in ("a/b", "", 5):
        with pytest.raises(InvalidIdentifierError, match=r"^subscription_id"):
            await billing.terminate_subscription("org_1", given)
    assert len(fake_lago.requests) == requests
    assert (await billing.terminate_subscription("org_1", "org_1"))["status"] == "terminated"


@pytest.mark.parametrize("plan_code", ["bad.plan", "", None])
async def test_change_plan_names_a_bad_plan_code_before_any_call(fake_lago: Any, plain: Any, plan_code: Any) -> None:
    """An org without a subscription was answered "no active subscription" (LagoNotFoundError), after two reads,
    for a plan code no call can carry."""
    billing, _ = plain
    with pytest.raises(InvalidIdentifierError, match=r"^plan_code"):
        await billing.change_plan("org_1", plan_code)
    assert fake_lago.requests == []


async def test_subscribing_an_existing_customer_to_a_missing_plan_writes_nothing(fake_lago: Any, plain: Any) -> None:
    """A bare customer (made by Lago for create_subscription, then terminated): subscribe_org_to_plan with a plan Lago
    lacks completed it (name, email, org marker) before Lago refused the plan, a refused setup that wrote."""
    billing, _ = plain
    await billing.create_subscription("org_1", "starter")
    await billing.terminate_subscription("org_1")
    writes = len(fake_lago.write_requests)
    with pytest.raises(LagoNotFoundError) as info:
        await billing.subscribe_org_to_plan("org_1", "statrer", "Acme", "a@acme.test", "u1")
    assert info.value.code == "plan_not_found"
    assert len(fake_lago.write_requests) == writes
    assert customer_metadata(await billing.get_customer("org_1")) == {}
    with pytest.raises(InvalidRequestError, match="email"):  # (the completion is checked before the plan is read)
        await billing.subscribe_org_to_plan("org_1", "statrer", "Acme", "not-an-email")


async def test_change_plan_back_after_a_downgrade_whose_cancel_answer_was_lost(fake_lago: Any, plain: Any) -> None:
    """Back to the current plan cancels the scheduled downgrade (DELETE, never resent): its answer lost after Lago
    canceled it raised LagoUnavailableError while the plan was as asked; terminate_subscription reads back, so does
    this now."""
    billing, lose = plain
    await billing.subscribe_org_to_plan("org_1", "pro", "Acme")
    assert (await billing.change_plan("org_1", "starter"))["next_plan_code"] == "starter"
    lose.left = 1
    back = await billing.change_plan("org_1", "pro")
    assert (back["plan_code"], back["next_plan_code"], back["status"]) == ("pro", None, "active")
    assert [s["status"] for s in fake_lago.subscriptions if s["plan_code"] == "starter"] == ["canceled"]


async def test_a_retry_lago_clickhouse_takes_again_is_counted_once_in_the_gate() -> None:
    """Lago's ClickHouse store takes a caller's retry (same id and timestamp) again, 200, and keeps one event:
    record_usage counted it in the quota gate at each call (record_usage_nowait counted it once), the org refused
    below its limit until the gate's next read of Lago. Once now, through either path; another event still counts."""
    fake = FakeLago(api_key=API_KEY, event_store="clickhouse")
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY)
    gate = Gate()
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0)
        billing = OrgBilling(settings, client=client, pipeline=pipeline, quota=gate)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for _ in range(2):
                await billing.record_api_call("org_1", "job-7", tokens=5)
            billing.record_api_call_nowait("org_1", "job-7", tokens=5)
            await billing.record_api_call("org_1", "job-8", tokens=5, timestamp=START)
            billing.record_api_call_nowait("org_1", "job-8", tokens=5, timestamp=START)
            await billing.record_usage("org_1", "other_metric", "job-8", {"total_tokens": 5}, START)
            await billing.record_api_call("org_1", "job-8", tokens=5, timestamp=START + dt.timedelta(seconds=1))
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert len(fake.events) == 4  # (job-7; job-8 at START, its other_metric twin, and one a second later)
    assert (gate.counted[("org_1", "calls")], gate.counted[("org_1", "tokens")]) == (3, 15)
