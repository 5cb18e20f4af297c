"""The suite run under each Python that pyproject.toml declares (3.10 to 3.13): what those runs showed.

* ``EventPipeline.flush()`` said the spool was empty (True) while the commit deleting the last delivered rows was
  still writing: the file still held them (seen as ``test_long_runs``'s spool backlog test failing, by load).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from lago_org_billing import _spool
from lago_org_billing._delivery import EventPipeline
from lago_org_billing.testing import FakeLago
from test_delivery import events, make_client
from test_spool import rows

pytestmark = pytest.mark.anyio


async def test_flush_is_true_only_once_the_delivered_rows_are_gone_from_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool task's commit takes the resolutions of the last batch and writes them in a worker thread; a flush()
    made meanwhile must wait for that write: it said True (the outbox empty) with the rows still in the file, so a
    crash then sent them again and a tool reading the file (``dead-letters``, a backlog check) saw a backlog."""
    monkeypatch.setattr(_spool, "_IDLE_CHECK", 3600.0)  # (an idle check would wait for the write by chance)
    fake = FakeLago()
    path = str(tmp_path / "spool.db")
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=path)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        entered, gate = threading.Event(), threading.Event()
        real_write = outbox.file.write

        def write(rows: Any, deletes: list[int], *rest: Any) -> Any:
            if deletes:  # the commit of the delivered rows: held in its thread until the test lets it go
                entered.set()
                gate.wait(30)
            return real_write(rows, deletes, *rest)

        monkeypatch.setattr(outbox.file, "write", write)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(5):
                pipeline.submit(event)
            await pipeline.commit()
            assert rows(path) == 5
            assert await anyio.to_thread.run_sync(entered.wait, 30)  # delivered; their deletion is being written
            assert len(fake.events) == 5
            said: list[tuple[bool, int]] = []

            async def flush() -> None:
                ok = await pipeline.flush(30)
                said.append((ok, rows(path)))

            tasks.start_soon(flush)
            await anyio.wait_all_tasks_blocked()
            gate.set()
            with anyio.fail_after(30):
                while not said:
                    await anyio.wait_all_tasks_blocked()
            assert said == [(True, 0)]
            await pipeline.aclose()
