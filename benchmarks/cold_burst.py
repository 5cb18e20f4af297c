"""A burst of first requests from many cold orgs against a Lago served over HTTP: what the quota gate does to Lago
and to the event loop.

The Lago emulator runs in its own process (seeded with N orgs on a plan with a calls limit); this process runs a
QuotaGate with the real LagoClient (its 50-connection pool) and sends the first check of N distinct orgs at once,
as a deploy or a Redis flush does. A ticker measures how long the event loop stalls meanwhile (every request of the
process, warm orgs' too, waits that long). Printed: the longest stall, how long the checks waited, Lago reads in
flight at most, refresh errors, fail-open decisions, and how many orgs had a snapshot once the refreshes were over.

    python benchmarks/cold_burst.py [--orgs 2000] [--cold-timeout 2]

Run it against another checkout with ``PYTHONPATH=/path/to/checkout/src`` to compare (e.g. before a change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._here import use_this_checkout  # noqa: E402

use_this_checkout()

import anyio  # noqa: E402
import httpx  # noqa: E402
from benchmarks.overhead import free_port, process, wait_http  # noqa: E402

import lago_org_billing  # noqa: E402
from lago_org_billing import BillingSettings, LagoClient  # noqa: E402
from lago_org_billing._quota import QuotaConfig, QuotaGate  # noqa: E402

API_KEY = "bench"


class Counting(httpx.AsyncBaseTransport):
    """The client's own transport, counting the Lago requests in flight at once."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=50, max_keepalive_connections=20))
        self.in_flight = self.peak = self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.sent += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def seed_file(orgs: int, directory: str) -> Path:
    path = Path(directory) / "seed.json"
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0"}}
    path.write_text(
        json.dumps(
            {
                "billable_metrics": [
                    {"code": "api_call", "name": "calls", "aggregation_type": "sum_agg", "field_name": "total_tokens"}
                ],
                "plans": [{"code": "starter", "name": "Starter", "charges": [charge]}],
                "customers": [{"external_id": f"o{i}", "name": f"Org {i}"} for i in range(orgs)],
                "subscriptions": [
                    {"external_customer_id": f"o{i}", "plan_code": "starter", "external_id": f"o{i}"}
                    for i in range(orgs)
                ],
            }
        )
    )
    return path


async def burst(lago_url: str, orgs: int, cold_timeout: float) -> dict[str, Any]:
    settings = BillingSettings(api_url=lago_url, api_key=API_KEY, plan_limits={"starter": {"max_api_calls": 1_000_000}})
    transport = Counting()
    stalls: list[float] = []
    waits: list[float] = []
    async with LagoClient(settings, transport=transport) as client:
        gate = QuotaGate(settings, client, config=QuotaConfig(cold_timeout=cold_timeout))
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)

            async def ticker() -> None:
                while True:
                    before = time.perf_counter()
                    await anyio.sleep(0.01)
                    stalls.append(time.perf_counter() - before - 0.01)

            tasks.start_soon(ticker)

            async def first_request(org: str) -> None:
                started = time.perf_counter()
                await gate.check(org)
                waits.append(time.perf_counter() - started)

            started = time.perf_counter()
            async with anyio.create_task_group() as checks:
                for i in range(orgs):
                    checks.start_soon(first_request, f"o{i}")
            answered = time.perf_counter() - started
            while gate._refreshing:  # noqa: ASYNC110 - polling the gate: the refreshes the burst started, over
                await anyio.sleep(0.05)
            settled = time.perf_counter() - started
            known = sum(1 for i in range(orgs) if gate.local.peek_snapshot(f"o{i}") is not None)
            tasks.cancel_scope.cancel()
        await gate.aclose()
    return {
        "answered_s": answered,
        "settled_s": settled,
        "stall_max_s": max(stalls, default=0.0),
        "wait_p50_s": statistics.median(waits),
        "wait_max_s": max(waits),
        "lago_requests": transport.sent,
        "in_flight_max": transport.peak,
        "snapshots": known,
        "stats": {k: gate.stats.get(k, 0) for k in ("refresh_errors", "fail_open", "cold_timeouts", "refreshes")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orgs", type=int, default=2000)
    parser.add_argument("--cold-timeout", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "lago_org_billing.cli", "emulator", "--api-key", API_KEY, "--port", str(port)]
        with process([*command, "--seed", str(seed_file(args.orgs, directory))], None, cpu="1"):
            wait_http(f"{url}/health")
            result = anyio.run(burst, url, args.orgs, args.cold_timeout)
    print(f"lago_org_billing from {Path(lago_org_billing.__file__).parent}")
    print(f"{args.orgs} cold orgs, first request of each at once (cold_timeout {args.cold_timeout:g} s):")
    print(f"  event loop stalled at most      {result['stall_max_s']:8.2f} s")
    print(
        f"  first requests answered after   {result['answered_s']:8.2f} s  (each waited: median "
        f"{result['wait_p50_s']:.2f} s, max {result['wait_max_s']:.2f} s)"
    )
    print(f"  refreshes over after            {result['settled_s']:8.2f} s")
    print(
        f"  Lago requests                   {result['lago_requests']:8d}  ({result['in_flight_max']} in flight at most)"
    )
    print(f"  orgs with a snapshot            {result['snapshots']:8d}")
    print(f"  gate stats                      {result['stats']}")


if __name__ == "__main__":
    main()
