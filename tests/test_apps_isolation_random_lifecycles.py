"""Several apps in one process, each with its own ``OrgBillingMiddleware``, driven through seeded random lifecycles.

The contract: the middleware "owns its background work: it starts it on the ASGI lifespan startup and flushes on
shutdown, and starts lazily on the first request if the server sends no lifespan; two apps in one process don't share
state by accident". Each seed builds two emulators and six apps (settings differing in event code, API key, emulator,
quota mode, spool, plan limits; two sharing a ``LagoClient`` on purpose, one recording extra calls through an
``OrgBilling(middleware=...)``; apps mounted in apps that bill too; one whose startup fails) and drives them through
``with TestClient(app)`` (a new loop per run), a bare ``TestClient`` (a new loop per request), and sessions of manual
lifespan messages and ``httpx.ASGITransport`` requests on one loop (several apps at once, a request after the
shutdown, a second lifespan of the same app object), nested in each other. After each seed: every billed request is
one event in its own app's Lago (none in another's), each gate allowed exactly what its plan limit lets through
(counts never leaking between apps), each middleware's stats and metrics count its own requests, and nothing is left
running (no task, no thread, no unraisable, no "Task was destroyed" log).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import random
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    EventPipeline,
    LagoClient,
    OrgBilling,
    OrgBillingMiddleware,
)
from lago_org_billing.testing import FakeLago

ORGS = ("org_1", "org_2", "org_3")
NAMES = ("alpha", "gamma", "beta", "delta", "eps")
SEEDS = range(4)


def _fake(api_key: str) -> FakeLago:
    """An emulator with a metric per app's event code (so any app may be pointed at it), plan ``tiny`` charging them
    all, and the orgs subscribed to it."""
    fake = FakeLago(api_key=api_key)
    charges = []
    for name in NAMES:
        fake.add_billable_metric(f"calls_{name}", aggregation_type="sum_agg", field_name="total_tokens")
        charges.append(
            {"billable_metric_code": f"calls_{name}", "charge_model": "standard", "properties": {"amount": "0"}}
        )
    fake.add_plan("tiny", amount_cents=0, charges=charges)
    for org in ORGS:
        fake.add_customer(org)
        fake.add_subscription(org, "tiny", external_id=org)
    return fake


@dataclass
class Billed:
    """What the test expects of one billing middleware: its stats, and its gate's count per org."""

    name: str
    fake: FakeLago
    mode: str
    limit: int
    registry: CollectorRegistry
    stats: Counter[str] = field(default_factory=Counter)
    used: Counter[str] = field(default_factory=Counter)  # calls counted against the limit, per org
    events: Counter[str] = field(default_factory=Counter)  # events expected in its Lago, per org
    middleware: OrgBillingMiddleware | None = None

    @property
    def code(self) -> str:
        return f"calls_{self.name}"

    def gate(self, org: str, calls: int = 1) -> bool:
        """Whether the gate lets a call of ``org`` through (counted then, billed calls being ``calls`` events)."""
        if self.mode == "enforce" and self.used[org] >= self.limit:
            self.stats["blocked"] += 1
            return False
        if self.mode != "off":
            self.used[org] += calls
        self.stats["billed"] += 1
        self.events[org] += calls
        return True


