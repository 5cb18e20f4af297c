"""``from_jwt_claim(jwks_url=...)`` when the requests waiting for a JWKS fetch are cancelled: a timeout middleware
(``anyio.move_on_after`` around the app), or a client gone from a server that cancels the request.

Covers: requests with unknown kids, each cancelled while the fetch is in flight, make one fetch per refresh interval
between them (they made one each: the cancelled fetch gave its attempt back), under asyncio and trio, with the
built-in client and a ``jwks_client``, and through ``OrgBillingMiddleware`` behind a timeout middleware; a request
waiting for the fetch of a cancelled one gets that fetch's keys (no second fetch); a waiter is held no longer than the
fetch deadline; an event loop that ends with a fetch in flight leaves the next loop free to fetch at once; and a seeded
random schedule of requests, cancellations, answers and clock moves fetches exactly when the documented cache would.

The JWKS is served by a real HTTP server on 127.0.0.1 that counts the GETs and holds its answers until the test lets
them go (no sleeps: the tests wait on the server's events and on ``anyio.wait_all_tasks_blocked``). The JWKS clock is
patched.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _jwks_server import Clock, JwksServer
from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, get_current_org, reset_warnings

pytestmark = pytest.mark.anyio

BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
INTERVAL = 30.0
_paths = itertools.count()


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(scope="module")
def jwks_endpoints() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture
def server(jwks_endpoints: JwksServer) -> Iterator[JwksServer]:
    jwks_endpoints.hold()
    yield jwks_endpoints
    jwks_endpoints.release()  # (a handler still held lets go)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(70_000.0)
    monkeypatch.setattr("lago_org_billing._jwks._clock", fake)
    return fake


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def jwks_of(*published: tuple[rsa.RSAPrivateKey, str]) -> bytes:
    entries = [
        {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid} for key, kid in published
    ]
    return json.dumps({"keys": entries}).encode()


def token(key: rsa.RSAPrivateKey, kid: str, org: str = "org_a") -> str:
    return jwt.encode({"org_id": org}, key, algorithm="RS256", headers={"kid": kid})


def new_path() -> str:
    return f"/cancelled/{next(_paths)}/jwks.json"


def scope_with(bearer: str) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": [(b"authorization", f"Bearer {bearer}".encode())]}


async def resolve(resolver: Any, bearer: str) -> str | None:
    """What the middleware does with a resolver: take its id, or await the awaitable it returns."""
    found = resolver(scope_with(bearer))
    if found is None or isinstance(found, str):
        return found
    with anyio.fail_after(30):  # (a guard against a hang, not a timing assertion)
        return await found  # type: ignore[no-any-return]


async def cancelled_while_waiting(resolver: Any, bearer: str, server: JwksServer | None = None) -> None:
    """Resolve ``bearer`` and cancel it once it waits for the JWKS (with ``server``: once its GET arrived there, the
    fetch in flight), as a timeout middleware or a server cancelling a disconnected client's request does."""
    outcome: list[str | None] = []

    async def one() -> None:
        outcome.append(await resolve(resolver, bearer))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(one)
        if server is not None:
            await server.wait_arrival()
        await anyio.wait_all_tasks_blocked()
        tasks.cancel_scope.cancel()
    assert outcome == [], "the request was to wait for the fetch"


@BACKENDS
@pytest.mark.parametrize("own_client", [False, True], ids=["builtin_client", "jwks_client"])
async def test_requests_cancelled_during_a_fetch_make_one_fetch_per_interval(
    own_client: bool, keys: list[rsa.RSAPrivateKey], server: JwksServer, clock: Clock
) -> None:
    """Five requests with unknown kids, each cancelled while the JWKS fetch is in flight, make one fetch between
    them (they made five: the cancelled fetch gave its attempt back), and that fetch is not lost: once it answers,
    the issuer's tokens verify with its keys; unknown kids fetch nothing more until the interval has passed."""
    path = new_path()
    server.serve(path, jwks_of((keys[0], "k1")), gated=True)
    sent: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request)

    async with contextlib.AsyncExitStack() as stack:
        options: dict[str, Any] = {"algorithms": ["RS256"], "jwks_refresh_interval": INTERVAL}
        if own_client:
            client = httpx.AsyncClient(event_hooks={"request": [count]})
            options["jwks_client"] = await stack.enter_async_context(client)
        org = from_jwt_claim("org_id", jwks_url=server.url(path), **options)
        for n in range(5):
            forged = token(keys[1], f"random-{n}", "org_evil")
            await cancelled_while_waiting(org, forged, server if n == 0 else None)
            if own_client:
                assert len(sent) == 1, f"request {n}: a fetch per cancelled request"
        server.release()
        assert await resolve(org, token(keys[0], "k1")) == "org_a"
        assert await resolve(org, token(keys[1], "random-again", "org_evil")) is None
        assert server.count(path) == 1
        clock.now += INTERVAL
        assert await resolve(org, token(keys[1], "random-later", "org_evil")) is None
        assert server.count(path) == 2
        assert len(sent) == (2 if own_client else 0)


