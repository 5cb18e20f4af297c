"""A process out of file descriptors (EMFILE, ENFILE: a busy server under a low ``ulimit -n``): the raw poster and the
httpx pool cannot connect to Lago, the spool cannot open its file or its slot lock. No event may be lost or sent twice,
none dead-lettered as Lago's refusal, the failures said once (not per event) and retried after a backoff, and the
delivery must recover by itself once descriptors are free again.

Real limits (descriptors held with ``os.dup`` up to ``RLIMIT_NOFILE``) in a subprocess against the emulator served on
127.0.0.1; seeded random sequences with ``OSError(EMFILE)`` injected at the connect and spool-opening edges in process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import BillingSettings, _spool
from lago_org_billing._client import LagoClient, connection_never_made
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._errors import ConfigurationError, LagoUnavailableError
from lago_org_billing._events import event_payload
from lago_org_billing._http1 import RawHTTPError
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
EMFILE = OSError(errno.EMFILE, os.strerror(errno.EMFILE))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeLago, str]]:
    fake = FakeLago(api_key=API_KEY)
    with serve_in_thread(fake) as url:
        yield fake, url


def ids_in(fake: FakeLago, prefix: str) -> list[str]:
    return [event["transaction_id"] for event in list(fake.events) if event["transaction_id"].startswith(prefix)]


def event(transaction_id: str, **properties: Any) -> dict[str, Any]:
    return event_payload(
        transaction_id=transaction_id, external_subscription_id="org_1", code="api_call", properties=properties
    )


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Polled (the conditions change on worker threads and real backoffs); a guard, not a measurement."""
    with anyio.move_on_after(within):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.002)
        return
    pytest.fail(f"still false after {within} s")


