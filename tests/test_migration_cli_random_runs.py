"""``lago-org-billing migrate`` run as an operator runs it, on seeded random mappings: the real entry point
(``cli.main(argv)`` in process, and once in a child process) against the emulator served on 127.0.0.1, seeded with
user-keyed customers. Each seed writes its mapping as CSV or JSON (a BOM, CRLF line ends, every field quoted, quoted
names with commas and quotes, unicode ids and names, blank emails, several users per org) and takes it through a dry
run, an ``--execute --journal`` stopped by Ctrl-C or SIGTERM after a random number of orgs, the same command again,
``--verify`` and a last ``--execute``; or spoils it (a duplicate row, an invalid id, a name running over lines...) and
checks the refusal.

What must hold: the exit codes the help and README document; every number of the stdout summary and of the
``--report`` JSON equals what the emulator shows (orgs, users, statuses, steps, Lago calls, writes); the dry run and
``--verify`` change nothing; stdout holds the plan and the summary, stderr the progress and the messages; a bad
mapping is exit 2 with every problem listed, no traceback, nothing written; and the ``--report`` file always describes
the run just made, never one before it.

``MIGCLI_SEEDS=N`` runs N more seeds of each kind (by hand, while hunting).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

import pytest
from starlette.types import Message, Receive, Scope, Send

import lago_org_billing
from lago_org_billing import _migration_cli
from lago_org_billing._migration import JournalLock, OrgResult
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

API_KEY = "random-runs-key"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
PLANS = {"free": 0, "starter": 1_000, "pro": 5_000}
COLUMNS = ["user_id", "org_id", "org_name", "email"]
ORG_IDS = ("o{k}", "org-é{k}", "組織{k}", "ORG:{k}", "acme_{k}")
USER_IDS = ("u{n}", "usér-{n}", "用户{n}", "user@x:{n}", "U_{n}")
NAMES = (
    "Acme",
    "Café, Ltd",
    'The "Best" Co',
    "Ünïcødé GmbH",
    "東京 株式会社",
    "Smile 😀 Inc",
    "a,b,c",
    "O'Brien & Sons",
)
EMAILS = ("", "   ", "{n}@example.test", "ü{n}@exämple.test")
EXTRA = int(os.environ.get("MIGCLI_SEEDS", "0"))
SEEDS = [*range(1, 4), *range(1000, 1000 + EXTRA)]
BAD_SEEDS = [*range(8), *range(2000, 2000 + EXTRA)]
SUMMARY = re.compile(r"^Migration (dry-run|execute|verify): (\d+) orgs, (\d+) users: (OK|FAILED|STOPPED)$", re.M)


# ------------------------------------------------------------------------------------------------------ the world


@dataclasses.dataclass
class World:
    """A seeded emulator, its mapping rows and the mapping file written from them."""

    fake: FakeLago
    rows: list[dict[str, str]]
    mapping: Path
    tmp: Path
    switch: Switch | None = None

    @property
    def orgs(self) -> dict[str, list[str]]:
        by_org: dict[str, list[str]] = {}
        for row in self.rows:
            by_org.setdefault(row["org_id"], []).append(row["user_id"])
        return by_org


def build(rng: random.Random, tmp: Path) -> World:
    """1-5 orgs of 1-3 users each; a user has an active subscription on a random plan, one starting next month, or
    none."""
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    for code, cents in PLANS.items():
        fake.add_plan(code, amount_cents=cents)
    later = (NOW + timedelta(days=31)).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows: list[dict[str, str]] = []
    n = 0
    for k in range(rng.randint(1, 5)):
        org = rng.choice(ORG_IDS).format(k=k)
        name = f"{rng.choice(NAMES)} {k}"
        for _ in range(rng.randint(1, 3)):
            n += 1
            user = rng.choice(USER_IDS).format(n=n)
            fake.add_customer(user, name=f"User {user}")
            kind = rng.random()
            if kind < 0.6:
                fake.add_subscription(user, rng.choice(list(PLANS)), external_id=f"sub_{user}")
            elif kind < 0.7:
                fake.add_subscription(user, "pro", external_id=f"sub_{user}", subscription_at=later)
            rows.append({"user_id": user, "org_id": org, "org_name": name, "email": rng.choice(EMAILS).format(n=n)})
    return World(fake, rows, write_mapping(rng, tmp / "mapping", rows), tmp)


def write_mapping(rng: random.Random, base: Path, rows: list[dict[str, Any]], *, raw_csv: str | None = None) -> Path:
    """The rows as JSON (maybe indented, maybe ASCII-escaped) or CSV (maybe every field quoted, CRLF, a trailing blank
    line), either maybe with a UTF-8 BOM (Excel's 'CSV UTF-8'). ``raw_csv``: that text as the CSV body instead."""
    bom = "\ufeff" if rng.random() < 0.4 else ""
    if raw_csv is None and rng.random() < 0.4:
        path = base.with_suffix(".json")
        text = json.dumps(rows, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
        path.write_bytes((bom + text).encode("utf-8"))
        return path
    path = base.with_suffix(".csv")
    eol = rng.choice(["\n", "\r\n"])
    if raw_csv is not None:
        text = raw_csv.replace("\n", eol)
    else:
        buffer = io.StringIO()
        quoting = rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
        writer = csv.DictWriter(
            buffer, fieldnames=list(rows[0]) if rows else COLUMNS, quoting=quoting, lineterminator=eol
        )
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue() + (eol if rng.random() < 0.3 else "")
    path.write_bytes((bom + text).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Run:
    """One command: exit code, stdout, stderr, the emulator's requests and state before and after, the report."""

    code: int
    out: str
    err: str
    requests: list[Request]
    before: str
    after: str
    report: Any

    @property
    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method != "GET"]


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str


class Switch:
    """The ASGI app served for the whole module: the emulator of the test running (a server started per test cost a
    quarter of a second each), and the Lago API requests it answers, each noted before its answer is sent (the
    emulator's own log is written after: a run's last request could be noted after the run had ended)."""

    def __init__(self) -> None:
        self.fake: FakeLago | None = None
        self.requests: list[Request] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.fake is not None
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.fake(scope, receive, send)
            return

        async def noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.requests.append(Request(scope["method"], scope["path"]))
            await send(message)

        await self.fake(scope, receive, noted)

    def serve(self, world: World) -> None:
        self.fake, world.switch = world.fake, self


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Switch, str]]:
    switch = Switch()
    with serve_in_thread(switch, lifespan="off") as url:
        yield switch, url


