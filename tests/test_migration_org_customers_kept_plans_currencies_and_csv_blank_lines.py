"""The user->org migration (against the emulator): an org id that is an unmapped user's customer is refused, not
taken for the org's (billed on the user's card); an org subscription kept on a cheaper plan than the one its users pay
is warned of; an org customer whose currency is not the plan's fails in the plan, before any write, not at
``--execute`` after one with Lago's bare 422; a mapping CSV with a blank first line is read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._migration import MigrationOptions, OrgMapping, read_mapping_file, run_migration
from lago_org_billing.testing import FakeLago
from test_migration import subs

API_KEY = "k"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_plan("pro_eur", amount_cents=5_000, amount_currency="EUR")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


# --- an org id that is a user's customer (not in the mapping) -------------------------------------------------------


def _churned_user_42(fake: FakeLago, *, still_subscribed: bool) -> None:
    """User 42's customer from the user-keyed integration (ids of users and orgs from two integer sequences: user 42
    and org 42 both exist), with its card on file; user 42 is in no org, so not in the mapping."""
    fake.add_customer(
        "42",
        name="Dave Smith",
        email="dave@home.test",
        billing_configuration={"payment_provider": "stripe", "provider_customer_id": "cus_dave"},
    )
    fake.add_subscription("42", "pro", external_id="sub_42")
    if not still_subscribed:
        fake.store.terminate_subscription("sub_42", {"on_termination_invoice": "skip"})
    fake.add_customer("7", name="Erin")
    fake.add_subscription("7", "pro", external_id="sub_7")


@pytest.mark.anyio
async def test_an_org_id_that_is_an_unmapped_user_s_customer_is_refused_before_any_write(
    fake: FakeLago, client: LagoClient
) -> None:
    """Org 42 (users: 7) is migrated while customer 42 is user Dave's (its subscription ended; Dave is in no org). The
    migration takes Dave's customer for the org's: it marks it billing_type=organization and subscribes it, so org
    42's invoices go to Dave's name and email and are charged to his Stripe card; the dry run, --execute and --verify
    all say OK. A customer that is not marked billing_type=organization and has subscriptions of its own (not the
    org subscription id) is a user's: the org should fail before any write, saying so."""
    _churned_user_42(fake, still_subscribed=False)
    org = OrgMapping("42", "Org Forty-Two", "billing@org42.test", ("7",))
    dry = await run_migration(client, [org], mode="dry-run")
    assert not dry.ok, (dry.orgs[0].warnings, [s.description for s in dry.orgs[0].steps])

    run = await run_migration(client, [org], mode="execute")
    assert not run.ok and "42" in run.orgs[0].errors[0]
    assert [s["external_id"] for s in subs(fake, "42")] == [], "org 42 billed on Dave's customer (and card)"
    dave = next(c for c in fake.customers if c["external_id"] == "42")
    assert dave["metadata"] == [] and [s["external_id"] for s in subs(fake, "7")] == ["sub_7"]


@pytest.mark.anyio
async def test_an_org_id_that_is_a_subscribed_user_s_customer_is_not_told_to_end_the_user_s_subscription(
    fake: FakeLago, client: LagoClient
) -> None:
    """Same, Dave still subscribed: the org fails (good), but its error tells to terminate 'sub_42' so that "the
    migration then creates its own", which would end a paying user's subscription and then bill org 42 on his
    customer and card."""
    _churned_user_42(fake, still_subscribed=True)
    run = await run_migration(client, [OrgMapping("42", "Org Forty-Two", None, ("7",))], mode="dry-run")
    (error,) = run.orgs[0].errors
    assert "terminate that subscription" not in error, error


@pytest.mark.anyio
async def test_a_user_subscription_under_the_org_s_subscription_id_is_said_in_the_dry_run(
    fake: FakeLago, client: LagoClient
) -> None:
    """Customer 42 is user Dave's, subscribed as the seed's user-keyed integration did (``create_subscription(user_id,
    ...)``: its subscription's id is 42, the org's subscription id under the default template). Org 42's migration
    takes that subscription for the org's own and keeps it: not refused (an org subscribed by hand in Lago's UI looks
    the same), but the dry run says the customer is not marked as an org's and what that would mean."""
    fake.add_customer("42", name="Dave Smith", email="dave@home.test")
    fake.add_subscription("42", "pro", external_id="42")
    fake.add_customer("7", name="Erin")
    fake.add_subscription("7", "pro", external_id="sub_7")
    dry = await run_migration(client, [OrgMapping("42", "Org Forty-Two", None, ("7",))], mode="dry-run")
    said = [warning for warning in dry.orgs[0].warnings if "not marked billing_type=organization" in warning]
    assert len(said) == 1 and "Dave Smith" in said[0], dry.orgs[0].warnings


