"""The migration with someone else writing meanwhile: a customer write made again after Lago's `value_already_exist`
keeps what others wrote, an org subscribed by another run at the same time is not downgraded, the dry run reads a
journal an `--execute` is writing, against the emulator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._migration import run_migration
from lago_org_billing.testing import FakeLago
from test_migration_resume import ACME, API_KEY, LoseAnswer, new_fake

pytestmark = pytest.mark.anyio


class BeforeFirst(httpx.AsyncBaseTransport):
    """Runs ``action`` once, just before the first ``METHOD PATH`` request reaches Lago (someone else writing between
    the migration's plan and its write)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, request_line: str, action: Callable[[], object]) -> None:
        self.inner, self.request_line, self.action = inner, request_line, action
        self.done = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.done and f"{request.method} {request.url.path}" == self.request_line:
            self.done = True
            self.action()
        return await self.inner.handle_async_request(request)


class AfterLost(httpx.AsyncBaseTransport):
    """``LoseAnswer``, then ``action`` once before the client's retry reaches Lago."""

    def __init__(self, lossy: LoseAnswer, action: Callable[[], object]) -> None:
        self.lossy, self.action = lossy, action
        self.done = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.lossy.lost is not None and not self.done:
            self.done = True
            self.action()
        return await self.lossy.handle_async_request(request)


async def execute(fake: FakeLago, transport: httpx.AsyncBaseTransport) -> Any:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=transport) as client:
        return await run_migration(client, [ACME], mode="execute")


def customer(fake: FakeLago, external_id: str) -> dict[str, Any]:
    return next(c for c in fake.customers if c["external_id"] == external_id)


def metadata(fake: FakeLago, external_id: str) -> dict[str, str]:
    return {m["key"]: m["value"] for m in customer(fake, external_id)["metadata"]}


def items(fake: FakeLago, external_id: str, **extra: str) -> list[dict[str, Any]]:
    """The customer's metadata items with their ids (as an update keeping them sends them), plus ``extra``."""
    kept = [
        {"id": m["lago_id"], "key": m["key"], "value": m["value"], "display_in_invoice": m["display_in_invoice"]}
        for m in customer(fake, external_id)["metadata"]
    ]
    return kept + [{"key": k, "value": v, "display_in_invoice": False} for k, v in extra.items()]


async def test_an_org_customer_made_by_the_app_meanwhile_keeps_its_metadata_name_and_email() -> None:
    """The app's setup endpoint (``OrgBilling.create_org_customer``) makes the org's customer while the migration runs,
    between its plan (no org customer) and its write. The write collides (``value_already_exist`` on billing_type) and
    was made again over the app's customer: its name and billing email overwritten (the migration never overwrites an
    existing one), its created_by_user_id replaced and its own metadata key (region) deleted."""
    fake = new_fake()

    def app_creates_the_org() -> None:
        fake.add_customer(
            "acme",
            name="Acme Corp (app)",
            email="finance@acme.test",
            metadata=[
                {"key": "billing_type", "value": "organization", "display_in_invoice": False},
                {"key": "created_by_user_id", "value": "dave", "display_in_invoice": False},
                {"key": "region", "value": "eu", "display_in_invoice": False},
            ],
        )

    run = await execute(fake, BeforeFirst(fake.transport(), "POST /api/v1/customers", app_creates_the_org))
    assert run.ok, run.orgs[0].errors
    acme = customer(fake, "acme")
    assert (acme["name"], acme["email"]) == ("Acme Corp (app)", "finance@acme.test")
    assert metadata(fake, "acme") == {
        "billing_type": "organization",
        "created_by_user_id": "dave",
        "region": "eu",
        "migrated_from_user": "alice,bob,carol",
    }


