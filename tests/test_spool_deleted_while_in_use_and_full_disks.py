"""Review of the SQLite spool when its disk misbehaves at runtime, after a clean start.

* The spool file is deleted while the app runs (``rm spool.db*``, its directory removed by a deploy or a cleanup):
  SQLite keeps writing to the unlinked file, so every event "made durable" from then on, and the backlog the file
  held, vanish at the next shutdown or crash, while the pipeline says they "stay in the spool". The spool must notice,
  say so, and make its file again at ``LAGO_SPOOL_PATH`` with everything the old one held.
* The ``-wal`` file is deleted while the app runs: SQLite keeps committing to the unlinked WAL, and a crash loses
  every event committed since the last checkpoint. The spool must notice and make the WAL again (its events in the
  database file).
* Around those: the slot's lock taken again when its lock file went too (no second process on the same file); a
  deleted file's -wal and -shm left at the path never replayed into the new file; a file put in place of the spool
  left for the next start to adopt (this process moves to a slot of its own); a spool that cannot be made again fails
  its writes visibly (events sent from memory), recovers without a restart, and at shutdown counts what it lost.
* A real full volume (SQLite's ``database or disk is full``, made with ``PRAGMA max_page_count``, not a patched write):
  events go on to Lago from memory, the failure shows in ``spool_write_failing``, and once there is room again they are
  written without a restart, then each delivered once.
* A Lago outage of many commits does not grow the WAL without bound (checkpoints go on while nothing is delivered).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from lago_org_billing import _spool
from lago_org_billing._delivery import EventPipeline
from test_delivery import events, make_client, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import rows
from test_spool_unwritten_events import Switch

pytestmark = pytest.mark.anyio


def _pipeline(client: Any, path: Path, **options: Any) -> EventPipeline:
    return EventPipeline(
        client, spool_path=str(path), flush_interval=0.0, retry_backoff=0.001, max_backoff=0.02, **options
    )


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(f"{path}{suffix}")
        except FileNotFoundError:
            pass


def _size(name: str | Path) -> int:
    """The file's size, -1 when there is none."""
    try:
        return os.stat(name).st_size
    except FileNotFoundError:
        return -1


async def _spooled(pipeline: EventPipeline, outbox: _spool.SqliteOutbox, count: int, prefix: str) -> None:
    for event in events(count, prefix=prefix):
        assert pipeline.submit(event)
    await pipeline.commit()
    assert not outbox.pending


async def test_a_spool_file_deleted_while_in_use_is_made_again_with_every_event(tmp_path: Path) -> None:
    """``rm spool.db*`` while Lago is down and the app runs: the backlog of the deleted file and the events committed
    after it must be in a file at LAGO_SPOOL_PATH (what the next start delivers), not in an unlinked inode that
    vanishes with the process; each reaches Lago once."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 5, "before")
            assert rows(path) == 5
            _remove(path)
            await _spooled(pipeline, outbox, 3, "after")
            assert path.exists(), "the spool file was not made again: its events are in a deleted file"
            assert rows(path) == 8
            assert os.stat(path).st_mode & 0o777 == 0o600
            await pipeline.aclose(timeout=0)
        assert rows(path) == 8
        lago.down = False
        again = _pipeline(client, path)
        async with anyio.create_task_group() as tasks:
            await tasks.start(again.run)
            assert await again.flush(10)
            await again.aclose()
    assert sorted(transaction_ids(fake)) == sorted([f"before{i}" for i in range(5)] + [f"after{i}" for i in range(3)])
    assert rows(path) == 0


async def test_a_spool_directory_removed_while_idle_keeps_its_backlog_at_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The spool's directory is removed (a deploy wiping it) while Lago is down and no event comes: shutdown says the
    events "stay in the spool"; they must, in a file at LAGO_SPOOL_PATH (its directory made again), and the removal
    is said at ERROR."""
    directory = tmp_path / "state"
    path = directory / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 4, "tx")
            shutil.rmtree(directory)
            await pipeline.aclose(timeout=0)
    assert path.exists(), "shutdown left the backlog in a deleted file"
    assert rows(path) == 4
    assert pipeline.stats["lost_at_shutdown"] == 0
    assert any(
        record.levelname == "ERROR" and "deleted" in record.getMessage() and str(path) in record.getMessage()
        for record in caplog.records
    ), [record.getMessage() for record in caplog.records]


