"""The migration and what a user customer holds besides subscriptions.

A real Lago account's user customers also hold prepaid credits (wallets, maybe with recurring top-ups), active
coupons, a payment provider link (``billing_configuration``) and integration customers, unpaid invoices and credit
notes with credit left. The migration moves none of them (it never moves money), and used to say nothing: after
``--execute`` the org paid full price while the users' credits and coupons sat on customers nobody bills, and its
invoices had no payment method. Covered here:

* the emulator lists them as Lago does (``GET /wallets``, ``/applied_coupons``, ``/credit_notes``, customers'
  ``billing_configuration`` and ``integration_customers``, invoices' ``payment_status``), answers that validate
  against Lago's OpenAPI spec, seeded by ``add_wallet``/``add_applied_coupon``/``add_credit_note`` or ``seed()``;
* the dry run reports, per org, what each user holds that will not move, with amounts;
* ``execute`` refuses such an org (before any write) unless ``MigrationOptions.accept_unmoved`` accepts those
  kinds, a resumed run (the second phase after ``prepare_only``) deciding the same;
* ``verify`` lists the orgs whose users still hold them;
* an account without any is migrated as before, with the same report.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from _openapi import assert_response_matches
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import InvalidRequestError
from lago_org_billing._migration import (
    Journal,
    MigrationOptions,
    OrgMapping,
    UnmovedHoldingsError,
    run_migration,
)
from lago_org_billing.testing import FakeLago, FakeLagoError

pytestmark = pytest.mark.anyio

API_KEY = "k"
ACME = OrgMapping(org_id="acme", org_name="Acme", email="billing@acme.test", users=("alice", "bob"))
PLAIN = OrgMapping(org_id="plain", org_name="Plain", email=None, users=("carol",))


@pytest.fixture
def fake() -> FakeLago:
    """Alice (pro, Stripe, a 25-credit wallet with monthly top-ups, a coupon, an unpaid invoice, a credit note) and
    Bob (starter) make org acme; Carol (starter, nothing else) makes org plain."""
    clock = [datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)]
    fake = FakeLago(api_key=API_KEY, clock=lambda: clock[0])
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_customer(
        "alice",
        name="Alice",
        currency="USD",
        billing_configuration={
            "payment_provider": "stripe",
            "payment_provider_code": "stripe-us",
            "provider_customer_id": "cus_A",
        },
        integration_customers=[
            {"integration_type": "anrok", "integration_code": "anrok-1", "external_customer_id": "an_9"}
        ],
    )
    fake.add_customer("bob", name="Bob")
    fake.add_customer("carol", name="Carol")
    fake.add_subscription("alice", "pro", external_id="sub_alice")
    clock[0] += timedelta(days=1)
    fake.add_subscription("bob", "starter", external_id="sub_bob")
    fake.add_subscription("carol", "starter", external_id="sub_carol")
    fake.add_wallet(
        "alice",
        code="prepaid",
        credits_balance="25.0",
        recurring_transaction_rules=[{"trigger": "interval", "interval": "monthly", "paid_credits": "10.0"}],
    )
    fake.add_wallet("bob", code="old", balance_cents=700, status="terminated")  # (terminated: not held)
    fake.add_applied_coupon("alice", "startup", amount_cents=3_000, frequency="once", amount_cents_remaining=1_200)
    invoice = fake.add_invoice("alice", total_amount_cents=4_200, currency="USD", payment_status="failed")
    fake.add_credit_note(invoice["lago_id"], credit_amount_cents=900)
    fake.add_invoice("alice", total_amount_cents=999, currency="USD", payment_status="succeeded")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


def _active(fake: FakeLago, customer_id: str) -> list[str]:
    return [
        str(s["external_id"])
        for s in fake.subscriptions
        if s["external_customer_id"] == customer_id and s["status"] == "active"
    ]


# ----------------------------------------------------------------------------------------------- emulator


async def test_the_emulator_lists_what_customers_hold_as_the_spec_says(fake: FakeLago) -> None:
    """Wallets, applied coupons, credit notes, a customer's payment provider and integrations, unpaid invoices: each
    listing answers what was seeded, filtered as Lago filters, and validates against Lago's OpenAPI spec."""
    async with fake.client() as http:
        wallets = await http.get("/api/v1/wallets", params={"external_customer_id": "alice"})
        unknown = await http.get("/api/v1/wallets", params={"external_customer_id": "nobody"})
        coupons = await http.get(
            "/api/v1/applied_coupons", params={"external_customer_id": "alice", "status": "active"}
        )
        none = await http.get(
            "/api/v1/applied_coupons", params={"external_customer_id": "alice", "status": "terminated"}
        )
        notes = await http.get(
            "/api/v1/credit_notes", params={"external_customer_id": "alice", "credit_status": "available"}
        )
        alice = await http.get("/api/v1/customers/alice")
        unpaid = await http.get(
            "/api/v1/invoices",
            params=[
                ("external_customer_id", "alice"),
                ("payment_statuses[]", "pending"),
                ("payment_statuses[]", "failed"),
            ],
        )
    for response in (wallets, coupons, none, notes, alice, unpaid):
        assert response.status_code == 200, response.text
        assert_response_matches(response)
    assert unknown.status_code == 404 and unknown.json()["code"] == "customer_not_found"
    [wallet] = wallets.json()["wallets"]
    assert (wallet["status"], wallet["balance_cents"], wallet["credits_balance"], wallet["code"]) == (
        "active",
        2500,
        "25.0",
        "prepaid",
    )
    assert wallet["recurring_transaction_rules"][0]["paid_credits"] == "10.0"
    [coupon] = coupons.json()["applied_coupons"]
    assert (coupon["coupon_code"], coupon["amount_cents_remaining"], coupon["amount_currency"]) == (
        "startup",
        1200,
        "USD",
    )
    assert none.json()["applied_coupons"] == []
    [note] = notes.json()["credit_notes"]
    assert (note["balance_amount_cents"], note["credit_status"]) == (900, "available")
    body = alice.json()["customer"]
    assert body["billing_configuration"]["provider_customer_id"] == "cus_A"
    assert [(i["type"], i["integration_code"]) for i in body["integration_customers"]] == [("anrok", "anrok-1")]
    assert [i["payment_status"] for i in unpaid.json()["invoices"]] == ["failed"]


