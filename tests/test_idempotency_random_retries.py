"""Seeded, model-checked sequences of idempotent retries (``idempotency_header`` with ``LAGO_REDIS_URL``) on two
workers (two middlewares, each with its own memory) sharing a real ``redis-server`` on 127.0.0.1 through a relay that
can refuse connections (Redis down), drop them (a restart, an idle timeout: data kept) or come back empty (a restart
without persistence); the middlewares' wall clock moves, past a day at times; the events go to the Lago emulator
(ClickHouse store: one event per transaction id and timestamp), whose answers are lost now and then after it stored
a batch (the batch is sent again).

What the README promises (Delivery, ``idempotency_header``; Running it in production, Redis), the model's rules:

* Each request's event has a ``transaction_id`` and a timestamp fixed when it is made: a resend is byte-identical.
* Requests of one org, method, route and key (the first non-empty value of the header, taken whole) are one
  transaction: one ``transaction_id`` (an HMAC of them), never shared with another org, route, method or key, and the
  first one's timestamp, remembered for a day: in Redis, so that a retry reaching the other worker is the same event;
  while Redis is down, in each process (a retry reaching the other worker gets its own timestamp meanwhile, said once
  per outage). Redis restarted empty forgets the first timestamps (a worker that remembers one gives it to Redis
  again). Requests without a key (no header, or empty values only) are an event each.
* Every billed request reaches Lago (Redis down or not), under the org, route and method it was made with.

The oracle (:func:`violations`): Lago's events, each traced back to the request whose event it is by its ``user_id``
(one user per request), are exactly the model's (transaction id per transaction, the set of timestamps per
transaction); each body sent again is byte-identical to the first; ``stats["idempotent_retries"]`` is the model's
count of retries per worker; each worker says the outage once per outage (WARNING) and its end (INFO), nothing else
at WARNING or above; every first timestamp in Redis is kept for a day (its TTL). Redis's own expiry runs on its own
clock: a day of the middlewares' clock passing, the keys it would have expired are deleted (the processes' memory of
first timestamps runs on the middlewares' clock here too).

Nothing waits on a clock: a request held in the app (two attempts of one transaction in flight at once) is released
by an event once the other attempt is recorded. Waiting for the redis-server to listen is the suite's bounded
readiness poll of another process (:func:`_quota_app.redis_server`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import random
import socket
import threading
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
import redis
from cachetools import TTLCache
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import _resp as resp
from _quota_app import REDIS_SERVER
from lago_org_billing import BillingSettings, OrgBillingMiddleware, _idempotency, _middleware
from lago_org_billing.testing import FakeLago

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

LOGGER = "lago_org_billing.middleware"
PREFIX = "lago_org_billing:first_seen:"
DAY = 86_400
T0 = 1_700_000_000.0
HEADER = b"idempotency-key"
#: The worker serving the running task's request (the middleware's records are told apart by it).
WORKER: contextvars.ContextVar[int] = contextvars.ContextVar("WORKER", default=-1)

#: (method, path, route template): two paths of one template are one route.
ROUTES = [
    ("GET", "/v1/chat", "/v1/chat"),
    ("POST", "/v1/chat", "/v1/chat"),
    ("POST", "/v1/items/1", "/v1/items/{item_id}"),
    ("POST", "/v1/items/2", "/v1/items/{item_id}"),
    ("GET", "/v1/other", "/v1/other"),
]
ORGS = ["org_1", "org_2"]
#: Keys a client may send: ordinary ones, empty, whitespace, very long, unicode (UTF-8), control characters.
KEYS = [
    b"k-1",
    b"k-2",
    b"k-1 ",
    b"",
    b" ",
    b"\t",
    b"k" * 6000,
    "ключ-ü-🔑".encode(),
    b"\x00\x01\x1f\x7f",
]


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class Req:
    """One request of a sequence: where it goes, what it carries, and what the model expects of it."""

    n: int
    worker: int
    org: str
    method: str
    path: str
    route: str
    values: list[bytes]  # the idempotency header's values, in order (duplicates of the header: several)
    start: float = 0.0
    expected: float = 0.0  # the timestamp of its event
    retry: bool = False

    @property
    def user(self) -> str:
        return f"u{self.n}"

    @property
    def key(self) -> bytes | None:
        """What the README calls the key: the header's value (the first non-empty one of its duplicates)."""
        return next((value for value in self.values if value), None)

    @property
    def transaction(self) -> tuple[Any, ...]:
        key = self.key
        return ("solo", self.n) if key is None else (self.org, self.method, self.route, key)

    def headers(self) -> list[tuple[bytes, bytes]]:
        ids = [(b"x-org-id", self.org.encode()), (b"x-user-id", self.user.encode())]
        return ids + [(HEADER, value) for value in self.values]


