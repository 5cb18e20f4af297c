"""Fourth review of the SQLite spool while its file cannot be written (a full or read-only volume), faults injected by
making ``_SpoolFile.write`` fail (``Volume``), Lago the emulator.

* A backlog parked in the file, the volume full, Lago up: the spool kept loading the backlog's rows and sending them;
  each one Lago took (or rejected) added a resolution (a delete, or a dead letter carrying the whole event) that
  could not be written, so memory grew with the size of the file's backlog and every failed write carried them all.
  The loading now pauses while writes fail and more than ``capacity`` resolutions wait; once the volume takes writes
  again the backlog drains, each event reaching Lago once.
* A group commit cancelled natively (an event loop ending) while its write had already started in its worker thread
  counted the rows as written; when that write then failed (the volume full), the events were in neither the file
  nor memory: lost without being counted, and the spool's depth overcounted. The write's outcome now decides: the
  rows are counted when it succeeded, else put back to be written (or counted lost at close).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from lago_org_billing import _spool
from lago_org_billing._events import event_payload
from lago_org_billing._spool import SqliteOutbox
from test_delivery import events, make_client, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import park, rows
from test_spool_unwritten_events import Volume, _pipeline

pytestmark = pytest.mark.anyio

BACKLOG = 2_000
CAPACITY = 100
WINDOW = 100


class Rejecting(httpx.AsyncBaseTransport):
    """The emulator behind a front that answers 400 to every request while ``rejecting``."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.rejecting = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.rejecting:
            await request.aread()
            return httpx.Response(400, json={"status": 400, "error": "Bad Request", "code": "bad_request"})
        return await self.inner.handle_async_request(request)


def _letters(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [json.loads(body)["transaction_id"] for (body,) in conn.execute("SELECT body FROM dead_letters")]
    finally:
        conn.close()


@pytest.mark.parametrize("lago_answer", ["delivered", "rejected"])
async def test_a_backlog_is_not_loaded_into_memory_while_the_volume_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None, lago_answer: str
) -> None:
    """A backlog of 2,000 events parked in the spool (a Lago outage), then the volume fills up just as Lago is back:
    the resolutions waiting for a write (deletes, dead letters carrying their events) stay within the outbox's
    capacity plus the window, not the size of the backlog. Once the volume takes writes again, the whole backlog is
    delivered (or dead-lettered), each event once, and the file is empty."""
    path = tmp_path / "spool.db"
    submitted = events(BACKLOG, prefix="old")
    await park(path, submitted)
    assert rows(path) == BACKLOG
    fake = make_fake()
    lago = Rejecting(fake.transport())
    lago.rejecting = lago_answer == "rejected"
    volume = Volume(monkeypatch)
    carried: list[int] = []  # resolutions carried by each write attempt
    failing_write = _spool._SpoolFile.write

    def write(file: Any, rows_: Any, deletes: list[int], dead: list[Any], *rest: Any) -> Any:
        carried.append(len(deletes) + len(dead))
        return failing_write(file, rows_, deletes, dead, *rest)

    monkeypatch.setattr(_spool._SpoolFile, "write", write)
    volume.full = True
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path, memory_capacity=CAPACITY, spool_window=WINDOW, batch_size=20)
        outbox = pipeline.outbox
        assert isinstance(outbox, SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)

            def waiting() -> int:
                return len(outbox._to_delete) + len(outbox._to_dead)

            def settled() -> bool:
                """The whole backlog resolved in memory, or the spool idle with more than ``capacity`` resolutions
                waiting, over several failed writes in a row (nothing more is loaded)."""
                if waiting() >= BACKLOG:
                    return True
                idle = not outbox.window and not outbox.in_flight and waiting() > CAPACITY
                return idle and len(carried) >= 5 and len(set(carried[-5:])) == 1

            await until(settled, within=20)
            assert waiting() <= CAPACITY + WINDOW, f"{waiting()} resolutions of the backlog wait in memory"
            assert max(carried) <= CAPACITY + WINDOW, max(carried)
            assert rows(path) == BACKLOG  # (nothing written meanwhile)
            volume.full = False
            lago.rejecting = False  # (those rejected stay rejected: their letters are written)
            assert await pipeline.flush(20)
            await pipeline.aclose()
    assert rows(path) == 0
    delivered, letters = transaction_ids(fake), _letters(path)
    assert len(delivered) == len(set(delivered)) and len(letters) == len(set(letters))
    assert sorted(delivered + letters) == sorted(event["transaction_id"] for event in submitted)
    if lago_answer == "rejected":
        assert letters  # (some at least were rejected while the volume was full)


def _event(n: int) -> dict[str, object]:
    return event_payload(
        transaction_id=f"tx_{n}", external_subscription_id="org_a", code="api_call", timestamp=1.0, properties={}
    )


async def _cancel_natively_during_the_write(outbox: SqliteOutbox, volume: Volume) -> None:
    """A group commit of the events waiting, natively cancelled (asyncio: an event loop ending) once its write has
    started in its worker thread (held there by ``volume``)."""
    volume.hold = True
    task = asyncio.get_running_loop().create_task(outbox.commit())
    await until(volume.entered.is_set)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    volume.hold = False


@pytest.mark.parametrize("volume_recovers", [True, False])
async def test_a_write_natively_cancelled_then_failing_keeps_its_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None, volume_recovers: bool
) -> None:
    """The write already runs in its thread when the commit is cancelled natively, then fails (the volume is full):
    its events are not in the file, so they must not be counted as if they were: they are written once the volume
    takes writes again, or counted lost at close if it never does (not lost uncounted, the depth overcounted)."""
    volume = Volume(monkeypatch)
    outbox = SqliteOutbox(str(tmp_path / "spool.db"))
    await outbox.open()
    for n in range(50):
        assert outbox.put(_event(n))
    volume.full = True
    await _cancel_natively_during_the_write(outbox, volume)
    volume.release.set()  # the write goes on, and fails
    await until(lambda: volume.failures == 1)
    assert outbox.unresolved() == 50
    if volume_recovers:
        volume.full = False
        await outbox.commit()
        assert rows(outbox.path) == 50
        assert outbox.unresolved() == 50 and outbox.spool_depth() == 50
        assert await outbox.close() == 0
    else:
        assert await outbox.close() == 50, "the events of the failed write were lost uncounted"
        assert rows(outbox.path) == 0


async def test_a_write_natively_cancelled_then_succeeding_is_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same write succeeding: its rows are in the file once, counted once, and a later commit adds nothing."""
    volume = Volume(monkeypatch)
    outbox = SqliteOutbox(str(tmp_path / "spool.db"))
    await outbox.open()
    for n in range(50):
        assert outbox.put(_event(n))
    await _cancel_natively_during_the_write(outbox, volume)
    volume.release.set()
    await until(lambda: rows(outbox.path) == 50)
    assert outbox.put(_event(50))
    await outbox.commit()
    assert rows(outbox.path) == 51
    assert outbox.unresolved() == 51 and outbox.spool_depth() == 51
    assert await outbox.close() == 0
