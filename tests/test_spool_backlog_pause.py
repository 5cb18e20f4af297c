"""Fifth review of the SQLite spool (commit f28d50e): the backlog's loading paused while resolutions wait for a write,
and a commit natively cancelled during its write, settled by that write's outcome.

* With a writable file and a small ``memory_capacity``, the pause also holds in normal operation: once more than
  ``capacity`` rows of a backlog are resolved, no more are loaded until the next commit window, so a backlog drains
  one window per commit window (2,000 rows/s with ``commit_window=1``; stalled with a long one): the pipeline now
  commits as soon as the loading waits for it.
* A commit natively cancelled with its write running, the loop then ending; a new loop (a new run) settles it: each
  row counted once (success), or its events kept and its resolutions redone (failure); the file drains to empty.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from lago_org_billing import EventPipeline
from lago_org_billing._spool import SqliteOutbox
from test_delivery import events, make_client, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import park, rows
from test_spool_unwritten_events import Volume


@pytest.mark.anyio
async def test_a_small_memory_capacity_does_not_throttle_a_backlog_to_one_window_per_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2,000-event backlog, ``memory_capacity=10``, a 200-row window and a commit window of an hour: the file takes
    writes, so the loading paused on the rows resolved must not wait for the commit window (an hour here): the
    pipeline commits them at once, and the backlog is all delivered, in full batches (it stalled after 200 rows)."""
    path = tmp_path / "spool.db"
    submitted = events(2_000, prefix="old")
    await park(path, submitted)
    fake = make_fake()
    commits = 0
    commit = SqliteOutbox.commit

    async def counted(self: SqliteOutbox) -> None:
        nonlocal commits
        commits += 1
        await commit(self)

    monkeypatch.setattr(SqliteOutbox, "commit", counted)
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(
            client,
            spool_path=str(path),
            flush_interval=0.01,
            memory_capacity=10,
            batch_size=100,
            spool_window=200,
            commit_window=3600,
        )
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            outbox = pipeline.outbox
            assert isinstance(outbox, SqliteOutbox)

            def stalled() -> bool:
                """Nothing in memory to send, rows left in the file, the loading paused on a commit, and no commit
                asked for or running (nor a load): nothing will move before the commit window ends."""
                assert pipeline._kick is not None and outbox._io is not None
                return (
                    not pipeline._kick.is_set()
                    and not outbox._io.locked()
                    and not outbox.window
                    and not outbox.in_flight
                    and outbox._loaded_upto < outbox._committed_upto
                    and len(outbox._to_delete) > outbox.capacity
                )

            await until(lambda: len(transaction_ids(fake)) == len(submitted) or stalled())
            assert not stalled(), f"the backlog waits for a commit: {len(transaction_ids(fake))} sent"
            assert pipeline.stats["batches_sent"] == 20
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == sorted(event["transaction_id"] for event in submitted)
    assert rows(path) == 0


@pytest.mark.parametrize("write_fails", [False, True])
def test_a_write_natively_cancelled_as_its_loop_ends_is_settled_by_the_next_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None, write_fails: bool
) -> None:
    """Loop one: 100 backlog rows resolved, 10 new events, the commit of both natively cancelled (the loop ends) while
    its write runs. Loop two (a new run: rewound) settles it: the depth is right, and everything drains to an empty
    file, counted once."""
    path = tmp_path / "spool.db"
    asyncio.run(park(path, events(100, prefix="old")))
    volume = Volume(monkeypatch)
    outbox = SqliteOutbox(str(path))

    async def first() -> None:
        await outbox.open()
        await outbox.fill()
        items = outbox.take(100)
        assert len(items) == 100
        outbox.resolve(items)
        for event in events(10, prefix="new"):
            assert outbox.put(event)
        volume.hold, volume.full = True, write_fails
        asyncio.get_running_loop().create_task(outbox.commit())
        await until(volume.entered.is_set)  # the loop then ends: the commit is cancelled natively

    asyncio.run(first())
    assert outbox._orphan is not None and outbox.unresolved() == 10
    volume.hold = False
    outbox.rewind()
    volume.release.set()

    async def second() -> None:
        await outbox.fill()  # settles it
        assert outbox._orphan is None
        # written: 10 rows left; failed: 10 to write, and the 100 rows resolved, their deletes still to write, are not
        # read again (they were: each sent again, a delivered event counted twice)
        assert outbox.unresolved() == 10
        volume.full = False
        await outbox.commit()
        while True:
            await outbox.fill()
            items = outbox.take(1_000)
            if not items:
                break
            outbox.resolve(items)
            await outbox.commit()
        assert outbox.unresolved() == 0 and outbox.spool_depth() == 0
        assert await outbox.close() == 0

    asyncio.run(second())
    assert rows(path) == 0
