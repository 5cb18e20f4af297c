"""Review of the durable spool under hostile disks and oversized events.

* An event larger than the way to Lago takes sits at the head of the spool, and a proxy before Lago drops the
  connection on it without an answer (a reset of a body over its limit, or a body too slow to upload within
  LAGO_API_TIMEOUT), not a clean 413: the batch holding it failed as "Lago did not answer" and was retried forever,
  with every event spooled behind it (delivery stopped for good, the spool growing). A large batch failing without an
  answer is now split like a 5xx one: the events behind it are delivered, and the culprit is dead-lettered once it has
  failed alone in enough healthy intervals. A guard: in a real outage, large batches are split and retried, and no
  event is struck.
* The spool's volume is full as the process starts (SQLite's ``disk I/O error`` opening a WAL file, made for real with
  ``RLIMIT_FSIZE`` in a child process): the error told the user to set LAGO_SPOOL_PATH "to a file path in a writable
  directory", or to unset it (abandoning the events the file holds), not that the volume is full.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from _limited_proxy import serve_limited_proxy
from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._settings import BillingSettings
from lago_org_billing.testing import FakeLago
from test_delivery import API_KEY, events, make_fake, transaction_ids
from test_delivery_deployment import until
from test_spool import rows

pytestmark = pytest.mark.anyio

#: Bodies over this many bytes are dropped, unanswered, by the proxy of these tests.
_PROXY_LIMIT = 1_500_000


async def _reset(stream: anyio.abc.SocketStream) -> None:
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, no answer


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[FakeLago, str]]:
    """The emulator behind a proxy on 127.0.0.1 that resets requests over ``_PROXY_LIMIT`` bytes: (emulator, URL)."""
    fake = make_fake()
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(serve_limited_proxy, fake, _PROXY_LIMIT, _reset)
        yield fake, f"http://127.0.0.1:{port}"
        tasks.cancel_scope.cancel()


async def test_an_oversized_event_a_proxy_drops_unanswered_does_not_stop_delivery_for_good(
    tmp_path: Path, proxied: tuple[FakeLago, str]
) -> None:
    """A 2 MB event at the head of the spool, 60 events behind it, a proxy resetting bodies over 1.5 MB: every other
    event is delivered once, the big one is dead-lettered (saying why), and nothing stays in the spool."""
    fake, url = proxied
    path = tmp_path / "spool.db"
    settings = BillingSettings(api_key=API_KEY, api_url=url, retry_backoff=0.001, max_retries=0, api_timeout=5)
    async with LagoClient(settings) as client:
        assert client._raw is not None  # the production path: the raw poster, over a real socket
        pipeline = EventPipeline(
            client, spool_path=str(path), flush_interval=0.0, max_backoff=0.005, max_attempts=3, concurrency=1
        )
        [huge] = events(1, prefix="huge", properties={"blob": "x" * 2_000_000})
        await pipeline.commit()  # spooled before the small ones: the oldest row
        assert pipeline.submit(huge)
        await pipeline.commit()
        for event in events(60, prefix="small"):
            assert pipeline.submit(event)
        sent = [f"small{i}" for i in range(60)]
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await until(lambda: pipeline.stats["delivered"] == 60)  # not held back by the event at the head
            # traffic goes on: each event delivered is a healthy interval, in which the big one is struck once
            for round_ in range(20):
                if pipeline.stats["dead_lettered"]:
                    break
                [event] = events(1, prefix=f"more{round_}-")
                assert pipeline.submit(event)
                sent.append(event["transaction_id"])
                await until(lambda: pipeline.stats["delivered"] == len(sent))
            assert await pipeline.flush(10), pipeline.stats
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == sorted(sent)
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "huge0"
    assert "too large" in letter.reason and "proxy" in letter.reason, letter.reason
    assert pipeline.stats["duplicates"] == 0
    assert rows(path) == 0


class _Outage(httpx.AsyncBaseTransport):
    """Lago unreachable: every request fails to connect (counted)."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        raise httpx.ConnectError("connection refused", request=request)


async def test_large_batches_in_an_outage_strike_no_event(tmp_path: Path) -> None:
    """Lago down while large events wait: their batches are split and retried, none of them dead-lettered, all kept
    in the spool."""
    path = tmp_path / "spool.db"
    outage = _Outage()
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    async with LagoClient(settings, transport=outage) as client:
        pipeline = EventPipeline(
            client,
            spool_path=str(path),
            flush_interval=0.0,
            max_backoff=0.002,
            max_attempts=2,
            concurrency=1,
            shutdown_timeout=0.1,  # (Lago stays down: the shutdown leaves them in the spool, as it would after 5 s)
        )
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(8, prefix="big", properties={"blob": "y" * 400_000}):
                assert pipeline.submit(event)
            await pipeline.commit()
            # many attempts, splits and retries through the outage (waited for, not counted in a time: a loaded
            # machine made fewer in a fixed 0.5 s), none of which struck an event out
            await until(lambda: outage.requests > 20)
            assert pipeline.stats["delivered"] == 0 and pipeline.stats["dead_lettered"] == 0, pipeline.stats
            await pipeline.aclose()
    assert pipeline.stats["dead_lettered"] == 0
    assert pipeline.dead_letters() == []
    assert rows(path) == 8


_FULL_VOLUME_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import anyio
    from lago_org_billing._spool import SqliteOutbox

    async def main(path):
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # no file may grow: a full volume
        try:
            await SqliteOutbox(path).open()
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        else:
            print(json.dumps({"error": None}))

    anyio.run(main, sys.argv[1])
    """
)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_spool_on_a_full_volume_at_start_says_the_volume_is_full(tmp_path: Path) -> None:
    """A spool holding a backlog, and a volume that takes no more bytes as the process starts: the error says the
    volume is full, to free space on it, and that the file's events wait there; not to pick another path or unset
    LAGO_SPOOL_PATH, which would leave them undelivered."""
    path = tmp_path / "spool.db"

    async def backlog() -> None:
        from lago_org_billing._spool import SqliteOutbox

        outbox = SqliteOutbox(str(path))
        await outbox.open()
        for event in events(5, prefix="kept"):
            outbox.put(event)
        await outbox.commit()
        await outbox.close()

    anyio.run(backlog)
    assert rows(path) == 5
    child = subprocess.run(
        [sys.executable, "-c", _FULL_VOLUME_CHILD, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr
    said = json.loads(child.stdout.strip().splitlines()[-1])
    assert said["error"] == "ConfigurationError", said
    message: str = said["message"].lower()
    assert "full" in message and "free space" in message, message
    assert "writable directory" not in message and "unset it" not in message, message
    assert rows(path) == 5  # untouched