@dataclass
class Model:
    """What the README promises, as state: the first timestamps Redis holds (while it is up; a restart without
    persistence and a day forget them) and each process's own (kept a day); whether each worker said the outage."""

    redis_up: bool = True
    redis: dict[tuple[Any, ...], float] = field(default_factory=dict)
    memory: list[dict[tuple[Any, ...], float]] = field(default_factory=lambda: [{}, {}])
    down_said: list[bool] = field(default_factory=lambda: [False, False])
    warnings: list[int] = field(default_factory=lambda: [0, 0])
    recoveries: list[int] = field(default_factory=lambda: [0, 0])
    retries: list[int] = field(default_factory=lambda: [0, 0])
    requests: list[Req] = field(default_factory=list)

    def recorded(self, req: Req) -> None:
        """A request's event is made (in the order the workers record them)."""
        self.requests.append(req)
        if req.key is None:
            req.expected = req.start
            return
        t, w, memory = req.transaction, req.worker, self.memory[req.worker]
        if self.redis_up:
            if self.down_said[w]:
                self.recoveries[w] += 1
                self.down_said[w] = False
            first = self.redis.get(t, memory.get(t, req.start))
            self.redis[t] = first
        else:
            if not self.down_said[w]:
                self.warnings[w] += 1
                self.down_said[w] = True
            first = memory.get(t, req.start)
        req.retry = t in memory or first != req.start
        req.expected = memory[t] = first
        self.retries[w] += req.retry

    def day_passed(self) -> None:
        self.redis.clear()
        for memory in self.memory:
            memory.clear()


def _epoch_ms(timestamp: str) -> Decimal:
    """Lago's timestamp of an event (ISO 8601, milliseconds) as epoch seconds."""
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return Decimal(round(moment.timestamp() * 1000)) / 1000


def violations(model: Model, events: list[dict[str, Any]], workers: list[OrgBillingMiddleware]) -> list[str]:
    """What Lago holds and the workers counted, against the model (see the module's docstring)."""
    found: list[str] = []
    by_user = {req.user: req for req in model.requests}
    ids: dict[tuple[Any, ...], set[str]] = {}
    stamps: dict[tuple[Any, ...], set[Decimal]] = {}
    for event in events:
        properties = event["properties"]
        req = by_user.get(properties.get("user_id"))
        if req is None:
            found.append(f"an event of no request: {event}")
            continue
        where = (req.org, req.org, req.route, req.method)
        got = (event["external_subscription_id"], properties["org_id"], properties["endpoint"], properties["method"])
        if got != where:
            found.append(f"request {req.n} billed as {got}, made as {where}")
        stamp = _epoch_ms(event["timestamp"])
        if stamp != Decimal(f"{req.expected:.3f}"):
            found.append(f"request {req.n}'s event has timestamp {stamp}, expected {req.expected:.3f}")
        ids.setdefault(req.transaction, set()).add(event["transaction_id"])
        stamps.setdefault(req.transaction, set()).add(stamp)
    expected: dict[tuple[Any, ...], set[Decimal]] = {}
    for req in model.requests:
        expected.setdefault(req.transaction, set()).add(Decimal(f"{req.expected:.3f}"))
    for transaction, want in expected.items():
        if stamps.get(transaction, set()) != want:
            held = stamps.get(transaction)
            found.append(f"transaction {transaction!r:.120}: timestamps {held} in Lago, expected {want}")
        if len(ids.get(transaction, ())) > 1:
            found.append(f"transaction {transaction!r:.120} has several transaction ids: {ids[transaction]}")
    owners = Counter(tid for tids in ids.values() for tid in tids)
    found += [f"transaction id {tid} shared by {count} transactions" for tid, count in owners.items() if count > 1]
    for w, worker in enumerate(workers):
        counted = worker.stats.get("idempotent_retries", 0)
        if counted != model.retries[w]:
            found.append(f"worker {w} counted {counted} retries, not {model.retries[w]}")
    return found


