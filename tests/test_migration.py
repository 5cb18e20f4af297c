"""The user-to-org migration engine (``_migration``) on small data sets in the Lago emulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._errors import LagoAuthenticationError
from lago_org_billing._migration import (
    CallCounter,
    Journal,
    MappingError,
    MigrationOptions,
    OrgMapping,
    build_mapping,
    read_mapping_file,
    run_migration,
    validate_mapping,
)
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"


def meta(customer: dict[str, object]) -> dict[str, object]:
    return {item["key"]: item["value"] for item in customer["metadata"]}  # type: ignore[attr-defined,index]


def customer(fake: FakeLago, external_id: str) -> dict[str, object]:
    return next(c for c in fake.customers if c["external_id"] == external_id)


def subs(fake: FakeLago, external_customer_id: str, status: str = "active") -> list[dict[str, object]]:
    return [
        s for s in fake.subscriptions if s["external_customer_id"] == external_customer_id and s["status"] == status
    ]


@pytest.fixture
def fake() -> FakeLago:
    """An emulator with plans (pro costs more per year than team_yearly) and one two-user org's users."""
    clock = [datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)]
    fake = FakeLago(api_key=API_KEY, clock=lambda: clock[0])
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_plan("team_yearly", amount_cents=40_000, interval="yearly")
    fake.add_customer("alice", name="Alice", email="alice@acme.test")
    fake.add_customer("bob", name="Bob")
    fake.add_subscription("alice", "team_yearly", external_id="sub_alice", billing_time="anniversary")
    clock[0] += timedelta(days=3)
    fake.add_subscription("bob", "pro", external_id="sub_bob", billing_time="anniversary")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    """A LagoClient talking to the emulator in process."""
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


ACME = OrgMapping(org_id="acme", org_name="Acme", email="billing@acme.test", users=("alice", "bob"))


def test_build_mapping_reports_every_problem_at_once() -> None:
    """Duplicate users, empty and URL-unsafe ids, conflicting names and plans, org ids that are user ids:
    one MappingError lists them all."""
    records = [
        ("r1", {"user_id": "u1", "org_id": "o1", "org_name": "One", "email": "a@x.test"}),
        ("r2", {"user_id": "u1", "org_id": "o2", "org_name": "Two", "email": ""}),
        ("r3", {"user_id": "", "org_id": "o1", "org_name": "One", "email": ""}),
        ("r4", {"user_id": "u4", "org_id": "acme.com", "org_name": "Dots", "email": ""}),
        ("r5", {"user_id": "u5", "org_id": "o1", "org_name": "Other name", "email": "not-an-email"}),
        ("r6", {"user_id": "u6", "org_id": "o3", "org_name": "Three", "email": "", "plan_code": "pro"}),
        ("r7", {"user_id": "u7", "org_id": "o3", "org_name": "Three", "email": "", "plan_code": "starter"}),
        ("r8", {"user_id": "o3", "org_id": "o4", "org_name": "Four", "email": ""}),
        ("r9", {"user_id": "u9", "org_id": "o5", "org_name": "", "email": "", "plna_code": "x"}),
        ("r10", {"org_id": "o5", "org_name": "Five", "email": ""}),
    ]
    with pytest.raises(MappingError) as caught:
        build_mapping(records, BillingSettings(api_key=API_KEY))
    text = "\n".join(caught.value.problems)
    for expected in (
        "r2: duplicate user_id 'u1' (already in r1)",
        "r3: empty user_id",
        "r4: org_id 'acme.com' contains '.'",
        "r5: org 'o1' is named 'Other name' here but 'One' in r1",
        "r5: email 'not-an-email' is not an email address",
        "org 'o3' has conflicting plan_code values: 'pro' (r6), 'starter' (r7)",
        "org_id 'o3' (r6) is also a mapped user_id (r8)",
        "r9: unknown key(s) 'plna_code'",
        "r9: empty org_name",
        "r10: missing user_id",
    ):
        assert expected in text
    assert len(caught.value.problems) == 10