@pytest.fixture
def lago(served: tuple[Switch, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Switch]:
    """The served emulator, the environment pointing the CLI at it, run from an empty directory (no ./.env), Lago's
    retries quick; no test hook left behind, nor the requests of the test before (a test that runs ``main`` itself,
    not through :func:`cli`, saw them: it passed only after one that made none)."""
    switch, url = served
    switch.requests.clear()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAGO_API_URL", url)
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_RETRY_BACKOFF", "0.001")
    yield switch
    switch.fake = None
    _migration_cli.ORG_DONE_HOOK = None


def cli(
    world: World,
    *argv: str,
    hook: Callable[[OrgResult, int, int], None] | None = None,
    mapping: Path | None = None,
) -> Run:
    """``lago-org-billing migrate --mapping-file M --default-plan free --progress lines --report R ARGV`` through
    ``cli.main`` in process, its stdout and stderr apart; ``hook`` is called after each org."""
    report = world.tmp / "report.json"
    command = ["migrate", "--mapping-file", str(mapping or world.mapping), "--default-plan", "free"]
    command += ["--progress", "lines", "--report", str(report), *argv]
    assert world.switch is not None
    world.switch.requests.clear()
    before = world.fake.snapshot()
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    _migration_cli.ORG_DONE_HOOK = hook
    sys.stdout, sys.stderr = out, err
    try:
        code = main(command)
    finally:
        sys.stdout, sys.stderr = saved
        _migration_cli.ORG_DONE_HOOK = None
    loaded = json.loads(report.read_text(encoding="utf-8")) if report.exists() else None
    return Run(code, out.getvalue(), err.getvalue(), list(world.switch.requests), before, world.fake.snapshot(), loaded)


# -------------------------------------------------------------------------------------------------------- checks


def lago_state(fake: FakeLago) -> dict[str, Any]:
    """Customers (their metadata) and subscriptions (customer, plan, status) as Lago shows them."""
    customers = {c["external_id"]: {i["key"]: i["value"] for i in c.get("metadata") or []} for c in fake.customers}
    subscriptions = {
        s["external_id"]: (s["external_customer_id"], s["plan_code"], s["status"]) for s in fake.subscriptions
    }
    return {"customers": customers, "subscriptions": subscriptions}


def check_report_and_summary(run: Run, mode: str, world: World) -> None:
    """The report is the complete JSON of this run, its totals add up, its Lago calls are the requests the emulator
    received; the stdout summary says the same numbers; progress and messages are on stderr only."""
    report = run.report
    assert report is not None and report["mode"] == mode, (run.code, run.err, report)
    assert report["ok"] is (run.code == 0)
    orgs = report["orgs"]
    assert sorted(o["org_id"] for o in orgs) == sorted(world.orgs)
    assert {o["org_id"]: o["users"] for o in orgs} == world.orgs
    totals = report["totals"]
    assert (totals["orgs"], totals["users"]) == (len(world.orgs), len(world.rows))
    assert totals["by_status"] == dict(collections.Counter(o["status"] for o in orgs))
    steps = collections.Counter(f"{s['step']}:{s['outcome']}" for o in orgs for s in o["steps"])
    assert totals["steps"] == dict(steps)
    lago = report["lago"]
    assert lago["calls"] == len(run.requests) >= sum(o["calls"] for o in orgs)  # (and the run's own reads first)
    assert lago["writes"] == len(run.writes) == sum(o["writes"] for o in orgs)
    assert lago["reads"] == lago["calls"] - lago["writes"]
    assert lago["by_method"] == dict(collections.Counter(r.method for r in run.requests))
    assert totals["calls_per_org"] == round(lago["calls"] / len(orgs), 2)

    # The summary on stdout: the same numbers.
    [(said_mode, said_orgs, said_users, verdict)] = SUMMARY.findall(run.out)
    assert (said_mode, int(said_orgs), int(said_users)) == (mode, len(world.orgs), len(world.rows))
    assert verdict == ("OK" if run.code == 0 else "FAILED")
    table = dict(re.findall(r"^  (\S+) +(\S.*)$", run.out, re.M))
    for status, count in totals["by_status"].items():
        assert table[status] == str(count), (status, run.out)
    for step, count in steps.items():
        assert table[step] == str(count), (step, run.out)
    assert re.search(rf"^  Lago calls +{lago['calls']} \({lago['writes']} writes\)$", run.out, re.M), run.out
    assert f"report written to {world.tmp / 'report.json'}" in run.out

    # Streams: the plan and summary on stdout, the progress and the header on stderr; no traceback anywhere.
    assert f"migrate ({mode}): {len(world.orgs)} orgs, {len(world.rows)} users" in run.err
    assert not re.search(r"^migrate: \d+/\d+ orgs", run.out, re.M) and "Lago at" not in run.out
    assert re.search(rf"^migrate: {len(world.orgs)}/{len(world.orgs)} orgs \(100%\)", run.err, re.M)
    assert "Migration " not in run.err and "Plan (dry run" not in run.err
    assert "Traceback" not in run.out + run.err
    assert ("Plan (dry run, nothing changed):" in run.out) is (mode == "dry-run")


def check_migrated(world: World) -> None:
    """Every org has its customer (billing_type organization, its users named) and one subscription running; no
    mapped user keeps one, and each is marked with its org."""
    state = lago_state(world.fake)
    for org_id, users in world.orgs.items():
        meta = state["customers"][org_id]
        assert meta["billing_type"] == "organization" and meta["migrated_from_user"] == ",".join(users), org_id
        running = [s for s in state["subscriptions"].values() if s[0] == org_id and s[2] in ("active", "pending")]
        assert len(running) == 1, (org_id, running)
        for user in users:
            assert state["customers"][user].get("migrated_to_org") == org_id, user
            assert not [s for s in state["subscriptions"].values() if s[0] == user and s[2] in ("active", "pending")]


def check_writes_are_what_lago_shows(run: Run, world: World, before: dict[str, Any]) -> None:
    """The report's done steps are the changes Lago shows between the run's start and its end."""
    after = lago_state(world.fake)
    done = collections.Counter(s["step"] for o in run.report["orgs"] for s in o["steps"] if s["outcome"] == "done")
    made = [sid for sid, s in after["subscriptions"].items() if sid not in before["subscriptions"]]
    ended = [
        sid
        for sid, (_, _, status) in before["subscriptions"].items()
        if status in ("active", "pending") and after["subscriptions"][sid][2] in ("terminated", "canceled")
    ]
    marked = [
        c
        for c, meta in after["customers"].items()
        if meta.get("migrated_to_org")
        and before["customers"].get(c, {}).get("migrated_to_org") != meta["migrated_to_org"]
    ]
    new_orgs = [org for org in world.orgs if org not in before["customers"]]
    assert done["create_subscription"] == len(made), (done, made)
    assert done["terminate_subscription"] + done["cancel_subscription"] == len(ended), (done, ended)
    assert done["mark_user"] == len(marked), (done, marked)
    assert done["upsert_customer"] >= len(new_orgs), (done, new_orgs)


def journaled(journal: Path) -> int:
    """The orgs the journal records done."""
    if not journal.exists():
        return 0
    entries = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines() if line.strip()]
    return len({e["org_id"] for e in entries if e.get("type") == "org" and e.get("status") == "done"})


