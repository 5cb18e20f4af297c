"""Fork safety under seeded random sequences: where in the life of a LagoClient, its raw HTTP/1 poster, an
EventPipeline (memory or SQLite spool) and OrgBilling a process forks, and what parent and child (and a grandchild)
do next, all against one served emulator.

Each seed draws the outbox (memory or spool), the point of the fork (before first use; after first use, with
kept-alive connections idle in both pools; with a batch in flight, held by the emulator; with events queued and the
pipeline not running; in the middle of a spool write transaction, from the event loop's thread while the writer
thread is between BEGIN and COMMIT; after everything was closed), then what each process does after it: record
events directly (httpx pool) or through a pipeline (raw poster), post a batch through the inherited client, run the
inherited pipeline, close what it inherited, fork a grandchild. Every process writes what it recorded (its own
transaction ids) and every error it met to a report file. Checked here:

* every transaction id recorded reached the emulator exactly once (POSTs counted per transaction id, not Lago's
  dedupe), and none reached it that no process recorded as its own: nothing lost, nothing delivered twice, the
  parent's queued or spooled events never delivered by the child;
* no request was garbled (an interleaving of two processes on one socket) and every request was answered 200; no
  process met an error (a reset connection, an answer taken for another request's, a 'database is locked');
* every spool file left is whole (``PRAGMA integrity_check``) and holds no undelivered row;
* every child and grandchild exited 0 within a generous deadline (polled with ``os.waitpid``, killed past it).

The scenarios run in one fresh interpreter (``python -c``): ``os.fork`` in the test process would fork pytest.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lago_org_billing.testing import FakeLago, serve_in_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is needed (Linux, macOS)")

DEADLINE = 120.0  # the whole run's guard against a hang, not a measure
SEEDS = list(range(12))
KEY = "fork-test-key"

#: ``python -c SCENARIOS URL WORKDIR SEED...``: one scenario per seed, each in this process (the parent), which forks.
SCENARIOS = textwrap.dedent(
    """
    import asyncio, json, os, random, signal, sys, threading, time, traceback, urllib.request

    import anyio

    from lago_org_billing import BillingSettings, LagoClient, OrgBilling
    from lago_org_billing._delivery import EventPipeline

    URL, WORK, SEEDS = sys.argv[1], sys.argv[2], [int(seed) for seed in sys.argv[3:]]
    KEY = "fork-test-key"
    WAIT = 30.0  # a child's deadline (a guard against a hang: it is killed past it, and said)
    FORK_POINTS = ["fresh", "used", "in_flight", "queued", "writing", "closed"]
    ACTIONS = ["direct", "raw_batch", "own_pipeline", "inherited_pipeline", "grandchild", "close"]


    def control(method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(URL + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read() or b"null")


    class Proc:
        \"\"\"What one process of a scenario recorded as its own, and the errors it met.\"\"\"

        def __init__(self, seed, who):
            self.seed, self.who, self.owned, self.errors, self.notes, self.count = seed, who, [], [], [], 0

        def tx(self):
            self.count += 1
            name = f"s{self.seed}-{self.who}-{self.count}"
            self.owned.append(name)
            return name

        def error(self, what, exc):
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")

        def write(self):
            with open(os.path.join(WORK, f"report-{self.seed}-{self.who}-{os.getpid()}.json"), "w") as out:
                json.dump({"who": self.who, "owned": self.owned, "errors": self.errors, "notes": self.notes}, out)


    async def wait_for(pid, proc, what):
        # the child's exit polled within WAIT (the event loop runs on meanwhile: the parent's batches go on)
        deadline = time.monotonic() + WAIT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    proc.errors.append(f"{what} exited {code}")
                return
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                proc.errors.append(f"{what} hung (killed after {WAIT} s)")
                return
            await anyio.sleep(0.005)


    def event(proc, org):
        return {"transaction_id": proc.tx(), "external_subscription_id": org, "code": "api_call",
                "timestamp": str(time.time()), "properties": {"by": proc.who}}


    async def act(action, proc, kit, depth):
        settings, client, pipeline, billing, org, spool, can_run = kit
        if action == "direct":
            await billing.record_usage(org, "api_call", transaction_id=proc.tx())
        elif action == "raw_batch":
            body = json.dumps({"events": [event(proc, org), event(proc, org)]}).encode()
            await client.send_event_batch_json(body)
        elif action == "own_pipeline":
            own = EventPipeline(client, spool_path=spool, flush_interval=0.002, commit_window=0.002)
            async with own:
                for _ in range(3):
                    own.submit(event(proc, org))
                if not await own.flush(WAIT):
                    proc.errors.append("own pipeline: not flushed")
            for key in ("retries", "dropped", "lost_at_shutdown", "dead_lettered"):
                if own.stats[key]:
                    proc.errors.append(f"own pipeline: {key} {own.stats[key]}")
        elif action == "inherited_pipeline" and can_run:
            async with pipeline:
                for _ in range(2):
                    billing.record_usage_nowait(org, "api_call", transaction_id=proc.tx())
                if not await pipeline.flush(WAIT):
                    proc.errors.append("inherited pipeline: not flushed")
            for key in ("retries", "dropped", "lost_at_shutdown", "dead_lettered"):
                if pipeline.stats[key]:
                    proc.errors.append(f"inherited pipeline: {key} {pipeline.stats[key]}")
        elif action == "grandchild" and depth == 1:
            pid = os.fork()
            if pid == 0:
                run_child(proc.seed, "grandchild", ["direct", "raw_batch", "own_pipeline"], kit, 2)
            await wait_for(pid, proc, "grandchild")
        elif action == "close":
            await billing.aclose()
            await client.aclose()


    def fresh(settings, spool):
        \"\"\"New objects (after the inherited ones were closed).\"\"\"
        client = LagoClient(settings)
        pipeline = EventPipeline(client, spool_path=spool, flush_interval=0.002, commit_window=0.002)
        return client, pipeline, OrgBilling(client=client, pipeline=pipeline)


    def run_child(seed, who, plan, kit, depth):
        # in a forked process: its plan on an event loop of its own, its report, then os._exit (never returns)
        proc = Proc(seed, who)
        code = 0
        try:
            async def main():
                nonlocal kit
                if kit[1].is_closed:  # closed before the fork (or by the child, before a grandchild): new ones
                    client, pipeline, billing = fresh(kit[0], kit[5])
                    kit = (kit[0], client, pipeline, billing, kit[4], kit[5], True)
                for action in plan:
                    try:
                        with anyio.fail_after(WAIT):  # a guard against a hang, not a measure
                            await act(action, proc, kit, depth)
                    except Exception as exc:
                        proc.error(action, exc)
            asyncio.run(main())
        except BaseException as exc:
            proc.error("child", exc)
        finally:
            try:
                proc.write()
            except BaseException:
                code = 3
            os._exit(code)


    async def scenario(seed):
        rng = random.Random(seed)
        # every (outbox, fork point) pair within 12 seeds (a spool write with a memory outbox: none, a spool's again);
        # what the processes do next drawn
        store = "spool" if seed % 2 else "memory"
        fork_at = FORK_POINTS[seed // 2 % len(FORK_POINTS)]
        if fork_at == "writing":
            store = "spool"
        plan = rng.sample(ACTIONS, rng.randint(1, 4))
        if fork_at == "queued" and "inherited_pipeline" not in plan:  # (who delivers the queued events is the point)
            plan.insert(rng.randint(0, len(plan)), "inherited_pipeline")
        if "close" in plan:  # (last: what follows a close would meet a closed client)
            plan.remove("close")
            plan.append("close")
        parent_plan = rng.sample(["direct", "raw_batch", "submit"], rng.randint(1, 3))
        batch_size = rng.choice([1, 2, 100])
        proc = Proc(seed, "parent")
        proc.notes.append(f"{store} {fork_at} child={plan} parent={parent_plan} batch={batch_size}")
        spool = os.path.join(WORK, f"spool-{seed}", "events.db") if store == "spool" else None
        settings = BillingSettings(api_key=KEY, api_url=URL, max_retries=0)
        client = LagoClient(settings)
        pipeline = EventPipeline(client, spool_path=spool, batch_size=batch_size, flush_interval=0.002,
                                 commit_window=0.002)
        billing = OrgBilling(client=client, pipeline=pipeline)
        org = f"org-{seed}"
        writer_paused, writer_go = threading.Event(), threading.Event()
        async with anyio.create_task_group() as tg:
            if fork_at in ("used", "in_flight", "writing", "closed"):
                await tg.start(pipeline.run)
            if fork_at in ("used", "closed"):
                for _ in range(3):
                    billing.record_usage_nowait(org, "api_call", transaction_id=proc.tx())
                await pipeline.flush(WAIT)
                await billing.record_usage(org, "api_call", transaction_id=proc.tx())
                await client.health()
            if fork_at == "closed":
                await pipeline.aclose()
                await client.aclose()
            elif fork_at == "in_flight":
                control("POST", "/_emulator/faults", {"latency_ms": 150, "count": 1, "path": "/api/v1/events/batch"})
                for _ in range(3):
                    billing.record_usage_nowait(org, "api_call", transaction_id=proc.tx())
                deadline = time.monotonic() + WAIT
                while control("GET", "/_emulator/faults")["faults"] and time.monotonic() < deadline:
                    await anyio.sleep(0.002)  # until the emulator holds the batch
                if not pipeline.outbox.in_flight:
                    proc.errors.append("in_flight: no batch in flight at the fork")
            elif fork_at == "queued":
                for _ in range(3):
                    billing.record_usage_nowait(org, "api_call", transaction_id=proc.tx())
            elif fork_at == "writing":
                armed = [True]

                def trace(sql):
                    if armed[0] and sql.startswith("INSERT INTO events"):
                        armed[0] = False
                        writer_paused.set()
                        writer_go.wait(WAIT)

                pipeline.outbox.file.conn.set_trace_callback(trace)
                for _ in range(3):
                    billing.record_usage_nowait(org, "api_call", transaction_id=proc.tx())
                await anyio.to_thread.run_sync(writer_paused.wait, WAIT)
                if not pipeline.outbox.file.conn.in_transaction:
                    proc.errors.append("writing: no spool write transaction open at the fork")
            if fork_at == "used" and not client._raw._idle:
                proc.errors.append("used: no kept-alive connection at the fork")
            # (a memory outbox's queued events are copied into the child, which sends them again running the pipeline
            # it inherited: not run there, see the report of this test's review; nor one running in the parent, which
            # refuses to run again in the child: "already running")
            can_run = not pipeline.closed
            kit = (settings, client, pipeline, billing, org, spool, can_run)
            pid = os.fork()
            if pid == 0:
                run_child(seed, "child", plan, kit, 1)
            writer_go.set()
            try:
                if fork_at == "closed":  # the parent starts again with new objects
                    client, pipeline, billing = fresh(settings, spool)
                if not pipeline._running:
                    await tg.start(pipeline.run)
                for action in parent_plan:
                    if action == "submit":
                        for _ in range(2):
                            billing.record_usage_nowait(org, "api_call", transaction_id=proc.tx())
                    else:
                        await act(action, proc, (settings, client, pipeline, billing, org, spool, False), 0)
                await wait_for(pid, proc, "child")
                billing.record_usage_nowait(org, "api_call", transaction_id=proc.tx())
                if not await pipeline.flush(WAIT):
                    proc.errors.append("parent pipeline: not flushed")
                await billing.record_usage(org, "api_call", transaction_id=proc.tx())
                await pipeline.aclose()
                for key in ("retries", "dropped", "lost_at_shutdown", "dead_lettered"):
                    if pipeline.stats[key]:
                        proc.errors.append(f"parent pipeline: {key} {pipeline.stats[key]}")
            except Exception as exc:
                proc.error("parent", exc)
                traceback.print_exc()
                tg.cancel_scope.cancel()
        await client.aclose()
        proc.write()


    for seed in SEEDS:
        anyio.run(scenario, seed)
        print("DONE", seed, flush=True)
    """
)


@pytest.fixture
def served() -> Iterator[tuple[FakeLago, str]]:
    fake = FakeLago(api_key=KEY)
    with serve_in_thread(fake) as url:
        yield fake, url


def _posted(fake: FakeLago) -> tuple[Counter[str], list[str]]:
    """Transaction ids in the event POSTs the emulator received (each counted per POST), and what went wrong."""
    counts: Counter[str] = Counter()
    problems: list[str] = []
    for record in fake.requests:
        if record.method != "POST":
            continue
        if record.status != 200:
            problems.append(f"{record.path} answered {record.status}: {str(record.body)[:200]}")
        body = record.body if isinstance(record.body, dict) else {}
        if record.path == "/api/v1/events":
            events = [body.get("event")]
        elif record.path == "/api/v1/events/batch":
            events = body.get("events") or [None]
        else:
            continue
        for item in events:
            if not isinstance(item, dict) or "transaction_id" not in item:
                problems.append(f"{record.path}: not an event: {str(record.body)[:200]}")
                continue
            counts[item["transaction_id"]] += 1
    return counts, problems


def _reports(work: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(work.glob("report-*.json"))]


def _spool_problems(work: Path) -> list[str]:
    problems = []
    for name in sorted(glob.glob(str(work / "spool-*" / "events.db*"))):
        if name.endswith(("-wal", "-shm", ".lock", "-journal")):
            continue
        conn = sqlite3.connect(name)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            left = conn.execute("SELECT json_extract(body, '$.transaction_id') FROM events").fetchall()
        except sqlite3.Error as exc:
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        finally:
            conn.close()
        if check != "ok":
            problems.append(f"{name}: integrity_check {check}")
        if left:
            problems.append(f"{name}: undelivered rows {[row[0] for row in left]}")
    return problems


def test_seeded_fork_sequences_neither_lose_nor_repeat_events(
    served: tuple[FakeLago, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = served
    caplog.set_level(logging.WARNING, logger="uvicorn")
    done = subprocess.run(
        [sys.executable, "-c", SCENARIOS, url, str(tmp_path), *map(str, SEEDS)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == [word for seed in SEEDS for word in ("DONE", str(seed))], done.stderr[-4000:]
    reports = _reports(tmp_path)
    plans = {r["notes"][0] for r in reports if r["notes"]}
    errors = [f"{r['who']}: {e}" for r in reports for e in r["errors"]]
    assert errors == [], (errors, sorted(plans))
    owned = Counter(tx for r in reports for tx in r["owned"])
    assert [tx for tx, n in owned.items() if n > 1] == []  # (no two processes name an event alike)
    counts, problems = _posted(fake)
    assert problems == [], problems
    garbled = [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")]
    assert garbled == [], garbled
    lost = sorted(set(owned) - set(counts))
    twice = sorted(tx for tx, n in counts.items() if n > 1)
    unknown = sorted(set(counts) - set(owned))
    assert (lost, twice, unknown) == ([], [], []), sorted(plans)
    assert _spool_problems(tmp_path) == [], sorted(plans)
