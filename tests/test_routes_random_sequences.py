"""Seeded random sequences of requests to the org billing routes, checked against a model of what they promise.

``billing_routes()`` is mounted twice in one Starlette app over the Lago emulator: ``/billing`` as an org admin reaches
it (``plans=`` a list of offered codes, one of them unknown to Lago; no skipped termination invoice) and ``/ops`` as
an operator's routes (any plan, ``allow_skip_invoice=True``), sharing one ``OrgBilling``. From a fixed seed, each
sequence sends a few orgs' ``POST /setup``, ``GET/PUT/DELETE /subscription`` (upgrades, downgrades at period end, going
back to the current plan, terminations with and without the invoice), ``POST /usage/record`` (with and without
``transaction_id``/``timestamp``, retries with what a 503 said, two at once), ``GET /usage/current``, ``GET
/invoices``, ``GET /dashboard`` (JSON and HTML), ``HEAD``, wrong methods, and an ``authorize`` that allows, denies,
answers a truthy non-bool, raises, or raises a 401. Bodies draw each field from valid values and from what must be
refused (missing, null, wrong JSON type, empty, blank, too long, unicode, control characters, NUL, NaN-like strings
and NaN literals, nested, huge, not JSON at all); queries likewise. Lago faults are injected at the network edge (a
transport in front of the emulator) on one chosen Lago call of a step: 429 with a ``Retry-After``, 5xx, a 400, a 401,
a timeout or a refused connection before Lago sees the call, or an answer lost after Lago applied it.

The model is written from the routes' documented rules (the module docstring of ``_routes.py``): the status and JSON
shape of every answer (a 422's ``detail`` is a list of ``{loc, msg, type}`` naming the bad fields: at their own
``loc``, or at ``["body"]`` with the field named in ``msg`` for what the billing layer refuses), never a 500, never
the API key nor Lago's URL in an answer, ``Cache-Control: no-store``; no Lago call for a request refused before (403,
405, 413, 415, a 422 of the route's own checks); and, after every step, the emulator's customers, active
subscriptions (plan and pending downgrade) and events by ``(subscription, transaction_id)`` are the model's: a retried
usage record never makes a second event, a refused request changes nothing (but for a setup of a plan Lago lacks,
kept below as a strict xfail), and a plan change reaches the quota gate's ``invalidate``. What the seeds found is kept
below as named cases.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html import escape
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Mount

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "lago-key-7f3a9c-never-in-an-answer"
NOW = dt.datetime(2025, 3, 14, 12, 0, tzinfo=dt.timezone.utc)  # (mid-period: no downgrade applies during a run)
SEEDS = list(range(1, 15))
NOISY = 0.35  # the share of requests whose body or query may hold values the routes refuse
STEPS = 90

#: Lago's plans and their monthly prices: a cheaper plan applies at period end, one at least as expensive now.
PRICES = {"basic": 500, "starter": 1000, "pro": 5000, "team": 5000, "internal": 0}
#: What ``/billing`` offers org admins: "internal" is kept for others, "ghost" is a code Lago does not have.
OFFERED = {"basic", "starter", "pro", "team", "ghost"}
PLAN_LIMITS = {"starter": {"max_api_calls": 10, "max_tokens": 1000}, "pro": {"max_api_calls": 100}}
BILLED = {"api_call", "tokens"}  # the metrics every plan charges; "storage_gb" exists on none
ORGS = ("org_a", "org-b@x", "örg_c")
BAD_ORGS = ("org.dot", "%20org", "a%5Cb")  # (Lago cannot take them in a URL path)
MAX_BODY = 65_536
ALLOW = {
    "/setup": {"POST"},
    "/subscription": {"GET", "HEAD", "PUT", "DELETE"},
    "/usage/record": {"POST"},
    "/usage/current": {"GET", "HEAD"},
    "/invoices": {"GET", "HEAD"},
    "/dashboard": {"GET", "HEAD"},
}
DENIED = {"detail": "You may not manage this org's billing."}


# ------------------------------------------------------------------------------------------------ the world


def authorize(request: Request, org_id: str) -> bool | Awaitable[bool]:
    """The test's rule, as the ``X-Auth`` header says: allow, deny, a truthy non-bool, raise, or a 401 to log in
    (``X-Async: 1``: answered by a coroutine)."""
    mode = request.headers.get("x-auth", "")
    if mode == "raise":
        raise RuntimeError("session store unreachable")
    if mode == "login":
        raise HTTPException(401, "Log in first.")
    answer: Any = {"allow": True, "deny": False, "truthy": 1}.get(mode, False)
    if request.headers.get("x-async") == "1":

        async def later() -> Any:
            return answer

        return later()
    return answer  # type: ignore[no-any-return]


@dataclass
class Fault:
    """One fault at the network edge: the first Lago call of ``method`` whose path ends with ``suffix`` (or contains
    it, for ``contains``) meets it. ``kind``: 429, 5xx, 400, 401, timeout (before Lago), connect (never sent), lost
    (Lago applied the call, its answer never came)."""

    method: str
    suffix: str
    kind: str
    status: int = 0
    retry_after: str | None = None
    contains: bool = False

    def matches(self, request: httpx.Request) -> bool:
        path = request.url.path
        where = self.suffix in path if self.contains else path.endswith(self.suffix)
        return request.method == self.method and where

    @property
    def answer(self) -> int:
        """The status the routes answer the fault with."""
        return {"429": 429, "400": 502, "401": 502}.get(self.kind, 503)

    @property
    def applied(self) -> bool:
        return self.kind == "lost"


class Edge(httpx.AsyncBaseTransport):
    """The emulator behind a network edge that injects one :class:`Fault` at a time and counts Lago calls."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.fault: Fault | None = None
        self.fired: Fault | None = None
        self.calls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        fault = self.fault
        if fault is None or not fault.matches(request):
            return await self.inner.handle_async_request(request)
        self.fault, self.fired = None, fault
        if fault.kind == "lost":
            response = await self.inner.handle_async_request(request)
            await response.aread()
            raise httpx.ReadTimeout("the answer was lost after Lago applied the call", request=request)
        if fault.kind == "timeout":
            raise httpx.ReadTimeout("no answer", request=request)
        if fault.kind == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if fault.kind == "429":
            headers = {} if fault.retry_after is None else {"Retry-After": fault.retry_after}
            body = {"status": 429, "error": "Too Many Requests", "code": "too_many_requests"}
            return httpx.Response(429, json=body, headers=headers, request=request)
        if fault.kind == "5xx" and fault.status == 502:  # (a proxy's page, not Lago's JSON)
            return httpx.Response(502, text="<html><h1>502 Bad Gateway</h1></html>", request=request)
        if fault.kind == "5xx":
            headers = {"Retry-After": "30"} if fault.status == 503 else {}
            body = {"status": fault.status, "error": "Internal Server Error"}
            return httpx.Response(fault.status, json=body, headers=headers, request=request)
        if fault.kind == "400":
            return httpx.Response(400, json={"status": 400, "error": "BadRequest: x"}, request=request)
        return httpx.Response(401, json={"status": 401, "error": "Unauthorized"}, request=request)


@dataclass
class Org:
    """The model of one org in Lago."""

    customer: bool = False
    email: bool = False  # its customer has an email
    created_by: bool = False  # its customer has created_by_user_id
    plan: str | None = None  # the active subscription's plan
    next_plan: str | None = None  # a downgrade waiting for the period end
    events: dict[str, str] = field(default_factory=dict)  # transaction id -> code, of the events Lago holds for it

    def subscription(self) -> tuple[str | None, str | None]:
        return self.plan, self.next_plan


