"""The SQLite spool's replayed dead letters, orphaned writes and dead-letter counts, as its failure paths run them
(the paused backlog loading, orphaned writes settled later, events of a failed write sent from memory, replays under
the I/O lock).

* A replayed dead letter whose write failed went back behind the events submitted during that write: the next write
  put the rows in the file out of id order, and the spool took the replayed row's (lower) id for the highest one
  written. Loading stopped there: the rows above it stayed in the file, undelivered until a later write or a restart
  (``flush()`` timed out with Lago up).
* A write orphaned by a native cancellation and failed (a full volume) was counted in the write-failure streak, and
  the commit settling it wrote again at once, counted a second time: the backoff doubled, the log said two attempts.
* Events dead-lettered as the spool wrote them (a builder that raised) by a commit other than the spool task's own
  (``EventPipeline.commit()``, the commit of a cancelled run) were missing from the ``dead_lettered`` stat.
* A pipeline run again while a write of its last loop is still running (orphaned by that loop's end) settles it:
  every event reaches Lago once, the file ends empty, whether that write succeeded or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from lago_org_billing import _spool
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._spool import DeadLetter, SqliteOutbox
from test_delivery import events, make_client, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import rows


class Volume:
    """The spool's volume: ``fail_next`` writes fail as on a full disk; with ``hold`` a write waits for ``release``
    (``entered`` set as it starts) before it fails or goes on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fail_next = 0
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()
        write = _spool._SpoolFile.write

        def write_on_the_volume(file: Any, *args: Any) -> Any:
            if self.hold:
                self.entered.set()
                self.release.wait(10)
            if self.fail_next:
                self.fail_next -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return write(file, *args)

        monkeypatch.setattr(_spool._SpoolFile, "write", write_on_the_volume)


async def _drain(outbox: SqliteOutbox) -> list[str]:
    """Deliver what the spool holds, as the pipeline does (load, take, resolve, commit); the transaction ids taken."""
    taken: list[str] = []
    for _ in range(50):
        await outbox.fill()
        items = outbox.take(100)
        if not items:
            break
        taken += [item.payload()["transaction_id"] for item in items]
        outbox.resolve(items)
        await outbox.commit()
    return taken


@pytest.mark.anyio
async def test_a_replayed_letter_whose_write_failed_does_not_strand_the_rows_written_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """A dead letter is replayed; the write of its event fails (the volume full for a moment) while five events are
    submitted. The next write stores all six: every one must then be delivered. Before the fix the rows were written
    out of id order (the replayed one last) and the spool loaded nothing past the first window: two stayed in the
    file, undelivered while Lago was up."""
    path = tmp_path / "spool.db"
    volume = Volume(monkeypatch)
    outbox = SqliteOutbox(str(path), window=4)
    await outbox.open()
    outbox.put(events(1, prefix="rejected")[0])
    await outbox.commit()
    await outbox.fill()
    [item] = outbox.take(10)
    outbox.dead(item, DeadLetter(item.payload(), "metric missing", 422, "validation_errors"))
    await outbox.commit()
    assert rows(path, "dead_letters") == 1
    assert await outbox.replay_dead(None) == 1

    volume.hold, volume.fail_next = True, 1
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.commit)
        await until(volume.entered.is_set)
        for event in events(5, prefix="new"):
            assert outbox.put(event)
        volume.hold = False
        volume.release.set()
    assert volume.fail_next == 0
    await outbox.commit()
    assert rows(path) == 6 and rows(path, "dead_letters") == 0

    taken = await _drain(outbox)
    assert sorted(taken) == ["new0", "new1", "new2", "new3", "new4", "rejected0"], taken
    assert outbox.unresolved() == 0 and rows(path) == 0
    assert await outbox.close() == 0


