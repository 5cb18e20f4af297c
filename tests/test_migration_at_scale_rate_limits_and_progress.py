"""The migration at scale: ``lago-org-billing migrate`` on thousands of user customers, through the CLI's code path
(``run_migrate_command``) against the emulator.

Covers what a long run against a real Lago needs: requests per org bounded (each user's state read once, no listing
of every customer, no re-reading per org), ``--concurrency N`` never more than N requests in flight, Lago Cloud's rate
limits waited out without failing the run or hammering Lago, progress output fit for a long run (no line per request
or per 429; an ETA that a resumed run does not skew; a line at least every minute in log mode), the rate-limit wait
reported as the time the run actually waited, the journal read without holding it whole in memory, and a resumed run
skipping the orgs its journal has done without reading them again.

The scale here is CI's (2,000 customers); the report of this review has the 20,000-customer measurement.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import logging
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from lago_org_billing import BillingSettings
from lago_org_billing._migration import CallCounter, Journal, OrgResult
from lago_org_billing._migration_cli import Progress, add_migrate_command, run_migrate_command
from lago_org_billing.testing import FakeLago

API_KEY = "scale-key"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["migrate", *argv])


def seeded(users: int, orgs: int) -> tuple[FakeLago, list[dict[str, str]]]:
    """``users`` user customers spread over ``orgs`` orgs; two users in three have an active subscription."""
    fake = FakeLago(api_key=API_KEY)
    for code, amount in (("free", 0), ("starter", 1_000), ("pro", 5_000)):
        fake.add_plan(code, amount_cents=amount)
    rows = []
    for u in range(users):
        user, org = f"user_{u:05d}", f"org_{u % orgs:04d}"
        fake.add_customer(user, name=user, email=f"{user}@example.test")
        if u % 3:
            fake.add_subscription(user, ("starter", "pro")[u % 2], external_id=f"sub_{user}")
        rows.append({"user_id": user, "org_id": org, "org_name": f"Org {u % orgs}", "email": ""})
    return fake, rows


def write_mapping(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["user_id", "org_id", "org_name", "email"])
        writer.writeheader()
        writer.writerows(rows)
    return path


class InFlight(httpx.AsyncBaseTransport):
    """Counts the requests in flight at once (the largest number seen)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.now = 0
        self.most = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await anyio.lowlevel.checkpoint()  # (a network answers later: the other workers send theirs meanwhile)
            return await self.inner.handle_async_request(request)
        finally:
            self.now -= 1


