"""billing_routes() seen by a legitimate admin of one org who wants more than its own billing, or wants to make the
routes expensive for everyone: a burst of the same read of one org (a dashboard polled from many tabs, a script) is
one read of Lago, not one per request (Lago Cloud's rate limit is per Lago organization, shared by every tenant and
by the quota gate's own reads); bursts never share between orgs, nor between different queries; a write through the
routes is seen by every read that comes after it; a shared read whose request went away hands the read on.

Real ASGI apps through ``httpx.ASGITransport``, Lago through the emulator (``FakeLago``); a request is held at
Lago's door by an ASGI middleware of the emulator, and released once every request is blocked
(``anyio.wait_all_tasks_blocked``: no sleeps).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "review-routes-tenancy-key"
BASE = "/billing/organizations"
ORGS = ("org_acme", "org_bravo")


def admin_of(request: Request, org_id: str) -> bool:
    return org_id in request.headers.get("x-admin-of", "").split(",")


def headers(org_id: str, **more: str) -> dict[str, str]:
    return {"X-Admin-Of": org_id, **more}


@dataclass
class Door:
    """An ASGI middleware in front of the emulator: counts each Lago request by ``METHOD path`` when it arrives, and
    holds the GETs for which ``hold`` is true until ``opened`` is set."""

    hold: Callable[[str], bool] = lambda path: False
    opened: anyio.Event = field(default_factory=anyio.Event)
    seen: Counter[str] = field(default_factory=Counter)

    def __call__(self, app: ASGIApp) -> ASGIApp:
        async def held(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.seen[f"{scope['method']} {scope['path']}"] += 1
                if scope["method"] == "GET" and self.hold(scope["path"]):
                    await self.opened.wait()
            await app(scope, receive, send)

        return held

    def reads(self) -> int:
        return sum(n for key, n in self.seen.items() if key.startswith("GET "))


@dataclass
class Env:
    fake: FakeLago
    door: Door
    client: httpx.AsyncClient


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", name="Starter", amount_cents=1000, charges=[{"billable_metric_code": "api_call"}])
    fake.add_plan("pro", name="Pro", amount_cents=5000, charges=[{"billable_metric_code": "api_call"}])
    for org_id, plan in zip(ORGS, ("starter", "pro"), strict=True):
        fake.add_customer(org_id, name=org_id.title())
        fake.add_subscription(org_id, plan)
        fake.add_invoice(org_id, number=f"{org_id}-001")
    door = Door()
    fake.add_middleware(door)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=admin_of)
        app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield Env(fake, door, client)


async def _burst(env: Env, requests: list[tuple[str, str, dict[str, str]]]) -> list[httpx.Response]:
    """Send every request at once, each held at Lago's door until all of them are waiting (for Lago or for a read
    another request made), then open the door."""
    answers: dict[int, httpx.Response] = {}

    async def one(n: int, method: str, url: str, extra: dict[str, str]) -> None:
        answers[n] = await env.client.request(method, url, headers=extra)

    with anyio.fail_after(20):  # (a guard against a hang, far above the milliseconds this takes)
        async with anyio.create_task_group() as group:
            for n, (method, url, extra) in enumerate(requests):
                group.start_soon(one, n, method, url, extra)
            await anyio.wait_all_tasks_blocked()
            env.door.opened.set()
    return [answers[n] for n in range(len(requests))]


# ------------------------------------------------------------------------------ a burst costs Lago one read


@pytest.mark.parametrize(
    ("path", "lago_reads"),
    [("dashboard", 2), ("usage/current", 1), ("subscription", 1), ("invoices", 2)],
)
async def test_a_burst_of_one_orgs_read_is_one_read_of_lago(env: Env, path: str, lago_reads: int) -> None:
    """Twelve tabs (or a script) asking for the same org's dashboard at once cost Lago 24 reads: every request read
    Lago itself. Lago Cloud limits reads to 50 a second per Lago *organization* (all API keys): one org's admin could
    spend the budget of every org, and of the quota gate's own refreshes (their 429s). Requests of the same read of
    the same org in flight together share one read of Lago."""
    env.door.hold = lambda lago_path: True
    url = f"{BASE}/org_acme/{path}"
    asks = [("GET", url, headers("org_acme")) for _ in range(10)]
    asks += [("HEAD", url, headers("org_acme")), ("GET", url, headers("org_acme", Accept="text/html"))]
    answers = await _burst(env, asks)
    assert [a.status_code for a in answers] == [200] * len(asks), [a.text for a in answers]
    assert env.door.reads() == lago_reads, env.door.seen
    first = answers[0].json()
    assert all(a.json() == first for a in answers[1:10])  # every JSON answer is the org's own, whole
    assert answers[-1].headers["content-type"].startswith("text/html") == (path == "dashboard")
    assert all(a.headers["cache-control"] == "no-store" for a in answers)


async def test_bursts_of_two_orgs_never_share_a_read(env: Env) -> None:
    """The reads of org A's burst are never another org's answer, even in flight together."""
    env.door.hold = lambda lago_path: True
    asks = [
        ("GET", f"{BASE}/{org}/{path}", headers(org))
        for _ in range(3)
        for org in ORGS
        for path in ("dashboard", "invoices", "subscription")
    ]
    answers = await _burst(env, asks)
    assert [a.status_code for a in answers] == [200] * len(asks)
    for (_, url, extra), answer in zip(asks, answers, strict=True):
        org = extra["X-Admin-Of"]
        body = answer.json()
        if url.endswith("/dashboard"):
            assert body["org_id"] == org and body["subscription"]["external_id"] == org
        elif url.endswith("/invoices"):
            assert [i["number"] for i in body["invoices"]] == [f"{org}-001"]
        else:
            assert body["subscription"]["external_customer_id"] == org
    # per org: dashboard 2 (subscription, usage), invoices 2 (customer, list), subscription 1 (the dashboard's)
    assert env.door.reads() == 2 * 4 + 2, env.door.seen


async def test_reads_with_different_queries_are_not_shared(env: Env) -> None:
    """``?page=``/``?limit=`` of the invoices and ``?billable_metric_code=`` of the usage are other reads."""
    env.door.hold = lambda lago_path: True
    asks = [
        ("GET", f"{BASE}/org_acme/invoices?page=1", headers("org_acme")),
        ("GET", f"{BASE}/org_acme/invoices?page=2", headers("org_acme")),
        ("GET", f"{BASE}/org_acme/invoices?limit=1", headers("org_acme")),
        ("GET", f"{BASE}/org_acme/usage/current", headers("org_acme")),
        ("GET", f"{BASE}/org_acme/usage/current?billable_metric_code=api_call", headers("org_acme")),
    ]
    answers = await _burst(env, asks)
    assert [a.status_code for a in answers] == [200] * len(asks), [a.text for a in answers]
    assert [len(a.json()["invoices"]) for a in answers[:3]] == [1, 0, 1]
    assert env.door.seen["GET /api/v1/invoices"] == 3
    assert env.door.seen["GET /api/v1/customers/org_acme/current_usage"] == 2


async def test_a_denied_request_never_joins_a_read_in_flight(env: Env) -> None:
    """``authorize`` is asked for every request, also while the org's read is in flight: org B's admin asking for
    org A's dashboard then is still a 403, not A's data."""
    env.door.hold = lambda lago_path: True
    url = f"{BASE}/org_acme/dashboard"
    answers = await _burst(env, [("GET", url, headers("org_acme")), ("GET", url, headers("org_bravo"))])
    assert [a.status_code for a in answers] == [200, 403]
    assert "org_acme" not in answers[1].text


# ----------------------------------------------------------------------- what a shared read must not change


async def test_a_read_after_a_write_reads_lago_again(env: Env) -> None:
    """An org's usage read is in flight (held at Lago); the org records an event through the routes; a read asked
    after that write answered must show the event: it starts its own read, it does not take the older one's."""
    usage_path = "/api/v1/customers/org_acme/current_usage"
    env.door.hold = lambda lago_path: lago_path == usage_path
    url = f"{BASE}/org_acme/usage/current"
    answers: list[httpx.Response] = []

    async def read() -> None:
        answers.append(await env.client.get(url, headers=headers("org_acme")))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            recorded = await env.client.post(
                f"{BASE}/org_acme/usage/record", json={"transaction_id": "tx_review_1"}, headers=headers("org_acme")
            )
            assert recorded.status_code == 201, recorded.text
            group.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            env.door.opened.set()
    assert [a.status_code for a in answers] == [200, 200]
    events = [sum(c["events_count"] for c in a.json()["usage"]["charges_usage"]) for a in answers]
    assert events[1] == 1  # (the first read may show it or not: it was in flight during the write)
    assert env.door.seen[f"GET {usage_path}"] == 2