class Descriptors:
    """Whether this process is (made to look) out of descriptors: a connection to Lago, or the spool's slot lock,
    cannot be opened then (``OSError(EMFILE)``, as ``socket()``/``open()`` fail). (SQLite's own files: with real
    limits, in a subprocess below.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.out = False
        self.refused = 0
        connect_tcp = anyio.connect_tcp  # (the raw poster's and httpcore's way to a socket)
        open_lock = _spool._open_lock

        async def connect(*args: Any, **kwargs: Any) -> Any:
            self.check()
            return await connect_tcp(*args, **kwargs)

        def lock(path: str) -> int:
            self.check()
            return open_lock(path)

        monkeypatch.setattr(anyio, "connect_tcp", connect)
        monkeypatch.setattr(_spool, "_open_lock", lock)

    def check(self) -> None:
        if self.out:
            self.refused += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def make_pipeline(url: str, spool: str | None, *, httpx_path: bool = False) -> EventPipeline:
    settings = BillingSettings(api_key=API_KEY, api_url=url, retry_backoff=0.002, max_retries=0)
    client = LagoClient(settings)
    if httpx_path:  # (as with a proxy configured: every call goes through httpx's pool)
        client._raw = None
    return EventPipeline(
        client,
        spool_path=spool,
        flush_interval=0.005,
        commit_window=0.01,
        retry_backoff=0.002,
        max_backoff=0.02,
        max_attempts=2,
        shutdown_timeout=0.3,
    )


@contextlib.asynccontextmanager
async def running(pipeline: EventPipeline) -> AsyncIterator[EventPipeline]:
    async with anyio.create_task_group() as tasks:
        await tasks.start(pipeline.run)
        try:
            yield pipeline
        finally:
            await pipeline.aclose()
            await pipeline.client.aclose()


async def start_error(pipeline: EventPipeline) -> str:
    """The error of a pipeline whose run cannot start (out of its task group); fails the test if it starts."""
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            tasks.cancel_scope.cancel()
    except Exception as exc:
        error: BaseException = exc
        while getattr(error, "exceptions", None):  # (an ExceptionGroup of the task group)
            error = error.exceptions[0]  # type: ignore[attr-defined]
        assert isinstance(error, ConfigurationError), repr(error)
        return str(error)
    finally:
        await pipeline.client.aclose()
    pytest.fail("the pipeline started with its spool out of descriptors")


# ------------------------------------------------------------------------------------ seeded random sequences


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
async def test_random_exhaustion_sequences_lose_and_duplicate_nothing(
    served: tuple[FakeLago, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    seed: int,
    spool: bool,
) -> None:
    """Events submitted while descriptors run out and free up at random points, with restarts (some while out of
    descriptors): Lago ends up holding each submitted event exactly once (with the memory outbox: but those a shutdown
    counted lost), none dead-lettered, none refused at submit, the failures retried after pauses and logged a bounded
    number of times; a spool that cannot be opened at a restart says that descriptors ran out, and the next start
    delivers what it holds."""
    fake, url = served
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    rng = random.Random(seed * 7919 + spool)
    prefix = f"fd{seed}{'s' if spool else 'm'}-"
    descriptors = Descriptors(monkeypatch)
    path = str(tmp_path / "spool.db") if spool else None
    submitted: list[str] = []
    lost = dead = duplicates = 0
    windows = restarts = pauses = 0

    def new_pipeline() -> EventPipeline:
        nonlocal pauses
        pipeline = make_pipeline(url, path, httpx_path=rng.random() < 0.5)
        sleep = pipeline._sleep

        async def pause(delay: float) -> None:  # (counted: a failure never retries at once, in a hot loop)
            nonlocal pauses
            pauses += 1
            await sleep(delay)

        pipeline._sleep = pause
        return pipeline

    async with contextlib.AsyncExitStack() as stack:
        pipeline = await stack.enter_async_context(running(new_pipeline()))
        for _ in range(8):
            action = rng.choice(["submit", "submit", "exhaust", "free", "restart"])
            if action == "submit":
                for _ in range(rng.randint(1, 150)):
                    submitted.append(f"{prefix}{len(submitted)}")
                    assert pipeline.submit(event(submitted[-1])) is True  # (the request path: never refused)
                if descriptors.out:  # an attempt meets the exhaustion (or a kept-alive connection delivers all)
                    before, outbox = descriptors.refused, pipeline.outbox
                    await until(lambda: descriptors.refused > before or not outbox.unresolved())  # noqa: B023
            elif action == "exhaust" and not descriptors.out:
                descriptors.out, windows = True, windows + 1
            elif action == "free":
                descriptors.out = False
            elif action == "restart":
                restarts += 1
                await stack.aclose()
                stats = pipeline.stats
                lost += stats["lost_at_shutdown"]
                dead += stats["dead_lettered"]
                duplicates += stats["duplicates"]
                pipeline = new_pipeline()
                if descriptors.out and spool:
                    said = await start_error(pipeline)
                    assert "file descriptors" in said and "ulimit -n" in said, said
                    assert "unset it" not in said, said  # (its backlog would stay undelivered in the file)
                    descriptors.out = False
                    pipeline = new_pipeline()
                pipeline = await stack.enter_async_context(running(pipeline))
        descriptors.out = False
        assert await pipeline.flush(15)
        await stack.aclose()
        stats = pipeline.stats
        lost += stats["lost_at_shutdown"]
        dead += stats["dead_lettered"]
        duplicates += stats["duplicates"]

    delivered = ids_in(fake, prefix)
    assert len(delivered) == len(set(delivered)), "an event was ingested twice"
    assert set(delivered) <= set(submitted)
    if spool:
        assert set(delivered) == set(submitted) and lost == 0
    else:  # (a restart under exhaustion: what memory held is lost, counted)
        assert len(submitted) - len(delivered) == lost
    assert dead == 0 and duplicates == 0
    refused = descriptors.refused
    assert refused <= 4 * (pauses + restarts + 1), (refused, pauses)  # (4: concurrency; else a hot loop)
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) <= 8 * (windows + restarts + 1), [r.getMessage()[:120] for r in logged]


# ------------------------------------------------------------------------------------ a large batch


class ConnectsOnlySmallBodies(httpx.AsyncBaseTransport):
    """The descriptors are out whenever the large batch connects: httpcore's ``ConnectError`` from ``OSError(EMFILE)``
    (nothing of the request was written), while the small batches find descriptors (and are delivered)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.out = True
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        if self.out and len(body) >= 1 << 20:
            self.refused += 1
            raise httpx.ConnectError("[Errno 24] Too many open files", request=request) from EMFILE
        return await self.inner.handle_async_request(request)