async def test_a_wal_file_deleted_while_in_use_is_made_again(tmp_path: Path) -> None:
    """``rm spool.db-wal`` while the app runs (Lago down): the events committed since must be in the files at the
    path (what a crash leaves), not in the unlinked WAL only."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 5, "before")
            os.remove(f"{path}-wal")
            await _spooled(pipeline, outbox, 3, "after")
            assert _size(f"{path}-wal") >= 0
            # what another process (the next start, after a kill -9) reads from the files at the path
            copy = tmp_path / "copy.db"
            shutil.copyfile(path, copy)
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
            assert rows(copy) == 8
            lago.down = False
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == sorted([f"before{i}" for i in range(5)] + [f"after{i}" for i in range(3)])


async def test_a_really_full_volume_sends_from_memory_and_writes_once_there_is_room(
    tmp_path: Path, no_write_backoff: None
) -> None:
    """SQLite's own ``database or disk is full`` (the file at its page limit): events keep being accepted, the failure
    shows in ``spool_write_failing``, and once there is room again they are written without a restart, then each
    delivered once."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 2, "first")
            conn = outbox.file.conn
            assert conn is not None
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            with outbox.file.lock:
                conn.execute(f"PRAGMA max_page_count={pages}")
            big = [dict(event, properties={"blob": "x" * 5000}) for event in events(20, prefix="full")]
            for event in big:
                assert pipeline.submit(event)
            await until(lambda: pipeline.stats["spool_write_failing"] == 1 and pipeline.stats["spool_unwritten"] == 20)
            assert rows(path) == 2
            with outbox.file.lock:
                conn.execute("PRAGMA max_page_count=1073741823")
            await until(lambda: rows(path) == 22)
            await until(lambda: pipeline.stats["spool_write_failing"] == 0)  # (said once the loop hears of it)
            lago.down = False
            assert await pipeline.flush(10)
            await pipeline.aclose()
    sent = transaction_ids(fake)
    assert sorted(sent) == sorted([f"first{i}" for i in range(2)] + [f"full{i}" for i in range(20)])
    assert rows(path) == 0
    assert pipeline.stats["lost_at_shutdown"] == 0


async def test_the_wal_stays_bounded_through_a_long_outage(tmp_path: Path) -> None:
    """Lago down for many commit windows: the backlog grows the database file, not the WAL (checkpoints go on)."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            page = 4096
            largest = 0
            for round_ in range(60):
                for event in events(50, prefix=f"r{round_}-"):
                    pipeline.submit(dict(event, properties={"blob": "y" * 2000}))
                await pipeline.commit()
                largest = max(largest, _size(f"{path}-wal"))
            assert rows(path) == 3000
            # SQLite checkpoints every 1,000 pages: the WAL never holds the whole backlog (~6.5 MB here)
            assert largest <= 1100 * (page + 24), largest
            assert path.stat().st_size > 6_000_000
            await pipeline.aclose(timeout=0)
    assert rows(path) == 3000
    with contextlib.closing(sqlite3.connect(path)) as conn:  # (left open: a ResourceWarning from Python 3.13)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_a_spool_made_again_keeps_its_slot_from_another_process(tmp_path: Path) -> None:
    """The directory removed (the slot's lock file with it): once the spool is made again, a process starting then
    (here a second pipeline: a lock is per open file) must not take the same slot file and write the same ids."""
    directory = tmp_path / "state"
    path = directory / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        first = _pipeline(client, path)
        outbox = first.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(first.run)
            await _spooled(first, outbox, 2, "a")
            shutil.rmtree(directory)
            await _spooled(first, outbox, 2, "b")
            second = _pipeline(client, path)
            second_outbox = second.outbox
            assert isinstance(second_outbox, _spool.SqliteOutbox)
            await tasks.start(second.run)
            assert second.spool_file != first.spool_file
            await _spooled(second, second_outbox, 2, "c")
            lago.down = False
            assert await first.flush(10)
            assert await second.flush(10)
            await second.aclose()
            await first.aclose()
    assert sorted(transaction_ids(fake)) == ["a0", "a1", "b0", "b1", "c0", "c1"]


async def test_a_spool_that_cannot_be_made_again_fails_its_writes_loudly_and_recovers(
    tmp_path: Path, no_write_backoff: None
) -> None:
    """The directory removed and a file put in its place: the spool cannot be made again. Its writes fail visibly
    (``spool_write_failing``), events go on to Lago from memory, and once the path is usable again the spool is made
    again with everything, without a restart."""
    directory = tmp_path / "state"
    path = directory / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 3, "old")
            shutil.rmtree(directory)
            directory.write_text("not a directory")
            for event in events(2, prefix="new"):
                assert pipeline.submit(event)
            await until(lambda: pipeline.stats["spool_write_failing"] == 1 and pipeline.stats["spool_unwritten"] == 2)
            directory.unlink()
            await until(lambda: path.exists() and rows(path) == 5)
            # (the rows are in the file a moment before the write's thread hands its outcome back to the loop)
            await until(lambda: pipeline.stats["spool_write_failing"] == 0)
            lago.down = False
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == ["new0", "new1", "old0", "old1", "old2"]


async def test_a_deleted_spool_that_cannot_be_made_again_at_shutdown_counts_its_events_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown with the spool deleted and its path unusable: its backlog is lost, counted in ``lost_at_shutdown`` and
    said at ERROR, not said to "stay in the spool"."""
    directory = tmp_path / "state"
    path = directory / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 3, "old")
            shutil.rmtree(directory)
            directory.write_text("not a directory")
            await pipeline.aclose(timeout=0)
    assert pipeline.stats["lost_at_shutdown"] == 3
    messages = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert any("3 undelivered events it held are lost" in message for message in messages), messages
    assert not any("stay in the spool" in record.getMessage() for record in caplog.records)


