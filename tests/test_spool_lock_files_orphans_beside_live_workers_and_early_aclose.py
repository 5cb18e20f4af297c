"""The SQLite spool shared by several processes: slots, their lock files, orphans, and a shutdown that comes
while the spool is still opening.

Two ``SqliteOutbox`` (or pipelines) of this process on one path behave as two worker processes do: a slot's ``flock``
belongs to the open file description, so a second opening of the same lock file conflicts as another process's would.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from lago_org_billing._delivery import EventPipeline
from lago_org_billing._spool import SqliteOutbox
from test_delivery import events, make_client, make_fake
from test_spool import rows

pytestmark = pytest.mark.anyio


def _query(path: Path | str, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def _spool_with_wal(where: Path, count: int) -> Path:
    """A spool as a crash leaves it: ``count`` committed events in its -wal file, not yet checkpointed into its
    database file (copies of the three files of a spool open in this process)."""
    live = where / "live" / "spool.db"
    outbox = SqliteOutbox(str(live))
    await outbox.open()
    for event in events(count, prefix="walled"):
        assert outbox.put(event)
    await outbox.commit()
    copy = where / "spool.db"
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(f"{live}{suffix}", f"{copy}{suffix}")
    await outbox.close()
    return copy


# ------------------------------------------------------------------------------------------ a slot's lock file


async def test_a_slot_whose_lock_file_was_removed_is_not_shared_with_the_next_worker(tmp_path: Path) -> None:
    """``rm spool.db*.lock`` ("stale lock files"), or a tmp cleaner removing the never-modified lock file, while worker
    A uses slot 0: A writes on, then worker B starts. B took slot 0 too (a new lock file, free), and the two processes
    wrote one SQLite file: each loaded and sent the other's rows (both delivering, and deleting, the same events), and
    A's next writes failed with ``IntegrityError: UNIQUE constraint failed: events.id`` ("please report it"), its
    events held in memory only. Each slot file must have one owner: B takes a slot of its own."""
    path = str(tmp_path / "spool.db")
    first, second = SqliteOutbox(path), SqliteOutbox(path)
    await first.open()
    try:
        for event in events(3, prefix="a"):
            assert first.put(event)
        await first.commit()
        os.remove(path + ".lock")
        for event in events(2, prefix="a-after"):  # A goes on writing after its lock file went
            assert first.put(event)
        await first.commit()
        assert first._write_errors.count == 0
        await second.open()
        try:
            assert second.path != first.path, "a second worker opened the slot file another live worker writes"
            assert second.spool_depth() == 0  # none of A's rows are B's to send
            for event in events(2, prefix="b"):
                assert second.put(event)
            await second.commit()
            for event in events(2, prefix="a-later"):
                assert first.put(event)
            await first.commit()
            assert first._write_errors.count == 0 and second._write_errors.count == 0
            assert not first._unwritten  # A's events are on disk, not in memory only
        finally:
            await second.close()
    finally:
        await first.close()
    assert rows(path) == 7


# ------------------------------------------------------------------------------------- orphans beside a live worker


async def test_a_worker_starting_beside_a_live_one_skips_an_orphan_slot_whose_database_is_gone_but_wal_stayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker 1 died and its ``spool.db.1`` was deleted (or emptied), its -wal kept: a process starting alone leaves
    that orphan untouched, says so and starts (tests/test_http1_early_answers_and_spool_wal_leftovers.py). A process
    starting while slot 0 is held (``uvicorn --workers 4``: workers 1, 2 and 3) tried slot 1 as its own and refused to
    start: every worker but one failed its startup until an operator intervened. It must start as the lone process
    does, on a slot of its own, leaving the orphan and its -wal untouched and said at ERROR."""
    walled = await _spool_with_wal(tmp_path / "crashed", 4)
    path = tmp_path / "spool.db"
    orphan = Path(f"{path}.1")
    for suffix in ("-wal", "-shm"):
        shutil.copyfile(f"{walled}{suffix}", f"{orphan}{suffix}")
    wal_before = _read(f"{orphan}-wal")
    live = SqliteOutbox(str(path))
    await live.open()  # worker 0
    try:
        starting = SqliteOutbox(str(path))
        with caplog.at_level(logging.ERROR, logger="lago_org_billing.delivery"):
            await starting.open()  # raised ConfigurationError ("its write-ahead log ... spool.db.1-wal")
        try:
            assert starting.path not in (str(path), str(orphan))
        finally:
            await starting.close()
    finally:
        await live.close()
    assert _read(f"{orphan}-wal") == wal_before and not _exists(orphan)
    assert any(f"{orphan}-wal" in record.getMessage() for record in caplog.records if record.levelname == "ERROR")
    _write(orphan, _read(walled))  # its database file restored: its events are all there
    assert rows(orphan) == 4