async def test_a_large_event_refused_a_connection_is_not_dead_lettered_as_too_large() -> None:
    """No answer to a batch of 1 MiB or more is split and struck (a proxy may drop a body over its limit); but a
    connection that could not even be made (EMFILE) sent no byte of the body: that is no evidence against the event.
    Struck, an event of 1 MiB met by exhaustion while smaller batches got through was dead-lettered as too large for
    Lago."""
    fake = FakeLago(api_key=API_KEY)
    edge = ConnectsOnlySmallBodies(fake.transport())
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    client = LagoClient(settings, transport=edge)
    pipeline = EventPipeline(client, flush_interval=0.001, retry_backoff=0.001, max_backoff=0.005, max_attempts=2)
    async with running(pipeline):
        pipeline.submit(event("large", blob="x" * (1 << 20)))
        for index in range(3):
            pipeline.submit(event(f"small{index}"))
        await until(lambda: edge.refused >= 6 or pipeline.stats["dead_lettered"] > 0)
        assert pipeline.stats["dead_lettered"] == 0, pipeline.dead_letters()[0].reason
        edge.out = False  # (descriptors free again: delivered)
        assert await pipeline.flush(10)
    assert sorted(e["transaction_id"] for e in fake.events) == ["large", "small0", "small1", "small2"]