async def test_another_batch_marking_the_org_meanwhile_keeps_its_users_in_migrated_from() -> None:
    """Two mapping batches run at once, each with some of the org's users: the other batch's write lands between this
    run's plan and its write. Its migrated_from_user (alice,bob) was replaced by this run's users only, and its
    created_by_user_id overwritten, where runs one after the other merge them."""
    fake = new_fake()

    def other_batch_marks_the_org() -> None:
        fake.add_customer(
            "acme",
            name="Acme",
            metadata=[
                {"key": "billing_type", "value": "organization", "display_in_invoice": False},
                {"key": "migrated_from_user", "value": "erin,frank", "display_in_invoice": False},
                {"key": "created_by_user_id", "value": "erin", "display_in_invoice": False},
            ],
        )

    run = await execute(fake, BeforeFirst(fake.transport(), "POST /api/v1/customers", other_batch_marks_the_org))
    assert run.ok, run.orgs[0].errors
    assert metadata(fake, "acme") == {
        "billing_type": "organization",
        "migrated_from_user": "erin,frank,alice,bob,carol",
        "created_by_user_id": "erin",
    }


async def test_a_key_added_between_a_lost_answer_and_its_retry_is_kept() -> None:
    """The org customer's POST made by Lago, its answer lost; before the client's retry, someone adds a metadata item
    (the app's ``update_org_customer``). The retry collides, the customer is read again (with that item) and the
    metadata resent without it: Lago deleted it."""
    fake = new_fake()
    lossy = LoseAnswer(fake.transport(), 1)

    def someone_adds_a_key() -> None:
        fake.add_customer("acme", metadata=items(fake, "acme", crm_id="42"))

    run = await execute(fake, AfterLost(lossy, someone_adds_a_key))
    assert lossy.lost == "POST /api/v1/customers"
    assert run.ok, run.orgs[0].errors
    assert metadata(fake, "acme")["crm_id"] == "42"
    assert set(metadata(fake, "acme")) == {"billing_type", "migrated_from_user", "created_by_user_id", "crm_id"}


async def test_an_org_customer_made_meanwhile_with_five_items_is_migrated_with_a_warning() -> None:
    """The app made the org customer meanwhile with 5 metadata items (Lago's limit), billing_type among them: the
    write made again added migrated_from_user as a 6th (Lago: invalid_count), or dropped the app's items. The org is
    migrated, its items kept, and a warning says what was not written, as when the plan sees 5 items."""
    fake = new_fake()
    app_items = {"billing_type": "organization", "created_by_user_id": "dave", "a": "1", "b": "2", "c": "3"}

    def app_creates_the_org() -> None:
        meta = [{"key": k, "value": v, "display_in_invoice": False} for k, v in app_items.items()]
        fake.add_customer("acme", name="Acme", metadata=meta)

    run = await execute(fake, BeforeFirst(fake.transport(), "POST /api/v1/customers", app_creates_the_org))
    result = run.orgs[0]
    assert run.ok and result.status == "migrated", result.errors
    assert metadata(fake, "acme") == app_items
    assert any("migrated_from_user not written" in warning for warning in result.warnings), result.warnings


async def test_a_user_customer_key_added_before_its_mark_is_kept() -> None:
    """A user customer's mark (migrated_to_org) answered late: lost, and a key added to that customer before the
    retry. The mark made again deleted the key."""
    fake = new_fake()
    lossy = LoseAnswer(fake.transport(), 8)  # (the 8th write: the first user mark)

    def someone_adds_a_key() -> None:
        assert lossy.lost == "POST /api/v1/customers", lossy.lost
        marked = [c["external_id"] for c in fake.customers if "migrated_to_org" in metadata(fake, c["external_id"])]
        assert len(marked) == 1, marked
        fake.add_customer(marked[0], metadata=items(fake, marked[0], crm_id="7"))
        added.append(marked[0])

    added: list[str] = []
    run = await execute(fake, AfterLost(lossy, someone_adds_a_key))
    assert run.ok, run.orgs[0].errors
    assert added and metadata(fake, added[0]) == {"migrated_to_org": "acme", "crm_id": "7"}


