"""The two-phase migration (``migrate --execute --prepare``, then ``migrate --execute``), driven through
the CLI entry point against the emulator: ``--verify`` after a plan bought or upgraded in the window between the
phases; a second phase run without the first phase's journal and with another ``--plan-policy``; a dry run of either
phase never writes; a first or second phase stopped at any write and resumed ends in the state of an uninterrupted
two-phase migration; a donor with several subscriptions."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import httpx
import pytest

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings
from lago_org_billing._migration_cli import add_migrate_command, run_migrate_command
from lago_org_billing.testing import FakeLago

API_KEY = "k"
ALICE = {"api_quota": {"max_api_calls": 50_000}}
DAVE = {"api_quota": {"max_tokens": 7}}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings() -> BillingSettings:
    return BillingSettings(api_url="http://lago.test", api_key=API_KEY, retry_backoff=0.001)


def make_fake(clock: Clock, users: tuple[tuple[str, str], ...]) -> FakeLago:
    """``users`` (user, plan) subscribed a day apart, in that order (``sub_<user>``); alice's pro has a max_api_calls of
    its own (50,000), dave's pro a max_tokens of its own (7)."""
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=5)
    fake.add_plan("enterprise", amount_cents=90_000, entitlements={"api_quota": {"max_api_calls": 90_000}})
    for user, plan in users:
        fake.add_customer(user)
        fake.add_subscription(user, plan, external_id=f"sub_{user}")
        clock.advance(86_400)
    if "alice" in dict(users):
        fake.store.patch_sub_entitlements("sub_alice", None, {"entitlements": ALICE})
    if "dave" in dict(users):
        fake.store.patch_sub_entitlements("sub_dave", None, {"entitlements": DAVE})
    return fake


def cli(
    fake: FakeLago,
    settings: BillingSettings,
    *argv: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["migrate", *argv])
    out = io.StringIO()
    settings = settings.replace(api_url=fake.base_url)
    code = run_migrate_command(args, transport=transport or fake.transport(), settings=settings, stdout=out, stderr=out)
    return code, out.getvalue()


def mapping(tmp_path: Path, *rows: tuple[str, str]) -> str:
    path = tmp_path / "map.csv"
    path.write_text("user_id,org_id,org_name,email\n" + "".join(f"{u},{o},{o.title()},\n" for u, o in rows))
    return str(path)


def org_overrides(fake: FakeLago, org: str = "acme") -> Any:
    sub = next(s for s in fake.store.subscriptions if s["external_id"] == org and s["status"] == "active")
    return sub["entitlement_overrides"]


def statuses(fake: FakeLago, external_id: str) -> list[str]:
    return [s["status"] for s in fake.subscriptions if s["external_id"] == external_id]


# -- verify after a plan bought in the window -------------------------------------------------------------------------


def test_verify_after_an_upgrade_in_the_window_does_not_ask_for_the_upgrade_s_overrides(
    clock: Clock, settings: BillingSettings, tmp_path: Path
) -> None:
    """--plan-policy newest: bob (starter) then alice (pro, 50,000 calls of her own); the first phase gives the org
    alice's pro and overrides. In the window bob upgrades to pro, and his new pro gets a max_tokens of 7 of its own.
    The second phase rightly keeps alice as the donor (bob's pro began after the org subscription) and ends bob's pro.
    --verify then picked bob's upgraded pro as the donor (the newest of the subscriptions ended since) and failed the
    org: "lacks the entitlement overrides of bob's subscription sub_bob ... PATCH ... max_tokens 7", advice that would
    cap the whole org at 7 tokens. It picks the donor as --execute did, and passes."""
    fake = make_fake(clock, (("bob", "starter"), ("alice", "pro")))
    rows = mapping(tmp_path, ("alice", "acme"), ("bob", "acme"))
    code, out = cli(fake, settings, "--mapping-file", rows, "--execute", "--prepare", "--plan-policy", "newest")
    assert code == 0, out
    assert org_overrides(fake) == ALICE
    clock.advance(3_600)
    fake.store.create_subscription(
        {"subscription": {"external_customer_id": "bob", "plan_code": "pro", "external_id": "sub_bob"}}
    )
    fake.store.patch_sub_entitlements("sub_bob", None, {"entitlements": DAVE})
    clock.advance(3_600)
    code, out = cli(fake, settings, "--mapping-file", rows, "--execute", "--plan-policy", "newest")
    assert code == 0, out
    assert org_overrides(fake) == ALICE
    assert statuses(fake, "sub_bob") == ["terminated", "terminated"]
    code, out = cli(fake, settings, "--mapping-file", rows, "--verify", "--plan-policy", "newest")
    assert "max_tokens" not in out, out
    assert code == 0, out


# -- a second phase without the journal, with another plan policy -----------------------------------------------------