async def test_a_read_whose_request_went_away_is_handed_on(env: Env) -> None:
    """The request whose read the others wait for is cancelled (its client disconnected): a request waiting for it
    reads Lago itself and is answered, it neither hangs nor fails."""
    env.door.hold = lambda lago_path: True
    url = f"{BASE}/org_acme/dashboard"
    answers: list[httpx.Response] = []

    async def read() -> None:
        answers.append(await env.client.get(url, headers=headers("org_acme")))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as outer:
            async with anyio.create_task_group() as first:
                first.start_soon(read)
                await anyio.wait_all_tasks_blocked()
                outer.start_soon(read)
                await anyio.wait_all_tasks_blocked()
                first.cancel_scope.cancel()
            await anyio.wait_all_tasks_blocked()
            env.door.opened.set()
    assert [a.status_code for a in answers] == [200]
    assert answers[0].json()["org_id"] == "org_acme"


async def test_a_lago_outage_in_a_burst_is_one_failed_read_answered_to_all(env: Env) -> None:
    """Lago down: the burst's requests all get the 503 (with Retry-After), from one read of Lago, not one each."""
    env.fake.faults.inject(503, count=100)
    env.door.hold = lambda lago_path: True
    url = f"{BASE}/org_acme/usage/current"
    answers = await _burst(env, [("GET", url, headers("org_acme")) for _ in range(6)])
    assert [a.status_code for a in answers] == [503] * 6, [a.text for a in answers]
    assert all(a.headers["retry-after"] for a in answers)
    assert len([r for r in env.fake.requests if r.method == "GET"]) == 1, env.fake.requests


