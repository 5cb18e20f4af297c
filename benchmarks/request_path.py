"""CPU cost of OrgBillingMiddleware's request path, in process: bare vs pass-through vs billed vs gated.

The ASGI app is called directly in a loop (no server, no network). The billed app's delivery pipeline is
replaced by one that only keeps what the middleware submits: the first figure is what a request pays before its
response completes; the second is building and encoding those events afterwards, batched as the pipeline does
(sending them is measured by benchmarks/delivery.py).

    python benchmarks/request_path.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._here import use_this_checkout

use_this_checkout()
os.environ.update(LAGO_API_KEY="bench", LAGO_ORG_HEADER="X-Org-Id", LAGO_USER_HEADER="X-User-Id")

import anyio  # noqa: E402
from benchmarks._apps import _app, bare, passthrough  # noqa: E402

from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware  # noqa: E402
from lago_org_billing._quota import QuotaGate  # noqa: E402
from lago_org_billing._snapshots import Snapshot  # noqa: E402
from lago_org_billing._spool import MemoryOutbox  # noqa: E402

SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/v1/chat/1",
    "raw_path": b"/v1/chat/1",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench"), (b"x-org-id", b"org_bench"), (b"x-user-id", b"ada")],
    "client": ("127.0.0.1", 1),
    "server": ("bench", 80),
}


class AcceptingPipeline:
    """Keeps what it is given: isolates the request path from building and delivery."""

    client = None

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.build: Any = None

    def submit(self, event: Any) -> None:
        self.events.append(event)

    def lane(self, build: Any) -> Any:
        self.build = build
        return self.events.append

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the pipeline API
        pass


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


async def run(app: Any, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - started) / count * 1e6


def build(pipeline: AcceptingPipeline) -> float:
    """Build and encode the submitted events as the pipeline does (µs per event)."""
    events = pipeline.events.copy()
    pipeline.events.clear()
    outbox = MemoryOutbox(len(events) + 1)
    put = outbox.lane(pipeline.build)
    for facts in events:
        put(facts)
    started = time.perf_counter()
    for item in outbox.take(len(events)):  # taking builds the lane's events, as a batch does
        item.encoded()
    return (time.perf_counter() - started) / len(events) * 1e6


def cached_gate() -> QuotaGate:
    """An enforcing gate whose org is cached with limits never reached (each request pays a full decision)."""
    settings = BillingSettings.from_env().replace(quota_mode="enforce")
    gate = QuotaGate(settings, LagoClient(settings))
    now = time.time()
    snapshot = Snapshot(
        active=True,
        plan_code="starter",
        calls_limit=10**9,
        tokens_limit=10**12,
        period_start=now - 3600,
        period_end=now + 86400,
        requested_at=now,
        fetched_at=now,
        plan_fetched_at=now,
        refresh_at=now + 86400,
    )
    gate.local.store_now("org_bench", snapshot, now)
    return gate


async def main(requests: int, rounds: int) -> None:
    pipeline = AcceptingPipeline()
    billed = OrgBillingMiddleware(_app(), pipeline=pipeline, quota=None)  # type: ignore[arg-type]
    billed._running = True  # no lifespan here: nothing to start
    gated_pipeline = AcceptingPipeline()
    gated = OrgBillingMiddleware(_app(), pipeline=gated_pipeline, quota=cached_gate())  # type: ignore[arg-type]
    gated._running = True
    apps = {"bare": bare, "pass-through": passthrough, "billed (request path)": billed, "gated (request path)": gated}
    for app in apps.values():
        await run(app, 200)
    pipeline.events.clear()
    best: dict[str, float] = {}
    builds: list[float] = []
    for name, app in apps.items():
        for _ in range(rounds):
            best[name] = min(best.get(name, float("inf")), await run(app, requests))
            if app is billed:
                builds.append(build(pipeline))
            gated_pipeline.events.clear()  # (a pipeline lets go of what it delivered: none kept across rounds)
    for name, micros in best.items():
        print(f"{name:<22} {micros:6.1f} µs/request  (+{micros - best['bare']:.1f} over bare)")
    print(f"{'billed (event build)':<22} {min(builds):6.1f} µs/event    (later, batched, off the request path)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.requests, arguments.rounds))
