"""billing_routes(): the seed's org billing endpoints against the Lago emulator, with authorization and errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from _quota_app import seed as quota_seed
from lago_org_billing import BillingSettings, ConfigurationError, LagoClient, OrgBilling
from lago_org_billing._dashboard import wants_html
from lago_org_billing._routes import NO_AUTHORIZE_DETAIL, BillingRouter, billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "secret-api-key-never-shown"
BASE = "/billing/organizations"
ADMIN = {"X-Admin-Of": "org_acme"}


def seed(fake: FakeLago) -> None:
    """Metrics grouped by user and model, a cheap and an expensive plan."""
    fake.add_billable_metric("api_call")
    fake.add_billable_metric("tokens", aggregation_type="sum_agg", field_name="total_tokens")
    grouped = {"pricing_group_keys": ["user_id", "model"]}
    charges = [
        {"billable_metric_code": "api_call", "properties": {"amount": "0.01", **grouped}},
        {"billable_metric_code": "tokens", "properties": {"amount": "0.001", **grouped}},
    ]
    fake.add_plan("starter", name="Starter", amount_cents=1000, charges=charges)
    fake.add_plan("pro", name="Pro", amount_cents=5000, charges=charges)


@pytest.fixture
def fake() -> FakeLago:
    """A seeded Lago emulator."""
    fake = FakeLago(api_key=API_KEY)
    seed(fake)
    return fake


@dataclass
class Env:
    """The app under test and what it touched."""

    fake: FakeLago
    client: httpx.AsyncClient
    router: BillingRouter
    invalidated: list[str] = field(default_factory=list)


def admin_of(request: Request, org_id: str) -> bool:
    """The test's authorization rule: the X-Admin-Of header lists the orgs the caller manages."""
    return org_id in request.headers.get("x-admin-of", "").split(",")


