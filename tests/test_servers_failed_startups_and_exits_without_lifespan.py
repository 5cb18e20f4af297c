"""Lifespan, startup and shutdown under real servers: an app whose own lifespan startup fails stops hypercorn (asyncio
worker) as it does without the billing middleware, and granian, which ends its workers without ending the tasks of
their event loop, does not lose (silently) the events in memory of a middleware that got no lifespan.

The servers run as subprocesses on 127.0.0.1 against ``lago-org-billing emulator`` (see test_asgi_servers.py), with
the sources of the package under test (an absolute path: the ``PYTHONPATH=src`` of a run from the worktree does not
reach a server started in another directory)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import lago_org_billing
from lago_org_billing import BillingSettings, OrgBillingMiddleware
from test_asgi_servers import API_KEY, DEADLINE, ORG, Emulator, Running, _free_port, _installed, emulator  # noqa: F401

#: The directory holding the package under test, for the servers' PYTHONPATH.
SOURCES = str(Path(lago_org_billing.__file__).resolve().parents[1])

APP_MODULE = textwrap.dedent(
    """
    import json
    import os
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from lago_org_billing import OrgBillingMiddleware


    async def chat(request):
        return JSONResponse({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})


    @asynccontextmanager
    async def failing_lifespan(app):
        raise RuntimeError("the app's own startup failed (database unreachable)")
        yield


    # an app whose own lifespan startup fails, billed
    failing = Starlette(routes=[Route("/v1/chat", chat)], lifespan=failing_lifespan)
    failing.add_middleware(OrgBillingMiddleware)

    # the billed app mounted in another (Starlette passes no lifespan to a mount)
    billed = Starlette(routes=[Route("/v1/chat", chat)])
    billed.add_middleware(OrgBillingMiddleware)
    outer = Starlette(routes=[Mount("/api", billed)])


    # a plain ASGI app that serves HTTP only (it raises on the lifespan, as the ASGI spec lets it), billed
    async def http_only(scope, receive, send):
        assert scope["type"] == "http", "this app serves HTTP only"
        body = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


    plain = OrgBillingMiddleware(http_only)
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "auditapp.py").write_text(APP_MODULE)
    return tmp_path