def test_build_mapping_groups_users_by_org_in_order() -> None:
    """Rows become one OrgMapping per org, users in mapping order, email of the first row that has one."""
    records = [
        ("r1", {"user_id": "u2", "org_id": "o1", "org_name": "One", "email": ""}),
        ("r2", {"user_id": "u1", "org_id": "o1", "org_name": "One", "email": "b@x.test"}),
        ("r3", {"user_id": "u3", "org_id": "o2", "org_name": "Two", "email": "c@x.test", "plan_code": "pro"}),
    ]
    orgs, warnings = build_mapping(records, BillingSettings(api_key=API_KEY))
    assert orgs == [
        OrgMapping("o1", "One", "b@x.test", ("u2", "u1")),
        OrgMapping("o2", "Two", "c@x.test", ("u3",), plan_code="pro"),
    ]
    assert warnings == []


def test_read_mapping_file_rejects_a_wrong_csv_header(tmp_path: Path) -> None:
    """A CSV whose header lacks a column or has an unknown one is refused with both problems."""
    path = tmp_path / "map.csv"
    path.write_text("user_id,org,org_name,email\nu1,o1,One,\n")
    with pytest.raises(MappingError) as caught:
        read_mapping_file(path)
    assert "missing column(s) org_id" in str(caught.value)
    assert "unknown column(s) 'org'" in str(caught.value)


def test_csv_row_with_extra_fields_is_reported(tmp_path: Path) -> None:
    """A CSV row with more fields than the header (an unquoted comma) is a problem, not silently dropped."""
    path = tmp_path / "map.csv"
    path.write_text("user_id,org_id,org_name,email\nu1,o1,Acme, Inc,\n")
    with pytest.raises(MappingError) as caught:
        build_mapping(read_mapping_file(path), BillingSettings(api_key=API_KEY))
    assert caught.value.problems == [
        "map.csv line 2: more fields than the header has columns (a comma inside an unquoted name?)",
        "map.csv line 2: email 'Inc' is not an email address",
    ]