def test_a_failed_orphaned_write_counts_once_in_the_write_failure_streak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit natively cancelled during its write (its loop ends), that write failing on a full volume; the next
    loop's commit settles it: one failed attempt, the next one after the backoff. Before the fix the settling commit
    wrote again at once and the streak counted two failures (backoff doubled, the log saying two attempts). Its ten
    events are written by the last commit once the volume has room."""
    path = tmp_path / "spool.db"
    volume = Volume(monkeypatch)
    outbox = SqliteOutbox(str(path))

    async def first() -> None:
        await outbox.open()
        for event in events(10):
            assert outbox.put(event)
        volume.hold, volume.fail_next = True, 2
        asyncio.get_running_loop().create_task(outbox.commit())
        await until(volume.entered.is_set)  # the loop then ends: the commit is cancelled natively

    asyncio.run(first())
    assert outbox._orphan is not None
    volume.hold = False
    volume.release.set()

    async def second() -> None:
        await outbox.commit()  # settles the orphan: failed
        assert outbox._write_errors.count == 1
        assert outbox.unresolved() == 10
        volume.fail_next = 0
        assert await outbox.close() == 0

    asyncio.run(second())
    assert rows(path) == 10


def _raises() -> dict[str, Any]:
    raise RuntimeError("no such org")


@pytest.mark.anyio
async def test_events_dead_lettered_by_an_explicit_commit_are_counted(tmp_path: Path) -> None:
    """An event whose builder raises is dead-lettered as the spool writes it. Written by ``pipeline.commit()`` (not the
    spool task's commit window), it must still count in ``dead_lettered``; so must one written by the commit of a run
    cancelled without ``aclose``."""
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(tmp_path / "spool.db"), commit_window=3600)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            assert pipeline.submit(_raises)
            await pipeline.commit()
            assert len(pipeline.dead_letters()) == 1
            assert pipeline.stats["dead_lettered"] == 1
            assert pipeline.submit(_raises)
            tasks.cancel_scope.cancel()  # the run's own last commit writes it
        assert len(pipeline.dead_letters()) == 2
        assert pipeline.stats["dead_lettered"] == 2
        await pipeline.aclose()


@pytest.mark.parametrize("write_fails", [False, True])
def test_a_run_restarted_while_an_orphaned_write_still_runs_delivers_every_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None, write_fails: bool
) -> None:
    """Loop one runs the pipeline (five events delivered), then ends while a commit of ten more events is being written
    (natively cancelled: an orphan). Loop two runs the same pipeline again before that write is over (it finishes, or
    fails, once the new run is up). Each of the fifteen events reaches Lago once, and the spool ends empty."""
    path = tmp_path / "spool.db"
    volume = Volume(monkeypatch)
    fake = make_fake()
    client = make_client(fake.transport())
    pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.0, commit_window=0.01)
    outbox = pipeline.outbox
    assert isinstance(outbox, SqliteOutbox)

    async def first() -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(5, prefix="before"):
                pipeline.submit(event)
            assert await pipeline.flush(10)
            tasks.cancel_scope.cancel()
        for event in events(10, prefix="orphan"):
            assert pipeline.submit(event)
        volume.hold, volume.fail_next = True, int(write_fails)
        asyncio.get_running_loop().create_task(outbox.commit())
        await until(volume.entered.is_set)  # the loop then ends: the commit is cancelled natively

    asyncio.run(first())
    assert outbox._orphan is not None
    volume.hold = False

    async def second() -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)  # the orphaned write still runs
            assert outbox._orphan is not None
            volume.release.set()
            assert await pipeline.flush(10)
            await pipeline.aclose()
        await client.aclose()

    asyncio.run(second())
    sent = transaction_ids(fake)
    assert len(sent) == len(set(sent)) == 15, sorted(sent)
    assert pipeline.stats["delivered"] == 15 and pipeline.stats["duplicates"] == 0
    assert rows(path) == 0


@pytest.mark.anyio
async def test_a_commit_asked_for_while_one_is_writing_is_made_next_not_a_commit_window_later(tmp_path: Path) -> None:
    """The dispatcher asks the spool task for a commit when loading waits on one (a backlog through a small memory
    window). Asked while a commit is being written, the request was dropped: the spool task made a fresh request
    event after that commit, and the next commit waited the whole commit window (an hour here)."""
    fake = make_fake()
    pipeline = EventPipeline(make_client(fake.transport()), spool_path=str(tmp_path / "spool.db"), commit_window=3600)
    commits = 0
    commit = pipeline.outbox.commit

    async def counted_commit() -> None:
        nonlocal commits
        commits += 1
        if commits == 1:
            assert pipeline._kick is not None
            pipeline._kick.set()  # the dispatcher asking, while this commit writes
        await commit()

    pipeline.outbox.commit = counted_commit  # type: ignore[method-assign]
    async with anyio.create_task_group() as tasks:
        await tasks.start(pipeline.run)
        await until(lambda: pipeline._kick is not None)
        assert pipeline._kick is not None
        pipeline._kick.set()  # the first commit, asked for
        await until(lambda: commits >= 2)
        await pipeline.aclose()


@pytest.mark.anyio
async def test_loading_waits_for_a_failing_write_of_the_rows_resolved_before_counting_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """Loading pauses while more rows are resolved than a commit has recorded (a full volume). A load asked for while
    a write carries those resolutions counted none (the write had taken them), waited for the write, and loaded once it
    failed and gave them back: a backlog went into memory a window at a time past the outbox's capacity."""
    path = tmp_path / "spool.db"
    volume = Volume(monkeypatch)
    outbox = SqliteOutbox(str(path), capacity=10, window=20)
    await outbox.open()
    backlog = events(60, prefix="old")
    for start in range(0, 60, 10):  # (10 at a time: the capacity)
        assert all(outbox.put(event) for event in backlog[start : start + 10])
        await outbox.commit()
    await outbox.fill()
    outbox.resolve(outbox.take(11))  # 11 delivered: more than the capacity wait for a write
    loaded = outbox._loaded_upto
    volume.hold, volume.fail_next = True, 1
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.commit)
        await until(volume.entered.is_set)
        tasks.start_soon(outbox.fill)  # asked while the write carries the 11 resolutions
        await until(lambda: outbox._io is not None and outbox._io.statistics().tasks_waiting == 1)
        volume.hold = False
        volume.release.set()
    assert volume.fail_next == 0  # (the write failed: the 11 resolutions wait again)
    assert len(outbox._to_delete) == 11
    assert outbox._loaded_upto == loaded, "rows were loaded while more than the capacity of resolutions waited"
    await outbox.commit()  # the volume takes writes again: recorded, and loading goes on
    await outbox.fill()
    assert outbox._loaded_upto > loaded
    assert await outbox.close() == 0


