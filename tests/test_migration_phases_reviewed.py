"""Second review of the two-phase migration (``migrate --execute --prepare``, then plain ``--execute``): the second
phase (and a first phase run again) keeps the donor the first phase took its entitlement overrides from when the
users' subscriptions change in the window between the phases (the donor's ends by itself, a user upgrades or buys a
new subscription), when it is run with another ``--plan-policy`` (the journal names the first phase's donor), and
says when a user's plan bought in the window is ended; the JSON report of a first phase counts its prepared orgs;
``OrgBilling.migrate_user_to_org(prepare_only=True)``. Everything through the emulator."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._migration import Journal, MigrationOptions, OrgMapping, run_migration
from lago_org_billing._migration_cli import add_migrate_command, run_migrate_command
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"
ACME = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("alice", "dave", "bob"))
PREPARE = MigrationOptions(prepare_only=True)
ALICE = {"api_quota": {"max_api_calls": 50_000}}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """alice on pro (50,000 calls of her own), dave on pro since a day later (max_tokens 7 of his own), bob on
    starter: by the plan policy ``highest`` the org takes pro and alice's overrides (the older of the two pros)."""
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=5)
    fake.add_plan("enterprise", amount_cents=90_000, entitlements={"api_quota": {"max_api_calls": 90_000}})
    for user, plan in (("alice", "pro"), ("dave", "pro"), ("bob", "starter")):
        fake.add_customer(user)
        fake.add_subscription(user, plan, external_id=f"sub_{user}")
        clock.advance(86_400)
    fake.store.patch_sub_entitlements("sub_alice", None, {"entitlements": ALICE})
    fake.store.patch_sub_entitlements("sub_dave", None, {"entitlements": {"api_quota": {"max_tokens": 7}}})
    return fake


@pytest.fixture
def settings(fake: FakeLago) -> BillingSettings:
    return BillingSettings(api_url=fake.base_url, api_key=API_KEY, retry_backoff=0.001)


@pytest.fixture
async def lago(fake: FakeLago, settings: BillingSettings) -> AsyncIterator[LagoClient]:
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


def stored(fake: FakeLago, external_id: str, status: str = "active") -> dict[str, Any]:
    return next(s for s in fake.store.subscriptions if s["external_id"] == external_id and s["status"] == status)


