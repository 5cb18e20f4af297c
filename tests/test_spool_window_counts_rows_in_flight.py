"""Review of a flaky CI failure of the SQLite spool: ``test_a_backlog_is_not_loaded_into_memory_while_the_volume_is_full
[rejected]`` once found 300 resolutions waiting in memory where ``capacity + window`` (200) are allowed.

Not an unlucky sample: the spool's loading of a backlog did not bound what it held in memory as documented
(``spool_window``: rows of the spool held in memory at a time; the pause: loading only while at most ``capacity``
resolutions wait for a write), on two counts, each reproduced here without timing:

* The rows in flight (taken into batches, waiting for Lago's answer) were not counted against the window: a
  dispatcher that had taken its whole window into batches loaded a whole window more, so the rows of the spool in
  memory reached the window plus ``(concurrency + 1) * batch_size``, and, the volume full, the resolutions waiting
  for a write ``capacity`` plus that (300 for the test's 100 + 100 + 5 batches of 20).
* Two loads at once (the spool task's and the dispatcher's, or one waiting for a commit or the idle check to let go of
  the spool) each measured their room and the pause before waiting for the other: the second loaded a whole window
  more (twice the window in memory), even when the resolutions made meanwhile had paused the loading.

Both are driven directly on the spool (a load held in its worker thread by threading Events), and once through a
pipeline whose Lago holds every request until an anyio Event lets them through.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from lago_org_billing import _spool
from lago_org_billing._spool import SqliteOutbox
from test_delivery import events, make_client, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import park, rows
from test_spool_unwritten_events import Volume, _pipeline

pytestmark = pytest.mark.anyio


def _waiting(outbox: SqliteOutbox) -> int:
    """Resolutions (deletes, dead letters) waiting in memory for a write."""
    return len(outbox._to_delete) + len(outbox._to_dead)


def _held(outbox: SqliteOutbox) -> int:
    """Rows of the spool held in memory for delivery: in the window, or in flight."""
    return len(outbox.window) + outbox.in_flight


class HeldLoad:
    """Holds the spool's next read (``_SpoolFile.load``) in its worker thread until ``release`` (``entered`` set once
    it is there); the reads after it go through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hold_next = False
        self.entered = threading.Event()
        self.release = threading.Event()
        load = _spool._SpoolFile.load

        def held_load(file: Any, *args: Any) -> Any:
            if self.hold_next:
                self.hold_next = False
                self.entered.set()
                self.release.wait(10)
            return load(file, *args)

        monkeypatch.setattr(_spool._SpoolFile, "load", held_load)


async def _opened_backlog(path: Path, monkeypatch: pytest.MonkeyPatch, *, capacity: int) -> SqliteOutbox:
    """A 400-event backlog in the spool, its volume full, opened with a 100-row window."""
    await park(path, events(400, prefix="old"))
    volume = Volume(monkeypatch)
    volume.full = True
    outbox = SqliteOutbox(str(path), capacity=capacity, window=100)
    await outbox.open()
    return outbox


async def test_rows_in_flight_count_against_the_window_and_the_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """The dispatcher's moves, in the order that failed in CI: it loads, takes the whole window into batches, and
    loads again as its window runs low, before Lago answered those batches; the volume is full (every commit fails).
    The rows in flight are rows of the spool in memory: the window must not load past them, and the resolutions the
    backlog leaves waiting for a write stay within ``capacity + window`` (they reached 300)."""
    outbox = await _opened_backlog(tmp_path / "spool.db", monkeypatch, capacity=100)
    await outbox.fill()
    sent = outbox.take(1_000)
    assert len(sent) == 100
    await outbox.fill()  # every row loaded is in flight: the window is empty
    assert _held(outbox) <= 100, f"{_held(outbox)} rows of the spool in memory with a 100-row window"
    outbox.resolve(sent)
    await outbox.commit()  # (fails: the volume is full)
    for _ in range(10):
        await outbox.fill()
        sent = outbox.take(1_000)
        if not sent:
            break
        await outbox.fill()
        assert _held(outbox) <= 100, f"{_held(outbox)} rows of the spool in memory with a 100-row window"
        outbox.resolve(sent)
        await outbox.commit()
    assert not outbox.window and not outbox.in_flight
    assert 100 < _waiting(outbox) <= 200, f"{_waiting(outbox)} resolutions of the backlog wait in memory"
    assert rows(outbox.path) == 400  # (nothing written)
    assert await outbox.close() == 0


async def test_two_loads_at_once_do_not_load_twice_nor_past_the_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """The spool task's load holds the spool (its read held in its thread) while the dispatcher's load, which measured
    its room and the pause before, waits for it; meanwhile the batches in flight are resolved, more than ``capacity``
    of them: the second load must see the room the first one took and the pause, not load another window."""
    held = HeldLoad(monkeypatch)
    outbox = await _opened_backlog(tmp_path / "spool.db", monkeypatch, capacity=50)
    await outbox.fill()
    sent = outbox.take(1_000)
    assert len(sent) == 100
    outbox.resolve(sent[:50])  # 50 resolutions wait (the pause is at more than 50), 50 rows in flight
    held.hold_next = True
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.fill)  # (the spool task's)
        await anyio.to_thread.run_sync(held.entered.wait)
        tasks.start_soon(outbox.fill)  # (the dispatcher's: waits for the spool)
        await anyio.wait_all_tasks_blocked()
        outbox.resolve(sent[50:])  # 100 resolutions wait now: the loading is paused
        held.release.set()
    assert _held(outbox) <= 100, f"{_held(outbox)} rows of the spool in memory with a 100-row window"
    outbox.resolve(outbox.take(1_000))
    await outbox.commit()  # (fails)
    await outbox.fill()  # paused
    assert not outbox.window
    assert _waiting(outbox) <= 50 + 100, f"{_waiting(outbox)} resolutions of the backlog wait in memory"
    assert await outbox.close() == 0