# -------------------------------------------------------------------------- Lago paths an org admin controls


@pytest.mark.parametrize("transaction_id", [".", ".."])
async def test_a_retry_never_reads_a_lago_path_the_transaction_id_makes(env: Env, transaction_id: str) -> None:
    """A retry (a duplicate ``transaction_id``) is answered with the event Lago holds, read back with ``GET
    /events/{transaction_id}``. A transaction id of ``.`` or ``..`` is a dot segment there (percent-encoding leaves
    dots as they are, and the URL is normalized): the routes read ``GET /api/v1/events``, the list of every org's
    events, or ``GET /api/v1``. The retry is answered without reading back such an id."""
    url = f"{BASE}/org_acme/usage/record"
    body = {"transaction_id": transaction_id, "timestamp": 4_000_000_000}  # (after its start)
    first = await env.client.post(url, json=body, headers=headers("org_acme"))
    assert first.status_code == 201, first.text
    again = await env.client.post(url, json=body, headers=headers("org_acme"))
    assert again.status_code == 200, again.text
    assert again.json()["duplicate"] is True
    assert again.json()["event"]["transaction_id"] == transaction_id
    reads = {key for key in env.door.seen if key.startswith("GET ")}
    assert reads <= {"GET /api/v1/subscriptions/org_acme"}, env.door.seen