def test_read_mapping_file_reads_json_and_csv_alike(tmp_path: Path) -> None:
    """The JSON list of objects and the CSV give the same records."""
    rows = [{"user_id": "u1", "org_id": "o1", "org_name": "One, Inc", "email": "a@x.test"}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.csv").write_text('user_id,org_id,org_name,email\nu1,o1,"One, Inc",a@x.test\n')
    from_json = [record for _, record in read_mapping_file(tmp_path / "m.json")]
    from_csv = [record for _, record in read_mapping_file(tmp_path / "m.csv")]
    assert from_json == from_csv == rows


async def test_validate_mapping_checks_plan_codes_in_lago_without_writing(fake: FakeLago, client: LagoClient) -> None:
    """Unknown plan codes are reported together with the offline problems; only GETs reach Lago."""
    records = [
        ("r1", {"user_id": "u1", "org_id": "o1", "org_name": "One", "email": "", "plan_code": "platinum"}),
        ("r2", {"user_id": "u1", "org_id": "o2", "org_name": "Two", "email": ""}),
    ]
    with pytest.raises(MappingError) as caught:
        await validate_mapping(client, records, MigrationOptions(default_plan="gold"))
    assert caught.value.problems == [
        "r2: duplicate user_id 'u1' (already in r1)",
        "r1: plan_code 'platinum' is not a plan in Lago",
        "--default-plan 'gold' is not a plan in Lago",
    ]
    assert fake.write_requests == []


async def test_execute_moves_users_to_the_org_on_the_highest_plan(fake: FakeLago, client: LagoClient) -> None:
    """The org gets a customer and a subscription on the plan with the highest *yearly* amount (pro at
    600/year beats team_yearly at 400/year) with the source's billing_time; the users' subscriptions are
    terminated with an invoice and the users are marked."""
    run = await run_migration(client, [ACME], mode="execute")
    assert run.ok and run.orgs[0].status == "migrated"
    org = customer(fake, "acme")
    assert org["name"] == "Acme" and org["email"] == "billing@acme.test"
    assert meta(org) == {
        "billing_type": "organization",
        "migrated_from_user": "alice,bob",
        "created_by_user_id": "alice",
    }
    [subscription] = subs(fake, "acme")
    assert subscription["external_id"] == "acme" and subscription["plan_code"] == "pro"
    assert subscription["billing_time"] == "anniversary"
    for user in ("alice", "bob"):
        assert subs(fake, user) == []
        [ended] = subs(fake, user, "terminated")
        assert ended["on_termination_invoice"] == "generate"
        assert str(subscription["started_at"]) <= str(ended["terminated_at"])  # org first, never a gap
        assert meta(customer(fake, user))["migrated_to_org"] == "acme"
    assert {invoice["customer"]["external_id"] for invoice in fake.invoices} == {"alice", "bob"}
    assert run.orgs[0].plan_source == "highest plan: bob's subscription sub_bob"


@pytest.mark.parametrize(("policy", "plan"), [("highest", "pro"), ("lowest", "team_yearly"), ("oldest", "team_yearly")])
async def test_plan_policy_picks_among_the_users_plans(client: LagoClient, policy: str, plan: str) -> None:
    """highest/lowest compare yearly amounts; oldest takes the longest-running subscription (alice's)."""
    run = await run_migration(client, [ACME], mode="dry-run", options=MigrationOptions(plan_policy=policy))
    assert run.orgs[0].plan_code == plan


async def test_dry_run_plans_everything_and_writes_nothing(fake: FakeLago, client: LagoClient) -> None:
    """A dry run lists each step (customer, subscription, terminations, marks) and leaves the state as it was."""
    before = fake.snapshot()
    run = await run_migration(client, [ACME], mode="dry-run")
    assert fake.snapshot() == before and fake.write_requests == []
    assert run.orgs[0].status == "planned"
    assert [step.kind for step in run.orgs[0].steps] == [
        "upsert_customer",
        "create_subscription",
        "terminate_subscription",
        "terminate_subscription",
        "mark_user",
        "mark_user",
    ]


async def test_second_execute_writes_nothing(fake: FakeLago, client: LagoClient) -> None:
    """Every step is idempotent: a re-run reads Lago, finds nothing to do and sends no write."""
    await run_migration(client, [ACME], mode="execute")
    fake.requests.clear()
    run = await run_migration(client, [ACME], mode="execute")
    assert run.orgs[0].status == "up-to-date"
    assert fake.write_requests == []
    assert len(subs(fake, "acme", "active")) == 1


async def test_existing_org_subscription_and_metadata_are_kept(fake: FakeLago, client: LagoClient) -> None:
    """An org already subscribed keeps its plan (a warning names the mapping's plan); existing metadata items
    are kept, ours added only while Lago's 5-item limit allows, and a full user customer is not marked."""
    items = [{"key": f"k{i}", "value": "v"} for i in range(4)]
    fake.add_customer("acme", name="Acme Corp", email="finance@acme.test", metadata=items)
    fake.add_subscription("acme", "starter", external_id="acme")
    fake.add_customer("bob", metadata=[{"key": f"b{i}", "value": "v"} for i in range(5)])
    org = OrgMapping("acme", "Acme", "billing@acme.test", ("alice", "bob"), plan_code="pro")
    run = await run_migration(client, [org], mode="execute")
    result = run.orgs[0]
    assert result.status == "migrated" and result.plan_code == "starter"
    acme = customer(fake, "acme")
    assert acme["name"] == "Acme Corp" and acme["email"] == "finance@acme.test"
    assert meta(acme) == {**{f"k{i}": "v" for i in range(4)}, "billing_type": "organization"}
    assert "migrated_to_org" not in meta(customer(fake, "bob"))
    assert subs(fake, "bob") == []
    assert any("mapping plan_code 'pro' not applied" in w for w in result.warnings)
    assert any("migrated_from_user not written" in w for w in result.warnings)
    assert any("user 'bob' not marked" in w for w in result.warnings)


async def test_pending_subscriptions_are_canceled_and_downgrades_go_with_their_subscription(
    fake: FakeLago, client: LagoClient
) -> None:
    """A user's not-yet-started subscription is canceled; a pending downgrade ends with the active one."""
    fake.add_customer("carol")
    fake.add_subscription("carol", "pro", external_id="sub_carol_next", subscription_at="2099-01-01T00:00:00Z")
    fake.add_subscription("bob", "starter", external_id="sub_bob")  # downgrade: pending until period end
    org = OrgMapping("acme", "Acme", None, ("alice", "bob", "carol"))
    run = await run_migration(client, [org], mode="execute")
    kinds = [(step.kind, step.target) for step in run.orgs[0].steps]
    assert ("cancel_subscription", "sub_carol_next") in kinds
    assert ("cancel_subscription", "sub_bob") not in kinds
    for user in ("alice", "bob", "carol"):
        assert subs(fake, user, "active") == subs(fake, user, "pending") == []
    verified = await run_migration(client, [org], mode="verify")
    assert verified.ok


async def test_a_user_with_only_a_subscription_starting_later_keeps_its_plan(
    fake: FakeLago, client: LagoClient
) -> None:
    """A user whose only subscription starts later: the org is subscribed to that plan from that date (the user's is
    canceled), not left without a subscription; verify accepts it, and a second run changes nothing."""
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave", subscription_at="2099-01-01T00:00:00Z")
    org = OrgMapping("solo", "Solo", None, ("dave",))
    run = await run_migration(client, [org], mode="execute")
    assert run.ok and run.orgs[0].plan_code == "pro" and "starting 2099-01-01" in str(run.orgs[0].plan_source)
    [started] = [s for s in fake.subscriptions if s["external_id"] == "solo"]
    assert (started["plan_code"], started["status"]) == ("pro", "pending")
    assert started["subscription_at"].startswith("2099-01-01T00:00:00")
    assert subs(fake, "dave", "pending") == []
    assert (await run_migration(client, [org], mode="verify")).ok
    again = await run_migration(client, [org], mode="execute")
    assert [step.kind for step in again.orgs[0].steps if step.outcome == "done"] == []


async def test_the_org_customer_inherits_the_billing_identity_of_its_user(fake: FakeLago, client: LagoClient) -> None:
    """A new org customer gets the billing identity (currency, address, legal name, tax id, and email when the
    mapping has none) of the user whose plan it takes: the org's invoices went out without them."""
    details = {
        "currency": "USD",
        "country": "FR",
        "address_line1": "1 rue de la Paix",
        "legal_name": "Dave SARL",
        "tax_identification_number": "FR123456789",
        "email": "dave@x.test",
    }
    fake.add_customer("dave", name="Dave", **details)
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    fake.add_customer("erin", name="Erin", country="DE", legal_name="Erin GmbH")  # another user, no plan: not it
    run = await run_migration(client, [OrgMapping("solo", "Solo", None, ("erin", "dave"))], mode="execute")
    assert run.ok
    org = customer(fake, "solo")
    assert {key: org.get(key) for key in details} == details


async def test_org_without_any_plan_gets_default_plan_or_fails_verify(fake: FakeLago, client: LagoClient) -> None:
    """Users without subscriptions: no plan means no org subscription (verify says so); --default-plan fixes it."""
    fake.add_customer("dave")
    org = OrgMapping("solo", "Solo", None, ("dave",))
    run = await run_migration(client, [org], mode="execute")
    assert run.ok and "no user has an active subscription" in run.orgs[0].warnings[0]
    verify = await run_migration(client, [org], mode="verify")
    assert not verify.ok and verify.orgs[0].errors == ["org 'solo' has no active subscription 'solo'"]
    await run_migration(client, [org], mode="execute", options=MigrationOptions(default_plan="starter"))
    assert (await run_migration(client, [org], mode="verify")).ok


async def test_verify_lists_what_is_missing(client: LagoClient) -> None:
    """Before migrating, verify reports the missing customer and subscription and both users' subscriptions."""
    run = await run_migration(client, [ACME], mode="verify")
    assert not run.ok
    assert run.orgs[0].errors == [
        "org 'acme' has no Lago customer",
        "org 'acme' has no active subscription 'acme'",
        "user 'alice' (org 'acme') still has active subscription(s) sub_alice",
        "user 'bob' (org 'acme') still has active subscription(s) sub_bob",
    ]


async def test_subscription_id_taken_by_another_customer_fails_that_org_only(
    fake: FakeLago, client: LagoClient
) -> None:
    """When the org's subscription id is another customer's active subscription, that org fails with a hint and
    the other orgs are migrated."""
    fake.add_customer("zed")
    fake.add_subscription("zed", "pro", external_id="beta")
    fake.add_customer("erin")
    fake.add_subscription("erin", "pro", external_id="sub_erin")
    beta = OrgMapping("beta", "Beta", None, ("erin",))
    run = await run_migration(client, [ACME, beta], mode="execute")
    assert [r.status for r in run.orgs] == ["migrated", "failed"]
    assert "LAGO_SUBSCRIPTION_ID_TEMPLATE" in run.orgs[1].errors[0]
    assert subs(fake, "erin") != [] and not run.ok


async def test_journal_skips_finished_orgs(fake: FakeLago, client: LagoClient, tmp_path: Path) -> None:
    """Orgs recorded done in the journal are skipped without a single call; a changed mapping is redone."""
    journal = Journal(tmp_path / "j.jsonl")
    await run_migration(client, [ACME], mode="execute", journal=journal)
    journal.close()
    fake.requests.clear()
    again = Journal(tmp_path / "j.jsonl")
    run = await run_migration(client, [ACME], mode="execute", journal=again)
    assert run.orgs[0].status == "journal" and fake.requests == []
    changed = OrgMapping("acme", "Acme", "billing@acme.test", ("alice", "bob"), plan_code="starter")
    run = await run_migration(client, [changed], mode="execute", journal=again)
    again.close()
    assert run.orgs[0].status == "up-to-date"
    lines = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert {line["type"] for line in lines} == {"run", "step", "org", "end"}
    assert [line["step"] for line in lines if line["type"] == "step"][:2] == ["upsert_customer", "create_subscription"]


async def test_rate_limits_are_waited_out_and_counted(fake: FakeLago) -> None:
    """429 answers are retried by the client; the run succeeds and counts them."""
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001, max_retries=10)
    counter = CallCounter(fake.transport())
    fake.faults.inject(429, count=5)
    async with LagoClient(settings, transport=counter) as client:
        run = await run_migration(client, [ACME], mode="execute", counter=counter)
    assert run.ok and run.calls.rate_limited == 5
    assert run.to_json()["lago"]["rate_limited"] == 5
    assert run.calls.calls == len(fake.requests)


