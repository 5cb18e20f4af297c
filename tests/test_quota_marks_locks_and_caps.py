"""The quota gate's Redis writes of settles whose answers are lost, and auth failures in the fleet's count.

A write of settles is a pipeline of one ``SETTLE`` script per settle (the calls of requests recorded or released, their
tokens counted), not a transaction: Redis runs each as it reads it. A write whose answers are lost (the event loop
ending cuts it off, or its connection drops) may have been run by Redis in part, or whole. Writing those settles
again counts them twice (a call recorded twice, an org refused its last calls until its next snapshot); not writing
them loses them (a call held in flight for ``inflight_horizon``, tokens uncounted). Each write leaves marks in Redis
that tell which of its settles Redis ran:

* a write cut off between two of its settles (the loop's end while the pipeline was still being sent: asyncio.run()
  cancels every task, and the connection is closed with the rest of the pipeline unsent): the first settles, which
  Redis ran, are not written again, the others are;
* a write whose connection dropped after Redis ran it (a failover, a proxy or NAT closing it, a server-side
  ``CLIENT KILL``) is not written again once Redis answers: before, every settle of it was written twice.

Also: the app's 401/403 answers (not billed, ``LAGO_BILL_AUTH_FAILURES`` off) release the call reserved for them in
the fleet's count in Redis, and count no token, so that a spoofer naming an org uses none of its quota on any worker.

Real Redis (a redis-server) behind :class:`RedisWire`, a TCP relay that cuts or drops the connection carrying a write
of settles where a test says; Lago is the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import anyio
import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import _resp as resp
from _lifespan import serving_lifespan
from _quota_app import Clock, needs_redis, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, _quota_redis
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = needs_redis

API_KEY = "k"
TOKENS = 7


# ------------------------------------------------------------------------------------------------ the relay


def _is_settle(args: list[bytes]) -> bool:
    """Whether a command is a run of the SETTLE script (keys: the org's count, then its snapshot)."""
    return (
        len(args) > 4
        and args[0].upper() in (b"EVAL", b"EVALSHA")
        and args[2] == b"2"
        and args[3].endswith(b":count")
        and args[4].endswith(b":snap")
    )


class _Link:
    """One client connection relayed to Redis, and what the wire does to it once armed (``mode``)."""

    def __init__(self, wire: RedisWire, client: socket.socket, upstream: socket.socket) -> None:
        self.wire, self.client, self.upstream = wire, client, upstream
        self.mode: str | None = None  # "hold" or "drop": the wire's arming fell on this connection
        self.limit = 0
        self.settles = 0  # settles let through in "hold" mode
        self.held = False  # the rest of what the client sends is held back (never reaches Redis)
        self.sent = 0  # commands let through since the mode was set
        self.answered = 0  # Redis's answers to them

    def requests(self) -> None:
        buffer = b""
        try:
            while data := self.client.recv(65536):
                buffer += data
                out = b""
                while (parsed := resp.command(buffer)) is not None:
                    args, size = parsed
                    command, buffer = buffer[:size], buffer[size:]
                    with self.wire.lock:
                        if self.mode is None and self.wire.armed is not None and _is_settle(args):
                            (self.mode, self.limit), self.wire.armed = self.wire.armed, None
                        if self.held:
                            continue
                        if self.mode == "hold" and _is_settle(args):
                            self.settles += 1
                            if self.settles > self.limit:
                                self.held = True
                                continue
                        if self.mode is not None:
                            self.sent += 1
                    out += command
                if out:
                    self.upstream.sendall(out)
        except OSError:
            pass
        finally:  # the client is gone, and what was held back with it: Redis reads the end of the connection
            with contextlib.suppress(OSError):
                self.upstream.shutdown(socket.SHUT_WR)

    def answers(self) -> None:
        buffer = b""
        try:
            while data := self.upstream.recv(65536):
                buffer += data
                out, done = b"", False
                while (end := resp.answer(buffer)) is not None:
                    answer, buffer = buffer[:end], buffer[end:]
                    with self.wire.lock:
                        if self.mode is not None:
                            self.answered += 1
                        done = self.answered == self.sent and (self.held or self.mode == "drop")
                        dropping = self.mode == "drop"
                    if not dropping:
                        out += answer
                if out:
                    self.client.sendall(out)
                if done:  # Redis ran every command let through
                    if dropping:  # (its answers never reach the client: the connection drops)
                        self.client.shutdown(socket.SHUT_RDWR)
                    self.wire.ran.set()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)


class RedisWire(resp.Relay):
    """A TCP relay in front of a redis-server (``url``). Armed, it acts on the next connection that sends a write of
    settles: :meth:`hold_after` lets its first settles through and holds back the rest (never sent, as a pipeline cut
    off while it was being sent); :meth:`drop_answers` lets the write through and drops the connection instead of
    relaying Redis's answers. ``ran`` is set once Redis answered what it was let through."""

    def __init__(self, target: str) -> None:
        self.armed: tuple[str, int] | None = None
        self.ran = threading.Event()
        super().__init__(target)

    def hold_after(self, settles: int) -> None:
        with self.lock:
            self.armed = ("hold", settles)
            self.ran.clear()

    def drop_answers(self) -> None:
        with self.lock:
            self.armed = ("drop", 0)
            self.ran.clear()

    def link(self, client: socket.socket, upstream: socket.socket) -> None:
        link = _Link(self, client, upstream)
        threading.Thread(target=link.requests, daemon=True).start()
        threading.Thread(target=link.answers, daemon=True).start()