class HeldLago(httpx.AsyncBaseTransport):
    """The emulator behind a front that holds every request (``waiting`` counts them) until :meth:`let_through` lets
    some go on, or :meth:`open` all, from then on."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.opened = False
        self.passes = 0
        self.waiting = 0
        self._changed = anyio.Event()

    def let_through(self, count: int) -> None:
        self.passes += count
        self._changed.set()
        self._changed = anyio.Event()

    def open(self) -> None:
        self.opened = True
        self.let_through(0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.waiting += 1
        while not self.opened and not self.passes:
            await self._changed.wait()
        self.waiting -= 1
        if not self.opened:
            self.passes -= 1
        return await self.inner.handle_async_request(request)


async def test_a_pipeline_loads_no_more_rows_while_its_batches_wait_for_lago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 400-event backlog, a 100-row window, batches of 20, 4 workers; Lago holds every request: the 4 workers and
    the dispatcher hold 5 batches, the whole window, in flight. The spool task's loads meanwhile (one per commit
    window) must not load more rows (they loaded a window more each time the window emptied). Lago then answers:
    the backlog is delivered, each event once, and the file is empty."""
    path = tmp_path / "spool.db"
    submitted = events(400, prefix="old")
    await park(path, submitted)
    fake = make_fake()
    lago = HeldLago(fake.transport())
    most = 0
    fills_all_in_flight = 0
    fill = SqliteOutbox.fill

    async def observed(outbox: SqliteOutbox) -> None:
        nonlocal most, fills_all_in_flight
        all_in_flight = outbox.in_flight == 100
        await fill(outbox)
        most = max(most, _held(outbox))
        fills_all_in_flight += all_in_flight and not lago.opened

    monkeypatch.setattr(SqliteOutbox, "fill", observed)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path, spool_window=100, batch_size=20, concurrency=4)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await until(lambda: fills_all_in_flight >= 2)  # (Lago holds them: nothing is answered meanwhile)
            assert most <= 100, f"{most} rows of the spool in memory with a 100-row window"
            lago.open()
            assert await pipeline.flush(20)
            await pipeline.aclose()
    delivered = transaction_ids(fake)
    assert sorted(delivered) == sorted(event["transaction_id"] for event in submitted)
    assert rows(path) == 0


async def test_a_backlog_drains_without_waiting_for_the_commit_window_when_in_flight_rows_fill_the_window(
    tmp_path: Path,
) -> None:
    """The window counting the rows in flight, a load that finds it full of them must not leave the dispatcher
    asleep until its timeout (four commit windows: hours here) once Lago answered them: the answers wake it to load.
    A 400-event backlog, a 100-row window, batches of 20 and a commit window of an hour; Lago holds the requests until
    the whole window is in flight, answers one (the dispatcher hands its last batch over and finds no room to load),
    then all: the backlog is all delivered (no flush pokes the dispatcher meanwhile)."""
    path = tmp_path / "spool.db"
    submitted = events(400, prefix="old")
    await park(path, submitted)
    fake = make_fake()
    lago = HeldLago(fake.transport())
    async with make_client(lago) as client:
        pipeline = _pipeline(client, path, spool_window=100, batch_size=20, concurrency=4, commit_window=3600)
        outbox = pipeline.outbox
        assert isinstance(outbox, SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await until(lambda: outbox.in_flight == 100 and lago.waiting == 4)
            lago.let_through(1)
            await until(lambda: outbox.in_flight == 80 and lago.waiting == 4 and not lago.passes)
            await anyio.wait_all_tasks_blocked()  # (the dispatcher tried to load, and waits)
            lago.open()
            await until(lambda: len(transaction_ids(fake)) == len(submitted), within=10)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == sorted(event["transaction_id"] for event in submitted)
    assert rows(path) == 0


async def test_a_one_row_window_loads_the_whole_backlog(tmp_path: Path) -> None:
    """``spool_window=1``: a load while its one row waits in the window found no room, read no row, and took that for
    the end of the file: the rest of the backlog was never loaded (delivered only after a restart)."""
    path = tmp_path / "spool.db"
    await park(path, events(3, prefix="old"))
    outbox = SqliteOutbox(str(path), window=1)
    await outbox.open()
    delivered = 0
    for _ in range(10):
        await outbox.fill()
        await outbox.fill()  # (the dispatcher's and the spool task's, the window full)
        items = outbox.take(1_000)
        if not items:
            break
        delivered += len(items)
        outbox.resolve(items)
        await outbox.commit()
    assert delivered == 3 and rows(path) == 0, f"{delivered} of 3 delivered, {rows(path)} left in the file"
    assert await outbox.close() == 0
