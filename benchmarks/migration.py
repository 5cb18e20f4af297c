"""Wall time and Lago calls per migrated org of ``lago-org-billing migrate --execute``.

Seeds the test data set (``tests/_migration_data.py``: 2,000 user customers in 500 orgs, mixed plans, some
users without subscriptions, 50 orgs already migrated) into the Lago emulator, then runs the real command
(dry run, execute, verify, a second execute) and prints each run's wall time and Lago calls.

    python benchmarks/migration.py [--orgs 500] [--concurrency 8] [--http] [--emulator-refresh]

``--http`` serves the emulator with uvicorn and runs the CLI in a subprocess (as in production); the default
talks to it in process. ``--emulator-refresh`` keeps the emulator's per-request scan of time-driven
transitions (frozen clock: it never fires here, it only costs time). The emulator's own cost dominates the
wall time; calls per migrated org do not depend on it. On Lago Cloud (50 requests/s for these endpoints) the
calls, not the CPU, bound the run: divide the calls by 50.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._here import use_this_checkout  # noqa: E402

use_this_checkout()
sys.path.insert(0, str(ROOT / "tests"))

import _migration_data as data  # noqa: E402
from lago_org_billing import BillingSettings  # noqa: E402
from lago_org_billing._migration_cli import add_migrate_command, run_migrate_command  # noqa: E402
from lago_org_billing.testing import FakeLago  # noqa: E402
from lago_org_billing.testing._server import serve_in_thread  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["migrate", *argv])


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--orgs", type=int, default=data.ORGS)
    options.add_argument("--concurrency", type=int, default=8)
    options.add_argument("--http", action="store_true", help="serve the emulator; run the CLI in a subprocess")
    options.add_argument("--emulator-refresh", action="store_true", help="keep the emulator's per-request scan")
    opts = options.parse_args()

    fake = data.new_fake()
    if opts.emulator_refresh:
        del fake.store.refresh  # back to the class method
    started = time.perf_counter()
    data.seed(fake, orgs=opts.orgs)
    print(f"seeded {opts.orgs * data.USERS_PER_ORG} users in {opts.orgs} orgs in {time.perf_counter() - started:.1f} s")
    tmp = Path(tempfile.mkdtemp(prefix="migration-bench-"))
    mapping = str(data.write_mapping(tmp / "mapping.csv", orgs=opts.orgs))
    common = ["--mapping-file", mapping, "--default-plan", "free", "--concurrency", str(opts.concurrency)]
    runs = [("dry run", []), ("execute", ["--execute"]), ("verify", ["--verify"]), ("execute again", ["--execute"])]
    print(f"{'run':<14} {'exit':>4} {'wall s':>8} {'calls':>6} {'writes':>6} {'calls/org':>9} {'calls/migrated':>14}")
    for name, flags in runs:
        report = tmp / f"{name.replace(' ', '_')}.json"
        argv = [*common, *flags, "--report", str(report), "--progress", "none"]
        fake.requests.clear()
        if opts.http:
            with serve_in_thread(fake) as url:
                env = {**os.environ, "LAGO_API_URL": url, "LAGO_API_KEY": data.API_KEY}
                command = [sys.executable, "-m", "lago_org_billing.cli", "migrate", *argv]
                code = subprocess.run(command, env=env, capture_output=True, text=True).returncode
        else:
            settings = BillingSettings(api_key=data.API_KEY, api_url=FakeLago.base_url)
            code = run_migrate_command(
                parse(argv), transport=fake.transport(), settings=settings, stdout=io.StringIO(), stderr=io.StringIO()
            )
        result = json.loads(report.read_text())
        lago, totals = result["lago"], result["totals"]
        per_migrated = totals["calls_per_migrated_org"]
        print(
            f"{name:<14} {code:>4} {result['duration_s']:>8.2f} {lago['calls']:>6} {lago['writes']:>6} "
            f"{totals['calls_per_org']:>9} {per_migrated if per_migrated is not None else '-':>14}"
        )
    print(f"reports in {tmp}")


if __name__ == "__main__":
    main()
