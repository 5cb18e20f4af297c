"""Out of file descriptors (EMFILE, ENFILE), around the SQLite spool, with real limits: every descriptor up to
``RLIMIT_NOFILE`` taken (``os.dup``) in a fresh interpreter (``python -c``), the test process left alone.

* An orphan slot file (left by a dead worker) that cannot be opened for want of descriptors (its lock, or SQLite's
  "unable to open database file" as it is attached) is not "checked" nor "removed if it is not a spool file": the file
  is fine, and holds undelivered events. Nor is it passed over unsaid when the spool's directory cannot be listed for
  the same want. The opening fails saying the process is out of descriptors, with what to do; the orphan is left on
  disk, and adopted by the next start that has the descriptors.
* ``EventPipeline.aclose()`` of a pipeline that never ran, out of descriptors: with nothing submitted it closes quietly
  (no file was opened); events submitted before it ran, which the spool it cannot open cannot keep, are counted lost
  and said with what to do, not raised (the shutdown failed there, and the events went uncounted).
* A spool write that fails for want of descriptors (the file deleted while in use, made again) is said so, not
  "free space on its volume"; its events wait in memory and are written once there are descriptors again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio

from lago_org_billing._spool import SqliteOutbox

#: In the child: ``exhausted(free)`` takes every descriptor but ``free``, and gives them back on exit.
PRELUDE = textwrap.dedent(
    """
    import contextlib, json, logging, os, sys
    import anyio

    records = []
    logging.basicConfig(level=logging.WARNING, handlers=[logging.Handler()])
    logging.getLogger().handlers[0].emit = records.append

    @contextlib.contextmanager
    def exhausted(free=0):
        held = []
        try:
            while True:
                held.append(os.dup(0))
        except OSError as exc:
            assert exc.errno == 24, exc  # EMFILE
        for _ in range(free):
            os.close(held.pop())
        try:
            yield
        finally:
            for fd in held:
                os.close(fd)

    def said():
        out = [record.getMessage() for record in records]
        records.clear()
        return out
    """
)

ORPHAN_CHILD = PRELUDE + textwrap.dedent(
    """
    from lago_org_billing._spool import SqliteOutbox

    async def attempt(path, free):
        outbox = SqliteOutbox(path)
        with exhausted(free):  # its slot's lock, database, -wal and -shm, then the orphan's lock, database...
            try:
                await outbox.open()
                out = {"adopted": outbox.adopted}
                await outbox.close()
            except Exception as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
        return dict(out, free=free, orphan_left=os.path.exists(path + ".1"), said=said())

    for free in range(16):  # until an opening has the descriptors it takes
        out = anyio.run(attempt, sys.argv[1], free)
        print(json.dumps(out), flush=True)
        if "adopted" in out:
            break
    """
)


def run_child(script: str, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


async def leave_orphan(path: str, events: int) -> None:
    """A slot file ``path.1`` holding ``events`` undelivered events, its lock free (its worker died)."""
    holder, worker = SqliteOutbox(path), SqliteOutbox(path)
    await holder.open()  # (slot 0: the worker takes slot 1)
    await worker.open()
    assert worker.path == f"{path}.1"
    for index in range(events):
        assert worker.put({"transaction_id": f"orphan{index}", "external_subscription_id": "org_1", "code": "c"})
    await worker.commit()
    await worker.close()
    await holder.close()


def test_an_orphan_that_cannot_be_opened_for_want_of_descriptors_is_kept_and_said_so(tmp_path: Path) -> None:
    """With enough descriptors for its own slot but not for the orphan's files, the opening said "The orphan spool
    file ... cannot be adopted (OperationalError: unable to open database file) ... Check it (sqlite3 ... 'PRAGMA
    integrity_check'); remove it if it is not a spool file" and started without the orphan's events; one descriptor
    fewer, and the directory's listing (``glob``, once the slot's files were open) found no orphan at all: it started
    without them unsaid. Now each attempt fails, naming the descriptors (the orphan's lock or files, as the orphan's),
    nothing removed; the first start that has the descriptors adopts every event."""
    path = str(tmp_path / "spool.db")
    anyio.run(leave_orphan, path, 7)
    attempts = run_child(ORPHAN_CHILD, path)
    *failed, last = attempts
    assert last["adopted"] == 7 and not last["orphan_left"], last  # (a start with the descriptors: all adopted)
    for out in failed:
        said = out["error"]
        assert "out of file descriptors" in said and "ulimit -n" in said, out
        assert "unset it" not in said and "writable directory" not in said, out
        assert out["orphan_left"], out  # (its events are still there)
    logged = [line for out in attempts for line in out["said"]]
    assert not [line for line in logged if "remove it" in line or "integrity_check" in line], logged
    # the orphan's own files, not only the slot's, were met short of descriptors: said as the orphan's
    orphans = [out for out in failed if f"The orphan spool file {path}.1 cannot be adopted" in out["error"]]
    assert any("unable to open" in out["error"] for out in orphans), failed  # (SQLite's, attaching it)
    assert any("Too many open files" in out["error"] for out in orphans), failed  # (its lock's)


CLOSE_CHILD = PRELUDE + textwrap.dedent(
    """
    from lago_org_billing import BillingSettings, LagoClient
    from lago_org_billing._delivery import EventPipeline
    from lago_org_billing._events import event_payload

    async def main(path, submitted):
        settings = BillingSettings(api_key="test-api-key", api_url="http://127.0.0.1:9")  # (never called)
        pipeline = EventPipeline(LagoClient(settings), spool_path=path)
        for index in range(submitted):
            assert pipeline.submit(event_payload(
                transaction_id=f"early{index}", external_subscription_id="org_1", code="api_call"))
        with exhausted():
            try:
                await pipeline.aclose()
                raised = None
            except Exception as exc:
                raised = f"{type(exc).__name__}: {exc}"
        await pipeline.client.aclose()
        stats = pipeline.stats
        return {"raised": raised, "lost": stats["lost_at_shutdown"], "depth": stats["depth"], "said": said()}

    for submitted in (0, 3):
        print(json.dumps(anyio.run(main, sys.argv[1] + f".{submitted}.db", submitted)), flush=True)
    """
)


def test_aclose_of_a_pipeline_that_never_ran_out_of_descriptors_does_not_raise(tmp_path: Path) -> None:
    """A pipeline that never ran opened no file: closed out of descriptors, it closes. Events submitted before it ran
    are made durable as it closes, in a spool it now cannot open: ``aclose()`` raised the spool's ConfigurationError
    (the caller's shutdown stopped there: its gate and client left open) and the events went uncounted. They are
    counted in ``lost_at_shutdown`` now, and the error says why, with what to do."""
    nothing, early = run_child(CLOSE_CHILD, str(tmp_path / "spool"))
    assert nothing == {"raised": None, "lost": 0, "depth": 0, "said": []}
    assert early["raised"] is None, early["raised"]
    assert early["lost"] == 3 and early["depth"] == 0, early
    why = [line for line in early["said"] if "out of file descriptors" in line and "ulimit -n" in line]
    assert why and "3 events" in why[0], early["said"]


def test_events_lost_to_a_spool_that_could_not_be_opened_get_no_disk_advice(tmp_path: Path) -> None:
    """The pipeline's shutdown line about those events named no file ("written to the spool  (it cannot be written")
    and advised "free space on its volume or make it writable", beside an error that says descriptors ran out: it
    names the spool, and leaves what to do to the errors above it."""
    path = str(tmp_path / "spool")
    _, early = run_child(CLOSE_CHILD, path)
    lines = [line for line in early["said"] if "neither delivered nor written" in line]
    assert len(lines) == 1, early["said"]
    assert f"{path}.3.db" in lines[0], lines[0]
    assert not [line for line in early["said"] if "free space" in line], early["said"]


WAL_CHILD = PRELUDE + textwrap.dedent(
    """
    from lago_org_billing import _spool
    from lago_org_billing._spool import SqliteOutbox

    _spool._RETRY_FIRST = _spool._RETRY_MAX = 0.0  # (a failed write is tried again at the next commit)

    async def main(path, free):
        outbox = SqliteOutbox(path)
        await outbox.open()

        def put(prefix, count):
            for index in range(count):
                assert outbox.put({"transaction_id": f"{prefix}{index}", "external_subscription_id": "o", "code": "c"})

        put("before", 3)
        await outbox.commit()
        for suffix in ("", "-wal", "-shm"):  # (rm spool.db*: the file is made again at the next write)
            os.remove(path + suffix)
        put("short", 2)
        with exhausted(free):
            await outbox.commit()
        failing = said()
        await outbox.commit()  # the descriptors back: written
        rows = outbox.file.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        await outbox.close()
        return {"free": free, "failing": failing, "rows": rows}

    for free in range(6):
        print(json.dumps(anyio.run(main, f"{sys.argv[1]}.{free}.db", free)), flush=True)
    """
)


def test_a_spool_write_out_of_descriptors_is_said_so_not_free_space(tmp_path: Path) -> None:
    """The -wal file deleted while in use makes the spool open its connection again at the next write; out of
    descriptors then, SQLite says only "unable to open database file", and the log advised "free space on its volume,
    or make it writable" (the volume was fine). It names the descriptors, with what to do; the events wait in memory
    and are written once there are descriptors again (none lost)."""
    outs = run_child(WAL_CHILD, str(tmp_path / "spool"))
    failed = []
    for out in outs:
        assert out["rows"] == 5, out
        for line in out["failing"]:
            if "Could not write the event spool" in line:
                failed.append(line)
                assert "out of file descriptors" in line and "ulimit -n" in line, out
                assert "free space" not in line, out
    assert failed, outs  # (with no descriptor free at least, the write failed)
    assert any("unable to open" in line for line in failed), failed  # (SQLite's own, a descriptor or two free)