@pytest.fixture
async def env(fake: FakeLago) -> AsyncIterator[Env]:
    """billing_routes mounted under /billing of a Starlette app, talking to the emulator."""
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=API_KEY,
        max_retries=0,
        plan_limits={"starter": {"max_api_calls": 10, "max_tokens": 1000}, "pro": {"max_api_calls": 100}},
    )
    invalidated: list[str] = []

    async def invalidate(org_id: str) -> None:
        invalidated.append(org_id)

    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=admin_of, invalidate=invalidate)
        app = Starlette(routes=[Mount("/billing", app=router)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            yield Env(fake, client, router, invalidated)


async def setup_acme(env: Env, plan_code: str = "starter") -> httpx.Response:
    """POST /setup for org_acme."""
    body = {"org_name": "Acme", "plan_code": plan_code, "email": "billing@acme.test", "user_id": "ada"}
    return await env.client.post(f"{BASE}/org_acme/setup", json=body, headers=ADMIN)


ROUTES = [
    ("POST", "/setup"),
    ("GET", "/subscription"),
    ("PUT", "/subscription"),
    ("DELETE", "/subscription"),
    ("POST", "/usage/record"),
    ("GET", "/usage/current"),
    ("GET", "/invoices"),
    ("GET", "/dashboard"),
]


# ------------------------------------------------------------------------------------------- authorization


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_default_authorization_denies_everything(fake: FakeLago, method: str, path: str) -> None:
    """Without authorize=, every route answers 403 saying how to allow callers, and Lago is never called."""
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        app = Starlette(routes=[Mount("/billing", app=billing_routes(OrgBilling(client=lago)))])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            response = await client.request(method, f"{BASE}/org_acme{path}", json={"plan_code": "pro"}, headers=ADMIN)
    assert response.status_code == 403
    assert response.json()["detail"] == NO_AUTHORIZE_DETAIL
    assert "authorize=" in NO_AUTHORIZE_DETAIL
    assert fake.requests == []


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_callers_of_other_orgs_are_forbidden(env: Env, method: str, path: str) -> None:
    """The authorize callback is asked for the org in the path: an admin of another org gets 403."""
    await setup_acme(env)
    before = len(env.fake.requests)
    response = await env.client.request(
        method, f"{BASE}/org_acme{path}", json={"plan_code": "pro"}, headers={"X-Admin-Of": "org_other"}
    )
    assert response.status_code == 403
    assert response.json() == {"detail": "You may not manage this org's billing."}
    assert len(env.fake.requests) == before


async def test_async_authorize_and_fastapi_mount(fake: FakeLago) -> None:
    """An async authorize callback works, and the router mounts in FastAPI."""
    asked: list[str] = []

    async def authorize(request: Request, org_id: str) -> bool:
        asked.append(org_id)
        return True

    fake.add_customer("org_x")
    fake.add_subscription("org_x", "starter")
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        app = FastAPI()
        app.mount("/api/v1/billing/org", billing_routes(OrgBilling(client=lago), authorize=authorize))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            response = await client.get("/api/v1/billing/org/organizations/org_x/subscription")
    assert response.status_code == 200
    assert response.json()["subscription"]["plan_code"] == "starter"
    assert asked == ["org_x"]


def test_authorize_must_be_callable() -> None:
    """A non-callable authorize is a configuration error at once."""
    with pytest.raises(ConfigurationError, match="authorize"):
        billing_routes(authorize="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- setup


async def test_setup_creates_customer_and_subscription(env: Env) -> None:
    """POST /setup creates the org customer (creator in metadata) and subscribes it; the quota is refreshed."""
    response = await setup_acme(env)
    assert response.status_code == 200
    body = response.json()
    assert body["customer"]["external_id"] == "org_acme"
    assert body["subscription"]["plan_code"] == "starter"
    [customer] = env.fake.customers
    assert {m["key"]: m["value"] for m in customer["metadata"]}["created_by_user_id"] == "ada"
    assert env.invalidated == ["org_acme"]
    assert (await setup_acme(env)).status_code == 200  # idempotent
    assert len([s for s in env.fake.subscriptions if s["status"] == "active"]) == 1


async def test_setup_keeps_a_creator_whose_id_is_an_email(env: Env) -> None:
    """The creating user is a metadata value, never a path: an email or a dotted id is kept (it was a 422)."""
    body = {"org_name": "Acme", "plan_code": "starter", "user_id": "alice.smith@acme.test"}
    response = await env.client.post(f"{BASE}/org_acme/setup", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    [customer] = env.fake.customers
    assert {m["key"]: m["value"] for m in customer["metadata"]}["created_by_user_id"] == "alice.smith@acme.test"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"org_name": "Acme"}, ["body", "plan_code"]),
        ({"plan_code": "starter"}, ["body", "org_name"]),
        ({"org_name": "Acme", "plan_code": "starter", "email": "nope"}, ["body", "email"]),
        ({"org_name": "Acme", "plan_code": "starter", "colour": "red"}, ["body", "colour"]),
        ({"org_name": "Acme", "plan_code": "star.ter"}, ["body", "plan_code"]),
        ({"org_name": "Acme", "plan_code": "starter", "billing_time": "weekly"}, ["body", "billing_time"]),
        ({"org_name": "", "plan_code": "starter"}, ["body", "org_name"]),
        ({"org_name": "Acme", "plan_code": "enterprise"}, ["body", "plan_code"]),
        ({"org_name": "Acme", "plan_code": "starter", "user_id": "u" * 101}, ["body", "user_id"]),
    ],
)
async def test_setup_validation_errors(env: Env, body: dict[str, Any], loc: list[str]) -> None:
    """Invalid setup input (missing, malformed, unknown fields, unknown plan) is a 422 naming the field."""
    response = await env.client.post(f"{BASE}/org_acme/setup", json=body, headers=ADMIN)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert loc in [error["loc"] for error in detail]
    assert all(error["msg"] for error in detail)
    assert env.fake.subscriptions == []