def run(fake: FakeLago, transport: httpx.AsyncBaseTransport, *argv: str) -> tuple[int, str, str, list[Any]]:
    fake.requests.clear()
    out, err = io.StringIO(), io.StringIO()
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    code = run_migrate_command(parse(*argv), transport=transport, settings=settings, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue(), list(fake.requests)


def per_user_reads(requests: list[Any], users: set[str]) -> collections.Counter[tuple[str, str]]:
    """(what, user) for every read naming one user: ``customer`` (GET /customers/{id}) or a list filtered on it."""
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in requests:
        if r.method != "GET":
            continue
        parts = r.path.split("/")
        if r.path.startswith("/api/v1/customers/") and len(parts) == 5 and parts[4] in users:
            seen[("customer", parts[4])] += 1
        elif (who := r.query.get("external_customer_id")) in users:
            seen[(parts[3], str(who))] += 1
    return seen


def test_dry_run_of_2000_customers_reads_each_once_at_the_concurrency_given(tmp_path: Path) -> None:
    """2,000 user customers in 300 orgs, ``--concurrency 4``: every user's customer, subscriptions and holdings are
    read exactly once each (no listing of every customer, nothing read again per org), the orgs' own reads are a
    handful each (at most 4), never more than 4 requests are in flight (and 4 are: the run is concurrent), and
    progress is a line per 5%, not one per org or request."""
    users, orgs = 2_000, 300
    fake, rows = seeded(users, orgs)
    mapping = write_mapping(tmp_path / "mapping.csv", rows)
    transport = InFlight(fake.transport())
    code, _, err, requests = run(
        fake, transport, "--mapping-file", str(mapping), "--default-plan", "free", "--concurrency", "4",
        "--progress", "lines",
    )  # fmt: skip
    assert code == 0, err
    assert transport.most == 4
    names = {row["user_id"] for row in rows}
    reads = per_user_reads(requests, names)
    kinds = ("customer", "subscriptions", "wallets", "applied_coupons", "invoices", "credit_notes")
    assert set(reads) == {(kind, user) for kind in kinds for user in names}
    assert set(reads.values()) == {1}
    # the one listing of customers is the API key probe's (per_page=1); no other unfiltered list
    listings = [r for r in requests if r.path == "/api/v1/customers"]
    assert [r.query.get("per_page") for r in listings] == ["1"]
    others = len(requests) - sum(reads.values()) - len(listings)
    assert others <= 4 * orgs + 10, collections.Counter(r.path.split("/")[3] for r in requests)
    progress = [line for line in err.splitlines() if line.startswith("migrate:")]
    assert 20 <= len(progress) <= 22, progress


def test_execute_with_journal_then_resume_reads_nothing_of_the_done_orgs(tmp_path: Path) -> None:
    """``--execute --journal`` at 600 customers in 90 orgs makes a bounded number of calls per org; the same command
    again (a resumed run) skips every org from the journal without one read of its state, and --verify passes."""
    users, orgs = 600, 90
    fake, rows = seeded(users, orgs)
    mapping = write_mapping(tmp_path / "mapping.csv", rows)
    journal = tmp_path / "journal.jsonl"
    common = ("--mapping-file", str(mapping), "--default-plan", "free", "--progress", "none")
    code, out, err, requests = run(fake, fake.transport(), *common, "--execute", "--journal", str(journal))
    assert code == 0, out + err
    # six reads per user (customer, subscriptions, 4 holdings), a mark, at most one end; a few per org
    assert len(requests) <= 8 * users + 8 * orgs
    code, out, err, requests = run(fake, fake.transport(), *common, "--execute", "--journal", str(journal))
    assert code == 0, out + err
    assert f"journal {journal}: {orgs} orgs done before, skipping them" in err
    org_ids = {row["org_id"] for row in rows} | {row["user_id"] for row in rows}
    assert [r for r in requests if any(part in org_ids for part in r.path.split("/"))] == []
    assert [r for r in requests if r.query.get("external_customer_id")] == []
    assert len(requests) <= 5
    code, out, err, _ = run(fake, fake.transport(), *common, "--verify")
    assert code == 0, out + err


def test_rate_limited_run_waits_once_per_window_says_so_once_and_reports_the_time_waited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago Cloud's rate limit (429 with X-RateLimit-Reset): the run waits the window out and succeeds, the workers
    in flight are the only ones throttled (no hammering), and a long run's output stays readable: every 429 printed
    a progress line and logged a WARNING (two stderr lines a request, thousands in an hour at Cloud's 50 req/s).
    The report's wait was the sum over requests (seconds of a window counted once per worker waiting it, and again
    per 429): more than the run's wall time; it is now the time the run was held."""
    fake, rows = seeded(60, 10)
    mapping = write_mapping(tmp_path / "mapping.csv", rows)
    report = tmp_path / "report.json"
    fake.faults.inject(rate_limit={"limit": 300, "reset": 1})
    transport = InFlight(fake.transport())
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing"):
        code, out, err, requests = run(
            fake, transport, "--mapping-file", str(mapping), "--default-plan", "free", "--concurrency", "4",
            "--progress", "lines", "--report", str(report),
        )  # fmt: skip
    assert code == 0, out + err
    throttled = [r for r in requests if r.status == 429]
    assert 1 <= len(throttled) <= 4  # (the requests in flight when the window closed; the others waited)
    said = [line for line in err.splitlines() if "rate limit" in line]
    assert len(said) == 1, said
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "rate limit" in r.getMessage().lower()]
    assert len(warned) <= 1, [r.getMessage() for r in warned]
    lago = json.loads(report.read_text())
    assert lago["lago"]["rate_limited"] == len(throttled)
    assert 0 < lago["lago"]["rate_limit_wait_s"] <= lago["duration_s"], lago["lago"]


