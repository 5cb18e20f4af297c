"""``lago-org-billing migrate`` on 400 user customers in 100 orgs of the ``_migration_data`` set (every kind of org and
mix of plans in it, several times; ``benchmarks/migration.py`` runs it at 2,000 users in 500 orgs)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _migration_data as data
from lago_org_billing import BillingSettings
from lago_org_billing._migration import OrgResult
from lago_org_billing._migration_cli import Progress, add_migrate_command, run_migrate_command
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago, RequestRecord
from lago_org_billing.testing._server import serve_in_thread

CHILD = Path(__file__).with_name("_migration_child.py")
#: Orgs of the data set the tests migrate: its 10 kinds (``k % 10``) and 30 mixes of plans (``k % 30``), each at
#: least 3 times, at concurrency 8. Its full 500 orgs took 30 s of the suite for the same checks (the scale is the
#: benchmark's).
ORGS = 100
MIGRATED = ORGS // 10  # kind 0: already migrated


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["migrate", *argv])


@dataclasses.dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    before: str
    after: str
    requests: list[RequestRecord]
    report: Any

    @property
    def writes(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.method != "GET"]


def run_cli(
    fake: FakeLago, tmp: Path, name: str, *argv: str, api_url: str | None = None, api_key: str = data.API_KEY
) -> Outcome:
    """Run ``migrate`` in process against ``fake``, recording its requests, state before/after and report
    (``api_url``: the URL it is told, when it is served too; ``api_key``: the key it is given)."""
    fake.requests.clear()
    before = fake.snapshot()
    out, err = io.StringIO(), io.StringIO()
    report = tmp / f"{name}.json"
    environ = {"LAGO_API_URL": api_url or fake.base_url, "LAGO_API_KEY": api_key}
    settings = BillingSettings.from_env(None, environ=environ)
    args = parse(*argv, "--report", str(report))
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)
    loaded = json.loads(report.read_text()) if report.exists() else None
    return Outcome(code, out.getvalue(), err.getvalue(), before, fake.snapshot(), list(fake.requests), loaded)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[FakeLago, dict[str, Outcome]]:
    """The full data set taken through dry run, execute, verify and a second execute, in that order."""
    tmp = tmp_path_factory.mktemp("migration")
    fake = data.seed(data.new_fake(), orgs=ORGS)
    mapping = str(data.write_mapping(tmp / "mapping.csv", orgs=ORGS))
    common = ("--mapping-file", mapping, "--default-plan", "free", "--progress", "lines")
    outcomes = {
        "dry": run_cli(fake, tmp, "dry", *common),
        "execute": run_cli(fake, tmp, "execute", *common, "--execute"),
        "verify": run_cli(fake, tmp, "verify", *common, "--verify"),
        "again": run_cli(fake, tmp, "again", *common, "--execute"),
    }
    return fake, outcomes


def test_dry_run_leaves_state_byte_identical(scenario: tuple[FakeLago, dict[str, Outcome]]) -> None:
    """The dry run reads Lago and prints the plan; the emulator state is byte-identical and no write was sent."""
    _, outcomes = scenario
    dry = outcomes["dry"]
    assert dry.code == 0
    assert dry.after == dry.before and dry.writes == [] and dry.requests
    assert "Plan (dry run, nothing changed):" in dry.stdout
    assert "org o003 [4 users]: plan team_yearly (highest plan: u0014's subscription sub_u0014)" in dry.stdout
    assert "  - cancel u0015's pending subscription sub_u0015" in dry.stdout
    assert dry.report["totals"]["by_status"] == {"planned": ORGS - MIGRATED, "up-to-date": MIGRATED}


def test_execute_then_verify_passes(scenario: tuple[FakeLago, dict[str, Outcome]]) -> None:
    """Execute migrates the orgs left (exit 0), then verify finds every org subscribed and no user active."""
    _, outcomes = scenario
    execute, verify = outcomes["execute"], outcomes["verify"]
    assert execute.code == 0, execute.stdout
    assert execute.report["totals"]["by_status"] == {"migrated": ORGS - MIGRATED, "up-to-date": MIGRATED}
    assert execute.report["lago"]["calls"] == len(execute.requests)
    assert verify.code == 0, verify.stdout
    assert verify.report["totals"]["by_status"] == {"verified": ORGS}
    assert verify.writes == []
    assert f"Migration verify: {ORGS} orgs, {ORGS * data.USERS_PER_ORG} users: OK" in verify.stdout


def test_execute_result_matches_the_policy(scenario: tuple[FakeLago, dict[str, Outcome]]) -> None:
    """Each org has exactly one subscription record ever, on the expected plan; every user subscription ended
    and every user customer is marked with its org."""
    fake, _ = scenario
    by_customer: dict[str, list[dict[str, Any]]] = {}
    for subscription in fake.subscriptions:
        by_customer.setdefault(subscription["external_customer_id"], []).append(subscription)
    for k in range(ORGS):
        [subscription] = by_customer[data.org_id(k)]
        assert (subscription["status"], subscription["plan_code"]) == ("active", data.expected_plan(k)), k
        for j in range(data.USERS_PER_ORG):
            user = data.user_id(k, j)
            assert all(s["status"] in ("terminated", "canceled") for s in by_customer.get(user, []))
    customers = {c["external_id"]: c for c in fake.customers}
    for row in data.rows(ORGS):
        marks = {item["key"]: item["value"] for item in customers[row["user_id"]]["metadata"]}
        assert marks["migrated_to_org"] == row["org_id"]
    org = {item["key"]: item["value"] for item in customers["o003"]["metadata"]}
    assert org == {
        "billing_type": "organization",
        "migrated_from_user": "u0012,u0013,u0014,u0015",
        "created_by_user_id": "u0012",
    }
    assert by_customer["o005"][0]["billing_time"] == "anniversary"  # pro came from u0022, on anniversary billing
    assert by_customer["o007"][0]["billing_time"] == "calendar"  # pro from u0028 (calendar) and u0031


def test_second_execute_makes_zero_write_calls(scenario: tuple[FakeLago, dict[str, Outcome]]) -> None:
    """Re-running --execute without a journal only reads: every org is up to date, zero write calls."""
    _, outcomes = scenario
    again = outcomes["again"]
    assert again.code == 0
    assert again.writes == [] and again.after == again.before
    assert again.report["totals"]["by_status"] == {"up-to-date": ORGS}
    assert again.report["lago"]["writes"] == 0


def test_summary_table_and_report(scenario: tuple[FakeLago, dict[str, Outcome]]) -> None:
    """The execute run prints a summary table with call counts and wall time; the JSON report has every org."""
    _, outcomes = scenario
    execute = outcomes["execute"]
    for label in ("org status", "step:outcome", "create_subscription:done", "Lago calls", "calls per migrated org"):
        assert label in execute.stdout
    assert "wall time" in execute.stdout
    assert f"migrate: {ORGS}/{ORGS} orgs (100%)" in execute.stderr
    report = execute.report
    assert len(report["orgs"]) == ORGS and report["ok"] is True
    o003 = next(org for org in report["orgs"] if org["org_id"] == "o003")
    assert [step["step"] for step in o003["steps"]] == [
        "upsert_customer",
        "create_subscription",
        "terminate_subscription",
        "cancel_subscription",
        "terminate_subscription",  # the donor's last (sub_u0014, whose plan the org takes)
        *["mark_user"] * 4,
    ]
    assert o003["steps"][4]["target"] == "sub_u0014"
    assert all(step["outcome"] == "done" for step in o003["steps"])


BAD_CSV = """user_id,org_id,org_name,email,plan_code
u1,o1,One,a@x.test,
u1,o2,Two,,
,o3,Three,,
u4,acme.com,Dots,,
u5,o5,Five,,platinum
u6,o6,,,
u7,o7/x,Seven,,
"""


def test_malformed_mapping_exits_non_zero_listing_every_problem(tmp_path: Path) -> None:
    """Through the real CLI against a served emulator: exit 2, every problem listed, no write call."""
    fake = data.seed(data.new_fake(), orgs=3)
    fake.requests.clear()
    before = fake.snapshot()
    path = tmp_path / "bad.csv"
    path.write_text(BAD_CSV)
    report = tmp_path / "report.json"
    with serve_in_thread(fake) as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAGO_API_URL", url)
        patch.setenv("LAGO_API_KEY", data.API_KEY)
        stderr = io.StringIO()
        patch.setattr(sys, "stderr", stderr)
        code = main(["migrate", "--mapping-file", str(path), "--execute", "--report", str(report)])
    assert code == 2
    text = stderr.getvalue()
    assert "the mapping has 6 problem(s); nothing was changed" in text
    for expected in (
        "bad.csv line 3: duplicate user_id 'u1' (already in bad.csv line 2)",
        "bad.csv line 4: empty user_id",
        "bad.csv line 5: org_id 'acme.com' contains '.'",
        "bad.csv line 7: empty org_name",
        "bad.csv line 8: org_id 'o7/x' contains '/'",
        "bad.csv line 6: plan_code 'platinum' is not a plan in Lago",
    ):
        assert expected in text
    assert json.loads(report.read_text())["problems"][0].startswith("bad.csv line 3")
    assert [r for r in fake.requests if r.method != "GET"] == []
    assert fake.snapshot() == before


async def fetch_rows() -> list[dict[str, str]]:
    """A mapping callable, as a database query would be (async)."""
    return [dict(row) for row in data.rows(orgs=2)]


def test_mapping_callable_feeds_the_same_migration(tmp_path: Path) -> None:
    """--mapping-callable module:function (async here) gives the rows; execute then verify pass."""
    fake = data.seed(data.new_fake(), orgs=2)
    spec = f"{__name__}:fetch_rows"
    assert run_cli(fake, tmp_path, "exec", "--mapping-callable", spec, "--execute").code == 0
    verify = run_cli(fake, tmp_path, "verify", "--mapping-callable", spec, "--verify")
    assert verify.code == 0 and verify.report["totals"]["by_status"] == {"verified": 2}


def test_verify_fails_before_migration(tmp_path: Path) -> None:
    """--verify on an unmigrated data set exits 1 and names what is missing."""
    fake = data.seed(data.new_fake(), orgs=4)
    mapping = str(data.write_mapping(tmp_path / "m.json", orgs=4))
    verify = run_cli(fake, tmp_path, "verify", "--mapping-file", mapping, "--verify")
    assert verify.code == 1
    assert "o002: org 'o002' has no Lago customer" in verify.stdout
    assert "o001: user 'u0004' (org 'o001') still has active subscription(s) sub_u0004" in verify.stdout
    assert verify.report["totals"]["by_status"] == {"unverified": 3, "verified": 1}


def test_contract_flags_parse() -> None:
    """The contract's flags parse; --execute and --verify exclude each other; dry run is the default."""
    args = parse("--mapping-file", "m.csv", "--journal", "j", "--report", "r")
    assert (args.execute, args.verify, args.journal, args.report) == (False, False, "j", "r")
    assert parse("--mapping-file", "m.csv", "--execute").execute
    with pytest.raises(SystemExit):
        parse("--mapping-file", "m.csv", "--execute", "--verify")


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    """On a TTY the progress is one \\r-rewritten line with counts and ETA; otherwise plain lines every 5%."""
    tty, pipe = TTY(), io.StringIO()
    bar, lines = Progress(tty, "auto", "execute"), Progress(pipe, "auto", "execute")
    for done in range(1, 41):
        result = OrgResult(org_id=f"o{done}", status="migrated" if done % 10 else "failed")
        bar.update(result, done, 40)
        lines.update(result, done, 40)
    bar.close()
    assert tty.getvalue().startswith("\r[") and "\n" not in tty.getvalue()[:-1]
    assert "40/40 orgs (100%), 36 changed, 4 failed" in tty.getvalue() and "ETA" in tty.getvalue()
    assert pipe.getvalue().count("\n") == 20 and "\r" not in pipe.getvalue()
    assert pipe.getvalue().splitlines()[-1].startswith("migrate: 40/40 orgs (100%), 36 changed, 4 failed")


