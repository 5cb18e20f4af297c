"""Lago reads the migration makes per user, at the scale of a customer base (300 user customers in 120 orgs here;
20,000 in 8,000 on Lago Cloud, 50 requests/s), with the same checks and reports.

Covers reads that repeated what an earlier read of the same run already answered:

* the donor's full subscription (``GET /subscriptions/{id}``, read to see whether it pays a price of its own) embeds
  its entitlements: no ``GET /subscriptions/{id}/entitlements`` after it (one read less per org subscribed from a
  user's plan when Lago has features); the report is the same as when that read is made;
* the second phase (``migrate --execute`` after ``--prepare``) lists each user's subscriptions once (active, pending
  and terminated together), not a second time for the terminated ones its donor is picked among (one read less per
  user of each prepared org);
* ``--verify`` with entitlements lists each user's subscriptions once (active, pending, terminated and canceled),
  not a second time for the ended ones (one read less per user).

Counts come from the emulator's request log (``fake.requests``): deterministic, no timing.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings
from lago_org_billing._client import LagoClient
from lago_org_billing._migration import MigrationOptions, MigrationRun, OrgMapping, build_mapping, run_migration
from lago_org_billing.testing import FakeLago

API_KEY = "reads-key"
USERS, ORGS = 300, 120


def seeded() -> tuple[FakeLago, list[OrgMapping]]:
    """Two users in three subscribed (``starter``, or ``pro`` whose plan has ``api_quota``); every fifth ``pro``
    subscription has a custom ``max_api_calls``; every seventh user holds a wallet (accepted, reported)."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_feature("api_quota", [{"code": "max_api_calls", "value_type": "integer"}])
    fake.store.set_plan_entitlements("pro", {"entitlements": {"api_quota": {"max_api_calls": 1_000}}}, merge=False)
    rows = []
    for u in range(USERS):
        user, org = f"user_{u:05d}", f"org_{u % ORGS:04d}"
        fake.add_customer(user, name=user)
        if u % 3:
            fake.add_subscription(user, ("starter", "pro")[u % 2], external_id=f"sub_{user}")
            if u % 2 and u % 5 == 1:
                values = {"api_quota": {"max_api_calls": 10_000 + u}}
                fake.store.patch_sub_entitlements(f"sub_{user}", None, {"entitlements": values})
        if u % 7 == 0:
            fake.add_wallet(user, credits_balance="5.0")
        rows.append(("row", {"user_id": user, "org_id": org, "org_name": f"Org {u % ORGS}", "email": ""}))
    orgs, _ = build_mapping(rows, BillingSettings(api_key=API_KEY, api_url=fake.base_url))
    return fake, orgs


def client_of(fake: FakeLago, transport: httpx.AsyncBaseTransport | None = None) -> LagoClient:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    return LagoClient(settings, transport=transport or fake.transport())


OPTIONS = MigrationOptions(accept_unmoved="all")
PREPARE = MigrationOptions(accept_unmoved="all", prepare_only=True)


def kind(path: str, query: Any) -> str:
    """A request as ``GET /subscriptions/{id}/entitlements``, ``GET /subscriptions[active,pending]``..."""
    shape = re.sub(r"/(customers|subscriptions|plans)/[^/]+", r"/\1/{id}", path.removeprefix("/api/v1"))
    statuses = query.get("status[]")
    if statuses is not None:
        shape += "[" + ",".join([statuses] if isinstance(statuses, str) else statuses) + "]"
    return shape


def reads(fake: FakeLago) -> collections.Counter[str]:
    return collections.Counter(kind(r.path, r.query) for r in fake.requests if r.method == "GET")


def listings_per_user(fake: FakeLago) -> collections.Counter[str]:
    """``GET /subscriptions?external_customer_id=<user>`` listings, by user."""
    return collections.Counter(
        str(r.query.get("external_customer_id"))
        for r in fake.requests
        if r.method == "GET"
        and r.path == "/api/v1/subscriptions"
        and str(r.query.get("external_customer_id", "")).startswith("user_")
    )