@pytest.mark.anyio
async def test_the_reported_wait_is_the_time_held_not_a_sum_over_requests() -> None:
    """Eight workers throttled at once by one 0.2 s window: the run was held 0.2 s, reported as 3.2 s before (each
    429 added its reset, and each request that then waited added its wait)."""

    class Throttling(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.seen: set[str] = set()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await anyio.lowlevel.checkpoint()
            if request.url.path in self.seen:
                return httpx.Response(200, json={})
            self.seen.add(request.url.path)
            return httpx.Response(429, headers={"X-RateLimit-Reset": "0.2"}, json={})

    counter = CallCounter(Throttling())

    async def worker(n: int) -> None:
        for _ in range(2):  # (the client's retry of its 429)
            await counter.handle_async_request(httpx.Request("GET", f"http://lago.test/api/v1/customers/u{n}"))

    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for n in range(8):
            group.start_soon(worker, n)
    elapsed = time.monotonic() - started
    assert counter.stats.rate_limited == 8
    assert 0.2 <= counter.stats.rate_limit_wait_s <= elapsed


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now


def test_eta_of_a_resumed_run_counts_the_orgs_left_to_do_not_those_the_journal_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resumed run skips its journal's 90 done orgs in no time; the 10 left take 10 s each. Half-way through them
    the ETA said 3 s (50 s over 95 orgs done, times 5 left), not the 50 s left: the same on the bar."""
    import lago_org_billing._migration_cli as cli

    clock = Clock()
    monkeypatch.setattr(cli, "time", clock)
    stream = io.StringIO()
    progress = Progress(stream, "lines", "execute")
    for done in range(1, 91):
        progress.update(OrgResult(org_id=f"o{done}", status="journal"), done, 100)
    for done in range(91, 96):
        clock.now += 10
        progress.update(OrgResult(org_id=f"o{done}", status="migrated"), done, 100)
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("migrate: 95/100 orgs (95%)") and line.endswith("ETA 50 s"), line


def test_a_long_run_in_log_mode_prints_progress_at_least_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """In log mode (a CI job, Kubernetes) progress came every 5% only: 150 orgs of 3,000, minutes apart at Lago
    Cloud's rate (a run waiting out rate limits looked stuck). Now also once a minute, never more often than that
    between the 5% lines."""
    import lago_org_billing._migration_cli as cli

    clock = Clock()
    monkeypatch.setattr(cli, "time", clock)
    stream = io.StringIO()
    progress = Progress(stream, "lines", "execute")
    for done in range(1, 50):  # (5% of 1,000 is 50)
        clock.now += 7
        progress.update(OrgResult(org_id=f"o{done}", status="migrated"), done, 1_000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5, lines  # 343 s: at 63, 126, 189, 252 and 315 s
    assert lines[0].startswith("migrate: 9/1000 orgs (0%)"), lines


def test_the_journal_is_read_line_by_line_not_held_whole(tmp_path: Path) -> None:
    """A long migration's journal (tens of MB after a few resumed runs) was read whole (its bytes, then a list of
    its lines: twice its size in memory) before the run; it is read a line at a time."""
    path = tmp_path / "journal.jsonl"
    lines = []
    for n in range(20_000):
        step = {"type": "step", "at": "2026-03-10T12:00:00.000Z", "org_id": f"org_{n:05d}", "step": "mark_user"}
        lines.append(json.dumps({**step, "target": f"user_{n:06d}", "outcome": "done", "pad": "x" * 200}))
        lines.append(json.dumps({"type": "org", "org_id": f"org_{n:05d}", "status": "done", "fingerprint": "f"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        journal = Journal(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert journal.done_count == 20_000 and journal.is_done("org_00007", "f")
    assert peak < size / 2, (peak, size)
