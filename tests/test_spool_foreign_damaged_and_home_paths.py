"""Review of the durable spool under hostile conditions: a ``LAGO_SPOOL_PATH`` that names another program's SQLite
database (or a spool of another schema), a damaged spool file, and a path written with ``~``.

"No data is lost": a file the spool cannot use is refused at start with a clear error that says what to do, and is
left untouched (its rows never sent to Lago and deleted, no table or journal mode of ours put into it); a damaged spool
says it is damaged and how to recover its events, not merely "use another path" (which would abandon them)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import anyio
import pytest

from lago_org_billing import ConfigurationError
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._spool import SqliteOutbox
from test_delivery import events, make_client, make_fake, transaction_ids

pytestmark = pytest.mark.anyio


def _database(path: Path, script: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(script)
        conn.commit()
    finally:
        conn.close()


def _tear(path: Path) -> None:
    """The file torn by a failing disk: its second half gone."""
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


def _tables(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"))
    finally:
        conn.close()


def _query(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


_APP_DATABASES = {
    # an app's own database whose ``events`` table is not a spool's (no ``body``): the spool read and wrote nothing,
    # and said "free space on its volume" while every event waited in memory only
    "events without a body": """
        CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);
        CREATE TABLE events (id INTEGER PRIMARY KEY, name TEXT NOT NULL, at TEXT);
        INSERT INTO users(email) VALUES ('a@example.com');
        INSERT INTO events(name, at) VALUES ('signup', '2024-01-01'), ('login', '2024-01-02');
    """,
    # an app's audit log shaped like a spool: its rows were sent to Lago as billing events, then deleted (or moved to
    # our dead letters) from the app's own table
    "events with a body": """
        CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);
        CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
        INSERT INTO users(email) VALUES ('a@example.com');
        INSERT INTO events(body) VALUES ('{"kind": "signup"}'), ('{"kind": "login"}');
    """,
}


@pytest.mark.parametrize("kind", sorted(_APP_DATABASES))
async def test_a_spool_path_naming_another_programs_database_is_refused_and_left_untouched(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "app.sqlite3"
    _database(path, _APP_DATABASES[kind])
    before = _query(path, "SELECT * FROM events ORDER BY id")
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        for event in events(3):
            pipeline.submit(event)
        with pytest.raises(ConfigurationError, match="not an event spool") as info:
            await pipeline.commit()  # (opens the spool, as run() does first)
        with pytest.raises(ConfigurationError):  # (its last attempt to keep the events submitted: said again)
            await pipeline.aclose()
    # ... and the events submitted, lost for want of a spool, are counted and said (they went uncounted)
    assert pipeline.stats["lost_at_shutdown"] == 3, pipeline.stats
    assert any("the 3 events submitted before the event spool was opened" in r.getMessage() for r in caplog.records)
    assert info.value.variable == "LAGO_SPOOL_PATH"
    assert "users" in str(info.value) and "file of its own" in str(info.value), str(info.value)
    assert fake.events == []  # none of the app's rows went to Lago as billing events
    assert _tables(path) == ["events", "users"]  # no dead_letters table of ours in the app's database
    assert _query(path, "SELECT * FROM events ORDER BY id") == before
    assert _query(path, "PRAGMA journal_mode") == [("delete",)]  # nor its journal mode changed to WAL


async def test_a_spool_of_another_schema_whose_rows_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    """A spool whose ``events`` table needs a column this version does not write (a spool of another version): every
    write failed (events in memory only, "free space on its volume" advised); it is said at start instead."""
    path = tmp_path / "spool.db"
    _database(
        path,
        """
        CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL, created_at REAL NOT NULL);
        CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, reason TEXT NOT NULL,
            status INTEGER, code TEXT, created_at REAL NOT NULL);
        """,
    )
    outbox = SqliteOutbox(str(path))
    with pytest.raises(ConfigurationError, match="created_at") as info:
        await outbox.open()
    assert "not an event spool" in str(info.value) and "version" in str(info.value), str(info.value)
    await outbox.close()


async def test_a_spool_with_an_extra_optional_column_or_sqlite_tables_is_still_used(tmp_path: Path) -> None:
    """What does not stop this version from writing its rows is accepted: a column with a default or nullable, the
    tables SQLite makes itself (ANALYZE), the ``lost_and_found`` table of ``sqlite3 .recover``."""
    path = tmp_path / "spool.db"
    _database(
        path,
        """
        CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL, note TEXT, added REAL NOT NULL DEFAULT 0);
        CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, body TEXT NOT NULL, reason TEXT NOT NULL,
            status INTEGER, code TEXT, created_at REAL NOT NULL);
        CREATE TABLE lost_and_found (rootpgno INTEGER, pgno INTEGER, nfield INTEGER, id INTEGER, c0, c1);
        ANALYZE;
        """,
    )
    path_rows = [(1, '{"transaction_id":"old1","external_subscription_id":"org_1","code":"api_call"}')]
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO events(id, body) VALUES (?, ?)", path_rows)
    conn.commit()
    conn.close()
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in events(2):
                pipeline.submit(event)
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == ["old1", "tx0", "tx1"]


async def test_a_damaged_spool_says_it_is_damaged_and_how_to_recover_its_events(tmp_path: Path) -> None:
    """A spool torn by a failing disk was refused with "set LAGO_SPOOL_PATH to a file path in a writable directory,
    or unset it": advice that abandons its undelivered events. It says the file is damaged, and how to get its events
    delivered: recovered into a slot file the next start adopts."""
    path = tmp_path / "spool.db"
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    for event in events(2000, prefix="kept", properties={"pad": "x" * 200}):
        outbox.put(event)
    await outbox.commit()
    await outbox.close()
    _tear(path)
    outbox = SqliteOutbox(str(path))
    with pytest.raises(ConfigurationError) as info:
        await outbox.open()
    message = str(info.value)
    assert "damaged" in message and ".recover" in message and f"{path}.damaged" in message, message
    await outbox.close()
    assert path.stat().st_size > 0  # left where it is


async def test_a_spool_path_with_a_tilde_is_the_users_home_as_the_setting_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LAGO_SPOOL_PATH=~/spool.db`` is the home's file (BillingSettings expands it); given to EventPipeline as is
    (``spool_path="~/spool.db"``), the spool went to a directory named ``~`` in the working directory: a restart from
    another directory did not find its backlog."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path="~/spool.db")
        pipeline.submit(events(1)[0])
        await pipeline.commit()
        assert pipeline.spool_file == str(home / "spool.db")
        await pipeline.aclose()
    assert not (work / "~").exists()
    assert _query(home / "spool.db", "SELECT COUNT(*) FROM events") == [(1,)]