@pytest.fixture
def wire(redis_url: str) -> Iterator[RedisWire]:
    relay = RedisWire(redis_url)
    yield relay
    relay.close()


@pytest.fixture
def prefix() -> str:
    return f"marks-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def counts(redis_url: str, prefix: str) -> Iterator[Callable[[], dict[str, int]]]:
    """The fleet's count of org_1 in Redis (read on Redis itself, not through the wire): calls recorded, tokens,
    calls still in flight."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def read() -> dict[str, int]:
        fields = cast(dict[str, str], client.hgetall(f"{prefix}{{org_1}}:count"))
        return {
            "recorded": sum(int(v) for k, v in fields.items() if k.startswith("c:")),
            "tokens": int(fields.get("tokens", 0)),
            "in_flight": sum(int(v) for k, v in fields.items() if k.startswith("i:")),
        }

    yield read
    client.close()


def gate_on(lago: LagoClient, clock: Clock, url: str, prefix: str, **config: Any) -> QuotaGate:
    settings = lago.settings.replace(redis_url=url)
    return QuotaGate(settings, lago, config=QuotaConfig(redis_prefix=prefix, **config), clock=clock.time)


def lago_settings(fake: FakeLago) -> BillingSettings:
    return BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)


# ------------------------------------------------------------------------------------------ 1. cut writes


@pytest.fixture
def marked_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mark after every settle (the default is one every ``_MARK_EVERY``: a mark costs the client a command): what
    Redis ran of a write, read to the settle."""
    monkeypatch.setattr(_quota_redis, "_MARK_EVERY", 1)


def test_a_write_cut_off_between_its_settles_by_the_loops_end_counts_each_call_once(
    wire: RedisWire, prefix: str, counts: Callable[[], dict[str, int]], marked_each: None
) -> None:
    """A write of six settles that the loop's end cut off after Redis ran its first two (the rest never sent) has
    only the other four written again: each call recorded once, its tokens once, none in flight. Before, the write's
    mark (set after its last settle) was missing, and all six were written again: eight calls recorded, an org on an
    8-call plan refused its seventh call."""
    clock = Clock()
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=8)

    async def cut() -> None:
        async with LagoClient(lago_settings(fake), transport=fake.transport()) as lago:
            gate = gate_on(lago, clock, wire.url, prefix)
            # (its background work in a task of the loop, as the middleware starts it without a lifespan)
            asyncio.get_running_loop().create_task(gate.run())
            decisions = [await gate.check("org_1") for _ in range(6)]
            assert all(d.allowed for d in decisions)
            wire.hold_after(2)
            for decision in decisions:  # (queued together: one write)
                gate.settle("org_1", decision, tokens=TOKENS, billed=True)
            assert await anyio.to_thread.run_sync(wire.ran.wait, 10)  # Redis ran the first two settles

    asyncio.run(cut())
    assert counts() == {"recorded": 6, "tokens": 6 * TOKENS, "in_flight": 0}

    async def next_loop() -> None:
        async with LagoClient(lago_settings(fake), transport=fake.transport()) as lago:
            gate = gate_on(lago, clock, wire.url, prefix)
            decisions = [await gate.check("org_1") for _ in range(3)]
            assert [d.allowed for d in decisions] == [True, True, False]  # the plan's 7th and 8th calls, then 429
            await gate.aclose()

    asyncio.run(next_loop())


# ------------------------------------------------------------------------------------- 2. dropped answers


@pytest.mark.anyio
async def test_a_write_whose_connection_dropped_after_redis_ran_it_is_not_written_again(
    wire: RedisWire, prefix: str, counts: Callable[[], dict[str, int]]
) -> None:
    """A write of settles Redis ran, whose connection dropped before its answers came (a failover, a proxy closing
    it), is not written again once Redis answers: its calls are recorded once. Before, it was written again whole
    (every call of it recorded twice, a 4-call plan refused its fourth call after three)."""
    clock = Clock()
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=4)
    async with LagoClient(lago_settings(fake), transport=fake.transport()) as lago:
        gate = gate_on(lago, clock, wire.url, prefix, redis_retry_interval=0)
        backend: Any = gate.backend
        try:
            decisions = [await gate.check("org_1") for _ in range(3)]
            wire.drop_answers()
            for decision in decisions:
                gate.settle("org_1", decision, tokens=TOKENS, billed=True)
            await backend.flush()  # Redis ran it; the answers were lost with the connection
            assert wire.ran.is_set() and backend.stats["redis_errors"] == 1
            await backend.flush()  # Redis answers again
            assert counts() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}
            assert (await gate.check("org_1")).allowed  # the plan's fourth call
        finally:
            await gate.aclose()