def test_the_emulator_seeds_wallets_coupons_and_credit_notes() -> None:
    """``add_wallet`` derives the credits from ``balance_cents`` by ``rate_amount`` and the currency's subunits; a
    wallet in another currency than the customer's is refused as Lago refuses it; all three show in snapshots."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_customer("u1", currency="EUR")
    wallet = fake.add_wallet("u1", currency="EUR", balance_cents=1234, rate_amount="2")
    assert (wallet["balance_cents"], wallet["credits_balance"], wallet["rate_amount"]) == (1234, "6.17", "2.0")
    with pytest.raises(FakeLagoError, match="currencies_does_not_match"):
        fake.add_wallet("u1", currency="USD", credits_balance="1")
    fake.add_applied_coupon("u1", "c10", percentage_rate="10.0", frequency="recurring", frequency_duration=3)
    note = fake.add_credit_note(fake.add_invoice("u1", total_amount_cents=500)["lago_id"], credit_amount_cents=200)
    state = json.loads(fake.snapshot())
    assert [w["balance_cents"] for w in state["wallets"]] == [1234]
    assert state["applied_coupons"][0]["frequency_duration_remaining"] == 3
    assert state["credit_notes"][0]["lago_id"] == note["lago_id"] and note["balance_amount_cents"] == 200


# ---------------------------------------------------------------------------------------------- migration


async def test_the_dry_run_reports_what_each_user_holds_with_amounts(fake: FakeLago, client: LagoClient) -> None:
    """Per org: Alice's wallet (25.00 USD, its top-ups), coupon (12.00 USD left), Stripe link the org lacks, anrok
    integration, failed invoice (42.00 USD due) and credit note (9.00 USD left), each with its amount and what to
    do; Bob's terminated wallet is not held. The org that ``execute`` would refuse fails in the dry run too."""
    before = fake.snapshot()
    run = await run_migration(client, [ACME, PLAIN], mode="dry-run")
    acme, plain = run.orgs
    assert fake.snapshot() == before
    held = {(u.kind, u.user_id): u for u in acme.unmoved}
    assert sorted(held) == [
        ("coupons", "alice"),
        ("credit_notes", "alice"),
        ("integrations", "alice"),
        ("payment_provider", "alice"),
        ("unpaid_invoices", "alice"),
        ("wallets", "alice"),
    ]
    assert (held["wallets", "alice"].amount_cents, held["wallets", "alice"].currency) == (2500, "USD")
    assert "25.00 USD" in held["wallets", "alice"].what and "recurring top-up" in held["wallets", "alice"].what
    assert "12.00 USD left" in held["coupons", "alice"].what
    assert "42.00 USD due" in held["unpaid_invoices", "alice"].what
    assert "9.00 USD" in held["credit_notes", "alice"].what
    assert "cus_A" in held["payment_provider", "alice"].what
    assert acme.status == "failed" and isinstance(acme.exception, UnmovedHoldingsError)
    error = acme.errors[0]
    for said in ("25.00 USD", "12.00 USD left", "stripe", "anrok", "POST /wallets", "--accept-unmoved"):
        assert said in error, said
    report = run.to_json()["orgs"]
    assert {item["kind"] for item in report[0]["unmoved"]} >= {"wallets", "coupons", "payment_provider"}
    assert plain.status == "planned" and plain.unmoved == [] and "unmoved" not in report[1]


