"""The migration resumed: lost answers made again safely, kills between writes, two runs at once, journals of a
stopped run or of other options, against the emulator."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._migration import OrgMapping, run_migration
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"
ACME = OrgMapping(org_id="acme", org_name="Acme", email="billing@acme.test", users=("alice", "bob", "carol"))


def new_fake() -> FakeLago:
    clock = [datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)]
    fake = FakeLago(api_key=API_KEY, clock=lambda: clock[0])
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_customer("alice", name="Alice", email="alice@acme.test")
    fake.add_customer("bob", name="Bob")
    fake.add_subscription("alice", "starter", external_id="sub_alice")
    clock[0] += timedelta(days=3)
    fake.add_subscription("bob", "pro", external_id="sub_bob")
    # bob's pro (the donor: highest) has a custom max_api_calls and went without sso; carol's starts in April
    privileges = [{"code": "max_api_calls", "value_type": "integer"}, {"code": "max_tokens", "value_type": "integer"}]
    fake.add_feature("api_quota", privileges)
    fake.add_feature("sso", [])
    limits = {"api_quota": {"max_api_calls": 1_000, "max_tokens": 100_000}, "sso": {}}
    fake.store.set_plan_entitlements("pro", {"entitlements": limits}, merge=False)
    fake.store.patch_sub_entitlements("sub_bob", None, {"entitlements": {"api_quota": {"max_api_calls": 50_000}}})
    fake.store.remove_sub_entitlement("sub_bob", None, "sso")
    fake.add_customer("carol", name="Carol")
    fake.add_subscription("carol", "starter", external_id="sub_carol", subscription_at="2026-04-01T00:00:00Z")
    return fake


class LoseAnswer(httpx.AsyncBaseTransport):
    """Passes every request to ``inner``; the ``nth`` write (1-based) is processed by Lago but its answer is lost
    (a read timeout), as behind a proxy or a network cut."""

    def __init__(self, inner: httpx.AsyncBaseTransport, nth: int) -> None:
        self.inner, self.nth, self.writes = inner, nth, 0
        self.lost: str | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method != "GET" and request.url.path.startswith("/api/"):
            self.writes += 1
            if self.writes == self.nth:
                await response.aread()
                self.lost = f"{request.method} {request.url.path}"
                raise httpx.ReadTimeout("lost answer", request=request)
        return response


def state(fake: FakeLago) -> dict[str, object]:
    """What an operator compares: customers with metadata, subscriptions with plan and status (no ids/dates)."""
    customers = {
        c["external_id"]: (c.get("name"), c.get("email"), sorted((m["key"], m["value"]) for m in c["metadata"]))
        for c in fake.customers
    }
    subscriptions = sorted(
        (s["external_customer_id"], s["external_id"], s["plan_code"], s["status"]) for s in fake.subscriptions
    )
    entitlements = {
        s["external_id"]: fake.store.get_sub_entitlements(s["external_id"], s["status"])["entitlements"]
        for s in fake.subscriptions
        if s["external_customer_id"] == "acme" and s["status"] in ("active", "pending")
    }
    return {"customers": customers, "subscriptions": subscriptions, "entitlements": entitlements}


async def execute(fake: FakeLago, transport: httpx.AsyncBaseTransport | None = None) -> object:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=transport or fake.transport()) as client:
        return await run_migration(client, [ACME], mode="execute")


WRITES = 10  # of the uninterrupted migration of ACME: customer, subscription, PATCH, DELETE sso, 3 ends, 3 marks


@pytest.fixture(scope="module")
def expected() -> dict[str, object]:
    """The Lago state an uninterrupted ``--execute`` leaves."""
    import anyio

    reference = new_fake()
    run: Any = anyio.run(execute, reference)
    assert run.ok and len(reference.write_requests) == WRITES, reference.write_requests
    return state(reference)


@pytest.mark.parametrize("nth", range(1, WRITES + 1))
async def test_a_write_whose_answer_is_lost_is_made_again_safely(expected: dict[str, object], nth: int) -> None:
    """Each write of an org's migration, processed by Lago but its answer lost (a timeout): resent by the client (POST,
    PATCH) or by the migration (DELETE). The org ends migrated as without the loss. It failed on the customer upserts
    (Lago's 422 value_already_exist: the metadata items resent without the ids Lago had given them, "fix the fields"),
    and the DELETE of an entitlement was not made again: the org failed and the whole run stopped."""
    fake = new_fake()
    lossy = LoseAnswer(fake.transport(), nth)
    run: Any = await execute(fake, lossy)
    result = run.orgs[0]
    assert lossy.lost is not None
    assert result.status == "migrated" and run.aborted is None, (lossy.lost, result.errors)
    assert state(fake) == expected, lossy.lost


async def test_one_503_on_an_entitlement_delete_does_not_stop_the_run(expected: dict[str, object]) -> None:
    """A single 503 on ``DELETE /subscriptions/acme/entitlements/sso`` (a deploy, a proxy hiccup) failed the org and
    stopped the run of every other org ("Lago is unavailable"); the client retries every other call on a 503."""
    fake = new_fake()
    fake.inject_fault(status=503, count=1, path="/api/v1/subscriptions/acme/entitlements/sso")
    run: Any = await execute(fake)
    assert run.ok and run.aborted is None, (run.aborted, run.orgs[0].errors)
    assert state(fake) == expected


async def test_two_runs_at_once_without_a_journal_both_end_migrated(expected: dict[str, object]) -> None:
    """Two ``--execute`` at once without a journal (no lock between them: two operators, a retried job). Each step is
    idempotent, so both end with the org migrated and the state of one run; the second's customer upsert (planned
    before the first wrote the metadata) failed the org with Lago's 422 value_already_exist."""
    import anyio

    fake = new_fake()
    runs: list[Any] = []

    async def one() -> None:
        runs.append(await execute(fake))

    async with anyio.create_task_group() as group:
        group.start_soon(one)
        group.start_soon(one)
    assert [(run.ok, run.orgs[0].errors) for run in runs] == [(True, []), (True, [])]
    assert state(fake) == expected


