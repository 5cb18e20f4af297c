"""Exactness across real processes: ``uvicorn --workers 4`` sharing one Redis, 1,000 concurrent requests on an
org limited to 300 calls: exactly 300 are served, and exactly 300 events reach Lago."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from _quota_app import REDIS_SERVER, free_port, redis_server, seed
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4


@pytest.fixture
def lago() -> Iterator[tuple[FakeLago, str]]:
    """A seeded emulator (org_1: 300 calls per period) served over HTTP."""
    fake = seed(FakeLago(api_key="k"), starter_calls=300)
    with serve_in_thread(fake) as url:
        yield fake, url


async def test_four_workers_serve_exactly_the_limit(lago: tuple[FakeLago, str], tmp_path: Path) -> None:
    """4 uvicorn workers, one Redis, 1,000 concurrent requests, limit 300: 300 x 200, 700 x 429, 300 events."""
    fake, lago_url = lago
    port = free_port()
    with redis_server(tmp_path) as redis_url:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LAGO_")},
            "LAGO_API_URL": lago_url,
            "LAGO_API_KEY": "k",
            "LAGO_ORG_HEADER": "X-Org-Id",
            "LAGO_REDIS_URL": redis_url,
            "LAGO_EXCLUDE_PATHS": "/health",
            "LAGO_QUOTA_COLD_TIMEOUT": "20",
            "PYTHONPATH": str(ROOT),
        }
        # --app-dir: some installed distributions ship a top-level ``tests`` package that would shadow ours.
        command = [sys.executable, "-m", "uvicorn", "_quota_app:app", "--app-dir", "tests", "--port", str(port)]
        command += ["--workers", str(WORKERS), "--log-level", "warning", "--no-access-log"]
        # A loaded 2-core CI machine must not make the supervisor restart a slow worker mid-test, nor a worker
        # close a keep-alive connection the client is about to reuse.
        command += ["--timeout-worker-healthcheck", "60", "--timeout-keep-alive", "60"]
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
        statuses: list[int] = []
        try:
            statuses = await hammer(f"http://127.0.0.1:{port}", server)
        finally:
            server.send_signal(signal.SIGTERM)  # graceful: each worker's lifespan flushes its events
            try:
                _, err = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                _, err = server.communicate()
            log = err.decode(errors="replace")[-3000:]
            if not statuses:
                print(log)  # the workers' side of a failed run
        assert server.returncode == 0, log
    counts = {status: statuses.count(status) for status in set(statuses)}
    assert counts == {200: 300, 429: 700}, (counts, log)
    assert len(fake.events) == 300


async def hammer(base_url: str, server: subprocess.Popen[bytes]) -> list[int]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as http:
        with anyio.fail_after(30):
            while True:  # until the server accepts connections
                if server.poll() is not None:
                    raise RuntimeError("uvicorn exited before serving")
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await anyio.sleep(0.05)
        statuses: list[int] = []

        async def one() -> None:
            response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
            statuses.append(response.status_code)
            if response.status_code == 429:
                problem = response.json()
                assert (problem["limit_name"], problem["limit"], problem["org_id"]) == ("max_api_calls", 300, "org_1")
                assert int(response.headers["retry-after"]) > 0

        async with anyio.create_task_group() as tasks:
            for _ in range(1000):
                tasks.start_soon(one)
    return statuses
