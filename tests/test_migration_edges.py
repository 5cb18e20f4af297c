"""Migration edges: users whose subscriptions start later, the billing identity a new org customer inherits, the
CLI's up-front checks of its journal and report paths, entitlement overrides, the journal lock and user ids Lago
cannot address (against the emulator)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

import _migration_data as data
from _openapi import assert_request_matches
from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._errors import LagoAuthenticationError
from lago_org_billing._migration import (
    EntitlementsUnreadableError,
    Journal,
    MigrationOptions,
    OrgMapping,
    run_migration,
)
from lago_org_billing._migration_cli import run_migrate_command
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread
from test_migration import customer, subs
from test_migration_cli import CHILD, parse

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


# --- entitlement overrides --------------------------------------------------------------------------------------


class Recorder(httpx.AsyncBaseTransport):
    """Passes requests to the emulator and keeps them (with their bodies)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


def quota(fake: FakeLago) -> None:
    """Feature api_quota; plan pro allows 1,000 calls and 100,000 tokens."""
    privileges = [{"code": "max_api_calls", "value_type": "integer"}, {"code": "max_tokens", "value_type": "integer"}]
    fake.add_feature("api_quota", privileges)
    limits = {"api_quota": {"max_api_calls": 1_000, "max_tokens": 100_000}}
    fake.store.set_plan_entitlements("pro", {"entitlements": limits}, merge=False)


def override(fake: FakeLago, external_id: str, values: dict[str, Any], status: str | None = None) -> None:
    """Per-subscription overrides, as Lago's PATCH /subscriptions/{id}/entitlements sets them."""
    fake.store.patch_sub_entitlements(external_id, status, {"entitlements": values})


def privileges(fake: FakeLago, external_id: str, status: str | None = None) -> dict[str, tuple[Any, Any]]:
    """``{privilege: (value, override_value)}`` of the subscription's api_quota."""
    [feature] = fake.store.get_sub_entitlements(external_id, status)["entitlements"]
    return {p["code"]: (p["value"], p["override_value"]) for p in feature["privileges"]}


@pytest.mark.anyio
async def test_entitlement_overrides_go_to_the_org_subscription_and_verify_checks_them(fake: FakeLago) -> None:
    """dave, an enterprise customer, has a custom max_api_calls of 50,000 on pro (the plan's: 1,000): the org
    subscription got the plan's 1,000. The dry run shows the override; --execute sets it (the override only, not the
    plan's max_tokens) in a request Lago's OpenAPI spec accepts; --verify checks it and says how to set it when
    missing."""
    quota(fake)
    fake.add_customer("dave", name="Dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    override(fake, "sub_dave", {"api_quota": {"max_api_calls": 50_000}})
    recorder = Recorder(fake.transport())
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=recorder) as client:
        dry = await run_migration(client, [SOLO], mode="dry-run")
        assert fake.write_requests == []
        report = dry.to_json()["orgs"][0]
        assert report["entitlement_overrides"] == {
            "from": "dave's subscription sub_dave",
            "values": {"api_quota": {"max_api_calls": 50_000}},
        }
        assert any("api_quota.max_api_calls=50000" in step["description"] for step in report["steps"])

        run = await run_migration(client, [SOLO], mode="execute")
        assert run.ok, run.orgs[0].errors
        [patch] = [r for r in recorder.requests if r.method == "PATCH"]
        assert patch.url.path == "/api/v1/subscriptions/solo/entitlements"
        assert json.loads(patch.content) == {"entitlements": {"api_quota": {"max_api_calls": 50_000}}}
        assert_request_matches(patch)
        assert privileges(fake, "solo") == {"max_api_calls": (50_000, 50_000), "max_tokens": (100_000, None)}
        assert subs(fake, "dave") == []
        assert (await run_migration(client, [SOLO], mode="verify")).ok
        assert done_writes(await run_migration(client, [SOLO], mode="execute")) == []

        for subscription in fake.store.subscriptions:  # as the migration left it before: the plan's values
            if subscription["external_id"] == "solo":
                subscription["entitlement_overrides"] = {}
        verify = await run_migration(client, [SOLO], mode="verify")
    assert not verify.ok
    assert (
        "org subscription 'solo' lacks the entitlement overrides of dave's subscription sub_dave: "
        "api_quota.max_api_calls=50000 (it gets the plan's values); set them: PATCH /subscriptions/solo/entitlements "
        '{"entitlements":{"api_quota":{"max_api_calls":50000}}}'
    ) in verify.orgs[0].errors


def _migrate(fake: FakeLago, tmp_path: Path, mapping: str, *argv: str) -> tuple[int, str, str, Any]:
    """``migrate`` in process on a CSV ``mapping``: exit code, stdout, stderr and the JSON report."""
    path, report = tmp_path / "mapping.csv", tmp_path / "report.json"
    path.write_text(mapping)
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": fake.base_url, "LAGO_API_KEY": API_KEY})
    args = parse("--mapping-file", str(path), "--report", str(report), *argv)
    out, err = io.StringIO(), io.StringIO()
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue(), json.loads(report.read_text()) if report.exists() else None


