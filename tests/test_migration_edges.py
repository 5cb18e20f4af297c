"""Migration edges: users whose subscriptions start later, the billing identity a new org customer inherits, and the
CLI's up-front checks of its journal and report paths (against the emulator)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import LagoAuthenticationError
from lago_org_billing._migration import MigrationOptions, OrgMapping, run_migration
from lago_org_billing._migration_cli import run_migrate_command
from lago_org_billing.testing import FakeLago
from test_migration import customer, subs
from test_migration_cli import parse

API_KEY = "k"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
SOLO = OrgMapping("solo", "Solo", None, ("dave",))


@pytest.fixture
def fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_plan("team_yearly", amount_cents=40_000, interval="yearly")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


def done_writes(run: object) -> list[str]:
    return [f"{s.kind}:{s.target}" for s in run.orgs[0].steps if s.outcome == "done"]  # type: ignore[attr-defined]


# --- pending user subscriptions ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_pending_org_subscription_does_not_replace_a_user_s_active_one(
    fake: FakeLago, client: LagoClient
) -> None:
    """The org already has a subscription that only starts in June (an earlier run made it from a user's pending
    one, or it was made in Lago's UI); a user with an active subscription is then migrated: the org fails with what
    to do, and the user's subscription is left active (ended today, nothing would have billed the org until June)."""
    fake.add_customer("solo", name="Solo")
    fake.add_subscription("solo", "pro", external_id="solo", subscription_at="2026-06-01T00:00:00Z")
    fake.add_customer("carol")
    fake.add_subscription("carol", "team_yearly", external_id="sub_carol")
    org = OrgMapping("solo", "Solo", None, ("carol",))
    run = await run_migration(client, [org], mode="execute")
    assert not run.ok and "starting later" in run.orgs[0].errors[0]
    assert [s["external_id"] for s in subs(fake, "carol")] == ["sub_carol"]


@pytest.mark.anyio
async def test_pending_subscriptions_the_org_starts_no_later_than_the_first_user_would_have(
    fake: FakeLago, client: LagoClient
) -> None:
    """Two users' subscriptions start later: starter on 2026-04-01, pro in 2099. The org takes pro (policy highest)
    from 2026-04-01, when the first would have started (from 2099, nothing would bill it in between)."""
    fake.add_customer("dave")
    fake.add_customer("erin")
    fake.add_subscription("dave", "pro", external_id="sub_dave", subscription_at="2099-06-01T00:00:00Z")
    fake.add_subscription("erin", "starter", external_id="sub_erin", subscription_at="2026-04-01T00:00:00Z")
    run = await run_migration(client, [OrgMapping("solo", "Solo", None, ("dave", "erin"))], mode="execute")
    assert run.ok
    [org_sub] = subs(fake, "solo", "pending")
    assert str(org_sub["subscription_at"]) <= "2026-04-01T00:00:00Z"


@pytest.mark.anyio
async def test_a_mapping_plan_code_does_not_bill_the_org_before_its_users_pending_start(
    fake: FakeLago, client: LagoClient
) -> None:
    """The only user's subscription starts on 2026-06-01: with a mapping plan_code too, the org starts then, not
    today."""
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave", subscription_at="2026-06-01T00:00:00Z")
    org = OrgMapping("solo", "Solo", None, ("dave",), plan_code="starter")
    run = await run_migration(client, [org], mode="execute")
    assert run.ok
    [org_sub] = [s for s in fake.subscriptions if s["external_customer_id"] == "solo"]
    assert str(org_sub["subscription_at"]) >= "2026-06-01T00:00:00Z"


# --- inherited billing identity ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_carried_currency_is_the_currency_of_the_org_s_plan(fake: FakeLago, client: LagoClient) -> None:
    """--default-plan starter is in USD; the user customer is in EUR: the org customer does not take EUR (real Lago
    refuses a subscription in another currency than its customer's: 422 currencies_does_not_match)."""
    fake.add_customer("dave", name="Dave", currency="EUR")
    run = await run_migration(client, [SOLO], mode="execute", options=MigrationOptions(default_plan="starter"))
    assert run.ok
    [org_sub] = subs(fake, "solo")
    assert customer(fake, "solo")["currency"] in (None, org_sub["plan_amount_currency"])


@pytest.mark.anyio
async def test_a_second_execute_after_success_writes_nothing_with_two_users(fake: FakeLago, client: LagoClient) -> None:
    """Run 1 carries the identity of dave (whose plan the org takes) to the new org customer; run 2 writes nothing
    (it wrote erin's city onto dave's French address: an existing org customer is left as it is)."""
    fake.add_customer("erin", name="Erin", city="Berlin")
    fake.add_customer("dave", name="Dave", country="FR", address_line1="1 rue de la Paix")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    org = OrgMapping("solo", "Solo", None, ("erin", "dave"))
    assert (await run_migration(client, [org], mode="execute")).ok
    again = await run_migration(client, [org], mode="execute")
    assert done_writes(again) == []
    assert customer(fake, "solo")["city"] is None


@pytest.mark.anyio
async def test_net_payment_term_zero_is_carried_once_and_an_org_s_zero_is_kept(
    fake: FakeLago, client: LagoClient
) -> None:
    """net_payment_term 0 (due on issue) is a value, not "none": carried once, and a re-run writes nothing."""
    fake.add_customer("dave", name="Dave", net_payment_term=0)
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    assert (await run_migration(client, [SOLO], mode="execute")).ok
    again = await run_migration(client, [SOLO], mode="execute")
    assert done_writes(again) == []


@pytest.mark.anyio
async def test_the_org_s_own_legal_identity_is_not_completed_with_a_user_s_tax_id(
    fake: FakeLago, client: LagoClient
) -> None:
    """An existing org customer keeps its own identity whole: not completed with a user's tax id (its invoices would
    show "Solo SAS" with Dave SARL's tax id)."""
    fake.add_customer("dave", name="Dave", legal_name="Dave SARL", tax_identification_number="FR123456789")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    fake.add_customer("solo", name="Solo", legal_name="Solo SAS")
    assert (await run_migration(client, [SOLO], mode="execute")).ok
    org = customer(fake, "solo")
    assert (org["legal_name"], org["tax_identification_number"]) != ("Solo SAS", "FR123456789")


# --- CLI path checks --------------------------------------------------------------------------------------------


def _cli(fake: FakeLago, tmp_path: Path, *argv: str, api_key: str = API_KEY) -> int:
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("user_id,org_id,org_name,email\ndave,solo,Solo,\n")
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": fake.base_url, "LAGO_API_KEY": api_key})
    args = parse("--mapping-file", str(mapping), *argv)
    out, err = io.StringIO(), io.StringIO()
    return run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)


def test_a_journal_in_a_directory_not_made_yet_is_still_usable(fake: FakeLago, tmp_path: Path) -> None:
    """A journal in a directory not made yet: made, as the journal's first record would (the up-front check refused
    it)."""
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    journal = tmp_path / "state" / "journal.jsonl"
    assert _cli(fake, tmp_path, "--execute", "--journal", str(journal)) == 0
    assert journal.exists()


def test_a_run_that_stops_early_leaves_no_empty_report(fake: FakeLago, tmp_path: Path) -> None:
    """The up-front check leaves no empty (not JSON) report behind a run that stops early (a refused key)."""
    fake.add_customer("dave")
    report = tmp_path / "report.json"
    with pytest.raises(LagoAuthenticationError):
        _cli(fake, tmp_path, "--report", str(report), api_key="wrong")
    assert not report.exists() or json.loads(report.read_text())