# --------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_mapping_goes_through_dry_run_a_stopped_execute_its_resume_and_verify(
    seed: int, lago: Switch, tmp_path: Path
) -> None:
    """Dry run, ``--execute --journal`` stopped by Ctrl-C or SIGTERM after a random number of orgs, the same command
    again, ``--verify``, ``--execute`` once more: each exits as documented, its report and summary say what the
    emulator shows, the dry run and ``--verify`` change nothing, a run again writes nothing."""
    rng = random.Random(seed)
    world = build(rng, tmp_path)
    orgs = len(world.orgs)
    lago.serve(world)
    dry = cli(world)
    assert dry.code == 0, dry.out + dry.err
    check_report_and_summary(dry, "dry-run", world)
    assert dry.after == dry.before and dry.writes == [] and dry.requests
    assert dry.report["totals"]["by_status"] == {"planned": orgs}

    journal = tmp_path / "journal.jsonl"
    stop, sig = rng.randint(1, orgs), rng.choice([signal.SIGINT, signal.SIGTERM])

    def interrupt(result: OrgResult, done: int, total: int) -> None:
        if done == stop:
            signal.raise_signal(sig)  # (as Ctrl-C or `kill` deliver it: the run's own handlers act on it)

    stopped = cli(world, "--execute", "--journal", str(journal), hook=interrupt)
    assert "Traceback" not in stopped.out + stopped.err
    if stopped.code == 0:  # (the orgs in flight all finished before the signal was acted on: a whole run)
        check_report_and_summary(stopped, "execute", world)
    else:
        assert stopped.code == 128 + sig, (stopped.code, stopped.err)
        how = "interrupted" if sig == signal.SIGINT else "stopped (SIGTERM)"
        assert f"migrate {how}: every step is safe to make again; run the same command to finish" in stopped.err
        # The report describes this run (stopped), not the dry run before it.
        assert stopped.report == {"ok": False, "problems": [stopped.err.splitlines()[-1]]}, stopped.report
    done_before = journaled(journal)

    before = lago_state(world.fake)
    resumed = cli(world, "--execute", "--journal", str(journal))
    assert resumed.code == 0, resumed.out + resumed.err
    check_report_and_summary(resumed, "execute", world)
    check_writes_are_what_lago_shows(resumed, world, before)
    assert resumed.report["totals"]["by_status"].get("journal", 0) == done_before
    if done_before:
        assert f"{done_before} orgs done before, skipping them" in resumed.err
    check_migrated(world)

    verify = cli(world, "--verify")
    assert verify.code == 0, verify.out
    check_report_and_summary(verify, "verify", world)
    assert verify.report["totals"]["by_status"] == {"verified": orgs}
    assert verify.writes == [] and verify.after == verify.before

    again = cli(world, "--execute")
    assert again.code == 0, again.out
    check_report_and_summary(again, "execute", world)
    assert again.report["totals"]["by_status"] == {"up-to-date": orgs}
    assert again.writes == [] and again.after == again.before