def test_users_with_different_overrides_the_org_takes_the_donor_s_and_warns(fake: FakeLago, tmp_path: Path) -> None:
    """alice (pro, 50,000 calls) and bob (team_yearly, 90,000 calls and 7 tokens) merge into acme. The org takes pro,
    the most expensive plan, with alice's overrides (she is the donor: the user whose plan and billing identity the
    org takes); the dry run's plan shows them, and the dry run and the report warn about bob's, not carried."""
    quota(fake)
    fake.add_customer("alice", name="Alice", country="FR")
    fake.add_customer("bob", name="Bob", country="DE")
    fake.add_subscription("alice", "pro", external_id="sub_alice")
    fake.add_subscription("bob", "team_yearly", external_id="sub_bob")
    override(fake, "sub_alice", {"api_quota": {"max_api_calls": 50_000}})
    override(fake, "sub_bob", {"api_quota": {"max_api_calls": 90_000, "max_tokens": 7}})
    mapping = "user_id,org_id,org_name,email\nbob,acme,Acme,\nalice,acme,Acme,\n"
    warning = (
        "org 'acme': its users' subscriptions have different entitlement overrides; the org subscription takes only "
        "those of alice's subscription sub_alice, whose plan the plan policy picks (api_quota.max_api_calls=50000), "
        "not those of bob's sub_bob (api_quota.max_api_calls=90000, api_quota.max_tokens=7)"
    )
    code, out, _, report = _migrate(fake, tmp_path, mapping)
    assert code == 0 and fake.write_requests == []
    assert "  entitlement overrides (those of alice's subscription sub_alice): api_quota.max_api_calls=50000" in out
    assert "set entitlement overrides of org subscription acme to those of alice's subscription sub_alice" in out
    assert warning in out and report["orgs"][0]["warnings"] == [warning]

    code, out, _, report = _migrate(fake, tmp_path, mapping, "--execute")
    assert code == 0 and warning in out and report["orgs"][0]["warnings"] == [warning]
    assert privileges(fake, "acme") == {"max_api_calls": (50_000, 50_000), "max_tokens": (100_000, None)}
    assert customer(fake, "acme")["country"] == "FR"  # the same donor as for the billing identity
    assert _migrate(fake, tmp_path, mapping, "--verify")[0] == 0


@pytest.mark.anyio
async def test_overrides_on_another_plan_are_not_carried_and_the_org_s_own_are_kept(
    fake: FakeLago, client: LagoClient
) -> None:
    """A mapping plan_code puts the org on another plan than the donor's: its overrides are not carried (a warning
    says how to set them). An org subscription already on the donor's plan keeps an override of its own (set by
    hand), gets the ones it lacks, and is warned about."""
    quota(fake)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    override(fake, "sub_dave", {"api_quota": {"max_api_calls": 50_000, "max_tokens": 9}})
    other_plan = OrgMapping("solo", "Solo", None, ("dave",), plan_code="team_yearly")
    dry = await run_migration(client, [other_plan], mode="dry-run")
    assert "are not carried: the org subscription is on plan 'team_yearly', not on its plan 'pro'" in "".join(
        dry.orgs[0].warnings
    )
    assert [s.kind for s in dry.orgs[0].steps if s.kind == "set_entitlements"] == []

    fake.add_subscription("solo", "pro", external_id="solo")
    override(fake, "solo", {"api_quota": {"max_api_calls": 7}})
    run = await run_migration(client, [SOLO], mode="execute")
    assert run.ok
    assert privileges(fake, "solo") == {"max_api_calls": (7, 7), "max_tokens": (9, 9)}
    assert "org subscription 'solo' keeps its own entitlement overrides api_quota.max_api_calls=7" in "".join(
        run.orgs[0].warnings
    )
    assert (await run_migration(client, [SOLO], mode="verify")).ok


@pytest.mark.anyio
async def test_overrides_of_a_subscription_that_starts_later_go_to_the_org_s(fake: FakeLago) -> None:
    """dave's only subscription starts in June, with an override: the org subscription (pending too) gets it, Lago
    addressing a pending subscription with subscription_status=pending (the spec's parameter); verify checks it."""
    quota(fake)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave", subscription_at="2026-06-01T00:00:00Z")
    override(fake, "sub_dave", {"api_quota": {"max_api_calls": 50_000}}, status="pending")
    recorder = Recorder(fake.transport())
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=recorder) as client:
        run = await run_migration(client, [SOLO], mode="execute")
        assert run.ok, run.orgs[0].errors
        [patch] = [r for r in recorder.requests if r.method == "PATCH"]
        assert dict(patch.url.params) == {"subscription_status": "pending"}
        assert_request_matches(patch)
        assert privileges(fake, "solo", "pending")["max_api_calls"] == (50_000, 50_000)
        assert (await run_migration(client, [SOLO], mode="verify")).ok


@pytest.mark.slow
def test_a_run_killed_between_subscribing_the_org_and_setting_its_overrides_sets_them_when_resumed(
    fake: FakeLago, tmp_path: Path
) -> None:
    """A child ``migrate --execute --journal`` is SIGKILLed when about to PATCH the org subscription's entitlements
    (it is made, dave is still subscribed); the same command resumes and sets them, and the result verifies."""
    quota(fake)
    fake.add_customer("dave", name="Dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    override(fake, "sub_dave", {"api_quota": {"max_api_calls": 50_000}})
    mapping, journal = tmp_path / "mapping.csv", tmp_path / "journal.jsonl"
    mapping.write_text("user_id,org_id,org_name,email\ndave,solo,Solo,\n")
    command = ["migrate", "--mapping-file", str(mapping), "--execute", "--journal", str(journal)]
    with serve_in_thread(fake) as url:
        env = {**os.environ, "LAGO_API_URL": url, "LAGO_API_KEY": API_KEY}
        marker = _run_child(["--freeze-at", "PATCH /api/v1/subscriptions/solo/entitlements", *command], env, tmp_path)
        assert marker == "FROZEN PATCH /api/v1/subscriptions/solo/entitlements\n", marker
        assert [s["external_id"] for s in subs(fake, "solo")] == ["solo"] and subs(fake, "dave") != []
        assert privileges(fake, "solo")["max_api_calls"] == (1_000, None)  # killed before the overrides
        assert '"step":"create_subscription","target":"solo","outcome":"done"' in journal.read_text()

        assert _cli_at(url, fake, tmp_path, "--execute", "--journal", str(journal)) == 0
    assert privileges(fake, "solo")["max_api_calls"] == (50_000, 50_000) and subs(fake, "dave") == []
    assert len([s for s in fake.subscriptions if s["external_customer_id"] == "solo"]) == 1
    assert _cli(fake, tmp_path, "--verify") == 0


def _run_child(argv: list[str], env: dict[str, str], tmp_path: Path) -> str:
    """Run ``_migration_child.py argv`` until it prints its first line (FROZEN ...), then SIGKILL it; the line."""
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), *argv], env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
    return line or (tmp_path / "child.log").read_text()