async def whoami(request: Request) -> Response:
    return JSONResponse({"org": get_current_org(request)})


APP = Starlette(routes=[Route("/whoami", whoami)])


def timing_out(app: Any, server: JwksServer) -> Any:
    """A timeout middleware whose timeout is an event, not a clock: a request with ``x-time-out`` is cancelled once
    it waits for the JWKS (the first: once the fetch reached the server), answered 504."""
    first = [True]

    async def wrapper(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers", []))
        if scope["type"] != "http" or b"x-time-out" not in headers:
            await app(scope, receive, send)
            return
        started: list[bool] = []

        async def watched(message: Any) -> None:
            started.append(True)
            await send(message)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(app, scope, receive, watched)
            if first[0]:
                first[0] = False
                await server.wait_arrival()
            await anyio.wait_all_tasks_blocked()
            tasks.cancel_scope.cancel()
        assert not started, "the request was to wait for the fetch"
        await send({"type": "http.response.start", "status": 504, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    return wrapper


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_plan("starter", amount_cents=0)
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


async def test_requests_timed_out_by_a_middleware_make_one_fetch(
    keys: list[rsa.RSAPrivateKey], server: JwksServer, clock: Clock, settings: BillingSettings, fake_lago: Any
) -> None:
    """Behind a timeout middleware, five requests to ``OrgBillingMiddleware`` with unknown kids, each timed out while
    the JWKS fetch is in flight, make one fetch; the issuer's token after them is billed with that fetch's keys."""
    path = new_path()
    server.serve(path, jwks_of((keys[0], "k1")), gated=True)
    org = from_jwt_claim("org_id", jwks_url=server.url(path), algorithms=["RS256"], jwks_refresh_interval=INTERVAL)
    middleware = OrgBillingMiddleware(
        APP, settings=settings, transport=fake_lago.transport(), quota=None, resolve_org=org, on_unresolved="reject"
    )
    try:
        transport = httpx.ASGITransport(app=timing_out(middleware, server))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for n in range(5):
                headers = {"authorization": f"Bearer {token(keys[1], f'random-{n}', 'org_evil')}", "x-time-out": "1"}
                with anyio.fail_after(30):  # (a guard against a hang, not a timing assertion)
                    assert (await client.get("/whoami", headers=headers)).status_code == 504
            server.release()
            with anyio.fail_after(30):
                answer = await client.get("/whoami", headers={"authorization": f"Bearer {token(keys[0], 'k1')}"})
            assert answer.status_code == 200 and answer.json() == {"org": "org_a"}
    finally:
        await middleware.aclose()
    assert server.count(path) == 1


@BACKENDS
async def test_a_request_waiting_for_a_cancelled_requests_fetch_gets_its_keys(
    keys: list[rsa.RSAPrivateKey], server: JwksServer, clock: Clock
) -> None:
    """The request that started the fetch is cancelled while another waits for it: the waiter gets the keys of that
    same fetch (it neither hangs, nor gives up, nor fetches a second time)."""
    path = new_path()
    server.serve(path, jwks_of((keys[0], "k1")), gated=True)
    org = from_jwt_claim("org_id", jwks_url=server.url(path), algorithms=["RS256"], jwks_refresh_interval=INTERVAL)
    got: list[str | None] = []

    async def one(name: str) -> None:
        got.append(await resolve(org, token(keys[0], "k1", name)))

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as first:
            first.start_soon(one, "org_gone")
            await server.wait_arrival()
            await anyio.wait_all_tasks_blocked()
            outer.start_soon(one, "org_waiter")
            await anyio.wait_all_tasks_blocked()
            first.cancel_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        server.release()
    assert got == ["org_waiter"]
    assert server.count(path) == 1


async def test_a_waiter_is_held_no_longer_than_the_fetch_deadline(
    keys: list[rsa.RSAPrivateKey], server: JwksServer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JWKS that never answers: the request waiting for the fetch of a cancelled one is let go unresolved when that
    fetch's deadline ends it (it did not start a second fetch with a deadline of its own), and the next request within
    the interval is refused at once, without a fetch."""
    monkeypatch.setattr("lago_org_billing._jwks._DEADLINE", 0.2)
    path = new_path()
    server.serve(path, jwks_of((keys[0], "k1")), gated=True)  # (never released in this test)
    org = from_jwt_claim("org_id", jwks_url=server.url(path), algorithms=["RS256"], jwks_refresh_interval=INTERVAL)
    got: list[str | None] = []

    async def one(name: str) -> None:
        got.append(await resolve(org, token(keys[0], "k1", name)))

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as first:
            first.start_soon(one, "org_gone")
            await server.wait_arrival()
            await anyio.wait_all_tasks_blocked()
            outer.start_soon(one, "org_waiter")
            await anyio.wait_all_tasks_blocked()
            first.cancel_scope.cancel()
    assert got == [None]
    assert org(scope_with(token(keys[0], "k1"))) is None  # (not an awaitable: no fetch, no wait)
    assert server.count(path) == 1


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_loop_ending_with_a_fetch_in_flight_leaves_the_next_loop_free_to_fetch(
    backend: str, keys: list[rsa.RSAPrivateKey], server: JwksServer, clock: Clock
) -> None:
    """An event loop ends (a test client's portal, a server stopping) while the fetch of a cancelled request is in
    flight: the fetch ends with it, and the next loop's request fetches at once (it neither waits for the old loop's
    fetch nor is refused for the rest of the interval)."""
    path = new_path()
    body = jwks_of((keys[0], "k1"))
    server.serve(path, body, gated=True)
    org = from_jwt_claim("org_id", jwks_url=server.url(path), algorithms=["RS256"], jwks_refresh_interval=INTERVAL)

    async def first_loop() -> None:
        await cancelled_while_waiting(org, token(keys[0], "k1"), server)

    async def next_loop() -> str | None:
        return await resolve(org, token(keys[0], "k1"))

    anyio.run(first_loop, backend=backend)
    server.serve(path, body, gated=False)
    assert anyio.run(next_loop, backend=backend) == "org_a"
    assert server.count(path) == 2


# ------------------------------------------------------------------------------------------- seeded schedules

#: Seeds run in CI; set JWKS_CANCEL_SEEDS=300 to hunt with more by hand.
SEEDS = range(int(os.environ.get("JWKS_CANCEL_SEEDS", "4")))
STEPS = 30


class Model:
    """The key cache as ``_jwks``'s docstring tells it (a max age never reached here): fetched when cold, or for a
    token whose kid is not cached, at most once per refresh interval of the last fetch started; concurrent requests
    share the fetch in flight, and a request cancelled while it waits changes nothing of it."""

    def __init__(self) -> None:
        self.attempted: float | None = None
        self.fetched = False
        self.in_flight: set[str] | None = None  # the kids the fetch in flight answers with
        self.cached: set[str] = set()
        self.fetches = 0

    def find(self, kid: str, now: float) -> str:
        """``known`` (resolved at once with the key), ``refused`` (at once), ``wait`` or ``fetch`` (then waits)."""
        due = self.attempted is None or now - self.attempted >= INTERVAL
        if due and not self.fetched:
            return "wait" if self.in_flight is not None else "fetch"
        if kid in self.cached:
            return "known"
        if self.in_flight is not None:
            return "wait"
        return "fetch" if due else "refused"

    def start(self, now: float, published: set[str]) -> None:
        self.attempted, self.in_flight = now, set(published)
        self.fetches += 1

    def answered(self) -> None:
        if self.in_flight is not None:
            self.cached, self.fetched, self.in_flight = self.in_flight, True, None


@BACKENDS
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_schedules_of_cancelled_requests_fetch_as_documented(
    seed: int, keys: list[rsa.RSAPrivateKey], server: JwksServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Seeded schedules of requests with the issuer's kids, rotated ones and random ones, some cancelled while they
    wait for the JWKS, others left waiting until it answers, with the clock moved by part of or a whole refresh
    interval: each request resolves (at once, or after the fetch it waits for) as the documented cache says, and the
    server gets exactly the fetches that cache makes, whoever is cancelled."""
    rng = random.Random(9_100 + seed)
    path = new_path()
    generation = itertools.count()
    published = [f"k{next(generation)}"]
    removed: list[str] = []
    server.serve(path, jwks_of(*((keys[0], kid) for kid in published)), gated=True)
    org = from_jwt_claim(
        "org_id", jwks_url=server.url(path), algorithms=["RS256"], jwks_refresh_interval=INTERVAL, jwks_max_age=10**7
    )
    model = Model()
    pending: list[tuple[anyio.Event, list[str | None], str, str]] = []

    async def waiting(bearer: str, done: anyio.Event, outcome: list[str | None]) -> None:
        try:
            outcome.append(await resolve(org, bearer))
        finally:
            done.set()

    async with anyio.create_task_group() as waiters:
        for step in range(STEPS):
            what = f"seed {seed} step {step}"
            event = rng.random()
            if event < 0.1:
                clock.now += rng.choice([0.5, INTERVAL])
                continue
            if event < 0.2:  # a rotation: a new kid published, the oldest dropped when there are three
                published.append(f"k{next(generation)}")
                if len(published) > 2:
                    removed.append(published.pop(0))
                server.serve(path, jwks_of(*((keys[0], kid) for kid in published)), gated=True)
                continue
            if event < 0.35 or (event < 0.5 and len(pending) > 3):  # the JWKS answers; the waiters resolve
                if model.in_flight is not None:
                    waiting_for = [kid for _, _, kid, _ in pending]
                    server.release()
                    # (the fetch may end without waiters: one more waits for it, in this task, so that it asks while
                    # the fetch is still in flight, as a request's task does; once it is back, the fetch has ended)
                    assert await resolve(org, token(keys[1], "probe", "org_evil")) is None, what
                    model.answered()
                    with anyio.fail_after(30):  # (a guard against a hang, not a timing assertion)
                        for done, outcome, kid, name in pending:
                            await done.wait()
                            expected = name if kid in model.cached and name != "org_evil" else None
                            assert outcome == [expected], (what, kid, waiting_for, model.cached)
                    pending.clear()
                    server.hold()
                continue
            kind = rng.choice(["current", "current", "older", "removed", "random"])
            kid = {
                "current": published[-1],
                "older": published[0],
                "removed": rng.choice(removed) if removed else published[0],
                "random": f"random-{rng.randrange(10**6)}",
            }[kind]
            name = "org_evil" if kind == "random" else f"org_{step}"
            bearer = token(keys[1] if kind == "random" else keys[0], kid, name)
            predicted = model.find(kid, clock.now)
            if predicted in ("known", "refused"):
                found = org(scope_with(bearer))
                expected = name if predicted == "known" and name != "org_evil" else None
                assert found == expected, (what, kid, predicted)
                continue
            if predicted == "fetch":
                model.start(clock.now, set(published))
            if rng.random() < 0.5:  # cancelled while it waits (the first: once its fetch reached the server)
                await cancelled_while_waiting(org, bearer, server if predicted == "fetch" else None)
            else:
                done, outcome = anyio.Event(), []
                waiters.start_soon(waiting, bearer, done, outcome)
                pending.append((done, outcome, kid, name))
                if predicted == "fetch":
                    await server.wait_arrival()
                await anyio.wait_all_tasks_blocked()
            if predicted == "fetch":
                server.arrived.clear()
            assert server.count(path) == model.fetches, (what, kid, predicted)
        server.release()  # (the waiters left resolve, whatever they get)
    assert server.count(path) == model.fetches
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors
