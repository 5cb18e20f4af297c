"""The durable SQLite spool: restart, bounded memory, dead letters, several processes sharing one path."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import ConfigurationError
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing._spool import SqliteOutbox
from lago_org_billing.testing import FakeLago
from test_delivery import events, make_client, make_fake, transaction_ids

pytestmark = pytest.mark.anyio


class Down(httpx.AsyncBaseTransport):
    """Lago unreachable."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        raise httpx.ConnectError("connection refused", request=request)


def exists(path: str) -> bool:
    return os.path.exists(path)


def rows(path: str | Path, table: str = "events") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


async def park(path: Path, submitted: list[dict[str, Any]], **options: Any) -> EventPipeline:
    """Run a pipeline with Lago down until ``submitted`` is on disk, then shut it down."""
    async with make_client(Down(), max_retries=0) as client:
        pipeline = EventPipeline(client, spool_path=str(path), retry_backoff=0.001, max_backoff=0.01, **options)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in submitted:
                pipeline.submit(event)
            await pipeline.commit()
            assert not await pipeline.flush(0.05)
            await pipeline.aclose(timeout=0)
    return pipeline


async def drain(path: Path, fake: FakeLago, submitted: list[dict[str, Any]] = (), **options: Any) -> EventPipeline:  # type: ignore[assignment]
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01, **options)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in submitted:
                pipeline.submit(event)
            assert await pipeline.flush(20)
            await pipeline.aclose()
    return pipeline


async def test_outage_backlog_survives_restart_and_drains_first(tmp_path: Path) -> None:
    """Events spooled during an outage are delivered after a restart, before newer ones, each once."""
    path = tmp_path / "spool.db"
    parked = await park(path, events(150, prefix="old"))
    assert parked.stats["spool_depth"] == 150 and parked.stats["lost_at_shutdown"] == 0
    assert rows(path) == 150

    fake = make_fake()
    pipeline = await drain(path, fake, events(20, prefix="new"), concurrency=1)
    ids = transaction_ids(fake)
    assert ids == [f"old{i}" for i in range(150)] + [f"new{i}" for i in range(20)]
    assert rows(path) == 0 and pipeline.stats["spool_depth"] == 0


async def test_a_new_spool_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The spool holds org ids, user ids, models and token counts: a new file (and its WAL files, and a directory
    made for it) is the owner's only, whatever the umask; an existing file keeps the mode it was given."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = tmp_path / "made" / "spool.db"
        await park(path, events(3))
        existing = tmp_path / "shared.db"
        existing.touch(mode=0o640)
        existing.chmod(0o640)
        await park(existing, events(1))
    finally:
        os.umask(old)
    files = [path.parent, path, *path.parent.glob("spool.db-*")]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) & 0o077 for f in files} == {f.name: 0 for f in files}
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640


async def test_only_a_bounded_window_of_the_backlog_is_in_memory(tmp_path: Path) -> None:
    """A backlog far larger than the window is streamed from disk, never held in memory at once."""
    path = tmp_path / "spool.db"
    await park(path, events(1200))
    fake = make_fake()
    seen: list[int] = []
    original = SqliteOutbox.take

    def take(self: SqliteOutbox, n: int) -> list[Any]:
        seen.append(len(self.window) + self.in_flight)
        return original(self, n)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SqliteOutbox, "take", take)
        await drain(path, fake, spool_window=100, concurrency=2, batch_size=50)
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(1200))
    assert seen and max(seen) <= 100 + 2 * 50


async def test_dead_letters_are_kept_in_the_spool(tmp_path: Path) -> None:
    """A rejected event moves to the dead_letters table with Lago's reason, and outlives the process."""
    path = tmp_path / "spool.db"
    poison = event_payload(
        transaction_id="poison", external_subscription_id="org_1", code="api_call", precise_total_amount_cents="nan?"
    )
    fake = make_fake()
    await drain(path, fake, [*events(5), poison])
    assert sorted(transaction_ids(fake)) == [f"tx{i}" for i in range(5)]
    assert rows(path) == 0 and rows(path, "dead_letters") == 1

    async with make_client(fake.transport()) as client:
        reopened = EventPipeline(client, spool_path=str(path))
        [letter] = reopened.dead_letters()
    assert letter.event == poison and letter.status == 422 and "value_is_invalid" in letter.reason


async def test_group_commit_writes_many_events_in_one_transaction(tmp_path: Path) -> None:
    """Events submitted within one commit window are written by a single transaction."""
    path = tmp_path / "spool.db"
    async with make_client(Down()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), commit_window=60)
        assert isinstance(pipeline.outbox, SqliteOutbox)
        writes: list[int] = []
        spool_file = pipeline.outbox.file
        original = spool_file.write

        def write(rows_: list[Any], *rest: Any) -> Any:
            writes.append(len(rows_))
            return original(rows_, *rest)

        spool_file.write = write  # type: ignore[method-assign]
        for event in events(500):
            pipeline.submit(event)
        assert rows(path) == 0 if path.exists() else True  # nothing written yet: pending in memory
        await pipeline.commit()
        await pipeline.aclose()
    assert writes == [500] and rows(path) == 500


async def test_events_submitted_before_run_are_not_lost(tmp_path: Path) -> None:
    """aclose() without run() still writes what was submitted to the spool."""
    path = tmp_path / "spool.db"
    async with make_client(Down()) as client:
        pipeline = EventPipeline(client, spool_path=str(path))
        for event in events(7):
            pipeline.submit(event)
        await pipeline.aclose()
    assert rows(path) == 7


async def test_cancelled_run_commits_pending_events(tmp_path: Path) -> None:
    """When the app's task group is cancelled without aclose(), accepted events are still made durable."""
    path = tmp_path / "spool.db"
    async with make_client(Down(), max_retries=0) as client:
        pipeline = EventPipeline(client, spool_path=str(path), commit_window=60, max_backoff=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in events(9):
                pipeline.submit(event)
            tg.cancel_scope.cancel()
        await pipeline.aclose()
    assert rows(path) == 9


async def test_unreadable_row_goes_to_dead_letters(tmp_path: Path) -> None:
    """A corrupt row (not JSON) does not block the spool: Lago's 400 isolates it into the dead letters."""
    path = tmp_path / "spool.db"
    await park(path, events(3))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE events SET body = '{not json' WHERE id = 2")
    conn.commit()
    conn.close()
    fake = make_fake()
    pipeline = await drain(path, fake)
    assert sorted(transaction_ids(fake)) == ["tx0", "tx2"]
    [letter] = pipeline.dead_letters()
    assert letter.status == 400 and letter.event == {"body": "{not json"}


async def test_second_process_gets_its_own_slot_and_orphans_are_adopted(tmp_path: Path) -> None:
    """Two owners of one LAGO_SPOOL_PATH use two files; a dead owner's file is adopted and drained."""
    path = tmp_path / "spool.db"
    async with make_client(Down(), max_retries=0) as client:
        first = EventPipeline(client, spool_path=str(path))
        second = EventPipeline(client, spool_path=str(path))
        await first.commit()  # opens and locks slot 0
        for event in events(4, prefix="b"):
            second.submit(event)
        await second.commit()
        assert first.spool_file == str(path)
        assert second.spool_file == f"{path}.1"
        await second.aclose()  # its process "dies": slot 1 is orphaned with 4 events
        await first.aclose()
    assert exists(f"{path}.1") and rows(f"{path}.1") == 4

    fake = make_fake()
    pipeline = await drain(path, fake, events(2, prefix="a"))
    assert pipeline.spool_file == str(path)
    assert sorted(transaction_ids(fake)) == ["a0", "a1", "b0", "b1", "b2", "b3"]
    assert not exists(f"{path}.1")


@pytest.mark.parametrize("kind", ["not a database", "a directory"])
async def test_a_spool_that_cannot_be_opened_says_so_every_time(tmp_path: Path, kind: str) -> None:
    """A bad LAGO_SPOOL_PATH gets a ConfigurationError naming it, every time: the failed open let go of its slot
    (it kept the lock, and the next attempt silently used ``PATH.1``)."""
    path = tmp_path / "spool.db"
    if kind == "a directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not a SQLite database, but a file the user pointed LAGO_SPOOL_PATH at" * 20)
    async with make_client(Down(), max_retries=0) as client:
        for _ in range(2):
            pipeline = EventPipeline(client, spool_path=str(path))
            pipeline.submit(events(1)[0])
            with pytest.raises(ConfigurationError, match="LAGO_SPOOL_PATH") as info:
                await pipeline.commit()
            assert info.value.variable == "LAGO_SPOOL_PATH"
    assert not exists(f"{path}.1")


def test_memory_outbox_builds_lazy_events_without_sending() -> None:
    """Builders are run once by build_pending (freeing what they hold), even when nothing can be sent."""
    from lago_org_billing._spool import MemoryOutbox

    calls: list[int] = []

    def builder(n: int) -> Any:
        def build() -> dict[str, Any]:
            calls.append(n)
            return {"transaction_id": f"tx_{n}", "external_subscription_id": "s", "code": "c"}

        return build

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    outbox = MemoryOutbox(capacity=10)
    for n in range(3):
        assert outbox.put(builder(n))
    assert outbox.put(broken)
    assert outbox.put({"transaction_id": "plain", "external_subscription_id": "s", "code": "c"})
    outbox.build_pending()
    outbox.build_pending()  # nothing left to build: builders never run twice
    assert calls == [0, 1, 2]
    items = outbox.take(10)
    assert [json.loads(item.encoded())["transaction_id"] for item in items[:3]] == ["tx_0", "tx_1", "tx_2"]
    with pytest.raises(ValueError, match="boom"):
        items[3].encoded()
    assert calls == [0, 1, 2]


async def test_run_again_after_a_cancelled_run_sends_what_was_in_flight(tmp_path: Path) -> None:
    """The app's task group is cancelled while a batch is at Lago's door; run() again on the same pipeline (the spool
    kept open for it) delivers those events: none stays stranded in a window nobody reads."""
    from test_delivery import Held

    path = tmp_path / "spool.db"
    fake = make_fake()
    held = Held(fake.transport())
    async with make_client(held) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01, commit_window=0.01)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(5):
                pipeline.submit(event)
            await pipeline.commit()
            with anyio.fail_after(10):  # a guard: the batch is taken at once, then held at Lago's door
                await held.entered.wait()
            assert pipeline.outbox.in_flight
            tasks.cancel_scope.cancel()
        held.opened.set()
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == [f"tx{i}" for i in range(5)]
    assert rows(path) == 0