async def test_execute_refuses_the_org_before_any_write_and_migrates_the_others(
    fake: FakeLago, client: LagoClient
) -> None:
    """Without ``accept_unmoved``, acme is not touched (Alice and Bob keep their subscriptions, no org customer)
    while plain, whose user holds nothing, is migrated."""
    run = await run_migration(client, [ACME, PLAIN], mode="execute")
    acme, plain = run.orgs
    assert acme.status == "failed" and "not migrated" in acme.errors[0]
    assert plain.status == "migrated"
    assert _active(fake, "alice") == ["sub_alice"] and _active(fake, "bob") == ["sub_bob"]
    assert not any(c["external_id"] == "acme" for c in fake.customers)
    assert not any(r.path.startswith("/api/v1/subscriptions") and "acme" in str(r.body) for r in fake.write_requests)


async def test_accepting_some_kinds_is_not_accepting_the_others(fake: FakeLago, client: LagoClient) -> None:
    """Accepting wallets and coupons still refuses the Stripe link and the integration the org lacks, naming only
    those; accepting them all migrates the org, leaves the wallet and coupon as they were (no money moved) and
    says in a warning what stays where."""
    options = MigrationOptions(accept_unmoved={"wallets", "coupons"})
    run = await run_migration(client, [ACME], mode="execute", options=options)
    [acme] = run.orgs
    assert acme.status == "failed"
    assert "--accept-unmoved payment_provider,integrations" in acme.errors[0]
    assert "POST /wallets" not in acme.errors[0]
    wallets_before = json.loads(fake.snapshot())["wallets"]
    run = await run_migration(client, [ACME], mode="execute", options=MigrationOptions(accept_unmoved="all"))
    [acme] = run.orgs
    assert acme.status == "migrated", acme.errors
    assert _active(fake, "alice") == [] and _active(fake, "acme") == ["acme"]
    assert json.loads(fake.snapshot())["wallets"] == wallets_before
    assert any("left on its users' customers" in w and "25.00 USD" in w for w in acme.warnings)
    assert json.loads(json.dumps(run.to_json()))["options"]["accept_unmoved"] == [
        "coupons",
        "integrations",
        "payment_provider",
        "wallets",
    ]


