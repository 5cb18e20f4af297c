"""Cost of a quota gate decision, and the middleware's throughput with enforcement on.

1. ``check()`` + ``settle()`` of a cached org, in process and with Redis (µs per request, one task, no
   Lago call: the snapshot is fresh). Redis: ``--redis-url`` or a throwaway ``redis-server`` when installed.
2. ``benchmarks/overhead.py --quota``: requests/s of bare vs billed vs gated (enforcement on, a limit never
   reached) under wrk; the target is gated >= 0.85x bare.

    python benchmarks/quota.py [--checks 20000] [--redis-url URL] [--skip-overhead] [--seconds 10] [--rounds 3]

Run it on a quiet machine: the figures are CPU-bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._here import use_this_checkout  # noqa: E402

use_this_checkout()
sys.path.insert(0, str(ROOT / "tests"))

from _quota_app import redis_server, seed  # noqa: E402
from lago_org_billing import BillingSettings, LagoClient  # noqa: E402
from lago_org_billing._quota import QuotaConfig, QuotaGate  # noqa: E402
from lago_org_billing.testing import FakeLago  # noqa: E402


async def per_check(redis_url: str | None, checks: int, repeats: int = 5, sync: bool = False) -> tuple[float, float]:
    """Median and best µs per check()+settle() of a cached org (``sync``: ``check_now()``, as the middleware
    calls it when no I/O is needed)."""
    fake = seed(FakeLago(api_key="k"), starter_calls=10**9, starter_tokens=10**12)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", redis_url=redis_url)
    async with LagoClient(settings, transport=fake.transport()) as client:
        prefix = f"bench:{os.getpid()}:{time.time_ns()}:"
        gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix))
        await gate.check("org_1")  # cold: fetch the snapshot once
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(checks):
                decision = gate.check_now("org_1") if sync else await gate.check("org_1")
                assert decision is not None
                gate.settle("org_1", decision, tokens=42, billed=True)
            flush = getattr(gate.backend, "flush", None)
            if flush is not None:
                await flush()  # the settles' Redis writes are part of the cost
            runs.append((time.perf_counter() - started) / checks * 1e6)
        assert gate.stats["refreshes"] == 1 and gate.stats["blocked"] == 0, gate.stats
        if hasattr(gate.backend, "stats"):
            assert gate.backend.stats["redis_fallback"] == 0, gate.backend.stats
        await gate.aclose()
    return statistics.median(runs), min(runs)


@contextlib.contextmanager
def some_redis(url: str | None) -> Iterator[str | None]:
    if url or not shutil.which("redis-server"):
        yield url
        return
    with tempfile.TemporaryDirectory() as directory, redis_server(Path(directory)) as started:
        yield started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--redis-url")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    median, best = asyncio.run(per_check(None, args.checks))
    print(f"check()+settle(), in process : {median:6.1f} µs median, {best:6.1f} µs best")
    median, best = asyncio.run(per_check(None, args.checks, sync=True))
    print(f"check_now()+settle()         : {median:6.1f} µs median, {best:6.1f} µs best (the middleware's path)")
    with some_redis(args.redis_url) as url:
        if url is None:
            print("check()+settle(), Redis      : skipped (no redis-server, no --redis-url)")
        else:
            median, best = asyncio.run(per_check(url, args.checks // 4))
            print(f"check()+settle(), Redis      : {median:6.1f} µs median, {best:6.1f} µs best (one round trip)")
    if args.skip_overhead:
        return 0
    print("\nmiddleware throughput (benchmarks/overhead.py --quota):", flush=True)
    command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quota"]
    command += ["--seconds", str(args.seconds), "--rounds", str(args.rounds)]
    return subprocess.run(command, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