# --- an existing org subscription on a cheaper plan ------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_org_kept_on_a_cheaper_plan_than_the_user_subscription_it_ends_is_warned(
    fake: FakeLago, client: LagoClient
) -> None:
    """The app already subscribed org beta to starter (10 USD/month, e.g. on org creation, as the seed's
    ``subscribe_org_to_plan``); its user carol pays pro (50 USD/month). The migration keeps beta's subscription (as
    documented) and terminates carol's pro: the org's billing drops to a fifth, and neither the dry run nor --execute
    says so (a mapping plan_code not applied is warned of; a user's plan worth more is not)."""
    fake.add_customer("beta", name="Beta")
    fake.add_subscription("beta", "starter", external_id="beta")
    fake.add_customer("carol")
    fake.add_subscription("carol", "pro", external_id="sub_carol")
    org = OrgMapping("beta", "Beta", None, ("carol",))
    for mode in ("dry-run", "execute"):
        run = await run_migration(client, [org], mode=mode)  # type: ignore[arg-type]
        result = run.orgs[0]
        assert run.ok and result.plan_code == "starter"
        assert any("carol" in w and "'pro'" in w for w in result.warnings), (mode, result.warnings)
    assert subs(fake, "carol") == [] and [s["plan_code"] for s in subs(fake, "beta")] == ["starter"]


@pytest.mark.anyio
async def test_migrate_user_to_org_one_user_at_a_time_warns_when_a_pricier_plan_is_ended(fake: FakeLago) -> None:
    """The seed's API moves a user at a time: alice (starter) first subscribes acme to starter, then bob (pro) is
    moved: acme stays on starter and bob's pro is terminated, and the result's warnings are empty (the plan policy,
    highest by default, never sees bob's plan)."""
    fake.add_customer("alice")
    fake.add_subscription("alice", "starter", external_id="sub_alice")
    fake.add_customer("bob")
    fake.add_subscription("bob", "pro", external_id="sub_bob")
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with OrgBilling(settings, transport=fake.transport()) as billing:
        first = await billing.migrate_user_to_org("alice", "acme", "Acme")
        assert first["plan_code"] == "starter"
        second = await billing.migrate_user_to_org("bob", "acme", "Acme")
    assert second["plan_code"] == "starter" and second["terminated_subscriptions"] == ["sub_bob"]
    assert any("bob" in w and "'pro'" in w for w in second["warnings"]), second["warnings"]


# --- the org customer's currency ------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["oldest", "highest"])
async def test_an_org_customer_in_another_currency_than_its_plan_fails_before_any_write(
    fake: FakeLago, client: LagoClient, policy: str
) -> None:
    """Org gamma's customer exists in USD (an earlier subscription, terminated since); its users pay in EUR
    (--plan-policy oldest, as the currency refusal of highest advises, or highest with every user in EUR). The dry
    run plans it as fine; --execute writes the org customer, then Lago refuses the subscription with
    ``422 currencies_does_not_match`` and the org fails with "fix the fields its error details name", a field the
    user never sent. The plan should refuse the org before any write, naming both currencies and what to do (a
    plan_code in USD, or the org customer's currency changed in Lago)."""
    fake.add_customer("gamma", name="Gamma", currency="USD")
    fake.add_customer("alice", currency="EUR")
    fake.add_subscription("alice", "pro_eur", external_id="sub_alice")
    fake.add_customer("bob", currency="EUR")
    fake.add_subscription("bob", "pro_eur", external_id="sub_bob")
    org = OrgMapping("gamma", "Gamma", None, ("alice", "bob"))
    options = MigrationOptions(plan_policy=policy)

    dry = await run_migration(client, [org], mode="dry-run", options=options)
    assert not dry.ok, [s.description for s in dry.orgs[0].steps]

    fake.requests.clear()
    run = await run_migration(client, [org], mode="execute", options=options)
    assert not run.ok
    error = run.orgs[0].errors[0]
    assert "USD" in error and "EUR" in error and "plan_code" in error, error
    assert fake.write_requests == [], [f"{r.method} {r.path}" for r in fake.write_requests]
    assert [s["external_id"] for s in subs(fake, "alice")] == ["sub_alice"]


# --- mapping files ---------------------------------------------------------------------------------------------------


def test_a_csv_mapping_with_a_blank_line_before_its_header_is_read(tmp_path: Path) -> None:
    """A CSV whose first line is blank (a hand-edited file, an export appended to a file made with ``echo``): blank
    lines between rows were skipped, but before the header the file was refused with "header: missing column(s)
    user_id, org_id, org_name, email" although its header (line 2) has them all. It is read as the rows are, each
    row named by its line in the file."""
    path = tmp_path / "mapping.csv"
    path.write_text("\n\r\nuser_id,org_id,org_name,email\nu1,o1,Org One,a@o1.test\n", encoding="utf-8")
    records = read_mapping_file(path)
    assert [(where, record["user_id"]) for where, record in records] == [("mapping.csv line 4", "u1")]
