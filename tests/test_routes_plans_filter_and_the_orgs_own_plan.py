"""billing_routes(plans=...) and the plan the org is on: a plan no longer offered (a grandfathered price, a plan kept
for others that an operator gave the org) is still the org's own, and going back to it through ``PUT /subscription``
cancels a downgrade its admin scheduled. It was refused as "not offered" (422): the downgrade could not be undone
through the routes, and at the period's end the org lost a plan its admin can never pick again."""

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

API_KEY = "routes-plans-key"
BASE = "/billing/organizations"
ADMIN = {"X-Admin-Of": "org_acme"}
OFFERED = ("starter", "pro")


def admin_of(request: Request, org_id: str) -> bool:
    return org_id in request.headers.get("x-admin-of", "").split(",")


@dataclass
class Env:
    fake: FakeLago
    client: httpx.AsyncClient
    invalidated: list[str]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """org_acme on "legacy_2023" (a price no longer offered, between starter's and pro's), behind routes offering
    starter and pro."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    for code, cents in (("starter", 1000), ("legacy_2023", 3000), ("pro", 5000), ("internal", 0)):
        fake.add_plan(code, name=code, amount_cents=cents, charges=[])
    fake.add_customer("org_acme", name="Acme")
    fake.add_subscription("org_acme", "legacy_2023")
    invalidated: list[str] = []
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(
            OrgBilling(client=lago), authorize=admin_of, plans=set(OFFERED), invalidate=invalidated.append
        )
        app = Starlette(routes=[Mount("/billing", app=router)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield Env(fake, client, invalidated)


def _active(fake: FakeLago) -> dict[str, object]:
    [active] = [s for s in fake.subscriptions if s["external_id"] == "org_acme" and s["status"] == "active"]
    return active


async def _put(env: Env, plan_code: str) -> httpx.Response:
    return await env.client.put(f"{BASE}/org_acme/subscription", json={"plan_code": plan_code}, headers=ADMIN)


async def test_a_downgrade_from_a_plan_no_longer_offered_can_be_cancelled(env: Env) -> None:
    """Scheduled by mistake (starter), the downgrade is cancelled by asking for the org's own plan again, as on an
    offered plan: the org keeps legacy_2023 past the period's end."""
    down = await _put(env, "starter")
    assert down.status_code == 200, down.text
    assert down.json()["effective"] == "period_end"
    assert _active(env.fake)["next_plan_code"] == "starter"
    back = await _put(env, "legacy_2023")
    assert back.status_code == 200, back.text
    assert back.json()["subscription"]["plan_code"] == "legacy_2023"
    assert back.json()["subscription"]["next_plan_code"] is None
    assert back.json()["effective"] == "now"
    active = _active(env.fake)
    assert (active["plan_code"], active["next_plan_code"]) == ("legacy_2023", None)
    assert env.invalidated[-1] == "org_acme"


async def test_the_orgs_own_plan_asked_again_changes_nothing(env: Env) -> None:
    """Without a downgrade waiting, the org's own plan is what it has: a 200 with the subscription as it is (as for
    an offered plan), nothing written."""
    before = dict(_active(env.fake))
    same = await _put(env, "legacy_2023")
    assert same.status_code == 200, same.text
    assert same.json()["subscription"]["lago_id"] == before["lago_id"]
    assert _active(env.fake) == before
    assert not [r for r in env.fake.requests if r.method != "GET"]


@pytest.mark.parametrize("plan_code", ["internal", "legacy_2023"])
async def test_a_plan_not_offered_that_is_not_the_orgs_own_is_still_refused(env: Env, plan_code: str) -> None:
    """Only the org's own plan gets through: another plan not offered (a $0 internal one), or the grandfathered plan
    once the org has left it, is a 422 ``not_offered`` and nothing is written."""
    if plan_code == "legacy_2023":  # (the org moved to pro: legacy_2023 is no longer its plan)
        up = await _put(env, "pro")
        assert up.status_code == 200, up.text
        assert up.json()["effective"] == "now"
    writes = len([r for r in env.fake.requests if r.method != "GET"])
    refused = await _put(env, plan_code)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["type"] == "not_offered"
    assert refused.json()["detail"][0]["loc"] == ["body", "plan_code"]
    assert len([r for r in env.fake.requests if r.method != "GET"]) == writes
    assert _active(env.fake)["plan_code"] == ("pro" if plan_code == "legacy_2023" else "legacy_2023")


async def test_a_plan_not_offered_for_an_org_without_a_subscription_is_still_a_422(env: Env) -> None:
    """An org with no subscription asking for a plan not offered: the same 422 as before, not a 404."""
    response = await env.client.put(
        f"{BASE}/org_new/subscription", json={"plan_code": "internal"}, headers={"X-Admin-Of": "org_new"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["type"] == "not_offered"