def reports(run: MigrationRun) -> list[dict[str, Any]]:
    """The orgs' reports without their call counts (what differs when fewer reads are made)."""
    out = []
    for result in run.to_json()["orgs"]:
        result = dict(result)
        result.pop("calls")
        result.pop("writes")
        out.append(result)
    return out


class WithoutEmbeddedEntitlements(httpx.AsyncBaseTransport):
    """``GET /subscriptions/{id}`` of a user's subscription answered without its ``entitlements`` (as the code read
    them before: a ``GET /subscriptions/{id}/entitlements`` of their own): the reference for the same report."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        path = request.url.path
        if request.method != "GET" or not re.fullmatch(r"/api/v1/subscriptions/sub_user_[^/]+", path):
            return response
        await response.aread()
        body = json.loads(response.content)
        body.get("subscription", {}).pop("entitlements", None)
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(response.status_code, headers=headers, json=body)


@pytest.mark.anyio
async def test_the_donors_entitlements_come_with_its_subscription_read_once() -> None:
    """A dry run of the first phase reads the donor's full subscription (a price of its own?) and, before, its
    entitlements again: 80 orgs subscribed from a user's plan, 80 reads too many (of 2,443). Now none, the same report
    (entitlement overrides carried, other users' named) as when they are read apart."""
    fake, orgs = seeded()
    async with client_of(fake) as client:
        run = await run_migration(client, orgs, mode="dry-run", options=PREPARE)
    assert run.ok
    counted = reads(fake)
    donors = {
        r.path.removeprefix("/api/v1/subscriptions/")
        for r in fake.requests
        if r.method == "GET" and re.fullmatch(r"/api/v1/subscriptions/sub_user_[^/]+", r.path)
    }
    assert len(donors) == 80  # (an org whose users have no subscription has no donor)
    entitlements = {
        r.path.removeprefix("/api/v1/subscriptions/").removesuffix("/entitlements")
        for r in fake.requests
        if r.method == "GET" and r.path.endswith("/entitlements")
    }
    assert not donors & entitlements, "the donor's entitlements were read again after its full subscription"
    # one entitlements read per other candidate, none for a donor
    assert counted["/subscriptions/{id}/entitlements"] == 200 - 80
    with_overrides = [r for r in run.orgs if r.entitlement_overrides]
    assert with_overrides and all("api_quota" in r.entitlement_overrides for r in with_overrides)  # type: ignore[operator]

    reference_fake, reference_orgs = seeded()
    transport = WithoutEmbeddedEntitlements(reference_fake.transport())
    async with client_of(reference_fake, transport) as client:
        reference = await run_migration(client, reference_orgs, mode="dry-run", options=PREPARE)
    assert reads(reference_fake)["/subscriptions/{id}/entitlements"] == 200
    assert reports(run) == reports(reference)
    assert sum(counted.values()) == sum(reads(reference_fake).values()) - 80


async def prepared() -> tuple[FakeLago, list[OrgMapping], MigrationRun]:
    """The first phase made (org customers and subscriptions, the donors' overrides): the users' still active."""
    fake, orgs = seeded()
    async with client_of(fake) as client:
        first = await run_migration(client, orgs, mode="execute", options=PREPARE)
    assert first.ok, [r.errors for r in first.orgs if r.errors]
    assert {r.status for r in first.orgs} == {"prepared"}
    return fake, orgs, first


@pytest.mark.anyio
async def test_the_second_phase_lists_each_users_subscriptions_once() -> None:
    """The second phase picks the donor among the users' subscriptions there when the org subscription was made,
    active or ended since: it listed each user's active and pending subscriptions, then its terminated ones (2 reads
    per user of a prepared org, 600 here). Now one listing per user, the same donors and the same steps."""
    fake, orgs, first = await prepared()
    donors = {r.org_id: r.entitlements_from for r in first.orgs}
    fake.requests.clear()
    async with client_of(fake) as client:
        dry = await run_migration(client, orgs, mode="dry-run", options=OPTIONS)
    assert dry.ok
    per_user = listings_per_user(fake)
    assert len(per_user) == USERS
    assert set(per_user.values()) == {1}, "a user's subscriptions were listed more than once"
    assert reads(fake)["/subscriptions[terminated]"] == 0
    assert {r.org_id: r.entitlements_from for r in dry.orgs} == donors
    assert {r.phase for r in dry.orgs} == {"finish"}
    terminations = [s for r in dry.orgs for s in r.steps if s.kind == "terminate_subscription"]
    assert len(terminations) == 200

    fake.requests.clear()
    async with client_of(fake) as client:
        second = await run_migration(client, orgs, mode="execute", options=OPTIONS)
    assert second.ok
    assert set(listings_per_user(fake).values()) == {1}
    assert [r.entitlements_from for r in second.orgs] == [r.entitlements_from for r in dry.orgs]

    # ...and --verify lists each user's subscriptions once too, and verifies every subscribed org
    fake.requests.clear()
    async with client_of(fake) as client:
        verify = await run_migration(client, orgs, mode="verify", options=OPTIONS)
    assert set(listings_per_user(fake).values()) == {1}
    assert reads(fake)["/subscriptions[terminated,canceled]"] == 0
    subscribed = {r.org_id for r in first.orgs if r.plan_code is not None}
    assert {r.org_id for r in verify.orgs if r.status == "verified"} == subscribed
    assert {r.org_id: r.entitlements_from for r in verify.orgs if r.org_id in subscribed} == {
        org_id: donor for org_id, donor in donors.items() if org_id in subscribed
    }


@pytest.mark.anyio
async def test_verify_finds_an_override_missing_from_one_listing_per_user() -> None:
    """--verify still finds the donor (ended by --execute) in that one listing: an org subscription that lost its
    donor's max_api_calls is reported, with the call that sets it again."""
    fake, orgs, first = await prepared()
    async with client_of(fake) as client:
        second = await run_migration(client, orgs, mode="execute", options=OPTIONS)
    assert second.ok
    org = next(r for r in first.orgs if r.entitlement_overrides)
    sub_id = str((org.subscription or {}).get("external_id"))
    fake.store.patch_sub_entitlements(sub_id, None, {"entitlements": {"api_quota": {"max_api_calls": 1_000}}})
    fake.requests.clear()
    async with client_of(fake) as client:
        verify = await run_migration(client, orgs, mode="verify", options=OPTIONS)
    assert set(listings_per_user(fake).values()) == {1}
    [bad] = [r for r in verify.orgs if r.status == "unverified" and r.plan_code is not None]
    assert bad.org_id == org.org_id
    assert any("lacks the entitlement overrides" in e and f"PATCH /subscriptions/{sub_id}" in e for e in bad.errors)


@pytest.mark.anyio
async def test_reads_per_user_at_a_few_hundred_users() -> None:
    """The whole two-phase migration, reads counted per user (see the module docstring); the numbers of this review:
    first phase (dry run and execute each) 8.14 -> 7.88, second phase 8.41 -> 7.74, verify 7.88 -> 7.21 (two users in
    three subscribed: one read less per subscribed user, one less per org subscribed from a user's plan)."""
    fake, orgs = seeded()
    counts: dict[str, float] = {}
    async with client_of(fake) as client:
        for name, mode, options in (
            ("prepare dry run", "dry-run", PREPARE),
            ("prepare", "execute", PREPARE),
            ("finish dry run", "dry-run", OPTIONS),
            ("finish", "execute", OPTIONS),
            ("verify", "verify", OPTIONS),
        ):
            fake.requests.clear()
            run = await run_migration(client, orgs, mode=mode, options=options)  # type: ignore[arg-type]
            assert run.ok or mode == "verify"
            counts[name] = sum(reads(fake).values()) / USERS
    assert counts["prepare dry run"] == counts["prepare"] <= 7.88
    assert counts["finish dry run"] == counts["finish"] <= 7.75
    assert counts["verify"] <= 7.21
