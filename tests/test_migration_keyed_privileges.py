"""Migration on a Lago that keys entitlement privileges by their codes (lago-api in mid-2025 served
``"privileges": {"max_api_calls": {"code": "max_api_calls", "value": ...}}``, its plan and subscription entitlement
serializers ``.index_by { it[:code] }``): the donor's overrides and removals go to the org subscription as they do
when Lago lists them, and --verify checks them alike (against the emulator)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._migration import OrgMapping, run_migration
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
SOLO = OrgMapping("solo", "Solo", None, ("dave",))
#: ``keyed``: plans and subscriptions key privileges (the mid-2025 Lago); ``keyed-subscriptions``: only the
#: subscription entitlements do, the plan lists them (a Lago whose two serializers changed apart).
SHAPES = ("keyed", "keyed-subscriptions")
SEEDS = range(6)


def _key(features: Any) -> None:
    for feature in features if isinstance(features, list) else ():
        if isinstance(feature, dict) and isinstance(feature.get("privileges"), list):
            feature["privileges"] = {privilege["code"]: privilege for privilege in feature["privileges"]}


class KeyedPrivileges(httpx.AsyncBaseTransport):
    """The emulator as lago-api served entitlements in mid-2025: ``privileges`` keyed by code in the subscription's
    entitlements (``GET /subscriptions/{id}/entitlements``) and, for ``shape == "keyed"``, in the plan's (``GET
    /plans/{code}`` embeds them); subscriptions did not embed entitlements yet. ``shape == "listed"``: privileges
    listed, as Lago lists them now (what the keyed shapes must match)."""

    def __init__(self, fake: FakeLago, shape: str) -> None:
        self.inner = fake.transport()
        self.shape = shape
        self.writes: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if request.method != "GET":
            self.writes.append((request.method, request.url.path))
        body = json.loads(response.content) if response.content else None
        if response.status_code != 200 or not isinstance(body, dict):
            return response
        for subscription in [body.get("subscription"), *(body.get("subscriptions") or [])]:
            if isinstance(subscription, dict):
                subscription.pop("entitlements", None)
        plans = request.url.path.startswith("/api/v1/plans")
        if self.shape == "keyed" or (self.shape == "keyed-subscriptions" and not plans):
            _key(body.get("entitlements"))
            if isinstance(body.get("plan"), dict):
                _key(body["plan"].get("entitlements"))
        return httpx.Response(200, json=body)


def client_on(fake: FakeLago, transport: httpx.AsyncBaseTransport) -> LagoClient:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    return LagoClient(settings, transport=transport)


def org_privileges(fake: FakeLago, external_id: str = "solo") -> dict[str, dict[str, tuple[Any, Any]]]:
    """``{feature: {privilege: (value, override_value)}}`` of the subscription, as the emulator holds it."""
    return {
        feature["code"]: {p["code"]: (p["value"], p["override_value"]) for p in feature["privileges"]}
        for feature in fake.store.get_sub_entitlements(external_id, None)["entitlements"]
    }


def enterprise_dave() -> FakeLago:
    """Plan pro: api_quota (max_api_calls 1,000, max_tokens 100,000, max_seats 5). dave's subscription has a custom
    max_api_calls of 50,000 and went without max_tokens."""
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_feature(
        "api_quota", [{"code": code, "value_type": "integer"} for code in ("max_api_calls", "max_tokens", "max_seats")]
    )
    limits = {"max_api_calls": 1_000, "max_tokens": 100_000, "max_seats": 5}
    fake.store.set_plan_entitlements("pro", {"entitlements": {"api_quota": limits}}, merge=False)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    fake.store.patch_sub_entitlements("sub_dave", None, {"entitlements": {"api_quota": {"max_api_calls": 50_000}}})
    fake.store.remove_sub_entitlement_privilege("sub_dave", None, "api_quota", "max_tokens")
    return fake


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_donor_s_keyed_privileges_go_to_the_org_subscription_and_verify_checks_them(shape: str) -> None:
    """A donor whose privileges Lago keys by code gives the org subscription its override and its removal, and
    --verify checks both: the keyed privileges read as none lost the removal of max_tokens (the org kept the plan's
    100,000) or, with the plan listing them, reported every plan privilege removed and deleted them all from the org
    subscription (the 50,000 override with them), --verify then failing on the override it had just set."""
    fake = enterprise_dave()
    transport = KeyedPrivileges(fake, shape)
    async with client_on(fake, transport) as client:
        read = await client.get_subscription_entitlements("sub_dave")
        assert isinstance(read[0]["privileges"], dict)  # (the shape under test)
        expected = {
            "from": "dave's subscription sub_dave",
            "values": {"api_quota": {"max_api_calls": 50_000}},
            "removed": ["api_quota.max_tokens"],
        }
        dry = await run_migration(client, [SOLO], mode="dry-run")
        assert dry.to_json()["orgs"][0]["entitlement_overrides"] == expected

        run = await run_migration(client, [SOLO], mode="execute")
        assert run.ok, run.orgs[0].errors
        assert [w for w in transport.writes if "/entitlements" in w[1]] == [
            ("PATCH", "/api/v1/subscriptions/solo/entitlements"),
            ("DELETE", "/api/v1/subscriptions/solo/entitlements/api_quota/privileges/max_tokens"),
        ]
        assert org_privileges(fake) == {"api_quota": {"max_api_calls": (50_000, 50_000), "max_seats": (5, None)}}

        verify = await run_migration(client, [SOLO], mode="verify")
        assert verify.ok, verify.orgs[0].errors
        assert verify.to_json()["orgs"][0]["entitlement_overrides"] == expected

        # max_tokens back on the org subscription: --verify says so
        fake.store.patch_sub_entitlements("solo", None, {"entitlements": {"api_quota": {"max_tokens": 100_000}}})
        verify = await run_migration(client, [SOLO], mode="verify")
    assert not verify.ok
    assert any(
        "still has api_quota.max_tokens of its plan's entitlements" in error
        and "DELETE /subscriptions/solo/entitlements/api_quota/privileges/max_tokens" in error
        for error in verify.orgs[0].errors
    ), verify.orgs[0].errors


# ------------------------------------------------------------------------- random donors, keyed and listed alike


def random_lago(seed: int) -> FakeLago:
    """Features of 0 to 3 integer privileges; plan pro with some of them; users dave and erin on pro with random
    overrides (of plan privileges, of features the plan lacks) and removals (of plan features and privileges)."""
    r = random.Random(seed)
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    fake.add_plan("pro", amount_cents=5_000)
    features = {f"f{n}": [f"p{m}" for m in range(r.randint(0, 3))] for n in range(r.randint(1, 4))}
    for code, privileges in features.items():
        fake.add_feature(code, [{"code": p, "value_type": "integer"} for p in privileges])
    plan: dict[str, dict[str, int]] = {}
    for code, privileges in features.items():
        if r.random() < 0.7:
            plan[code] = {p: r.randint(1, 100) for p in privileges if r.random() < 0.8}
    if plan:  # (Lago refuses an empty one: 400, the param missing)
        fake.store.set_plan_entitlements("pro", {"entitlements": plan}, merge=False)
    for user in ("dave", "erin")[: r.randint(1, 2)]:
        fake.add_customer(user)
        sub = f"sub_{user}"
        fake.add_subscription(user, "pro", external_id=sub)
        given: dict[str, dict[str, int]] = {}
        for code, privileges in features.items():
            if r.random() < 0.5:
                values = {p: r.randint(101, 200) for p in privileges if r.random() < 0.5}
                if values or code not in plan:
                    given[code] = values
        if given:
            fake.store.patch_sub_entitlements(sub, None, {"entitlements": given})
        for code, values in plan.items():
            if r.random() < 0.15:
                fake.store.remove_sub_entitlement(sub, None, code)
                continue
            for privilege in values:
                if r.random() < 0.25 and privilege not in given.get(code, {}):
                    fake.store.remove_sub_entitlement_privilege(sub, None, code, privilege)
    return fake


async def migrated(fake: FakeLago, transport: KeyedPrivileges) -> dict[str, Any]:
    """What the dry run, --execute and --verify report and write, and the org subscription's entitlements after."""
    org = OrgMapping("solo", "Solo", None, tuple(c["external_id"] for c in fake.customers))
    async with client_on(fake, transport) as client:
        dry = (await run_migration(client, [org], mode="dry-run")).to_json()["orgs"][0]
        run = await run_migration(client, [org], mode="execute")
        verify = await run_migration(client, [org], mode="verify")
    return {
        "dry": (dry["entitlement_overrides"], dry["warnings"], dry["errors"]),
        "execute": (run.ok, run.orgs[0].errors, run.orgs[0].warnings),
        "writes": transport.writes,
        "org": org_privileges(fake),
        "verify": (verify.ok, verify.orgs[0].errors, verify.to_json()["orgs"][0]["entitlement_overrides"]),
    }


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_donors_migrate_alike_with_privileges_keyed_or_listed(seed: int, shape: str) -> None:
    """Random plans, overrides and removals: the migration reports, writes, leaves and verifies the same with
    privileges keyed by code as with privileges listed."""
    listed_fake = random_lago(seed)
    listed = await migrated(listed_fake, KeyedPrivileges(listed_fake, "listed"))
    keyed_fake = random_lago(seed)
    keyed = await migrated(keyed_fake, KeyedPrivileges(keyed_fake, shape))
    assert keyed == listed, seed