#: How a mapping is spoiled: (name, the problem it must name). Each spoils one row (or the file) of a valid mapping.
SPOILERS = (
    ("duplicate row", "duplicate user_id"),
    ("dotted org id", "contains '.'"),
    ("empty user id", "empty user_id"),
    ("name over two lines", ""),  # (CSV: a quoted field running on; JSON: a control character in the name)
    ("bad email", "is not an email address"),
    ("org named twice", "is named"),
    ("unknown plan", "is not a plan in Lago"),
    ("extra field", "more fields than the header has columns"),
    ("header without email", "missing column(s) email"),
    ("number id", "user_id must be a string"),
    ("not a list", "JSON mapping must be a list of objects"),
    ("empty file", "is empty"),
)
CSV_ONLY = {"extra field", "header without email"}
JSON_ONLY = {"number id", "not a list"}


def spoil(rng: random.Random, world: World, how: str) -> Path:
    """A mapping file of ``world`` spoiled ``how``."""
    rows: list[dict[str, Any]] = [dict(row) for row in world.rows]
    victim = rng.randrange(len(rows))
    base = world.tmp / "spoiled"
    raw_csv: str | None = None
    if how == "duplicate row":
        rows.insert(victim, dict(rows[victim]))
    elif how == "dotted org id":
        rows[victim]["org_id"] = "acme.com"
    elif how == "empty user id":
        rows[victim]["user_id"] = ""
    elif how == "name over two lines":
        rows[victim]["org_name"] = "Two\nLines"
    elif how == "bad email":
        rows[victim]["email"] = "not-an-email"
    elif how == "org named twice":
        rows.append({**rows[victim], "user_id": "newcomer", "org_name": "Another Name"})
    elif how == "unknown plan":
        rows = [{**row, "plan_code": "platinum" if i == victim else ""} for i, row in enumerate(rows)]
    elif how == "extra field":
        lines = [",".join(COLUMNS)] + [",".join(f'"{row[c]}"' for c in COLUMNS) for row in rows]
        lines[victim + 1] += ",surplus"
        raw_csv = "\n".join(lines) + "\n"
    elif how == "header without email":
        lines = [",".join(COLUMNS[:3])] + [",".join(f'"{row[c]}"' for c in COLUMNS[:3]) for row in rows]
        raw_csv = "\n".join(lines) + "\n"
    elif how == "number id":
        rows[victim]["user_id"] = 12345
    if how == "not a list":
        path = base.with_suffix(".json")
        path.write_text(json.dumps({"rows": rows}), encoding="utf-8")
        return path
    if how == "empty file":
        path = base.with_suffix(rng.choice([".csv", ".json"]))
        path.write_bytes(rng.choice([b"", b"\xef\xbb\xbf", b"\r\n \n"]))
        return path
    if how in JSON_ONLY:
        path = base.with_suffix(".json")
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        return path
    if how in CSV_ONLY:
        return write_mapping(rng, base, rows, raw_csv=raw_csv)
    while True:
        path = write_mapping(rng, base, rows)
        if how != "name over two lines" or path.suffix == ".csv" or rng.random() < 0.5:
            return path


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_a_spoiled_random_mapping_is_refused_listing_its_problems_with_nothing_written(
    seed: int, lago: Switch, tmp_path: Path
) -> None:
    """A mapping with a bad row (or no rows, or not a list) given to the dry run, ``--execute`` or ``--verify``: exit
    2, every problem listed on stderr and in the report, nothing on stdout, no traceback, no write to Lago."""
    rng = random.Random(seed)
    world = build(rng, tmp_path)
    how, expected = SPOILERS[seed % len(SPOILERS)] if seed < len(SPOILERS) else rng.choice(SPOILERS)
    mapping = spoil(rng, world, how)
    mode = rng.choice([(), ("--execute",), ("--verify",), ("--execute", "--journal", str(tmp_path / "j.jsonl"))])
    lago.serve(world)
    run = cli(world, *mode, mapping=mapping)
    assert run.code == 2, (how, run.code, run.out, run.err)
    assert run.writes == [] and run.after == run.before
    assert run.out == "" and "Traceback" not in run.err
    said = re.search(r"^error: the mapping has (\d+) problem\(s\); nothing was changed:$", run.err, re.M)
    assert said, run.err
    listed = re.findall(r"^  - (.*)$", run.err, re.M)
    assert int(said.group(1)) == len(listed) >= 1
    assert expected in run.err, (how, run.err)
    assert run.report == {"ok": False, "problems": listed}