def _cli_at(url: str, fake: FakeLago, tmp_path: Path, *argv: str) -> int:
    """:func:`_cli` told the served emulator's URL (its journal fingerprints name it)."""
    mapping = tmp_path / "mapping.csv"
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": url, "LAGO_API_KEY": API_KEY})
    args = parse("--mapping-file", str(mapping), *argv)
    return run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=io.StringIO())


# --- the journal lock -------------------------------------------------------------------------------------------


def test_a_second_execute_on_a_locked_journal_stops_before_reading_lago(fake: FakeLago, tmp_path: Path) -> None:
    """Another process holds the journal's lock (here the test, on its own open file description of
    journal.jsonl.lock): the run exits 2 saying so and what to do, with no Lago call and the journal untouched; once
    the lock is dropped the same command runs."""
    fcntl = pytest.importorskip("fcntl")
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    journal = tmp_path / "journal.jsonl"
    journal.write_text('{"type":"run"}\n')
    with (tmp_path / "journal.jsonl.lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere, started 2026-03-10T12:00:00.000Z")
        held.flush()
        fake.requests.clear()
        code, out, err, report = _migrate(
            fake, tmp_path, "user_id,org_id,org_name,email\ndave,solo,Solo,\n", "--execute", "--journal", str(journal)
        )
        assert (code, out, report) == (2, "", None)
        assert (
            f"error: another migration holds the journal {journal} (lock {journal}.lock: pid 4242 on elsewhere" in err
        )
        assert "wait for that run to finish (or stop it), then run the same command again" in err
        assert fake.requests == [] and journal.read_text() == '{"type":"run"}\n'
        assert _cli(fake, tmp_path, "--journal", str(journal)) == 0  # (a dry run does not take it)
        fcntl.flock(held, fcntl.LOCK_UN)
    assert _cli(fake, tmp_path, "--execute", "--journal", str(journal)) == 0
    assert _cli(fake, tmp_path, "--execute", "--journal", str(journal)) == 0  # (released at the end of a run)


