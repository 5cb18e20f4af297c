"""Exactly one ``api_call`` event per served request, end to end, under chaos.

A real ``uvicorn`` (1 or 2 workers, a subprocess) serves an app billed by ``OrgBillingMiddleware`` (memory outbox or
``LAGO_SPOOL_PATH``, quota gate off or enforced) against the emulator served on 127.0.0.1, whose control API injects
faults on ``/api/v1/events/batch``: 5xx bursts, a 429 with ``X-RateLimit-Reset``, answers slower than
``LAGO_API_TIMEOUT`` (stored by Lago, the answer lost), connections dropped. A client drives requests each marked
with a unique user id (``X-User-Id``): JSON, SSE read whole, SSE left midway, app crashes (500), requests whose
client left before the answer started, keep-alive, HTTP/1.1 pipelining, retries with an ``Idempotency-Key``. The
server is then stopped with SIGTERM, or one worker is SIGKILLed (spool on) and started again by uvicorn. Lago's
stored events are compared with the requests served one by one: none missing, none twice, org, user, endpoint,
method, status and tokens right.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lago_org_billing._spool import spool_slot_files
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.slow

DEADLINE = 20.0  # a bound on each wait (never waited for when things work)

APP_MODULE = textwrap.dedent(
    """
    import json
    import os

    import anyio
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from lago_org_billing import OrgBillingMiddleware


    def usage(n):
        return {"prompt_tokens": n, "completion_tokens": 2 * n, "total_tokens": 3 * n}


    async def chat(request):
        n = int(request.query_params["n"])
        return JSONResponse({"model": "m", "usage": usage(n)}, headers={"x-worker": str(os.getpid())})


    async def stream(request):
        n = int(request.query_params["n"])
        chunks = int(request.query_params.get("chunks", "3"))

        async def events():
            for i in range(chunks):
                yield f"data: {json.dumps({'i': i})}\\n\\n".encode()
                await anyio.sleep(0.005)
            yield ("data: " + json.dumps({"usage": usage(n)}) + "\\n\\n").encode()
            yield b"data: [DONE]\\n\\n"

        return StreamingResponse(events(), media_type="text/event-stream")


    async def boom(request):
        raise RuntimeError("the app failed")


    async def broken_stream(request):
        n = int(request.query_params["n"])

        async def events():
            yield ("data: " + json.dumps({"usage": usage(n)}) + "\\n\\n").encode()
            raise RuntimeError("the stream failed")

        return StreamingResponse(events(), media_type="text/event-stream")


    async def held(request):
        # entered: the test is told (a file); answered only once its client has gone
        open(os.path.join(os.environ["CHAOS_MARKS"], request.query_params["mark"]), "w").close()
        await request.body()
        while (await request.receive())["type"] != "http.disconnect":
            pass
        return JSONResponse({"usage": usage(int(request.query_params["n"]))})


    routes = [
        Route("/v1/chat", chat, methods=["GET", "POST"]),
        Route("/v1/stream", stream),
        Route("/v1/boom", boom),
        Route("/v1/broken", broken_stream),
        Route("/v1/held", held),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(OrgBillingMiddleware)

    idempotent = Starlette(routes=routes)
    idempotent.add_middleware(OrgBillingMiddleware, idempotency_header="Idempotency-Key")
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(condition: Any, what: str, deadline: float = DEADLINE) -> None:
    """Poll ``condition`` until true, bounded by ``deadline`` seconds (a condition, never a guessed pause)."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Lago:
    """The emulator served on 127.0.0.1, driven over HTTP only (its control API and Lago's own)."""

    def __init__(self, fake: FakeLago, url: str) -> None:
        self.fake = fake
        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {fake.api_key}"}, timeout=DEADLINE)

    def fault(self, **spec: Any) -> None:
        self.http.post("/_emulator/faults", json={"path": "/api/v1/events/batch", **spec}).raise_for_status()

    def clear_faults(self) -> None:
        self.http.delete("/_emulator/faults").raise_for_status()

    def events(self, org: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = self.http.get(
                "/api/v1/events", params={"external_subscription_id": org, "per_page": 100, "page": page}
            )
            answer.raise_for_status()
            body = answer.json()
            found += body["events"]
            if not body["meta"].get("next_page"):
                return found
            page += 1


@pytest.fixture(scope="module")
def lago() -> Iterator[Lago]:
    fake = FakeLago()
    fake.add_billable_metric("api_call", aggregation_type="count_agg")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0"}}
    fake.add_plan("starter", amount_cents=0, charges=[charge])
    with serve_in_thread(fake) as url:
        lago = Lago(fake, url)
        yield lago
        lago.http.close()


@pytest.fixture
def org(lago: Lago, request: pytest.FixtureRequest) -> str:
    """An org (and its subscription) of the test's own: its events are the ones compared."""
    name = f"org_{abs(hash(request.node.nodeid)) % 10**8}_{int(time.time() * 1000) % 10**6}"
    lago.fake.add_customer(name)
    lago.fake.add_subscription(name, "starter", external_id=name)
    lago.clear_faults()
    return name


class Server:
    def __init__(self, directory: Path, lago: Lago, workers: int, app: str, graceful: str, **env: str) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"uvicorn-{self.port}.log"
        self.marks = directory / "marks"
        self.marks.mkdir(exist_ok=True)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("LAGO_")}
        environ.update(
            PYTHONPATH=os.pathsep.join([str(directory), environ.get("PYTHONPATH", "")]),
            CHAOS_MARKS=str(self.marks),
            LAGO_API_URL=lago.url,
            LAGO_API_KEY=lago.fake.api_key,
            LAGO_ORG_HEADER="X-Org-Id",
            LAGO_USER_HEADER="X-User-Id",
            LAGO_RETRY_BACKOFF="0.02",
            LAGO_API_TIMEOUT="2",
            LAGO_QUOTA_MODE="off",
        )
        environ.update(env)
        command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", str(workers), "--timeout-graceful-shutdown", graceful, app]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, cwd=directory, env=environ, stdout=out, stderr=subprocess.STDOUT)
        self.workers = workers
        _wait(self._ready, f"uvicorn to serve:\n{self.output()}")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"uvicorn exited ({self.process.returncode}):\n{self.output()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
        except OSError:
            return False
        return self.workers == 1 or len(self.children()) == self.workers

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        # (uvicorn's multiprocess manager may also run a resource tracker: the workers are the python children that
        # are not it)
        pids = [int(pid) for pid in text.split()]
        return [pid for pid in pids if b"multiprocessing.resource_tracker" not in _cmdline(pid)]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"uvicorn did not exit within {DEADLINE} s of SIGTERM:\n{self.output()}")
        assert returncode in (0, -signal.SIGTERM), self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture
def serve(tmp_path: Path, lago: Lago) -> Iterator[Any]:
    (tmp_path / "chaosapp.py").write_text(APP_MODULE)
    started: list[Server] = []

    def start(workers: int = 2, app: str = "chaosapp:app", graceful: str = "15", **env: str) -> Server:
        server = Server(tmp_path, lago, workers, app, graceful, **env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()
        lago.clear_faults()


class Expected:
    """The requests served, by marker (the user id): what their event must say."""

    def __init__(self, org: str) -> None:
        self.org = org
        self.served: dict[str, dict[str, Any]] = {}
        self.unbilled: set[str] = set()
        self._next = 0

    def marker(self, kind: str) -> tuple[str, int, dict[str, str]]:
        self._next += 1
        user = f"u-{kind}-{self._next}"
        return user, self._next, {"X-Org-Id": self.org, "X-User-Id": user}

    def billed(self, user: str, endpoint: str, method: str, status: int, tokens: int) -> None:
        self.served[user] = {"endpoint": endpoint, "method": method, "status_code": status, "total_tokens": tokens}

    def compare(self, events: list[dict[str, Any]]) -> None:
        counts = Counter(event["properties"].get("user_id") for event in events)
        twice = {user: n for user, n in counts.items() if n > 1}
        missing = sorted(set(self.served) - set(counts))
        extra = sorted(set(counts) - set(self.served))
        assert not twice and not missing and not extra, f"twice={twice} missing={missing} unexpected={extra}"
        assert len({event["transaction_id"] for event in events}) == len(events)
        wrong = []
        for event in events:
            properties = event["properties"]
            want = self.served[properties["user_id"]]
            got = {key: properties.get(key) for key in want}
            if got != want or properties.get("org_id") != self.org or event["external_subscription_id"] != self.org:
                wrong.append((properties["user_id"], got, want))
        assert not wrong, wrong


def _pipelined(base_url: str, requests: list[tuple[str, dict[str, str]]]) -> list[int]:
    """Send the requests on one connection at once (HTTP/1.1 pipelining), the last closing it; their statuses."""
    port = int(base_url.rsplit(":", 1)[1])
    data = b""
    for i, (target, headers) in enumerate(requests):
        lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
        if i == len(requests) - 1:
            lines.append("Connection: close")
        data += ("\r\n".join(lines) + "\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), DEADLINE) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


def _left_before_the_answer(server: Server, target: str, headers: dict[str, str], mark: str) -> None:
    """A request whose client goes away once the app runs it, before any answer started."""
    port = server.port
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), DEADLINE) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        _wait(lambda: (server.marks / mark).exists(), f"the app to start {target}")


def _drive(server: Server, expected: Expected, *, rounds: int = 1) -> None:
    """Every kind of request, ``rounds`` times each; what each one served must be billed as, in ``expected``."""
    with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:  # keep-alive: one connection reused
        for _ in range(rounds):
            for method in ("GET", "POST"):
                user, n, headers = expected.marker("json")
                answer = client.request(method, "/v1/chat", params={"n": n}, headers=headers)
                assert answer.status_code == 200, server.output()
                expected.billed(user, "/v1/chat", method, 200, 3 * n)
            user, n, headers = expected.marker("sse")
            answer = client.get("/v1/stream", params={"n": n}, headers=headers)
            assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
            expected.billed(user, "/v1/stream", "GET", 200, 3 * n)
            user, n, headers = expected.marker("sse-left")
            with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as own:
                with own.stream("GET", "/v1/stream", params={"n": n, "chunks": 100_000}, headers=headers) as stream:
                    assert stream.status_code == 200
                    next(stream.iter_bytes())  # then the client goes away mid-stream (its usage never came)
            expected.billed(user, "/v1/stream", "GET", 200, 0)
            user, n, headers = expected.marker("boom")
            with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as own:  # (uvicorn closes its connection)
                assert own.get("/v1/boom", headers=headers).status_code == 500  # unbilled (LAGO_BILL_SERVER_ERRORS)
            expected.unbilled.add(user)
            user, n, headers = expected.marker("left")
            _left_before_the_answer(server, f"/v1/held?n={n}&mark={user}", headers, user)
            expected.billed(user, "/v1/held", "GET", 200, 3 * n)
            batch = []
            for _ in range(3):
                user, n, headers = expected.marker("pipelined")
                batch.append((f"/v1/chat?n={n}", headers))
                expected.billed(user, "/v1/chat", "GET", 200, 3 * n)
            assert _pipelined(server.base_url, batch) == [200, 200, 200]


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
def test_every_request_billed_once_through_lago_faults_then_sigterm(
    serve: Any, lago: Lago, org: str, tmp_path: Path, spool: bool
) -> None:
    """Two workers; Lago's batch endpoint answers slower than the client waits (it stores the batch all the same),
    then 503 twice, drops a connection, and rate-limits (429 with a reset): each served request is in Lago once,
    with its own attributes, once the server has exited on SIGTERM."""
    env = {"LAGO_SPOOL_PATH": str(tmp_path / "spool" / "events.db")} if spool else {}
    server = serve(**env)
    lago.fault(latency_ms=2500, count=1)  # stored after the client's 2 s timeout: answer lost, batch sent again
    lago.fault(status=503, count=2)
    lago.fault(drop=True, count=1)
    lago.fault(rate_limit={"limit": 1, "reset": 1}, seconds=2)
    expected = Expected(org)
    _drive(server, expected)
    server.stop()
    expected.compare(lago.events(org))


def test_quota_enforced_bills_exactly_the_requests_served(serve: Any, lago: Lago, org: str) -> None:
    """The gate on (one worker, a limit of 6 calls from LAGO_PLAN_LIMITS): the requests it refuses are not billed,
    every one it lets through is, once, whatever Lago's batch endpoint does meanwhile."""
    server = serve(workers=1, LAGO_QUOTA_MODE="enforce", LAGO_PLAN_LIMITS=json.dumps({"starter": {"max_api_calls": 6}}))
    lago.fault(status=503, count=2)
    lago.fault(drop=True, count=1)
    expected = Expected(org)
    codes = []
    with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:
        for _ in range(10):
            user, n, headers = expected.marker("gated")
            answer = client.get("/v1/chat", params={"n": n}, headers=headers)
            codes.append(answer.status_code)
            if answer.status_code == 200:
                expected.billed(user, "/v1/chat", "GET", 200, 3 * n)
    server.stop()
    assert codes == [200] * 6 + [429] * 4, (codes, server.output())
    expected.compare(lago.events(org))


def test_idempotent_retries_across_two_workers_are_billed_once(serve: Any, lago: Lago, org: str) -> None:
    """A client retrying with one ``Idempotency-Key`` on new connections (reaching either worker), while Lago drops
    and fails batches: each key is one event in Lago (Postgres store: one transaction id)."""
    server = serve(app="chaosapp:idempotent")
    lago.fault(status=503, count=1)
    lago.fault(drop=True, count=1)
    expected = Expected(org)
    for key in range(4):
        user, n, headers = expected.marker("idem")
        for _ in range(4):  # a new connection each time: the retries spread over the workers
            with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:
                answer = client.post("/v1/chat", params={"n": n}, headers={**headers, "Idempotency-Key": f"k{key}"})
            assert answer.status_code == 200
        expected.billed(user, "/v1/chat", "POST", 200, 3 * n)
    server.stop()
    expected.compare(lago.events(org))


def _spooled(path: str) -> int:
    waiting = 0
    for _, slot_file in spool_slot_files(path):
        with contextlib.closing(sqlite3.connect(f"file:{slot_file}?mode=ro", uri=True)) as db:
            try:
                waiting += db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            except sqlite3.OperationalError:  # (created, its table not yet)
                pass
    return waiting


def test_sigkill_of_a_worker_with_the_spool_then_its_restart_loses_and_doubles_nothing(
    serve: Any, lago: Lago, org: str, tmp_path: Path
) -> None:
    """Two workers spooling while Lago answers 503; once every event is in the spool, one worker is SIGKILLed (its
    batches were in flight, failing) and uvicorn starts another; Lago recovers. Every request served (before and
    after the kill) is in Lago once, with its attributes."""
    spool = str(tmp_path / "spool" / "events.db")
    server = serve(LAGO_SPOOL_PATH=spool)
    lago.fault(status=503, seconds=60)
    expected = Expected(org)
    by_worker: Counter[str] = Counter()
    with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:
        for _ in range(12):
            with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as own:  # new connections: both workers
                user, n, headers = expected.marker("before")
                answer = own.get("/v1/chat", params={"n": n}, headers=headers)
                assert answer.status_code == 200
                by_worker[answer.headers["x-worker"]] += 1
                expected.billed(user, "/v1/chat", "GET", 200, 3 * n)
        _wait(lambda: _spooled(spool) == len(expected.served), "every event in the spool")
        victim, _ = by_worker.most_common(1)[0]
        os.kill(int(victim), signal.SIGKILL)
        _wait(lambda: int(victim) not in server.children() and len(server.children()) == 2, "the worker's restart")
        lago.clear_faults()
        for _ in range(4):
            user, n, headers = expected.marker("after")
            assert client.get("/v1/chat", params={"n": n}, headers=headers).status_code == 200
            expected.billed(user, "/v1/chat", "GET", 200, 3 * n)
        _wait(lambda: len(lago.events(org)) >= len(expected.served), "Lago to hold every event")
    server.stop()
    expected.compare(lago.events(org))
    assert _spooled(spool) == 0


def test_streams_cut_by_the_graceful_shutdown_timeout_are_billed_once(serve: Any, lago: Lago, org: str) -> None:
    """SIGTERM while clients still read long streams and wait on an answer that never comes: uvicorn cancels them
    after ``--timeout-graceful-shutdown``; each stream that started is billed once (status 200, what it counted),
    the request that never answered is not (the client got nothing)."""
    server = serve(workers=1, graceful="1")
    expected = Expected(org)
    streams = []
    clients = []
    for _ in range(3):
        user, n, headers = expected.marker("cut")
        client = httpx.Client(base_url=server.base_url, timeout=DEADLINE)
        clients.append(client)
        stream = client.stream("GET", "/v1/stream", params={"n": n, "chunks": 100_000}, headers=headers)
        answer = stream.__enter__()
        assert answer.status_code == 200
        next(answer.iter_bytes())
        streams.append(stream)
        expected.billed(user, "/v1/stream", "GET", 200, 0)
    try:
        server.stop()
    finally:
        for stream in streams:
            with contextlib.suppress(httpx.HTTPError):
                stream.__exit__(None, None, None)
        for client in clients:
            client.close()
    expected.compare(lago.events(org))


def test_without_a_lifespan_the_spool_keeps_what_sigterm_cut_for_the_next_start(
    serve: Any, lago: Lago, org: str, tmp_path: Path
) -> None:
    """``uvicorn --lifespan off`` (the README's advice there: set ``LAGO_SPOOL_PATH``) with Lago failing: SIGTERM
    ends the worker without a flush; its events wait in the spool, and the next start delivers each one once."""
    spool = str(tmp_path / "spool" / "events.db")
    lago.fault(status=503, seconds=60)
    server = serve(workers=1, LAGO_SPOOL_PATH=spool, UVICORN_LIFESPAN="off")
    expected = Expected(org)
    with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:
        for _ in range(5):
            user, n, headers = expected.marker("lazy")
            assert client.get("/v1/chat", params={"n": n}, headers=headers).status_code == 200
            expected.billed(user, "/v1/chat", "GET", 200, 3 * n)
    server.stop()
    lago.clear_faults()
    server = serve(workers=1, LAGO_SPOOL_PATH=spool)
    _wait(lambda: len(lago.events(org)) >= len(expected.served), "Lago to hold every event")
    server.stop()
    expected.compare(lago.events(org))


def test_server_errors_billed_when_asked_are_billed_once(serve: Any, lago: Lago, org: str) -> None:
    """``LAGO_BILL_SERVER_ERRORS=true``: an app crash is one event with status 500; a stream failing after its usage
    went out is one event of status 200 with those tokens; HEAD is billed once, with the tokens of the answer the app
    made (Starlette runs the GET endpoint: the work was done; the server drops the body)."""
    server = serve(workers=1, LAGO_BILL_SERVER_ERRORS="true")
    lago.fault(status=500, count=1)
    lago.fault(drop=True, count=1)
    expected = Expected(org)
    with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:
        user, n, headers = expected.marker("boom")
        assert client.get("/v1/boom", headers=headers).status_code == 500
        expected.billed(user, "/v1/boom", "GET", 500, 0)
    # (a new connection each: uvicorn closes the one an app raised on, and a request sent on it never arrives)
    with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:
        user, n, headers = expected.marker("broken")
        with client.stream("GET", "/v1/broken", params={"n": n}, headers=headers) as answer:
            assert answer.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):  # cut off by the server
                answer.read()
        expected.billed(user, "/v1/broken", "GET", 200, 3 * n)
    with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as client:
        user, n, headers = expected.marker("head")
        assert client.head("/v1/chat", params={"n": n}, headers=headers).status_code == 200
        expected.billed(user, "/v1/chat", "HEAD", 200, 3 * n)
    server.stop()
    expected.compare(lago.events(org))