@pytest.fixture
def served() -> Iterator[tuple[FakeLago, str]]:
    """The data set served over HTTP for a child process."""
    fake = data.seed(data.new_fake(), orgs=ORGS)
    with serve_in_thread(fake) as url:
        yield fake, url


@pytest.mark.slow
def test_killed_run_resumes_from_the_journal_and_verifies(served: tuple[FakeLago, str], tmp_path: Path) -> None:
    """A child ``migrate --execute --journal`` SIGKILLed after half of the orgs (others half-way through their
    steps) leaves a partial state; the same command resumes, skips the journaled orgs, and the result verifies
    with nothing created twice."""
    fake, url = served
    mapping = str(data.write_mapping(tmp_path / "mapping.json", orgs=ORGS))
    journal = tmp_path / "journal.jsonl"
    env = {**os.environ, "LAGO_API_URL": url, "LAGO_API_KEY": data.API_KEY}
    command = ["--mapping-file", mapping, "--execute", "--journal", str(journal), "--default-plan", "free"]
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), "--freeze-after", str(ORGS // 2), "migrate", *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert child.stdout is not None
        with child.stdout:
            marker = child.stdout.readline()
            child.kill()
            child.wait()
    assert marker.startswith("FROZEN"), (tmp_path / "child.log").read_text()
    done = [json.loads(line) for line in journal.read_text().splitlines() if '"type":"org"' in line]
    assert ORGS // 2 <= len(done) < ORGS
    active_orgs = {s["external_customer_id"] for s in fake.subscriptions if s["status"] == "active"}
    assert sum(data.org_id(k) in active_orgs for k in range(ORGS)) < ORGS  # really half-way

    resumed = run_cli(fake, tmp_path, "resumed", *command, api_url=url)
    assert resumed.code == 0, resumed.stdout
    statuses = resumed.report["totals"]["by_status"]
    assert statuses["journal"] == len(done) and sum(statuses.values()) == ORGS
    assert f"{len(done)} orgs done before, skipping them" in resumed.stderr

    verify = run_cli(fake, tmp_path, "verify", "--mapping-file", mapping, "--verify")
    assert verify.code == 0, verify.stdout
    org_subscriptions = [s for s in fake.subscriptions if s["external_customer_id"].startswith("o")]
    assert len(org_subscriptions) == ORGS  # one each: nothing created twice across the kill


@pytest.mark.parametrize(
    "bad",
    [
        "journal-is-a-directory",
        "journal-not-utf8",
        "journal-under-a-file",
        "report-in-a-missing-directory",
        "report-not-writable",
    ],
)
def test_unusable_journal_or_report_paths_stop_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    """They raised a traceback (journal) or failed after every write was made (report): exit 2, nothing written."""
    fake = data.seed(data.new_fake(), orgs=10)  # (each run stops before its first request to Lago)
    mapping = str(data.write_mapping(tmp_path / "mapping.csv", orgs=10))
    journal, report = tmp_path / "journal.jsonl", tmp_path / "report.json"
    if bad == "journal-is-a-directory":
        journal.mkdir()
    elif bad == "journal-not-utf8":
        journal.write_bytes(b"\xff\xfe\x00garbage")
    elif bad == "journal-under-a-file":  # its directory cannot be made: found on the first write, after Lago's
        (tmp_path / "afile").write_text("")
        journal = tmp_path / "afile" / "journal.jsonl"
    elif bad == "report-not-writable":
        report = Path("/proc/report.json")  # an existing directory no file can be made in (root or not)
    else:
        report = tmp_path / "missing" / "report.json"
    args = parse("--mapping-file", mapping, "--execute", "--journal", str(journal), "--report", str(report))
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": fake.base_url, "LAGO_API_KEY": data.API_KEY})
    err = io.StringIO()
    fake.requests.clear()
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=io.StringIO(), stderr=err)
    assert code == 2 and "error:" in err.getvalue() and fake.requests == []