async def test_lago_down_stops_the_run(fake: FakeLago) -> None:
    """When Lago stays unavailable the run stops (aborted) instead of failing every org, and is not ok."""
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001, max_retries=1)
    fake.faults.inject(503)
    orgs = [OrgMapping(f"o{i}", "O", None, (f"u{i}",)) for i in range(20)]
    async with LagoClient(settings, transport=fake.transport()) as client:
        run = await run_migration(client, orgs, mode="execute", concurrency=2)
    assert run.aborted is not None and "503" in run.aborted
    assert not run.ok and run.counts["not-run"] > 0
    assert fake.write_requests == []


async def test_org_billing_migrate_user_to_org_uses_the_same_path(fake: FakeLago) -> None:
    """OrgBilling.migrate_user_to_org migrates one user (CLI code path) and is a no-op the second time."""
    async with OrgBilling(BillingSettings(api_key=API_KEY, api_url=fake.base_url), transport=fake.transport()) as b:
        first = await b.migrate_user_to_org("alice", "acme", "Acme", "billing@acme.test")
        assert first["changed"] and first["plan_code"] == "team_yearly"
        assert first["terminated_subscriptions"] == ["sub_alice"]
        assert first["subscription"]["external_id"] == "acme"
        second_user = await b.migrate_user_to_org("bob", "acme", "Acme")
        assert second_user["plan_code"] == "team_yearly"  # the org keeps its subscription
        assert meta(customer(fake, "acme"))["migrated_from_user"] == "alice,bob"
        fake.requests.clear()
        again = await b.migrate_user_to_org("alice", "acme", "Acme", "billing@acme.test")
        assert again["changed"] is False and fake.write_requests == []
        fake.faults.inject(401, count=1)
        with pytest.raises(LagoAuthenticationError):
            await b.migrate_user_to_org("alice", "acme", "Acme")


