"""How long the Lago emulator takes to answer ``current_usage`` as a subscription's events pile up.

The quota gate asks for it once per cache TTL per org; ``benchmarks/overhead.py`` runs it against an emulator holding
hundreds of thousands of events, on the CPU the load generator uses. The baseline in the same run: the emulator's
``GET /events?per_page=1`` on the same data (a count and one event).

    python benchmarks/emulator.py [--events 10000,100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._here import use_this_checkout

use_this_checkout()

from lago_org_billing.testing import FakeLago  # noqa: E402


async def _measure(count: int) -> tuple[float, float]:
    fake = FakeLago(api_key="k")
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.001"}}
    fake.add_plan("starter", amount_cents=1000, charges=[charge])
    fake.add_subscription("org_1", "starter", external_id="org_1")
    headers = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url, headers=headers) as client:
        now = time.time()
        for start in range(0, count, 100):
            batch = [
                {
                    "transaction_id": f"t{n}",
                    "external_subscription_id": "org_1",
                    "code": "api_call",
                    "timestamp": f"{now:.3f}",
                    "properties": {"total_tokens": 42, "org_id": "org_1"},
                }
                for n in range(start, min(start + 100, count))
            ]
            (await client.post("/api/v1/events/batch", json={"events": batch})).raise_for_status()
        timings = []
        for path, params in (
            ("/api/v1/customers/org_1/current_usage", {"external_subscription_id": "org_1", "apply_taxes": "false"}),
            ("/api/v1/events", {"per_page": "1"}),
        ):
            started = time.perf_counter()
            response = await client.get(path, params=params)
            timings.append(time.perf_counter() - started)
            response.raise_for_status()
    return timings[0], timings[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="10000,100000")
    args = parser.parse_args()
    print(f"{'events':>9} {'current_usage':>14} {'events?per_page=1':>18} {'ratio':>6}")
    for count in (int(part) for part in args.events.split(",")):
        usage, listing = anyio.run(_measure, count)
        print(f"{count:>9,} {usage * 1000:>11.0f} ms {listing * 1000:>15.0f} ms {usage / listing:>5.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
