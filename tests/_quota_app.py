"""Quota test helpers: a seeded Lago emulator, a settable clock, and the app uvicorn serves in the
multi-worker test (``uvicorn _quota_app:app --app-dir tests --workers 4``, settings from ``LAGO_*``, org from
``X-Org-Id``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
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


#: The limits of plans ``small`` and ``big`` of :func:`small_and_big_lago`.
SMALL = {"max_api_calls": 6, "max_tokens": 150}
BIG = {"max_api_calls": 11, "max_tokens": 300}


def small_and_big_lago(clock: Clock, org_id: str = "org_1") -> FakeLago:
    """``api_call`` summing ``total_tokens``; feature ``api_quota``; plans ``small`` and ``big`` (a dearer one: a change
    to it is an upgrade, at once; back is a downgrade, at the period's end); ``org_id`` on ``small`` since January."""
    fake = FakeLago(api_key="k", clock=clock.now)
    charge = metric_and_feature(fake)
    fake.add_plan("small", amount_cents=1_000, charges=[charge], entitlements={"api_quota": SMALL})
    fake.add_plan("big", amount_cents=10_000, charges=[charge], entitlements={"api_quota": BIG})
    fake.add_customer(org_id)
    fake.add_subscription(org_id, "small", subscription_at="2026-01-01T00:00:00Z")
    return fake


def metric_and_feature(fake: FakeLago) -> dict[str, Any]:
    """``api_call`` summing ``total_tokens`` and feature ``api_quota`` (``max_api_calls``, ``max_tokens``) in
    ``fake``: the charge of a plan on that metric (free)."""
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_feature(
        "api_quota",
        privileges=[
            {"code": "max_api_calls", "value_type": "integer"},
            {"code": "max_tokens", "value_type": "integer"},
        ],
    )
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0"}}
    return charge


def seed(fake: FakeLago, *, starter_calls: int | None = 300, starter_tokens: int | None = None) -> FakeLago:
    """``api_call`` summing ``total_tokens``; feature ``api_quota``; plans ``starter`` (the given limits),
    ``pro`` (10,000 calls) and ``legacy`` (no entitlements); org ``org_1`` on ``starter``."""
    charge = metric_and_feature(fake)
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


#: An edit of one object of Lago's answer, in place (see :class:`Drifting`).
Edit = Callable[[dict[str, Any]], None]


class Drifting(httpx.AsyncBaseTransport):
    """The emulator, its 200 answers reshaped: ``subscription`` / ``usage`` edit those objects as a drifting Lago
    sends them."""

    def __init__(self, fake: FakeLago, *, subscription: Edit | None = None, usage: Edit | None = None) -> None:
        self.inner = fake.transport()
        self.subscription = subscription
        self.usage = usage

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if response.status_code != 200 or not response.content:
            return response
        body = json.loads(response.content)
        if self.subscription is not None and isinstance(body.get("subscription"), dict):
            self.subscription(body["subscription"])
        if self.usage is not None and isinstance(body.get("customer_usage"), dict):
            self.usage(body["customer_usage"])
        return httpx.Response(200, json=body)


def build() -> Any:
    from lago_org_billing import OrgBillingMiddleware

    routes = [Route("/v1/chat", chat, methods=["GET", "POST"]), Route("/health", health)]
    return OrgBillingMiddleware(Starlette(routes=routes))


REDIS_SERVER = shutil.which("redis-server")
#: Marks a test that needs a real redis-server (skipped without one; .ci/run installs it).
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def subscription_answer(
    external_id: str, period: tuple[str, str], privileges: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """``GET /subscriptions/{external_id}``'s ``subscription`` as a stub Lago answers it: active on ``starter``
    (monthly), billing ``period`` (start, end as Lago writes them), feature ``api_quota`` with ``privileges``;
    ``fields`` override any of it."""
    return {
        "external_id": external_id,
        "external_customer_id": external_id,
        "status": "active",
        "plan_code": "starter",
        "plan": {"code": "starter", "interval": "monthly", "bill_charges_monthly": None},
        "ending_at": None,
        "next_plan_code": None,
        "current_billing_period_started_at": period[0],
        "current_billing_period_ending_at": period[1],
        "entitlements": [{"code": "api_quota", "privileges": privileges}],
        **fields,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_pid(port: int) -> int | None:
    """The ``process_id`` of the redis-server answering on ``port`` (None: nothing answers there yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"INFO server\r\n")
            answer = b""
            while b"process_id:" not in answer or not answer.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                answer += chunk
    except OSError:
        return None
    return int(answer.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])


@contextlib.contextmanager
def redis_server(directory: Path, port: int | None = None) -> Iterator[str]:
    """A throwaway ``redis-server`` on 127.0.0.1 (no persistence); yields its URL, stops it at the end.

    Without ``port``, a free one is picked, and picked again if another process took it before redis-server bound
    it (others run tests on this machine too). Either way the server used is this one (its process id, asked over
    the port): never another test run's redis-server that holds the port."""
    assert REDIS_SERVER is not None
    for _attempt in range(1 if port else 5):
        chosen = port or free_port()
        args = [REDIS_SERVER, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*args, "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        # Until it answers as itself on the port, or exits (the port was taken): a bounded readiness poll (a
        # redis-server has no other way to say it listens).
        while _redis_pid(chosen) != proc.pid and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None and _redis_pid(chosen) == proc.pid:
            break
        proc.terminate()
        proc.wait(10)
    else:
        raise RuntimeError(f"redis-server did not start on port {chosen} (exit code {proc.returncode})")
    try:
        yield f"redis://127.0.0.1:{chosen}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def __getattr__(name: str) -> Any:
    if name == "app":  # built on import by uvicorn only: the tests import this module for its helpers
        return build()
    raise AttributeError(name)
