"""Fork safety: a forked child that opens a spool of its own, with the parent's connection kept.

SQLite shares its per-process state of a database file (the locks it holds, the WAL index) among every connection
of the process to that file. The connection a child inherits is kept for its life (never closed: see
``_spool._keep_for_life``), with the locks its parent held at the fork, a write in progress included. A connection
of the child's own to that same file would share them: once the parent has let go of its slot (closed, or died), the
child opening the spool must not take that slot file again, nor adopt it.

Each case runs in a fresh interpreter (``python -c``): ``os.fork`` in the test process would fork pytest itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

DEADLINE = 60.0

#: A worker's spool commit is half-way (BEGIN, an insert: what ``_SpoolFile.write`` does in its worker thread) when
#: the process forks. The worker commits it and closes its spool (slot 0 is free), then the child, living on, opens
#: a spool of its own on the same path and spools one event. The parent then reads every slot file.
REOPEN_CHILD = textwrap.dedent(
    """
    import glob, os, sqlite3, sys

    import anyio

    from lago_org_billing._spool import SqliteOutbox

    path = sys.argv[1]
    outbox = SqliteOutbox(path)
    anyio.run(outbox.open)
    conn = outbox.file.conn
    conn.execute("BEGIN")
    conn.execute("INSERT INTO events(body) VALUES ('in-flight')")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # until the parent has closed its spool
        try:
            own = SqliteOutbox(path)

            async def spool_one():
                await own.open()
                own.put({"transaction_id": "t", "external_subscription_id": "o", "code": "c", "timestamp": 1})
                with anyio.fail_after(30):  # a guard against a hang, not a measure
                    await own.commit()
                print("SLOT", os.path.basename(own.path), flush=True)
                print("ADOPTED", own.adopted, flush=True)
                print("WRITTEN", own.spool_depth(), flush=True)
                await own.close()

            anyio.run(spool_one)
        except BaseException as exc:
            print("ERROR", type(exc).__name__, exc, flush=True)
        finally:
            os._exit(0)
    os.close(r)
    conn.execute("COMMIT")
    anyio.run(outbox.close)
    os.write(w, b"x")
    os.waitpid(pid, 0)
    for name in sorted(glob.glob(path + "*")):
        if name.endswith(("-wal", "-shm", ".lock")):
            continue
        check = sqlite3.connect(name)
        rows = [row[0][:12] for row in check.execute("SELECT body FROM events ORDER BY id")]
        print("FILE", os.path.basename(name), check.execute("PRAGMA integrity_check").fetchone()[0], *rows, flush=True)
        check.close()
    """
)


def test_a_child_opening_the_spool_after_its_parent_let_go_never_shares_the_kept_connections_file(
    tmp_path: Path,
) -> None:
    """The child used to take slot 0 again (free once the parent closed it): its own connection shared the inherited
    one's locks, the parent's write transaction among them, and every commit failed with 'database is locked' (the
    child's events waited in memory for ever, lost at its exit); adopting the file failed the same way."""
    done = subprocess.run(
        [sys.executable, "-c", REOPEN_CHILD, str(tmp_path / "events.db")],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    said = done.stdout.splitlines()
    assert said == [
        "SLOT events.db.1",
        "ADOPTED 0",  # (the parent's file is left to another process to adopt)
        "WRITTEN 1",
        "FILE events.db ok in-flight",
        'FILE events.db.1 ok {"transactio',
    ], (said, done.stderr)
    assert "database is locked" not in done.stderr
