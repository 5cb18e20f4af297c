"""Seeded kill -9 sequences of a real process using the SQLite spool, checked against what the spool promises.

Each seed draws a few runs of a child process (``_spool_kill_child.py``) on one spool file: several producer tasks
record events (a random commit window, batch size, concurrency and event size) into an ``EventPipeline`` delivering to
the Lago emulator served on 127.0.0.1, which is up, down (nobody listens), slow, answering 500/502/503 or 429, or
dropping connections. The parent kills the child (SIGKILL) at a point drawn from what it reports: after some events
were committed, some batches posted or some events delivered, right after it opened the spool, or once idle; a run may
produce nothing and only drain the backlog the last one left (killed again while draining). Now and then two children
share the file (slots 0 and 1), both killed: the one outliving the other a moment may adopt its slot, and the next run
adopts what is left. A last run drains the spool with Lago healthy and closes.

The oracle, from the spool's docstring (an event is durable once its group commit returned: WAL, ``synchronous=FULL``;
a delivered row is deleted by the next commit, so a crash before it only causes a resend, which Lago deduplicates):

* after each kill, every event reported committed is in the spool's files (read-only) or already in Lago, each file
  passes ``PRAGMA integrity_check``, and the next child alone on them opens with exactly as many events as they hold;
* at the end every event reported committed is in Lago exactly once (the emulator's Postgres store refuses a second
  copy: its events are counted by ``transaction_id``), no event is there that no run recorded, none is there twice;
* every copy of an event that reached Lago's door had the same bytes (a resend is byte-identical);
* the spool file ends with no event and no dead letter, no slot file but its own, no -wal file left (SQLite removes it
  as the last connection closes), and never more than the few MB of WAL the README allows a worker meanwhile.

Events recorded but not yet committed at a kill may be lost (at most a commit window of them: the docstring's
"at most ``commit_window`` from durable"); which were is not asserted beyond that: they were never reported committed.

No sleep synchronises anything: the parent acts on the child's lines; a guard bounds each wait, reached only by a hang.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from lago_org_billing._spool import spool_slot_files
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("_spool_kill_child.py")
BATCH_PATH = "/api/v1/events/batch"
#: Seconds any wait on the child may take before the test fails: only a hang reaches it.
GUARD = 60.0
#: The README's bound on a worker's WAL ("up to ~4 MB of WAL per worker"), with a page's slack.
WAL_BOUND = 4 * 1024 * 1024 + 64 * 1024
LAGO_MODES = ("up", "down", "slow", "5xx", "429", "drop")


# ------------------------------------------------------------------------------------------------ Lago, recorded


class Recorder:
    """Lago's door: the bytes of each event of every complete ``POST /events/batch`` body, by ``transaction_id``
    (faulted requests included: the emulator's fault rules sit behind it)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.copies: dict[str, set[str]] = collections.defaultdict(set)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != BATCH_PATH:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # (the child died as it sent it: no whole body)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self.record(body.decode())
        given = False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def record(self, text: str) -> None:
        prefix = '{"events":['
        assert text.startswith(prefix), text[:100]
        decoder, position = json.JSONDecoder(), len(prefix)
        with self.lock:
            while text[position] != "]":
                event, end = decoder.raw_decode(text, position)
                self.copies[event["transaction_id"]].add(text[position:end])
                position = end + (text[end] == ",")
        assert text[position:] == "]}", text[position:]


def make_fake() -> FakeLago:
    return FakeLago(api_key="test-api-key", event_store="postgres")


def unreachable_url() -> str:
    """A 127.0.0.1 port nobody listens on (bound, never listened, closed): Lago down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def set_lago(fake: FakeLago, mode: str, rng: random.Random) -> None:
    """Lago's behaviour for one run (``down`` is the URL the child is given)."""
    faults = fake.faults
    faults.clear()
    if mode == "slow":
        faults.inject(latency_ms=rng.uniform(5, 120))
    elif mode == "5xx":  # (few: no event gathers max_attempts strikes)
        faults.inject(rng.choice((500, 502, 503)), count=rng.randint(1, 6))
    elif mode == "429":
        faults.inject(rate_limit={"limit": rng.randint(1, 3), "reset": 0.02})
    elif mode == "drop":
        faults.inject(drop=True, count=rng.randint(1, 5))


# ------------------------------------------------------------------------------------------------ the child


class Child:
    """A run of ``_spool_kill_child.py``; a thread puts its lines in ``lines`` as ``(name, line)``, and
    ``(name, None)`` once its stdout ends."""

    def __init__(self, name: int, config: dict[str, Any], lines: queue.Queue[tuple[int, str | None]]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("LAGO_")},
        )
        self.lines = lines
        self.stderr: list[str] = []
        self.killed = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put((self.name, line.rstrip("\n")))
        self.lines.put((self.name, None))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            self.stderr.extend(self.process.stderr)

    def kill_9(self) -> None:
        if not self.killed:
            os.kill(self.process.pid, signal.SIGKILL)
            assert self.process.wait(timeout=GUARD) == -signal.SIGKILL, self.failure()
            self.killed = True

    def failure(self) -> str:
        code = self.process.wait(timeout=GUARD)
        return f"the child exited with {code}:\n{''.join(self.stderr)[-4000:]}"


