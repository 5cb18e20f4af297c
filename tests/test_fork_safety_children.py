"""Fork safety, checked again: what a forked child does with what it inherited, up to its exit.

* The spool's SQLite connection a child inherits must never be closed by it, not even by sqlite3's own finaliser as
  the child's interpreter exits normally: closing a connection copied in the middle of the parent's write transaction
  rolls that transaction back, which rewrites the WAL index the parent shares (the shm file is mapped in both).
* ``LagoClient``'s own httpx pool: a child using the client it inherited must get a pool of its own (the parent's
  connections belong to the parent's event loop and sockets); an injected transport is the user's, kept as it is.

Each case runs in a fresh interpreter (``python -c``): ``os.fork`` in the test process would fork pytest itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

DEADLINE = 60.0

#: A worker's spool commit is half-way (BEGIN, an insert: what ``_SpoolFile.write`` does in its worker thread) when
#: the process forks. The parent commits it, then writes a large transaction (its pages spill to the WAL before the
#: commit); meanwhile the child exits, by ``sys.exit`` (normal interpreter exit) or ``os._exit``, as argv[2] says.
SPOOL_CHILD = textwrap.dedent(
    """
    import os, sqlite3, sys

    import anyio

    from lago_org_billing._spool import SqliteOutbox

    path, how = sys.argv[1], sys.argv[2]
    outbox = SqliteOutbox(path)
    anyio.run(outbox.open)
    conn = outbox.file.conn
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO events(body) VALUES ('in-flight')")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        assert outbox.file.conn is None  # (let go of by the fork hook)
        os.read(r, 1)  # until the parent is half-way through its next write
        if how == "_exit":
            os._exit(0)
        sys.exit(0)
    os.close(r)
    conn.execute("COMMIT")
    conn.execute("PRAGMA cache_size=5")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO events(body) VALUES (?)", [("x" * 3000,) for _ in range(300)])
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    conn.executemany("INSERT INTO events(body) VALUES (?)", [("y" * 3000,) for _ in range(10)])
    conn.execute("COMMIT")
    check = sqlite3.connect(path)
    try:
        print("CHECK", check.execute("PRAGMA integrity_check").fetchone()[0], flush=True)
        print("ROWS", check.execute("SELECT COUNT(*) FROM events").fetchone()[0], flush=True)
    except sqlite3.Error as exc:
        print("CHECK", type(exc).__name__, exc, flush=True)
    print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
    """
)


def _spool_child(tmp_path: Path, how: str) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", SPOOL_CHILD, str(tmp_path / "events.db"), how],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def test_a_child_exiting_normally_never_rolls_back_the_parents_spool_write(tmp_path: Path) -> None:
    """The child's interpreter exit used to close the inherited connection (kept in a list, it was still deallocated
    with its module): its rollback of the copied transaction erased the WAL index entries of the parent's write in
    progress, and the spool was corrupt ('database disk image is malformed': every event in it unreadable)."""
    said = _spool_child(tmp_path, "exit")
    assert said == {"CHECK": "ok", "ROWS": "311", "CHILD": "0"}


def test_a_child_ending_with_os_exit_leaves_the_parents_spool_whole(tmp_path: Path) -> None:
    """(multiprocessing's children end by ``os._exit``: no finaliser ran there, before the fix or since.)"""
    said = _spool_child(tmp_path, "_exit")
    assert said == {"CHECK": "ok", "ROWS": "311", "CHILD": "0"}


#: A process calls Lago through its LagoClient (a kept-alive connection in the client's own httpx pool), forks a
#: child that calls Lago with the client it inherited (an event loop of its own), then calls again. The server
#: answers each request with its path and the count of requests on its connection. A second client built on an
#: injected transport shows whether the child kept it.
CLIENT_CHILD = textwrap.dedent(
    """
    import asyncio, gc, json, os

    import anyio
    import anyio.abc
    import httpx

    from lago_org_billing import BillingSettings, LagoClient
    from lago_org_billing import _forks


    async def handle(stream):
        count, buffer = 0, b""
        async with stream:
            try:
                while True:
                    while b"\\r\\n\\r\\n" not in buffer:
                        buffer += await stream.receive()
                    head, _, buffer = buffer.partition(b"\\r\\n\\r\\n")
                    count += 1
                    answer = json.dumps({"path": head.split(b" ")[1].decode(), "nth": count}).encode()
                    await stream.send(
                        b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
                        % (len(answer), answer)
                    )
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass


    async def main():
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            settings = BillingSettings(api_key="k", api_url=f"http://127.0.0.1:{port}", max_retries=0)
            client = LagoClient(settings)
            closed_in_child = LagoClient(settings)
            transport = httpx.AsyncHTTPTransport()
            injected = LagoClient(settings, transport=transport)
            injected_pool = injected._http
            throwaway = LagoClient(settings)
            del throwaway
            gc.collect()
            print("TRACKED", sum(isinstance(obj, LagoClient) for obj in _forks._tracked), flush=True)
            print("PARENT", json.dumps(await client.health()), flush=True)
            print("OTHER", json.dumps(await closed_in_child.health()), flush=True)
            pid = os.fork()
            if pid == 0:
                try:
                    print("INJECTED", injected._http is injected_pool, flush=True)
                    async def call():
                        with anyio.fail_after(10):  # a guard against a hang, not a measure
                            return await client.health()
                    asyncio.run(closed_in_child.aclose())  # (a child's cleanup: the parent's pool untouched)
                    print("CLOSED", closed_in_child.is_closed, flush=True)
                    print("CHILD", json.dumps(asyncio.run(call())), flush=True)
                except BaseException as exc:
                    print("CHILD", type(exc).__name__, flush=True)
                finally:
                    os._exit(0)
            await anyio.to_thread.run_sync(os.waitpid, pid, 0)
            print("PARENT", json.dumps(await client.health()), flush=True)
            with anyio.fail_after(10):  # a guard against a hang, not a measure
                print("OTHER", json.dumps(await closed_in_child.health()), flush=True)
            await client.aclose()
            await closed_in_child.aclose()
            await injected.aclose()
            tg.cancel_scope.cancel()


    anyio.run(main)
    """
)


def test_a_forked_child_calls_lago_through_a_pool_of_its_own() -> None:
    """The child's first call used to fail with "RuntimeError: <asyncio.locks.Event ...> is bound to a different
    event loop" (the parent's pooled connection, on the parent's loop; not even a LagoAPIError), and cost the parent
    its kept-alive connection. The child now starts with a fresh pool of the client's own: its call is the first on a
    connection of its own, and the parent's next call is the second on its own connection. A client built on an
    injected transport keeps it (the user's); only clients with a pool of their own are tracked, weakly (one dropped
    is not kept). A child closing a client it never used leaves the parent's pool alone: the parent's next call on it
    is the second on its kept-alive connection."""
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_CHILD], capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        "TRACKED 2",
        'PARENT {"path": "/health", "nth": 1}',
        'OTHER {"path": "/health", "nth": 1}',
        "INJECTED True",
        "CLOSED True",
        'CHILD {"path": "/health", "nth": 1}',
        'PARENT {"path": "/health", "nth": 2}',
        'OTHER {"path": "/health", "nth": 2}',
    ], (done.stdout, done.stderr)