# ------------------------------------------------------------------------------------------------ the world


class Relay(resp.StallingRelay):
    """A TCP relay in front of the redis-server: :meth:`down` closes its port (connections are refused, those open
    are cut) until :meth:`up` opens it again; :meth:`cut` drops the connections open (a restart, Redis's ``timeout``
    or a proxy's closing idle clients) and lets new ones through; while ``stalled`` nothing passes either way (a
    network partition dropping packets, a frozen node: calls get no answer)."""

    def cut(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def down(self) -> None:
        self.port = self.listener.getsockname()[1]
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # (wakes the thread accepting: the port is free at once)
        self.listener.close()
        self.cut()

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # (SO_REUSEADDR: the port just closed)
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()


class AnswersLost(httpx.AsyncBaseTransport):
    """The emulator's transport, an answer to ``POST /events/batch`` lost now and then after Lago stored the batch
    (the pipeline sends it again); every body sent is kept."""

    def __init__(self, lago: FakeLago, rng: random.Random) -> None:
        self.inner = lago.transport()
        self.rng = rng
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/events/batch"):
            self.bodies.append(body)
            if response.status_code == 200 and self.rng.random() < 0.3:
                await response.aread()
                raise httpx.ReadError("the connection dropped before Lago's answer", request=request)
        return response


class Holds:
    """Requests the app holds until released (``x-hold: <n>``): two attempts of one transaction in flight at once."""

    def __init__(self) -> None:
        self.entered: dict[str, anyio.Event] = {}
        self.release: dict[str, anyio.Event] = {}

    def hold(self, n: int) -> tuple[anyio.Event, anyio.Event]:
        self.entered[str(n)], self.release[str(n)] = anyio.Event(), anyio.Event()
        return self.entered[str(n)], self.release[str(n)]

    async def endpoint(self, request: Request) -> Response:
        hold = request.headers.get("x-hold")
        if hold is not None:
            self.entered[hold].set()
            await self.release[hold].wait()
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        return JSONResponse({"ok": True, "usage": usage})


@dataclass
class World:
    rng: random.Random
    model: Model
    lago: FakeLago
    transport: AnswersLost
    relay: Relay
    admin: redis.Redis
    workers: list[OrgBillingMiddleware]
    holds: Holds
    clock: list[float]
    stalls: bool = False  # (Redis may stop answering: each call then waits for its timeout)
    n: int = 0

    def new(self, worker: int, org: str, route: tuple[str, str, str], values: list[bytes]) -> Req:
        self.n += 1
        return Req(self.n, worker, org, *route, values=values)

    async def send(self, req: Req, hold: str | None = None) -> None:
        req.start = self.clock[0]
        WORKER.set(req.worker)  # (this task's: what the worker logs while it serves the request is told apart)
        headers = req.headers() + ([(b"x-hold", hold.encode())] if hold else [])
        app = httpx.ASGITransport(app=self.workers[req.worker])
        async with httpx.AsyncClient(transport=app, base_url="http://app") as http:
            answer = await http.request(req.method, req.path, headers=headers)
        assert answer.status_code == 200, answer.text

    async def delivered(self, worker: int) -> None:
        assert await self.workers[worker].pipeline.flush(5)

    def tick(self) -> None:
        """The clock moves on (a few milliseconds to ten minutes: a day of them is more than a sequence's)."""
        self.clock[0] = round(self.clock[0] + self.rng.choice([0.001, 0.25, 3, 600]) * self.rng.random() + 0.001, 3)


@contextlib.asynccontextmanager
async def world(
    seed: int, redis_url: str, monkeypatch: pytest.MonkeyPatch, redis_timeout: float | None = None
) -> AsyncIterator[World]:
    clock = [T0]
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    # (the processes' memory of first timestamps is kept a day of the same clock)
    monkeypatch.setattr(_middleware, "TTLCache", functools.partial(TTLCache, timer=lambda: clock[0]))
    if redis_timeout is not None:  # (how long a Redis call may go unanswered: short where Redis stalls on purpose)
        monkeypatch.setattr(_idempotency, "_REDIS_TIMEOUT", redis_timeout, raising=False)
    rng = random.Random(seed)
    lago = FakeLago(api_key="k", event_store="clickhouse")
    transport = AnswersLost(lago, random.Random(seed * 7919))
    admin = redis.Redis.from_url(redis_url)
    admin.flushdb()
    relay = Relay(redis_url)
    settings = BillingSettings(
        api_url=lago.base_url,
        api_key="k",
        org_header="X-Org-Id",
        user_header="X-User-Id",
        quota_mode="off",
        redis_url=relay.url,
        retry_backoff=0.001,
        api_timeout=3,  # (the bound the middleware puts on a Redis call: below redis-py 8's own 5 s socket timeout)
    )
    holds = Holds()
    routes = [Route(path, holds.endpoint, methods=["GET", "POST"]) for path in ("/v1/chat", "/v1/items/{item_id}")]
    routes.append(Route("/v1/other", holds.endpoint, methods=["GET", "POST"]))
    workers = [
        OrgBillingMiddleware(
            Starlette(routes=routes), settings, idempotency_header="Idempotency-Key", transport=transport
        )
        for _ in range(2)
    ]
    try:
        yield World(rng, Model(), lago, transport, relay, admin, workers, holds, clock)
    finally:
        for worker in workers:
            await worker.aclose()
        relay.close()
        admin.close()


def _values(rng: random.Random) -> list[bytes]:
    """The idempotency header's values: none, one, or duplicates of the header."""
    shape = rng.random()
    if shape < 0.1:
        return []
    if shape < 0.8:
        return [rng.choice(KEYS)]
    return [rng.choice(KEYS), rng.choice(KEYS)]


def _next(w: World) -> Req:
    """A retry of an earlier request (on either worker), the same key with one thing changed, or a new request."""
    done = [req for req in w.model.requests if req.values]
    draw = w.rng.random()
    if done and draw < 0.5:
        was = w.rng.choice(done)
        return w.new(w.rng.randrange(2), was.org, (was.method, was.path, was.route), list(was.values))
    if done and draw < 0.75:
        was = w.rng.choice(done)
        org, route = was.org, (was.method, was.path, was.route)
        if w.rng.random() < 0.5:
            org = w.rng.choice(ORGS)
        else:
            route = w.rng.choice(ROUTES)
        return w.new(w.rng.randrange(2), org, route, list(was.values))
    return w.new(w.rng.randrange(2), w.rng.choice(ORGS), w.rng.choice(ROUTES), _values(w.rng))


async def step(w: World) -> None:
    draw = w.rng.random()
    if draw < 0.08:  # Redis down (refusing connections, or not answering), or back
        if w.relay.stalled:
            w.relay.stalled = False
        elif not w.model.redis_up:
            w.relay.up()
        elif w.stalls and w.rng.random() < 0.3:
            w.relay.stalled = True
        else:
            w.relay.down()
        w.model.redis_up = not w.model.redis_up
        return
    if draw < 0.13 and w.model.redis_up:  # the connections dropped (a restart with persistence, an idle timeout)
        w.relay.cut()
        return
    if draw < 0.16 and w.model.redis_up:  # restarted without persistence: every first timestamp forgotten
        w.relay.cut()
        w.admin.flushdb()
        w.model.redis.clear()
        return
    if draw < 0.19:  # a day passes: Redis expires the first timestamps, as each process forgets its own
        w.clock[0] += DAY + 1
        w.admin.delete(*w.admin.keys(PREFIX + "*") or [PREFIX])
        w.model.day_passed()
        return
    w.tick()
    req = _next(w)
    if draw < 0.27 and req.key is not None:  # two attempts in flight at once: the second one is recorded first
        entered, release = w.holds.hold(req.n)
        other = w.new(1 - req.worker, req.org, (req.method, req.path, req.route), list(req.values))
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(w.send, req, hold=str(req.n)))
            await entered.wait()
            w.tick()
            await w.send(other)
            w.model.recorded(other)
            await w.delivered(other.worker)
            release.set()
        w.model.recorded(req)
        await w.delivered(req.worker)
        return
    await w.send(req)
    w.model.recorded(req)
    await w.delivered(req.worker)


