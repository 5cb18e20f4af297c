"""Seeded random sequences through the real middleware, pipeline and emulator, checked scrape by scrape against a model
of what each Prometheus counter and gauge must read.

Each seed serves one ``OrgBillingMiddleware`` (memory outbox or SQLite spool; with or without its quota gate, counting
locally or in a Redis that is down; requests without an org let through or answered 401) exporting to a registry of
its own or to prometheus_client's multiprocess files, and draws a sequence of steps: requests of several orgs (one
without a subscription, which the gate blocks), requests without an org, on an excluded path, answered 500 by the app;
events handed over once the pipeline is closed (dropped); poison events Lago answers 422 ``value_is_invalid`` for
and events Lago already holds (``value_already_exist``), submitted to the middleware's
pipeline; emulator faults on ``POST /events/batch`` (503, 429, a dropped connection) and on the gate's reads (it then
fails open); flushes, replays of the dead letters, scrapes; shutdowns (Lago healthy, or down with no time left: the
memory outbox loses what it holds, the spool keeps it) after which the next request serves the app again with a new
pipeline and gate.

Three oracles, compared on every scrape:

* the model: the middleware's counts from the requests made and the answers seen; ``recorded`` from what was handed
  over; at quiescent points (flushed, Lago healthy) ``delivered``, ``duplicate``, ``dead_lettered`` and the gauges
  from each event's fate; ``lost_at_shutdown`` from what a hard shutdown left in memory;
* the network edge: what each answer to ``POST /events/batch`` tells the pipeline (``batches_sent``,
  ``lago_errors_total{status}``, ``rate_limited``, ``delivered``, ``duplicate``, ``dead_lettered``, the latency
  histogram's count);
* invariants: counters never go back; ``recorded + replayed = delivered + dead_lettered + dropped + lost +
  queue_depth``; ``dead_letters = dead_lettered - replayed`` while the letters live; the gate's ``checks = allowed +
  blocked``, the middleware's ``blocked`` is the gate's; every exposition parses with prometheus_client's parser, and
  its only labels are ``status`` (a status code or ``network``) and the histogram's ``le``: no org id, no path.

A second test serves two apps in one process (two registries, and two middlewares sharing one registry): each
registry shows the counts of its own middlewares, summed once, never the other's.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import random
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware, _metrics
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._faults import DroppedConnection

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
from prometheus_client import CollectorRegistry, generate_latest, values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.anyio

#: (seed, where the counts go: a registry's collector, or prometheus_client's multiprocess files)
SEEDS = [(1, "registry"), (2, "registry"), (3, "registry"), (4, "registry"), (5, "multiprocess"), (6, "multiprocess")]
STEPS = 50
GUARD = 20.0  # a bound on each wait: only a hang reaches it
BATCH = "/api/v1/events/batch"
ORGS = ("org_a", "org_b", "org_c")
UNSUBSCRIBED = "org_x"  # no subscription: the gate blocks it (402)
POISON = "not-a-number"  # a precise_total_amount_cents Lago answers value_is_invalid for
P = "lago_billing_"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


async def boom(request: Request) -> Response:
    return JSONResponse({"error": "boom"}, status_code=500)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def app() -> Starlette:
    return Starlette(routes=[Route("/v1/chat", chat), Route("/v1/boom", boom), Route("/health", health)])


def lago() -> FakeLago:
    fake = FakeLago()
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_plan("starter", amount_cents=1000)
    for org in ORGS:
        fake.add_subscription(org, "starter", external_id=org)
    return fake


class Edge(httpx.AsyncBaseTransport):
    """The emulator (its own fault injection included) behind a network edge that counts what each answer to
    ``POST /events/batch`` tells the pipeline, as the pipeline's metrics must count it."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        #: Lago down with no answer: a batch is held until its run is cancelled (a shutdown with no time left).
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != BATCH:
            return await self.inner.handle_async_request(request)
        body = await request.aread()
        tids = [event["transaction_id"] for event in json.loads(body)["events"]]
        self.counts["batches"] += 1
        if self.down:
            self.counts["held"] += 1
            await anyio.sleep_forever()
        try:
            answer = await self.inner.handle_async_request(request)
        except DroppedConnection:
            self.errors["network"] += 1
            raise
        content = await answer.aread()
        status = answer.status_code
        if 200 <= status < 300:
            self.counts["delivered"] += len(tids)
        elif status == 422:
            details = json.loads(content).get("error_details", {})
            shared = {tid for tid, n in collections.Counter(tids).items() if n > 1}
            duplicates = [key for key, error in details.items() if error == {"transaction_id": ["value_already_exist"]}]
            if len(duplicates) < len(details):
                self.errors["422"] += 1
            for key in duplicates:
                if tids[int(key)] not in shared:  # (events sharing an id are sent again alone: their answer then)
                    self.counts["duplicates"] += 1
                    self.counts["delivered"] += 1
            self.counts["dead_lettered"] += len(details) - len(duplicates)
        else:
            self.errors[str(status)] += 1
            if status == 429:
                self.counts["rate_limited"] += 1
        return httpx.Response(status, headers=answer.headers, content=content)