def test_a_second_phase_with_another_plan_policy_and_no_journal_keeps_the_first_phase_s_overrides(
    clock: Clock, settings: BillingSettings, tmp_path: Path
) -> None:
    """alice (pro, 50,000 calls of her own) then dave (pro, max_tokens 7 of his own). The first phase (highest: the
    older pro) gives the org alice's. The second phase is run without the journal and with --plan-policy newest: it
    picked dave as the donor and added his max_tokens 7 to the org subscription (an org of two pros capped at 7 tokens
    per period). Lago's state says whose the first phase took (the org subscription has all of alice's and none of
    dave's): kept, with a warning; nothing is written to the org subscription."""
    fake = make_fake(clock, (("alice", "pro"), ("dave", "pro")))
    rows = mapping(tmp_path, ("alice", "acme"), ("dave", "acme"))
    code, out = cli(fake, settings, "--mapping-file", rows, "--execute", "--prepare")
    assert code == 0, out
    assert org_overrides(fake) == ALICE
    code, out = cli(fake, settings, "--mapping-file", rows, "--plan-policy", "newest")
    assert code == 0, out
    assert "set entitlement overrides" not in out, out
    fake.requests.clear()
    code, out = cli(fake, settings, "--mapping-file", rows, "--execute", "--plan-policy", "newest")
    assert code == 0, out
    assert org_overrides(fake) == ALICE, out
    assert not any("/subscriptions/acme/entitlements" in r.path for r in fake.write_requests), out
    assert "alice's subscription sub_alice" in out and "first phase" in out, out
    assert statuses(fake, "sub_alice") == ["terminated"] and statuses(fake, "sub_dave") == ["terminated"]
    # --verify given the second phase's --plan-policy asked to add dave's max_tokens 7 (PATCH ...): it finds alice's
    code, out = cli(fake, settings, "--mapping-file", rows, "--verify", "--plan-policy", "newest")
    assert code == 0 and "PATCH" not in out, out
    assert "alice's subscription sub_alice" in out, out


# -- stopped at any write of either phase, resumed; dry runs never write ----------------------------------------------


class StopAt(httpx.AsyncBaseTransport):
    """Lago refusing (401: the run stops there, as if killed) the ``nth`` write and every request after it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, nth: int) -> None:
        self.inner, self.nth, self.writes = inner, nth, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET" and request.url.path.startswith("/api/"):
            self.writes += 1
        if self.writes >= self.nth:
            return httpx.Response(401, json={"status": 401, "error": "Unauthorized", "code": "unauthorized"})
        return await self.inner.handle_async_request(request)


def three_users(clock: Clock) -> FakeLago:
    """alice on starter; bob on pro three days later, the donor (highest), with 50,000 calls of his own and without
    the plan's sso; carol's starter starts in April."""
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=5)
    fake.add_feature("sso", [])
    limits = {"api_quota": {"max_api_calls": 10_000}, "sso": {}}
    fake.store.set_plan_entitlements("pro", {"entitlements": limits}, merge=False)
    for user in ("alice", "bob", "carol"):
        fake.add_customer(user)
    fake.add_subscription("alice", "starter", external_id="sub_alice")
    clock.advance(3 * 86_400)
    fake.add_subscription("bob", "pro", external_id="sub_bob")
    fake.store.patch_sub_entitlements("sub_bob", None, {"entitlements": ALICE})
    fake.store.remove_sub_entitlement("sub_bob", None, "sso")
    fake.add_subscription("carol", "starter", external_id="sub_carol", subscription_at="2026-04-01T00:00:00Z")
    clock.advance(3_600)
    return fake


def state(fake: FakeLago) -> dict[str, object]:
    """Customers with metadata, subscriptions with plan and status, the org subscription's entitlements."""
    customers = {c["external_id"]: sorted((m["key"], m["value"]) for m in c["metadata"]) for c in fake.customers}
    subscriptions = sorted(
        (s["external_customer_id"], s["external_id"], s["plan_code"], s["status"]) for s in fake.subscriptions
    )
    acme = [s for s in fake.subscriptions if s["external_id"] == "acme" and s["status"] == "active"]
    entitlements = fake.store.get_sub_entitlements("acme", "active")["entitlements"] if acme else None
    return {"customers": customers, "subscriptions": subscriptions, "entitlements": entitlements}


PHASE_1_WRITES = 4  # the org customer, its subscription, PATCH its entitlements, DELETE its sso
PHASE_2_WRITES = 6  # terminate alice's, cancel carol's, terminate bob's (the donor, last), mark the three


