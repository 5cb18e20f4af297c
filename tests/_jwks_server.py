"""A JWKS server on 127.0.0.1 and a hand-moved clock for the JWKS cache, shared by the JWT and JWKS tests.

Each path answers what it was given (a status and body; ``drop``: the connection closed unanswered; ``gate``: held
until :meth:`JwksServer.release`) and counts the GETs it received; ``arrived`` is set by each GET.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import threading
from typing import Any

import anyio
import anyio.to_thread


class JwksServer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: dict[str, tuple[str, int, bytes]] = {}
        self.fetches = collections.Counter[str]()
        self.arrived = threading.Event()
        self.gate = threading.Event()
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with served.lock:
                    served.fetches[self.path] += 1
                    mode, status, body = served.answers.get(self.path, ("answer", 404, b"{}"))
                    gate = served.gate
                served.arrived.set()
                if mode == "drop":
                    self.close_connection = True
                    return
                if mode == "gate":
                    gate.wait(30)  # (a guard: the test releases it)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # (the client gave up: a fetch past its deadline)
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, status: int = 200, mode: str = "answer", *, gated: bool = False) -> None:
        with self.lock:
            self.answers[path] = ("gate" if gated else mode, status, body)

    def count(self, path: str) -> int:
        with self.lock:
            return self.fetches[path]

    async def wait_arrival(self) -> None:
        """Until a GET arrived since the last :meth:`hold` (a guard of 30 s against a hang, not a timing)."""
        assert await anyio.to_thread.run_sync(self.arrived.wait, 30), "no JWKS fetch arrived"

    def hold(self) -> None:
        """Gated paths hold their answers again (those already let go are not held back); no GET arrived yet."""
        with self.lock:
            if self.gate.is_set():
                self.gate = threading.Event()
            self.arrived.clear()

    def fresh(self) -> JwksServer:
        """For the next test (paths are the tests' own): :meth:`hold`."""
        self.hold()
        return self

    def release(self) -> None:
        with self.lock:
            self.gate.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class Clock:
    """The JWKS cache's clock (``lago_org_billing._jwks._clock``), moved by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