# --- SIGKILL between any two writes, then the same command again -------------------------------------------------


def _freeze_at_write(nth: int, when: str) -> None:
    """(Child) Block the event loop at the ``nth`` write to Lago: ``before`` it is sent, or ``after`` Lago answered
    it (its answer read, not yet seen by the migration), printing ``FROZEN`` for the parent to kill it."""
    send = httpx.AsyncHTTPTransport.handle_async_request
    writes = [0]

    async def handle(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if request.method != "GET" and request.url.path.startswith("/api/"):
            writes[0] += 1
            if writes[0] == nth and when == "before":
                print(f"FROZEN before {request.method} {request.url.path}", flush=True)
                threading.Event().wait()
        response = await send(self, request)
        if writes[0] == nth and when == "after" and request.method != "GET":
            await response.aread()
            print(f"FROZEN after {request.method} {request.url.path}", flush=True)
            threading.Event().wait()
        return response

    httpx.AsyncHTTPTransport.handle_async_request = handle  # type: ignore[method-assign]


MAPPING = "user_id,org_id,org_name,email\nalice,acme,Acme,billing@acme.test\nbob,acme,Acme,\ncarol,acme,Acme,\n"


def _migrate(
    url: str, fake: FakeLago, tmp_path: Path, *argv: str, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[int, str]:
    from lago_org_billing._migration_cli import run_migrate_command
    from test_migration_cli import parse

    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": url, "LAGO_API_KEY": API_KEY})
    args = parse("--mapping-file", str(tmp_path / "mapping.csv"), *argv)
    out = io.StringIO()
    transport = transport or fake.transport()
    code = run_migrate_command(args, transport=transport, settings=settings, stdout=out, stderr=out)
    return code, out.getvalue()


def frozen_then_killed(nth: int, when: str, command: list[str], env: dict[str, str], log_path: Path) -> str:
    """This file run as the child (see the end of it): ``lago-org-billing <command>`` frozen just ``before`` its
    ``nth`` write or just ``after`` Lago answered it, then SIGKILLed; returns what it printed then (nothing: it finished
    before). Its stderr goes to ``log_path``."""
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, str(nth), when, *command], env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        try:
            assert child.stdout is not None
            return child.stdout.readline()
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("nth", range(1, WRITES + 1))
def test_a_run_killed_at_any_write_resumes_to_the_state_of_an_uninterrupted_run(
    expected: dict[str, object], tmp_path: Path, nth: int, when: str
) -> None:
    """``migrate --execute --journal J`` SIGKILLed just before, or just after, each of its writes (Lago made it, the
    answer not seen); the same command then ends with exit 0 and the state of a run never interrupted (one org
    subscription, every user's ended, the donor's overrides and removal, every user marked), and --verify passes."""
    from lago_org_billing.testing._server import serve_in_thread

    fake = new_fake()
    (tmp_path / "mapping.csv").write_text(MAPPING)
    journal = str(tmp_path / "journal.jsonl")
    command = ["migrate", "--mapping-file", str(tmp_path / "mapping.csv"), "--execute", "--journal", journal]
    with serve_in_thread(fake) as url:
        env = {**os.environ, "LAGO_API_URL": url, "LAGO_API_KEY": API_KEY, "PYTHONPATH": str(Path(__file__).parent)}
        marker = frozen_then_killed(nth, when, command, env, tmp_path / "child.log")
        assert marker.startswith("FROZEN"), (tmp_path / "child.log").read_text()
        code, output = _migrate(url, fake, tmp_path, "--execute", "--journal", journal)
        assert code == 0, (marker, output)
        assert state(fake) == expected, marker
        code, output = _migrate(url, fake, tmp_path, "--verify")
        assert code == 0, (marker, output)


class RefuseAt(httpx.AsyncBaseTransport):
    """Answers 401 to the request ``METHOD PATH`` (the run stops there, as killed: nothing after it is made)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, request_line: str) -> None:
        self.inner, self.request_line = inner, request_line

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if f"{request.method} {request.url.path}" == self.request_line:
            return httpx.Response(401, json={"status": 401, "error": "Unauthorized", "code": "unauthorized"})
        return await self.inner.handle_async_request(request)


def test_a_dry_run_given_the_journal_of_a_stopped_run_shows_what_execute_then_does(tmp_path: Path) -> None:
    """A run stopped after subscribing the org, before removing sso (the donor went without it) from it. The operator
    asks the dry run, with the same --journal, what is left: it said the org subscription "existed before this
    migration" and keeps sso (a warning, no step), while --execute --journal then removes it (the journal says the
    migration made it): the plan shown was not what --execute did."""
    fake = new_fake()
    (tmp_path / "mapping.csv").write_text(MAPPING)
    journal = str(tmp_path / "journal.jsonl")
    url = fake.base_url
    stopped = RefuseAt(fake.transport(), "DELETE /api/v1/subscriptions/acme/entitlements/sso")
    code, output = _migrate(url, fake, tmp_path, "--execute", "--journal", journal, transport=stopped)
    assert code == 1 and "Stopped" in output, output
    assert [s["status"] for s in fake.subscriptions if s["external_id"] == "acme"] == ["active"]

    code, dry = _migrate(url, fake, tmp_path, "--journal", journal)
    assert code == 0, dry
    fake.requests.clear()
    code, output = _migrate(url, fake, tmp_path, "--execute", "--journal", journal)
    assert code == 0, output
    assert any(r.method == "DELETE" and r.path.endswith("/entitlements/sso") for r in fake.requests)
    assert "remove from org subscription acme what bob's subscription sub_bob had removed" in dry, dry
    assert "existed before this migration" not in dry, dry


def test_a_journal_of_other_options_is_not_said_to_skip_orgs(tmp_path: Path) -> None:
    """The journal of a run with other options (another --plan-policy, mapping, Lago or subscription id template)
    skips nothing, rightly; but the run said "journal J: 1 orgs done before, skipping them", so an operator resuming
    with a changed command believed those orgs were left as they were."""
    fake = new_fake()
    (tmp_path / "mapping.csv").write_text(MAPPING)
    journal = str(tmp_path / "journal.jsonl")
    code, output = _migrate(fake.base_url, fake, tmp_path, "--execute", "--journal", journal)
    assert code == 0, output
    code, output = _migrate(fake.base_url, fake, tmp_path, "--execute", "--journal", journal, "--plan-policy", "lowest")
    assert code == 0, output
    assert "journal" not in output.split("Migration execute")[1].split("Lago calls")[0]  # no org skipped...
    assert "skipping them" not in output, output  # ...and none said to be
    assert "1 orgs done before with another mapping row, options or Lago: planned again" in output, output
    code, output = _migrate(fake.base_url, fake, tmp_path, "--execute", "--journal", journal, "--plan-policy", "lowest")
    assert "1 orgs done before, skipping them" in output and "planned again" not in output, output


if __name__ == "__main__":  # the child of the kill test: <nth> <before|after> migrate ...
    from lago_org_billing.cli import main

    _freeze_at_write(int(sys.argv[1]), sys.argv[2])
    sys.exit(main(sys.argv[3:]))