def cli(fake: FakeLago, settings: BillingSettings, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["migrate", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def prepare(lago: LagoClient, fake: FakeLago, journal: Journal | None = None, org: OrgMapping = ACME) -> None:
    run = await run_migration(lago, [org], mode="execute", options=PREPARE, journal=journal)
    assert run.ok and run.orgs[0].status == "prepared", run.orgs[0].errors
    assert stored(fake, "acme")["entitlement_overrides"] == ALICE
    assert run.orgs[0].entitlements_from == "alice's subscription sub_alice"


async def test_the_donor_s_subscription_ending_in_the_window_changes_nothing(
    fake: FakeLago, lago: LagoClient, clock: Clock
) -> None:
    """alice's subscription (the donor) ends by itself between the phases (a fixed term reached). The second phase used
    to pick dave's, still active, as the donor and give the org subscription his max_tokens 7 as well (and a first
    phase run again did the same); it keeps alice's, as --verify does."""
    await prepare(lago, fake)
    clock.advance(3_600)
    await lago.terminate_subscription("sub_alice")
    again = await run_migration(lago, [ACME], mode="execute", options=PREPARE)
    assert again.ok and again.orgs[0].steps == [], [s.description for s in again.orgs[0].steps]
    finish = await run_migration(lago, [ACME], mode="execute")
    assert finish.ok, finish.orgs[0].errors
    kinds = [step.kind for step in finish.orgs[0].steps]
    assert "set_entitlements" not in kinds and "remove_entitlements" not in kinds, kinds
    assert stored(fake, "acme")["entitlement_overrides"] == ALICE
    assert finish.orgs[0].entitlements_from == "alice's subscription sub_alice"
    assert not any("takes only those of dave" in w for w in finish.orgs[0].warnings), finish.orgs[0].warnings
    verify = await run_migration(lago, [ACME], mode="verify")
    assert verify.ok, verify.orgs[0].errors


async def test_an_upgrade_in_the_window_is_not_the_donor_and_is_named(
    fake: FakeLago, lago: LagoClient, clock: Clock
) -> None:
    """bob upgrades to enterprise between the phases (his new subscription, max_api_calls 1 of its own). The second
    phase used to take it as the donor (the most expensive now) and say its overrides "are not carried ... if they
    still apply, set them" on the org's pro, and said nothing of the plan bob bought in the window, which it ends: it
    keeps alice's as the donor and warns that bob's enterprise, bought since the org subscription was made, is ended
    while the org stays on pro."""
    await prepare(lago, fake)
    clock.advance(3_600)
    await lago.create_subscription(
        external_customer_id="bob", plan_code="enterprise", external_id="sub_bob", billing_time="calendar"
    )
    fake.store.patch_sub_entitlements("sub_bob", None, {"entitlements": {"api_quota": {"max_api_calls": 1}}})
    clock.advance(3_600)
    finish = await run_migration(lago, [ACME], mode="execute")
    assert finish.ok, finish.orgs[0].errors
    acme = finish.orgs[0]
    assert acme.entitlements_from == "alice's subscription sub_alice"
    assert not any("are not carried" in w for w in acme.warnings), acme.warnings
    window = [w for w in acme.warnings if "sub_bob" in w and "enterprise" in w and "change_plan" in w]
    assert window, acme.warnings
    assert stored(fake, "acme")["entitlement_overrides"] == ALICE


async def test_a_second_phase_with_another_plan_policy_keeps_the_first_phase_s_donor(
    fake: FakeLago, lago: LagoClient, tmp_path: Path
) -> None:
    """Org acme of alice and dave. The first phase (plan policy highest) took alice's overrides; the second is given
    --plan-policy newest. With the journal it used to take dave's (the newer) as well, max_tokens 7 added to the org
    subscription: it keeps the first phase's donor (the journal names it) and says so."""
    acme = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("alice", "dave"))
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    try:
        await prepare(lago, fake, journal, acme)
    finally:
        journal.close()
    journal = Journal(path)
    try:
        finish = await run_migration(
            lago, [acme], mode="execute", options=MigrationOptions(plan_policy="newest"), journal=journal
        )
    finally:
        journal.close()
    assert finish.ok, finish.orgs[0].errors
    result = finish.orgs[0]
    assert "set_entitlements" not in [step.kind for step in result.steps]
    assert stored(fake, "acme")["entitlement_overrides"] == ALICE
    assert result.entitlements_from == "alice's subscription sub_alice"
    assert any("first phase" in w and "sub_dave" in w for w in result.warnings), result.warnings


def test_the_report_of_a_first_phase_counts_its_prepared_orgs(
    fake: FakeLago, settings: BillingSettings, tmp_path: Path
) -> None:
    """The JSON report of ``--execute --prepare`` gave ``calls_per_migrated_org: null`` (only ``migrated`` orgs
    counted) and the summary left the line out; the prepared orgs count, and each org says its phase."""
    mapping = tmp_path / "map.csv"
    mapping.write_text("user_id,org_id,org_name,email\nalice,acme,Acme,\nbob,acme,Acme,\n")
    report = tmp_path / "report.json"
    code, out, err = cli(
        fake, settings, "--mapping-file", str(mapping), "--execute", "--prepare", "--report", str(report)
    )
    assert code == 0, out + err
    data = json.loads(report.read_text())
    assert data["options"]["prepare_only"] is True
    assert data["totals"]["by_status"] == {"prepared": 1}
    assert data["totals"]["calls_per_migrated_org"] is not None
    assert data["orgs"][0]["phase"] == "prepare"
    assert "calls per migrated org" in out
    code, out, err = cli(fake, settings, "--mapping-file", str(mapping), "--execute", "--report", str(report))
    assert code == 0, out + err
    data = json.loads(report.read_text())
    assert data["totals"]["by_status"] == {"migrated": 1} and data["orgs"][0]["phase"] == "finish"


async def test_migrate_user_to_org_prepares_then_finishes(fake: FakeLago, settings: BillingSettings) -> None:
    """``OrgBilling.migrate_user_to_org(..., prepare_only=True)``: the first phase for one user (the org subscribed
    with alice's overrides, her subscription left active and unmarked); the same call without it finishes."""
    billing = OrgBilling(settings, transport=fake.transport())
    try:
        first = await billing.migrate_user_to_org("alice", "acme", "Acme", prepare_only=True)
        assert first["changed"] and first["terminated_subscriptions"] == [] and first["phase"] == "prepare"
        assert stored(fake, "acme")["entitlement_overrides"] == ALICE
        assert stored(fake, "sub_alice")["status"] == "active"
        second = await billing.migrate_user_to_org("alice", "acme", "Acme")
        assert second["terminated_subscriptions"] == ["sub_alice"] and second["phase"] == "finish"
    finally:
        await billing.aclose()