async def test_an_orphan_slot_file_that_is_another_programs_database_is_left_untouched(tmp_path: Path) -> None:
    """A file named like a slot (``spool.db.1``) that is no spool (another program's database, with an ``events`` table
    of ``body`` texts) is refused as a slot of one's own (``_NotASpool``), yet was then adopted: its rows went to the
    spool to be sent to Lago as billing events, and the other program's database was deleted. The spool promises such
    a file is left untouched."""
    path = tmp_path / "spool.db"
    other = Path(f"{path}.1")
    conn = sqlite3.connect(other)
    try:
        conn.executescript(
            """
            CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);
            CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
            INSERT INTO users(email) VALUES ('a@example.com');
            INSERT INTO events(body) VALUES ('{"kind": "signup"}'), ('{"kind": "login"}');
            """
        )
        conn.commit()
    finally:
        conn.close()
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    try:
        assert outbox.adopted == 0 and outbox.spool_depth() == 0
    finally:
        await outbox.close()
    assert _exists(other)
    assert _query(other, "SELECT email FROM users") == [("a@example.com",)]
    assert len(_query(other, "SELECT * FROM events")) == 2


# ------------------------------------------------------------------------------------------ shutdown while opening


async def test_aclose_while_the_spool_is_still_opening_stops_the_run(tmp_path: Path) -> None:
    """``tg.start_soon(pipeline.run)`` then ``aclose()`` while the spool opens in its worker thread (a slow disk, a
    large orphan being adopted): ``aclose`` failed with a bare ``AssertionError`` (``self._scope is not None``), and the
    run went on once the spool had opened, holding its slot, never closed. It must stop the run and close the
    spool."""
    path = tmp_path / "spool.db"
    entered, release = threading.Event(), threading.Event()
    async with make_client(make_fake().transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        file = pipeline.outbox.file  # type: ignore[attr-defined]
        opening = file.open

        def slow_open() -> Any:
            entered.set()
            release.wait(10)
            return opening()

        file.open = slow_open
        errors: list[BaseException] = []
        running_after_aclose: list[bool] = []

        async def close() -> None:
            # the opening thread is let go, and aclose() called at once: the run, a task of this loop, learns that the
            # spool is open only once this task yields (aclose's first wait)
            release.set()
            try:
                await pipeline.aclose()
            except Exception as exc:  # (the AssertionError, kept to be asserted below)
                errors.append(exc)
            running_after_aclose.append(pipeline._running)
            tg.cancel_scope.cancel()  # (a run that outlived aclose() would otherwise run on for ever)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipeline.run)
                await anyio.to_thread.run_sync(entered.wait)
                tg.start_soon(close)
    assert errors == [], errors
    assert running_after_aclose == [False]  # aclose() returned with the run stopped
    assert file.conn is None and file._lock_fd is None  # the slot is let go


def _read(path: str | Path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _write(path: str | Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)


def _exists(path: str | Path) -> bool:
    return os.path.exists(path)