class Process(Running):
    """A server (``python -m <argv>``) started in ``app_dir`` with the package under test, against the emulator; not
    waited for here (one whose startup fails exits instead of listening: see listening_or_exited). ``stop`` and
    ``output`` are test_asgi_servers' ``Running``'s."""

    def __init__(self, argv: list[str], app_dir: Path, lago: Emulator) -> None:
        self.port = _free_port()
        self.log = app_dir / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAGO_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(app_dir), SOURCES]),
            LAGO_API_URL=lago.url,
            LAGO_API_KEY=API_KEY,
            LAGO_ORG_HEADER="X-Org-Id",
            LAGO_RETRY_BACKOFF="0.05",
        )
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *(arg.format(port=self.port) for arg in argv)],
                cwd=app_dir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.base_url = f"http://127.0.0.1:{self.port}"

    def listening_or_exited(self) -> bool:
        """Until the server listens (True) or exits (False), within DEADLINE."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                time.sleep(0.05)  # polling a condition (the port, the process), bounded by the deadline
        pytest.fail(f"the server neither listened nor exited within {DEADLINE} s:\n{self.output()}")


@pytest.fixture
def start(app_dir: Path, emulator: Emulator) -> Iterator[Any]:  # noqa: F811 - the fixture
    started: list[Process] = []

    def run(argv: list[str], *modules: str) -> Process:
        missing = [module for module in modules if not _installed(module)]
        if missing:
            pytest.skip(f"{', '.join(missing)} not installed")
        process = Process(argv, app_dir, emulator)
        started.append(process)
        return process

    emulator.clear_faults()
    try:
        yield run
    finally:
        for process in started:
            if process.process.poll() is None:
                process.process.kill()
                process.process.wait()
        emulator.clear_faults()


# ---------------------------------------------------------------------------------------- the app's failed startup


def test_hypercorn_exits_when_the_apps_own_lifespan_startup_fails(start: Any) -> None:
    """hypercorn (asyncio worker) stops when an app's lifespan startup fails, as it does for the same app without the
    billing middleware. With it, hypercorn listened and served the app whose startup never ran, and said nothing of
    the failure: it looks whether the lifespan's task has ended as soon as the startup is answered, and the middleware
    was still ending its background work then."""
    server = start(["hypercorn", "--bind", "127.0.0.1:{port}", "auditapp:failing"], "hypercorn")
    listening = server.listening_or_exited()
    served = None
    if listening:
        served = httpx.get(f"{server.base_url}/v1/chat", headers=ORG, timeout=DEADLINE).status_code
    assert not listening, f"hypercorn served (answered {served}) an app whose startup failed:\n{server.output()}"
    assert "the app's own startup failed" in server.output()


@pytest.mark.anyio
async def test_an_apps_failed_startup_ends_the_lifespan_call_before_hypercorn_looks(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """In process, hypercorn's own ``Lifespan`` and the check its asyncio worker makes (``worker_serve``): once
    ``wait_for_startup()`` returns, the lifespan task has ended with the app's startup failure (else the worker
    serves on as if the startup had succeeded)."""
    pytest.importorskip("hypercorn")
    from hypercorn.app_wrappers import ASGIWrapper
    from hypercorn.asyncio.lifespan import Lifespan
    from hypercorn.config import Config
    from hypercorn.utils import LifespanFailureError

    async def chat(request: Any) -> JSONResponse:
        return JSONResponse({})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("the app's own startup failed")
        yield  # pragma: no cover

    app = Starlette(routes=[Route("/chat", chat)], lifespan=lifespan)
    app.add_middleware(OrgBillingMiddleware, settings=header_settings, transport=fake_lago.transport())
    loop = asyncio.get_running_loop()
    handler = Lifespan(ASGIWrapper(app), Config(), loop, {})
    task = loop.create_task(handler.handle_lifespan())
    try:
        await handler.wait_for_startup()
        assert task.done(), "the startup failed, and its lifespan task still ran when hypercorn looked"
        assert isinstance(task.exception(), LifespanFailureError)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ------------------------------------------------------------------------------ granian without a lifespan


GRANIAN = ["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(("app", "path"), [("outer", "/api/v1/chat"), ("plain", "/v1/chat")], ids=["mounted", "plain"])
def test_granian_loses_no_event_silently_without_a_lifespan(
    start: Any,
    emulator: Emulator,  # noqa: F811 - the fixture
    sig: signal.Signals,
    app: str,
    path: str,
) -> None:
    """The billed app mounted in another, or a plain ASGI app that does not do the lifespan: the middleware starts
    with the first request. granian ends its worker without ending the tasks of its event loop, so the events still
    in memory (those of the last flush_interval) were never delivered, and nothing said they were lost. Either they
    are delivered by exit (README: "what memory holds is delivered when the event loop ends (Ctrl-C...)";
    "Tested under ... granian ...: one event per request, all delivered by exit"), or their loss is said."""
    before = emulator.count()
    server = start([*GRANIAN, f"auditapp:{app}"], "granian")
    assert server.listening_or_exited(), server.output()
    with httpx.Client(base_url=server.base_url, headers=ORG, timeout=DEADLINE) as client:
        codes = [client.get(path).status_code for _ in range(3)]
    returncode = server.stop(sig)
    output = server.output()
    assert codes == [200, 200, 200], output
    assert returncode == 0, output
    delivered = emulator.count() - before
    # (the warning of the lazy start, logged at the first request, is no word of a loss)
    said = [line for line in output.splitlines() if "lost" in line and "got no ASGI lifespan" not in line]
    assert delivered == 3 or said, f"{3 - delivered} of 3 events lost, and not said:\n{output}"
