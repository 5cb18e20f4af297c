"""The durable SQLite spool in one process, against a damaged row, a busy thread pool and settings that cannot work:

* one row of the file whose text is no UTF-8 (a bit flipped on disk, a `.recover`ed file) must not stop every delivery,
  nor one dead letter's text the listing and replay of the dead letters;
* the spool's thread work must not queue behind the app's sync endpoints on anyio's default thread limiter;
* a drop with a spool must not advise setting LAGO_SPOOL_PATH nor blame Lago;
* LAGO_SPOOL_PATH ending with "/" must not make a file of the directory's name;
* a commit window of a microsecond (a spinning loop) is refused.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from lago_org_billing import BillingSettings, ConfigurationError
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._spool import SqliteOutbox, dumps_event
from test_delivery import events, make_client, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import park, rows

pytestmark = pytest.mark.anyio


async def within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (polled: it changes in worker threads). Not a failure raised
    inside the task group: the tests say what did not happen after it."""
    with anyio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 - polled: the condition changes in worker threads
            await anyio.sleep(0.01)
        return True
    return False


async def test_a_row_whose_text_rotted_into_invalid_utf8_does_not_stop_every_delivery(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    await park(path, events(3))
    data = path.read_bytes()
    assert data.count(b'"tx1"') == 1
    path.write_bytes(data.replace(b'"tx1"', b'"t\xf81"'))  # one bit flipped on disk: 'x' (0x78) -> 0xf8
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # (SQLite sees nothing wrong)
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in events(2, prefix="new"):
                pipeline.submit(event)
            delivered = await pipeline.flush(5)
            await pipeline.aclose(timeout=0)
    assert sorted(transaction_ids(fake)) == ["new0", "new1", "tx0", "tx2"]
    assert delivered
    assert pipeline.stats["dead_lettered"] == 1
    assert rows(path) == 0
    [letter] = pipeline.dead_letters()
    assert "not UTF-8 text (damaged on disk?)" in letter.reason
    assert letter.code == "invalid_event" and letter.status is None
    assert '"t\\xf81"' in letter.event["body"]  # its text, the bad byte escaped
    assert not letter.replayable


async def test_a_dead_letter_whose_text_rotted_into_invalid_utf8_does_not_stop_listing_nor_replaying(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    await park(path, events(1, prefix="parked"))
    [event] = events(1, prefix="letter")
    good = dumps_event(event)
    assert good.count('"letter0"') == 1
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "INSERT INTO dead_letters(body, reason, status, code, created_at) VALUES (CAST(? AS TEXT), ?, 422, ?, 0)",
            (good.replace('"letter0"', '"lett\xe5r0"').encode("latin-1"), "rejected", "invalid"),
        )
        conn.execute(
            "INSERT INTO dead_letters(body, reason, status, code, created_at) VALUES (?, 'rejected', 422, ?, 0)",
            (good, "invalid"),
        )
        conn.commit()
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        rotted, whole = pipeline.dead_letters()
        assert rotted.event == {"body": good.replace('"letter0"', '"lett\\xe5r0"')} and not rotted.replayable
        assert whole.replayable
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            assert await pipeline.replay_dead_letters() == 1
            assert await pipeline.flush(5)
            await pipeline.aclose()
        [left] = pipeline.dead_letters()
    assert sorted(transaction_ids(fake)) == ["letter0", "parked0"]
    assert left.id == rotted.id


async def test_events_are_made_durable_and_delivered_while_the_apps_sync_endpoints_hold_every_worker_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    fake = make_fake()
    release = threading.Event()
    limiter = anyio.to_thread.current_default_thread_limiter()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            try:
                # Starlette / FastAPI run sync endpoints with anyio's default limiter (40 threads): a slow database
                # under load keeps every one of them busy, with more requests queued behind
                for _ in range(int(limiter.total_tokens) + 5):
                    tg.start_soon(anyio.to_thread.run_sync, release.wait)
                await until(lambda: limiter.borrowed_tokens == limiter.total_tokens)
                for event in events(10):
                    assert pipeline.submit(event)
                # the spool's group commit (default 50 ms) and then its delivery: not after the app's backlog
                durable = await within(5, lambda: rows(path) + len(fake.events) >= 10)
                delivered = await within(5, lambda: len(fake.events) == 10)
            finally:
                release.set()
            await pipeline.aclose()
    assert durable, "the events were not written to the spool while the app's sync endpoints held the threads"
    assert delivered, "the events were not delivered while the app's sync endpoints held the threads"
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(10))


async def test_a_drop_with_a_spool_does_not_advise_setting_the_spool_nor_blame_lago(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        # the events waiting for the spool's next commit fill memory_capacity (a commit stalled: no worker thread, a
        # volume that cannot be written, a burst within one commit window); Lago has not failed once
        pipeline = EventPipeline(client, spool_path=str(tmp_path / "spool.db"), memory_capacity=2)
        with caplog.at_level(logging.ERROR, logger="lago_org_billing"):
            assert [pipeline.submit(event) for event in events(3)] == [True, True, False]
        await pipeline.aclose()
    [record] = [r for r in caplog.records if "Dropping" in r.getMessage()]
    assert "set LAGO_SPOOL_PATH" not in record.getMessage(), record.getMessage()
    assert "Lago is slow or down" not in record.getMessage(), record.getMessage()


async def test_a_spool_path_ending_with_a_slash_is_not_made_a_file_of_the_directorys_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meant = tmp_path / "billing"  # LAGO_SPOOL_PATH=/var/lib/app/billing/: a directory, not made yet
    monkeypatch.setenv("LAGO_API_KEY", "test-key")
    monkeypatch.setenv("LAGO_SPOOL_PATH", f"{meant}/")
    try:
        settings = BillingSettings.from_env()
        assert settings.spool_path is not None
        outbox = SqliteOutbox(settings.spool_path)
        await outbox.open()
        await outbox.close()
    except ConfigurationError as exc:  # refused, saying to name a file: fine
        assert "LAGO_SPOOL_PATH" in str(exc)
    assert not meant.is_file(), "a SQLite file was made where the directory was meant"
    async with make_client(make_fake().transport()) as client:
        with pytest.raises(ConfigurationError, match="names a directory"):
            EventPipeline(client, spool_path=f"{meant}/")


async def test_a_commit_window_too_short_to_be_a_window_is_refused(tmp_path: Path) -> None:
    # 1 microsecond: the idle spool task and dispatcher spin, ~100% of a core (measured: 0.997 CPU s per second idle;
    # 0.0065 at the default 50 ms), and every event is its own fsync'd transaction
    async with make_client(make_fake().transport()) as client:
        with pytest.raises(ConfigurationError, match="commit_window"):
            EventPipeline(client, spool_path=str(tmp_path / "spool.db"), commit_window=1e-6)
        EventPipeline(client, spool_path=str(tmp_path / "spool.db"), commit_window=0.001)  # (a millisecond: taken)