def lines_of(children: list[Child], lines: queue.Queue[tuple[int, str | None]]) -> Iterator[tuple[Child, str]]:
    """The lines of ``children`` as they come, until every one's stdout has ended (bounded by ``GUARD``)."""
    deadline = time.monotonic() + GUARD
    open_ = len(children)
    while open_:
        try:
            name, line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            for child in children:
                child.process.kill()
            raise AssertionError(f"the run lasted {GUARD} s (a hang)") from None
        if line is None:
            open_ -= 1
        else:
            yield children[name], line


# ------------------------------------------------------------------------------------------------ a seed


@dataclass
class RunSpec:
    """One run: what it produces, Lago's mode, and when it is killed (``None``: the last run, drained and closed).
    With ``workers`` 2, two children share the spool file (slots 0 and 1), both killed at that point: the next run
    adopts the slot file it did not take."""

    producers: int
    per_producer: int
    lago: str
    kill: tuple[str, int] | None
    child: dict[str, Any] = field(default_factory=dict)
    workers: int = 1


def draw(seed: int) -> list[RunSpec]:
    """The runs of ``seed``: a first run that produces, then 1 to 3 more killed runs (each producing or only draining
    the backlog; now and then two workers at once), then the last run, which drains and closes."""
    rng = random.Random(seed)
    runs: list[RunSpec] = []
    for index in range(rng.randint(2, 4)):
        producing = index == 0 or rng.random() < 0.5
        producers = rng.randint(2, 4) if producing else 0
        per_producer = rng.randint(20, 300 // max(producers, 1)) if producing else 0
        total = producers * per_producer
        lago = rng.choice(LAGO_MODES)
        if producing:
            kind = rng.choice(("DURABLE", "DURABLE", "SENT", "DELIVERED", "IDLE"))
        else:
            kind = rng.choice(("SENT", "DELIVERED", "OPEN"))
        if kind in ("DELIVERED", "IDLE") and lago == "down":  # (neither comes while Lago is down)
            kind = "SENT"
        at = {"DURABLE": rng.randint(1, max(total, 1)), "SENT": rng.randint(1, 6), "DELIVERED": rng.randint(1, 250)}
        workers = 2 if rng.random() < 0.25 else 1
        runs.append(RunSpec(producers, per_producer, lago, (kind, at.get(kind, 0)), _child_options(rng), workers))
    runs.append(RunSpec(0, 0, "up", None, child=_child_options(rng)))
    return runs


def _child_options(rng: random.Random) -> dict[str, Any]:
    return {
        "seed": rng.randrange(1 << 30),
        "burst": rng.choice((1, 5, 20, 60)),
        "pad": rng.choice((0, 0, 300, 2000)),
        "commit_window": rng.choice((0.002, 0.01, 0.05, 0.2)),
        "batch_size": rng.choice((1, 7, 50, 100)),
        "concurrency": rng.randint(1, 4),
    }


def _file_rows(uri: str, file: str) -> list[str]:
    """The transaction ids of the rows of the SQLite database at ``uri`` (``file``, for the messages), checked whole."""
    conn = sqlite3.connect(uri, uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], file
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "events" not in tables:  # (killed before its schema was committed: nothing in it yet)
            return []
        return [json.loads(body)["transaction_id"] for (body,) in conn.execute("SELECT body FROM events")]
    finally:
        conn.close()


class Sequence:
    """Runs a seed's children against one emulator and spool file, and keeps what the oracle checks."""

    def __init__(self, seed: int, tmp_path: Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed * 7919 + 1)
        self.path = tmp_path / "spool.db"
        self.fake = make_fake()
        self.door = Recorder(self.fake)
        self.recorded: set[str] = set()  # every transaction id a run may have submitted
        self.durable: set[str] = set()  # those a child reported committed
        self.closed_stats: dict[str, int] | None = None
        self.shared = False  # whether two workers shared the spool (an adoption cut short may copy a row twice)
        self.rows_left = 0  # the events the spool's files held after the last kill
        self.tmp_path, self.copies = tmp_path, 0  # (copies of slot files a read-only connection could not read)

    def run_all(self, runs: list[RunSpec]) -> None:
        with serve_in_thread(self.door) as url:
            for index, run in enumerate(runs):
                self.run(index, run, url)
        # (the server stopped: no request of a killed child is still in flight at Lago's door)

    def run(self, index: int, run: RunSpec, url: str) -> None:
        set_lago(self.fake, run.lago, self.rng)
        self.shared = self.shared or run.workers > 1
        lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        children: list[Child] = []
        for worker in range(run.workers):
            prefix = f"s{self.seed}r{index}w{worker}"
            self.recorded.update(f"{prefix}-{p}-{i}" for p in range(run.producers) for i in range(run.per_producer))
            config = {
                **run.child,
                "seed": run.child["seed"] + worker,
                "spool": str(self.path),
                "url": unreachable_url() if run.lago == "down" else url,
                "prefix": prefix,
                "producers": run.producers,
                "per_producer": run.per_producer,
                "close": run.kill is None,
            }
            children.append(Child(worker, config, lines))
        try:
            killed = self.watch(run, children, lines)
        finally:  # (a failed check: no child is left behind, waiting to be killed)
            for each in children:
                if each.process.poll() is None:
                    each.process.kill()
                    each.process.wait()
        if run.kill is None:
            (child,) = children
            assert child.process.wait(timeout=GUARD) == 0, child.failure()
            assert self.closed_stats is not None, child.failure()
        else:
            assert killed, children[0].failure()
            self.check_after_kill()

    def watch(self, run: RunSpec, children: list[Child], lines: queue.Queue[tuple[int, str | None]]) -> bool:
        """Follow the children's lines, kill them all at the run's kill point; whether they were killed."""
        counts = {child.name: collections.Counter[str]() for child in children}
        killed = False
        for child, line in lines_of(children, lines):
            kind, _, rest = line.partition(" ")
            mine = counts[child.name]
            if kind == "DURABLE":
                ids = rest.split()
                assert set(ids) <= self.recorded, ids
                self.durable.update(ids)
                mine[kind] += len(ids)
            elif kind == "DELIVERED":
                mine[kind] = int(rest)
            else:
                mine[kind] += 1
            if kind == "CLOSED":
                self.closed_stats = json.loads(rest)
            elif kind == "OPEN" and run.workers == 1:  # alone, it finds what the files held after the last kill
                assert int(rest) == self.rows_left, f"opened with {rest} events, the files held {self.rows_left}"
            if killed or run.kill is None:
                continue  # (after the kill: the lines they printed before dying, read to the end)
            wanted, at = run.kill
            if wanted == "OPEN":
                hit = all(count["OPEN"] for count in counts.values())
            else:
                hit = sum(count[wanted] for count in counts.values()) >= at
            if hit or all(count["IDLE"] for count in counts.values()):
                for each in children:
                    each.kill_9()
                killed = True
        return killed

    # -------------------------------------------------------------------------------------------- the oracle

    def in_lago(self) -> collections.Counter[str]:
        return collections.Counter(event["transaction_id"] for event in list(self.fake.events))

    def spool_rows(self) -> list[str]:
        """The transaction ids of the rows of every slot file of the spool, read without writing anything (no
        checkpoint, no recovery written), each file checked whole first."""
        found: list[str] = []
        for _slot, file in spool_slot_files(str(self.path)):
            try:
                found += _file_rows("file:" + urllib.parse.quote(file) + "?mode=ro", file)
            except sqlite3.OperationalError as exc:
                if "readonly" not in str(exc):
                    raise
                # Killed while the slot file was still in rollback-journal mode (its first PRAGMA journal_mode=WAL,
                # a copy made again): a hot -journal, which a read-only connection cannot roll back
                # (SQLITE_READONLY_ROLLBACK). Read a copy instead, rolled back as the next process opening it does.
                copy = self.tmp_path / f"copy-{self.copies}"
                self.copies += 1
                copy.mkdir()
                for suffix in ("", "-journal", "-wal"):
                    if os.path.exists(file + suffix):
                        shutil.copyfile(file + suffix, copy / ("spool.db" + suffix))
                found += _file_rows(str(copy / "spool.db"), file)
        return found

    def wal_bytes(self) -> int:
        """The largest -wal file of the spool's slots."""
        sizes = [0]
        for _slot, file in spool_slot_files(str(self.path)):
            try:
                sizes.append(os.stat(f"{file}-wal").st_size)
            except FileNotFoundError:
                pass
        return max(sizes)

    def check_after_kill(self) -> None:
        """Every event reported committed is in the spool's files, or already in Lago; each file is whole. (Which
        files: a worker outliving the other a moment may have adopted its slot, ``spool.db`` itself, into its own.)"""
        rows = self.spool_rows()
        self.rows_left = len(rows)
        if not self.shared:
            assert len(rows) == len(set(rows)), "an event is in the spool twice"
        missing = self.durable - set(rows) - set(self.in_lago())
        assert not missing, f"{len(missing)} committed events neither in the spool nor in Lago: {sorted(missing)[:5]}"
        assert self.wal_bytes() <= WAL_BOUND, self.wal_bytes()

    def check_end(self) -> None:
        stored = self.in_lago()
        twice = {tid: n for tid, n in stored.items() if n > 1}
        assert not twice, f"in Lago more than once: {twice}"
        assert set(stored) <= self.recorded, sorted(set(stored) - self.recorded)[:5]
        lost = self.durable - set(stored)
        assert not lost, f"{len(lost)} committed events never reached Lago: {sorted(lost)[:5]}"
        with self.door.lock:
            changed = {tid: copies for tid, copies in self.door.copies.items() if len(copies) > 1}
        assert not changed, f"sent with different bytes: {list(changed.items())[:2]}"
        assert set(stored) <= set(self.door.copies), "an event reached Lago past its door"
        stats = self.closed_stats
        assert stats is not None and stats["dead_lettered"] == 0 and stats["lost_at_shutdown"] == 0, stats
        # the file: empty, whole, alone, its WAL gone with the last connection
        left = self.spool_rows()
        assert left == [], f"{len(left)} events left in the spool: {left[:5]}"
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(self.path))}?mode=ro", uri=True)
        try:
            letters = conn.execute("SELECT reason FROM dead_letters").fetchall()
            assert letters == [], letters[:5]
        finally:
            conn.close()
        assert [slot for slot, _ in spool_slot_files(str(self.path))] == [0], sorted(os.listdir(self.path.parent))
        assert self.wal_bytes() == 0, sorted(os.listdir(self.path.parent))


SEEDS = range(4)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_kills_lose_no_committed_event_and_bill_none_twice(seed: int, tmp_path: Path) -> None:
    """A seeded sequence of kill -9s (while producing, delivering, draining; Lago up, down, slow, failing or rate
    limiting) ends with every event a child reported committed in Lago exactly once, sent with the same bytes each
    time, and the spool file empty, whole and without a -wal."""
    sequence = Sequence(seed, tmp_path)
    sequence.run_all(draw(seed))
    sequence.check_end()