def test_the_command_run_in_a_child_process_keeps_machine_output_and_messages_apart(
    lago: Switch, tmp_path: Path
) -> None:
    """``python -m lago_org_billing.cli migrate ... --execute`` in a process of its own, its stdout and stderr pipes
    (not terminals): exit 0; stdout holds the summary only, stderr the header and the progress lines (``--progress
    auto`` on a pipe); the report says what the emulator shows; --verify after it agrees."""
    world = build(random.Random(7), tmp_path)
    lago.serve(world)
    orgs, users = len(world.orgs), len(world.rows)
    here = os.pathsep.join((str(Path(lago_org_billing.__file__).parents[1]), str(Path(__file__).parent)))
    report = tmp_path / "report.json"
    argv = ["migrate", "--mapping-file", str(world.mapping), "--default-plan", "free", "--report", str(report)]
    lago.requests.clear()
    child = subprocess.run(
        [sys.executable, "-m", "lago_org_billing.cli", *argv, "--execute"],
        env={**os.environ, "PYTHONPATH": here},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    run = Run(0, child.stdout, child.stderr, list(lago.requests), "", "", json.loads(report.read_text("utf-8")))
    check_report_and_summary(run, "execute", world)
    assert child.stdout.startswith("\nMigration execute:") and child.stderr.startswith("migrate (execute):")
    check_migrated(world)
    verify = cli(world, "--verify")
    assert verify.code == 0 and verify.report["totals"]["by_status"] == {"verified": orgs}, verify.out
    assert f"Migration verify: {orgs} orgs, {users} users: OK" in verify.out


def small_world(tmp_path: Path) -> World:
    """Three orgs (seed 5 of :func:`build`: nine users, a pending subscription, unicode ids and names)."""
    world = build(random.Random(5), tmp_path)
    assert len(world.orgs) >= 2
    return world


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "key-refused", "journal-held"])
def test_a_run_that_does_not_finish_leaves_no_report_of_the_run_before_it(
    lago: Switch, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stop: str
) -> None:
    """A dry run wrote ``--report R`` ("ok": true, every org planned); the ``--execute --report R`` after it did not
    finish: killed mid-run (R as it is while the run goes on: read at the first org's end), Ctrl-C, SIGTERM, or Lago
    refusing the API key. R was left as the dry run wrote it, "ok": true, read by a script (or an operator) as this
    run's. R now says this run did not finish, and why when the run could say it. (The journal held by another run:
    R is left as it is, the report of that run of the same command, perhaps.)"""
    world = small_world(tmp_path)
    lago.serve(world)
    assert cli(world).report["ok"] is True
    journal = tmp_path / "journal.jsonl"
    seen: list[Any] = []

    def hook(result: OrgResult, done: int, total: int) -> None:
        if done == 1:
            seen.append(json.loads((tmp_path / "report.json").read_text(encoding="utf-8")))
            if stop in ("ctrl-c", "sigterm"):
                signal.raise_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)

    held = None
    if stop == "key-refused":
        monkeypatch.setenv("LAGO_API_KEY", "rotated")
    elif stop == "journal-held":
        held = JournalLock(journal)
        held.acquire()
    try:
        run = cli(world, "--execute", "--journal", str(journal), hook=hook)
    finally:
        if held is not None:
            held.release()
    expected = {"ctrl-c": 130, "sigterm": 143, "key-refused": 2, "journal-held": 2}[stop]
    assert run.code == expected, (run.code, run.err)
    if stop in ("ctrl-c", "sigterm"):  # (what a kill -9 then leaves: the report of the run in progress, unfinished)
        [report] = seen
        assert report["ok"] is False and "did not finish" in report["problems"][0], report
    if stop == "journal-held":
        assert run.report["mode"] == "dry-run" and "another migration holds the journal" in run.err
        return
    assert run.report["ok"] is False and set(run.report) == {"ok", "problems"}, run.report
    [problem] = run.report["problems"]
    said = {
        "ctrl-c": "interrupted",
        "sigterm": "stopped (SIGTERM)",
        "key-refused": "401 Unauthorized",
    }[stop]
    assert said in problem and problem in run.err, (problem, run.err)