@pytest.fixture(scope="module")
def two_phases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The state an uninterrupted two-phase migration leaves."""
    fake = three_users(Clock())
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, retry_backoff=0.001)
    rows = _rows(tmp_path_factory.mktemp("reference"))
    code, out = _run(fake, settings, rows, "--execute", "--prepare")
    assert code == 0 and len(fake.write_requests) == PHASE_1_WRITES, out
    code, out = _run(fake, settings, rows, "--execute")
    assert code == 0 and len(fake.write_requests) == PHASE_1_WRITES + PHASE_2_WRITES, out
    return state(fake)


def _rows(directory: Path) -> Path:
    path = directory / "map.csv"
    path.write_text("user_id,org_id,org_name,email\nalice,acme,Acme,\nbob,acme,Acme,\ncarol,acme,Acme,\n")
    return path


def _run(
    fake: FakeLago, settings: BillingSettings, rows: Path, *argv: str, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[int, str]:
    return cli(fake, settings, "--mapping-file", str(rows), *argv, transport=transport)


def dry_run_writes_nothing(fake: FakeLago, settings: BillingSettings, rows: Path, *argv: str) -> str:
    before, writes = fake.snapshot(), len(fake.write_requests)
    code, out = _run(fake, settings, rows, *argv)
    assert code == 0, out
    assert len(fake.write_requests) == writes and fake.snapshot() == before, out
    return out


@pytest.mark.parametrize("nth", range(1, PHASE_1_WRITES + 1))
def test_a_first_phase_stopped_at_any_write_is_finished_by_the_second_with_its_journal(
    two_phases: dict[str, object], settings: BillingSettings, tmp_path: Path, nth: int
) -> None:
    """The first phase stops at its nth write; the operator goes on to the second phase with the same journal (dry
    run first: it writes nothing). The end state is that of two uninterrupted phases, and --verify passes."""
    fake = three_users(Clock())
    rows, journal = _rows(tmp_path), str(tmp_path / "journal.jsonl")
    stop = StopAt(fake.transport(), nth)
    code, out = _run(fake, settings, rows, "--execute", "--prepare", "--journal", journal, transport=stop)
    assert code == 1 and "Stopped" in out, out
    dry_run_writes_nothing(fake, settings, rows, "--journal", journal)
    dry_run_writes_nothing(fake, settings, rows, "--prepare", "--journal", journal)
    code, out = _run(fake, settings, rows, "--execute", "--journal", journal)
    assert code == 0, out
    assert state(fake) == two_phases, out
    code, out = _run(fake, settings, rows, "--verify")
    assert code == 0, out


@pytest.mark.parametrize("journal", [True, False])
@pytest.mark.parametrize("nth", range(1, PHASE_2_WRITES + 1))
def test_a_second_phase_stopped_at_any_write_resumes_to_the_same_state(
    two_phases: dict[str, object], settings: BillingSettings, tmp_path: Path, nth: int, journal: bool
) -> None:
    """The second phase stops at its nth write (with or without a journal), is resumed by the same command (its dry
    run first writes nothing): the state of two uninterrupted phases, and --verify passes."""
    fake = three_users(Clock())
    rows = _rows(tmp_path)
    extra = ("--journal", str(tmp_path / "journal.jsonl")) if journal else ()
    code, out = _run(fake, settings, rows, "--execute", "--prepare", *extra)
    assert code == 0, out
    code, out = _run(fake, settings, rows, "--execute", *extra, transport=StopAt(fake.transport(), nth))
    assert code == 1 and "Stopped" in out, out
    dry_run_writes_nothing(fake, settings, rows, *extra)
    code, out = _run(fake, settings, rows, "--execute", *extra)
    assert code == 0, out
    assert state(fake) == two_phases, out
    code, out = _run(fake, settings, rows, "--verify")
    assert code == 0, out


def test_a_donor_with_several_subscriptions_keeps_the_first_phase_s_one_when_resumed(
    clock: Clock, settings: BillingSettings, tmp_path: Path
) -> None:
    """alice holds two pro subscriptions: sub_alice (50,000 calls of its own) and, a day later, sub_alice_b (max_tokens
    7 of its own); bob is on starter. The first phase (highest: the older pro) gives the org sub_alice's. The second,
    without the journal and with --plan-policy newest, stops after its first write and is run again: the org keeps
    sub_alice's (nothing of sub_alice_b's added), every subscription of alice's and bob's is ended, --verify passes."""
    fake = make_fake(clock, (("alice", "pro"), ("bob", "starter")))
    fake.add_subscription("alice", "pro", external_id="sub_alice_b")
    fake.store.patch_sub_entitlements("sub_alice_b", None, {"entitlements": DAVE})
    clock.advance(3_600)
    rows = mapping(tmp_path, ("alice", "acme"), ("bob", "acme"))
    code, out = cli(fake, settings, "--mapping-file", rows, "--execute", "--prepare")
    assert code == 0 and org_overrides(fake) == ALICE, out
    newest = ("--mapping-file", rows, "--execute", "--plan-policy", "newest")
    code, out = cli(fake, settings, *newest, transport=StopAt(fake.transport(), 2))
    assert code == 1, out
    code, out = cli(fake, settings, *newest)
    assert code == 0, out
    assert org_overrides(fake) == ALICE, out
    for sub in ("sub_alice", "sub_alice_b", "sub_bob"):
        assert statuses(fake, sub) == ["terminated"], sub
    code, out = cli(fake, settings, "--mapping-file", rows, "--verify")
    assert code == 0, out