@pytest.mark.anyio
async def test_a_write_timed_out_after_redis_ran_its_first_settle_writes_only_the_others(
    wire: RedisWire, prefix: str, counts: Callable[[], dict[str, int]], marked_each: None
) -> None:
    """A write of which Redis got only the first settle (the rest stuck on the way, no answer within
    ``redis_timeout``) has only the other three written once Redis answers: every call recorded once, none held in
    flight. Before, all four were written again, the first counted twice."""
    clock = Clock()
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=10)
    async with LagoClient(lago_settings(fake), transport=fake.transport()) as lago:
        gate = gate_on(lago, clock, wire.url, prefix, redis_retry_interval=0, redis_timeout=0.5)
        backend: Any = gate.backend
        try:
            decisions = [await gate.check("org_1") for _ in range(4)]
            wire.hold_after(1)
            for decision in decisions:
                gate.settle("org_1", decision, tokens=TOKENS, billed=True)
            await backend.flush()  # (no answer to the rest: its time runs out)
            assert wire.ran.is_set() and backend.stats["redis_errors"] == 1
            await backend.flush()
            assert counts() == {"recorded": 4, "tokens": 4 * TOKENS, "in_flight": 0}
        finally:
            await gate.aclose()


# ------------------------------------------------------------------------------------ 3. auth failures


async def guarded(request: Request) -> Response:
    """The app's own auth: a bad key is answered 401 (with a usage body, as an LLM gateway's error may carry)."""
    usage = {"usage": {"total_tokens": TOKENS}}
    if request.headers.get("authorization") != "Bearer good":
        return JSONResponse({"error": "bad credentials", **usage}, status_code=401)
    return JSONResponse(usage)


@pytest.mark.anyio
async def test_401_answers_on_one_worker_leave_the_fleets_count_whole(
    redis_url: str, prefix: str, counts: Callable[[], dict[str, int]]
) -> None:
    """Ten calls naming org_1 with bad credentials, answered 401 by one worker, hold nothing in the fleet's count in
    Redis (their reserved calls released, their tokens not counted): another worker serves the org its three calls,
    then 429."""
    fake = seed(FakeLago(api_key=API_KEY), starter_calls=3, starter_tokens=10 * TOKENS)
    settings = BillingSettings(
        api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", redis_url=redis_url, max_retries=0
    )

    def worker() -> OrgBillingMiddleware:
        app = Starlette(routes=[Route("/chat", guarded)])
        return OrgBillingMiddleware(
            app, settings, transport=fake.transport(), quota_config=QuotaConfig(redis_prefix=prefix)
        )

    spoofed_on, served_on = worker(), worker()
    org = {"X-Org-Id": "org_1"}
    async with serving_lifespan(spoofed_on), serving_lifespan(served_on):
        spoofed = httpx.AsyncClient(transport=httpx.ASGITransport(app=spoofed_on), base_url="http://a")
        served = httpx.AsyncClient(transport=httpx.ASGITransport(app=served_on), base_url="http://b")
        async with spoofed, served:
            bad = [
                (await spoofed.get("/chat", headers={**org, "Authorization": "Bearer x"})).status_code
                for _ in range(10)
            ]
            gate = spoofed_on.quota
            assert isinstance(gate, QuotaGate)
            await cast(Any, gate.backend).flush()
            assert counts() == {"recorded": 0, "tokens": 0, "in_flight": 0}
            good = [
                (await served.get("/chat", headers={**org, "Authorization": "Bearer good"})).status_code
                for _ in range(4)
            ]
    assert bad == [401] * 10
    assert good == [200, 200, 200, 429]
    assert counts() == {"recorded": 3, "tokens": 3 * TOKENS, "in_flight": 0}
    assert len(fake.events) == 3


def test_a_write_cut_off_between_its_marks_counts_at_most_the_settles_since_its_last_mark_twice(
    wire: RedisWire, prefix: str, counts: Callable[[], dict[str, int]]
) -> None:
    """With a mark every ``_MARK_EVERY`` settles (16), a write of 20 cut off after Redis ran 18 has the 4 after its
    16th mark written again: the 17th and 18th counted twice (never under-counted; until the org's next snapshot),
    not all 20 as with one mark at the end. Nothing is left in flight."""
    assert _quota_redis._MARK_EVERY == 16
    clock = Clock()
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=100)

    async def cut() -> None:
        async with LagoClient(lago_settings(fake), transport=fake.transport()) as lago:
            gate = gate_on(lago, clock, wire.url, prefix)
            asyncio.get_running_loop().create_task(gate.run())
            decisions = [await gate.check("org_1") for _ in range(20)]
            wire.hold_after(18)
            for decision in decisions:
                gate.settle("org_1", decision, tokens=TOKENS, billed=True)
            assert await anyio.to_thread.run_sync(wire.ran.wait, 10)

    asyncio.run(cut())
    assert counts() == {"recorded": 22, "tokens": 22 * TOKENS, "in_flight": 0}