class _Recording(httpx.AsyncBaseTransport):
    """``transport``, with the requests sent through it (``METHOD path``)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport, self.requests = transport, list[str]()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()


@pytest.mark.slow
def test_a_second_process_on_the_same_journal_exits_2_and_the_lock_dies_with_the_first(tmp_path: Path) -> None:
    """Two ``migrate --execute --journal J`` at once: the first (a child process, frozen after one org) holds J;
    the second exits 2 naming it, without a Lago call. The first is then SIGKILLed: the OS drops its lock, and
    the same command resumes."""
    fake = data.seed(data.new_fake(), orgs=10)
    mapping = str(data.write_mapping(tmp_path / "mapping.csv", orgs=10))
    journal = tmp_path / "journal.jsonl"
    command = ["--mapping-file", mapping, "--execute", "--journal", str(journal), "--default-plan", "free"]
    err = io.StringIO()
    with serve_in_thread(fake) as url, (tmp_path / "child.log").open("w") as log:
        env = {**os.environ, "LAGO_API_URL": url, "LAGO_API_KEY": data.API_KEY}
        settings = BillingSettings.from_env(None, environ=env)
        child = subprocess.Popen(
            [sys.executable, str(CHILD), "--freeze-after", "1", "migrate", *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert child.stdout is not None
            marker = child.stdout.readline()
            assert marker.startswith("FROZEN"), (tmp_path / "child.log").read_text()
            # (the second's requests only: the frozen child's last ones, on the wire as it froze, may still be served)
            second_transport = _Recording(fake.transport())
            second = run_migrate_command(
                parse(*command), transport=second_transport, settings=settings, stdout=io.StringIO(), stderr=err
            )
            requests = second_transport.requests
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        resumed = run_migrate_command(
            parse(*command), transport=fake.transport(), settings=settings, stdout=io.StringIO()
        )
    assert second == 2 and requests == []
    assert f"another migration holds the journal {journal} (lock {journal}.lock: pid {child.pid} on " in err.getvalue()
    assert resumed == 0
    verify = parse("--mapping-file", mapping, "--verify")
    assert run_migrate_command(verify, transport=fake.transport(), settings=settings, stdout=io.StringIO()) == 0


# --- user ids Lago cannot address -------------------------------------------------------------------------------


def test_a_dotted_user_id_is_refused_up_front_with_what_to_do(fake: FakeLago, tmp_path: Path) -> None:
    """GET /customers/alice.smith reads customer 'alice' (format 'smith'): the migration can neither read
    alice.smith's customer nor end her subscriptions. Dry run and execute refuse the mapping (exit 2, nothing written)
    naming every such user, why, and what to do: not the advice for org ids (rename it), which here would name
    another customer and leave her subscription billing on."""
    fake.add_customer("alice", name="Another Alice")
    fake.add_customer("alice.smith", name="Alice Smith")
    fake.add_subscription("alice.smith", "pro", external_id="sub_alice_smith")
    fake.add_customer("bob.jones")
    fake.add_customer("carol")
    fake.add_subscription("carol", "pro", external_id="sub_carol")
    mapping = "user_id,org_id,org_name,email\nalice.smith,acme,Acme,\nbob.jones,acme,Acme,\ncarol,acme,Acme,\n"
    for argv in ((), ("--execute",)):
        fake.requests.clear()
        code, out, err, report = _migrate(fake, tmp_path, mapping, *argv)
        assert code == 2 and fake.write_requests == [] and out == ""
        assert "the mapping has 2 problem(s); nothing was changed" in err
        for line, user, head, tail in ((2, "alice.smith", "alice", "smith"), (3, "bob.jones", "bob", "jones")):
            problem = (
                f"mapping.csv line {line}: user_id {user!r} contains '.': Lago cannot address this user's customer "
                f"(GET /customers/{user} is read as customer {head!r} in format {tail!r}), so the migration can "
                "neither read it nor end its subscriptions. Do not rename it here"
            )
            assert problem in err and any(p.startswith(problem) for p in report["problems"])
        assert "Remove this row and move this user by hand" in err and "map 'acme.com' to 'acme-com'" not in err
    assert [s["external_id"] for s in subs(fake, "alice.smith")] == ["sub_alice_smith"]


# --- review of 353c6f8: an upgraded donor, a key that cannot read features, a pending org subscription, features
# granted to the donor subscription only -------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def lago(clock: Clock | None = None) -> FakeLago:
    fake = FakeLago(api_key=API_KEY, clock=clock or (lambda: datetime(2026, 3, 10, 12, tzinfo=timezone.utc)))
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    privileges = [{"code": "max_api_calls", "value_type": "integer"}]
    fake.add_feature("api_quota", privileges)
    fake.store.set_plan_entitlements("pro", {"entitlements": {"api_quota": {"max_api_calls": 1_000}}}, merge=False)
    return fake


def client_of(fake: FakeLago) -> LagoClient:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001, max_retries=0)
    return LagoClient(settings, transport=fake.transport())


def org_overrides(fake: FakeLago, external_id: str, status: str | None = None) -> dict[str, Any]:
    return {
        feature["code"]: feature["overrides"]
        for feature in fake.store.get_sub_entitlements(external_id, status)["entitlements"]
    }


def clear_overrides(fake: FakeLago, external_id: str) -> None:
    for subscription in fake.store.subscriptions:
        if subscription["external_id"] == external_id:
            subscription["entitlement_overrides"] = {}


@pytest.mark.anyio
async def test_verify_checks_the_overrides_of_a_donor_that_had_been_upgraded() -> None:
    """dave upgraded starter -> pro in January (his pro subscription has previous_plan_code 'starter') and has a
    custom max_api_calls on it. --execute takes it as the donor and carries the override; --verify must check it,
    but it drops every terminated subscription with a previous_plan_code from its donor pool, finds none, and
    verifies an org subscription that lacks the override (false positive)."""
    clock = Clock(datetime(2026, 1, 5, tzinfo=timezone.utc))
    fake = lago(clock)
    fake.add_customer("dave")
    fake.add_subscription("dave", "starter", external_id="sub_dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")  # upgrade: starter terminated, pro active
    fake.store.patch_sub_entitlements("sub_dave", None, {"entitlements": {"api_quota": {"max_api_calls": 50_000}}})
    clock.now = datetime(2026, 3, 10, 12, tzinfo=timezone.utc)
    async with client_of(fake) as client:
        run = await run_migration(client, [SOLO], mode="execute")
        assert run.ok, run.orgs[0].errors
        assert org_overrides(fake, "solo") == {"api_quota": {"max_api_calls": 50_000}}  # execute carried it

        clear_overrides(fake, "solo")  # the org subscription now has the plan's 1,000
        verify = await run_migration(client, [SOLO], mode="verify")
    assert not verify.ok, "verify passed an org subscription that lacks the donor's override"


@pytest.mark.anyio
async def test_a_key_that_cannot_read_features_does_not_abort_a_migration_without_overrides() -> None:
    """GET /features answers 403 (an API key without the feature permission, a Lago where entitlements are not
    available): 353c6f8 only tolerates a 404 there, so the run aborts at the first org ('The API key lacks a
    permission', nothing about features), although no subscription has an override; before, it migrated."""
    fake = lago()
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    forbidden = {"status": 403, "error": "Forbidden", "code": "feature_unavailable"}
    fake.faults.inject(403, path="/api/v1/features", body=forbidden)
    async with client_of(fake) as client:
        run = await run_migration(client, [SOLO], mode="dry-run")
    assert run.aborted is None, run.aborted
    assert run.orgs[0].status == "planned", run.orgs[0].errors


@pytest.mark.anyio
async def test_verify_advice_for_a_pending_org_subscription_names_its_status() -> None:
    """The org subscription starts later (dave's only one does): the PATCH --verify prints must address the
    pending subscription (?subscription_status=pending, as --execute did); without it Lago looks for an active
    one and answers 404."""
    fake = lago()
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave", subscription_at="2026-06-01T00:00:00Z")
    fake.store.patch_sub_entitlements("sub_dave", "pending", {"entitlements": {"api_quota": {"max_api_calls": 9}}})
    async with client_of(fake) as client:
        assert (await run_migration(client, [SOLO], mode="execute")).ok
        clear_overrides(fake, "solo")
        verify = await run_migration(client, [SOLO], mode="verify")
    [error] = [e for e in verify.orgs[0].errors if "PATCH" in e]
    assert "subscription_status=pending" in error, error


@pytest.mark.anyio
async def test_a_feature_granted_to_the_donor_subscription_only_goes_to_the_org() -> None:
    """dave's subscription was granted the feature 'sso' (not in his plan; a feature without privileges, added with
    PATCH /subscriptions/sub_dave/entitlements {"sso": {}}). It is a per-subscription entitlement like an override,
    but _override_values keeps only privilege values: the org subscription does not get sso, and verify does not
    notice."""
    fake = lago()
    fake.add_feature("sso", [])
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    fake.store.patch_sub_entitlements("sub_dave", None, {"entitlements": {"sso": {}}})
    assert "sso" in org_overrides(fake, "sub_dave")
    async with client_of(fake) as client:
        assert (await run_migration(client, [SOLO], mode="execute")).ok
    assert "sso" in org_overrides(fake, "solo")


# --- entitlements an API key may not read, features given or removed, a pending org subscription -----------------


FORBIDDEN = {"status": 403, "error": "Forbidden", "code": "read_action_not_allowed_for_feature"}
REFUSED = "Lago refused GET /features (403 read_action_not_allowed_for_feature): this API key may not read entitlements"


def test_a_key_that_cannot_read_features_stops_execute_unless_allowed(fake: FakeLago, tmp_path: Path) -> None:
    """GET /features answers 403 (a key without read access to features): the dry run says once that dave's override
    is neither carried nor verified, and how to fix it; --execute exits 2 before any write, saying so; with
    --allow-unreadable-entitlements it migrates, with the same warning once; --verify warns that it did not check
    them, and finds the missing override once the key may read features."""
    quota(fake)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    override(fake, "sub_dave", {"api_quota": {"max_api_calls": 50_000}})
    fake.faults.inject(403, path="/api/v1/features", body=FORBIDDEN)
    mapping = "user_id,org_id,org_name,email\ndave,solo,Solo,\n"
    code, out, _, report = _migrate(fake, tmp_path, mapping)
    assert code == 0 and out.count(REFUSED) == 1 and report["warnings"][0].startswith(REFUSED)
    assert "--execute stops before its first write unless given --allow-unreadable-entitlements" in out
    assert "give the API key read access to features" in out

    fake.requests.clear()
    code, out, err, report = _migrate(fake, tmp_path, mapping, "--execute")
    assert (code, out) == (2, "") and fake.write_requests == []
    assert f"error: {REFUSED}" in err and "Nothing was done: give the API key read access to features" in err
    assert "run again with --allow-unreadable-entitlements" in err
    assert report["ok"] is False and report["problems"][0].startswith(REFUSED)

    code, out, _, report = _migrate(fake, tmp_path, mapping, "--execute", "--allow-unreadable-entitlements")
    assert code == 0 and out.count(REFUSED) == 1 and report["warnings"][0].startswith(REFUSED)
    assert subs(fake, "dave") == [] and privileges(fake, "solo")["max_api_calls"] == (1_000, None)  # not carried

    code, out, _, _ = _migrate(fake, tmp_path, mapping, "--verify")
    assert code == 0 and "--verify did not check them" in out
    fake.faults.clear()
    code, out, _, _ = _migrate(fake, tmp_path, mapping, "--verify")
    assert code == 1 and "PATCH /subscriptions/solo/entitlements" in out


@pytest.mark.anyio
async def test_a_wrong_key_on_get_features_still_stops_the_run(fake: FakeLago, client: LagoClient) -> None:
    """A 401 on GET /features is a wrong key, not missing permissions: the run stops (aborted), nothing written."""
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    fake.faults.inject(401, path="/api/v1/features", body={"status": 401, "error": "Unauthorized"})
    run = await run_migration(client, [SOLO], mode="execute", allow_unreadable_entitlements=True)
    assert run.aborted is not None and "401" in run.aborted and not run.ok
    assert fake.write_requests == []


@pytest.mark.anyio
async def test_plan_entitlements_the_donor_went_without_are_removed_from_the_org_subscription(fake: FakeLago) -> None:
    """Plan pro has api_quota (max_api_calls, max_tokens) and sso; dave's subscription went without sso (DELETE
    /subscriptions/sub_dave/entitlements/sso) and without max_tokens (.../api_quota/privileges/max_tokens). The dry
    run's report shows it; --execute removes them from the org subscription too (DELETEs Lago's OpenAPI spec
    accepts); --verify checks it and prints the DELETE that fixes it."""
    quota(fake)
    fake.add_feature("sso", [])
    fake.store.set_plan_entitlements("pro", {"entitlements": {"sso": {}}}, merge=True)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    async with fake.client() as http:
        for path in ("sso", "api_quota/privileges/max_tokens"):
            assert (await http.delete(f"/api/v1/subscriptions/sub_dave/entitlements/{path}")).status_code == 200
    recorder = Recorder(fake.transport())
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=recorder) as client:
        dry = await run_migration(client, [SOLO], mode="dry-run")
        assert dry.to_json()["orgs"][0]["entitlement_overrides"] == {
            "from": "dave's subscription sub_dave",
            "values": {},
            "removed": ["api_quota.max_tokens", "sso"],
        }
        run = await run_migration(client, [SOLO], mode="execute")
        assert run.ok, run.orgs[0].errors
        deletes = [r for r in recorder.requests if r.method == "DELETE" and "/entitlements/" in r.url.path]
        assert [r.url.path for r in deletes] == [
            "/api/v1/subscriptions/solo/entitlements/api_quota/privileges/max_tokens",
            "/api/v1/subscriptions/solo/entitlements/sso",
        ]
        for request in deletes:
            assert_request_matches(request)
        assert [f["code"] for f in fake.store.get_sub_entitlements("solo", None)["entitlements"]] == ["api_quota"]
        assert privileges(fake, "solo") == {"max_api_calls": (1_000, None)}
        assert (await run_migration(client, [SOLO], mode="verify")).ok

        override(fake, "solo", {"sso": {}})  # sso back as the plan has it
        verify = await run_migration(client, [SOLO], mode="verify")
        assert not verify.ok
        assert (
            "org subscription 'solo' still has sso of its plan's entitlements, which dave's subscription sub_dave had "
            "removed; remove them: DELETE /subscriptions/solo/entitlements/sso (unless the org subscription was there "
            "before this migration: --execute then left them to the org, with a warning)"
        ) in verify.orgs[0].errors
        async with fake.client() as http:  # (what it prints)
            assert (await http.delete("/api/v1/subscriptions/solo/entitlements/sso")).status_code == 200
        assert (await run_migration(client, [SOLO], mode="verify")).ok


