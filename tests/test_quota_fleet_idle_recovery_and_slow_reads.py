"""The fleet promise (issue #4): quota with ``LAGO_REDIS_URL`` across real uvicorn workers, one redis-server
and the Lago emulator served on 127.0.0.1 (as ``test_quota_workers.py`` and ``test_quota_exactness_across_workers.py``
run them), varied where those tests do not go:

- a worker whose Redis outage began in a quota check and which is idle when Redis answers again never tries Redis
  (its background writer sleeps without a deadline): the calls it counted meanwhile are not added to Redis, and the
  other workers serve an org past its limit;
- calls recorded while a usage read is in flight (a slow Lago) are counted twice once Lago's answer has them, as
  sure records: an org below its limit is refused with a ``Retry-After`` to the period's end, for a whole TTL.

Waits are on conditions (the server answering, Redis keys, the emulator's events and requests), each bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lago_org_billing
from _quota_app import free_port, needs_redis, redis_server, seed
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ORG = "org_1"
COUNT_KEY = "lago_org_billing:quota:{org_1}:count"
SNAP_KEY = "lago_org_billing:quota:{org_1}:snap"


# ------------------------------------------------------------------------------------------------ the served app


def build_app() -> Any:
    """The app each uvicorn worker serves (``--factory``): ``/v1/chat`` (JSON, 10 tokens) and ``/health``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from lago_org_billing import OrgBillingMiddleware

    async def chat(request: Request) -> Response:
        return JSONResponse({"ok": True, "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [Route("/v1/chat", chat, methods=["GET", "POST"]), Route("/health", health)]
    return OrgBillingMiddleware(Starlette(routes=routes))


# ------------------------------------------------------------------------------------------------ harness


@pytest.fixture
def lago() -> Iterator[tuple[FakeLago, str]]:
    fake = FakeLago(api_key="k")
    with serve_in_thread(fake) as url:
        yield fake, url


@contextlib.contextmanager
def server(lago_url: str, redis_url: str | None, log: Path, **env: str) -> Iterator[str]:
    """One uvicorn process (one worker, a port of its own, so that the test picks the worker each request reaches)
    serving :func:`build_app`; its stderr goes to ``log``."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LAGO_")},
        "LAGO_API_URL": lago_url,
        "LAGO_API_KEY": "k",
        "LAGO_ORG_HEADER": "X-Org-Id",
        "LAGO_EXCLUDE_PATHS": "/health",
        "LAGO_QUOTA_COLD_TIMEOUT": "20",
        # the package the test runs with (not whatever is installed), and this file's app
        "PYTHONPATH": os.pathsep.join((str(Path(lago_org_billing.__file__).parents[1]), str(Path(__file__).parent))),
        **env,
    }
    if redis_url is not None:
        environ["LAGO_REDIS_URL"] = redis_url
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", f"{Path(__file__).stem}:build_app", "--factory"]
    command += ["--app-dir", str(ROOT / "tests"), "--port", str(port), "--log-level", "warning", "--no-access-log"]
    command += ["--timeout-keep-alive", "60"]
    with log.open("wb") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)  # graceful: its lifespan flushes its events
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``url``, once it serves."""
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        with anyio.fail_after(60):
            while True:
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await anyio.sleep(0.05)
        yield http


async def burst(http: httpx.AsyncClient, count: int) -> list[httpx.Response]:
    """``count`` concurrent requests of org_1."""
    answers: list[httpx.Response] = []

    async def one() -> None:
        answers.append(await http.get("/v1/chat", headers={"X-Org-Id": ORG}))

    async with anyio.create_task_group() as tasks:
        for _ in range(count):
            tasks.start_soon(one)
    return answers


def statuses(answers: list[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for answer in answers:
        counts[answer.status_code] = counts.get(answer.status_code, 0) + 1
    return counts


async def until(condition: Callable[[], bool], seconds: float = 20) -> bool:
    """Wait for ``condition``, a state of another process (Redis, the emulator's thread), polled (bounded); whether
    it came."""
    with anyio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 (another process's state: no event to wait on)
            await anyio.sleep(0.02)
        return True
    return False


def redis_hget(redis_url: str, key: str, field: str) -> bytes | None:
    redis = __import__("redis").Redis.from_url(redis_url)
    try:
        value: bytes | None = redis.hget(key, field)
        return value
    finally:
        redis.close()


def calls_in_redis(redis_url: str) -> int:
    return int(redis_hget(redis_url, COUNT_KEY, "calls") or 0)


# ------------------------------------------------------------------------------------------------ tests


@needs_redis
async def test_a_worker_idle_when_redis_answers_again_hands_its_outage_calls_to_redis_and_the_fleet_holds_the_limit(
    lago: tuple[FakeLago, str], tmp_path: Path
) -> None:
    """Limit 20, two workers A and B sharing Redis (retry every 1 s). Each serves 1 call; Redis stops (its data saved,
    as a Redis with persistence restarting, or one slower than 2 s, keeps it); A serves 10 calls on its own counts
    (documented: "an org may use what it had left in each"), then gets no more traffic. Redis answers again: "what was
    counted meanwhile is added to it", so the fleet has 12 and B may serve 8. A's outage began in a quota check, its
    background writer sleeps without a deadline and nothing wakes it: A never tries Redis again, its 10 calls are not
    added, and B serves 18 (30 of 20 billed) until its snapshot is due."""
    fake, lago_url = lago
    seed(fake, starter_calls=20)
    port = free_port()
    env = {"LAGO_QUOTA_REDIS_RETRY": "1", "LAGO_USAGE_CACHE_TTL": "300"}
    with contextlib.ExitStack() as redis_up:
        redis_url = redis_up.enter_context(redis_server(tmp_path, port))
        with (
            server(lago_url, redis_url, tmp_path / "a.log", **env) as url_a,
            server(lago_url, redis_url, tmp_path / "b.log", **env) as url_b,
        ):
            async with client(url_a) as a, client(url_b) as b:
                assert statuses(await burst(a, 1)) == {200: 1}
                assert statuses(await burst(b, 1)) == {200: 1}
                assert await until(lambda: len(fake.events) == 2)
                redis = __import__("redis").Redis.from_url(redis_url)
                redis.save()  # (what a Redis with persistence keeps across a restart)
                redis.close()
                redis_up.close()  # Redis stops
                outage = [(await a.get("/v1/chat", headers={"X-Org-Id": ORG})).status_code for _ in range(10)]
                assert outage == [200] * 10  # (A's own counts: 18 left there)
                redis_up.enter_context(redis_server(tmp_path, port))  # Redis answers again, with its data
                assert calls_in_redis(redis_url) == 2
                # A is idle now; within a few of its retry intervals its 10 calls are in Redis
                merged = await until(lambda: calls_in_redis(redis_url) >= 12, seconds=10)
                in_redis = calls_in_redis(redis_url)
                answers = await burst(b, 40)
                served = statuses(answers).get(200, 0)
                assert await until(lambda: len(fake.events) >= 12 + served)
    assert (merged, 2 + 10 + served, len(fake.events)) == (True, 20, 20), (
        f"Redis had {in_redis} calls after 10 retry intervals (A's 10 outage calls not added); "
        f"B then served {served} of the 8 left, {2 + 10 + served} calls billed on a limit of 20"
    )


@needs_redis
async def test_calls_made_during_a_slow_usage_read_never_block_an_org_below_its_limit_until_the_period_end(
    lago: tuple[FakeLago, str], tmp_path: Path
) -> None:
    """Limit 20, one worker on Redis, ``LAGO_FAIL_OPEN=true``, a cold org whose first usage read Lago answers slowly
    (longer than ``LAGO_QUOTA_COLD_TIMEOUT``): 10 calls are let through meanwhile, and their events reach Lago before
    it answers, so its usage has them. The org has used 10 of 20. Documented: records Lago may have counted already
    make at most an unsure block, answered with a ``Retry-After`` of the settle lag, read again at the next request,
    "an org near its limit is not refused below it for a whole TTL". The 10 calls were recorded after the read was
    requested, so the STORE keeps them as calls Lago cannot have: counted twice, 20 of 20, a sure 429 whose
    ``Retry-After`` is the period's end (~36 h), until the snapshot is due (a TTL)."""
    fake, lago_url = lago
    seed(fake, starter_calls=20)
    fake.faults.inject(path="/api/v1/customers", latency_ms=60_000, count=1)  # (released below)
    env = {"LAGO_QUOTA_COLD_TIMEOUT": "1.5", "LAGO_FAIL_OPEN": "true", "LAGO_API_TIMEOUT": "30"}
    with redis_server(tmp_path) as redis_url, server(lago_url, redis_url, tmp_path / "w.log", **env) as url:
        async with client(url) as http:
            assert statuses(await burst(http, 10)) == {200: 10}  # (let through: Lago did not answer in time)
            assert await until(lambda: len(fake.events) == 10), "the 10 calls' events in Lago"
            fake.faults.clear()  # Lago answers the read now: its usage counts the 10 calls
            assert await until(lambda: redis_hget(redis_url, SNAP_KEY, "bc") == b"10"), "Lago's usage (10) stored"
            answer = await http.get("/v1/chat", headers={"X-Org-Id": ORG})
    retry_after = int(answer.headers.get("retry-after", "0"))
    assert answer.status_code == 200 or retry_after <= 6, (
        f"10 of 20 used, answered {answer.status_code} with Retry-After {retry_after} s: {answer.text[:200]}"
    )
