"""Review of the user-to-org migration (``_migration``, ``migrate`` CLI) against an operator's production run: ids at
Lago's metadata limits, a journal torn by a crash, users' scheduled plan changes the org does not take, and
``--verify`` listing everything a partial run left, all against the emulator."""

from __future__ import annotations

import argparse
import io
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._migration import OrgMapping, run_migration
from lago_org_billing._migration_cli import add_migrate_command, run_migrate_command
from lago_org_billing.testing import FakeLago

API_KEY = "k"


def meta(fake: FakeLago, external_id: str) -> dict[str, str]:
    customer = next(c for c in fake.customers if c["external_id"] == external_id)
    return {item["key"]: item["value"] for item in customer["metadata"]}


@pytest.fixture
def fake() -> FakeLago:
    clock = [datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)]
    fake = FakeLago(api_key=API_KEY, clock=lambda: clock[0])
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_plan("enterprise", amount_cents=50_000)
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


# --- metadata at Lago's limits ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_org_whose_first_user_id_is_longer_than_a_metadata_value_is_migrated(
    fake: FakeLago, client: LagoClient
) -> None:
    """User ids may be 255 characters, Lago's metadata values 100. The org customer's ``created_by_user_id`` was the
    first user's id as it is: Lago refused the customer (422 value_is_too_long, "fix the fields its error details
    name": no field of the mapping to fix) and the org could never be migrated, nor did the dry run say so. It is left
    out, with a warning, as the user mark is for a long org id; the org is migrated and verifies."""
    long_id = "user-" + "x" * 145
    fake.add_customer(long_id, name="Long")
    fake.add_subscription(long_id, "pro", external_id="sub_long")
    org = OrgMapping("acme", "Acme", None, (long_id,))

    dry = await run_migration(client, [org], mode="dry-run")
    assert any("created_by_user_id" in warning for warning in dry.orgs[0].warnings), dry.orgs[0].warnings

    run = await run_migration(client, [org], mode="execute")
    assert run.ok, run.orgs[0].errors
    assert meta(fake, "acme")["billing_type"] == "organization"
    assert "created_by_user_id" not in meta(fake, "acme")
    assert meta(fake, long_id)["migrated_to_org"] == "acme"
    assert (await run_migration(client, [org], mode="verify")).ok
    again = await run_migration(client, [org], mode="execute")
    assert again.ok and again.orgs[0].steps == []


# --- a journal torn by a crash ---------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["migrate", *argv])


def migrate(fake: FakeLago, tmp_path: Path, *argv: str) -> tuple[int, str]:
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": fake.base_url, "LAGO_API_KEY": API_KEY})
    out = io.StringIO()
    args = parse("--mapping-file", str(tmp_path / "mapping.csv"), "--progress", "none", *argv)
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=out)
    return code, out.getvalue()


def test_a_journal_whose_last_line_was_cut_inside_a_character_still_resumes(fake: FakeLago, tmp_path: Path) -> None:
    """A process killed (or a disk filled) while the journal's last line was being written can cut it inside a UTF-8
    character (an org name, a Lago error quoting one): the torn line is documented as ignored, but the journal was
    decoded whole, so the resumed ``--execute`` stopped with exit 2 ("cannot be read (UnicodeDecodeError...)"),
    saying nothing of what to do, and the migration could not be finished with its journal. The resumed run's first
    record was also written onto the torn line, and so lost to every later reading."""
    fake.add_customer("alice", name="Alice")
    fake.add_subscription("alice", "pro", external_id="sub_alice")
    fake.add_customer("bob", name="Bob")
    fake.add_subscription("bob", "pro", external_id="sub_bob")
    (tmp_path / "mapping.csv").write_text(
        "user_id,org_id,org_name,email\nalice,acme,Acmé,\nbob,globex,Globex,\n", encoding="utf-8"
    )
    journal = tmp_path / "journal.jsonl"
    code, output = migrate(fake, tmp_path, "--execute", "--journal", str(journal))
    assert code == 0, output
    with journal.open("ab") as torn:  # (the next record's first bytes, cut inside "é")
        torn.write('{"type":"step","org_id":"acme","note":"Acmé'.encode()[:-1])

    writes = len(fake.write_requests)
    code, output = migrate(fake, tmp_path, "--execute", "--journal", str(journal))
    assert code == 0, output
    assert "2 orgs done before, skipping them" in output, output
    assert len(fake.write_requests) == writes
    # (the resumed run's records start on a line of their own: none is glued to the torn one and lost)
    lines = journal.read_bytes().split(b"\n")
    assert sum(line.startswith(b'{"type":"run"') for line in lines) == 2, lines[-4:]
    code, output = migrate(fake, tmp_path, "--verify")
    assert code == 0, output