async def test_the_second_phase_decides_as_the_first_said_it_would(
    fake: FakeLago, client: LagoClient, tmp_path: Path
) -> None:
    """``prepare_only`` makes the org customer and subscription (nothing is lost while the users' run) and warns;
    the second phase, resumed from the journal, refuses; once the org customer has a payment provider and
    integration of its own, accepting the wallet and coupon is enough."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    first = await run_migration(
        client, [ACME], mode="execute", options=MigrationOptions(prepare_only=True), journal=journal
    )
    assert first.orgs[0].status == "prepared"
    assert any("the second phase" in w and "refuses this org" in w for w in first.orgs[0].warnings)
    second = await run_migration(client, [ACME], mode="execute", journal=journal)
    assert second.orgs[0].status == "failed" and _active(fake, "alice") == ["sub_alice"]
    again = await run_migration(client, [ACME], mode="execute", journal=journal)  # (not skipped: it failed)
    assert again.orgs[0].status == "failed"
    fake.add_customer(
        "acme",
        billing_configuration={"payment_provider": "stripe", "provider_customer_id": "cus_ORG"},
        integration_customers=[
            {"integration_type": "anrok", "integration_code": "anrok-1", "sync_with_provider": True}
        ],
    )
    options = MigrationOptions(accept_unmoved=("wallets", "coupons"))
    last = await run_migration(client, [ACME], mode="execute", options=options, journal=journal)
    journal.close()
    assert last.orgs[0].status == "migrated", last.orgs[0].errors
    assert {u.kind for u in last.orgs[0].unmoved} == {"wallets", "coupons", "unpaid_invoices", "credit_notes"}
    assert _active(fake, "alice") == [] and _active(fake, "bob") == []


async def test_verify_lists_orgs_whose_users_still_hold_them(fake: FakeLago, client: LagoClient) -> None:
    """After a migration that accepted them, ``verify`` without the same acceptance fails the org naming Alice's
    wallet and coupon; with it, the org verifies and they are warnings."""
    options = MigrationOptions(accept_unmoved="all")
    assert (await run_migration(client, [ACME, PLAIN], mode="execute", options=options)).ok
    run = await run_migration(client, [ACME, PLAIN], mode="verify")
    acme, plain = run.orgs
    assert acme.status == "unverified" and plain.status == "verified"
    text = "\n".join(acme.errors)
    assert "wallet prepaid" in text and "25.00 USD" in text and "coupon startup" in text and "stripe" in text
    run = await run_migration(client, [ACME], mode="verify", options=options)
    assert run.orgs[0].status == "verified", run.orgs[0].errors
    assert any("wallet prepaid" in w for w in run.orgs[0].warnings)


async def test_a_key_that_may_not_read_wallets_fails_the_org_unless_accepted(
    fake: FakeLago, client: LagoClient
) -> None:
    """A 403 on ``GET /wallets`` (an API key without that permission) is not read as 'no wallet': the org fails saying
    so (not the whole run), unless wallets are accepted."""
    fake.inject_fault(status=403, path="/api/v1/wallets")
    run = await run_migration(client, [ACME], mode="execute", options=MigrationOptions(accept_unmoved={"coupons"}))
    assert run.aborted is None and run.orgs[0].status == "failed"
    assert "may not read" in run.orgs[0].errors[0] and "--accept-unmoved wallets" in run.orgs[0].errors[0]
    run = await run_migration(client, [ACME], mode="dry-run", options=MigrationOptions(accept_unmoved="all"))
    assert run.orgs[0].status == "planned" and any("GET /wallets" in w for w in run.orgs[0].warnings)


def test_accept_unmoved_is_checked_and_leaves_journal_fingerprints_as_they_were() -> None:
    """Unknown kinds are refused, naming the known ones; a comma-separated string and ``all`` are read; the
    fingerprint of an org (which journals skip orgs by) does not depend on it."""
    with pytest.raises(InvalidRequestError, match=r"'wallet'; choose among wallets, coupons"):
        MigrationOptions(accept_unmoved={"wallet"})
    assert MigrationOptions(accept_unmoved="coupons, wallets").accept_unmoved == ("coupons", "wallets")
    assert len(MigrationOptions(accept_unmoved=["all"]).accept_unmoved) == 4
    assert ACME.fingerprint(MigrationOptions()) == ACME.fingerprint(MigrationOptions(accept_unmoved="all"))


# ----------------------------------------------------------------------------------------------- CLI and OrgBilling


def _cli(fake: FakeLago, tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    import argparse
    import io

    from lago_org_billing._migration_cli import add_migrate_command, run_migrate_command

    mapping = tmp_path / "mapping.csv"
    mapping.write_text("user_id,org_id,org_name,email\nalice,acme,Acme,\nbob,acme,Acme,\ncarol,plain,Plain,\n")
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["migrate", "--mapping-file", str(mapping), *argv])
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    out, err = io.StringIO(), io.StringIO()
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_the_cli_dry_run_prints_what_is_not_moved_and_execute_needs_accept_unmoved(
    fake: FakeLago, tmp_path: Path
) -> None:
    """``migrate`` (dry run) lists each org's holdings left on its users' customers under its steps; ``--execute``
    refuses acme (its message naming ``--accept-unmoved``, which the CLI takes) and migrates plain; ``--execute
    --accept-unmoved all`` migrates acme too, moving nothing of what it holds."""
    code, out, _ = _cli(fake, tmp_path)
    assert code == 1, out  # (a plan with a problem: acme would be refused)
    assert "not moved: user alice" in out and "prepaid" in out
    assert "--accept-unmoved" in out
    code, out, _ = _cli(fake, tmp_path, "--execute")
    assert code != 0
    assert "--accept-unmoved" in out
    assert _active(fake, "alice") == ["sub_alice"] and _active(fake, "carol") == []
    code, out, _ = _cli(fake, tmp_path, "--execute", "--accept-unmoved", "all")
    assert code == 0, out
    assert _active(fake, "alice") == [] and _active(fake, "acme")
    code, out, err = _cli(fake, tmp_path, "--execute", "--accept-unmoved", "wallet")  # (a typo: said, exit 2)
    assert code == 2
    assert "unknown kind(s) 'wallet'" in err


async def test_org_billing_migrates_a_user_with_holdings_only_when_told(fake: FakeLago) -> None:
    """``OrgBilling.migrate_user_to_org`` raises ``UnmovedHoldingsError`` (public) for alice, and migrates her with
    ``accept_unmoved="all"``."""
    import lago_org_billing
    from lago_org_billing import OrgBilling

    assert lago_org_billing.UnmovedHoldingsError is UnmovedHoldingsError
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with OrgBilling(settings, transport=fake.transport()) as billing:
        with pytest.raises(UnmovedHoldingsError) as refused:
            await billing.migrate_user_to_org("alice", "acme", "Acme")
        assert {u.kind for u in refused.value.unmoved} >= {"wallets", "coupons", "payment_provider"}
        assert _active(fake, "alice") == ["sub_alice"]
        done = await billing.migrate_user_to_org("alice", "acme", "Acme", accept_unmoved="all")
    assert done["changed"]
    assert _active(fake, "alice") == []