def scrape(registry: CollectorRegistry) -> Samples:
    """The exposition, parsed with prometheus_client's parser; its labels checked bounded."""
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= {"status", "le"}, sample
            if "status" in sample.labels:
                assert re.fullmatch(r"[1-5]\d\d|network", sample.labels["status"]), sample
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    assert not any(org in text for org in (*ORGS, UNSUBSCRIBED)), "an org id in the exposition"
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((P + name, tuple(sorted(labels.items()))), 0.0)


def errors(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status"]: count
        for (name, labels), count in samples.items()
        if name == P + "lago_errors_total" and count
    }


@dataclasses.dataclass
class Model:
    """What the metrics must read: the middleware's counts, and each event handed over by its fate."""

    requests: int = 0
    billed: int = 0
    blocked: int = 0
    unresolved: int = 0
    excluded: int = 0
    unbilled_errors: int = 0
    recorded: int = 0
    replayed: int = 0
    delivered: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    lost: int = 0
    dropped: int = 0
    #: Events not resolved yet, by kind ("new", "duplicate", "poison").
    pending: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: Dead letters the current outbox holds.
    dead_held: int = 0

    def settle(self) -> None:
        """Lago healthy, everything flushed: each pending event resolved as its kind says."""
        self.delivered += self.pending["new"] + self.pending["duplicate"]
        self.duplicates += self.pending["duplicate"]
        self.dead_lettered += self.pending["poison"]
        self.dead_held += self.pending["poison"]
        self.pending.clear()


