"""billing_routes() exposed to an app's customers (browsers authenticated by a session cookie, API clients): JSON
bodies only (no cross-site form or text/plain POST), malformed JSON a 422, bodies capped, answers not cached, plans
limited to those offered. The threat model is the README's: ``authorize`` lets an org's admin manage that org's
billing, an org's admin must not lower its own bill, and a third-party site must not act with a logged-in admin's
cookie."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "review-secret-api-key"
BASE = "/billing/organizations"
ADMIN = {"X-Admin-Of": "org_acme"}


def admin_of(request: Request, org_id: str) -> bool:
    """Stands for a cookie session: the header lists the orgs the (logged-in) caller manages."""
    return org_id in request.headers.get("x-admin-of", "").split(",")


@dataclass
class Env:
    fake: FakeLago
    client: httpx.AsyncClient


def _seed(fake: FakeLago) -> None:
    fake.add_billable_metric("api_call")
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="total_tokens")
    charges = [
        {"billable_metric_code": "api_call", "properties": {"amount": "0.01"}},
        {"billable_metric_code": "tokens", "properties": {"amount": "0.001"}},
    ]
    fake.add_plan("starter", name="Starter", amount_cents=1000, charges=charges)
    fake.add_plan("pro", name="Pro", amount_cents=5000, charges=charges)
    # a plan the operator keeps for itself (staff, partners, one customer's negotiated price): not for sale
    fake.add_plan("internal_free", name="Internal", amount_cents=0, charges=[])


async def _make_env(fake: FakeLago, **route_options: object) -> AsyncIterator[Env]:
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=admin_of, **route_options)  # type: ignore[arg-type]
        app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is observed as a 500
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield Env(fake, client)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    fake = FakeLago(api_key=API_KEY)
    _seed(fake)
    async for value in _make_env(fake):
        yield value


async def _setup(env: Env, plan_code: str = "starter") -> None:
    body = {"org_name": "Acme", "plan_code": plan_code}
    response = await env.client.post(f"{BASE}/org_acme/setup", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text


def _active_plan(fake: FakeLago) -> str:
    [active] = [s for s in fake.subscriptions if s["status"] == "active"]
    return str(active["plan_code"])


# ---------------------------------------------------------------------------------------------------- CSRF
#
# A <form method=post enctype=text/plain> or fetch(url, {method: "POST", mode: "no-cors", credentials: "include",
# body: "..."}) on any site is a "simple" request: no CORS preflight, the admin's cookie attached (same-site
# subdomains, SameSite=None cookies, or the 2-minute Lax+POST window). _json_object parses any body as JSON whatever
# its Content-Type, so such a request is processed. FastAPI refuses non-JSON content types for JSON bodies for
# exactly this reason (CVE-2021-32677).


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", None])
async def test_csrf_text_plain_setup_cannot_change_the_plan(env: Env, content_type: str | None) -> None:
    """A cross-site text/plain form (name '{"plan_code":"pro","org_name":"x', value '"}') must not upgrade the
    org: only application/json bodies are accepted (415 otherwise)."""
    await _setup(env, "starter")
    headers = {**ADMIN, **({"Content-Type": content_type} if content_type else {})}
    response = await env.client.post(
        f"{BASE}/org_acme/setup", content=b'{"plan_code":"pro","org_name":"x="}', headers=headers
    )
    assert response.status_code == 415, response.text
    assert _active_plan(env.fake) == "starter"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b""),  # <form method=post> with no fields
        ("text/plain", b'{"transaction_id":"x=","tokens":100000}'),  # <form enctype=text/plain>
        (None, b""),  # navigator.sendBeacon(url): credentials included, no preflight
    ],
)
async def test_csrf_simple_post_records_no_usage(env: Env, content_type: str | None, body: bytes) -> None:
    """Usage recorded from another site bills the org: a simple (non-JSON) POST must be refused (415)."""
    await _setup(env)
    headers = {**ADMIN, **({"Content-Type": content_type} if content_type else {})}
    response = await env.client.post(f"{BASE}/org_acme/usage/record", content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert env.fake.events == []


# ------------------------------------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "org_acme/usage/record", b"[" * 30_000),  # RecursionError is not a ValueError (under 64 KiB)
        ("POST", "org_acme/usage/record", b'{"properties": {"k": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}"),
        ("POST", "org_acme/usage/record", b'{"\\ud800": 1}'),  # a lone surrogate in the key echoed in "loc"
        ("PUT", "org_acme/subscription", b'{"plan_code": "\\ud800"}'),  # passes validate_id, not encodable
        ("POST", "org_new/setup", b'{"org_name": "\\ud800", "plan_code": "starter"}'),  # a new customer's name
    ],
    ids=["deep-array", "deep-properties", "surrogate-key", "surrogate-plan-code", "surrogate-org-name"],
)
async def test_malformed_json_is_a_422_not_a_500(env: Env, method: str, path: str, body: bytes) -> None:
    """Deeply nested JSON and lone surrogates (valid JSON escapes, not valid Unicode) are client errors."""
    await _setup(env)
    before = len(env.fake.requests)
    headers = {"X-Admin-Of": "org_acme,org_new", "Content-Type": "application/json"}
    response = await env.client.request(method, f"{BASE}/{path}", content=body, headers=headers)
    assert response.status_code == 422, (response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith("application/json")
    assert len(env.fake.requests) == before  # nothing sent to Lago


async def test_oversized_body_is_refused_before_reaching_lago(env: Env) -> None:
    """The routes buffer any body whole (request.body()) and forward properties of any size to Lago as an event:
    a 16 MiB body must be a 413 (the webhook receiver caps at 10 MiB), not a 16 MiB event billed to the org."""
    await _setup(env)
    body = b'{"properties": {"blob": "' + b"a" * (16 * 1024 * 1024) + b'"}}'
    response = await env.client.post(
        f"{BASE}/org_acme/usage/record", content=body, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert response.status_code == 413, (response.status_code, response.text[:200])
    assert env.fake.events == []


# ------------------------------------------------------------------------------------------------- caching


@pytest.mark.parametrize("path", ["/subscription", "/usage/current", "/invoices"])
async def test_per_org_billing_reads_are_not_cacheable(env: Env, path: str) -> None:
    """The dashboard is sent with Cache-Control: no-store; the same per-org data (subscription, current usage and
    amount, invoices with their PDF URLs) from the other GET routes is sent with no Cache-Control at all, so the
    browser's disk cache (shared computers, back button after logout) and caches on the way may keep it."""
    await _setup(env)
    env.fake.add_invoice("org_acme", total_amount_cents=100)
    response = await env.client.get(f"{BASE}/org_acme{path}", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert "no-store" in response.headers.get("cache-control", ""), dict(response.headers)


# --------------------------------------------------------------------------------------------- plan choice


async def test_org_admin_cannot_pick_a_plan_that_is_not_offered() -> None:
    """Any plan code in the Lago account is accepted from the org's admin (setup and PUT /subscription), so an admin
    subscribes the org to a $0 internal plan or another customer's negotiated plan: it lowers the org's own bill,
    which the routes otherwise refuse (skip invoice, negative usage). There must be a way to say which plans are
    offered (proposed: billing_routes(plans=...)); a plan outside it is a 422 and Lago is not asked."""
    fake = FakeLago(api_key=API_KEY)
    _seed(fake)
    async for env in _make_env(fake, plans=("starter", "pro")):
        await _setup(env, "starter")
        put = await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "internal_free"}, headers=ADMIN)
        assert put.status_code == 422, put.text
        new = await env.client.post(
            f"{BASE}/org_new/setup",
            json={"org_name": "New", "plan_code": "internal_free"},
            headers={"X-Admin-Of": "org_new"},
        )
        assert new.status_code == 422, new.text
        assert all(s["plan_code"] != "internal_free" for s in env.fake.subscriptions)
