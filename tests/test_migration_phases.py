"""A migration in two phases that loses nothing while traffic flows (``migrate --execute --prepare``, deploy the
middleware, then plain ``migrate --execute``): the first phase makes the org customers and subscriptions (with the
donor's entitlement overrides) and leaves the users' subscriptions active and unmarked, so that the old in-house
integration's user-keyed events and the middleware's org-keyed events are both billed during the window; ``--verify``
between the phases says the second phase is pending; the dry run shows the phase; the journal resumes either phase
and a second phase with a changed mapping warns; a journal of a version without phases still skips its orgs.
Everything through the emulator."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import Clock, chat, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, _middleware as middleware_module
from lago_org_billing._migration import Journal, MigrationOptions, OrgMapping, run_migration
from lago_org_billing._migration_cli import add_migrate_command, run_migrate_command
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"
ACME = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("alice", "bob"))
PREPARE = MigrationOptions(prepare_only=True)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(middleware_module, "time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic))
    return clock


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """alice on pro with a custom max_api_calls of 50,000 (the plan's: 10,000), bob on starter; org acme (theirs) not
    migrated; carol (on starter) of org globex."""
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=5)
    for user, plan in (("alice", "pro"), ("bob", "starter"), ("carol", "starter")):
        fake.add_customer(user)
        fake.add_subscription(user, plan, external_id=f"sub_{user}")
    fake.store.patch_sub_entitlements("sub_alice", None, {"entitlements": {"api_quota": {"max_api_calls": 50_000}}})
    return fake


@pytest.fixture
def settings(fake: FakeLago) -> BillingSettings:
    return BillingSettings(
        api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", user_header="X-User-Id", retry_backoff=0.001
    )


@pytest.fixture
async def lago(fake: FakeLago, settings: BillingSettings) -> AsyncIterator[LagoClient]:
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


def subscription(fake: FakeLago, external_id: str) -> dict[str, Any]:
    return next(s for s in fake.subscriptions if s["external_id"] == external_id)


def stored(fake: FakeLago, external_id: str) -> dict[str, Any]:
    """The emulator's record of the subscription (its entitlement overrides and removals)."""
    return next(s for s in fake.store.subscriptions if s["external_id"] == external_id)


def marks(fake: FakeLago, user: str) -> dict[str, str]:
    customer = next(c for c in fake.customers if c["external_id"] == user)
    return {m["key"]: m["value"] for m in customer["metadata"]}


def api_call_events(usage: dict[str, Any]) -> int:
    return sum(int(c["events_count"]) for c in usage["charges_usage"] if c["billable_metric"]["code"] == "api_call")


def event(sub_id: str, n: int, at: float) -> dict[str, Any]:
    return {
        "transaction_id": f"old_{sub_id}_{n}",
        "external_subscription_id": sub_id,
        "code": "api_call",
        "timestamp": at,
        "properties": {"total_tokens": 10},
    }


def cli(fake: FakeLago, settings: BillingSettings, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["migrate", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def mapping_file(tmp_path: Path, rows: list[tuple[str, str, str]], name: str = "map.csv") -> str:
    path = tmp_path / name
    path.write_text("user_id,org_id,org_name,email\n" + "".join(f"{u},{o},{n},\n" for u, o, n in rows))
    return str(path)


# -- the first phase ---------------------------------------------------------------------------------------------


async def test_prepare_subscribes_the_org_and_leaves_the_users_billing(fake: FakeLago, lago: LagoClient) -> None:
    """The first phase makes the org customer and its subscription (alice's pro, with her 50,000 calls) and neither
    ends the users' subscriptions nor marks them; it warns that the fixed fees overlap until the second phase."""
    run = await run_migration(lago, [ACME], mode="execute", options=PREPARE)
    assert run.ok
    [acme] = run.orgs
    assert acme.status == "prepared"
    assert [step.kind for step in acme.steps] == ["upsert_customer", "create_subscription", "set_entitlements"]
    assert subscription(fake, "acme")["plan_code"] == "pro"
    assert stored(fake, "acme")["entitlement_overrides"] == {"api_quota": {"max_api_calls": 50_000}}
    assert [subscription(fake, f"sub_{u}")["status"] for u in ("alice", "bob")] == ["active", "active"]
    assert "migrated_to_org" not in marks(fake, "alice") and "migrated_to_org" not in marks(fake, "bob")
    text = "\n".join(acme.warnings)
    assert "sub_alice" in text and "sub_bob" in text and "fixed fee" in text and "second phase" in text
    # (a second first phase has nothing left to do)
    again = await run_migration(lago, [ACME], mode="execute", options=PREPARE)
    assert again.ok and again.orgs[0].status == "up-to-date" and again.orgs[0].steps == []


async def test_the_window_between_the_phases_bills_every_event_once(
    fake: FakeLago, lago: LagoClient, clock: Clock
) -> None:
    """Between the phases the old integration's events go to the users' subscriptions and the middleware's to the
    org's: each is billed once, on the subscription it names (the users' on their termination invoices); nothing is
    answered 402 and nothing is taken by Lago unbilled. The second phase ends and marks the users."""
    assert (await run_migration(lago, [ACME], mode="execute", options=PREPARE)).ok
    clock.advance(60)
    await lago.create_events([event("sub_alice", n, clock.time()) for n in range(3)])  # (the old code, still running)
    gate = QuotaGate(lago.settings, lago, config=QuotaConfig(), clock=clock.time)
    app = Starlette(routes=[Route("/chat", chat, methods=["POST"])])
    middleware = OrgBillingMiddleware(app, lago.settings, quota=gate, client=lago)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for _ in range(2):
                response = await client.post("/chat", headers={"X-Org-Id": "acme", "X-User-Id": "bob"})
                assert response.status_code == 200, response.text
            assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert api_call_events(await lago.get_current_usage("alice", "sub_alice")) == 3
    assert api_call_events(await lago.get_current_usage("acme", "acme")) == 2
    clock.advance(60)
    finish = await run_migration(lago, [ACME], mode="execute")
    assert finish.ok and finish.orgs[0].status == "migrated"
    assert [s.kind for s in finish.orgs[0].steps] == [
        "terminate_subscription",
        "terminate_subscription",
        "mark_user",
        "mark_user",
    ]
    assert subscription(fake, "sub_alice")["status"] == "terminated"
    assert marks(fake, "alice")["migrated_to_org"] == "acme"
    alice_invoices = [i for i in fake.invoices if i["customer"]["external_id"] == "alice"]
    assert alice_invoices, "the termination invoice bills alice's events of the window"
    assert api_call_events(await lago.get_current_usage("acme", "acme")) == 2
    assert (await run_migration(lago, [ACME], mode="verify")).ok


async def test_verify_between_the_phases_says_the_second_phase_is_pending(lago: LagoClient) -> None:
    """--verify after the first phase is not ok: the users' subscriptions are still active, and it says the second
    phase is pending (and what to run); the org subscription's entitlement overrides are checked already."""
    assert (await run_migration(lago, [ACME], mode="execute", options=PREPARE)).ok
    verify = await run_migration(lago, [ACME], mode="verify")
    assert not verify.ok
    errors = verify.orgs[0].errors
    assert "user 'alice' (org 'acme') still has active subscription(s) sub_alice" in errors
    assert "user 'bob' (org 'acme') still has active subscription(s) sub_bob" in errors
    pending = [e for e in errors if "second phase" in e]
    assert len(pending) == 1 and "--prepare" in pending[0] and "migrate --execute" in pending[0]
    assert not any("lacks the entitlement overrides" in e for e in errors)


async def test_verify_between_the_phases_checks_the_donor_s_overrides(fake: FakeLago, lago: LagoClient) -> None:
    """The org subscription made by the first phase lost alice's overrides: --verify says so (the donor, picked among
    the users' still-active subscriptions)."""
    assert (await run_migration(lago, [ACME], mode="execute", options=PREPARE)).ok
    stored(fake, "acme")["entitlement_overrides"] = {}
    verify = await run_migration(lago, [ACME], mode="verify")
    assert any("lacks the entitlement overrides of alice's subscription sub_alice" in e for e in verify.orgs[0].errors)


# -- CLI: flags, dry run ------------------------------------------------------------------------------------------


def test_the_dry_run_shows_the_phase(fake: FakeLago, settings: BillingSettings, tmp_path: Path) -> None:
    """``migrate --prepare`` (a dry run) plans phase 1 only; plain dry runs say "both phases at once" before and
    "phase 2" after the first phase."""
    mapping = mapping_file(tmp_path, [("alice", "acme", "Acme"), ("bob", "acme", "Acme")])
    code, out, _ = cli(fake, settings, "--mapping-file", mapping)
    assert code == 0 and "both phases at once" in out, out
    code, out, _ = cli(fake, settings, "--mapping-file", mapping, "--prepare")
    assert code == 0, out
    assert "phase 1 of 2 (--prepare)" in out and "terminate" not in out and "mark user" not in out
    assert "subscribe org acme to pro" in out
    code, out, err = cli(fake, settings, "--mapping-file", mapping, "--execute", "--prepare")
    assert code == 0, out + err
    assert "without --prepare" in out  # (what to do next)
    code, out, _ = cli(fake, settings, "--mapping-file", mapping)
    assert code == 0 and "phase 2 of 2" in out and "terminate alice's subscription sub_alice" in out, out
    code, _, err = cli(fake, settings, "--mapping-file", mapping, "--verify", "--prepare")
    assert code == 2 and "--prepare" in err


# -- journal: resume either phase, a changed mapping, older journals -----------------------------------------------


class FailOn(httpx.AsyncBaseTransport):
    """Lago answering 422 to one request (method and path), everything else passed on."""

    def __init__(self, inner: httpx.AsyncBaseTransport, method: str, path: str) -> None:
        self.inner, self.method, self.path = inner, method, path

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == self.method and request.url.path == self.path:
            return httpx.Response(422, json={"status": 422, "error": "Unprocessable Entity", "code": "x"})
        return await self.inner.handle_async_request(request)


async def test_a_first_phase_interrupted_is_finished_by_the_second_with_the_journal(
    fake: FakeLago, lago: LagoClient, tmp_path: Path
) -> None:
    """alice's pro went without max_tokens. The first phase stops after making the org subscription (its PATCH
    refused): the second phase, given the journal, knows the migration made that subscription, so it takes
    max_tokens from it as well (rather than leaving it, as for a subscription the org had before)."""
    fake.store.set_plan_entitlements(
        "pro", {"entitlements": {"api_quota": {"max_api_calls": 10_000, "max_tokens": 99}}}, merge=False
    )
    fake.store.remove_sub_entitlement_privilege("sub_alice", None, "api_quota", "max_tokens")
    journal_path = tmp_path / "journal.jsonl"
    journal = Journal(journal_path)
    refusing = FailOn(fake.transport(), "PATCH", "/api/v1/subscriptions/acme/entitlements")
    async with LagoClient(lago.settings, transport=refusing) as failing:
        first = await run_migration(failing, [ACME], mode="execute", options=PREPARE, journal=journal)
    journal.close()
    assert first.orgs[0].status == "failed" and subscription(fake, "acme")["status"] == "active"
    assert subscription(fake, "sub_alice")["status"] == "active"
    journal = Journal(journal_path)
    try:
        second = await run_migration(lago, [ACME], mode="execute", journal=journal)
    finally:
        journal.close()
    assert second.ok, second.orgs[0].errors
    assert not any("existed before" in w for w in second.orgs[0].warnings), second.orgs[0].warnings
    assert stored(fake, "acme")["entitlement_overrides"] == {"api_quota": {"max_api_calls": 50_000}}
    assert "max_tokens" in json.dumps(stored(fake, "acme")["entitlement_removals"])
    assert subscription(fake, "sub_alice")["status"] == "terminated"
    assert (await run_migration(lago, [ACME], mode="verify")).ok


async def test_the_journal_skips_done_orgs_of_each_phase_only(fake: FakeLago, lago: LagoClient, tmp_path: Path) -> None:
    """A first phase done is skipped by a first phase again, not by the second (another fingerprint); a second phase
    interrupted (Lago refusing to end bob's subscription) is resumed by the same command."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    assert (await run_migration(lago, [ACME], mode="execute", options=PREPARE, journal=journal)).ok
    again = await run_migration(lago, [ACME], mode="execute", options=PREPARE, journal=journal)
    assert again.orgs[0].status == "journal"
    journal.close()
    journal = Journal(path)
    refusing = FailOn(fake.transport(), "DELETE", "/api/v1/subscriptions/sub_bob")
    async with LagoClient(lago.settings, transport=refusing) as bad:
        second = await run_migration(bad, [ACME], mode="execute", journal=journal)
    assert second.orgs[0].status == "failed"
    resumed = await run_migration(lago, [ACME], mode="execute", journal=journal)
    journal.close()
    assert resumed.ok and resumed.orgs[0].status == "migrated"
    assert (await run_migration(lago, [ACME], mode="verify")).ok


async def test_a_second_phase_with_a_changed_mapping_says_what_the_prepared_org_keeps(lago: LagoClient) -> None:
    """Prepared with alice and bob, acme took alice's pro. The mapping is fixed before the second phase: alice belongs
    to globex. The second phase ends alice's subscription for globex; acme keeps the pro it took from her, and says
    so (it used to say nothing: alice had no migrated_to_org mark yet)."""
    assert (await run_migration(lago, [ACME], mode="execute", options=PREPARE)).ok
    changed = [
        OrgMapping("acme", "Acme", None, ("bob",)),
        OrgMapping("globex", "Globex", None, ("carol", "alice")),
    ]
    for mode in ("dry-run", "execute"):
        run = await run_migration(lago, changed, mode=mode)  # type: ignore[arg-type]
        text = "\n".join(run.orgs[0].warnings)
        assert "'alice'" in text and "no longer mapped" in text and "change_plan" in text, (mode, run.orgs[0].warnings)


async def test_an_org_not_prepared_is_said_by_the_second_phase(lago: LagoClient, tmp_path: Path) -> None:
    """With the journal of the first phase, an org the second phase subscribes only now (added to the mapping since)
    had no subscription while the middleware ran: a warning says its events of the window were not billed."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    try:
        assert (await run_migration(lago, [ACME], mode="execute", options=PREPARE, journal=journal)).ok
        globex = OrgMapping("globex", "Globex", None, ("carol",))
        run = await run_migration(lago, [ACME, globex], mode="execute", journal=journal)
    finally:
        journal.close()
    assert run.ok
    assert not any("not prepared" in w for w in run.orgs[0].warnings)
    assert any("not prepared" in w and "--prepare" in w for w in run.orgs[1].warnings), run.orgs[1].warnings


def test_the_journal_of_a_run_without_phases_still_matches() -> None:
    """The new option is left out of the fingerprint when off: a journal written before phases existed still skips
    its done orgs; the first phase has a fingerprint of its own."""
    settings = BillingSettings(api_key=API_KEY)
    old_options = ["highest", None, "generate", None]
    target = [settings.api_url, settings.subscription_id_template]
    data = json.dumps([dataclasses.astuple(ACME), old_options, target], sort_keys=True)
    assert ACME.fingerprint(MigrationOptions(), settings) == hashlib.sha256(data.encode()).hexdigest()[:16]
    assert ACME.fingerprint(PREPARE, settings) != ACME.fingerprint(MigrationOptions(), settings)


def test_a_dry_run_given_the_first_phase_s_journal_says_the_orgs_were_prepared(
    fake: FakeLago, settings: BillingSettings, tmp_path: Path
) -> None:
    """The second phase's dry run with the journal of the first used to say its orgs were "done before with another
    mapping row, options or Lago" (their fingerprints differ by the phase); it says they were prepared."""
    mapping = mapping_file(tmp_path, [("alice", "acme", "Acme"), ("bob", "acme", "Acme")])
    journal = str(tmp_path / "journal.jsonl")
    code, out, err = cli(fake, settings, "--mapping-file", mapping, "--journal", journal, "--execute", "--prepare")
    assert code == 0, out + err
    code, out, err = cli(fake, settings, "--mapping-file", mapping, "--journal", journal)
    assert code == 0, out + err
    assert "another mapping row" not in err
    assert "1 orgs prepared by the first phase (--prepare)" in err, err
    assert "phase 2 of 2" in out