def test_sigkill_of_a_worker_whose_batches_lago_stored_but_never_answered(
    serve: Any, lago: Lago, org: str, tmp_path: Path
) -> None:
    """Lago answers every batch after the client's timeout (it stores them all the same): the rows stay in the spool.
    One worker is SIGKILLed with its events in Lago and in its spool; uvicorn starts another, which adopts the slot
    and sends them again once Lago answers in time: each in Lago once (a 422 of duplicates is delivered)."""
    spool = str(tmp_path / "spool" / "events.db")
    server = serve(LAGO_SPOOL_PATH=spool, LAGO_API_TIMEOUT="1")
    lago.fault(latency_ms=1200, seconds=60)
    expected = Expected(org)
    by_worker: Counter[str] = Counter()
    for _ in range(10):
        with httpx.Client(base_url=server.base_url, timeout=DEADLINE) as own:  # new connections: both workers
            user, n, headers = expected.marker("stored")
            answer = own.post("/v1/chat", params={"n": n}, headers=headers)
            assert answer.status_code == 200
            by_worker[answer.headers["x-worker"]] += 1
            expected.billed(user, "/v1/chat", "POST", 200, 3 * n)
    _wait(lambda: len(lago.events(org)) == len(expected.served), "Lago to store every event")
    assert _spooled(spool) == len(expected.served)  # none acknowledged
    victim, _ = by_worker.most_common(1)[0]
    os.kill(int(victim), signal.SIGKILL)
    _wait(lambda: int(victim) not in server.children() and len(server.children()) == 2, "the worker's restart")
    lago.clear_faults()
    _wait(lambda: _spooled(spool) == 0, "the spool to drain")
    server.stop()
    expected.compare(lago.events(org))
