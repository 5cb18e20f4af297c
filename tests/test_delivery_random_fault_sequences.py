"""Seeded random fault sequences through the delivery pipeline, checked against a model of what Lago must end with.

Each seed draws a sequence of steps: submits (plain and lane events, some of them poison: a
``precise_total_amount_cents`` Lago answers ``value_is_invalid`` for), Lago answers scripted at the network edge (a
transport in front of the emulator: 200, 500/502/503/504, 429 with ``X-RateLimit-Reset`` or ``Retry-After``, a batch
partly or wholly ingested before (so the emulator answers ``value_already_exist``), a 422 naming invalid and duplicate
events at once, the connection dropped or timed out after Lago ingested the batch, or before it got it), waits for the
next request, flushes, ``aclose()`` then a new pipeline (on the same spool file), a run cancelled (through its cancel
scope, or natively as ``asyncio.run()`` ending its loop does) with a batch held at Lago's door (before or after Lago
ingested it), a spool write held in its thread, or anywhere, then run again, replays of the dead letters, and (spool)
a full volume for a write or two.

The edge counts what each answer it gives back tells the pipeline (an event acknowledged by a 2xx, a duplicate by a
422 ``value_already_exist``, a rejection by a 422 naming it invalid). At the end (Lago healthy, everything flushed and
closed) the oracle asks:

* every valid event accepted is in the emulator exactly once, with its own timestamp, and was acknowledged exactly
  once (the memory outbox's ``aclose(timeout=0)`` aside: what it loses is counted in ``lost_at_shutdown``, exactly);
* every attempt carried each event's exact bytes (a resend is byte-identical);
* every poison event accepted is one dead letter, with Lago's status, code and reason, and no valid event is one;
* the metrics agree: ``recorded + replayed == delivered + dead_lettered + dropped + lost_at_shutdown``, ``delivered``
  and ``duplicates`` are what Lago's answers said, nothing is left unresolved, and the spool file is empty.

Time never passes for real: the pipeline's pauses (``_sleep``) return at once, and every wait of the test is on an
anyio event (a request reaching the edge, a run ending), bounded by a guard that only a hang would reach.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import random
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest

from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing._metrics import PipelineMetrics
from lago_org_billing._settings import BillingSettings
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
BATCH_PATH = "/api/v1/events/batch"
POISON = "not-a-number"  # a precise_total_amount_cents Lago answers value_is_invalid for
GUARD = 20.0  # a bound on each wait of the test: only a hang reaches it
SEEDS = [1, 2, 3, 4, 5]

Outcome = tuple[Any, ...]


def wire(event: dict[str, Any]) -> bytes:
    """The bytes an event submitted as a dict is sent as (the pipeline's one encoding)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def poisoned(event: dict[str, Any]) -> bool:
    return event.get("precise_total_amount_cents") == POISON


class EdgeLago(httpx.AsyncBaseTransport):
    """The emulator behind a scripted network edge: each ``POST /events/batch`` takes the next outcome of ``script``
    (none left: Lago answers itself), and what every answer given back tells the pipeline is counted by event."""

    def __init__(self, fake: FakeLago, rng: random.Random) -> None:
        self.fake = fake
        self.inner = fake.transport()
        self.rng = rng
        self.script: collections.deque[Outcome] = collections.deque()
        #: "before" / "after" (Lago ingested it): the next batch is held there until its run is cancelled
        self.hold: str | None = None
        self.entered = anyio.Event()
        self.requests = 0
        self._arrived = anyio.Event()
        self.bodies: list[bytes] = []
        self.acks: collections.Counter[str] = collections.Counter()  # 2xx, or 422 value_already_exist
        self.duplicate_acks: collections.Counter[str] = collections.Counter()
        self.rejections: collections.Counter[str] = collections.Counter()  # 422 naming it invalid
        self.log: list[tuple[Outcome, int]] = []

    async def next_request(self) -> None:
        """Wait for the next batch to reach the edge."""
        self._arrived = anyio.Event()
        await self._arrived.wait()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        if request.url.path != BATCH_PATH:
            return await self.inner.handle_async_request(request)
        self.bodies.append(body)
        self.requests += 1
        self._arrived.set()
        events = json.loads(body)["events"]
        tids = [event["transaction_id"] for event in events]
        if self.hold is not None:
            mode, self.hold = self.hold, None
            self.log.append((("hold", mode), len(tids)))
            if mode == "after":
                await self._forward(request, body)
            self.entered.set()
            await anyio.sleep_forever()  # until the test cancels the run (the answer never comes)
        outcome = self.script.popleft() if self.script else ("ok",)
        self.log.append((outcome, len(tids)))
        kind = outcome[0]
        if kind == "status":
            status = outcome[1]
            headers = {"Retry-After": "3"} if status == 503 and outcome[2] else {}
            return self._answer(tids, httpx.Response(status, headers=headers, json={"status": status, "error": "x"}))
        if kind == "429":
            header = "X-RateLimit-Reset" if outcome[1] == "reset" else "Retry-After"
            answer = httpx.Response(429, headers={header: str(outcome[2])}, json={"status": 429, "error": "x"})
            return self._answer(tids, answer)
        if kind == "unsent":  # Lago never got it
            if outcome[1] == "timeout":
                raise httpx.ConnectTimeout("connect timed out", request=request)
            raise httpx.ConnectError("connection refused", request=request)
        if kind == "lost":  # Lago got it (and ingested it, unless it was invalid); the answer never comes back
            await self._forward(request, body)
            if outcome[1] == "timeout":
                raise httpx.ReadTimeout("read timed out", request=request)
            raise httpx.ReadError("connection reset by peer", request=request)
        if kind == "preingest":  # some (or all) of the batch reached Lago before: a retry whose answer was lost
            valid = [event for event in events if not poisoned(event)]
            chosen = valid if outcome[1] == "all" else [event for event in valid if self.rng.random() < 0.5]
            if chosen:
                await self._forward(request, json.dumps({"events": chosen}).encode())
        if kind == "mixed422":  # one answer naming the invalid events and those Lago holds already
            held = {event["transaction_id"] for event in self.fake.store.events}
            details: dict[str, Any] = {}
            for index, event in enumerate(events):
                if poisoned(event):
                    details[str(index)] = {"precise_total_amount_cents": ["value_is_invalid"]}
                elif self.fake.store.event_store == "postgres" and event["transaction_id"] in held:
                    details[str(index)] = {"transaction_id": ["value_already_exist"]}
            if details:
                error = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
                return self._answer(tids, httpx.Response(422, json={**error, "error_details": details}))
        return self._answer(tids, await self._forward(request, body))

    async def _forward(self, request: httpx.Request, body: bytes) -> httpx.Response:
        headers = {"Authorization": request.headers["Authorization"], "Content-Type": "application/json"}
        answer = await self.inner.handle_async_request(
            httpx.Request("POST", request.url, headers=headers, content=body)
        )
        content = await answer.aread()
        return httpx.Response(answer.status_code, headers=answer.headers, content=content)

    def _answer(self, tids: list[str], answer: httpx.Response) -> httpx.Response:
        """Count what ``answer`` tells the pipeline about each event of the batch."""
        if 200 <= answer.status_code < 300:
            self.acks.update(tids)
        elif answer.status_code == 422:
            for key, error in answer.json().get("error_details", {}).items():
                tid = tids[int(key)]
                if error == {"transaction_id": ["value_already_exist"]}:
                    self.acks[tid] += 1
                    self.duplicate_acks[tid] += 1
                else:
                    self.rejections[tid] += 1
        return answer


class Volume:
    """The spool's volume: the next ``failing`` writes fail as on a full disk; with ``hold``, the next write waits in
    its thread for ``release`` (``entered`` is set as it starts), then fails if ``fail_held``, else goes on."""

    def __init__(self) -> None:
        self.failing = 0
        self.hold = False
        self.fail_held = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def mount(self, pipeline: EventPipeline) -> None:
        file = pipeline.outbox.file  # type: ignore[attr-defined]
        write = file.write

        def write_on_the_volume(*args: Any) -> Any:
            if self.hold:
                self.hold = False
                self.entered.set()
                self.release.wait(GUARD)
                if self.fail_held:
                    raise sqlite3.OperationalError("database or disk is full")
            if self.failing:
                self.failing -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return write(*args)

        file.write = write_on_the_volume


@dataclass
class Submitted:
    event: dict[str, Any]
    wire: bytes
    poison: bool
    accepted: bool


def build_lane_event(facts: tuple[dict[str, Any], str | None]) -> dict[str, Any] | str:
    """A lane's builder: the event's JSON text when the facts carry it, else a copy of the event."""
    event, text = facts
    return text if text is not None else dict(event)


class Model:
    """Drives one seed's steps against a pipeline (memory outbox or spool) and keeps what the oracle checks."""

    def __init__(self, seed: int, store: str, tmp_path: Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.store = store
        self.event_store = self.rng.choice(["postgres", "postgres", "clickhouse"])
        self.fake = FakeLago(api_key=API_KEY, event_store=self.event_store)
        self.edge = EdgeLago(self.fake, random.Random(seed * 7919))
        settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
        self.client = LagoClient(settings, transport=self.edge)
        self.spool_path = str(tmp_path / "spool.db") if store == "spool" else None
        self.metrics = PipelineMetrics()
        self.options: dict[str, Any] = {
            "batch_size": self.rng.choice([2, 3, 5, 10, 100]),
            "concurrency": self.rng.choice([1, 2, 3]),
            "memory_capacity": self.rng.choice([4, 25, 10_000]),
            "spool_window": self.rng.choice([None, 3, 12]) if store == "spool" else None,
        }
        self.submitted: dict[str, Submitted] = {}
        self.letters: list[Any] = []  # dead letters of the memory pipelines closed so far
        self.replayed = 0
        self.steps: list[str] = []
        self.servers_500 = 0
        self.count = 0
        self.volume = Volume()
        self.volume_faults = 0
        self.pipeline = self._new_pipeline()
        self.scope: anyio.CancelScope | None = None
        self.task: asyncio.Task[None] | None = None

    def _new_pipeline(self) -> EventPipeline:
        pipeline = EventPipeline(
            self.client,
            spool_path=self.spool_path,
            flush_interval=0.0,
            commit_window=0.01,
            shutdown_timeout=2.0,
            retry_backoff=0.001,
            max_backoff=0.01,
            metrics=self.metrics,
            **self.options,
        )

        async def elapse(seconds: float) -> None:  # the pause has passed (no real time goes by)
            pipeline._not_before = 0.0
            await anyio.lowlevel.checkpoint()

        pipeline._sleep = elapse
        self.submit_lane: Callable[[Any], bool] = pipeline.lane(build_lane_event)
        if self.spool_path is not None:
            self.volume.mount(pipeline)
        return pipeline

    # ------------------------------------------------------------------ runs

    async def start(self) -> None:
        """Run the pipeline in a task of its own, as a server's lifespan task (which a loop ending cancels natively)."""
        started = anyio.Event()
        self.task = asyncio.get_running_loop().create_task(
            self._run(self.pipeline, started), name=f"{__name__}.Model._run"
        )
        with anyio.fail_after(GUARD):
            await started.wait()
        if self.task.done():
            await self.stopped()  # (it failed to start: raised here)

    async def _run(self, pipeline: EventPipeline, started: anyio.Event) -> None:
        try:
            with anyio.CancelScope() as self.scope:
                async with anyio.create_task_group() as tg:
                    await tg.start(pipeline.run)
                    started.set()
        finally:
            started.set()

    async def stopped(self) -> None:
        """Wait for the run to end: what it raised (but a cancellation) is raised here."""
        task = self.task
        assert task is not None
        with anyio.fail_after(GUARD):
            await asyncio.wait({task})
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error

    # ------------------------------------------------------------------ steps

    async def step(self) -> None:
        kinds = ["submit", "fault", "progress", "flush", "restart", "cancel", "replay", "volume"]
        kind = self.rng.choices(kinds, weights=[30, 25, 15, 8, 7, 8, 5, 3])[0]
        await getattr(self, f"_{kind}")()

    def _submit_some(self, count: int) -> int:
        accepted = 0
        for _ in range(count):
            n = self.count
            self.count += 1
            tid = f"s{self.seed}-{self.store}-{n}"
            poison = self.rng.random() < 0.12
            extra = {"precise_total_amount_cents": POISON} if poison else {}
            timestamp = f"{1767225600 + n}.{self.rng.randrange(1000):03d}"
            event = event_payload(
                transaction_id=tid, external_subscription_id="org_1", code="api_call", timestamp=timestamp, **extra
            )
            if self.rng.random() < 0.4:
                text = json.dumps(event) if self.rng.random() < 0.5 else None  # (not the pipeline's own encoding)
                ok = self.submit_lane((event, text))
                sent = text.encode() if text is not None else wire(event)
            else:
                ok = self.pipeline.submit(dict(event))
                sent = wire(event)
            self.submitted[tid] = Submitted(event, sent, poison, ok)
            accepted += ok
        self.steps.append(f"submit {count} ({accepted} accepted)")
        return accepted

    async def _submit(self) -> None:
        self._submit_some(self.rng.randint(1, 12))

    async def _fault(self) -> None:
        outcomes: list[Outcome] = []
        for _ in range(self.rng.randint(1, 4)):
            kind = self.rng.choice(["ok", "500", "5xx", "429", "lost", "unsent", "preingest", "mixed422"])
            if kind == "500" and self.servers_500 < 8:  # below max_attempts: no valid event may be struck out
                self.servers_500 += 1
                outcomes.append(("status", 500, False))
            elif kind == "5xx":
                outcomes.append(("status", self.rng.choice([502, 503, 504]), self.rng.random() < 0.5))
            elif kind == "429":
                outcomes.append(("429", self.rng.choice(["reset", "retry-after"]), self.rng.randint(0, 90)))
            elif kind in ("lost", "unsent"):
                outcomes.append((kind, self.rng.choice(["drop", "timeout"])))
            elif kind == "preingest":
                outcomes.append(("preingest", self.rng.choice(["some", "all"])))
            elif kind == "mixed422":
                outcomes.append(("mixed422",))
            else:
                outcomes.append(("ok",))
        self.edge.script.extend(outcomes)
        self.steps.append(f"fault {outcomes}")

    async def _progress(self) -> None:
        """Submit a few events and wait for the next batch to reach Lago."""
        before = self.edge.requests
        if not self._submit_some(self.rng.randint(1, 4)):
            await self._flush()
            return
        with anyio.fail_after(GUARD):
            while self.edge.requests == before:
                await self.edge.next_request()
        self.steps.append("progress")

    async def _flush(self) -> None:
        with anyio.fail_after(GUARD):
            assert await self.pipeline.flush()
        self.steps.append("flush")
        self.check_settled()

    def check_settled(self) -> None:
        """Once a flush has returned True: nothing was acknowledged twice nor is in Lago twice, and every event
        recorded so far is accounted for (delivered, dead-lettered, dropped or lost), none left unresolved."""
        stats = self.metrics.snapshot()
        assert stats["depth"] == 0
        assert not {tid for tid, n in self.edge.acks.items() if n > 1}, "an event was acknowledged twice"
        stored = collections.Counter(event["transaction_id"] for event in self.fake.store.events)
        assert not {tid for tid, n in stored.items() if n > 1}, "an event is in Lago twice"
        assert stats["delivered"] == sum(self.edge.acks.values())
        assert stats["dead_lettered"] == sum(self.edge.rejections.values())
        assert (
            stats["recorded"] + stats["replayed"]
            == stats["delivered"] + stats["dead_lettered"] + stats["dropped"] + stats["lost_at_shutdown"]
        ), stats

    async def _restart(self) -> None:
        """aclose() (at once, or after some of the pipeline's steps: whatever is in flight then), then a new pipeline
        on the same spool file (or a new memory outbox), given events before or after it starts."""
        timeout = self.rng.choice([0.0, math.inf])
        await self._let_run(self.rng.randint(0, 40))
        await self._close(timeout)
        self._renew()
        if self.rng.random() < 0.3:
            self._submit_some(self.rng.randint(1, 5))  # before it runs
        await self.start()
        self.steps.append(f"restart (aclose timeout={timeout})")

    async def _let_run(self, checkpoints: int) -> None:
        """Let the pipeline's tasks run a while: ``checkpoints`` turns of the event loop (no time passes)."""
        for _ in range(checkpoints):
            await anyio.lowlevel.checkpoint()

    async def _volume(self) -> None:
        """The spool's next writes fail, as on a full disk (a few times per seed: each failure is retried after a
        real backoff of the spool's); meanwhile its events are sent from memory."""
        if self.spool_path is None or self.volume_faults >= 3:
            return
        self.volume_faults += 1
        self.volume.failing = self.rng.randint(1, 2)
        self.steps.append(f"volume full for {self.volume.failing} writes")

    async def _close(self, within: float) -> None:
        # (the volume takes the last write: what a full one loses at shutdown is counted, and not this test's subject)
        self.volume.failing = 0
        with anyio.fail_after(GUARD):
            await self.pipeline.aclose(within)
        await self.stopped()

    def _renew(self) -> None:
        if self.store == "memory":
            self.letters += self.pipeline.dead_letters()
        self.pipeline = self._new_pipeline()

    async def _cancel(self) -> None:
        """The run is cancelled with a batch held at Lago's door (before or after Lago ingested it), or wherever it
        is after some turns of the event loop, or closed with a held batch; events may come while it is stopped;
        then it runs again, or is closed and a new one runs."""
        how = self.rng.choice(["held", "held", "anywhere", "held close", "native held", "native anywhere"])
        if how == "native anywhere" and self.spool_path is not None and self.rng.random() < 0.5:
            how = "native mid-write"
        mode = self.rng.choice(["before", "after"])
        if how == "native mid-write":  # a spool write held in its thread as the run is cancelled natively
            self.volume.hold, self.volume.fail_held = True, mode == "before"
            self.volume.entered.clear()
            self.volume.release.clear()
        elif not how.endswith("anywhere"):
            self.edge.hold, self.edge.entered = mode, anyio.Event()
        if not self._submit_some(self.rng.randint(1, 6)):
            self.edge.hold, self.volume.hold = None, False
            await self._flush()
            return
        assert self.scope is not None
        with anyio.fail_after(GUARD):
            if how.endswith("anywhere"):
                await self._let_run(self.rng.randint(0, 40))
            elif how == "native mid-write":
                assert await anyio.to_thread.run_sync(self.volume.entered.wait, GUARD)
            else:
                await self.edge.entered.wait()
            if how == "held close":
                await self._close(0.0)  # (the held batch never gets an answer: no timeout would end)
                self._renew()
            elif how.startswith("native"):
                # as asyncio.run() ending its loop: Task.cancel() on every task of the run at once
                for task in asyncio.all_tasks():
                    name = task.get_name()  # (anyio names a task after its function)
                    if name.endswith(".Model._run") or ".EventPipeline." in name:
                        task.cancel()
                self.volume.release.set()  # (the write ends: failed when "before", done when "after")
                await self.stopped()
            else:
                self.scope.cancel()
                await self.stopped()
        if how != "held close":
            if self.rng.random() < 0.4:
                self._submit_some(self.rng.randint(1, 5))  # while it is stopped
            if self.rng.random() < 0.2:
                await self._replay()  # while it is stopped
            if self.rng.random() < 0.25:  # closed while stopped, a new one runs
                await self._close(0.0)
                self._renew()
        await self.start()
        self.steps.append(f"cancel ({how}, {mode})")

    async def _replay(self) -> None:
        count = await self.pipeline.replay_dead_letters()
        self.replayed += count
        self.steps.append(f"replay {count}")

    async def finish(self) -> None:
        """Lago healthy, everything flushed, the pipeline closed."""
        self.edge.script.clear()
        self.edge.hold = None
        self.volume.failing = 0
        await self._flush()
        await self._close(math.inf)
        self.letters += self.pipeline.dead_letters()

    # ------------------------------------------------------------------ oracle

    def check(self) -> None:
        """The oracle, at the end (see the module docstring)."""
        edge, stats = self.edge, self.metrics.snapshot()
        accepted = {tid: s for tid, s in self.submitted.items() if s.accepted}
        valid = {tid for tid, s in accepted.items() if not s.poison}
        poison = {tid for tid, s in accepted.items() if s.poison}
        stored = collections.Counter(event["transaction_id"] for event in self.fake.store.events)
        lost = stats["lost_at_shutdown"]

        # no event twice (as two events, or acknowledged twice), none refused sent
        assert not {tid for tid, n in stored.items() if n > 1}, "an event is in Lago twice"
        assert not {tid for tid, n in edge.acks.items() if n > 1}, "an event was acknowledged twice"
        assert set(stored) <= valid, "Lago holds an event that was refused or is poison"
        # each valid event acknowledged once and in Lago; each poison event a dead letter; the rest counted lost
        unacked = valid - set(edge.acks)
        letters = collections.Counter(letter.event.get("transaction_id") for letter in self.letters)
        assert not {tid for tid, n in letters.items() if n > 1}, "an event is dead-lettered twice"
        assert set(letters) <= poison, "a valid event was dead-lettered"
        undead = poison - set(letters)
        assert len(unacked) + len(undead) == lost, (sorted(unacked), sorted(undead), lost)
        if self.store == "spool" or lost == 0:
            assert not unacked and not undead
        assert set(edge.acks) <= set(stored) and valid - unacked <= set(stored)
        # with its own timestamp, and every attempt with the event's exact bytes
        for event in self.fake.store.events:
            assert Decimal(event["ts"]) == Decimal(accepted[event["transaction_id"]].event["timestamp"])
        # (a replayed dead letter is sent as its letter holds it: the same event, re-encoded as the pipeline does)
        for tid, submitted in accepted.items():
            marker = f'"{tid}"'.encode()
            carriers = [body for body in edge.bodies if marker in body]
            if not submitted.poison:
                assert all(submitted.wire in body for body in carriers), f"{tid} was not resent byte-identical"
            copies = [
                event for body in carriers for event in json.loads(body)["events"] if event["transaction_id"] == tid
            ]
            assert all(copy == submitted.event for copy in copies), f"{tid} was sent altered"
        # dead letters with Lago's reason
        for letter in self.letters:
            tid = letter.event["transaction_id"]
            assert letter.event == accepted[tid].event
            assert (letter.status, letter.code) == (422, "validation_errors") and "value_is_invalid" in letter.reason
        # the metrics agree with all of that
        assert stats["recorded"] == len(self.submitted)
        assert stats["dropped"] == len(self.submitted) - len(accepted)
        assert stats["replayed"] == self.replayed
        assert stats["delivered"] == sum(edge.acks.values())
        assert stats["duplicates"] == sum(edge.duplicate_acks.values())
        assert stats["dead_lettered"] == sum(edge.rejections.values())
        assert (
            stats["recorded"] + stats["replayed"]
            == stats["delivered"] + stats["dead_lettered"] + stats["dropped"] + stats["lost_at_shutdown"]
        )
        assert stats["depth"] == 0
        if self.spool_path is not None:
            with contextlib.closing(sqlite3.connect(self.spool_path)) as db:  # (closed: Python 3.13 warns)
                assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
                assert db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0] == len(poison)
            assert stats["dead_letters"] == len(poison)

    def describe(self) -> str:
        return (
            f"seed {self.seed} ({self.store}, {self.event_store} store, {self.options}):\n  "
            + "\n  ".join(self.steps)
            + f"\nedge log: {self.edge.log}"
        )


async def run_seed(seed: int, store: str, tmp_path: Path, steps: int | None = None) -> Model:
    """The steps of ``seed`` (as many as it draws, or ``steps``), then the end: Lago healthy, all flushed, closed."""
    model = Model(seed, store, tmp_path)
    try:
        async with model.client:
            await model.start()
            for _ in range(steps if steps is not None else model.rng.randint(20, 35)):
                await model.step()
            await model.finish()
    except BaseException:
        print(model.describe())  # (shown with the failure)
        if model.task is not None and not model.task.done():
            model.task.cancel()
        raise
    return model


@pytest.mark.parametrize("store", ["memory", "spool"])
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_fault_sequence_loses_and_doubles_nothing(seed: int, store: str, tmp_path: Path) -> None:
    """A seeded sequence of submits, Lago faults, flushes, restarts and cancelled runs ends with every valid event in
    Lago once, each poison event a dead letter with Lago's reason, and metrics that add up."""
    model = await run_seed(seed, store, tmp_path)
    try:
        model.check()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{model.describe()}") from exc


async def test_resolutions_a_full_volume_kept_from_the_file_survive_a_cancelled_run(tmp_path: Path) -> None:
    """Rows Lago took (or rejected) while the spool's volume was full are not sent again after the run is cancelled
    and run again: each is delivered once, counted once, and the poison one is one dead letter.

    The sequence (what seeds 20 and 44 drew among other steps): three events written to the spool, one poison; the
    volume fills; Lago answers 422 for the poison event (dead-lettered) and takes the other two; the commits that
    would delete their rows and move the poison one to the dead letters fail; the run is cancelled and run again
    (a lifespan restarting its background work, a loop ending), the volume is freed. The new run's rewind forgot those
    resolutions: the three rows were loaded again and sent again, Lago answered value_already_exist for two (counted
    delivered twice, and duplicates) and 422 again for the poison one (dead-lettered twice: two letters when the first
    commit went through later, ``dead_lettered`` 2 for one event)."""
    fake = FakeLago(api_key=API_KEY)
    edge = EdgeLago(fake, random.Random(0))
    volume = Volume()
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    submitted = [
        event_payload(
            transaction_id=f"tx{n}", external_subscription_id="org_1", code="api_call", timestamp=f"1767225600.{n}00",
            **({"precise_total_amount_cents": POISON} if n == 1 else {}),
        )
        for n in range(3)
    ]  # fmt: skip
    async with LagoClient(settings, transport=edge) as client:
        pipeline = EventPipeline(client, spool_path=str(tmp_path / "spool.db"), flush_interval=0.0, commit_window=0.01)
        volume.mount(pipeline)
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(GUARD):
                edge.script.extend([("unsent", "drop")] * 1000)  # Lago down: the events wait in the file
                await tg.start(pipeline.run)
                for event in submitted:
                    pipeline.submit(dict(event))
                await pipeline.commit()
                volume.failing = 1000  # the volume fills
                edge.script.clear()  # Lago answers: 422 for the poison event, then 200 for the others
                assert await pipeline.flush()
                assert pipeline.outbox._to_delete and pipeline.outbox._to_dead  # type: ignore[attr-defined]
                tg.cancel_scope.cancel()  # (the run's last commit fails too)
        volume.failing = 0
        sent_before = len(edge.bodies)
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(GUARD):
                await tg.start(pipeline.run)
                assert await pipeline.flush()
                await pipeline.aclose()
    assert len(edge.bodies) == sent_before  # nothing sent again
    assert sorted(event["transaction_id"] for event in fake.store.events) == ["tx0", "tx2"]
    stats = pipeline.stats
    assert (stats["delivered"], stats["duplicates"], stats["dead_lettered"]) == (2, 0, 1)
    [letter] = pipeline.dead_letters()
    assert letter.event == submitted[1] and letter.status == 422
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


@pytest.mark.parametrize("seed", [20, 44])
async def test_seeds_that_found_resolutions_forgotten_by_a_rewind(seed: int, tmp_path: Path) -> None:
    """Seeds 20 and 44 (spool) end with each event delivered once and each poison event dead-lettered once.

    What they found (see the test above, which repeats it step by step): resolutions a full volume kept from the file
    were forgotten when the run was cancelled and run again, and their rows sent again.

    * Seed 44: a batch of 30 rows (a replayed poison event among them) gets 422 for its two poison events, then 200
      for the 28 others; the volume fills for two writes, so neither the deletes nor the dead letters are written; the
      run is cancelled with a batch held after Lago ingested it. The next run sent the 30 rows again: Lago's
      ``value_already_exist`` counted the 28 delivered twice (and duplicates), the two poison events were
      dead-lettered twice.
    * Seed 20: three rows a restart left in the spool, two of them poison, are rejected while the volume is full; the
      run is cancelled natively twice (as a loop ending does) before the volume takes writes again. The next run sent
      the two poison events again and dead-lettered them again (``dead_lettered`` 12 for 10 poison events)."""
    model = await run_seed(seed, "spool", tmp_path)
    try:
        model.check()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{model.describe()}") from exc