async def test_a_wal_that_cannot_be_made_again_at_once_is_made_at_the_next_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """The -wal file deleted, and the spool cannot be opened again at first (the volume full as it makes the new WAL):
    the write fails visibly, the pipeline goes on (no read or write dies on a closed connection), and the next attempt
    opens it again, with every event."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    connect = _spool._SpoolFile._connect
    failures = []

    def connect_on_a_full_volume(file: Any) -> sqlite3.Connection:
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database or disk is full")
        return connect(file)

    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 3, "before")
            monkeypatch.setattr(_spool._SpoolFile, "_connect", connect_on_a_full_volume)
            os.remove(f"{path}-wal")
            for event in events(2, prefix="after"):
                assert pipeline.submit(event)
            await until(lambda: bool(failures) and rows(path) == 5)
            # (the rows are in the file once the worker thread commits them; the write is said to succeed, and the
            # failing flag cleared, once the event loop hears of it: waited for, not read at once)
            await until(lambda: pipeline.stats["spool_write_failing"] == 0)
            lago.down = False
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == ["after0", "after1", "before0", "before1", "before2"]
    assert rows(path) == 0


async def test_only_the_database_file_deleted_leaves_no_stale_wal_in_the_new_one(tmp_path: Path) -> None:
    """``rm spool.db`` (its -wal and -shm left behind): the file made again must not start from the deleted file's WAL
    and index (SQLite would replay the old frames into it); it holds every event, and is sound."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 4, "before")
            os.remove(path)
            for round_ in range(3):
                await _spooled(pipeline, outbox, 2, f"after{round_}-")
            assert rows(path) == 10
            await pipeline.aclose(timeout=0)
    with contextlib.closing(sqlite3.connect(path)) as conn:  # (left open: a ResourceWarning from Python 3.13)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 10


async def test_a_spool_file_replaced_while_in_use_moves_to_a_slot_of_its_own(tmp_path: Path) -> None:
    """The file at LAGO_SPOOL_PATH replaced while in use (an old copy put back over it): this process's events go to a
    slot file of their own, the file put there is left for the next start to adopt, and that start delivers both."""
    path = tmp_path / "spool.db"
    other = tmp_path / "other.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await _spooled(pipeline, outbox, 2, "mine")
            with sqlite3.connect(other) as conn:  # an "old copy": a spool holding one event
                conn.executescript(_spool._SCHEMA)
                conn.execute("INSERT INTO events(id, body) VALUES (1, ?)", (_spool.dumps_event(events(1, "copy")[0]),))
            conn.close()
            os.replace(other, path)
            await _spooled(pipeline, outbox, 1, "later")
            assert pipeline.spool_file == f"{path}.1"
            assert rows(f"{path}.1") == 3
            assert rows(path) == 1
            await pipeline.aclose(timeout=0)
        lago.down = False
        again = _pipeline(client, path)
        async with anyio.create_task_group() as tasks:
            await tasks.start(again.run)
            assert await again.flush(10)
            await again.aclose()
    assert sorted(transaction_ids(fake)) == ["copy0", "later0", "mine0", "mine1"]


async def test_a_spool_deleted_while_idle_is_made_again_before_the_next_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago down, no traffic, and the spool deleted: the backlog lived on only in the unlinked file until the next
    event came (a ``kill -9`` meanwhile lost it all). An idle spool checks its files about once a second and makes
    itself again at its path with its backlog."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            lago.down = True
            await _spooled(pipeline, outbox, 5, "idle")
            _remove(path)
            outbox._checked_at = 0.0  # (the check due now: not a second from now)
            await outbox.commit()  # nothing to write: the idle check
            assert path.exists(), "the backlog stayed in the deleted file until the next write"
            assert rows(path) == 5
            lago.down = False
            await pipeline.flush(10)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == sorted(f"idle{i}" for i in range(5))
