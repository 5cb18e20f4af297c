"""OrgBillingMiddleware under the ASGI servers users run besides uvicorn: hypercorn (asyncio and trio workers,
HTTP/2), granian (ASGI, with and without lifespan), gunicorn with uvicorn workers, each as a subprocess on 127.0.0.1
against ``lago-org-billing emulator``. One event per request served (JSON, SSE, HEAD, a stream the client leaves),
all delivered by the time the server exits on SIGTERM/SIGINT, counted in the emulator (``total_count``).

Servers not installed in the interpreter running the tests are skipped (``pip install hypercorn granian gunicorn``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._spool import spool_slot_files

API_KEY = "srv-key"
ORG = {"X-Org-Id": "org_acme"}
DEADLINE = 30.0  # seconds a server may take to start or to exit (a bound, never waited for when things work)

APP_MODULE = textwrap.dedent(
    """
    import json

    import anyio
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route

    from lago_org_billing import OrgBillingMiddleware

    USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


    async def chat(request):
        return JSONResponse({"model": "m", "usage": USAGE})


    async def stream(request):
        count = int(request.query_params.get("n", "3"))

        async def events():
            for i in range(count):
                yield f"data: {json.dumps({'i': i})}\\n\\n".encode()
                await anyio.sleep(0.01)
            yield ("data: " + json.dumps({"usage": USAGE}) + "\\n\\n").encode()
            yield b"data: [DONE]\\n\\n"

        return StreamingResponse(events(), media_type="text/event-stream")


    app = Starlette(routes=[Route("/v1/chat", chat, methods=["GET", "POST"]), Route("/v1/stream", stream)])
    app.add_middleware(OrgBillingMiddleware)

    # the billed app mounted in another: Starlette does not pass the lifespan on (the middleware starts lazily)
    outer = Starlette(routes=[Mount("/api", app)])
    """
)

SEED = """{
  "billable_metrics": [{"code": "api_call", "name": "API calls", "aggregation_type": "count_agg"}],
  "plans": [{"code": "starter", "name": "Starter", "interval": "monthly", "amount_cents": 0, "amount_currency": "USD",
             "charges": [{"billable_metric_code": "api_call", "charge_model": "standard",
                          "properties": {"amount": "0.001"}}]}],
  "subscriptions": [{"external_customer_id": "org_acme", "plan_code": "starter", "external_id": "org_acme"}]
}"""


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}) before listening:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a condition (the port), bounded by the deadline
    pytest.fail(f"the server did not listen within {DEADLINE} s:\n{log.read_text()[-3000:]}")


@dataclass
class Emulator:
    url: str

    def count(self) -> int:
        """Events Lago holds (``GET /api/v1/events?per_page=1``: ``meta.total_count``)."""
        answer = httpx.get(
            f"{self.url}/api/v1/events", params={"per_page": 1}, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        answer.raise_for_status()
        total: int = answer.json()["meta"]["total_count"]
        return total

    def events(self, count: int) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.url}/api/v1/events", params={"per_page": count}, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        events: list[dict[str, Any]] = answer.json()["events"]
        return events

    def delay_next_batch(self, latency_ms: int) -> None:
        """The next ``POST /api/v1/events/batch`` answers only after ``latency_ms``: the events of the requests
        sent meanwhile are still in the server's memory when it gets its signal."""
        answer = httpx.post(
            f"{self.url}/_emulator/faults",
            json={"latency_ms": latency_ms, "count": 1, "path": "/api/v1/events/batch"},
        )
        answer.raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_emulator/faults").raise_for_status()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """``lago-org-billing emulator`` as a subprocess on 127.0.0.1 (org_acme subscribed to a plan)."""
    directory = tmp_path_factory.mktemp("emulator")
    seed = directory / "seed.json"
    seed.write_text(SEED)
    port = _free_port()
    log = directory / "emulator.log"
    code = "import sys; from lago_org_billing.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "emulator", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--api-key", API_KEY, "--seed", str(seed)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, process, log)
        yield Emulator(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(DEADLINE)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "srvapp.py").write_text(APP_MODULE)
    return tmp_path


@dataclass
class Server:
    name: str
    modules: tuple[str, ...]
    argv: tuple[str, ...]  # after ``python -m``; {port} and {app} filled in
    http2: bool = False
    head: bool = True
    leave_stream: bool = True


SERVERS = [
    Server("uvicorn", ("uvicorn",), ("uvicorn", "--host", "127.0.0.1", "--port", "{port}", "{app}")),
    Server("hypercorn", ("hypercorn",), ("hypercorn", "--bind", "127.0.0.1:{port}", "{app}")),
    Server("hypercorn-trio", ("hypercorn", "trio"), ("hypercorn", "-k", "trio", "--bind", "127.0.0.1:{port}", "{app}")),
    # h2c with prior knowledge; GET only: hypercorn 0.18 drops the connection on a POST body over h2 (its bug, a bare
    # Starlette app too: KeyError in H2Protocol._handle_events)
    Server("hypercorn-h2", ("hypercorn", "h2"), ("hypercorn", "--bind", "127.0.0.1:{port}", "{app}"), http2=True),
    # granian 2.8, HTTP/1.1 and HTTP/2: no stream the client leaves. Now and then (1 run in 3) granian logs "ASGI
    # transport error: Closed" for each send instead of raising or sending http.disconnect, the app streams on, and
    # granian exits without ending that request's task (its event is lost; a bare app's task is left the same way).
    Server(
        "granian",
        ("granian",),
        ("granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}", "{app}"),
        leave_stream=False,
    ),
    # granian 2.8 over HTTP/2 also sends a body after a HEAD answer (h2 refuses it; a bare Starlette app too): no HEAD.
    Server(
        "granian-h2",
        ("granian", "h2"),
        ("granian", "--interface", "asgi", "--http", "2", "--host", "127.0.0.1", "--port", "{port}", "{app}"),
        http2=True,
        head=False,
        leave_stream=False,
    ),
    Server(
        "gunicorn-uvicorn-2-workers",
        ("gunicorn", "uvicorn"),
        ("gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2", "-b", "127.0.0.1:{port}", "{app}"),
    ),
]


class Running:
    def __init__(self, server: Server, app_dir: Path, emulator: Emulator, app: str, extra_env: dict[str, str]) -> None:
        self.port = _free_port()
        self.log = app_dir / f"{server.name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAGO_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(app_dir), env.get("PYTHONPATH", "")]),
            LAGO_API_URL=emulator.url,
            LAGO_API_KEY=API_KEY,
            LAGO_ORG_HEADER="X-Org-Id",
            LAGO_RETRY_BACKOFF="0.05",
            # gunicorn >= 25.1 opens a control socket, by default in ~/.gunicorn (unlinking any socket there: a
            # developer's own gunicorn's, another xdist worker's): in the test's directory instead. Older gunicorns
            # and the other servers read no XDG_RUNTIME_DIR.
            XDG_RUNTIME_DIR=str(app_dir),
            **extra_env,
        )
        argv = [arg.format(port=self.port, app=app) for arg in server.argv]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *argv], cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        _wait_listening(self.port, self.process, self.log)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def stop(self, sig: signal.Signals) -> int:
        """Send ``sig`` to the server (the master process) and wait for it to exit."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the server did not exit within {DEADLINE} s of {sig.name}:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def serve(app_dir: Path, emulator: Emulator) -> Iterator[Any]:
    started: list[Running] = []

    def start(server: Server, app: str = "srvapp:app", **extra_env: str) -> Running:
        missing = [module for module in server.modules if not _installed(module)]
        if missing:
            pytest.skip(f"{server.name}: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
        running = Running(server, app_dir, emulator, app, extra_env)
        started.append(running)
        return running

    emulator.clear_faults()
    try:
        yield start
    finally:
        for running in started:
            if running.process.poll() is None:
                running.process.kill()
                running.process.wait()
        emulator.clear_faults()


def _exit_ok(returncode: int, sig: signal.Signals) -> bool:
    """0, or the signal itself re-raised once shut down (uvicorn >= 0.29 does so)."""
    return returncode in (0, -sig)


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("server", SERVERS, ids=[s.name for s in SERVERS])
def test_one_event_per_request_all_delivered_by_exit(serve: Any, emulator: Emulator, server: Server, sig: Any) -> None:
    """JSON, SSE, HEAD and a stream the client leaves after its first event: one event each, still in the server's
    memory when it gets the signal (the first batch is held by Lago), all in Lago once it has exited."""
    if server.name.startswith("gunicorn") and sig == signal.SIGINT:
        pytest.skip("gunicorn's SIGINT is its quick shutdown: workers are SIGQUIT then SIGKILLed after 30 s")
    before = emulator.count()
    running = serve(server)
    served = 0
    with httpx.Client(
        base_url=running.base_url, http1=not server.http2, http2=server.http2, headers=ORG, timeout=DEADLINE
    ) as client:
        emulator.delay_next_batch(1500)
        for _ in range(3):
            answer = client.get("/v1/chat")
            assert answer.status_code == 200, running.output()
            assert answer.http_version == ("HTTP/2" if server.http2 else "HTTP/1.1")
            served += 1
        answer = client.get("/v1/stream")
        assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
        served += 1
        if server.head:
            assert client.head("/v1/chat").status_code == 200
            served += 1
        if server.leave_stream:
            with client.stream("GET", "/v1/stream", params={"n": 1000}) as stream:
                assert stream.status_code == 200
                next(stream.iter_bytes())  # then the client goes away mid-stream
            served += 1
    returncode = running.stop(sig)
    assert _exit_ok(returncode, sig), running.output()
    assert emulator.count() - before == served, running.output()


def test_json_event_attributes_under_hypercorn_trio(serve: Any, emulator: Emulator) -> None:
    """The trio worker: route template, org and the JSON body's tokens, as under uvicorn."""
    running = serve(SERVERS[2])
    assert httpx.post(f"{running.base_url}/v1/chat", headers=ORG).status_code == 200
    assert _exit_ok(running.stop(signal.SIGTERM), signal.SIGTERM)
    (event,) = emulator.events(1)
    assert event["external_subscription_id"] == "org_acme"
    assert event["properties"]["endpoint"] == "/v1/chat"
    assert event["properties"]["method"] == "POST"
    assert event["properties"]["total_tokens"] == 7


@pytest.mark.parametrize(
    "server",
    [SERVERS[0], SERVERS[1], SERVERS[2]],
    ids=["uvicorn", "hypercorn", "hypercorn-trio"],
)
def test_mounted_app_without_lifespan_bills_each_request(serve: Any, emulator: Emulator, server: Server) -> None:
    """The billed app mounted in another (Starlette passes no lifespan to it): the middleware starts with the first
    request, and its events are delivered when the server's event loop ends. Under ``hypercorn -k trio`` every
    request is answered 500 instead (``ConfigurationError: OrgBillingMiddleware needs the ASGI lifespan to run its
    background delivery outside asyncio``)."""
    before = emulator.count()
    running = serve(server, app="srvapp:outer")
    with httpx.Client(base_url=running.base_url, headers=ORG, timeout=DEADLINE) as client:
        codes = [client.get("/api/v1/chat").status_code for _ in range(3)]
    returncode = running.stop(signal.SIGINT)
    assert codes == [200, 200, 200], running.output()
    assert _exit_ok(returncode, signal.SIGINT), running.output()
    assert emulator.count() - before == 3, running.output()


def test_hypercorn_several_workers_lose_nothing_with_the_spool(serve: Any, emulator: Emulator, app_dir: Path) -> None:
    """``hypercorn -w 2``: the master SIGTERMs (default action: the process dies at once) every worker still
    running once the first one has exited, so a worker still flushing to a slow Lago loses what memory holds. With
    ``LAGO_SPOOL_PATH`` those events wait in its slot file and the next start delivers them. That start's own
    shutdown is the same race (its draining worker may be killed when the idle one exits first: on a loaded machine
    it is): every event is then in Lago or still in a slot file, none lost, none in Lago twice."""
    server = Server(
        "hypercorn-2-workers", ("hypercorn",), ("hypercorn", "-w", "2", "--bind", "127.0.0.1:{port}", "{app}")
    )
    spool = str(app_dir / "spool" / "events.db")
    before = emulator.count()
    running = serve(server, LAGO_SPOOL_PATH=spool)
    emulator.delay_next_batch(3000)
    with httpx.Client(base_url=running.base_url, headers=ORG, timeout=DEADLINE) as client:
        for _ in range(4):
            assert client.get("/v1/chat").status_code == 200
    assert running.stop(signal.SIGTERM) == 0, running.output()
    emulator.clear_faults()
    running = serve(server, LAGO_SPOOL_PATH=spool)  # drains what the killed worker spooled
    assert httpx.get(f"{running.base_url}/v1/chat", headers=ORG).status_code == 200
    assert running.stop(signal.SIGTERM) == 0, running.output()
    delivered = emulator.count() - before
    waiting = 0
    for _, slot_file in spool_slot_files(spool):
        with contextlib.closing(sqlite3.connect(slot_file)) as db:
            waiting += db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    # (a row may outlive its delivery when the worker is killed between Lago's answer and the row's deletion: sent
    # again at the next start, the same transaction id and timestamp, which Lago deduplicates)
    assert delivered <= 5 <= delivered + waiting, (delivered, waiting, running.output())


# ------------------------------------------------------------------------------------------------------------------
# in process, on trio (the test's own event loop): the same lazy start as under hypercorn -k trio, without a server


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.mark.anyio
async def test_trio_without_lifespan_serves_and_bills(fake_lago: Any, header_settings: BillingSettings) -> None:
    """No lifespan (an app mounted in another) on trio: requests are served and billed, and ``aclose()`` delivers
    them. They fail with ``ConfigurationError`` (500 from a server) instead."""
    pytest.importorskip("trio")

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})

    inner = Starlette(routes=[Route("/chat", chat)])
    middleware = OrgBillingMiddleware(inner, settings=header_settings, transport=fake_lago.transport())
    outer = Starlette(routes=[Mount("/api", middleware)])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t") as client:
            codes = [(await client.get("/api/chat", headers={"X-Org-Id": "org_a"})).status_code for _ in range(2)]
    finally:
        await middleware.aclose()
    assert codes == [200, 200]
    assert [e["properties"]["total_tokens"] for e in fake_lago.events] == [3, 3]
