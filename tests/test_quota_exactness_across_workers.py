"""Quota exactness under concurrency, across real workers: two uvicorn processes (each on a port of its own, so that
the test spreads its requests over both) serving an app behind ``OrgBillingMiddleware``, the Lago emulator served on
127.0.0.1, and (for the Redis cases) a redis-server on 127.0.0.1.

Covers: a burst of 3L requests on an org limited to L calls spread over both workers (exactly L served with Redis, and
what Lago billed is what was served; without Redis, the per-process bound); a token limit with streamed responses whose
tokens are known only at their end; a limit lowered by a ``subscription.updated`` webhook mid-burst.

Requests are held in the app (their bodies are sent by the test only when it says so), so what is in flight is known
without sleeping; waits are on conditions (the server answering, Redis counters, the emulator's events).
"""

from __future__ import annotations

import contextlib
import json
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
from lago_org_billing.testing._webhooks import install_webhooks

pytestmark = [pytest.mark.anyio]


ROOT = Path(__file__).resolve().parent.parent
HMAC_KEY = "review-hmac-key"
TOKENS = 10


# ------------------------------------------------------------------------------------------------ the served app


def build_app() -> Any:
    """The app each uvicorn worker serves (``--factory``): ``/v1/chat`` (JSON, 10 tokens) and ``/v1/stream`` (an
    OpenAI chat stream whose usage comes in its last event), both reading the request body first (the test holds it),
    answering with the worker's pid; ``/webhooks/lago`` (HMAC) and ``/health``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from lago_org_billing import LagoWebhooks, OrgBillingMiddleware

    pid = str(os.getpid())

    async def chat(request: Request) -> Response:
        await request.body()
        usage = {"prompt_tokens": TOKENS // 2, "completion_tokens": TOKENS - TOKENS // 2, "total_tokens": TOKENS}
        return JSONResponse({"ok": True, "usage": usage}, headers={"x-pid": pid})

    async def stream(request: Request) -> Response:
        await request.body()
        tokens = int(request.query_params.get("tokens", TOKENS))

        async def events() -> AsyncIterator[bytes]:
            for word in ("Hello", " there"):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
                chunk["choices"] = [{"index": 0, "delta": {"content": word}}]  # type: ignore[assignment]
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            last = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": []}
            last["usage"] = {"prompt_tokens": 1, "completion_tokens": tokens - 1, "total_tokens": tokens}
            yield b"data: " + json.dumps(last).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"x-pid": pid})

    async def health(request: Request) -> Response:
        return PlainTextResponse(pid)

    routes = [
        Route("/v1/chat", chat, methods=["POST"]),
        Route("/v1/stream", stream, methods=["POST"]),
        Route("/health", health),
        Route("/webhooks/lago", LagoWebhooks(), methods=["POST"]),
    ]
    return OrgBillingMiddleware(Starlette(routes=routes))


# ------------------------------------------------------------------------------------------------ harness


@pytest.fixture
def lago() -> Iterator[tuple[FakeLago, str]]:
    """The emulator, seeded (org_1 on ``starter``: limits set per test), served over HTTP."""
    fake = FakeLago(api_key="k")
    with serve_in_thread(fake) as url:
        yield fake, url


def seeded(fake: FakeLago, *, calls: int | None = None, tokens: int | None = None) -> FakeLago:
    return seed(fake, starter_calls=calls, starter_tokens=tokens)


@contextlib.contextmanager
def workers(lago_url: str, *, redis_url: str | None = None, **env: str) -> Iterator[tuple[list[str], list[str]]]:
    """Two uvicorn workers serving :func:`build_app`, each a process of its own on its own port (so that the test
    spreads its requests over both, which one ``--workers 2`` socket leaves to the kernel: often all to one); yields
    their URLs and a list their stderr lands in at the end."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LAGO_")},
        "LAGO_API_URL": lago_url,
        "LAGO_API_KEY": "k",
        "LAGO_ORG_HEADER": "X-Org-Id",
        "LAGO_EXCLUDE_PATHS": "/health,/webhooks",
        "LAGO_WEBHOOK_HMAC_KEY": HMAC_KEY,
        "LAGO_QUOTA_COLD_TIMEOUT": "20",
        # the package the test runs with (not whatever is installed), and this file's app
        "PYTHONPATH": os.pathsep.join((str(Path(lago_org_billing.__file__).parents[1]), str(Path(__file__).parent))),
        **env,
    }
    if redis_url is not None:
        environ["LAGO_REDIS_URL"] = redis_url
    servers: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    log: list[str] = []
    try:
        for _ in range(2):
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", f"{Path(__file__).stem}:build_app", "--factory"]
            command += ["--app-dir", str(ROOT / "tests"), "--port", str(port), "--log-level", "warning"]
            command += ["--no-access-log", "--timeout-keep-alive", "60"]
            servers.append(
                subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
            urls.append(f"http://127.0.0.1:{port}")
        yield urls, log
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)  # graceful: each worker's lifespan flushes its events
        for server in servers:
            try:
                _, err = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                _, err = server.communicate()
            log.append(err.decode(errors="replace")[-4000:])


