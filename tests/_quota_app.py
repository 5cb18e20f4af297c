"""Quota test helpers: a seeded Lago emulator, a settable clock, and the app uvicorn serves in the
multi-worker test (``uvicorn _quota_app:app --app-dir tests --workers 4``, settings from ``LAGO_*``, org from
``X-Org-Id``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lago_org_billing.testing import FakeLago

START = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.timezone.utc)
TOKENS = 10


class Clock:
    """A settable clock shared by the gate (``.time()``, Unix seconds) and the emulator (``.now()``)."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.at = start

    def now(self) -> dt.datetime:
        return self.at

    def time(self) -> float:
        return self.at.timestamp()

    def advance(self, seconds: float) -> None:
        self.at += dt.timedelta(seconds=seconds)


def seed(fake: FakeLago, *, starter_calls: int | None = 300, starter_tokens: int | None = None) -> FakeLago:
    """``api_call`` summing ``total_tokens``; feature ``api_quota``; plans ``starter`` (the given limits),
    ``pro`` (10,000 calls) and ``legacy`` (no entitlements); org ``org_1`` on ``starter``."""
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_feature(
        "api_quota",
        privileges=[
            {"code": "max_api_calls", "value_type": "integer"},
            {"code": "max_tokens", "value_type": "integer"},
        ],
    )
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0"}}
    starter: dict[str, Any] = {}
    if starter_calls is not None:
        starter["max_api_calls"] = starter_calls
    if starter_tokens is not None:
        starter["max_tokens"] = starter_tokens
    fake.add_plan("starter", amount_cents=1_000, charges=[charge], entitlements={"api_quota": starter})
    fake.add_plan("pro", amount_cents=10_000, charges=[charge], entitlements={"api_quota": {"max_api_calls": 10_000}})
    fake.add_plan("legacy", amount_cents=500, charges=[charge])
    fake.add_customer("org_1")
    fake.add_subscription("org_1", "starter")
    return fake


async def chat(request: Request) -> Response:
    total = TOKENS
    return JSONResponse(
        {
            "ok": True,
            "usage": {"prompt_tokens": total // 2, "completion_tokens": total - total // 2, "total_tokens": total},
        }
    )


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def build() -> Any:
    from lago_org_billing import OrgBillingMiddleware

    routes = [Route("/v1/chat", chat, methods=["GET", "POST"]), Route("/health", health)]
    return OrgBillingMiddleware(Starlette(routes=routes))


REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(directory: Path, port: int | None = None) -> Iterator[str]:
    """A throwaway ``redis-server`` on 127.0.0.1 (no persistence); yields its URL, stops it at the end."""
    assert REDIS_SERVER is not None
    port = port or free_port()
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until it accepts connections
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def __getattr__(name: str) -> Any:
    if name == "app":  # built on import by uvicorn only: the tests import this module for its helpers
        return build()
    raise AttributeError(name)