def _middleware_in(app: Any) -> OrgBillingMiddleware | None:
    """The ``OrgBillingMiddleware`` an app is (or a Starlette app's built stack holds)."""
    for _ in range(20):
        if isinstance(app, OrgBillingMiddleware):
            return app
        if isinstance(app, Starlette):
            app = app.middleware_stack
        else:
            app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class World:
    """Two emulators, six apps (one of which cannot start), and the model of what each should have done."""

    def __init__(self, rng: random.Random, tmp: Path) -> None:
        self.rng = rng
        self.fakes = {"one": _fake("key-one"), "two": _fake("key-two")}
        self.billed: dict[str, Billed] = {}
        #: The app's own lifespan runs (alpha's, beta's), and those the servers started: one each.
        self.lifespans: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        #: What was run, in order (shown when a check fails).
        self.trace: list[str] = []
        self.shared_client: LagoClient | None = None
        settings = {name: self._settings(name, tmp) for name in NAMES}

        # gamma: a FastAPI app with its own middleware, mounted in alpha (which excludes its mount: gamma bills)
        gamma = FastAPI()

        @gamma.get("/ping")
        async def gamma_ping() -> dict[str, str]:
            return {"app": "gamma"}

        self._add(gamma, "gamma", settings["gamma"])

        # alpha: a Starlette app with a lifespan of its own and add_middleware
        @contextlib.asynccontextmanager
        async def alpha_lifespan(app: Any) -> AsyncIterator[None]:
            self.lifespans["alpha"] += 1
            yield

        alpha = Starlette(routes=[Route("/ping", _ping("alpha")), Mount("/inner", app=gamma)], lifespan=alpha_lifespan)
        self._add(alpha, "alpha", settings["alpha"])

        # delta: wrapped by hand, org from another header than beta's, mounted in beta (which hands it over)
        delta_app = Starlette(routes=[Route("/ping", _ping("delta"))])
        delta = self._wrap(delta_app, "delta", settings["delta"])

        # beta and eps share one LagoClient on purpose (same emulator), each with its own pipeline and gate
        shared = rng.random() < 0.5
        if shared:
            settings["eps"] = _replace(settings["eps"], self.billed["beta"].fake)
            self.billed["eps"].fake = self.billed["beta"].fake
            self.shared_client = LagoClient(settings["beta"], transport=self.billed["beta"].fake.transport())

        @contextlib.asynccontextmanager
        async def beta_lifespan(app: Any) -> AsyncIterator[None]:
            self.lifespans["beta"] += 1
            yield

        beta_app = Starlette(routes=[Route("/ping", _ping("beta")), Mount("/deep", app=delta)], lifespan=beta_lifespan)
        beta = self._wrap(beta_app, "beta", settings["beta"], client=self.shared_client)

        # eps: a FastAPI app whose /extra endpoint records one more call through OrgBilling(middleware=...)
        eps_app = FastAPI()
        holder: dict[str, Any] = {}

        @eps_app.get("/ping")
        async def eps_ping() -> dict[str, str]:
            return {"app": "eps"}

        @eps_app.get("/extra")
        async def eps_extra(request: Request) -> dict[str, str]:
            holder["billing"].record_api_call_nowait(request.headers["x-org-id"], endpoint="/extra-recorded")
            return {"app": "eps"}

        eps = self._wrap(eps_app, "eps", settings["eps"], client=self.shared_client)
        holder["billing"] = OrgBilling(middleware=eps, transport=self.billed["eps"].fake.transport())
        self.eps_billing: OrgBilling = holder["billing"]

        # phi: cannot start (its lifespan raises, its middleware is misconfigured, or its spool cannot be opened)
        self.phi_kind = rng.choice(("lifespan", "config", "spool"))
        self.phi = self._broken(tmp)

        self.apps: dict[str, Any] = {"alpha": alpha, "beta": beta, "eps": eps, "gamma": gamma, "phi": self.phi}
        #: Each billing app on its own (delta unmounted), to drain the spools at the end.
        self.own = {**self.apps, "delta": delta}
        del self.own["phi"]
        #: The apps each top-level app runs (its mounts), to keep an app on one loop at a time.
        self.parts = {"alpha": {"alpha", "gamma"}, "beta": {"beta", "delta"}, "eps": {"eps"}, "gamma": {"gamma"}}
        self.parts["phi"] = {"phi"}
        if shared:  # (one client: never on two loops at once)
            self.parts["beta"] |= {"eps"}
            self.parts["eps"] |= {"beta", "delta"}

    def _settings(self, name: str, tmp: Path) -> BillingSettings:
        fake_key = self.rng.choice(("one", "two"))
        fake = self.fakes[fake_key]
        mode = self.rng.choice(("enforce", "enforce", "monitor", "off"))
        limit = self.rng.randint(2, 5)
        self.billed[name] = Billed(name, fake, mode, limit, CollectorRegistry())
        return BillingSettings(
            api_url=fake.base_url,
            api_key=fake.api_key,
            event_code=f"calls_{name}",
            org_header="X-Tenant-Id" if name == "delta" else "X-Org-Id",
            quota_mode=mode,
            plan_limits={"tiny": {"max_api_calls": limit}},
            spool_path=str(tmp / f"{name}.db") if self.rng.random() < 0.4 else None,
            exclude_paths=("/inner",) if name == "alpha" else (),
            retry_backoff=0.001,
        )

    def _add(self, app: Starlette, name: str, settings: BillingSettings) -> None:
        billed = self.billed[name]
        app.add_middleware(
            OrgBillingMiddleware,
            settings=settings,
            transport=billed.fake.transport(),
            metrics_registry=billed.registry,
        )

    def _wrap(self, app: Any, name: str, settings: BillingSettings, client: LagoClient | None = None) -> Any:
        billed = self.billed[name]
        middleware = OrgBillingMiddleware(
            app,
            settings,
            client=client,
            transport=None if client is not None else billed.fake.transport(),
            metrics_registry=billed.registry,
        )
        billed.middleware = middleware
        return middleware

    def _broken(self, tmp: Path) -> Any:
        fake = self.fakes["one"]
        settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key, quota_mode="off", org_header="X-Org-Id")

        @contextlib.asynccontextmanager
        async def failing(app: Any) -> AsyncIterator[None]:
            raise RuntimeError("phi's own startup failed")
            yield  # pragma: no cover

        phi = Starlette(
            routes=[Route("/ping", _ping("phi"))], lifespan=failing if self.phi_kind == "lifespan" else None
        )
        options: dict[str, Any] = {"settings": settings, "transport": fake.transport()}
        if self.phi_kind == "config":
            options["unresolved_status"] = 418  # refused: reported as the lifespan's startup failure
        if self.phi_kind == "spool":
            directory = tmp / "phi-spool-is-a-directory"
            directory.mkdir()
            options["settings"] = BillingSettings(
                api_url=fake.base_url, api_key=fake.api_key, quota_mode="off", spool_path=str(directory)
            )
        phi.add_middleware(OrgBillingMiddleware, **options)
        return phi

    def middleware(self, name: str) -> OrgBillingMiddleware | None:
        billed = self.billed[name]
        if billed.middleware is None:
            billed.middleware = _middleware_in(self.apps[name])
        return billed.middleware

    # ---------------------------------------------------------------- requests

    def pick_request(self, top: str) -> tuple[str, dict[str, str], Callable[[int, Any], None]]:
        """A random request to the top-level app ``top``: its path, headers, and the check of its answer (which
        updates the model)."""
        rng = self.rng
        org = rng.choice(ORGS)
        if top == "alpha":
            if rng.random() < 0.5:
                return "/inner/ping", {"X-Org-Id": org}, self._expect_excluded_then("alpha", "gamma", org)
            return self._direct("alpha", "/ping", org)
        if top == "beta":
            roll = rng.random()
            if roll < 0.3:  # beta finds no org, delta does: handed over
                return "/deep/ping", {"X-Tenant-Id": org}, self._expect_handed_over("beta", "delta", org)
            if roll < 0.45:  # beta finds the org: it bills, delta passes the request on (nested)
                path, headers, check = self._direct("beta", "/deep/ping", org, answered_by="delta")
                headers["X-Tenant-Id"] = rng.choice(ORGS)
                return path, headers, self._also_nested("delta", check)
            return self._direct("beta", "/ping", org)
        if top == "eps":
            if rng.random() < 0.3:
                return self._direct("eps", "/extra", org, calls=2)
            return self._direct("eps", "/ping", org)
        if top == "gamma":
            return self._direct("gamma", "/ping", org)
        raise AssertionError(top)

    def unresolved(self, top: str) -> tuple[str, dict[str, str], Callable[[int, Any], None]]:
        """A request without an org: served, unbilled."""

        def check(status: int, body: Any) -> None:
            assert status == 200, (top, status, body)
            self.billed[top].stats["requests"] += 1
            self.billed[top].stats["unresolved"] += 1

        return "/ping", {}, check

    def _direct(
        self, name: str, path: str, org: str, *, calls: int = 1, answered_by: str | None = None
    ) -> tuple[str, dict[str, str], Callable[[int, Any], None]]:
        billed = self.billed[name]

        def check(status: int, body: Any) -> None:
            billed.stats["requests"] += 1
            allowed = billed.gate(org, calls)
            assert status == (200 if allowed else 429), (name, path, org, status, body, dict(billed.used))
            if allowed:
                assert body == {"app": answered_by or name}, (name, path, body)

        return path, {"X-Org-Id": org}, check

    def _expect_excluded_then(self, outer: str, inner: str, org: str) -> Callable[[int, Any], None]:
        _, _, check = self._direct(inner, "/ping", org)

        def both(status: int, body: Any) -> None:
            self.billed[outer].stats["excluded"] += 1
            check(status, body)

        return both

    def _expect_handed_over(self, outer: str, inner: str, org: str) -> Callable[[int, Any], None]:
        _, _, check = self._direct(inner, "/ping", org)

        def both(status: int, body: Any) -> None:
            self.billed[outer].stats["requests"] += 1
            self.billed[outer].stats["handed_over"] += 1
            check(status, body)

        return both

    def _also_nested(self, inner: str, check: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
        def both(status: int, body: Any) -> None:
            before = self.billed["beta"].stats["blocked"]
            check(status, body)
            if self.billed["beta"].stats["blocked"] == before:  # (a blocked request never reached delta)
                self.billed[inner].stats["nested"] += 1

        return both


def _replace(settings: BillingSettings, fake: FakeLago) -> BillingSettings:
    return dataclasses.replace(settings, api_url=fake.base_url, api_key=fake.api_key)


def _ping(name: str) -> Callable[[Request], Any]:
    async def ping(request: Request) -> JSONResponse:
        return JSONResponse({"app": name})

    return ping


# ------------------------------------------------------------------------------------------------ drivers


class Driver:
    """Runs random lifecycles of the world's apps, nesting runs of apps not already running (each on its own loop)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.rng
        self.active: set[str] = set()

    def free(self, exclude: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        tops = ["alpha", "beta", "eps", "gamma", "phi"]
        return [top for top in tops if not (self.world.parts[top] & (self.active | exclude))]

    def run_one(self, depth: int = 0) -> None:
        choices = self.free()
        if not choices:
            return
        top = self.rng.choice(choices)
        if top == "phi":
            self.phi_run()
            return
        kind = self.rng.choice(("testclient", "testclient", "bare", "session", "session"))
        self.world.trace.append(f"{'  ' * depth}{kind} {top}")
        parts = self.world.parts[top]
        self.active |= parts
        try:
            if kind == "testclient":
                self.testclient_run(top, depth)
            elif kind == "bare":
                self.bare_run(top)
            else:
                self.session_run(top)
        finally:
            self.active -= parts

    def requests(self, top: str, count: int) -> Iterator[tuple[str, dict[str, str], Callable[[int, Any], None]]]:
        for _ in range(count):
            if self.rng.random() < 0.1 and top != "gamma":
                request = self.world.unresolved(top)
            else:
                request = self.world.pick_request(top)
            self.world.trace.append(f"    {top} {request[0]} {request[1]}")
            yield request

    def testclient_run(self, top: str, depth: int) -> None:
        """``with TestClient(app)``: a lifespan on a new loop (in the portal's thread), maybe another app's run
        nested while it serves."""
        self.world.served[top] += top in ("alpha", "beta")
        with TestClient(self.world.apps[top]) as client:
            for path, headers, check in self.requests(top, self.rng.randint(1, 6)):
                if depth < 2 and self.rng.random() < 0.15:
                    self.run_one(depth + 1)
                response = client.get(path, headers=headers)
                check(response.status_code, response.json())

    def bare_run(self, top: str) -> None:
        """A TestClient without ``with``: no lifespan, each request on a loop of its own that ends after it."""
        client = TestClient(self.world.apps[top])
        for path, headers, check in self.requests(top, self.rng.randint(1, 3)):
            response = client.get(path, headers=headers)
            check(response.status_code, response.json())

    def session_run(self, top: str) -> None:
        """One loop (``anyio.run``) serving ``top`` and maybe other free apps at once: manual lifespan messages (or
        none: a lazy start), requests in a random order, shutdowns, a request after a shutdown, a second lifespan
        of the same app; at the end the lazily started middlewares closed and no task left."""
        tops = [top]
        for other in self.free():
            if self.rng.random() < 0.4:
                tops.append(other)
                self.active |= self.world.parts[other]
        plans = {name: "fails" if name == "phi" else self.rng.choice(("lifespan", "lifespan", "none")) for name in tops}
        self.world.trace.append(f"  session plans {plans}")
        try:
            anyio.run(self._session, tops, plans)
        finally:
            for other in tops[1:]:
                self.active -= self.world.parts[other]

    async def _session(self, tops: list[str], plans: dict[str, str]) -> None:
        world = self.world
        async with anyio.create_task_group() as servers:
            lifespans: dict[str, _Served] = {}
            for name in tops:
                if plans[name] == "lifespan":
                    lifespans[name] = await self._serve(name, servers)
            steps: list[tuple[str, str]] = []
            for name in tops:
                if name == "phi":  # its startup fails on this loop, among the others' requests
                    steps.append((name, "fails"))
                    continue
                steps += [(name, "request")] * self.rng.randint(1, 5)
                if name in lifespans and self.rng.random() < 0.5:
                    steps.append((name, "restart"))
                if name in lifespans and self.rng.random() < 0.3:
                    steps.append((name, "second"))
            self.rng.shuffle(steps)
            seconds: list[_Served] = []
            transports = {name: httpx.ASGITransport(app=world.apps[name]) for name in tops}
            for name, step in steps:
                world.trace.append(f"    {name} {step}")
                if step == "fails":
                    await _startup_fails(world.apps[name], world.phi_kind)
                    continue
                if step == "second":  # a second lifespan of the same app object at once (two servers, one app)
                    seconds.append(await self._serve(name, servers))
                    continue
                if step == "restart":  # a shutdown, then a second lifespan of the same app object (or none: lazy)
                    await lifespans.pop(name).stop()
                    if self.rng.random() < 0.5:
                        lifespans[name] = await self._serve(name, servers)
                    continue
                path, headers, check = next(self.requests(name, 1))
                async with httpx.AsyncClient(transport=transports[name], base_url="http://app") as client:
                    response = await client.get(path, headers=headers)
                check(response.status_code, response.json())
            ending = [*lifespans.values(), *seconds]
            self.rng.shuffle(ending)
            for served in ending:
                await served.stop()
        # served without a lifespan (or after its shutdown), or mounted: closed as a server without one would
        for name in tops:
            for part in world.parts[name] - {"phi"}:
                middleware = world.middleware(part)
                if middleware is not None:
                    await middleware.aclose()
        await _nothing_left_running()

    async def _serve(self, name: str, servers: anyio.abc.TaskGroup) -> _Served:
        """A lifespan of the app ``name`` started in a task of ``servers`` (counted: its app's own runs once)."""
        self.world.served[name] += name in ("alpha", "beta")
        served = _Served(self.world.apps[name])
        await served.start(servers)
        return served

    def phi_run(self) -> None:
        """phi cannot start: its lifespan reports it, and a request without a lifespan fails (its middleware's
        error, or its app's lifespan never run: served)."""
        phi = self.world.phi
        with pytest.raises(Exception) as failed:
            with TestClient(phi):
                raise AssertionError("phi started")  # pragma: no cover
        assert "phi started" not in str(failed.value)
        if self.world.phi_kind == "lifespan":
            assert "phi's own startup failed" in str(failed.value)
        else:
            assert isinstance(failed.value, ConfigurationError) or "ConfigurationError" in str(failed.value), failed
        if self.world.phi_kind != "lifespan" and self.rng.random() < 0.5:
            with pytest.raises(ConfigurationError):
                TestClient(phi).get("/ping", headers={"X-Org-Id": "org_1"})


class _Served:
    """One lifespan of an app, as a server runs it in a task of its own: ``lifespan.startup`` sent and answered
    when :meth:`start` returns, ``lifespan.shutdown`` sent and answered when :meth:`stop` returns (so lifespans start
    and stop in any order on one loop)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stop_now = anyio.Event()
        self.stopped = anyio.Event()

    async def start(self, tasks: anyio.abc.TaskGroup) -> None:
        await tasks.start(self._serve)

    async def stop(self) -> None:
        self.stop_now.set()
        await self.stopped.wait()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        to_app, from_server = anyio.create_memory_object_stream[dict[str, Any]](10)
        answers: list[dict[str, Any]] = []
        answered = anyio.Event()

        async def send(message: Any) -> None:
            answers.append(message)
            answered.set()

        try:
            async with to_app, from_server, anyio.create_task_group() as tasks:
                scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
                tasks.start_soon(self.app, scope, from_server.receive, send)
                await to_app.send({"type": "lifespan.startup"})
                await answered.wait()
                assert answers[-1]["type"] == "lifespan.startup.complete", answers
                answered = anyio.Event()
                task_status.started()
                await self.stop_now.wait()
                await to_app.send({"type": "lifespan.shutdown"})
                await answered.wait()
                assert answers[-1]["type"] == "lifespan.shutdown.complete", answers
        finally:
            self.stopped.set()


async def _startup_fails(app: Any, kind: str) -> None:
    """A lifespan startup of ``app`` that fails (answered ``lifespan.startup.failed``, the app raising as Starlette's
    router does), on a loop other apps serve on."""
    answers: list[str] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if asked:  # pragma: no cover - nothing more is asked of a failed startup
            await anyio.sleep_forever()
        asked = True
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        answers.append(message["type"])

    with pytest.raises(Exception) as raised:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert answers == ["lifespan.startup.failed"], answers
    if kind == "lifespan":
        assert "phi's own startup failed" in str(raised.value)
    else:
        assert isinstance(raised.value, ConfigurationError), raised.value


async def _nothing_left_running() -> None:
    """No task left on this loop but this one (the lifespans shut down, the lazy starts closed)."""
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
    current = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    assert not left, left


# ------------------------------------------------------------------------------------------------ checks


def _check_world(world: World) -> None:
    """Each app's events in its own Lago, once per billed request; none anywhere else; stats and metrics its own."""
    for fake_key, fake in world.fakes.items():
        found = Counter((event["code"], event["external_subscription_id"]) for event in fake.events)
        expected: Counter[tuple[str, str]] = Counter()
        for billed in world.billed.values():
            if billed.fake is fake:
                for org, count in billed.events.items():
                    expected[(billed.code, org)] += count
        assert +found == +expected, (fake_key, found, expected, "\n".join(world.trace))
        ids = [event["transaction_id"] for event in fake.events]
        assert len(ids) == len(set(ids)), fake_key
    for name, billed in world.billed.items():
        middleware = world.middleware(name)
        if middleware is None:
            assert not +billed.stats, (name, billed.stats)
            continue
        kept = {key: middleware.stats.get(key, 0) for key in billed.stats}
        assert kept == dict(billed.stats), (name, kept, dict(billed.stats))
        for stat in ("requests", "billed", "blocked"):
            value = billed.registry.get_sample_value(
                "lago_billing_requests_total" if stat == "requests" else f"lago_billing_requests_{stat}_total"
            )
            assert (value or 0) == billed.stats[stat], (name, stat, value, billed.stats[stat])
        # the pipeline's counters go on across its renewals (a new pipeline per lifespan), its own events only
        events = sum(billed.events.values())
        for metric in ("events_recorded", "events_delivered"):
            value = billed.registry.get_sample_value(f"lago_billing_{metric}_total")
            assert (value or 0) == events, (name, metric, value, events, "\n".join(world.trace))
        assert not billed.registry.get_sample_value("lago_billing_events_dropped_total"), name
    assert world.lifespans == world.served, (world.lifespans, world.served)


@contextlib.contextmanager
def _watching(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Unraisable exceptions (a task, stream or database never closed) and asyncio's errors ("Task was destroyed but
    it is pending!") while the block runs, and when it ends (garbage collected)."""
    unraisable: list[str] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda report: unraisable.append(f"{report.exc_type.__name__}: {report.exc_value}")
    try:
        with caplog.at_level(logging.WARNING):
            yield unraisable
            gc.collect()
    finally:
        sys.unraisablehook = previous
    errors = [
        record.getMessage()
        for record in caplog.records
        if record.name == "asyncio" or (record.levelno >= logging.ERROR and "phi" not in record.getMessage())
    ]
    assert not unraisable, unraisable
    assert not errors, errors


def _threads_ended(before: set[threading.Thread]) -> None:
    """The threads of a run ended with it: a TestClient's portal (joined by the TestClient), the worker threads of a
    loop that ended (told to stop as it ended: joined here, a bounded wait for a thread already leaving). Compared
    with the threads there were before: one of an earlier test of the worker may end meanwhile, not one be left."""
    for thread in threading.enumerate():
        if thread.name == "AnyIO worker thread":
            thread.join(timeout=10)
    left = [thread for thread in threading.enumerate() if thread not in before]
    assert not left, [(thread.name, thread.daemon) for thread in left]


@pytest.mark.parametrize("seed", SEEDS)
def test_apps_keep_to_themselves_through_random_lifecycles(
    seed: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(seed)
    threads = set(threading.enumerate())
    with _watching(caplog):
        world = World(rng, tmp_path)
        driver = Driver(world)
        for _ in range(6):
            driver.run_one()
            _threads_ended(threads)
        for name, app in world.own.items():  # what a spool kept of a lazy run whose loop ended, drained at a start
            if world.middleware(name) is not None:
                world.served[name] += name in ("alpha", "beta")
                with TestClient(app):
                    pass
            _threads_ended(threads)
        if world.shared_client is not None:
            anyio.run(world.shared_client.aclose)
        anyio.run(world.eps_billing.aclose)
        _check_world(world)
        del world, driver


# ------------------------------------------------------------------------------------- one pipeline, several apps

SHARED_SEEDS = range(4)


@pytest.mark.parametrize("seed", SHARED_SEEDS)
def test_apps_sharing_a_pipeline_bill_every_request_whichever_shuts_down_first(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Three apps given one ``EventPipeline`` on purpose (one client, one delivery for the process; the README's "a
    pipeline ... they share"), on one loop: served with a lifespan each, without one (a lazy start), or mounted side
    by side in a parent; they shut down one by one in a random order (a lifespan's shutdown, or ``aclose()`` as the
    README says to call from the parent's lifespan) while the others keep serving. Each request answered is one
    event in Lago: the pipeline is closed by the last app to shut down, not the first."""
    rng = random.Random(seed)
    fake = _fake("key-shared")
    settings = BillingSettings(
        api_url=fake.base_url, api_key=fake.api_key, org_header="X-Org-Id", quota_mode="off", retry_backoff=0.001
    )
    names = ["alpha", "beta", "gamma"]
    answered: Counter[str] = Counter()

    async def session() -> None:
        async with LagoClient(settings, transport=fake.transport()) as client:
            pipeline = EventPipeline(client, flush_interval=0.0)
            apps = {
                name: OrgBillingMiddleware(
                    Starlette(routes=[Route("/ping", _ping(name))]),
                    dataclasses.replace(settings, event_code=f"calls_{name}"),
                    pipeline=pipeline,
                    quota=None,
                )
                for name in names
            }
            mounted = rng.random() < 0.5  # beta and gamma side by side in a parent (no lifespan reaches them)
            parent = Starlette(routes=[Mount("/beta", apps["beta"]), Mount("/gamma", apps["gamma"])])
            served = {name: rng.random() < 0.6 and not (mounted and name != "alpha") for name in names}
            order = names[:]
            rng.shuffle(order)
            async with anyio.create_task_group() as servers:
                lifespans = {name: _Served(apps[name]) for name in names if served[name]}
                for name in lifespans:
                    await lifespans[name].start(servers)
                open_apps = list(names)

                async def request(name: str) -> None:
                    app, path = (parent, f"/{name}/ping") if mounted and name != "alpha" else (apps[name], "/ping")
                    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as http:
                        response = await http.get(path, headers={"X-Org-Id": rng.choice(ORGS)})
                    assert response.status_code == 200, (name, response.status_code)
                    answered[name] += 1

                for name in names:  # every app started (the lazy ones by their first request)
                    await request(name)
                for stopping in order:
                    for _ in range(rng.randint(1, 3)):
                        await request(rng.choice(open_apps))
                    if stopping in lifespans:
                        await lifespans.pop(stopping).stop()
                    else:
                        await apps[stopping].aclose()
                    open_apps.remove(stopping)
                    if open_apps:  # one still serving after another's shutdown
                        await request(rng.choice(open_apps))
            for name in names:
                await apps[name].aclose()
            assert pipeline.stats["dropped"] == 0, pipeline.stats
        await _nothing_left_running()

    with _watching(caplog):
        anyio.run(session)
    found = Counter(event["code"] for event in fake.events)
    assert found == Counter({f"calls_{name}": count for name, count in answered.items()}), (found, answered)


# ------------------------------------------------------------- aclose() after lazy runs on loops that have ended

SPOOL_SEEDS = range(3)


@pytest.mark.parametrize("seed", SPOOL_SEEDS)
def test_aclose_after_lazy_runs_on_ended_loops_delivers_the_spool_before_the_next_start(
    seed: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An app with a spool and an enforcing gate, served without a lifespan on a loop per request (a bare TestClient:
    each loop ends with its request, the spool keeping what it did not send), then ``aclose()`` as the README says
    (from a parent's lifespan), then served again with a lifespan on a new loop. The calls made before count against
    the plan's limit: once the org used it up, it is refused, before and after the restart; ``aclose()`` delivered
    what the spool held ("Deliver what is pending")."""
    rng = random.Random(seed)
    fake = _fake("key-spool")
    limit = rng.randint(2, 4)
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        event_code="calls_gamma",
        org_header="X-Org-Id",
        quota_mode="enforce",
        plan_limits={"tiny": {"max_api_calls": limit}},
        spool_path=str(tmp_path / "spool.db"),
        retry_backoff=0.001,
    )
    app = OrgBillingMiddleware(Starlette(routes=[Route("/ping", _ping("gamma"))]), settings, transport=fake.transport())
    org = {"X-Org-Id": rng.choice(ORGS)}
    with _watching(caplog):
        before = [TestClient(app).get("/ping", headers=org).status_code for _ in range(limit + rng.randint(0, 2))]
        assert before == [200] * limit + [429] * (len(before) - limit)
        anyio.run(app.aclose)
        delivered = len(fake.events)
        with TestClient(app) as client:
            after = [client.get("/ping", headers=org).status_code for _ in range(rng.randint(1, 3))]
    assert (delivered, after) == (limit, [429] * len(after)), (delivered, after, limit)
    assert len(fake.events) == limit
