"""The SQLite spool's dead letters as they grow (``_spool.py``, ``_metrics.py``).

A misconfiguration (an event property Lago rejects, a wrong metric code) dead-letters every request: at 1,000
requests/s the ``dead_letters`` table grows by some 86 M rows a day, with no bound and nothing to tell the operator
but per-kind error lines and the counter ``events_dead_lettered_total`` (which says letters were made, not how many
are still held: a replay or a purge never shows). Covered here:

* The spool knows how many letters it holds: counted once at open, kept up to date by each commit that adds or
  removes some (dead-lettering, a replay), without a ``COUNT(*)`` per commit; letters purged or replayed by another
  process (the ``dead-letters`` command) are seen at the next commit, or the next idle check. Exported as
  ``stats["dead_letters"]`` and the gauge ``lago_billing_dead_letters`` (the memory outbox's list too).
* A WARNING when the table passes 10,000 letters (a lower threshold is patched in here), then at each tenfold, each
  said once per process (at open too, for a spool that already holds that many), naming the spool, the count, the most
  common cause among the recent letters, and what to do (``dead-letters --summary``, fix, ``--replay`` or ``--purge``).
* No letter is ever dropped for it: every one stays in the table.

Lago is the emulator: it rejects events whose ``precise_total_amount_cents`` is no number (422, by index), as Lago
does; a front answering 400 to every batch stands for a cause that is fixed later (a replay then delivers them).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from lago_org_billing import EventPipeline, PipelineMetrics, _spool
from lago_org_billing.cli import main
from test_delivery import events, make_client, make_fake
from test_spool_unwritten_dead_letters import Lago

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
from prometheus_client import CollectorRegistry  # noqa: E402

pytestmark = pytest.mark.anyio


def bad(count: int, prefix: str = "bad") -> list[dict[str, Any]]:
    """Events the emulator rejects for good: an amount that is no number (``value_is_invalid``)."""
    return [{**event, "precise_total_amount_cents": "twelve"} for event in events(count, prefix=prefix)]


def letters_in(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
        and "dead letters" in record.getMessage()
        and "holds" in record.getMessage()
    ]


@contextlib.contextmanager
def statements(conn: sqlite3.Connection) -> Iterator[list[str]]:
    """The SQL the spool's connection runs meanwhile (from its worker threads)."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)


async def submit(pipeline: EventPipeline, submitted: list[dict[str, Any]]) -> None:
    """Submit, wait until each event is delivered or dead-lettered, and commit (the letters are in the file)."""
    for event in submitted:
        assert pipeline.submit(event)
    assert await pipeline.flush(20)
    await pipeline.commit()


async def test_spool_dead_letters_are_counted_and_exported(tmp_path: Path) -> None:
    """Dead letters show as ``stats["dead_letters"]`` and ``lago_billing_dead_letters``: up as Lago rejects events,
    down as a replay delivers them once the cause is fixed, and counted again when a new process opens the spool."""
    path = tmp_path / "spool.db"
    registry = CollectorRegistry()
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    fake = make_fake()
    lago = Lago(fake.transport())
    async with make_client(lago, max_retries=0) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01, metrics=metrics)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await submit(pipeline, [*bad(3), *events(2)])
            assert pipeline.stats["dead_letters"] == 3 == letters_in(path)
            assert registry.get_sample_value("lago_billing_dead_letters") == 3
            lago.rejecting = True  # a cause fixed later
            await submit(pipeline, events(4, prefix="later"))
            assert pipeline.stats["dead_letters"] == 7 == letters_in(path)
            assert registry.get_sample_value("lago_billing_dead_letters") == 7
            lago.rejecting = False
            later = [letter.id for letter in pipeline.dead_letters() if letter.event["transaction_id"][0] == "l"]
            assert await pipeline.replay_dead_letters(later) == 4
            assert await pipeline.flush(20)
            await pipeline.commit()
            assert pipeline.stats["dead_letters"] == 3 == letters_in(path)
            assert registry.get_sample_value("lago_billing_dead_letters") == 3
            await pipeline.aclose()

        again = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tasks:
            await tasks.start(again.run)
            assert again.stats["dead_letters"] == 3  # counted at open
            await again.aclose()
    assert letters_in(path) == 3