@pytest.mark.anyio
async def test_a_privilege_a_pending_donor_went_without_is_removed_from_the_pending_org_subscription(
    fake: FakeLago,
) -> None:
    """dave's only subscription starts in June and goes without max_tokens: the org subscription (pending too) goes
    without it as well, the DELETE addressing it with subscription_status=pending; --verify checks it."""
    quota(fake)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave", subscription_at="2026-06-01T00:00:00Z")
    async with fake.client() as http:
        path = "/api/v1/subscriptions/sub_dave/entitlements/api_quota/privileges/max_tokens"
        assert (await http.delete(path, params={"subscription_status": "pending"})).status_code == 200
    recorder = Recorder(fake.transport())
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=recorder) as client:
        assert (await run_migration(client, [SOLO], mode="execute")).ok
        [delete] = [r for r in recorder.requests if r.method == "DELETE" and "/entitlements/" in r.url.path]
        assert dict(delete.url.params) == {"subscription_status": "pending"}
        assert_request_matches(delete)
        assert privileges(fake, "solo", "pending") == {"max_api_calls": (1_000, None)}
        assert (await run_migration(client, [SOLO], mode="verify")).ok


@pytest.mark.anyio
async def test_a_feature_given_to_the_donor_subscription_only_is_shown_and_verified(
    fake: FakeLago, client: LagoClient
) -> None:
    """sso is not in plan pro; dave's subscription was given it without values (PATCH {"sso": {}}): the dry run
    shows it as sso={}, --execute gives it to the org subscription, --verify checks it and prints the PATCH."""
    quota(fake)
    fake.add_feature("sso", [])
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    override(fake, "sub_dave", {"sso": {}})
    dry = await run_migration(client, [SOLO], mode="dry-run")
    assert dry.orgs[0].entitlement_overrides == {"sso": {}}
    assert any(s.description.endswith("to those of dave's subscription sub_dave: sso={}") for s in dry.orgs[0].steps)
    assert (await run_migration(client, [SOLO], mode="execute")).ok
    assert (await run_migration(client, [SOLO], mode="verify")).ok
    async with fake.client() as http:
        assert (await http.delete("/api/v1/subscriptions/solo/entitlements/sso")).status_code == 200
    verify = await run_migration(client, [SOLO], mode="verify")
    assert (
        "org subscription 'solo' lacks the entitlement overrides of dave's subscription sub_dave: sso={} (it gets the "
        'plan\'s values); set them: PATCH /subscriptions/solo/entitlements {"entitlements":{"sso":{}}}'
    ) in verify.orgs[0].errors