class _WorkerTag(logging.Filter):
    """Tags each record of the middleware's logger with the worker whose request the logging task serves."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = WORKER.get()
        return True


@contextlib.contextmanager
def said() -> Iterator[list[logging.LogRecord]]:
    """The records the middlewares log meanwhile (INFO and above), each tagged with its worker."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    handler.addFilter(_WorkerTag())
    package = logging.getLogger("lago_org_billing")
    level = package.level
    package.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield records
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def _sorted_out(records: list[logging.LogRecord]) -> tuple[list[int], list[int], list[str]]:
    """Per worker, the outages said (WARNING) and their ends (INFO); anything else the middleware said at WARNING or
    above (the delivery's warnings are about the answers this test loses)."""
    warnings, recoveries, other = [0, 0], [0, 0], []
    for record in records:
        message = record.getMessage()
        worker = getattr(record, "worker", -1)
        if record.name == LOGGER and "unavailable for idempotency keys" in message and worker in (0, 1):
            warnings[worker] += 1
        elif record.name == LOGGER and "first timestamps are shared again" in message and worker in (0, 1):
            recoveries[worker] += 1
        elif record.name == LOGGER and record.levelno >= logging.WARNING and "ASGI lifespan" not in message:
            other.append(f"{record.levelname} {message}")
    return warnings, recoveries, other