@pytest.mark.parametrize("same_as", ["mapping", "journal"])
def test_a_report_path_that_is_the_mapping_file_or_the_journal_is_refused(
    lago: Switch, tmp_path: Path, same_as: str
) -> None:
    """``--report`` given the mapping file's path (or the journal's: a typo, a copied command line): the mapping was
    overwritten by the report once the run ended (the operator's only copy of it, perhaps), the journal by a JSON
    document a resumed run no longer reads as a journal. Refused up front: exit 2, the file untouched, no Lago call."""
    world = small_world(tmp_path)
    lago.serve(world)
    journal = tmp_path / "journal.jsonl"
    journal.write_text("", encoding="utf-8")
    target = world.mapping if same_as == "mapping" else journal
    before = target.read_bytes()
    command = ["migrate", "--mapping-file", str(world.mapping), "--execute", "--journal", str(journal)]
    err = io.StringIO()
    saved = sys.stderr
    sys.stderr = err
    try:
        code = main([*command, "--report", str(tmp_path / "." / target.name)])
    finally:
        sys.stderr = saved
    assert code == 2, err.getvalue()
    assert "error: --report" in err.getvalue() and f"is the {same_as}" in err.getvalue(), err.getvalue()
    assert target.read_bytes() == before and lago.requests == []