@pytest.mark.parametrize("status", [429, 503])
async def test_a_terminate_failing_transiently_is_retried_not_left_half_done(fake: FakeLago, status: int) -> None:
    """A 429 on DELETE /subscriptions was never retried (the client does not retry DELETE), nor a 503 (it stopped
    the run), leaving the org subscribed and its users still billed. A 429 was not processed: the client retries it;
    after a 503 the migration retries, a 404 then meaning the lost attempt ended it."""
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001, max_retries=10)
    fake.faults.inject(status, count=2, path="/api/v1/subscriptions/sub_")
    async with LagoClient(settings, transport=fake.transport()) as client:
        run = await run_migration(client, [ACME], mode="execute")
    assert run.ok and subs(fake, "alice") == subs(fake, "bob") == []
    assert len(subs(fake, "alice", "terminated")) == len(subs(fake, "bob", "terminated")) == 1


async def test_a_user_subscription_id_lago_cannot_address_fails_the_org_before_any_write(
    fake: FakeLago, client: LagoClient
) -> None:
    """A dotted user subscription id passed the dry run and failed execute after the org was subscribed, leaving
    org and users all active: it now fails the org's plan, dry run included, with nothing written."""
    fake.add_subscription("alice", "starter", external_id="sub.alice.2")
    dry = await run_migration(client, [ACME], mode="dry-run")
    assert not dry.ok and "sub.alice.2" in dry.orgs[0].errors[0]
    fake.requests.clear()
    run = await run_migration(client, [ACME], mode="execute")
    assert run.orgs[0].status == "failed" and [r for r in fake.requests if r.method != "GET"] == []