async def test_an_org_subscribed_meanwhile_by_another_run_is_not_downgraded() -> None:
    """Two batches of the mapping at once with the org's users split between them (separate journals: no lock between
    them). The other batch (bob, pro) subscribed the org between this run's plan (no org subscription) and its
    ``POST /subscriptions`` with alice's starter: Lago took it as a downgrade of the org, at the period's end, and the
    run said "migrated" (then carried alice's starter overrides onto the pro subscription). A run after the other
    keeps the org's subscription. Now the downgrade is canceled and the org fails, saying to run again; run again, it
    keeps pro and ends alice's subscription."""
    from lago_org_billing._migration import OrgMapping

    fake = new_fake()
    batch = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("alice",))

    def other_batch_subscribes_the_org() -> None:
        fake.add_customer("acme", name="Acme")
        fake.add_subscription("acme", "pro", external_id="acme")

    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    racing = BeforeFirst(fake.transport(), "POST /api/v1/subscriptions", other_batch_subscribes_the_org)
    async with LagoClient(settings, transport=racing) as client:
        run = await run_migration(client, [batch], mode="execute")
    result = run.orgs[0]
    acme = [
        (s["plan_code"], s["status"], s.get("next_plan_code")) for s in fake.subscriptions if s["external_id"] == "acme"
    ]
    assert ("pro", "active", None) in acme and not any(status == "pending" for _, status, _ in acme), acme
    assert result.status == "failed" and "run again" in " ".join(result.errors), result.errors
    assert [s["status"] for s in fake.subscriptions if s["external_id"] == "sub_alice"] == ["active"]

    async with LagoClient(settings, transport=fake.transport()) as client:
        run = await run_migration(client, [batch], mode="execute")
    assert run.ok, run.orgs[0].errors
    acme = [
        (s["plan_code"], s["status"], s.get("next_plan_code")) for s in fake.subscriptions if s["external_id"] == "acme"
    ]
    assert ("pro", "active", None) in acme and not any(status == "pending" for _, status, _ in acme), acme
    assert [s["status"] for s in fake.subscriptions if s["external_id"] == "sub_alice"] == ["terminated"]


async def test_an_org_subscribed_meanwhile_on_a_cheaper_plan_is_said_to_be_upgraded() -> None:
    """The other batch (alice, starter) subscribed the org meanwhile; this run's POST with bob's pro upgraded it at once
    (Lago cannot undo that): the run said nothing of it. Now a warning names both plans."""
    from lago_org_billing._migration import OrgMapping

    fake = new_fake()
    batch = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("bob",))

    def other_batch_subscribes_the_org() -> None:
        fake.add_customer("acme", name="Acme")
        fake.add_subscription("acme", "starter", external_id="acme")

    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    racing = BeforeFirst(fake.transport(), "POST /api/v1/subscriptions", other_batch_subscribes_the_org)
    async with LagoClient(settings, transport=racing) as client:
        run = await run_migration(client, [batch], mode="execute")
    result = run.orgs[0]
    assert result.status == "migrated", result.errors
    assert any("'starter'" in w and "'pro'" in w and "another run" in w for w in result.warnings), result.warnings


def test_a_dry_run_reads_a_journal_an_execute_is_writing_without_touching_it(tmp_path: Path) -> None:
    """(Checked, holds.) A dry run given the journal of an --execute still running (its lock held, its last line being
    written): it neither waits for nor takes the lock, leaves the journal as it is, ignores the torn line and counts
    the orgs done from the complete ones."""
    from lago_org_billing._migration import JournalLock
    from test_migration_resume import MAPPING, _migrate

    fake = new_fake()
    (tmp_path / "mapping.csv").write_text(MAPPING)
    journal = tmp_path / "journal.jsonl"
    code, output = _migrate(fake.base_url, fake, tmp_path, "--execute", "--journal", str(journal))
    assert code == 0, output
    with journal.open("a") as handle:
        handle.write('{"type":"org","org_id":"acme","status":"fail')  # (being written)
    before = journal.read_bytes()
    with JournalLock(journal):
        code, output = _migrate(fake.base_url, fake, tmp_path, "--journal", str(journal))
    assert code == 0, output
    assert "1 orgs done before, skipping them" in output, output
    assert journal.read_bytes() == before