def many_orgs(tmp_path: Path, orgs: int) -> World:
    """``orgs`` orgs of one user each on pro, ids and names in CJK (as :func:`build` makes them)."""
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    fake.add_plan("pro", amount_cents=5_000)
    rows = []
    for k in range(orgs):
        fake.add_customer(f"用户{k}")
        fake.add_subscription(f"用户{k}", "pro", external_id=f"sub_{k}")
        rows.append({"user_id": f"用户{k}", "org_id": f"組織{k}", "org_name": f"東京 {k}", "email": ""})
    return World(fake, rows, write_mapping(random.Random(orgs), tmp_path / "mapping", rows), tmp_path)


def main_with_stdout(stdout: TextIO, *argv: str) -> int:
    saved = sys.stdout
    sys.stdout = stdout
    try:
        return main(["migrate", *argv])
    finally:
        sys.stdout = saved


def test_ids_stdout_cannot_encode_are_printed_escaped_not_a_traceback(lago: Switch, tmp_path: Path) -> None:
    """stdout in an encoding without the mapping's characters (Windows writes a redirected stdout in its ANSI code
    page, cp1252; a Latin-1 locale): the dry run's plan naming org 組織0 raised UnicodeEncodeError, a traceback and no
    report (an ``--execute`` too, after its writes, when a warning or a problem names one). They are printed escaped,
    as Python's stderr prints them; the report is written."""
    world = many_orgs(tmp_path, 2)
    lago.serve(world)
    report = tmp_path / "report.json"
    for mode in ((), ("--execute",)):
        raw = io.BytesIO()
        stdout = io.TextIOWrapper(raw, encoding="cp1252", newline="")
        code = main_with_stdout(stdout, "--mapping-file", str(world.mapping), "--report", str(report), *mode)
        stdout.flush()
        assert code == 0, raw.getvalue()
        assert json.loads(report.read_text(encoding="utf-8"))["mode"] == ("execute" if mode else "dry-run")
    check_migrated(world)
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="cp1252", newline="")
    assert main_with_stdout(stdout, "--mapping-file", str(world.mapping), "--verify") == 0
    stdout.flush()


def test_a_reader_gone_from_stdout_still_gets_the_report_written(lago: Switch, tmp_path: Path) -> None:
    """``migrate ... --report R | head`` (or ``| less`` quit early): stdout fails (EPIPE) while the plan is printed
    (here at its first line; on a pipe, once the plan outgrows stdout's buffer), and the report, written after the
    plan and the summary, was never written (exit 1: the reader went away). It is written first: R is the whole
    report of the run."""
    world = many_orgs(tmp_path, 3)
    lago.serve(world)
    report = tmp_path / "report.json"
    read, write = os.pipe()
    os.close(read)  # (the reader went away)
    with open(write, "w", encoding="utf-8", buffering=1) as stdout:
        argv = ("--mapping-file", str(world.mapping), "--report", str(report), "--progress", "none")
        code = main_with_stdout(stdout, *argv)
        assert code == 1
        written = json.loads(report.read_text(encoding="utf-8"))
        assert written["mode"] == "dry-run" and written["totals"]["by_status"] == {"planned": 3}, written