async def test_a_pending_subscription_that_started_meanwhile_is_terminated(fake: FakeLago, client: LagoClient) -> None:
    """A user's pending subscription that starts between the plan and its cancel (a period boundary in a long
    run) was reported 'already ended' and left active: it is terminated."""
    from lago_org_billing._migration import OrgResult, PlanCatalog, apply_org, plan_org

    fake.add_customer("carol")
    fake.add_subscription("carol", "pro", external_id="sub_carol", subscription_at="2099-01-01T00:00:00Z")
    org = OrgMapping("acme", "Acme", None, ("alice", "bob", "carol"))
    result = OrgResult(org.org_id)
    options = MigrationOptions()
    await plan_org(client, org, options, PlanCatalog(client), result)
    assert ("cancel_subscription", "sub_carol") in [(step.kind, step.target) for step in result.steps]
    for subscription in fake.store.subscriptions:  # it starts now
        if subscription["external_id"] == "sub_carol":
            subscription["status"] = "active"
    await apply_org(client, org, options, result, None)
    assert subs(fake, "carol") == [] and len(subs(fake, "carol", "terminated")) == 1
    assert (await run_migration(client, [org], mode="verify")).ok


async def test_a_pending_subscription_that_started_during_a_retried_cancel_is_terminated(fake: FakeLago) -> None:
    """The cancel's first attempt gets a 503, the subscription starts, the retry gets a 404: it was reported
    done, still active."""
    from lago_org_billing._migration import OrgResult, PlanCatalog, apply_org, plan_org

    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001, max_retries=3)
    fake.add_customer("carol")
    fake.add_subscription("carol", "pro", external_id="sub_carol", subscription_at="2099-01-01T00:00:00Z")
    org = OrgMapping("acme", "Acme", None, ("carol",))
    result, options = OrgResult(org.org_id), MigrationOptions(default_plan="starter")
    async with LagoClient(settings, transport=fake.transport()) as client:
        await plan_org(client, org, options, PlanCatalog(client), result)
        for subscription in fake.store.subscriptions:  # it starts before the retry
            if subscription["external_id"] == "sub_carol":
                subscription["status"] = "active"
        fake.faults.inject(503, count=1, path="/api/v1/subscriptions/sub_carol")
        await apply_org(client, org, options, result, None)
    assert subs(fake, "carol") == [] and len(subs(fake, "carol", "terminated")) == 1