async def run(seed: int, redis_url: str, monkeypatch: pytest.MonkeyPatch, stalls: bool = False) -> None:
    """A sequence of ``seed``, checked (``stalls``: Redis may also stop answering, its calls' timeout cut to 0.2 s;
    left to the hunts by hand, so that a loaded machine's slow answer is never taken for a stall)."""
    async with world(seed, redis_url, monkeypatch, 0.2 if stalls else None) as w:
        w.stalls = stalls
        with said() as records:
            for _ in range(30):
                await step(w)
                ttls = [w.admin.ttl(key) for key in w.admin.keys(PREFIX + "*")]
                assert all(DAY - 60 < ttl <= DAY for ttl in ttls), ttls  # kept a day
        if not w.model.redis_up and not w.relay.stalled:
            w.relay.up()
        found = violations(w.model, w.lago.events, w.workers)
        sent: dict[frozenset[str], set[bytes]] = {}
        for body in w.transport.bodies:
            events = json.loads(body)["events"]
            sent.setdefault(frozenset(e["properties"]["user_id"] for e in events), set()).add(body)
        found += [f"a batch sent again differs: {sorted(bodies)}" for bodies in sent.values() if len(bodies) > 1]
        warnings, recoveries, other = _sorted_out(records)
        if warnings != w.model.warnings:
            found.append(f"outages said {warnings} times per worker, expected {w.model.warnings}")
        if recoveries != w.model.recoveries:
            found.append(f"recoveries said {recoveries} times per worker, expected {w.model.recoveries}")
        found += [f"said: {message}" for message in other]
        assert not found, "\n".join(
            [f"seed {seed}:", *found, "requests:"]
            + [
                f"  {r.n} w{r.worker} {r.org} {r.method} {r.path} {[v[:12] for v in r.values]} "
                f"start={r.start:.3f} expected={r.expected:.3f} retry={r.retry}"
                for r in w.model.requests
            ]
        )


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_random_retries_across_two_workers_sharing_redis(
    seed: int, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries of one transaction (same org, method, route and key) are one event in Lago, the first one's timestamp,
    sent again byte-identical; other orgs, routes, methods and keys are never merged with it nor billed for it; Redis
    down, each worker keeps its own first timestamps and says so once per outage; no event is ever lost."""
    await run(seed, redis_url, monkeypatch)


async def test_a_retry_after_redis_dropped_its_connections_is_the_same_event(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarted (or closed idle connections: its ``timeout``, a proxy's) between two requests: each worker's
    pooled connection is dead, and the first idempotent request of each failed on it and was taken for an outage
    (said at WARNING, its first timestamp kept in the process only), so a request and its retry reaching the other
    worker were billed twice though Redis answered all along. The store now makes the call again on a new connection."""
    async with world(0, redis_url, monkeypatch) as w:
        w.transport.rng = random.Random(1)  # (answers lost or not: the same)
        with said() as records:
            for worker, key in ((0, b"k-1"), (1, b"k-1"), (0, b"k-2"), (1, b"k-2")):
                if key == b"k-2" and worker == 0:
                    w.relay.cut()  # (each worker's pool holds a connection now)
                w.tick()
                req = w.new(worker, "org_1", ROUTES[1], [key])
                await w.send(req)
                w.model.recorded(req)
                await w.delivered(worker)
        found = violations(w.model, w.lago.events, w.workers)
        assert not found, found
        assert len(w.lago.events) == 2
        assert _sorted_out(records) == ([0, 0], [0, 0], [])


async def test_a_redis_that_stops_answering_is_said_once_and_each_worker_keeps_its_own(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that stops answering (a partition dropping packets, a frozen node; not refusing connections): each
    idempotent request waited the middleware's LAGO_API_TIMEOUT after its answer, its call cancelled there, and the
    outage was never said. The store's calls now give up after their own timeout: Redis unavailable, said once per
    worker, each keeping its own first timestamps meanwhile, and said again once Redis answers; nothing is lost."""
    # (0.6 s: healthy calls through the relay answer in milliseconds, room for a loaded CI machine)
    async with world(0, redis_url, monkeypatch, redis_timeout=0.6) as w:
        w.transport.rng = random.Random(1)
        with said() as records:
            for worker, key, stalled in ((0, b"k-1", False), (0, b"k-1", True), (1, b"k-1", True), (1, b"k-2", True)):
                if stalled and not w.relay.stalled:
                    w.relay.stalled, w.model.redis_up = True, False
                w.tick()
                req = w.new(worker, "org_1", ROUTES[1], [key])
                await w.send(req)
                w.model.recorded(req)
                await w.delivered(worker)
            w.relay.stalled, w.model.redis_up = False, True
            for worker in (0, 1):
                w.tick()
                req = w.new(worker, "org_1", ROUTES[1], [b"k-1"])
                await w.send(req)
                w.model.recorded(req)
                await w.delivered(worker)
        found = violations(w.model, w.lago.events, w.workers)
        assert not found, found
        assert len(w.lago.events) == 3  # k-1 on worker 0, k-1 on worker 1 (its own, Redis unanswering), k-2
        assert _sorted_out(records) == ([1, 1], [1, 1], [])