class Fleet:
    """Clients of both workers; request ``n`` goes to worker ``n % 2``."""

    def __init__(self, urls: list[str]) -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        self.http = [httpx.AsyncClient(base_url=url, limits=limits, timeout=60) for url in urls]

    async def __aenter__(self) -> Fleet:
        with anyio.fail_after(30):
            for http in self.http:
                while True:
                    try:
                        if (await http.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for http in self.http:
            await http.aclose()

    async def burst(self, count: int, path: str = "/v1/chat", *, hold: Held | None = None) -> list[httpx.Response]:
        """``count`` concurrent requests of org_1, alternately to each worker; with ``hold``, each waits (in the
        app, after the quota check) until it is released."""
        answers: list[httpx.Response] = []

        async def one(n: int) -> None:
            content: Any = hold if hold is not None else b"{}"
            response = await self.http[n % 2].post(path, headers={"X-Org-Id": "org_1"}, content=content)
            await response.aread()
            answers.append(response)

        async with anyio.create_task_group() as tasks:
            for n in range(count):
                tasks.start_soon(one, n)
        return answers


class Held:
    """A request body the test releases when it says (the app reads it before answering)."""

    def __init__(self) -> None:
        self.go = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"{"
        await self.go.wait()
        yield b"}"


def statuses(answers: list[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for answer in answers:
        counts[answer.status_code] = counts.get(answer.status_code, 0) + 1
    return counts


def pids(answers: list[httpx.Response]) -> set[str]:
    return {a.headers["x-pid"] for a in answers if a.status_code == 200}


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition``, a state of another process (Redis, the emulator's thread), polled (bounded)."""
    with anyio.fail_after(15):
        while not condition():  # noqa: ASYNC110 (another process's state: no event to wait on)
            await anyio.sleep(0.01)
    assert condition(), what


async def emit_webhook(fake: FakeLago, url: str, webhook_type: str, delivered: int) -> None:
    """Have the emulator send ``webhook_type`` about org_1's subscription to the worker at ``url`` (HMAC-signed, as
    Lago does) and wait until it was answered 200."""
    dispatcher = install_webhooks(fake, url=url + "/webhooks/lago", signature="hmac", hmac_key=HMAC_KEY)
    subscription = {"external_id": "org_1", "external_customer_id": "org_1", "plan_code": "starter"}
    dispatcher.emit(webhook_type, "subscription", subscription)
    finished = await anyio.to_thread.run_sync(lambda: dispatcher.wait_delivered(delivered))
    assert [d.status for d in finished] == [200] * delivered


# ------------------------------------------------------------------------------------------------ tests


@needs_redis
async def test_with_redis_two_workers_serve_exactly_the_limit_and_lago_bills_what_was_served(
    lago: tuple[FakeLago, str], tmp_path: Path
) -> None:
    """Limit 60, 180 concurrent requests, half to each worker: 60 served, 120 answered 429, 60 events."""
    fake, lago_url = lago
    seeded(fake, calls=60)
    with redis_server(tmp_path) as redis_url, workers(lago_url, redis_url=redis_url) as (urls, log):
        async with Fleet(urls) as fleet:
            answers = await fleet.burst(180)
    assert statuses(answers) == {200: 60, 429: 120}, log
    assert len(fake.events) == 60


async def test_without_redis_each_worker_holds_the_limit_alone(lago: tuple[FakeLago, str]) -> None:
    """In process (no LAGO_REDIS_URL) the limit holds per process, as the quota docs say ("limits then hold per
    process, not per fleet"): each worker serves at most L, the fleet at most 2L, and Lago bills what was served."""
    fake, lago_url = lago
    seeded(fake, calls=60)
    with workers(lago_url) as (urls, log):
        async with Fleet(urls) as fleet:
            answers = await fleet.burst(180)
    served = [a.headers["x-pid"] for a in answers if a.status_code == 200]
    assert all(served.count(pid) <= 60 for pid in set(served)), log
    assert 60 <= len(served) <= 120
    assert len(fake.events) == len(served)


@needs_redis
async def test_streamed_tokens_go_over_by_the_calls_in_flight_only_and_then_block_every_worker(
    lago: tuple[FakeLago, str], tmp_path: Path
) -> None:
    """Token limit 100; 6 streams of 30 tokens in flight at once (tokens known at each stream's end) are all served:
    the overshoot is what was in flight. Once their events are built, every worker answers 429 on tokens."""
    fake, lago_url = lago
    seeded(fake, tokens=100)
    with redis_server(tmp_path) as redis_url, workers(lago_url, redis_url=redis_url) as (urls, log):
        async with Fleet(urls) as fleet:
            hold = Held()
            streams: list[httpx.Response] = []

            async def streaming() -> None:
                streams.extend(await fleet.burst(6, "/v1/stream?tokens=30", hold=hold))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(streaming)
                redis = __import__("redis").Redis.from_url(redis_url)
                try:  # all 6 reserved (in flight in Redis) before any ends
                    key = "lago_org_billing:quota:{org_1}:count"
                    await until(lambda: int(redis.hget(key, "calls") or 0) == 6, "6 calls in flight")
                finally:
                    redis.close()
                hold.go.set()
            assert statuses(streams) == {200: 6}
            await until(lambda: len(fake.events) == 6, "the streams' events in Lago")
            late = 0  # served before the streams' tokens reached Redis from each worker's writer (waited for)
            for http in fleet.http:
                with anyio.fail_after(10):
                    while True:
                        answer = await http.post("/v1/stream", headers={"X-Org-Id": "org_1"}, content=b"{}")
                        if answer.status_code == 429:
                            break
                        late += 1
                        await anyio.sleep(0.02)
            for http in fleet.http:
                answer = await http.post("/v1/stream", headers={"X-Org-Id": "org_1"}, content=b"{}")
                assert answer.status_code == 429, log
                assert answer.json()["limit_name"] == "max_tokens"
    # Lago bills what was served: the 6 streams in flight past the limit, and any served before their tokens were in
    assert sum(int(e["properties"]["total_tokens"]) for e in fake.events) == 6 * 30 + late * 10


@needs_redis
async def test_a_limit_lowered_by_a_webhook_mid_burst_holds_across_the_fleet(
    lago: tuple[FakeLago, str], tmp_path: Path
) -> None:
    """Limit 60; 20 calls in flight; the subscription's limit is lowered to 30 and ``subscription.updated`` reaches
    one worker; then 90 more requests over both: at most 10 are served, and exactly 10 once the fleet can tell; Lago
    bills 30.

    (The read the webhook causes may find the 20 calls in Lago already while they are still within ``settle_lag`` of
    being recorded: counted twice, 40 of 30, the burst is refused as an unsure block, "usage may be lower", asked back
    within seconds. Which of the two the burst meets depends on when the workers deliver: the remaining calls are then
    made one by one until 10 are served.)"""
    fake, lago_url = lago
    seeded(fake, calls=60)
    with redis_server(tmp_path) as redis_url, workers(lago_url, redis_url=redis_url) as (urls, log):
        async with Fleet(urls) as fleet:
            hold = Held()
            first: list[httpx.Response] = []

            async def in_flight() -> None:
                first.extend(await fleet.burst(20, hold=hold))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(in_flight)
                redis = __import__("redis").Redis.from_url(redis_url)
                try:
                    key = "lago_org_billing:quota:{org_1}:count"
                    await until(lambda: int(redis.hget(key, "calls") or 0) == 20, "20 calls in flight")
                finally:
                    redis.close()
                async with httpx.AsyncClient(base_url=lago_url, headers={"Authorization": "Bearer k"}) as api:
                    body = {"entitlements": {"api_quota": {"max_api_calls": 30}}}
                    assert (await api.patch("/api/v1/subscriptions/org_1/entitlements", json=body)).status_code == 200
                await emit_webhook(fake, urls[0], "subscription.updated", 1)
                hold.go.set()
            assert statuses(first) == {200: 20}
            answers = await fleet.burst(90)
            served = statuses(answers).get(200, 0)
            assert served <= 10 and statuses(answers).get(429, 0) == 90 - served, log
            if served < 10:  # (only unsure blocks stop the 10: refused as the usage may be lower than counted)
                assert all("may be lower" in a.json()["detail"] for a in answers if a.status_code == 429)
            with anyio.fail_after(30):
                while served < 10:  # (asked back within settle_lag + 1 s, when the fleet reads Lago again)
                    answer = await fleet.http[served % 2].post("/v1/chat", headers={"X-Org-Id": "org_1"}, content=b"{}")
                    if answer.status_code == 200:
                        served += 1
                    else:
                        assert answer.status_code == 429 and "may be lower" in answer.json()["detail"], log
                        await anyio.sleep(0.1)
            assert statuses(await fleet.burst(20)) == {429: 20}, log
    assert len(fake.events) == 30