async def test_an_org_subscribed_under_another_id_fails_with_what_to_do(fake: FakeLago, client: LagoClient) -> None:
    """It got a second subscription (billed twice); keeping only its own would leave the middleware billing an id
    that does not exist. The org fails, nothing written, with the two ways out. (Its customer marked an org's, as
    the app's create_org_customer marks it: one that is not may be a user's, refused as such.)"""
    fake.add_customer("acme", name="Acme", metadata=[{"key": "billing_type", "value": "organization"}])
    fake.add_subscription("acme", "starter", external_id="made-in-the-ui")
    fake.requests.clear()
    run = await run_migration(client, [ACME], mode="execute")
    assert run.orgs[0].status == "failed" and [r for r in fake.requests if r.method != "GET"] == []
    assert "made-in-the-ui" in run.orgs[0].errors[0] and "LAGO_SUBSCRIPTION_ID_TEMPLATE" in run.orgs[0].errors[0]
    assert [s["external_id"] for s in subs(fake, "acme")] == ["made-in-the-ui"]
    assert not (await run_migration(client, [ACME], mode="verify")).ok


async def test_a_mapped_user_unknown_to_lago_is_said(client: LagoClient) -> None:
    org = OrgMapping("acme", "Acme", None, ("alice", "Bob"))  # a case typo of "bob"
    run = await run_migration(client, [org], mode="dry-run")
    assert any("'Bob'" in warning and "no Lago customer" in warning for warning in run.orgs[0].warnings)


async def test_a_journal_of_another_lago_does_not_skip_orgs(fake: FakeLago, tmp_path: Path) -> None:
    """Journaled on staging, run on production with the same journal: every org was skipped, nothing migrated."""
    journal = Journal(tmp_path / "j.jsonl")
    staging = FakeLago(api_key=API_KEY)
    staging.add_customer("alice")
    settings = BillingSettings(api_key=API_KEY, api_url="http://staging.test", retry_backoff=0.001)
    async with LagoClient(settings, transport=staging.transport()) as client:
        await run_migration(client, [ACME], mode="execute", journal=journal)
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=fake.transport()) as client:
        run = await run_migration(client, [ACME], mode="execute", journal=journal)
    journal.close()
    assert run.orgs[0].status == "migrated" and subs(fake, "alice") == []


async def test_verify_reports_a_user_s_pending_subscription(fake: FakeLago, client: LagoClient) -> None:
    """A user's subscription that starts later would bill the user again: --verify ignored it."""
    await run_migration(client, [ACME], mode="execute")
    fake.add_subscription("bob", "pro", external_id="sub_bob_next", subscription_at="2099-01-01T00:00:00Z")
    run = await run_migration(client, [ACME], mode="verify")
    assert run.orgs[0].errors == ["user 'bob' (org 'acme') still has pending subscription(s) sub_bob_next"]


async def test_a_refused_api_key_is_the_same_error_whatever_the_mapping(fake: FakeLago) -> None:
    """With --default-plan the plan check met the 401 first (exit 2); without it every org failed (exit 1)."""
    records = [("row 2", {"user_id": "alice", "org_id": "acme", "org_name": "Acme", "email": ""})]
    settings = BillingSettings(api_key="wrong", api_url=fake.base_url, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        for options in (MigrationOptions(), MigrationOptions(default_plan="starter")):
            with pytest.raises(LagoAuthenticationError):
                await validate_mapping(client, records, options)


def test_a_lone_surrogate_in_an_org_name_or_email_is_a_mapping_problem(tmp_path: Path) -> None:
    """A JSON export's ``"\\ud800"`` (half a character) decodes to a lone surrogate, which no UTF-8 request carries:
    refused up front with the row and the field, not as the org's customer write failing mid-run."""
    path = tmp_path / "map.json"
    rows = [
        {"user_id": "u1", "org_id": "o1", "org_name": "Acme \ud800", "email": ""},
        {"user_id": "u2", "org_id": "o2", "org_name": "Beta", "email": "a\udc00@x.test"},
    ]
    path.write_text(json.dumps(rows))  # (ensure_ascii: written as the \ud800 escapes a broken export holds)
    with pytest.raises(MappingError) as caught:
        build_mapping(read_mapping_file(path), BillingSettings(api_key=API_KEY))
    assert caught.value.problems == [
        "map.json item 1: org_name 'Acme \\ud800' holds a lone surrogate (a JSON '\\ud800' escape of half a "
        "character, from a broken export): no Unicode text; fix the export",
        "map.json item 2: email 'a\\udc00@x.test' is not an email address",
    ]