class Run:
    def __init__(self, seed: int, tmp_path: Path, multiprocess: Path | None = None) -> None:
        self.rng = random.Random(seed)
        self.fake = lago()
        self.edge = Edge(self.fake)
        self.spool = self.rng.random() < 0.5
        self.gated = self.rng.random() < 0.7
        #: Redis unreachable (nothing listens there): the gate decides locally, quota_redis_fallback 1.
        self.redis_down = self.gated and self.rng.random() < 0.3
        self.reject_unresolved = self.rng.random() < 0.5  # LAGO_ON_UNRESOLVED=reject: answered 401
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess
        self.exposed = self.registry
        if multiprocess is not None:  # what serves /metrics then: the files of every worker, read
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=str(multiprocess))  # type: ignore[no-untyped-call]
        settings = BillingSettings(
            api_url=self.fake.base_url,
            api_key=self.fake.api_key,
            org_header="X-Org-Id",
            exclude_paths=("/health",),
            retry_backoff=0.001,
            spool_path=str(tmp_path / "spool.db") if self.spool else None,
            quota_mode="enforce" if self.gated else "off",
            redis_url="redis://127.0.0.1:1/0" if self.redis_down else None,
            on_unresolved="reject" if self.reject_unresolved else "allow",
        )
        self.middleware = OrgBillingMiddleware(app(), settings, transport=self.edge, metrics_registry=self.registry)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.middleware), base_url="http://t")
        self.model = Model()
        self.last: Samples = {}
        self.gates: list[Any] = []  # every gate the middleware made (one per serving)
        self.quota_fault = False
        self.fail_open_expected = False
        self.seen_by_gate: set[str] = set()
        self.serving = False
        self.log: list[str] = []

    # -- steps ---------------------------------------------------------------------------------------------------------

    async def request(self, path: str, org: str | None, *, gated: bool = False) -> httpx.Response:
        """``GET path`` as ``org``; ``gated``: the gate decides it (a cold org read from Lago, or failed open)."""
        if not self.serving:  # the first request after a shutdown serves the app again: a new pipeline and gate
            self.seen_by_gate = set()
        if gated and self.gated and org is not None and org not in self.seen_by_gate:
            self.fail_open_expected |= self.quota_fault
            self.seen_by_gate.add(org)
        headers = {"X-Org-Id": org} if org else {}
        response = await self.http.get(path, headers=headers)
        if not self.serving:
            self.serving = True
            if self.middleware.quota is not None and not any(gate is self.middleware.quota for gate in self.gates):
                self.gates.append(self.middleware.quota)
        return response

    async def org_request(self) -> None:
        org = self.rng.choice((*ORGS, UNSUBSCRIBED))
        response = await self.request("/v1/chat", org, gated=True)
        self.model.requests += 1
        if response.status_code == 200:
            self.model.billed += 1
            self.model.recorded += 1
            self.model.pending["new"] += 1
        else:
            assert self.gated and response.status_code in (402, 429, 503), response
            self.model.blocked += 1
        if org != UNSUBSCRIBED:  # (fail open: a subscribed org is served whatever Lago answers the gate)
            assert response.status_code == 200, (org, response.status_code)

    async def step(self) -> None:
        rng, model = self.rng, self.model
        kind = rng.choices(
            ("org", "unresolved", "excluded", "error", "poison", "duplicate", "fault", "quota", "flush", "replay",
             "scrape", "shutdown", "late"),
            weights=(30, 4, 4, 3, 4, 4, 6, 3 if self.gated else 0, 5, 2, 6, 3, 2),
        )[0]  # fmt: skip
        self.log.append(kind)
        if kind == "org":
            await self.org_request()
        elif kind == "unresolved":
            assert (await self.request("/v1/chat", None)).status_code == (401 if self.reject_unresolved else 200)
            model.requests += 1
            model.unresolved += 1
        elif kind == "excluded":
            assert (await self.request("/health", rng.choice((None, *ORGS)))).status_code == 200
            model.excluded += 1
        elif kind == "error":
            assert (await self.request("/v1/boom", rng.choice(ORGS), gated=True)).status_code == 500
            model.requests += 1
            model.unbilled_errors += 1
        elif kind == "late":  # an event handed over once the app shut its billing down (a background task's)
            if self.middleware.pipeline.closed:
                assert not self.middleware.pipeline.submit(
                    {"transaction_id": f"late-{uuid.uuid4()}", "external_subscription_id": "org_a", "code": "api_call"}
                )
                model.recorded += 1
                model.dropped += 1
        elif kind in ("poison", "duplicate"):
            if not self.serving:
                await self.org_request()  # (the pipeline runs again first)
            held = self.fake.store.events
            if kind == "duplicate" and not held:
                return
            if kind == "poison":
                event = {
                    "transaction_id": f"poison-{uuid.uuid4()}",
                    "external_subscription_id": rng.choice(ORGS),
                    "code": "api_call",
                    "timestamp": time.time(),
                    "precise_total_amount_cents": POISON,
                    "properties": {},
                }
            else:
                stored = rng.choice(held)
                event = {
                    "transaction_id": stored["transaction_id"],
                    "external_subscription_id": stored["external_subscription_id"],
                    "code": stored["code"],
                    "properties": copy.deepcopy(stored["properties"]),
                }
            assert self.middleware.pipeline.submit(event)
            model.recorded += 1
            model.pending[kind if kind == "poison" else "duplicate"] += 1
        elif kind == "fault":
            what = rng.choice(("503", "429", "drop"))
            count = rng.randint(1, 3)
            if what == "drop":
                self.fake.faults.inject(drop=True, count=count, path=BATCH)
            else:
                self.fake.faults.inject(int(what), count=count, path=BATCH)
        elif kind == "quota":
            self.set_quota_fault(not self.quota_fault)
        elif kind == "flush":
            await self.flush()
        elif kind == "replay":
            if self.serving:
                await self.flush()
                count = await self.middleware.pipeline.replay_dead_letters()
                assert count == model.dead_held, (count, model.dead_held)
                model.replayed += count
                model.pending["poison"] += count
                model.dead_held = 0
        elif kind == "scrape":
            self.check(self.read())
        elif kind == "shutdown":
            if self.serving:
                await self.shutdown(hard=rng.random() < 0.5)

    def set_quota_fault(self, on: bool) -> None:
        self.quota_fault = on
        if on:
            for path in ("/api/v1/customers", "/api/v1/subscriptions", "/api/v1/plans"):
                self.fake.faults.inject(503, path=path)
        else:
            for rule in self.fake.faults.rules:
                if rule.path != BATCH:
                    rule.remaining, rule.count = 0, 0

    async def flush(self) -> None:
        """Every event delivered or dead-lettered (the event faults left are used up by the retries): quiescent."""
        if not self.serving:
            return
        with anyio.fail_after(GUARD):
            assert await self.middleware.pipeline.flush(GUARD)
        self.model.settle()
        self.check(self.read(), quiescent=True)

    async def shutdown(self, *, hard: bool) -> None:
        """Lago healthy (everything delivered), or Lago down and no time left: the memory outbox loses what it holds
        (``lost_at_shutdown``), the spool keeps it for the next serving."""
        model = self.model
        self.fake.faults.clear()
        self.quota_fault = False
        self.edge.down = hard
        self.middleware.shutdown_timeout = 0.0 if hard else GUARD
        await self.middleware.aclose()
        self.edge.down = False
        self.serving = False
        if not hard:
            model.settle()
        elif not self.spool:
            model.lost += sum(model.pending.values())
            model.pending.clear()
        if not self.spool:
            model.dead_held = 0  # (the memory outbox's letters go with it: events_dead_lettered_total stays)
        self.check(self.read())

    # -- oracles -------------------------------------------------------------------------------------------------------

    def read(self) -> Samples:
        if self.multiprocess is not None:
            assert _metrics._multiprocess is not None
            _metrics._multiprocess.sync()  # (what its thread does every second)
        samples = scrape(self.exposed)
        for key, before in self.last.items():
            if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert samples.get(key, 0) >= before, f"{key} went back: {before} -> {samples.get(key)}"
        self.last = samples
        return samples

    def check(self, s: Samples, *, quiescent: bool = False) -> None:
        model, edge = self.model, self.edge
        middleware = {
            "requests": model.requests,
            "requests_billed": model.billed,
            "requests_blocked": model.blocked,
            "requests_unresolved": model.unresolved,
            "requests_excluded": model.excluded,
            "requests_unbilled_errors": model.unbilled_errors,
            "events_recorded": model.recorded,
            "events_replayed": model.replayed,
            "events_lost_at_shutdown": model.lost,
            "events_dropped": model.dropped,
        }
        for name, expected in middleware.items():
            assert value(s, name + "_total") == expected, (name, value(s, name + "_total"), expected, self.log)
        # the edge: what each answer of Lago told the pipeline
        assert value(s, "batches_sent_total") == edge.counts["batches"], self.log
        # (a batch held at a Lago that is down is cut short by the shutdown: no answer, no duration)
        assert value(s, "delivery_seconds_count") == edge.counts["batches"] - edge.counts["held"], self.log
        assert errors(s) == dict(edge.errors), (errors(s), edge.errors, self.log)
        assert value(s, "rate_limited_total") == edge.counts["rate_limited"]
        assert value(s, "events_delivered_total") == edge.counts["delivered"], self.log
        assert value(s, "events_duplicate_total") == edge.counts["duplicates"], self.log
        assert value(s, "events_dead_lettered_total") == edge.counts["dead_lettered"], self.log
        # every event accounted for
        if self.serving:
            resolved = sum(
                value(s, name + "_total")
                for name in ("events_delivered", "events_dead_lettered", "events_dropped", "events_lost_at_shutdown")
            )
            assert model.recorded + model.replayed == resolved + value(s, "queue_depth"), self.log
        assert value(s, "requests_in_flight") == 0
        # the gate's counters: those of every gate the middleware made, summed
        if self.gated:
            stats: collections.Counter[str] = collections.Counter()
            for made in self.gates:
                for part in (made, made.backend):
                    stats.update({key: n for key, n in vars(part).get("stats", {}).items() if key != "redis_fallback"})
            for key, count in stats.items():
                assert value(s, f"quota_{key}_total") == count, (key, value(s, f"quota_{key}_total"), count)
            assert stats["checks"] == stats["allowed"] + stats["blocked"], stats
            assert stats["blocked"] == model.blocked, (stats, model.blocked)
            assert (stats["fail_open"] > 0) == self.fail_open_expected, (stats, self.log)
            current: Any = self.middleware.quota  # (the gauge: the current gate's state)
            fallback = vars(current.backend).get("stats", {}).get("redis_fallback", 0)
            assert value(s, "quota_redis_fallback") == fallback
            if self.redis_down and stats["checks"]:
                assert stats["fallback_decisions"] > 0 and stats["redis_errors"] > 0, stats
        if quiescent:
            assert value(s, "events_delivered_total") == model.delivered, self.log
            assert value(s, "events_duplicate_total") == model.duplicates, self.log
            assert value(s, "events_dead_lettered_total") == model.dead_lettered, self.log
            assert value(s, "queue_depth") == 0
            assert value(s, "spool_depth") == 0
            assert value(s, "spool_unwritten") == 0
            assert value(s, "spool_write_failing") == 0
            assert value(s, "dead_letters") == model.dead_held, (value(s, "dead_letters"), model.dead_held, self.log)
            assert self.middleware.pipeline.stats["dead_letters"] == model.dead_held
            if self.spool:  # the spool keeps every dead letter: the gauge is what the counters leave
                assert value(s, "dead_letters") == model.dead_lettered - model.replayed
            assert len(self.fake.store.events) == model.delivered - model.duplicates


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """prometheus_client's multiprocess mode in this process, on a fresh directory (as test_metrics_multiprocess
    sets it up); synced before each scrape only."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(values, "ValueClass", value_class)
    monkeypatch.setattr(_metrics, "_multiprocess", None)
    monkeypatch.setattr(_metrics, "_SYNC_INTERVAL", 3600.0)
    yield directory
    state = _metrics._multiprocess
    if state is not None:
        state.close()
    value_class.close_all_files()


@pytest.mark.parametrize(("seed", "store"), SEEDS)
async def test_metrics_follow_random_sequences(seed: int, store: str, tmp_path: Path, request: Any) -> None:
    """Every scrape agrees with the model, the network edge and the invariants, through a seeded sequence of
    traffic, faults, poison events, duplicates, flushes, replays and shutdowns (a registry's collector, or
    prometheus_client's multiprocess files)."""
    directory = request.getfixturevalue("multiprocess") if store == "multiprocess" else None
    run = Run(seed, tmp_path, directory)
    try:
        for _ in range(STEPS):
            await run.step()
        run.set_quota_fault(False)
        run.fake.faults.clear()
        if run.serving:
            await run.shutdown(hard=False)
        run.check(run.read())
    finally:
        with anyio.CancelScope(shield=True):
            await run.middleware.aclose()
            await run.http.aclose()


async def test_two_apps_in_one_process_keep_their_counts_apart() -> None:
    """Two apps served in one process, each exporting to its own registry, and a third middleware sharing the first
    one's registry: no DuplicateTimeseries, each registry shows the sum of its own middlewares (each once), never the
    other app's counts."""
    rng = random.Random(7)
    fake = lago()
    settings = BillingSettings(
        api_url=fake.base_url, api_key=fake.api_key, org_header="X-Org-Id", quota_mode="off", retry_backoff=0.001
    )
    first, second = CollectorRegistry(), CollectorRegistry()
    middlewares = [
        OrgBillingMiddleware(app(), settings, transport=fake.transport(), metrics_registry=registry)
        for registry in (first, second, first)
    ]
    clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=m), base_url="http://t") for m in middlewares]
    made = [0, 0, 0]
    try:
        for _ in range(30):
            index = rng.randrange(3)
            assert (await clients[index].get("/v1/chat", headers={"X-Org-Id": rng.choice(ORGS)})).status_code == 200
            made[index] += 1
        for middleware in middlewares:
            assert await middleware.pipeline.flush(GUARD)
        a, b = scrape(first), scrape(second)
    finally:
        for middleware, client in zip(middlewares, clients, strict=True):
            await middleware.aclose()
            await client.aclose()
    assert value(a, "requests_billed_total") == made[0] + made[2]
    assert value(a, "events_delivered_total") == made[0] + made[2]
    assert value(b, "requests_billed_total") == made[1]
    assert value(b, "events_delivered_total") == made[1]
    assert len(fake.store.events) == sum(made)


async def test_a_middleware_with_a_redis_gate_serves_again_after_aclose() -> None:
    """A middleware whose quota gate counts in Redis (here unreachable: it falls back to local counts), started by its
    first request (no lifespan), closed with ``aclose()``, then served again: the next request starts its delivery
    again and is billed, as without Redis, instead of failing with "background delivery is not running"."""
    fake = lago()
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        org_header="X-Org-Id",
        retry_backoff=0.001,
        redis_url="redis://127.0.0.1:1/0",
    )
    middleware = OrgBillingMiddleware(app(), settings, transport=fake.transport())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
        try:
            for _ in range(2):
                assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_a"})).status_code == 200
                await middleware.aclose()
        finally:
            await middleware.aclose()
    assert middleware.stats["billed"] == 2
    assert len(fake.store.events) == 2
