"""Second review of the spool's fresh fixes (events a failed write took are sent to Lago from memory; slot locks
closed in forked children) and of ``dead-letters --help``.

* Events sent from memory while the spool could not be written, Lago being down too, are written to the spool once
  the volume takes writes again: they survive a crash from then on (before the fix they stayed in memory only until
  Lago took them, however long the volume had been writable), and each reaches Lago once.
* A run of the pipeline cancelled and started again (the middleware restarts its background work after an error)
  keeps the events sent from memory: the new run's rewind forgot them (never delivered, never written, and
  ``flush()`` never done).
* Memory stays bounded by the outbox's capacity while those events go back and forth between the window and failing
  writes (Lago down, the volume failing).
* ``lago-org-billing dead-letters --help`` says where ``--replay`` connects: LAGO_API_URL and LAGO_API_KEY, from the
  environment, else ./.env.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from lago_org_billing import _spool
from lago_org_billing._delivery import EventPipeline
from test_delivery import events, make_client, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import rows

pytestmark = pytest.mark.anyio


class Switch(httpx.AsyncBaseTransport):
    """The emulator behind a switch: ``down`` makes Lago unreachable."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.down = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


class Volume:
    """The spool's volume: ``full`` makes every write of the spool fail as a full disk does (``failures`` counts
    them); ``hold`` makes the next writes wait for ``release`` (``entered`` set as one starts) before they fail or go
    on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.failures = 0
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        write = _spool._SpoolFile.write

        def write_on_the_volume(file: Any, *args: Any) -> Any:
            if self.hold:
                self.entered.set()
                self.release.wait(10)
            if self.full:
                with self._lock:
                    self.failures += 1
                raise sqlite3.OperationalError("database or disk is full")
            return write(file, *args)

        monkeypatch.setattr(_spool._SpoolFile, "write", write_on_the_volume)


async def _sent_from_memory(pipeline: EventPipeline, outbox: _spool.SqliteOutbox, volume: Volume) -> None:
    """The volume full, three events submitted: the write fails and they are sent from memory (Lago may be down)."""
    volume.full = True
    for event in events(3):
        pipeline.submit(event)
    await until(lambda: volume.failures >= 1 and len(outbox._unwritten) == 3)


def _pipeline(client: Any, path: Path, **options: Any) -> EventPipeline:
    return EventPipeline(
        client, spool_path=str(path), flush_interval=0.0, retry_backoff=0.001, max_backoff=0.02, **options
    )


async def test_events_sent_from_memory_are_written_once_the_volume_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """The disk fills up while Lago is down: the events the spool could not write wait in memory. The disk is freed
    (the volume takes writes again) and Lago stays down for an hour: those events must be written to the spool then,
    not held in memory only until Lago takes them (a crash or a deploy's kill meanwhile loses them, though the spool
    had room for them all along). Each still reaches Lago once, and the spool is empty afterwards."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    volume = Volume(monkeypatch)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            await _sent_from_memory(pipeline, outbox, volume)
            volume.full = False
            pipeline.submit(events(1, prefix="after")[0])
            # Lago still down: the file must hold all four (what a crash now leaves for the next start)
            await until(lambda: rows(path) == 4, within=5)
            assert outbox.unresolved() == 4
            lago.down = False
            assert await pipeline.flush(10)
            await pipeline.aclose()
    sent = transaction_ids(fake)
    assert sorted(sent) == ["after0", "tx0", "tx1", "tx2"], sent
    assert rows(path) == 0


async def test_a_restarted_run_keeps_the_events_sent_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """The pipeline's run is cancelled and started again without ``aclose`` (the middleware restarts its background
    work after an error) while events the spool could not write wait in memory for Lago: the new run rewinds the
    spool (forgets the window, reads the file again) and those events, which are in no file, were forgotten with it:
    never delivered, and ``flush()`` waited for them for ever."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = Switch(fake.transport())
    volume = Volume(monkeypatch)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            await _sent_from_memory(pipeline, outbox, volume)
            tasks.cancel_scope.cancel()  # the run stops (no aclose): the volume still full
        volume.full = False
        lago.down = False
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            delivered = await pipeline.flush(5)
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == ["tx0", "tx1", "tx2"]
    assert delivered
    assert rows(path) == 0 and pipeline.stats["lost_at_shutdown"] == 0


async def test_memory_stays_bounded_while_events_go_back_and_forth_between_memory_and_failing_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """Lago down and the volume failing for many write attempts: the events held in memory (waiting for a write,
    being written, or sent from memory) stay bounded: within twice the outbox's capacity (as many waiting for a
    commit as a commit in progress holds), however many times they go back and forth; the rest is refused and
    counted. (A guard for the fix that writes events sent from memory once the volume recovers: those are taken into
    every write attempt, and must not be taken out of the count meanwhile.)"""
    path = tmp_path / "spool.db"
    volume = Volume(monkeypatch)
    lago = Switch(make_fake().transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path, commit_window=0.001)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            outbox.capacity = 4
            volume.full = True
            held: list[int] = []
            submitted = 0

            def in_memory() -> int:
                return len(outbox.pending) + len(outbox._unwritten) + outbox._writing[0]

            with anyio.fail_after(15):
                while volume.failures < 10 and submitted < 5_000:  # (many write attempts, or a full outbox)
                    pipeline.submit(events(1, prefix=f"e{submitted}-")[0])
                    submitted += 1
                    held.append(in_memory())
                    await anyio.lowlevel.checkpoint()
            assert max(held) <= 2 * 4, held
            assert outbox.unresolved() <= 2 * 4
            await pipeline.aclose(timeout=0)


def test_dead_letters_help_names_where_replay_connects(capsys: pytest.CaptureFixture[str]) -> None:
    """``--replay`` sends the letters to a Lago: the help says which one (LAGO_API_URL, with LAGO_API_KEY, from the
    environment or ./.env), as ``migrate --help`` does."""
    from lago_org_billing.cli import main

    with pytest.raises(SystemExit):
        main(["dead-letters", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LAGO_API_URL" in text and "LAGO_API_KEY" in text, text
    assert "./.env" in text, text
