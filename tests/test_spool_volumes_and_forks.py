"""Review of the spool's slots, fork safety and failure handling (``_spool``, ``_forks``).

* A volume whose file locks do not work (``flock`` failing with ENOLCK/EOPNOTSUPP: some network and FUSE mounts) is
  said as such, not as "every one of 1024 spool slots is locked by a live process", and leaves no lock files behind.
* A fork from another thread while the spool takes its slot's lock (the descriptor open, not yet noted as the slot's)
  must not leave the child holding that lock for its life (the parent's events would wait for the child to die).
* Files named like slot files but that no process can own (``PATH.20240101``, ``PATH.01``, ``PATH.0``: a backup copy)
  are neither adopted (their events moved, the file deleted) nor listed by ``dead-letters``.
* A write that fails for another reason than a full or read-only volume (a lock held by another program, a damaged
  file) is logged with advice that fits it, not "free space on its volume".
* A drained spool whose VACUUM fails (too little room on the volume for its copy) is not vacuumed again at every
  group commit: each attempt rewrites the file's live data for nothing.

Fork cases run in a fresh interpreter (``python -c``): ``os.fork`` in the test process would fork pytest itself.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lago_org_billing import ConfigurationError, _spool
from lago_org_billing._dead_letters import read_spool_dead_letters
from lago_org_billing._spool import SqliteOutbox, spool_slot_files

DEADLINE = 60.0


def event(name: str, size: int = 0) -> dict[str, Any]:
    return {
        "transaction_id": name,
        "external_subscription_id": "org_1",
        "code": "api_call",
        "timestamp": "1700000000.000",
        "properties": {"pad": "x" * size},
    }


# ------------------------------------------------------------------------------------------ file locks that fail


@pytest.mark.anyio
async def test_a_volume_without_file_locks_is_said_as_such_and_leaves_no_lock_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to say "every one of 1024 spool slots ... is locked by a live process" (sending the user after
    processes that do not exist), having made 1024 ``.lock`` files in the spool's directory."""

    def no_locks(fd: int, flags: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_spool, "_flock", no_locks)
    outbox = SqliteOutbox(str(tmp_path / "events.db"))
    with pytest.raises(ConfigurationError) as raised:
        await outbox.open()
    message = str(raised.value)
    assert "does not support file locks" in message and "No locks available" in message, message
    assert "live process" not in message
    assert len([name for name in os.listdir(tmp_path) if name.endswith(".lock")]) <= 1


@pytest.mark.anyio
async def test_a_slot_held_by_another_process_is_still_skipped(tmp_path: Path) -> None:
    """(The lock another process holds is told apart from a lock that cannot be taken at all.)"""
    path = str(tmp_path / "events.db")
    first, second = SqliteOutbox(path), SqliteOutbox(path)
    await first.open()
    try:
        await second.open()
        assert (first.path, second.path) == (path, path + ".1")
        await second.close()
    finally:
        await first.close()


# ------------------------------------------------------------------------------------------ a fork while locking

#: A worker opens its spool; as its slot's lock is taken, another thread forks (simulated: the fork happens right
#: after the ``flock`` call, in the opening thread; the child does nothing of the parent's and waits to be let go).
#: The worker spools one event, closes its spool (the event stays), and a new worker opens the same path while the
#: child still lives.
LOCK_FORK = textwrap.dedent(
    """
    import os, sys

    import anyio

    from lago_org_billing import _spool

    path = sys.argv[1]
    flock = _spool._flock
    child = []


    def flock_then_fork(fd, flags):
        flock(fd, flags)
        if child:
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # another thread's fork: nothing of the opening is the child's
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        child.append((pid, w))


    _spool._flock = flock_then_fork


    async def first_worker():
        outbox = _spool.SqliteOutbox(path)
        await outbox.open()
        outbox.put({"transaction_id": "t1", "external_subscription_id": "o", "code": "c", "timestamp": 1})
        await outbox.commit()
        await outbox.close()


    async def next_worker():
        outbox = _spool.SqliteOutbox(path)
        await outbox.open()
        print("SLOT", os.path.basename(outbox.path), flush=True)
        print("WAITING", outbox.unresolved(), flush=True)
        await outbox.close()


    try:
        anyio.run(first_worker)
        _spool._flock = flock
        anyio.run(next_worker)
    finally:
        for pid, w in child:
            os.write(w, b"x")
            os.waitpid(pid, 0)
    """
)


