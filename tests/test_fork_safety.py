"""Fork safety: what a process inherits from the one it was forked from.

* ``gunicorn --preload -k uvicorn.workers.UvicornWorker -w 2``: the app module (and the ``OrgBillingMiddleware`` it
  builds) is imported in the master, the workers are forked from it: each must deliver its own events, with a spool
  slot of its own, and the master must hold nothing (no slot, no connection) the workers then share.
* a worker forking a helper (``multiprocessing`` with the ``fork`` start method, ``os.fork()``) after its spool is
  open: the helper inherits the slot's ``flock`` descriptor and the SQLite connection. It must neither keep the slot
  locked once the worker is gone (its events would wait for no one) nor write through the worker's connection.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from lago_org_billing._spool import SqliteOutbox, spool_slot_path
from test_asgi_servers import ORG, Emulator, Server, _exit_ok, emulator, serve  # noqa: F401 - fixtures

DEADLINE = 30.0

# ------------------------------------------------------------------------------------------------ forked helpers

#: A worker with an open spool forks a helper (it imports nothing, runs on), then goes on and exits.
#: ``python -c CHILD MODE SPOOL``; prints ``HELPER <pid>``, then, by mode:
#: * ``exit``: the worker closes its spool (3 undelivered events stay in it) and exits; the helper lives on until its
#:   stdin closes.
#: * ``use``: the helper runs an event loop of its own and spools one event through the outbox it inherited, prints
#:   ``CHILD <slot file>`` and exits; the worker then spools one more event and prints ``PARENT <slot file>``.
CHILD = textwrap.dedent(
    """
    import asyncio, os, sys

    import anyio

    from lago_org_billing._spool import SqliteOutbox

    mode, path = sys.argv[1], sys.argv[2]


    def event(name):
        return {"transaction_id": name, "external_subscription_id": "org_1", "code": "api_call", "timestamp": 1}


    async def helper_uses_it(outbox):
        await outbox.open()
        outbox.put(event("from-helper"))
        await outbox.commit()
        print("CHILD", outbox.path, flush=True)


    async def main():
        outbox = SqliteOutbox(path)
        await outbox.open()
        for i in range(3):
            outbox.put(event(f"from-worker-{i}"))
        await outbox.commit()
        pid = os.fork()
        if pid == 0:  # the helper
            try:
                if mode == "exit":
                    sys.stdin.read()  # lives on until the test lets it go
                else:
                    asyncio.run(helper_uses_it(outbox))  # (anyio.run: 'already running', the parent's)
            finally:
                os._exit(0)
        print("HELPER", pid, flush=True)
        if mode == "use":
            os.waitpid(pid, 0)
            outbox.put(event("from-worker-after"))
            await outbox.commit()
            print("PARENT", outbox.path, flush=True)
        await outbox.close()


    anyio.run(main)
    """
)


def _run_child(mode: str, spool: str, log: Path) -> tuple[subprocess.Popen[str], list[str]]:
    with log.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, spool],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    assert process.stdout is not None
    lines: list[str] = []
    while True:
        line = process.stdout.readline()  # (not communicate(): the helper keeps stdout open while it lives)
        if not line:
            break
        lines.append(line.strip())
        if line.startswith("HELPER" if mode == "exit" else "PARENT"):
            break
    return process, lines


def _end(process: subprocess.Popen[str]) -> None:
    for pipe in (process.stdin, process.stdout):  # (the helper's stdin closed: it exits)
        if pipe is not None:
            pipe.close()
    if process.poll() is None:
        process.kill()
    process.wait()


def _rows(path: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT json_extract(body, '$.transaction_id') FROM events ORDER BY id")]
    finally:
        conn.close()


@pytest.mark.anyio
async def test_a_helper_forked_by_a_worker_does_not_keep_the_workers_spool_slot(tmp_path: Path) -> None:
    """The worker (slot 0, three events Lago has not taken yet) forks a long-lived helper and exits. The next worker
    must get slot 0 back, with its events: the helper's inherited copy of the slot's lock descriptor used to keep it
    locked, so the next worker took slot 1, could not adopt slot 0, and those events waited for the helper to die."""
    spool, log = str(tmp_path / "spool" / "events.db"), tmp_path / "stderr"
    process, lines = _run_child("exit", spool, log)
    helper = 0
    try:
        assert lines and lines[-1].startswith("HELPER"), (lines, log.read_text())
        helper = int(lines[-1].split()[1])
        assert process.wait(DEADLINE) == 0, log.read_text()
        next_worker = SqliteOutbox(spool)
        await next_worker.open()
        try:
            assert next_worker.path == spool
            assert next_worker.unresolved() == 3
        finally:
            await next_worker.close()
    finally:
        _end(process)
        if helper:
            try:
                os.kill(helper, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_forked_helper_never_writes_through_the_workers_spool_connection(tmp_path: Path) -> None:
    """A helper that spools events itself (an event loop of its own) takes a slot of its own: SQLite connections do
    not survive a fork (https://sqlite.org/howtocorrupt.html#fork), and the worker still owns slot 0."""
    spool, log = str(tmp_path / "spool" / "events.db"), tmp_path / "stderr"
    process, lines = _run_child("use", spool, log)
    try:
        assert process.wait(DEADLINE) == 0, (lines, log.read_text())
    finally:
        _end(process)
    said = dict(line.split(" ", 1) for line in lines)
    assert said["PARENT"] == spool
    assert said["CHILD"] == spool_slot_path(spool, 1)
    assert _rows(spool) == ["from-worker-0", "from-worker-1", "from-worker-2", "from-worker-after"]
    assert _rows(spool_slot_path(spool, 1)) == ["from-helper"]


#: A process posting event batches over a kept-alive connection forks a helper, which posts with the poster it
#: inherited (an event loop of its own), then posts again. The server echoes each body with its connection's count.
RAW_CHILD = textwrap.dedent(
    """
    import asyncio, json, os

    import anyio
    import anyio.abc

    from lago_org_billing._http1 import RawPoster


    async def handle(stream):
        count, buffer = 0, b""
        async with stream:
            try:
                while True:
                    while b"\\r\\n\\r\\n" not in buffer:
                        buffer += await stream.receive()
                    head, _, buffer = buffer.partition(b"\\r\\n\\r\\n")
                    length = 0
                    for line in head.split(b"\\r\\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffer) < length:
                        buffer += await stream.receive()
                    body, buffer = buffer[:length], buffer[length:]
                    count += 1
                    answer = json.dumps({"echo": json.loads(body), "nth_on_connection": count}).encode()
                    await stream.send(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(answer), answer))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass


    def said(answer):
        return json.loads(answer[2])["echo"]


    async def main():
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            poster = RawPoster(f"http://127.0.0.1:{port}", {}, timeout=5)
            print("PARENT", said(await poster.post("/e", b'"parent-1"')), flush=True)
            pid = os.fork()
            if pid == 0:
                try:
                    print("CHILD", said(asyncio.run(poster.post("/e", b'"child"'))), flush=True)
                except BaseException as exc:
                    print("CHILD", type(exc).__name__, flush=True)
                finally:
                    os._exit(0)
            await anyio.to_thread.run_sync(os.waitpid, pid, 0)
            print("PARENT", said(await poster.post("/e", b'"parent-2"')), flush=True)
            tg.cancel_scope.cancel()


    anyio.run(main)
    """
)


def test_a_forked_helper_never_posts_on_the_parents_kept_alive_connection() -> None:
    """The helper must open a connection of its own: on the parent's, its request went out, its event loop could
    not read the answer, and the parent's next batch was answered with the answer to the helper's request (Lago's
    answer to a batch taken for another's: events rejected but counted as delivered, or the reverse)."""
    done = subprocess.run(
        [sys.executable, "-c", RAW_CHILD], capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["PARENT parent-1", "CHILD child", "PARENT parent-2"], done.stdout


# ------------------------------------------------------------------------------------------------ gunicorn --preload

PRELOAD_APP = textwrap.dedent(
    """
    import os

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from lago_org_billing import OrgBillingMiddleware

    MASTER = os.getpid()


    async def whoami(request):
        return JSONResponse(
            {
                "pid": os.getpid(),
                "master": MASTER,
                "spool": asgi_app.pipeline.spool_file,
                "gate": {**asgi_app.quota.stats, **getattr(asgi_app.quota.backend, "stats", {})},
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        )


    app = Starlette(routes=[Route("/v1/whoami", whoami)])
    # built as the module is imported: in gunicorn's master under --preload, inherited by the forked workers
    asgi_app = OrgBillingMiddleware(app)

    if os.environ.get("REPLAY_AT_IMPORT"):  # a deploy sends the dead letters again: the master opens the spool
        import asyncio

        asyncio.run(asgi_app.pipeline.replay_dead_letters())
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "preapp.py").write_text(PRELOAD_APP)
    return tmp_path


GUNICORN_PRELOAD = Server(
    "gunicorn-preload",
    ("gunicorn", "uvicorn"),
    ("gunicorn", "--preload", "-k", "uvicorn.workers.UvicornWorker", "-w", "2", "-b", "127.0.0.1:{port}", "{app}"),
)


@pytest.mark.parametrize("outbox", ["memory", "spool", "spool+redis", "spool-opened-in-master"])
def test_gunicorn_preload_workers_each_deliver_their_own_events(
    serve: Any,  # noqa: F811 - the fixture
    emulator: Emulator,  # noqa: F811 - the fixture
    app_dir: Path,
    outbox: str,
    request: pytest.FixtureRequest,
) -> None:
    """``gunicorn --preload``: the middleware (its client, spool, quota gate and its Redis pool) is built in the
    master, the workers forked from it. One event per request, all delivered by exit (the first batch held by Lago
    when the server gets SIGTERM); with the spool each worker locks a slot of its own and the master none (the workers
    get slots 0 and 1); with Redis each worker's gate decides through connections of its own. A master that opened
    the spool itself (replaying dead letters at import) used to hand its slot and SQLite connection to both workers:
    they wrote through copies of one connection and numbered their events alike (UNIQUE constraint failures)."""
    spool = str(app_dir / "spool" / "events.db")
    spooled = outbox != "memory"
    extra = {"LAGO_SPOOL_PATH": spool} if spooled else {}
    if outbox.endswith("redis"):
        extra["LAGO_REDIS_URL"] = request.getfixturevalue("redis_url")
    opened_in_master = outbox == "spool-opened-in-master"
    if opened_in_master:
        extra["REPLAY_AT_IMPORT"] = "1"
    before = emulator.count()
    running = serve(GUNICORN_PRELOAD, app="preapp:asgi_app", **extra)
    emulator.delay_next_batch(1500)
    seen: dict[int, Any] = {}
    served = 0
    for _ in range(16):  # a connection each: both workers answer some
        answer = httpx.get(f"{running.base_url}/v1/whoami", headers=ORG, timeout=DEADLINE)
        assert answer.status_code == 200, running.output()
        served += 1
        body = answer.json()
        assert body["pid"] != body["master"]
        gate = body["gate"]
        assert gate["fail_open"] == gate.get("redis_errors", 0) == gate.get("fallback_decisions", 0) == 0, gate
        seen[body["pid"]] = body["spool"]
    returncode = running.stop(signal.SIGTERM)
    assert _exit_ok(returncode, signal.SIGTERM), running.output()
    assert emulator.count() - before == served, running.output()
    if spooled:
        files = list(seen.values())
        assert len(set(files)) == len(files), seen  # no two workers on one slot
        if opened_in_master:  # the master holds slot 0 (its own): each worker takes another, not the master's
            assert spool not in files, seen
        else:
            assert set(files) <= {spool, spool_slot_path(spool, 1)}, seen  # the master holds none
        for path in files:
            assert _rows(path) == [], path  # (all delivered)
    else:
        assert set(seen.values()) == {None}