@pytest.mark.anyio
async def test_a_replayed_letter_purged_before_its_write_is_not_sent(tmp_path: Path) -> None:
    """A running pipeline replays two dead letters (``EventPipeline.replay_dead_letters``); before its next commit
    writes them back among the events, another process deletes one (``dead-letters --purge --yes``, which promises
    Lago never gets it, or a ``--replay`` that sent it already). That letter's event is not written nor sent: the
    other one is. Before the fix the commit deleted nothing for it and wrote its event anyway: sent after a purge, or
    twice after a replay."""
    path = tmp_path / "spool.db"
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    for event in events(2, prefix="rejected"):
        outbox.put(event)
    await outbox.commit()
    await outbox.fill()
    for item in outbox.take(10):
        outbox.dead(item, DeadLetter(item.payload(), "metric missing", 422, "validation_errors"))
    await outbox.commit()
    assert rows(path, "dead_letters") == 2
    assert await outbox.replay_dead(None) == 2

    # the CLI's purge of one of them, meanwhile (closed: ``with`` on a connection only commits, and one left to the
    # garbage collector holds the file's descriptors until then, and is a ResourceWarning from Python 3.13)
    with contextlib.closing(sqlite3.connect(path)) as other, other:
        purged = other.execute("SELECT id, body FROM dead_letters ORDER BY id LIMIT 1").fetchone()
        other.execute("DELETE FROM dead_letters WHERE id = ?", (purged[0],))
    await outbox.commit()
    assert rows(path, "dead_letters") == 0
    taken = await _drain(outbox)
    assert taken == ["rejected1"], taken
    assert outbox.unresolved() == 0 and rows(path) == 0
    assert await outbox.close() == 0