def test_a_fork_while_the_spool_takes_its_slot_leaves_the_child_no_lock(tmp_path: Path) -> None:
    """The child kept its copy of the lock descriptor (open, not yet noted as the slot's when it was forked): the
    slot stayed locked after its owner closed it, so the next worker took slot 1 and could not adopt slot 0, whose
    event waited for the child to exit."""
    done = subprocess.run(
        [sys.executable, "-c", LOCK_FORK, str(tmp_path / "events.db")],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["SLOT events.db", "WAITING 1"], (done.stdout, done.stderr)


# ------------------------------------------------------------------------------------------ stray slot-like files


def _spool_file_with(path: Path, *bodies: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_spool._SCHEMA)
        conn.executemany("INSERT INTO events(body) VALUES (?)", [(body,) for body in bodies])
        conn.execute(
            "INSERT INTO dead_letters(body, reason, created_at) VALUES (?, 'rejected', 0)", ('{"transaction_id":"d"}',)
        )
        conn.commit()
    finally:
        conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize("suffix", ["20240101", "01", "0", "1024"])
async def test_a_file_no_process_can_own_is_neither_adopted_nor_listed(tmp_path: Path, suffix: str) -> None:
    """``cp events.db events.db.20240101`` (a backup) used to be taken for an orphan slot: its events were sent
    again and the copy deleted. No process ever owns a slot numbered 1024 or more, nor one written with a leading
    zero (slot k's file is ``PATH.k``); ``PATH.0`` is no slot file either (slot 0 is ``PATH`` itself), and the
    ``dead-letters`` command read its letters as those of slot 0."""
    path = tmp_path / "events.db"
    stray = tmp_path / f"events.db.{suffix}"
    _spool_file_with(stray, '{"transaction_id":"backup"}')
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    try:
        assert outbox.adopted == 0 and outbox.unresolved() == 0
    finally:
        await outbox.close()
    assert stray.exists()
    assert spool_slot_files(str(path)) == [(0, str(path))]
    assert [spooled.file for spooled in read_spool_dead_letters(str(path))] == []


@pytest.mark.anyio
async def test_an_orphan_slot_file_is_still_adopted(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    _spool_file_with(tmp_path / "events.db.1023", '{"transaction_id":"orphan"}')
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    try:
        assert outbox.adopted == 1 and outbox.unresolved() == 1
    finally:
        await outbox.close()
    assert not (tmp_path / "events.db.1023").exists()


# ------------------------------------------------------------------------------------------ write failures said


@pytest.mark.anyio
async def test_a_spool_locked_by_another_program_is_not_said_to_need_free_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sqlite3 shell (or a backup tool) left in a write transaction on the spool file: every commit failed with
    'database is locked' and the log said to free space on the volume or make it writable."""
    path = str(tmp_path / "events.db")
    outbox = SqliteOutbox(path)
    await outbox.open()
    assert outbox.file.conn is not None
    outbox.file.conn.execute("PRAGMA busy_timeout=0")  # (not the 5 s it waits for a lock)
    shell = sqlite3.connect(path, isolation_level=None)
    try:
        shell.execute("BEGIN IMMEDIATE")
        outbox.put(event("t1"))
        with caplog.at_level(logging.ERROR, logger="lago_org_billing"):
            await outbox.commit()
        shell.execute("ROLLBACK")
    finally:
        shell.close()
    messages = [r.getMessage() for r in caplog.records if "Could not write the event spool" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "free space" not in messages[0] and "another program" in messages[0], messages[0]
    await outbox.close()  # (written by the last commit)
    assert spool_rows(path) == 1


@pytest.mark.anyio
async def test_a_damaged_spool_file_is_said_to_be_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = SqliteOutbox(str(tmp_path / "events.db"))
    await outbox.open()

    def damaged(self: Any, *args: Any) -> Any:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(_spool._SpoolFile, "write", damaged)
    outbox.put(event("t1"))
    with caplog.at_level(logging.ERROR, logger="lago_org_billing"):
        await outbox.commit()
    monkeypatch.undo()
    messages = [r.getMessage() for r in caplog.records if "Could not write the event spool" in r.getMessage()]
    assert len(messages) == 1 and "free space" not in messages[0] and "damaged" in messages[0], messages
    await outbox.close()


def spool_rows(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ VACUUM that fails


class _NoRoomToVacuum:
    """The spool's connection, on a volume with too little room for VACUUM's copy of the file."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.vacuums = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == "VACUUM":
            self.vacuums += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


@pytest.mark.anyio
async def test_a_vacuum_that_fails_is_not_tried_again_at_every_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A drained backlog's VACUUM failing for room used to be tried again by every commit that deleted rows (each
    50 ms under traffic), each attempt rewriting the file's live data (filling the volume anew for its neighbours)
    and holding the spool's reads meanwhile; and it was said at DEBUG only."""
    outbox = SqliteOutbox(str(tmp_path / "events.db"), window=10_000)
    await outbox.open()
    for index in range(3_000):
        outbox.put(event(f"t{index}", size=4_000))
    await outbox.commit()
    items = outbox.take(3_000)
    assert len(items) == 3_000
    real = outbox.file.conn
    assert real is not None
    proxy = _NoRoomToVacuum(real)
    outbox.file.conn = proxy  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
            for start in range(0, 3_000, 300):
                outbox.resolve(items[start : start + 300])
                outbox.put(event(f"new{start}"))  # (traffic goes on)
                await outbox.commit()
    finally:
        outbox.file.conn = real
    assert proxy.vacuums == 1, f"{proxy.vacuums} VACUUMs tried in 10 commits"
    said = [r.getMessage() for r in caplog.records if "shrink" in r.getMessage()]
    assert len(said) == 1 and "database or disk is full" in said[0], said
    await outbox.close()


@pytest.mark.anyio
async def test_a_drained_spool_is_still_vacuumed(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    outbox = SqliteOutbox(str(path), window=10_000)
    await outbox.open()
    for index in range(2_000):
        outbox.put(event(f"t{index}", size=4_000))
    await outbox.commit()
    big = path.stat().st_size
    outbox.resolve(outbox.take(2_000))
    await outbox.commit()
    await outbox.close()
    assert path.stat().st_size < big // 4


# ------------------------------------------------------------------------------------------ a child of a child

#: The worker (slot 0) forks a helper, which spools one event through a spool of its own (slot 1), forks a
#: long-lived grandchild, closes its spool (its event stays) and exits. The worker then closes its spool and a new
#: worker opens the path while the grandchild still lives: it must get slot 0 and adopt the helper's slot 1.
GRANDCHILD = textwrap.dedent(
    """
    import os, sys

    import anyio

    from lago_org_billing._spool import SqliteOutbox

    path = sys.argv[1]
    r, w = os.pipe()


    def event(name):
        return {"transaction_id": name, "external_subscription_id": "o", "code": "c", "timestamp": 1}


    async def helper():
        own = SqliteOutbox(path)
        await own.open()
        own.put(event("from-helper"))
        await own.commit()
        if os.fork() == 0:  # the grandchild: lives on until the test lets it go
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        print("HELPER", os.path.basename(own.path), flush=True)
        await own.close()


    async def next_worker():
        outbox = SqliteOutbox(path)
        await outbox.open()
        print("SLOT", os.path.basename(outbox.path), "ADOPTED", outbox.adopted, flush=True)
        await outbox.close()


    worker = SqliteOutbox(path)
    anyio.run(worker.open)
    pid = os.fork()
    if pid == 0:
        try:
            anyio.run(helper)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    anyio.run(worker.close)
    try:
        anyio.run(next_worker)
    finally:
        os.write(w, b"x")  # (the grandchild, orphaned, exits; nobody waits for it here)
    """
)


def test_a_grandchild_holds_no_slot_of_the_child_it_was_forked_from(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", GRANDCHILD, str(tmp_path / "events.db")],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["HELPER events.db.1", "SLOT events.db ADOPTED 1"], (done.stdout, done.stderr)