@dataclass
class Retry:
    """What a retry of an earlier usage record sends: its body with the transaction_id and timestamp it was told."""

    org: str
    mount: str
    body: dict[str, Any]


class World:
    """The app, the emulator behind the edge, the model, and the trail of steps (said when a check fails)."""

    def __init__(self, seed: int, fake: FakeLago, edge: Edge, client: httpx.AsyncClient) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.fake = fake
        self.edge = edge
        self.client = client
        self.orgs = {org: Org() for org in ORGS}
        self.invalidated: list[str] = []
        self.retries: list[Retry] = []
        self.trail: list[str] = []
        self.calls_before = 0
        #: set by a step whose write Lago applies without a change the model sees (a downgrade asked again)
        self.unseen_write = False

    def model(self, org: str) -> Org:
        """The model of ``org`` (a fresh one for an id no request gets past)."""
        return self.orgs[org] if org in self.orgs else Org()

    def note(self, text: str) -> None:
        self.trail.append(text)

    def why(self, *found: object) -> str:
        """The seed and the last steps (with what a failed check found), to read a failure by."""
        said = "".join(f"{value!r}\n" for value in found)
        return f"{said}seed {self.seed}, steps:\n  " + "\n  ".join(self.trail[-12:])

    async def send(
        self,
        method: str,
        mount: str,
        org: str,
        path: str,
        *,
        query: str = "",
        body: bytes | None = None,
        content_type: str | None = "application/json",
        auth: str = "allow",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = {"X-Auth": auth, **(headers or {})}
        if auth.startswith("async-"):
            sent.update({"X-Auth": auth[6:], "X-Async": "1"})
        if content_type is not None and body is not None:
            sent["Content-Type"] = content_type
        url = f"/{mount}/organizations/{org}{path}" + (f"?{query}" if query else "")
        self.note(f"{method} {url} auth={auth} body={(body or b'')[:160]!r} fault={self.edge.fault}")
        response = await self.client.request(method, url, content=body, headers=sent)
        self.note(f"  -> {response.status_code} {response.text[:300]!r} fired={self.edge.fired is not None}")
        return response


@asynccontextmanager
async def world(seed: int) -> AsyncIterator[World]:
    """The app of both mounts over the emulator (behind the edge), and a fresh model."""
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    fake.add_billable_metric("api_call")
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_billable_metric("storage_gb", aggregation_type="sum_agg", field_name="gb")
    grouped = {"pricing_group_keys": ["user_id", "model"]}
    charges = [
        {"billable_metric_code": "api_call", "properties": {"amount": "0.01", **grouped}},
        {"billable_metric_code": "tokens", "properties": {"amount": "0.001"}},
    ]
    for code, cents in PRICES.items():
        fake.add_plan(code, name=code.title(), amount_cents=cents, charges=charges)
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=API_KEY,
        max_retries=0,  # (one attempt per call: what a fault does is what the route answers)
        plan_limits=PLAN_LIMITS,
    )
    edge = Edge(fake.transport())
    invalidated: list[str] = []

    async def invalidate(org_id: str) -> None:
        invalidated.append(org_id)

    async with LagoClient(settings, transport=edge) as lago:
        billing = OrgBilling(client=lago)
        admins = billing_routes(billing, authorize=authorize, invalidate=invalidate, plans=OFFERED)
        ops = billing_routes(billing, authorize=authorize, invalidate=invalidate, allow_skip_invoice=True)
        app = Starlette(routes=[Mount("/billing", app=admins), Mount("/ops", app=ops)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # (a crash is seen as a 500)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            w = World(seed, fake, edge, client)
            w.invalidated = invalidated
            yield w


# ------------------------------------------------------------------------------------------ random values


def bad_string(value: Any, max_length: int) -> bool:
    """The routes' rule for a text field: a non-empty, non-blank string of at most ``max_length`` characters."""
    return not isinstance(value, str) or not value.strip() or len(value) > max_length


def bad_id(value: Any) -> bool:
    """What Lago cannot take in a URL path (and so no plan or metric code it has)."""
    return (
        bad_string(value, 255)
        or value != value.strip()
        or any(c in value for c in "./?#%\\")
        or not all(c >= " " and c != "\x7f" for c in value)
    )


def has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


WRONG_TYPES: tuple[Any, ...] = (5, 2.5, True, False, [], ["x"], {}, {"a": {"b": [1]}})
BLANKS = ("", " ", "\t\n")
TEXTS = ("Acme", "Åcme 株式会社", "Ac\x01me\u200b", "x" * 255, "🚀 rocket", "NaN", "null", "<b>&amp;</b>")


def text_value(rng: random.Random, max_length: int, noisy: bool) -> tuple[Any, str]:
    """A value of a text field and what it is: ``ok``, ``absent``, ``bad`` (refused by the routes' own checks) or
    ``nul`` (a NUL: refused by the billing layer, after the route's checks); only ``ok`` or ``absent`` unless
    ``noisy``."""
    roll = rng.random() * (1 if noisy else 0.65)
    if roll < 0.55:
        value = rng.choice(TEXTS)
        return (value if len(value) <= max_length else value[:max_length]), "ok"
    if roll < 0.65:
        return None, "absent"
    if roll < 0.8:
        return rng.choice(WRONG_TYPES), "bad"
    if roll < 0.88:
        return rng.choice(BLANKS), "bad"
    if roll < 0.93:
        return "y" * (max_length + rng.choice((1, 300))), "bad"
    return "Ac\x00me", "nul"


def encode(body: Any, rng: random.Random) -> bytes:
    """A JSON body as a client sends it: ASCII-escaped or UTF-8, NaN literals as Python writes them."""
    return json.dumps(body, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode()


#: Whole bodies no route takes: not an object, not JSON, nested past any parser, a lone surrogate, not UTF-8.
BAD_BODIES: tuple[bytes, ...] = (
    b"[]",
    b"5",
    b"null",
    b'"text"',
    b"{bad json",
    b'{"a": 1,}',
    b"[" * 100_000 + b"]" * 100_000,  # (over 64 KiB: a 413)
    b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",  # (too deep for json.loads on every Python: 3.13 reads 5,000)
    b'{"user_id": "\\ud800"}',
    b'{"user_id": "\xff\xfe"}',
    b'{"tokens": 1' + b"0" * 5_000 + b"}",
)


def whole_body_error(raw: bytes) -> tuple[int, tuple[str, ...] | None]:
    """The answer to a body of :data:`BAD_BODIES`: a 413 past the size, else a 422 at ``["body"]``."""
    if len(raw) > MAX_BODY:
        return 413, None
    return 422, ("body",)


def pick_auth(rng: random.Random) -> str:
    return rng.choices(
        ("allow", "async-allow", "deny", "async-deny", "truthy", "raise", "login"),
        weights=(80, 6, 4, 2, 3, 4, 1),
    )[0]


def pick_fault(rng: random.Random, targets: list[tuple[str, str]], chance: float = 0.25) -> Fault | None:
    if not targets or rng.random() >= chance:
        return None
    # (a write's fault, a lost answer above all, is what can leave Lago other than the answer says)
    method, suffix = rng.choices(targets, weights=[1 if m == "GET" else 3 for m, _ in targets])[0]
    kind = rng.choices(("429", "5xx", "400", "401", "timeout", "connect", "lost"), weights=(3, 3, 1, 1, 2, 1, 5))[0]
    fault = Fault(method, suffix, kind, contains=suffix.startswith("~"))  # ("~/part": a part of the path)
    if fault.contains:
        fault.suffix = suffix[1:]
    if kind == "5xx":
        fault.status = rng.choice((500, 502, 503, 504))
    if kind == "429":
        fault.retry_after = rng.choice(RETRY_AFTERS)[0]
    return fault


#: Retry-After values Lago (or a proxy) may send with a 429, and what the routes say then: whole seconds, at least 1
#: (``None``: a far date, some large number of seconds).
RETRY_AFTERS: tuple[tuple[str | None, str | None], ...] = (
    (None, "1"),
    ("0", "1"),
    ("1", "1"),
    ("2.5", "3"),
    ("7", "7"),
    ("1e3", "1000"),
    ("-4", "1"),
    ("nan", "1"),
    ("inf", "1"),
    ("1e999", "1"),
    ("soon", "1"),
    ("Wed, 21 Oct 2015 07:28:00 GMT", "1"),
    ("Fri, 01 Jan 2100 00:00:00 GMT", None),
)


# --------------------------------------------------------------------------------------------- the checks


def check_always(w: World, response: httpx.Response) -> None:
    """What every answer keeps: never a 500, never the API key nor Lago's URL, JSON errors of the documented shape."""
    assert response.status_code < 500 or response.status_code in (502, 503), w.why()
    shown = response.text + " ".join(f"{k}: {v}" for k, v in response.headers.items())
    assert API_KEY not in shown and "fake-lago" not in shown, w.why()
    if response.status_code == 401:  # (the app's own answer, raised by authorize)
        return
    if response.status_code != 405:
        assert response.headers.get("cache-control") == "no-store", w.why()
    if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
        if response.request.method != "HEAD":
            assert "detail" in response.json(), w.why()
    if response.status_code == 422 and response.request.method != "HEAD":
        detail = response.json()["detail"]
        assert isinstance(detail, list) and detail, w.why()
        for error in detail:
            assert set(error) >= {"loc", "msg", "type"}, w.why()
            assert isinstance(error["loc"], list) and error["loc"] and error["loc"][0] in ("body", "path", "query")
            assert isinstance(error["msg"], str) and isinstance(error["type"], str), w.why()


def locs(response: httpx.Response) -> set[tuple[Any, ...]]:
    return {tuple(error["loc"]) for error in response.json()["detail"]}


def check_422(w: World, response: httpx.Response, want: set[tuple[Any, ...]], named: Collection[str] = ()) -> None:
    """A 422 whose errors are at exactly ``want``; one at ``["body"]`` names one of ``named`` in its message."""
    assert response.status_code == 422, w.why()
    if response.request.method == "HEAD":
        return
    got = locs(response)
    assert got == want, w.why(got, want)
    for error in response.json()["detail"]:
        if error["loc"] == ["body"] and named:
            assert any(name in error["msg"] for name in named), w.why(error, named)


def no_lago(w: World) -> None:
    """The request was answered before any call to Lago."""
    assert len(w.edge.calls) == w.calls_before, w.why()


def check_fault_answer(w: World, response: httpx.Response, fault: Fault) -> None:
    """The answer to a Lago fault: 429 with whole seconds to wait, 503 with Retry-After, 502 for a refused key or an
    error of Lago's."""
    assert response.status_code == fault.answer, w.why(fault)
    if fault.kind == "429":
        wait = response.headers["retry-after"]
        expected = dict(RETRY_AFTERS)[fault.retry_after]
        assert wait.isdigit() and int(wait) >= 1, w.why()
        if expected is not None:
            assert wait == expected, w.why(wait, expected)
    elif fault.answer == 503:
        assert response.headers["retry-after"].isdigit(), w.why()
    elif fault.kind == "401" and response.request.method != "HEAD":
        assert response.json() == {"detail": "The billing service is misconfigured."}, w.why()


def check_lago(w: World) -> None:
    """The emulator's customers, active subscriptions and events are the model's."""
    customers = {c["external_id"] for c in w.fake.customers}
    assert customers == {org for org, m in w.orgs.items() if m.customer}, w.why(customers)
    active = {s["external_id"]: s for s in w.fake.subscriptions if s["status"] == "active"}
    for org, model in w.orgs.items():
        sub = active.get(org)
        found = (sub["plan_code"], sub["next_plan_code"]) if sub is not None else (None, None)
        assert found == model.subscription(), w.why(org, found, model)
    held = Counter((e["external_subscription_id"], e["transaction_id"]) for e in w.fake.events)
    assert all(count == 1 for count in held.values()), w.why(held)
    codes = {(e["external_subscription_id"], e["transaction_id"]): e["code"] for e in w.fake.events}
    assert codes == {(org, tid): code for org, m in w.orgs.items() for tid, code in m.events.items()}, w.why()


# ------------------------------------------------------------------------------------------------ the steps


def gate(w: World, response: httpx.Response, method: str, path: str, auth: str, org: str) -> bool:
    """The answers before a route's own work (405, 403, 401, a bad org id): checked here; True when the request got
    past them."""
    if method not in ALLOW[path]:
        assert response.status_code == 405, w.why()
        assert set(response.headers["allow"].split(", ")) == ALLOW[path], w.why()
        if method != "HEAD":
            assert response.json() == {"detail": "Method Not Allowed"}, w.why()
        return False
    if auth == "login":
        assert response.status_code == 401, w.why()
        return False
    if auth not in ("allow", "async-allow"):
        assert response.status_code == 403, w.why()
        if method != "HEAD":
            assert response.json() == DENIED, w.why()
        return False
    if org in BAD_ORGS:
        assert response.status_code == 422, w.why()
        if method != "HEAD":
            assert locs(response) == {("path", "org_id")}, w.why()
        return False
    return True


def pick_org(w: World) -> str:
    return w.rng.choice(BAD_ORGS) if w.rng.random() < 0.03 else w.rng.choice(ORGS)


def plan_code_value(rng: random.Random, noisy: bool) -> Any:
    roll = rng.random() * (1 if noisy else 0.75)
    if roll < 0.75:
        return rng.choice((*PRICES, "ghost", "nope"))
    if roll < 0.8:
        return None
    return rng.choice((*WRONG_TYPES, *BLANKS, "a.b", "x/y", " pro", "p" * 256, "pr\x00o", "pro\n"))


def change_of(model: Org, plan: str) -> tuple[str | None, str | None]:
    """Lago's answer to a subscription create for ``plan`` with ``model`` subscribed: now when at least as
    expensive, at the period end when cheaper."""
    assert model.plan is not None
    if PRICES[plan] >= PRICES[model.plan]:
        return plan, None
    return model.plan, plan


async def step_setup(w: World) -> None:
    rng = w.rng
    org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
    noisy = rng.random() < NOISY
    body: dict[str, Any] = {}
    early: set[tuple[Any, ...]] = set()
    nul: set[str] = set()
    name_key = "org_name" if rng.random() < 0.9 else "name"
    for key, max_length in ((name_key, 255), ("email", 255), ("user_id", 100)):
        value, kind = text_value(rng, max_length, noisy or key != name_key)
        if not noisy and kind != "ok" and key == name_key:
            value, kind = "Acme", "ok"
        elif not noisy and kind not in ("ok", "absent"):
            value, kind = None, "absent"
        if key == "email" and kind == "ok":
            value, kind = rng.choice(
                (("billing@acme.test", "ok"), ("ü@例え.jp", "ok"), *((("no-at", "bad"), (" a@b", "bad")) * noisy))
            )
        if key == "email" and kind == "nul":
            value = "a@b\x00"
        if kind == "absent" and rng.random() < 0.5:
            continue
        body[key] = value
        if kind == "bad" or (kind == "absent" and key == name_key):
            early.add(("body", "org_name" if kind == "absent" else key))
        elif kind == "nul":
            nul.add(key)
    if noisy and name_key == "name" and rng.random() < 0.3:
        body["org_name"] = None  # (org_name wins: null, it is missing)
        early.discard(("body", "name"))
        early.add(("body", "org_name"))
        nul.discard("name")
    if "org_name" not in body and "name" not in body:
        early.add(("body", "org_name"))
    plan = plan_code_value(rng, noisy)
    if not noisy or rng.random() > 0.05:
        body["plan_code"] = plan
    if body.get("plan_code") is None or bad_id(body.get("plan_code")):
        early.add(("body", "plan_code"))
    if rng.random() < 0.3:
        body["billing_time"] = rng.choice(("calendar", "anniversary", None, *(("weekly", 5, ["calendar"]) * noisy)))
        if body["billing_time"] not in (None, "calendar", "anniversary"):
            early.add(("body", "billing_time"))
    if noisy and rng.random() < 0.1:
        body["coupon"] = "FREE"
        early.add(("body", "coupon"))
    raw = encode(body, rng)
    content_type = "application/json"
    if noisy and rng.random() < 0.1:
        raw = rng.choice(BAD_BODIES)
    if noisy and rng.random() < 0.08:
        content_type = rng.choice(("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"))
    targets = [
        ("GET", f"/subscriptions/{org}"),
        ("GET", f"/customers/{org}"),
        ("POST", "/customers"),
        ("POST", "/subscriptions"),
    ]
    fault = pick_fault(rng, targets)
    method = "POST" if rng.random() > 0.03 else rng.choice(("GET", "PUT", "DELETE"))
    await run(
        w,
        method,
        mount,
        org,
        "/setup",
        raw,
        content_type,
        auth,
        fault,
        lambda r: expect_setup(w, r, org, mount, body, raw, content_type, early, nul),
    )


async def run(
    w: World,
    method: str,
    mount: str,
    org: str,
    path: str,
    raw: bytes | None,
    content_type: str | None,
    auth: str,
    fault: Fault | None,
    expect: Callable[[httpx.Response], None],
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """Send one request (``fault`` waiting at the edge), check what every answer keeps and the gate, then the route's
    expectation, then Lago's state and the gate's invalidations."""
    before_snapshot = w.fake.snapshot()
    before_invalidated = len(w.invalidated)
    before_model = model_state(w)
    w.calls_before = len(w.edge.calls)
    w.edge.fault, w.edge.fired = fault, None
    w.unseen_write = False
    response = await w.send(
        method, mount, org, path, query=query, body=raw, content_type=content_type, auth=auth, headers=headers
    )
    w.edge.fault = None
    check_always(w, response)
    if gate(w, response, method, path, auth, org):
        expect(response)
    if response.status_code in (401, 403, 405, 413, 415):  # (answered before Lago)
        no_lago(w)
    if model_state(w) == before_model and not w.unseen_write:  # a refused request (or a read) changes nothing
        assert w.fake.snapshot() == before_snapshot, w.why()
    check_lago(w)
    # a setup, plan change or termination Lago applied reaches the gate (invalidate), even behind a lost answer
    for org_id, (_, subscription, _) in before_model.items():
        if w.orgs[org_id].subscription() != subscription:
            assert org_id in w.invalidated[before_invalidated:], w.why(org_id)
    return response


def model_state(w: World) -> dict[str, tuple[Any, ...]]:
    return {
        org_id: ((m.customer, m.email, m.created_by), m.subscription(), frozenset(m.events.items()))
        for org_id, m in w.orgs.items()
    }


def refused_before_lago(w: World, response: httpx.Response, raw: bytes, early: set[tuple[Any, ...]]) -> bool:
    """Whether a setup's or plan change's body was refused before Lago was asked (a body that is no JSON object, or
    fields refused by the route), checked as so: the answer its refusal gives, and no call to Lago."""
    if raw in BAD_BODIES:
        status, loc = whole_body_error(raw)
        assert response.status_code == status, w.why()
        if loc is not None:
            check_422(w, response, {loc})
    elif early:
        check_422(w, response, early)
    else:
        return False
    no_lago(w)
    return True


def expect_setup(
    w: World,
    response: httpx.Response,
    org: str,
    mount: str,
    body: dict[str, Any],
    raw: bytes,
    content_type: str,
    early: set[tuple[Any, ...]],
    nul: set[str],
) -> None:
    model = w.model(org)
    if content_type != "application/json":
        assert response.status_code == 415, w.why()
        return
    if refused_before_lago(w, response, raw, early):
        return
    plan = body["plan_code"]
    if mount == "billing" and plan not in OFFERED:
        check_422(w, response, {("body", "plan_code")})
        assert response.json()["detail"][0]["type"] == "not_offered", w.why()
        no_lago(w)
        return
    fault = w.edge.fired
    if fault is not None and fault.method == "GET":
        check_fault_answer(w, response, fault)
        return
    # the billing layer's refusals, before it writes: what it would write (a new customer's fields, a field the
    # existing customer lacks) that Lago cannot store
    refused = {
        key
        for key in nul
        if (key in ("org_name", "name") and not model.customer)
        or (key == "email" and not model.email)
        or (key == "user_id" and not model.created_by)
    }
    if refused:
        check_422(w, response, {("body",)}, {"org_name" if k == "name" else k for k in refused} | {"metadata"})
        return
    # (the downgrade already waiting, asked again: Lago replaces the pending subscription with its twin)
    w.unseen_write = model.plan is not None and plan == model.next_plan
    # the customer, created or completed
    if fault is not None and fault.method == "POST" and fault.suffix == "/customers":
        check_fault_answer(w, response, fault)
        if fault.applied:
            _customer_written(model, body)
        return
    if plan not in PRICES and not model.customer:  # (a new org's plan is read before its customer is written)
        check_422(w, response, {("body", "plan_code")})
        assert response.json()["detail"][0]["type"] == "not_found", w.why()
        return
    _customer_written(model, body)
    if fault is not None:  # (POST /subscriptions)
        check_fault_answer(w, response, fault)
        if fault.applied and plan in PRICES:
            _subscribed(model, plan)
        return
    if plan not in PRICES:
        check_422(w, response, {("body", "plan_code")})
        assert response.json()["detail"][0]["type"] == "not_found", w.why()
        return
    assert response.status_code == 200, w.why()
    _subscribed(model, plan)
    answer = response.json()
    assert answer["customer"]["external_id"] == org, w.why()
    assert (answer["subscription"]["plan_code"], answer["subscription"]["next_plan_code"]) == model.subscription()


def _customer_written(model: Org, body: dict[str, Any]) -> None:
    model.customer = True
    model.email = model.email or body.get("email") is not None
    model.created_by = model.created_by or body.get("user_id") is not None


def _subscribed(model: Org, plan: str) -> None:
    if model.plan is None:
        model.plan, model.next_plan = plan, None
    elif plan != model.plan:  # (the plan it has: nothing asked of Lago, a pending downgrade stays)
        model.plan, model.next_plan = change_of(model, plan)


async def step_get_subscription(w: World) -> None:
    rng = w.rng
    org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
    fault = pick_fault(rng, [("GET", f"/subscriptions/{org}")])
    method = rng.choice(("GET", "GET", "GET", "HEAD"))

    def expect(response: httpx.Response) -> None:
        model = w.model(org)
        if w.edge.fired is not None:
            check_fault_answer(w, response, w.edge.fired)
            return
        assert fault is None, w.why()  # (the one call this route makes)
        if model.plan is None:
            assert response.status_code == 404, w.why()
            if method == "GET":
                assert response.json()["code"] == "subscription_not_found", w.why()
            return
        assert response.status_code == 200, w.why()
        if method == "GET":
            sub = response.json()["subscription"]
            assert (sub["plan_code"], sub["next_plan_code"]) == model.subscription(), w.why()

    await run(w, method, mount, org, "/subscription", None, None, auth, fault, expect)


async def step_change_plan(w: World) -> None:
    rng = w.rng
    org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
    model = w.model(org)
    noisy = rng.random() < NOISY
    body: dict[str, Any] = {}
    if rng.random() < 0.3 and model.plan is not None:  # (the plan it has, or the one a downgrade waits for)
        body["plan_code"] = rng.choice([p for p in (model.plan, model.next_plan) if p])
    else:
        body["plan_code"] = plan_code_value(rng, noisy)
    if noisy and rng.random() < 0.1:
        del body["plan_code"]
    early: set[tuple[Any, ...]] = set()
    if body.get("plan_code") is None or bad_id(body.get("plan_code")):
        early.add(("body", "plan_code"))
    if noisy and rng.random() < 0.1:
        body["effective"] = "now"
        early.add(("body", "effective"))
    raw = encode(body, rng)
    if noisy and rng.random() < 0.08:
        raw = rng.choice(BAD_BODIES)
    targets = [("GET", f"/subscriptions/{org}"), ("POST", "/subscriptions"), ("DELETE", f"/subscriptions/{org}")]
    fault = pick_fault(rng, targets)

    def expect(response: httpx.Response) -> None:
        if refused_before_lago(w, response, raw, early):
            return
        plan = body["plan_code"]
        fired = w.edge.fired
        if fired is not None and fired.method == "GET":
            check_fault_answer(w, response, fired)
            return
        if mount == "billing" and plan not in OFFERED and plan != model.plan:
            # (the org's own plan gets through: back to it cancels a downgrade; anything else read once, refused)
            check_422(w, response, {("body", "plan_code")})
            assert all(call.startswith("GET ") for call in w.edge.calls[w.calls_before :]), w.why()
            return
        if model.plan is None:
            assert response.status_code == 404 and response.json()["code"] == "subscription_not_found", w.why()
            return
        if plan == model.plan and model.next_plan is None:  # (already on it: nothing asked of Lago)
            assert fired is None, w.why()
        elif plan == model.plan:  # back to its plan: the pending downgrade is canceled
            if fired is not None:
                check_fault_answer(w, response, fired)
                if fired.applied:
                    model.next_plan = None
                return
            model.next_plan = None
        elif fired is not None:  # (POST /subscriptions)
            check_fault_answer(w, response, fired)
            if fired.applied and plan in PRICES:
                model.plan, model.next_plan = change_of(model, plan)
            return
        elif plan not in PRICES:
            check_422(w, response, {("body", "plan_code")})
            return
        else:
            # (the downgrade already waiting, asked again: Lago replaces the pending subscription with its twin)
            w.unseen_write = plan == model.next_plan
            model.plan, model.next_plan = change_of(model, plan)
        assert response.status_code == 200, w.why()
        answer = response.json()
        later = model.next_plan == plan and model.plan != plan
        assert answer["effective"] == ("period_end" if later else "now"), w.why()
        assert (answer["effective_date"] is not None) == later, w.why()
        sub = answer["subscription"]
        assert (sub["plan_code"], sub["next_plan_code"]) == model.subscription(), w.why()

    method = "PUT" if rng.random() > 0.03 else rng.choice(("POST", "PATCH"))
    await run(w, method, mount, org, "/subscription", raw, "application/json", auth, fault, expect)


async def step_terminate(w: World) -> None:
    rng = w.rng
    org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
    model = w.model(org)
    invoice = rng.choice((None, None, "generate", "skip", "skip", "", "SKIP", "none", "skip\x00"))
    query = "" if invoice is None else str(httpx.QueryParams({"on_termination_invoice": invoice}))
    fault = pick_fault(rng, [("GET", f"/subscriptions/{org}"), ("DELETE", f"/subscriptions/{org}")])

    def expect(response: httpx.Response) -> None:
        if invoice not in (None, "generate", "skip"):
            check_422(w, response, {("query", "on_termination_invoice")})
            no_lago(w)
            return
        if invoice == "skip" and mount == "billing":
            assert response.status_code == 403 and response.json()["code"] == "skip_invoice_not_allowed", w.why()
            no_lago(w)
            return
        fired = w.edge.fired
        if fired is not None and fired.method == "GET":
            check_fault_answer(w, response, fired)
            return
        if model.plan is None:
            assert response.status_code == 404 and response.json()["code"] == "subscription_not_found", w.why()
            return
        if fired is not None and not (fired.applied or fired.kind in ("5xx", "timeout", "connect")):
            check_fault_answer(w, response, fired)  # (429, 400, 401: Lago applied nothing)
            return
        if fired is not None and not fired.applied:  # (read back: still there)
            check_fault_answer(w, response, fired)
            return
        assert response.status_code == 200, w.why()  # (an answer lost: read back, it ended)
        assert response.json()["subscription"]["status"] == "terminated", w.why()
        model.plan = model.next_plan = None

    await run(w, "DELETE", mount, org, "/subscription", None, None, auth, fault, expect, query=query)


@dataclass
class Usage:
    """A random ``POST /usage/record`` body and what the model makes of it."""

    body: dict[str, Any]
    early: set[tuple[Any, ...]] = field(default_factory=set)  # the route's own field errors
    before_lago: set[str] = field(default_factory=set)  # refused after the fields' checks, before Lago (["body"])
    late: set[str] = field(default_factory=set)  # refused once the subscription is read (["body"])

    @property
    def code(self) -> str:
        value = self.body.get("event_code")
        return "api_call" if value is None else str(value)


def usage_body(rng: random.Random, noisy: bool) -> Usage:
    """A body of ``POST /usage/record``: valid fields, with refused ones among them when ``noisy``."""
    u = Usage({})
    body = u.body
    roll = rng.random()
    if roll < 0.3:
        body["event_code"] = rng.choice(("api_call", "tokens", "tokens", *(("storage_gb", "ünbilled") * noisy)))
    elif roll < 0.4 and noisy:
        body["event_code"] = rng.choice((*WRONG_TYPES, *BLANKS, "a.b", "a/b", "c" * 256, "tab\tx", " lead", None))
        if body["event_code"] is not None:
            u.early.add(("body", "event_code"))
    roll = rng.random()
    if not noisy:  # (a transaction id of the pool, or none)
        roll = roll * 0.45 if roll < 0.7 else 0.9
    if roll < 0.45:
        body["transaction_id"] = rng.choice(("tx-{}", "tx-ü-{}", "tx.{}", "tx/{}", "{}")).format(rng.randint(0, 6))
    elif roll < 0.53:
        body["transaction_id"] = rng.choice((*WRONG_TYPES, *BLANKS, "t" * 256))
        u.early.add(("body", "transaction_id"))
    elif roll < 0.56:
        body["transaction_id"] = f"tx\x00{rng.randint(0, 6)}"
        u.late.add("transaction_id")
    elif roll < 0.6:
        body["transaction_id"] = None
    roll = rng.random()
    if not noisy:  # (valid properties, or none)
        roll = roll * 0.3 if roll < 0.5 else 0.9
    if roll < 0.3:
        keys = ("gb", "region", "id", "ratio", "nested", "flag", "none", "label", "digits", "org_id")
        values: dict[str, Any] = {
            "gb": rng.randint(0, 10**6),
            "region": "eu-west-1",
            "id": "12345678901234567890123",
            "ratio": 0.5,
            "nested": {"a": [1, "b", {"c": None}]},
            "flag": True,
            "none": None,
            "label": "ü\x01\u2028",
            "digits": "  42 ",
            "org_id": "someone-else",  # (overwritten with the org's own)
        }
        body["properties"] = {key: values[key] for key in rng.sample(keys, rng.randint(0, 4))}
    elif roll < 0.36:
        body["properties"] = rng.choice((5, "x", [], ["a"], True))
        u.early.add(("body", "properties"))
    elif roll < 0.5:
        key = rng.choice(("gb", "seats", "ünits"))
        value = rng.choice(
            (-1, -0.5, 2**53, 10**30, 1e300, "NaN", "-3", "1e400", " -7 ", "Infinity", math.nan, math.inf)
        )
        body["properties"] = {key: value, "ok": 1}
        u.early.add(("body", "properties", key))
    elif roll < 0.53:
        body["properties"] = {"operation_type": "remove"}
        u.early.add(("body", "properties", "operation_type"))
    elif roll < 0.56:
        # (what Lago cannot store or JSON cannot carry, below the top level the route checks)
        body["properties"], named = rng.choice(
            (
                ({"note": "a\x00b"}, "note"),
                ({"nested": {"deep": ["\x00"]}}, "nested"),
                ({"nested": {"a": math.nan}}, "properties"),
                ({"list": [1, math.inf]}, "properties"),
            )
        )
        u.late.add(named)
    elif roll < 0.64:
        body["properties"] = {
            rng.choice(("total_tokens", "input_tokens", "output_tokens")): rng.choice(("abc", 1.5, []))
        }
    elif roll < 0.67:
        body["properties"] = None
    for key, max_length in (("user_id", 255), ("model", 255), ("endpoint", 2048)):
        if rng.random() < 0.6:
            continue
        value, kind = text_value(rng, max_length, noisy)
        body[key] = value
        if kind == "bad":
            u.early.add(("body", key))
        elif kind == "nul":
            u.late.add(key)
    for key in ("tokens", "input_tokens", "output_tokens"):
        roll = 0.7 + (rng.random() * 0.3 * (1 if noisy else 0.6))
        if rng.random() < 0.7:
            continue
        if roll < 0.88:
            body[key] = rng.choice((0, 1, 812, 10**6, 2**53 - 1))
        elif roll < 0.93:
            body[key] = rng.choice((2**53, 10**30))
            u.early.add(("body", key))
        else:
            body[key] = rng.choice((-1, 1.5, "5", True, [], {}))
            u.early.add(("body", key))
    roll = rng.random()
    if not noisy:  # (a valid timestamp, or none)
        roll = roll if roll < 0.2 else 0.9
    if roll < 0.2:
        body["timestamp"] = rng.choice((1_741_953_600, 1_741_953_600.125, "1741953600.5", " 1741953600 ", 0, "0.001"))
        if body["timestamp"] in (0, "0.001"):  # (before the subscriptions start, at NOW: Lago would never bill it)
            u.late.add("timestamp")
    elif roll < 0.24:
        body["timestamp"] = rng.choice((True, [], {}, {"t": 1}))
        u.early.add(("body", "timestamp"))
    elif roll < 0.32:
        body["timestamp"] = rng.choice(("abc", "NaN", "-1", -1, 10**12, "1e12", math.nan, "Infinity", ""))
        u.late.add("timestamp")
    if noisy and rng.random() < 0.1:
        body[rng.choice(("amount", "precise_total_amount_cents", "external_subscription_id"))] = "1"
        u.early.update(
            ("body", k) for k in body if k in ("amount", "precise_total_amount_cents", "external_subscription_id")
        )
    # the token counts of an api_call's properties are read (whole numbers only) when the body gives none
    given = body.get("properties")
    props: dict[str, Any] = given if isinstance(given, dict) else {}
    if (
        u.code == "api_call"
        and not body.get("tokens")
        and all(body.get(k) is None for k in ("input_tokens", "output_tokens"))
    ):
        for key in ("total_tokens", "input_tokens", "output_tokens"):
            if key in props and props[key] in ("abc", 1.5, []):
                u.before_lago.add(key)
    return u


async def step_record(w: World, retry: Retry | None = None) -> None:
    rng = w.rng
    if retry is not None:
        org, mount, auth = retry.org, retry.mount, "allow"
        u = Usage(dict(retry.body))
    else:
        org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
        u = usage_body(rng, rng.random() < NOISY)
    model = w.model(org)
    raw = encode(u.body, rng)
    content_type = rng.choice(("application/json", "application/json; charset=utf-8", "application/vnd.lago+json"))
    if retry is None and rng.random() < 0.03:
        raw = rng.choice((*BAD_BODIES, b"", b"  \n"))
    if retry is None and rng.random() < 0.02:
        raw = encode({**u.body, "properties": {"blob": "x" * MAX_BODY}}, rng)
    if retry is None and rng.random() < 0.02:
        content_type = rng.choice(("text/plain", "application/x-www-form-urlencoded", "application/jsonx"))
    targets = [("GET", f"/subscriptions/{org}"), ("POST", "/api/v1/events"), ("GET", "~/api/v1/events/")]
    fault = pick_fault(rng, targets, 0.3)

    def expect(response: httpx.Response) -> None:
        if content_type not in ("application/json", "application/json; charset=utf-8", "application/vnd.lago+json"):
            assert response.status_code == 415, w.why()
            return
        if len(raw) > MAX_BODY:
            assert response.status_code == 413 and response.json()["code"] == "body_too_large", w.why()
            return
        if raw in BAD_BODIES:
            check_422(w, response, {("body",)})
            no_lago(w)
            return
        empty = not raw.strip()
        if u.early and not empty:
            check_422(w, response, u.early)
            no_lago(w)
            return
        if u.before_lago and not empty:
            check_422(w, response, {("body",)}, u.before_lago)
            no_lago(w)
            return
        fired = w.edge.fired
        if fired is not None and fired.method == "GET" and fired.suffix.endswith(org):
            check_fault_answer(w, response, fired)
            return
        if model.plan is None:
            assert response.status_code == 404 and response.json()["code"] == "subscription_not_found", w.why()
            return
        code = "api_call" if empty else u.code
        if code not in BILLED:
            check_422(w, response, {("body", "event_code")})
            assert response.json()["detail"][0]["type"] == "not_billed", w.why()
            return
        if u.late and not empty:
            check_422(w, response, {("body",)}, u.late)
            return
        body = {} if empty else u.body
        if fired is not None and fired.method == "POST":
            check_fault_answer(w, response, fired)
            if fired.kind in ("429", "5xx", "timeout", "connect", "lost"):
                answer = response.json()
                told = answer["transaction_id"]
                assert body.get("transaction_id") in (None, told), w.why()
                assert isinstance(answer["timestamp"], str), w.why()
                if fired.applied:
                    model.events[told] = code
                w.retries.append(Retry(org, mount, {**body, "transaction_id": told, "timestamp": answer["timestamp"]}))
            return
        answer = response.json()
        event = answer["event"]
        given = body.get("transaction_id")
        if given is not None and given in model.events:  # (the event Lago holds is answered, not this body)
            assert response.status_code == 200 and answer["duplicate"] is True, w.why()
            assert event["transaction_id"] == given, w.why()
            if fired is None and "/" not in given:  # (else this body: Lago's event could not be read back)
                assert event["code"] == model.events[given], w.why()
            return
        assert response.status_code == 201 and answer["duplicate"] is False, w.why()
        assert event["external_subscription_id"] == org and event["code"] == code, w.why()
        assert given is None or event["transaction_id"] == given, w.why()
        assert event["properties"]["org_id"] == org, w.why()
        model.events[event["transaction_id"]] = code
        if rng.random() < 0.3:
            # (a client that never saw this answer sends its body again; the event's timestamp is Lago's ISO text)
            w.retries.append(Retry(org, mount, {**body, "transaction_id": event["transaction_id"]}))

    method = "POST" if retry is not None or rng.random() > 0.03 else rng.choice(("GET", "PUT"))
    await run(w, method, mount, org, "/usage/record", raw, content_type, auth, fault, expect)


async def step_retry(w: World) -> None:
    if not w.retries:
        await step_record(w)
        return
    # (most often the latest: a client retries what it was just told to)
    await step_record(w, w.retries[-1] if w.rng.random() < 0.6 else w.rng.choice(w.retries))


async def step_record_twice_at_once(w: World) -> None:
    """Two identical records of one new transaction id at once (a client's retry racing its first attempt)."""
    org = w.rng.choice(ORGS)
    model = w.model(org)
    tid = f"race-{len(w.trail)}"
    raw = json.dumps({"transaction_id": tid, "user_id": "ada", "tokens": 3}).encode()
    answers: list[httpx.Response] = []

    async def one() -> None:
        answers.append(await w.send("POST", "ops", org, "/usage/record", body=raw))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(one)
        tasks.start_soon(one)
    for response in answers:
        check_always(w, response)
    statuses = sorted(r.status_code for r in answers)
    if model.plan is None:
        assert statuses == [404, 404], w.why()
    else:
        assert statuses == [200, 201], w.why()
        model.events[tid] = "api_call"
    check_lago(w)


async def step_current_usage(w: World) -> None:
    rng = w.rng
    org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
    model = w.model(org)
    metric = rng.choice((None, None, "", "api_call", "tokens", "storage_gb", "nope", "a.b", " x", "ü"))
    query = "" if metric is None else str(httpx.QueryParams({"billable_metric_code": metric}))
    fault = pick_fault(rng, [("GET", "/current_usage")])
    method = rng.choice(("GET", "GET", "GET", "HEAD"))

    def expect(response: httpx.Response) -> None:
        if metric and bad_id(metric):
            check_422(w, response, {("query", "billable_metric_code")})
            no_lago(w)
            return
        if w.edge.fired is not None:
            check_fault_answer(w, response, w.edge.fired)
            return
        if model.plan is None:
            assert response.status_code == 404, w.why()
            if method == "GET":
                assert response.json()["code"] == "subscription_not_found", w.why()
            return
        if metric and metric not in BILLED:
            assert response.status_code == 404, w.why()
            return
        assert response.status_code == 200, w.why()
        if method == "GET":
            usage = response.json()["usage"]
            assert isinstance(usage, dict) and "charges_usage" in usage, w.why()

    await run(w, method, mount, org, "/usage/current", None, None, auth, fault, expect, query=query)


async def step_invoices(w: World) -> None:
    rng = w.rng
    org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
    model = w.model(org)
    limit = rng.choice((None, None, "1", "2", "10", "100", "0", "101", "-1", "abc", "", "²", "1" * 5000, " 5", "007"))
    page = rng.choice((None, None, "1", "2", "3", "0", "2147483647", "2147483648", "x", "1.5"))
    params = [("limit", limit)] if limit is not None else []
    if page is not None:
        params.append(("page", page))
    if rng.random() < 0.15:  # (a parameter given twice: the last one counts, as Starlette reads a query)
        params.insert(0, (rng.choice(("limit", "page")), rng.choice(("5", "0", "x"))))
    if rng.random() < 0.15:  # (parameters the route does not read)
        params.append(rng.choice((("ü", "1"), ("x", "\x00"), ("limit[]", "5"), ("", "z"), ("per_page", "1000"))))
    query = str(httpx.QueryParams(tuple(params))) if params else ""
    limit = next((v for k, v in reversed(params) if k == "limit"), None)
    page = next((v for k, v in reversed(params) if k == "page"), None)
    fault = pick_fault(rng, [("GET", f"/customers/{org}"), ("GET", "/invoices")])
    method = rng.choice(("GET", "GET", "GET", "HEAD"))

    def ok(value: str | None, maximum: int) -> bool:
        if value is None:
            return True
        return value.isascii() and value.isdigit() and len(value) <= 12 and 1 <= int(value) <= maximum

    def expect(response: httpx.Response) -> None:
        if not ok(limit, 100):
            check_422(w, response, {("query", "limit")})
            no_lago(w)
            return
        if not ok(page, 2**31 - 1):
            check_422(w, response, {("query", "page")})
            no_lago(w)
            return
        if w.edge.fired is not None:
            check_fault_answer(w, response, w.edge.fired)
            return
        if not model.customer:
            assert response.status_code == 404, w.why()
            if method == "GET":
                assert response.json()["code"] == "customer_not_found", w.why()
            return
        assert response.status_code == 200, w.why()
        if method == "HEAD":
            return
        answer = response.json()
        held = [i for i in w.fake.invoices if i["customer"]["external_id"] == org]
        per_page, number = int(limit or 10), int(page or 1)
        assert answer["meta"]["total_count"] == len(held) and answer["meta"]["page"] == number, w.why()
        assert len(answer["invoices"]) == max(0, min(per_page, len(held) - (number - 1) * per_page)), w.why()

    await run(w, method, mount, org, "/invoices", None, None, auth, fault, expect, query=query)


#: Accept headers and whether each asks for the HTML page (a browser's does).
ACCEPTS = (
    ("", False),
    ("application/json", False),
    ("text/html", True),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
    ("text/html;q=0.5, application/json", False),
    ("application/json;q=0.2, text/html;q=0.9", True),
    ("*/*", False),
    ("text/html;q=0", False),
)


async def step_dashboard(w: World) -> None:
    rng = w.rng
    org, mount, auth = pick_org(w), rng.choice(("billing", "ops")), pick_auth(rng)
    model = w.model(org)
    accept, browser = rng.choice(ACCEPTS)
    fmt = rng.choice((None, None, None, "html", "json", "HTML", "", "xml"))
    query = "" if fmt is None else str(httpx.QueryParams({"format": fmt}))
    fault = pick_fault(rng, [("GET", f"/subscriptions/{org}"), ("GET", "/current_usage")])
    method = rng.choice(("GET", "GET", "GET", "HEAD"))
    html = fmt == "html" or (fmt is None and browser)

    def expect(response: httpx.Response) -> None:
        if fmt not in (None, "html", "json"):
            check_422(w, response, {("query", "format")})
            no_lago(w)
            return
        if w.edge.fired is not None:
            check_fault_answer(w, response, w.edge.fired)
            return
        assert response.status_code == (404 if model.plan is None else 200), w.why()
        kind = response.headers["content-type"]
        assert kind.startswith("text/html" if html else "application/json"), w.why()
        if html:
            assert response.headers["x-frame-options"] == "DENY", w.why()
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"], w.why()
        if method == "HEAD" or model.plan is None:
            return
        if html:
            assert "<script" not in response.text.lower() and escape(org) in response.text, w.why()
            return
        data = response.json()
        assert data["org_id"] == org, w.why()
        sub = data["subscription"]
        assert (sub["plan_code"], sub["next_plan_code"]) == model.subscription(), w.why()
        assert {m["code"] for m in data["metrics"]} <= BILLED, w.why()
        limits = PLAN_LIMITS.get(str(model.plan), {})  # (the limits of the plan the org is on, not the next one)
        assert {limit["name"]: limit["limit"] for limit in data["limits"]} == limits, w.why()

    await run(
        w, method, mount, org, "/dashboard", None, None, auth, fault, expect, query=query, headers={"Accept": accept}
    )


async def step_wrong_method(w: World) -> None:
    rng = w.rng
    path = rng.choice(list(ALLOW))
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
    method = rng.choice([m for m in methods if m not in ALLOW[path]])
    await run(
        w,
        method,
        rng.choice(("billing", "ops")),
        pick_org(w),
        path,
        b"{}",
        "application/json",
        pick_auth(rng),
        None,
        lambda r: None,
    )


STEPS_BY_WEIGHT = (
    (step_setup, 14),
    (step_get_subscription, 6),
    (step_change_plan, 12),
    (step_terminate, 6),
    (step_record, 22),
    (step_retry, 8),
    (step_record_twice_at_once, 2),
    (step_current_usage, 6),
    (step_invoices, 6),
    (step_dashboard, 8),
    (step_wrong_method, 3),
)


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_sequences_of_billing_requests_keep_the_documented_answers_and_lago_state(seed: int) -> None:
    """From a fixed seed, a sequence of requests of every route (random bodies, queries, authorizations and Lago
    faults) answers as documented, and leaves Lago as the model says after every step."""
    async with world(seed) as w:
        steps, weights = zip(*STEPS_BY_WEIGHT, strict=True)
        for _ in range(STEPS):
            try:
                await w.rng.choices(steps, weights=weights)[0](w)
            except AssertionError:
                raise
            except Exception as exc:  # (an answer of another shape than the model's: said with the steps)
                raise AssertionError(f"{type(exc).__name__}: {exc}\n{w.why()}") from exc


# ------------------------------------------------------------------------- what the seeds found, kept as cases


async def _setup(w: World, org: str, plan: str) -> None:
    body = json.dumps({"org_name": "Acme", "plan_code": plan}).encode()
    response = await w.send("POST", "ops", org, "/setup", body=body)
    assert response.status_code == 200, response.text


async def test_a_count_past_2_53_is_refused_for_every_event_code_not_only_api_calls() -> None:
    """``tokens``/``input_tokens``/``output_tokens`` past 2**53 - 1 with an ``event_code`` other than the API-call one
    (seeds 1, 3, 4, 5, 8, 9, 10, 12): the route put the count in the event's properties unchecked (only the API-call
    event's counts were bounded, and the same number as a property was refused), so Lago stored a number it cannot
    sum and the org's period could no longer be priced. Now a 422 at the field, and nothing reaches Lago."""
    async with world(0) as w:
        await _setup(w, "org_a", "starter")
        for key in ("tokens", "input_tokens", "output_tokens"):
            for code in ("tokens", "api_call"):
                body = json.dumps({"event_code": code, key: 10**30}).encode()
                calls = len(w.edge.calls)
                response = await w.send("POST", "ops", "org_a", "/usage/record", body=body)
                assert response.status_code == 422, response.text
                [error] = response.json()["detail"]
                assert error["loc"] == ["body", key] and error["type"] == "less_than_equal", error
                assert len(w.edge.calls) == calls
        largest = json.dumps({"event_code": "tokens", "tokens": 2**53 - 1}).encode()
        assert (await w.send("POST", "ops", "org_a", "/usage/record", body=largest)).status_code == 201
        assert [e["properties"]["tokens"] for e in w.fake.events] == [2**53 - 1]


@pytest.mark.parametrize(
    ("method", "path", "body", "target"),
    [
        ("PUT", "/subscription", {"plan_code": "pro"}, ("POST", "/subscriptions")),
        ("PUT", "/subscription", {"plan_code": "basic"}, ("POST", "/subscriptions")),
        ("POST", "/setup", {"org_name": "Acme", "plan_code": "pro"}, ("POST", "/subscriptions")),
    ],
)
async def test_a_plan_change_whose_answer_was_lost_still_reaches_the_gate(
    method: str, path: str, body: dict[str, Any], target: tuple[str, str]
) -> None:
    """A setup or plan change Lago applied whose answer was lost (seeds 10, 11, 12; in 12 a downgrade by ``POST
    /setup``): the route answered 503 without calling ``invalidate``, so the quota gate kept deciding on the old plan
    until its TTL (an org that had just upgraded refused at its old limit) unless the caller happened to retry. The
    billing layer invalidates its own gate whether Lago answered or not; the routes' ``invalidate`` now does too."""
    async with world(0) as w:
        await _setup(w, "org_a", "starter")
        w.invalidated.clear()
        w.edge.fault = Fault(*target, kind="lost")
        response = await w.send(method, "ops", "org_a", path, body=json.dumps(body).encode())
        assert response.status_code == 503, response.text
        assert w.edge.fired is not None
        [active] = [s for s in w.fake.subscriptions if s["status"] == "active"]
        assert body["plan_code"] in (active["plan_code"], active["next_plan_code"])  # (Lago applied it)
        assert w.invalidated == ["org_a"]


async def test_a_write_lago_refused_outright_still_answers_as_before() -> None:
    """A plan change Lago throttled (429: it applied nothing) keeps its answer, and the gate is not told: only an
    answer that may hide an applied write (a 503) invalidates the org's quota state."""
    async with world(0) as w:
        await _setup(w, "org_a", "starter")
        w.invalidated.clear()
        w.edge.fault = Fault("POST", "/subscriptions", kind="429", retry_after="2")
        response = await w.send("PUT", "ops", "org_a", "/subscription", body=b'{"plan_code": "pro"}')
        assert response.status_code == 429 and response.headers["retry-after"] == "2", response.text
        [active] = [s for s in w.fake.subscriptions if s["status"] == "active"]
        assert active["plan_code"] == "starter"
        assert w.invalidated == []


async def test_a_setup_of_a_plan_lago_lacks_leaves_no_customer_behind() -> None:
    """``POST /setup`` with a plan code Lago does not have (a typo on operator routes, or a code in ``plans=`` that
    Lago lacks) is a 422 "Lago has no plan" and writes nothing: the org's customer was created first, then ``GET
    /invoices`` answered 200 with no invoices instead of 404 "call /setup first", and Lago kept a customer that never
    got a subscription."""
    async with world(0) as w:
        body = json.dumps({"org_name": "Acme", "plan_code": "nope"}).encode()
        response = await w.send("POST", "ops", "org_a", "/setup", body=body)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "plan_code"]
        assert w.fake.customers == []