# --- plans the users had scheduled -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_plan_a_user_bought_to_start_later_that_the_org_does_not_take_is_named(
    fake: FakeLago, client: LagoClient
) -> None:
    """Bob bought enterprise starting next month (a subscription of its own, pending); alice is on pro now. The org
    takes pro (the active plan) and bob's enterprise is canceled: a purchase lost without a word (the dry run listed
    "cancel bob's pending subscription", no warning said that the org never gets that plan)."""
    fake.add_customer("alice", name="Alice")
    fake.add_subscription("alice", "pro", external_id="sub_alice")
    fake.add_customer("bob", name="Bob")
    fake.add_subscription("bob", "enterprise", external_id="sub_bob_next", subscription_at="2026-04-01T00:00:00Z")
    org = OrgMapping("acme", "Acme", None, ("alice", "bob"))
    dry = await run_migration(client, [org], mode="dry-run")
    [result] = dry.orgs
    assert result.plan_code == "pro"
    assert ("cancel_subscription", "sub_bob_next") in [(step.kind, step.target) for step in result.steps]
    named = [w for w in result.warnings if "sub_bob_next" in w]
    assert named and "enterprise" in named[0] and "change_plan" in named[0], result.warnings


@pytest.mark.anyio
async def test_a_downgrade_the_donor_had_scheduled_is_named(fake: FakeLago, client: LagoClient) -> None:
    """Bob had downgraded pro to starter at the end of his period (Lago's pending subscription with
    ``previous_plan_code``). The org takes pro from his subscription and the downgrade ends with it: the org pays pro
    from then on, not the starter bob had chosen, and nothing said so."""
    fake.add_customer("bob", name="Bob")
    fake.add_subscription("bob", "pro", external_id="sub_bob")
    fake.add_subscription("bob", "starter", external_id="sub_bob")  # a downgrade: pending until the period's end
    org = OrgMapping("acme", "Acme", None, ("bob",))
    run = await run_migration(client, [org], mode="execute")
    [result] = run.orgs
    assert run.ok and result.plan_code == "pro", result.errors
    named = [w for w in result.warnings if "starter" in w and "sub_bob" in w]
    assert named and "change_plan" in named[0], result.warnings


# --- verify after a partial run ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_verify_names_every_subscription_a_user_still_has(fake: FakeLago, client: LagoClient) -> None:
    """--verify read one page of 20 of each user's subscriptions: a user with 25 still active was reported with 20 of
    them, as if the other 5 were ended."""
    fake.add_customer("carol", name="Carol")
    for index in range(25):
        fake.add_subscription("carol", "starter", external_id=f"sub_carol_{index:02d}")
    org = OrgMapping("acme", "Acme", None, ("carol",))
    run = await run_migration(client, [org], mode="verify")
    text = "\n".join(run.orgs[0].errors)
    missing = [f"sub_carol_{index:02d}" for index in range(25) if f"sub_carol_{index:02d}" not in text]
    assert missing == [], text


@pytest.mark.anyio
async def test_many_subscriptions_are_all_ended_across_pages(fake: FakeLago, client: LagoClient) -> None:
    """A user with more subscriptions than a page of Lago's listing (100): every one is ended, the org subscribed
    once, and a second run writes nothing."""
    fake.add_customer("dave", name="Dave")
    for index in range(105):
        fake.add_subscription("dave", "starter", external_id=f"sub_dave_{index:03d}")
    org = OrgMapping("acme", "Acme", None, ("dave",))
    run = await run_migration(client, [org], mode="execute")
    assert run.ok, run.orgs[0].errors
    active = [s for s in fake.subscriptions if s["status"] == "active"]
    assert [(s["external_customer_id"], s["external_id"]) for s in active] == [("acme", "acme")]
    assert (await run_migration(client, [org], mode="verify")).ok
    again = await run_migration(client, [org], mode="execute")
    assert again.orgs[0].steps == []


def test_a_file_that_is_not_a_journal_is_refused_saying_what_to_do(fake: FakeLago, tmp_path: Path) -> None:
    """--journal naming a file that is not a journal (not UTF-8: another file given by mistake) stops with exit 2
    before anything is written, as before; the message said only "cannot be read (UnicodeDecodeError: 'utf-8' codec
    can't decode byte 0xff...)", not what the file should be nor what to do."""
    fake.add_customer("alice", name="Alice")
    (tmp_path / "mapping.csv").write_text("user_id,org_id,org_name,email\nalice,acme,Acme,\n", encoding="utf-8")
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(b"\xff\xfe{\x00}\x00\n")
    code, output = migrate(fake, tmp_path, "--execute", "--journal", str(journal))
    assert code == 2 and fake.write_requests == [], output
    assert "not a journal" in output and "a new path" in output, output