async def test_malformed_json_and_bad_org_id(env: Env) -> None:
    """A body that is not JSON, or not an object, and an org id Lago cannot address are 422s."""
    bad_json = await env.client.post(
        f"{BASE}/org_acme/setup", content=b"{nope", headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"
    not_object = await env.client.post(f"{BASE}/org_acme/setup", json=[1], headers=ADMIN)
    assert not_object.status_code == 422
    dotted = await env.client.get(f"{BASE}/acme.com/subscription", headers={"X-Admin-Of": "acme.com"})
    assert dotted.status_code == 422
    assert dotted.json()["detail"][0]["loc"] == ["path", "org_id"]


# ------------------------------------------------------------------------------------------ subscription


async def test_get_subscription_and_not_found(env: Env) -> None:
    """GET /subscription returns the active subscription, or 404 when the org has none."""
    missing = await env.client.get(f"{BASE}/org_acme/subscription", headers=ADMIN)
    assert missing.status_code == 404
    assert missing.json()["code"] == "subscription_not_found"
    await setup_acme(env)
    found = await env.client.get(f"{BASE}/org_acme/subscription", headers=ADMIN)
    assert found.status_code == 200
    assert (found.json()["subscription"]["plan_code"], found.json()["subscription"]["status"]) == ("starter", "active")


async def test_put_subscription_upgrades_now_and_downgrades_at_period_end(env: Env) -> None:
    """PUT /subscription: a dearer plan applies now, a cheaper one at the end of the period; quota refreshed."""
    await setup_acme(env)
    env.invalidated.clear()
    upgrade = await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "pro"}, headers=ADMIN)
    assert upgrade.status_code == 200
    assert (upgrade.json()["effective"], upgrade.json()["subscription"]["plan_code"]) == ("now", "pro")
    downgrade = await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "starter"}, headers=ADMIN)
    assert downgrade.status_code == 200
    body = downgrade.json()
    assert (body["effective"], body["subscription"]["next_plan_code"]) == ("period_end", "starter")
    assert body["effective_date"] == body["subscription"]["downgrade_plan_date"]
    assert env.invalidated == ["org_acme", "org_acme"]


async def test_put_subscription_errors(env: Env) -> None:
    """PUT /subscription: 404 without a subscription, 422 without plan_code or with an unknown plan."""
    missing = await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "pro"}, headers=ADMIN)
    assert missing.status_code == 404
    await setup_acme(env)
    no_plan = await env.client.put(f"{BASE}/org_acme/subscription", json={}, headers=ADMIN)
    assert no_plan.status_code == 422 and no_plan.json()["detail"][0]["loc"] == ["body", "plan_code"]
    unknown = await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "gold"}, headers=ADMIN)
    assert unknown.status_code == 422 and "gold" in unknown.json()["detail"][0]["msg"]


async def test_delete_subscription(env: Env) -> None:
    """DELETE /subscription terminates it (then 404); a bad on_termination_invoice is a 422; skipping the period's
    invoice is refused (403: the org's own admin would leave its usage unbilled) unless allow_skip_invoice."""
    await setup_acme(env)
    bad = await env.client.delete(f"{BASE}/org_acme/subscription?on_termination_invoice=maybe", headers=ADMIN)
    assert bad.status_code == 422
    skip = await env.client.delete(f"{BASE}/org_acme/subscription?on_termination_invoice=skip", headers=ADMIN)
    assert (skip.status_code, skip.json()["code"]) == (403, "skip_invoice_not_allowed")
    assert env.fake.subscriptions[-1]["status"] == "active"
    env.router.allow_skip_invoice = True
    done = await env.client.delete(f"{BASE}/org_acme/subscription?on_termination_invoice=skip", headers=ADMIN)
    assert done.status_code == 200
    assert done.json()["subscription"]["status"] == "terminated"
    again = await env.client.delete(f"{BASE}/org_acme/subscription", headers=ADMIN)
    assert again.status_code == 404


# ------------------------------------------------------------------------------------------------- usage


async def test_record_usage_and_duplicates(env: Env) -> None:
    """POST /usage/record sends one event with org and user (201); the same transaction_id again is 200 duplicate."""
    await setup_acme(env)
    body = {"transaction_id": "tx_1", "user_id": "ada", "model": "gpt-4o", "tokens": 42, "properties": {"k": "v"}}
    first = await env.client.post(f"{BASE}/org_acme/usage/record", json=body, headers=ADMIN)
    assert first.status_code == 201, first.text
    assert first.json()["duplicate"] is False
    [event] = env.fake.events
    assert event["code"] == "api_call" and event["external_subscription_id"] == "org_acme"
    assert event["properties"].items() >= {"org_id": "org_acme", "user_id": "ada", "model": "gpt-4o", "k": "v"}.items()
    assert event["properties"]["total_tokens"] == 42
    second = await env.client.post(f"{BASE}/org_acme/usage/record", json=body, headers=ADMIN)
    assert (second.status_code, second.json()["duplicate"]) == (200, True)
    other = {"event_code": "tokens", "properties": {"total_tokens": 7}, "user_id": "ada", "timestamp": 4_000_000_000}
    assert (await env.client.post(f"{BASE}/org_acme/usage/record", json=other, headers=ADMIN)).status_code == 201
    assert env.fake.events[-1]["code"] == "tokens"