@pytest.mark.anyio
async def test_overrides_not_carried_to_a_pending_org_subscription_name_its_status(
    fake: FakeLago, client: LagoClient
) -> None:
    """dave's only subscription starts in June; the mapping puts the org on starter (it starts in June too): the
    warning that his overrides are not carried gives a PATCH addressing the pending subscription."""
    quota(fake)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave", subscription_at="2026-06-01T00:00:00Z")
    override(fake, "sub_dave", {"api_quota": {"max_api_calls": 50_000}}, status="pending")
    org = OrgMapping("solo", "Solo", None, ("dave",), plan_code="starter")
    dry = await run_migration(client, [org], mode="dry-run")
    assert any(
        w.endswith(
            "if they still apply, set them with PATCH /subscriptions/solo/entitlements?subscription_status=pending"
        )
        for w in dry.orgs[0].warnings
    ), dry.orgs[0].warnings


def test_a_journal_lock_that_cannot_be_taken_says_what_to_do(fake: FakeLago, tmp_path: Path) -> None:
    """The journal's directory cannot be made (a file is in the way): exit 2, nothing done, and what to do."""
    (tmp_path / "afile").write_text("")
    journal = tmp_path / "afile" / "journal.jsonl"
    fake.requests.clear()
    code, out, err, _ = _migrate(
        fake, tmp_path, "user_id,org_id,org_name,email\ndave,solo,Solo,\n", "--execute", "--journal", str(journal)
    )
    assert (code, out) == (2, "") and fake.requests == []
    assert f"error: --journal {journal}: its lock {journal}.lock cannot be taken (" in err
    assert "nothing was done" in err and "give a --journal in a directory this user can write" in err