async def test_raw_poster_says_a_connection_never_made(
    served: tuple[FakeLago, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw poster's ``connect()`` failing with EMFILE is a connection never made (nothing was sent), told apart
    from a connection that broke once the request was written."""
    _, url = served
    descriptors = Descriptors(monkeypatch)
    settings = BillingSettings(api_key=API_KEY, api_url=url, retry_backoff=0.001, max_retries=0)
    async with LagoClient(settings) as client:
        assert client._raw is not None
        descriptors.out = True
        with pytest.raises(LagoUnavailableError) as failed:
            await client.send_event_batch_json(b'{"events":[]}')
        cause = failed.value.__cause__
        assert isinstance(cause, RawHTTPError) and "Too many open files" in str(cause)
        assert connection_never_made(failed.value)  # (never sent: a write is resent, nothing reached Lago)


# ------------------------------------------------------------------------------------ a forked worker's pool


async def test_a_forked_child_out_of_descriptors_never_calls_through_the_parents_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forked worker makes its own httpx pool at its first call (the parent's connections are the parent's: an
    answer read on one is the answer to the other process's request). Making it reads the CA bundle (https): out of
    descriptors, that failed with a bare ``OSError`` (an "unexpected error" to the delivery), and the next call went
    through the parent's pool."""
    calls: list[httpx.Request] = []

    def parents(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"events": []})

    settings = BillingSettings(api_key=API_KEY, api_url="https://127.0.0.1:1", retry_backoff=0.001, max_retries=0)
    client = LagoClient(settings)
    client._raw = None  # (a proxy configured: httpx's pool sends the batches)
    await client._http.aclose()
    client._http = httpx.AsyncClient(base_url="https://127.0.0.1:1", transport=httpx.MockTransport(parents))
    client._forked()  # (as os.fork() makes it in the child)

    def out_of_descriptors(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    with monkeypatch.context() as patch:
        patch.setattr(ssl.SSLContext, "load_verify_locations", out_of_descriptors)
        with pytest.raises(LagoUnavailableError):
            await client.send_event_batch_json(b'{"events":[]}')
    with pytest.raises(LagoUnavailableError):  # (its own pool: nothing listens on port 1)
        await client.send_event_batch_json(b'{"events":[]}')
    assert calls == [], "the child called Lago through its parent's connections"
    await client.aclose()


# ------------------------------------------------------------------------------------ real limits, in a subprocess

CHILD = textwrap.dedent(
    """
    import errno, json, logging, os, random, sys
    import anyio
    from lago_org_billing import BillingSettings, LagoClient
    from lago_org_billing._delivery import EventPipeline
    from lago_org_billing._events import event_payload

    url, spool, phase, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    records = []
    logging.basicConfig(level=logging.WARNING, handlers=[logging.Handler()])
    logging.getLogger().handlers[0].emit = records.append
    held = []

    def exhaust():  # every descriptor up to RLIMIT_NOFILE taken, as a busy server's sockets do
        while True:
            try:
                held.append(os.dup(0))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                return

    def free():
        while held:
            os.close(held.pop())

    def make():
        settings = BillingSettings(api_key="test-api-key", api_url=url, retry_backoff=0.002, max_retries=0)
        return EventPipeline(
            LagoClient(settings), spool_path=spool, flush_interval=0.005, commit_window=0.01,
            retry_backoff=0.002, max_backoff=0.02, max_attempts=2, shutdown_timeout=0.2,
        )

    async def main():
        out = {"submitted": [], "start_error": None}
        if phase == "first":
            starting = make()  # (what the app imported and made at its start)
            exhaust()
            try:  # the spool cannot be opened: a clear error, nothing touched
                async with anyio.create_task_group() as tasks:
                    await tasks.start(starting.run)
                    tasks.cancel_scope.cancel()
            except Exception as exc:
                while getattr(exc, "exceptions", None):
                    exc = exc.exceptions[0]
                out["start_error"] = str(exc)
            free()
        pipeline = make()
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for step in range(6):
                if phase == "first":
                    await pipeline.client.close_idle_connections()
                    exhaust()  # (a kept-alive connection would deliver all: none is left)
                for _ in range(rng.randint(1, 150)):
                    name = f"real-{seed}-{len(out['submitted'])}"
                    out["submitted"].append(name)
                    assert pipeline.submit(event_payload(
                        transaction_id=name, external_subscription_id="org_1", code="api_call"))
                if phase == "first":
                    before = pipeline.stats.get("lago_errors_network", 0)
                    with anyio.move_on_after(10):
                        while pipeline.stats.get("lago_errors_network", 0) == before:
                            await anyio.sleep(0.002)
                    free()
                    if step % 2:
                        assert await pipeline.flush(10)
            if phase == "first":  # a crash once the spool holds the rest: the next process delivers them
                exhaust()
                await pipeline.commit()
                free()
                out["stats"] = pipeline.stats
                out["said"] = [r.getMessage()[:600] for r in records]
                print(json.dumps(out), flush=True)
                os._exit(0)
            assert await pipeline.flush(10)
            await pipeline.aclose()
            out["stats"] = pipeline.stats
            out["said"] = [r.getMessage()[:600] for r in records]
            print(json.dumps(out), flush=True)

    anyio.run(main)
    """
)


def run_child(url: str, spool: str, phase: str, seed: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, url, spool, phase, str(seed)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_real_descriptor_limit_then_a_crash_loses_and_duplicates_nothing(
    served: tuple[FakeLago, str], tmp_path: Path
) -> None:
    """With every descriptor taken (``os.dup`` up to the limit) in a real process: the spool cannot be opened at start
    (said so, with what to do); events submitted while connections to Lago cannot be made are kept and delivered once
    descriptors are free, each once; the process then crashes with events in the spool, and the next one delivers
    them."""
    fake, url = served
    spool = str(tmp_path / "spool.db")
    first = run_child(url, spool, "first", 11)
    said = first["start_error"]
    assert said is not None and "file descriptors" in said and "ulimit -n" in said, said
    assert first["stats"]["dead_lettered"] == 0 and first["stats"]["duplicates"] == 0
    assert first["stats"].get("lago_errors_network", 0) > 0  # (exhaustion was met)
    warnings = [line for line in first["said"] if "failed" in line]
    assert len(warnings) <= 12, warnings  # (a line per exhaustion at most, not per event or attempt)
    # what to do, not "check LAGO_API_URL" (anyio says "All connection attempts failed", the EMFILE in its cause)
    assert all("out of file descriptors" in line for line in warnings), warnings
    second = run_child(url, spool, "second", 12)
    assert second["stats"]["dead_lettered"] == 0
    expected = set(first["submitted"]) | set(second["submitted"])
    delivered = ids_in(fake, "real-")
    assert len(delivered) == len(set(delivered)), "an event was ingested twice"
    assert set(delivered) == expected


SPOOL_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import anyio
    from lago_org_billing._spool import SqliteOutbox

    async def main(free, path):
        outbox = SqliteOutbox(path)
        held = []
        try:
            while True:
                held.append(os.dup(0))
        except OSError:
            pass
        for _ in range(free):  # the lock, the database, then its -wal or -shm file cannot be opened
            os.close(held.pop())
        try:
            await outbox.open()
            said = "opened"
            await outbox.close()
        except Exception as exc:
            said = str(exc)
        for fd in held:
            os.close(fd)
        print(json.dumps(said))

    for free in range(5):
        anyio.run(main, free, os.path.join(sys.argv[1], f"spool{free}.db"))
    """
)


def test_a_spool_opened_without_descriptors_left_says_so(tmp_path: Path) -> None:
    """Whichever of its files a spool opening with too few descriptors fails on (the slot lock, the database: an
    ``OSError``; its -wal or -shm file: SQLite's SQLITE_CANTOPEN, "unable to open database file", which says no why),
    the error says that the process is out of descriptors and what to do, not to unset LAGO_SPOOL_PATH or pick a
    writable directory."""
    result = subprocess.run(
        [sys.executable, "-c", SPOOL_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = [json.loads(line) for line in result.stdout.splitlines()]
    assert said[-1] == "opened"
    for message in said[:-1]:
        assert "out of file descriptors" in message and "ulimit -n" in message, message
        assert "unset it" not in message and "writable directory" not in message, message
