"""kill -9 with the SQLite spool, then restart: nothing lost, nothing billed twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from lago_org_billing._delivery import EventPipeline
from lago_org_billing.testing._server import serve_in_thread
from test_delivery import make_client, make_fake, transaction_ids

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHILD = Path(__file__).with_name("_spool_child.py")


def unreachable_url() -> str:
    """A 127.0.0.1 port nobody listens on (bound, never listened, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def start_child(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("LAGO_")},
    )


def wait_for_line(child: subprocess.Popen[str], prefix: str) -> str:
    assert child.stdout is not None
    for line in child.stdout:  # blocks until the child says it, or exits
        if line.startswith(prefix):
            return line
    raise AssertionError(f"child exited ({child.wait()}) before printing {prefix!r}")


def kill_9(child: subprocess.Popen[str]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    try:
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.stdout is not None:
            child.stdout.close()


async def restart_and_drain(path: Path, fake: object) -> EventPipeline:
    async with make_client(fake.transport()) as client:  # type: ignore[attr-defined]
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            assert await pipeline.flush(20)
            await pipeline.aclose()
    return pipeline


async def test_kill_9_while_lago_is_down_loses_nothing(tmp_path: Path) -> None:
    """Events spooled while Lago is down survive kill -9; the restart delivers each exactly once."""
    path = tmp_path / "spool.db"
    count = 2000
    child = start_child(path, unreachable_url(), count)
    try:
        assert wait_for_line(child, "COMMITTED") == f"COMMITTED {count}\n"
    finally:
        kill_9(child)

    fake = make_fake()
    pipeline = await restart_and_drain(path, fake)
    ids = transaction_ids(fake)
    assert len(ids) == len(set(ids)) == count
    assert set(ids) == {f"crash-{i}" for i in range(count)}
    assert pipeline.stats["duplicates"] == 0 and pipeline.dead_letters() == []


async def test_kill_9_mid_delivery_bills_nothing_twice(tmp_path: Path) -> None:
    """Killed after Lago accepted some events but before their rows were deleted: the restart resends
    them, Lago answers value_already_exist, and every event is in Lago exactly once."""
    path = tmp_path / "spool.db"
    count = 1000
    fake = make_fake()
    with serve_in_thread(fake) as url:
        child = start_child(path, url, count, 300)
        try:
            wait_for_line(child, "COMMITTED")
            delivered_before = int(wait_for_line(child, "DELIVERED").split()[1])
        finally:
            kill_9(child)
        accepted_before = len(fake.events)
    assert accepted_before >= delivered_before >= 300

    pipeline = await restart_and_drain(path, fake)
    ids = transaction_ids(fake)
    assert len(ids) == len(set(ids)) == count
    assert set(ids) == {f"crash-{i}" for i in range(count)}
    # the rows delivered before the kill were still in the spool: Lago recognised them as duplicates
    assert pipeline.stats["duplicates"] >= accepted_before
