"""Third review of the spool's events sent from memory while its file cannot be written (a full or read-only volume):
``_send_unwritten``, ``_requeue_unwritten`` and their dead letters, driven through the real pipeline and the emulator,
faults injected by making the spool file refuse writes.

* A dead letter replayed while a spool write that fails holds it (the volume is full) was replayed twice: the commit
  that failed put the letter back among those waiting, and the replay, which had looked for them before it waited
  for that commit, took it again: its event was sent twice (and, rejected again, dead-lettered twice).
* The dead letters of events sent from memory, which wait in memory for a write that succeeds, piled up without
  bound while the volume stayed full and Lago rejected every event: they are capped like the memory outbox's list
  (its last 10,000), what is forgotten counted (``dead_evicted``) and logged.
* ``EventPipeline.dead_letters()`` left those letters out while they waited for the volume (``dead_lettered`` said 3,
  the list none): they are listed, with ``id`` None (not yet stored, so not replayable yet).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from lago_org_billing import _spool
from test_delivery import events, make_client, make_fake
from test_delivery_deployment import until
from test_spool import rows
from test_spool_unwritten_events import Volume, _pipeline

pytestmark = pytest.mark.anyio


class Lago(httpx.AsyncBaseTransport):
    """The emulator behind a front that records the transaction ids of every ``POST /events/batch`` it passes on, and
    answers 400 to every one while ``rejecting`` (an event Lago will not take, until the cause is fixed)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.rejecting = False
        self.posted: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        if self.rejecting:
            return httpx.Response(400, json={"status": 400, "error": "Bad Request", "code": "bad_request"})
        if request.url.path.endswith("/events/batch"):
            self.posted += [event["transaction_id"] for event in json.loads(body)["events"]]
        return await self.inner.handle_async_request(request)


def _letters(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [json.loads(body)["transaction_id"] for (body,) in conn.execute("SELECT body FROM dead_letters")]
    finally:
        conn.close()


async def test_a_letter_replayed_while_a_failing_write_holds_it_is_replayed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """An operator replays the dead letters (the cause fixed) while the spool's volume is full: the first replay puts
    the letter's event among those to write, and a commit takes both (the letter is deleted with the write of its
    event). The operator replays again while that write is failing: the letter, put back as the write failed, must
    not be taken a second time (its event went to Lago twice, and had Lago rejected it again, two letters)."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Lago(fake.transport())
    volume = Volume(monkeypatch)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            lago.rejecting = True
            pipeline.submit(events(1, prefix="rejected")[0])
            assert await pipeline.flush(5)
            assert _letters(path) == ["rejected0"]
            lago.rejecting = False  # the cause is fixed
            volume.full = volume.hold = True
            assert await pipeline.replay_dead_letters() == 1
            await until(volume.entered.is_set)  # the commit writing it (and deleting its letter) waits on the disk
            again: list[int] = []

            async def replay() -> None:
                again.append(await pipeline.replay_dead_letters())

            tasks.start_soon(replay)
            io = outbox._io
            assert io is not None
            await until(lambda: io.statistics().tasks_waiting == 1)  # (the replay waits for that commit)
            volume.hold = False
            volume.release.set()  # the write fails: the letter and its event go back, waiting
            await until(lambda: bool(again))
            volume.full = False
            assert await pipeline.flush(5)
            await pipeline.aclose()
    assert again == [0], "a letter waiting for its write was replayed again"
    assert lago.posted == ["rejected0"], lago.posted
    assert _letters(path) == [] and rows(path) == 0
    assert pipeline.stats["replayed"] == 1


async def test_dead_letters_of_events_sent_from_memory_are_capped_while_the_volume_stays_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The volume stays full and Lago rejects every event: each event is sent from memory, rejected, and its dead
    letter waits in memory for a write that does not come, while new events keep being accepted. Those letters are
    capped as the memory outbox's are (its last ``_MEMORY_DEAD_LETTERS``; 5 here): the oldest are forgotten, counted
    in ``dead_evicted`` and logged once (not per letter); once the volume takes writes again, the letters kept are
    written."""
    monkeypatch.setattr(_spool, "_MEMORY_DEAD_LETTERS", 5)
    path = tmp_path / "spool.db"
    lago = Lago(make_fake().transport())
    volume = Volume(monkeypatch)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            volume.full = lago.rejecting = True
            with caplog.at_level(logging.ERROR, logger="lago_org_billing"):

                def dead_lettered(count: int) -> Callable[[], bool]:
                    return lambda: pipeline.stats["dead_lettered"] == count

                for index, event in enumerate(events(12)):
                    assert pipeline.submit(event)
                    await until(dead_lettered(index + 1))  # (each rejected, one at a time)
                    assert len(pipeline.dead_letters()) <= 5
            assert outbox.dead_evicted == 7
            assert [letter.event["transaction_id"] for letter in pipeline.dead_letters()] == [
                f"tx{index}" for index in range(7, 12)
            ]
            assert all(letter.id is None for letter in pipeline.dead_letters())  # (not stored yet)
            volume.full = False
            await until(lambda: bool(_letters(path)))
            await pipeline.aclose()
    assert _letters(path) == [f"tx{index}" for index in range(7, 12)]
    capped = [r for r in caplog.records if "dead letters" in r.getMessage() and "forgetting" in r.getMessage()]
    assert len(capped) == 1, [r.getMessage() for r in capped]
    assert "1 forgotten so far" in capped[0].getMessage(), capped[0].getMessage()


async def test_dead_letters_lists_those_waiting_for_the_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """While the volume is full, the events Lago rejects are dead-lettered in memory (written once it takes writes
    again): ``dead_letters()`` lists them meanwhile (``dead_lettered`` counts them), with no id yet, and
    ``replay_dead_letters()`` leaves them (they are replayable once stored)."""
    path = tmp_path / "spool.db"
    lago = Lago(make_fake().transport())
    volume = Volume(monkeypatch)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            volume.full = lago.rejecting = True
            for event in events(3):
                pipeline.submit(event)
            await until(lambda: pipeline.stats["dead_lettered"] == 3)
            letters = pipeline.dead_letters()
            assert sorted(letter.event["transaction_id"] for letter in letters) == ["tx0", "tx1", "tx2"]
            assert [letter.id for letter in letters] == [None] * 3 and all(letter.status == 400 for letter in letters)
            assert await pipeline.replay_dead_letters() == 0
            volume.full = False
            await until(lambda: len(_letters(path)) == 3)
            assert all(letter.id is not None for letter in pipeline.dead_letters())
            await pipeline.aclose()