async def test_memory_outbox_dead_letters_are_exported() -> None:
    """The memory outbox's letters show under the same names (its list, at most 10,000)."""
    registry = CollectorRegistry()
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    async with make_client(make_fake().transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, metrics=metrics)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await submit(pipeline, [*bad(2), *events(1)])
            assert pipeline.stats["dead_letters"] == 2 == len(pipeline.dead_letters())
            assert registry.get_sample_value("lago_billing_dead_letters") == 2
            await pipeline.aclose()


async def test_letters_purged_or_replayed_by_another_process_are_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator purges letters with the ``dead-letters`` command while the process runs: the count drops at the
    process's next commit (traffic), or at its next idle check (no traffic), not only at its next start."""
    monkeypatch.setattr(_spool, "_IDLE_CHECK", 0.0)
    path = tmp_path / "spool.db"
    async with make_client(make_fake().transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01, commit_window=60)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await submit(pipeline, bad(4))
            assert pipeline.stats["dead_letters"] == 4
            [first, *_] = pipeline.dead_letters()
            assert main(["dead-letters", "--spool", str(path), "--purge", "--id", str(first.id), "--yes"]) == 0
            await submit(pipeline, [*events(2), *bad(1, prefix="more")])  # a commit with traffic
            assert pipeline.stats["dead_letters"] == 4 == letters_in(path)

            assert main(["dead-letters", "--spool", str(path), "--purge", "--yes"]) == 0
            await pipeline.commit()  # nothing to write: the idle check
            assert pipeline.stats["dead_letters"] == 0 == letters_in(path)
            await pipeline.aclose()
    capsys.readouterr()


async def test_commits_never_count_the_table(tmp_path: Path) -> None:
    """Keeping the count costs no ``COUNT(*)`` per commit: each commit adds what it wrote and removed."""
    path = tmp_path / "spool.db"
    async with make_client(make_fake().transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01, commit_window=60)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await submit(pipeline, bad(2))
            assert outbox.file.conn is not None
            with statements(outbox.file.conn) as seen:
                for round_ in range(5):
                    await submit(pipeline, [*bad(2, prefix=f"bad{round_}_"), *events(3, prefix=f"ok{round_}_")])
            assert pipeline.stats["dead_letters"] == 12 == letters_in(path)
            counted = [sql for sql in seen if "count(" in sql.lower()]
            assert len([sql for sql in seen if "dead_letters" in sql]) >= 5 and counted == []
            await pipeline.aclose()


async def test_a_warning_past_each_tenfold_said_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Past the threshold (10,000; 3 here), then at each tenfold, a WARNING names the spool, the count, the most
    common recent cause, and what to do; once per process each (not again after a purge and new growth), and at open
    in a new process for a spool that holds that many already. Every letter stays."""
    monkeypatch.setattr(_spool, "_DEAD_LETTERS_WARN", 3)
    monkeypatch.setattr(_spool, "_dead_letters_said", {})
    path = tmp_path / "spool.db"
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    async with make_client(make_fake().transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01, commit_window=60)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await submit(pipeline, [*bad(2), *events(5)])
            assert warnings_of(caplog) == []
            await submit(pipeline, bad(1, prefix="third"))
            [said] = warnings_of(caplog)
            assert str(path) in said and "holds 3 dead letters" in said
            reason = pipeline.dead_letters()[-1].reason
            assert reason in said and "value_is_invalid" in said and "3 of the last 3" in said
            for advice in (f"dead-letters --spool {path} --summary", "--replay", "--purge"):
                assert advice in said
            await submit(pipeline, bad(26, prefix="more"))  # 29: below 30
            assert len(warnings_of(caplog)) == 1
            await submit(pipeline, bad(1, prefix="thirtieth"))
            assert len(warnings_of(caplog)) == 2 and "holds 30 dead letters" in warnings_of(caplog)[1]
            assert letters_in(path) == 30 == pipeline.stats["dead_letters"]  # none dropped

            assert main(["dead-letters", "--spool", str(path), "--purge", "--yes"]) == 0
            await submit(pipeline, bad(31, prefix="again"))
            assert letters_in(path) == 31 and len(warnings_of(caplog)) == 2  # once per process
            await pipeline.aclose()

        monkeypatch.setattr(_spool, "_dead_letters_said", {})  # a new process
        caplog.clear()
        again = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tasks:
            await tasks.start(again.run)
            [said] = warnings_of(caplog)
            assert "holds 31 dead letters" in said and "past 30" in said
            await again.aclose()
    capsys.readouterr()