# --- found reviewing 82c91a1: a features read that failed otherwise, removals on an existing org subscription, ----
# --- the one-user path without readable entitlements ---------------------------------------------------------------


def sso_in_pro(fake: FakeLago) -> None:
    """:func:`quota`, and feature sso (no privileges) in plan pro too."""
    quota(fake)
    fake.add_feature("sso", [])
    fake.store.set_plan_entitlements("pro", {"entitlements": {"sso": {}}}, merge=True)


async def remove_sso(fake: FakeLago, external_id: str) -> None:
    async with fake.client() as http:
        assert (await http.delete(f"/api/v1/subscriptions/{external_id}/entitlements/sso")).status_code == 200


@pytest.mark.anyio
async def test_a_403_on_features_after_a_first_failed_read_still_stops_execute(fake: FakeLago) -> None:
    """The up-front GET /features is rate-limited (a 429 after the client's retries: neither a refusal nor Lago
    unavailable), and would answer 403 when asked again by each org: --execute stops before any write instead of
    migrating dave without his override (plan_org's own read would quietly answer 'no features'), saying what to do.
    A dry run goes on and, once an org's own read gets the 403, warns as when the first read got it; so does --execute
    told to go on without them."""
    quota(fake)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    override(fake, "sub_dave", {"api_quota": {"max_api_calls": 50_000}})
    fake.faults.inject(429, path="/api/v1/features", count=1)
    fake.faults.inject(403, path="/api/v1/features", body=FORBIDDEN)
    async with client_of(fake) as client:
        with pytest.raises(EntitlementsUnreadableError) as raised:
            await run_migration(client, [SOLO], mode="execute")
    assert fake.write_requests == []
    assert str(raised.value).startswith("GET /features failed (") and "429" in str(raised.value)
    assert "Nothing was done: run again once Lago answers it" in str(raised.value)
    assert "run again with --allow-unreadable-entitlements" in str(raised.value)

    for mode, allow in (("dry-run", False), ("execute", True)):
        fake.faults.clear()
        fake.faults.inject(429, path="/api/v1/features", count=1)
        fake.faults.inject(403, path="/api/v1/features", body=FORBIDDEN)
        async with client_of(fake) as client:
            run = await run_migration(client, [SOLO], mode=mode, allow_unreadable_entitlements=allow)  # type: ignore[arg-type]
        assert run.ok, run.orgs[0].errors
        assert [w for w in run.warnings if w.startswith(REFUSED)] == run.warnings and len(run.warnings) == 1, mode
    assert subs(fake, "dave") == [] and privileges(fake, "solo")["max_api_calls"] == (1_000, None)  # not carried


@pytest.mark.anyio
async def test_migrate_user_to_org_can_go_on_without_readable_entitlements(fake: FakeLago) -> None:
    """The refusal says 'allow_unreadable_entitlements=True from Python': OrgBilling.migrate_user_to_org (and
    migrate_user) take it, and the outcome's warnings say the overrides were not carried."""
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    fake.faults.inject(403, path="/api/v1/features", body=FORBIDDEN)
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, max_retries=0)
    async with OrgBilling(settings, transport=fake.transport()) as billing:
        with pytest.raises(EntitlementsUnreadableError, match="allow_unreadable_entitlements=True from Python"):
            await billing.migrate_user_to_org("dave", "solo", "Solo")
        assert fake.write_requests == []
        outcome = await billing.migrate_user_to_org(  # what the message tells to do
            "dave", "solo", "Solo", allow_unreadable_entitlements=True
        )
    assert outcome["changed"] and outcome["terminated_subscriptions"] == ["sub_dave"]
    assert outcome["warnings"][0].startswith(REFUSED)


@pytest.mark.anyio
async def test_a_user_s_removed_feature_is_not_taken_from_an_org_subscription_that_already_had_it(
    fake: FakeLago,
) -> None:
    """acme already has its pro subscription (the team uses SSO). bob, also on pro, had sso removed from his own
    subscription. Migrating bob: acme keeps its subscription, bob's is the donor, and the whole org must not lose a
    plan feature for one user's restriction: no DELETE, a warning naming it and the call, should the org go without."""
    sso_in_pro(fake)
    fake.add_customer("acme", name="Acme")
    fake.add_subscription("acme", "pro", external_id="acme")
    fake.add_customer("bob")
    fake.add_subscription("bob", "pro", external_id="sub_bob")
    await remove_sso(fake, "sub_bob")
    assert "sso" in org_overrides(fake, "acme")
    acme = OrgMapping("acme", "Acme", None, ("bob",))
    async with client_of(fake) as client:
        dry = await run_migration(client, [acme], mode="dry-run")
        run = await run_migration(client, [acme], mode="execute")
    assert run.ok, run.orgs[0].errors
    assert "sso" in org_overrides(fake, "acme"), (
        f"the existing org subscription lost sso: {[s.description for s in run.orgs[0].steps]}"
    )
    assert not [r for r in fake.write_requests if r.method == "DELETE" and "/acme/entitlements/" in r.path]
    for result in (dry.orgs[0], run.orgs[0]):
        assert "remove_entitlements" not in [s.kind for s in result.steps]
        assert result.entitlements_removed == [] and result.to_json()["entitlement_overrides"] == {
            "from": "bob's subscription sub_bob",
            "values": {},
        }
        assert (
            "org subscription 'acme' existed before this migration: it keeps sso of its plan's entitlements, which "
            "bob's subscription sub_bob had removed (not taken from the whole org for one user); if the org should "
            "go without them: DELETE /subscriptions/acme/entitlements/sso"
        ) in result.warnings