@pytest.mark.parametrize(
    "body",
    [
        {"tokens": -1},
        {"tokens": "many"},
        {"properties": [1]},
        {"event_code": "a/b"},
        {"timestamp": True},
        {"timestamp": 1_700_000_000_000},
        {"surprise": 1},
        {"event_code": "tokens", "properties": {"total_tokens": -50_000}},  # an admin lowering the org's bill
        {"event_code": "tokens", "properties": {"total_tokens": " -50000 "}},  # Lago sums numeric strings too
        {"event_code": "tokens", "properties": {"total_tokens": "-5e4"}},
    ],
)
async def test_record_usage_validation(env: Env, body: dict[str, Any]) -> None:
    """Bad token counts, properties, event codes, timestamps or unknown fields are 422s; nothing is sent."""
    await setup_acme(env)
    response = await env.client.post(f"{BASE}/org_acme/usage/record", json=body, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert env.fake.events == []


async def test_record_usage_without_subscription_is_404(env: Env) -> None:
    """Usage for an org without an active subscription is refused (Lago would silently never bill it)."""
    response = await env.client.post(f"{BASE}/org_nobody/usage/record", json={}, headers={"X-Admin-Of": "org_nobody"})
    assert response.status_code == 404
    assert env.fake.events == []


async def test_current_usage(env: Env) -> None:
    """GET /usage/current returns Lago's current usage; 404 without a subscription or for an unknown metric."""
    headers = {"X-Admin-Of": "org_acme,org_nobody"}
    assert (await env.client.get(f"{BASE}/org_nobody/usage/current", headers=headers)).status_code == 404
    await setup_acme(env)
    for _ in range(3):
        await env.client.post(f"{BASE}/org_acme/usage/record", json={"user_id": "ada"}, headers=ADMIN)
    response = await env.client.get(f"{BASE}/org_acme/usage/current", headers=ADMIN)
    assert response.status_code == 200
    usage = response.json()["usage"]
    calls = next(c for c in usage["charges_usage"] if c["billable_metric"]["code"] == "api_call")
    assert calls["events_count"] == 3
    narrowed = await env.client.get(f"{BASE}/org_acme/usage/current?billable_metric_code=tokens", headers=ADMIN)
    assert [c["billable_metric"]["code"] for c in narrowed.json()["usage"]["charges_usage"]] == ["tokens"]
    unknown = await env.client.get(f"{BASE}/org_acme/usage/current?billable_metric_code=nope", headers=ADMIN)
    assert unknown.status_code == 404
    invalid = await env.client.get(f"{BASE}/org_acme/usage/current?billable_metric_code=a.b", headers=ADMIN)
    assert invalid.status_code == 422


# ---------------------------------------------------------------------------------------------- invoices


async def test_invoices(env: Env) -> None:
    """GET /invoices lists the org's latest invoices (limit 1..100); 404 when the org has no customer."""
    assert (await env.client.get(f"{BASE}/org_acme/invoices", headers=ADMIN)).status_code == 404
    await setup_acme(env)
    for cents in (100, 200, 300):
        env.fake.add_invoice("org_acme", total_amount_cents=cents)
    env.fake.add_invoice("org_other", total_amount_cents=999)
    everything = await env.client.get(f"{BASE}/org_acme/invoices", headers=ADMIN)
    assert everything.status_code == 200
    assert sorted(i["total_amount_cents"] for i in everything.json()["invoices"]) == [100, 200, 300]
    two = await env.client.get(f"{BASE}/org_acme/invoices?limit=2", headers=ADMIN)
    assert len(two.json()["invoices"]) == 2
    for bad in ("0", "101", "x", "-1", "²"):  # (a superscript two passed isdigit, then int() failed: 500)
        assert (await env.client.get(f"{BASE}/org_acme/invoices?limit={bad}", headers=ADMIN)).status_code == 422


# --------------------------------------------------------------------------------------------- dashboard


async def record_calls(env: Env) -> None:
    """Usage by two users and two models: ada 3 calls (2 gpt-4o, 1 mini), bob 1 call; tokens 300 + 50."""
    calls = [("ada", "gpt-4o"), ("ada", "gpt-4o"), ("ada", "gpt-4o-mini"), ("bob", "gpt-4o")]
    for user, model in calls:
        await env.client.post(f"{BASE}/org_acme/usage/record", json={"user_id": user, "model": model}, headers=ADMIN)
    for user, model, tokens in (("ada", "gpt-4o", 300), ("bob", "gpt-4o-mini", 50)):
        body = {"event_code": "tokens", "user_id": user, "model": model, "properties": {"total_tokens": tokens}}
        await env.client.post(f"{BASE}/org_acme/usage/record", json=body, headers=ADMIN)


async def test_dashboard_json(env: Env) -> None:
    """GET /dashboard (JSON): plan, period, usage against each limit, breakdown by user and model from Lago."""
    await setup_acme(env)
    await record_calls(env)
    response = await env.client.get(f"{BASE}/org_acme/dashboard", headers=ADMIN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["plan"]["code"] == "starter" and data["plan"]["name"] == "Starter"
    assert data["period"]["from"] and data["period"]["to"]
    limits = {limit["name"]: limit for limit in data["limits"]}
    assert (limits["max_api_calls"]["used"], limits["max_api_calls"]["limit"]) == (4, 10)
    assert limits["max_api_calls"]["ratio"] == 0.4
    assert (limits["max_tokens"]["used"], limits["max_tokens"]["limit"]) == (350, 1000)
    assert data["limits_source"] == "LAGO_PLAN_LIMITS"
    assert data["breakdown_source"] == "lago_grouped_usage"
    by_user = {row["user_id"]: row for row in data["by_user"]}
    assert by_user["ada"]["units"] == {"api_call": 3, "tokens": 300}
    assert by_user["bob"]["units"] == {"api_call": 1, "tokens": 50}
    by_model = {row["model"]: row for row in data["by_model"]}
    assert by_model["gpt-4o"]["units"] == {"api_call": 3, "tokens": 300}
    assert by_model["gpt-4o-mini"]["units"] == {"api_call": 1, "tokens": 50}


async def dashboard_after_two_calls(fake: FakeLago, settings: BillingSettings) -> dict[str, Any]:
    async with LagoClient(settings, transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago)
        await billing.record_api_call("org_1", "t1", "/v1/chat", "u1", tokens=300)
        await billing.record_api_call("org_1", "t2", "/v1/chat", "u1", tokens=200)
        router = billing_routes(billing, authorize=lambda request, org_id: True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as client:
            response = await client.get("/organizations/org_1/dashboard")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("source", ["entitlements", "LAGO_PLAN_LIMITS"])
async def test_dashboard_shows_the_limits_and_usage_the_gate_enforces(source: str) -> None:
    """The limits are where the gate takes them (the subscription's entitlements, over LAGO_PLAN_LIMITS: the
    dashboard read only the table), and max_tokens' usage is what the gate counts (total_tokens summed in
    LAGO_EVENT_CODE: the dashboard looked for a metric called "tokens" and showed null)."""
    fake = quota_seed(FakeLago(api_key="k"), starter_calls=5, starter_tokens=1000)  # the README's setup
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    if source == "LAGO_PLAN_LIMITS":
        fake.store.plans["starter"]["entitlements"] = {}
        settings = settings.replace(plan_limits={"starter": {"max_api_calls": 5, "max_tokens": 1000}})
    data = await dashboard_after_two_calls(fake, settings)
    limits = {limit["name"]: (limit["used"], limit["limit"]) for limit in data["limits"]}
    assert limits == {"max_api_calls": (2, 5), "max_tokens": (500, 1000)}
    assert data["limits_source"] == source


async def test_dashboard_limits_and_ledger_providers(fake: FakeLago) -> None:
    """limits_provider and a local ledger (breakdown_provider) replace the defaults; sync or async."""

    async def limits(org_id: str) -> dict[str, Any]:
        return {"max_api_calls": 2, "max_seats": {"limit": 5, "used": 5}, "max_mystery": 9}

    def ledger(org_id: str) -> dict[str, Any]:
        return {"by_user": [{"user_id": "zoe", "events": 7, "units": {"api_call": 7}}], "by_model": []}

    fake.add_customer("org_acme")
    fake.add_subscription("org_acme", "starter")
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(
            OrgBilling(client=lago), authorize=admin_of, limits_provider=limits, breakdown_provider=ledger
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as client:
            data = (await client.get("/organizations/org_acme/dashboard", headers=ADMIN)).json()
    limits_by_name = {limit["name"]: limit for limit in data["limits"]}
    assert limits_by_name["max_api_calls"].items() >= {"limit": 2, "used": 0, "exceeded": False}.items()
    assert limits_by_name["max_seats"].items() >= {"limit": 5, "used": 5, "exceeded": True, "ratio": 1.0}.items()
    assert limits_by_name["max_mystery"]["used"] is None
    assert data["breakdown_source"] == "ledger"
    assert data["by_user"] == [{"user_id": "zoe", "events": 7, "amount_cents": 0, "units": {"api_call": 7}}]


async def test_dashboard_html_and_errors(env: Env) -> None:
    """Browsers get HTML (no script, strict CSP); 404 without a subscription; a bad ?format is 422."""
    browser = {**ADMIN, "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    missing = await env.client.get(f"{BASE}/org_acme/dashboard", headers=browser)
    assert missing.status_code == 404 and "no active subscription" in missing.text
    assert (await env.client.get(f"{BASE}/org_acme/dashboard", headers=ADMIN)).json()["code"] == (
        "subscription_not_found"
    )
    await setup_acme(env)
    await record_calls(env)
    page = await env.client.get(f"{BASE}/org_acme/dashboard", headers=browser)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<script" not in page.text and "http" not in page.text.split("<main>")[0].replace("http-equiv", "")
    assert '<span class="used">4</span> / <span class="max">10</span>' in page.text
    forced = await env.client.get(f"{BASE}/org_acme/dashboard?format=json", headers=browser)
    assert forced.headers["content-type"].startswith("application/json")
    assert (await env.client.get(f"{BASE}/org_acme/dashboard?format=xml", headers=ADMIN)).status_code == 422


def test_content_negotiation() -> None:
    """HTML only when asked for: browsers' Accept, ?format=html; JSON for */*, JSON or nothing."""
    assert wants_html("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
    assert not wants_html("*/*")
    assert not wants_html("")
    assert not wants_html("application/json, text/html;q=0.5")
    assert wants_html("*/*", "html")
    assert not wants_html("text/html", "json")


# ---------------------------------------------------------------------------------------------- Lago errors


@pytest.mark.parametrize(("status", "expected"), [(503, 503), (429, 429), (401, 502), (500, 503)])
async def test_lago_errors_map_to_sensible_statuses(env: Env, status: int, expected: int) -> None:
    """Lago down, throttling or refusing our key: 503, 429 with Retry-After, 502; the API key never leaks."""
    await setup_acme(env)
    env.fake.faults.inject(status, count=5)
    response = await env.client.get(f"{BASE}/org_acme/subscription", headers=ADMIN)
    assert response.status_code == expected
    if expected in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    assert API_KEY not in response.text and "fake-lago" not in response.text


async def test_lago_validation_error_is_422_with_details(env: Env) -> None:
    """A 422 from Lago is passed on as 422 with Lago's error details."""
    await setup_acme(env)
    env.fake.faults.inject(422, count=5, path="/api/v1/subscriptions")
    response = await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": "pro"}, headers=ADMIN)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_errors"


async def test_routes_read_the_environment_lazily(fake: FakeLago, monkeypatch: pytest.MonkeyPatch) -> None:
    """billing_routes() without billing builds its OrgBilling from the environment on first use; aclose closes it."""
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", "http://127.0.0.1:9")
    router = billing_routes(authorize=admin_of)
    assert router.billing.settings.api_key == API_KEY
    await router.aclose()
    assert router.billing.client.is_closed