@pytest.mark.anyio
async def test_verify_does_not_ask_to_take_a_removed_feature_from_an_org_subscription_older_than_the_donor() -> None:
    """acme's subscription was made on 1 March; bob subscribed on 5 March and went without sso; migrated on 10
    March, acme keeps sso: --verify passes, warning with the DELETE should the org go without it (acme's subscription
    is older than bob's: not one his migration made)."""
    clock = Clock(datetime(2026, 3, 1, 12, tzinfo=timezone.utc))
    fake = lago(clock)
    fake.add_feature("sso", [])
    fake.store.set_plan_entitlements("pro", {"entitlements": {"sso": {}}}, merge=True)
    fake.add_customer("acme", name="Acme")
    fake.add_subscription("acme", "pro", external_id="acme")
    clock.now = datetime(2026, 3, 5, 12, tzinfo=timezone.utc)
    fake.add_customer("bob")
    fake.add_subscription("bob", "pro", external_id="sub_bob")
    await remove_sso(fake, "sub_bob")
    clock.now = datetime(2026, 3, 10, 12, tzinfo=timezone.utc)
    acme = OrgMapping("acme", "Acme", None, ("bob",))
    async with client_of(fake) as client:
        assert (await run_migration(client, [acme], mode="execute")).ok
        verify = await run_migration(client, [acme], mode="verify")
    assert verify.ok, verify.orgs[0].errors
    assert "sso" in org_overrides(fake, "acme")
    assert any(
        w.startswith("org subscription 'acme' existed before bob's subscription sub_bob: it keeps sso")
        and w.endswith("if the org should go without them: DELETE /subscriptions/acme/entitlements/sso")
        for w in verify.orgs[0].warnings
    ), verify.orgs[0].warnings


@pytest.mark.anyio
async def test_a_run_stopped_before_removing_from_the_org_subscription_it_made_removes_when_resumed(
    fake: FakeLago, tmp_path: Path
) -> None:
    """The run makes the org subscription, then Lago fails the DELETE of sso (the run stops: dave still subscribed).
    Resumed with the same journal, the org subscription found is the one this migration made (the journal recorded
    it before asking Lago): sso is removed from it. Re-run without the journal, the migration cannot tell it from one
    the org had before: it leaves sso and warns, with the DELETE."""
    sso_in_pro(fake)
    fake.add_customer("dave")
    fake.add_subscription("dave", "pro", external_id="sub_dave")
    await remove_sso(fake, "sub_dave")
    path = tmp_path / "journal.jsonl"
    fake.faults.inject(503, path="/api/v1/subscriptions/solo/entitlements/sso")
    journal = Journal(path)
    try:
        async with client_of(fake) as client:
            stopped = await run_migration(client, [SOLO], mode="execute", journal=journal)
    finally:
        journal.close()
    assert stopped.aborted is not None and not stopped.ok
    assert [s["external_id"] for s in subs(fake, "solo")] == ["solo"] and subs(fake, "dave") != []
    assert "sso" in org_overrides(fake, "solo")
    fake.faults.clear()

    async with client_of(fake) as client:  # (without the journal: not known to be this migration's)
        dry = await run_migration(client, [SOLO], mode="dry-run")
    assert "remove_entitlements" not in [s.kind for s in dry.orgs[0].steps]
    assert any(w.startswith("org subscription 'solo' existed before this migration") for w in dry.orgs[0].warnings)

    journal = Journal(path)
    try:
        async with client_of(fake) as client:
            resumed = await run_migration(client, [SOLO], mode="execute", journal=journal)
    finally:
        journal.close()
    assert resumed.ok, resumed.orgs[0].errors
    assert done_writes(resumed)[0] == "remove_entitlements:solo" and "sso" not in org_overrides(fake, "solo")
    assert subs(fake, "dave") == [] and not resumed.orgs[0].warnings
    async with client_of(fake) as client:
        assert (await run_migration(client, [SOLO], mode="verify")).ok


@pytest.mark.anyio
async def test_a_journal_of_another_migration_does_not_make_an_existing_org_subscription_this_one_s(
    fake: FakeLago, tmp_path: Path
) -> None:
    """The journal recorded that a migration of acme with alice made acme's subscription; bob is added to the mapping
    later (another fingerprint) and went without sso: acme keeps sso."""
    sso_in_pro(fake)
    fake.add_customer("alice")
    fake.add_subscription("alice", "pro", external_id="sub_alice")
    fake.add_customer("bob")
    fake.add_subscription("bob", "pro", external_id="sub_bob", billing_time="anniversary")
    await remove_sso(fake, "sub_bob")
    path = tmp_path / "journal.jsonl"
    for users in (("alice",), ("bob",)):
        journal = Journal(path)
        try:
            async with client_of(fake) as client:
                org = OrgMapping("acme", "Acme", None, users)
                assert (await run_migration(client, [org], mode="execute", journal=journal)).ok
        finally:
            journal.close()
    assert path.read_text().count('"step":"create_subscription","target":"acme","outcome":"started"') == 1
    assert "sso" in org_overrides(fake, "acme") and subs(fake, "bob") == []
