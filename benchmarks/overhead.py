"""Requests/s of a small JSON endpoint: bare vs behind OrgBillingMiddleware (and a pass-through floor).

Each app runs in its own uvicorn process pinned to CPU 0; wrk and the Lago emulator (which receives every
event) share CPU 1, so the server's core is measured alone. Rounds alternate between the apps so drift
hits all of them alike; the median of each is reported with the ratio to bare, and next to it the server's own
CPU time per request (from /proc: background delivery included), whose ratio to bare's is the same measure
without the noise of CPU 1.

    python benchmarks/overhead.py [--seconds 10] [--rounds 3] [--connections 64] [--quota] [--floor] [--breakdown]
                                  [--calibrate US]

``--breakdown`` adds the billed app's request path alone (its events dropped as they are handed over, nothing built
or delivered): what the billed app costs beyond it is building its events and delivering them in the background.
It also adds ``floor-delivered``: the floor's request path (benchmarks/_apps.py) handing its facts to the billed app's
pipeline, which builds and delivers them as billed's: what building and delivering costs over the floor, whatever the
request path.

``--calibrate US`` adds a control: a pass-through that burns US microseconds of pure CPU per request (measured
in process). How far it falls below bare tells what one microsecond of in-process cost (see
benchmarks/request_path.py) costs in the server on this machine.

Needs wrk (apt-get install wrk) and taskset (util-linux).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._here import use_this_checkout  # noqa: E402

use_this_checkout()
API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, cpu: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (pinned to ``cpu``) for the ``with`` block; then stop it and show what it logged at WARNING or
    above (stderr goes to a file: a full pipe would stall the server)."""
    command = (["taskset", "-c", cpu] if cpu and shutil.which("taskset") else []) + args
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield proc  # taskset execs the command: its pid is the server's
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines()
            if proc.returncode not in (0, -15):
                shown = lines[-30:]
            else:
                shown = [line for line in lines if re.search(r"WARNING|ERROR|CRITICAL|Traceback", line)][:20]
            if shown:
                sys.stderr.write(f"-- {' '.join(args[:5])}:\n" + "\n".join(shown) + "\n")


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str]) -> tuple[float, int]:
    args = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses\n{out}")
    assert match and total, out
    return float(match.group(1)), int(total.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_events(lago_url: str) -> int:
    """Events the emulator holds (its paginated events list's total_count)."""
    request = urllib.request.Request(
        f"{lago_url}/api/v1/events?per_page=1", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    return int(json.loads(urllib.request.urlopen(request).read())["meta"]["total_count"])


@contextlib.contextmanager
def emulator(stack_cpu: str = "1") -> Iterator[tuple[str, dict[str, str]]]:
    """The Lago emulator (seeded with the api_call metric, a plan and org_bench's subscription) on ``stack_cpu``:
    yields its URL and the environment the billed apps need."""
    lago_port = free_port()
    lago_url = f"http://127.0.0.1:{lago_port}"
    seed = ROOT / "benchmarks" / "_seed.json"
    seed.write_text(
        json.dumps(
            {
                "billable_metrics": [
                    {"code": "api_call", "name": "calls", "aggregation_type": "sum_agg", "field_name": "total_tokens"}
                ],
                "plans": [
                    {
                        "code": "starter",
                        "name": "Starter",
                        "interval": "monthly",
                        "amount_cents": 1000,
                        "amount_currency": "USD",
                        "charges": [
                            {
                                "billable_metric_code": "api_call",
                                "charge_model": "standard",
                                "properties": {"amount": "0"},
                            }
                        ],
                    }
                ],
                "subscriptions": [
                    {"external_customer_id": "org_bench", "plan_code": "starter", "external_id": "org_bench"}
                ],
            }
        )
    )
    env = {
        **os.environ,
        "LAGO_API_URL": lago_url,
        "LAGO_API_KEY": API_KEY,
        "LAGO_ORG_HEADER": "X-Org-Id",
        "LAGO_USER_HEADER": "X-User-Id",
        "PYTHONPATH": os.environ["PYTHONPATH"],  # (this checkout's src first: benchmarks/_here.py)
    }
    try:
        with process([*EMULATOR, "--port", str(lago_port), "--seed", str(seed)], env, cpu=stack_cpu):
            wait_http(f"{lago_url}/health")
            yield lago_url, env
    finally:
        seed.unlink(missing_ok=True)


#: Per app: the environment it runs with on top of the emulator's (see :func:`app_env`).
APP_ENV: dict[str, dict[str, str]] = {
    "billed": {"LAGO_QUOTA_MODE": "off"},
    # The billed app's request path alone: billed without the gate, as the billed app it is compared with.
    "request-path": {"LAGO_QUOTA_MODE": "off"},
    "floor-delivered": {"LAGO_QUOTA_MODE": "off"},
    # Enforcement on, with a limit never reached: every request pays for a full gate decision.
    "gated": {
        "LAGO_QUOTA_MODE": "enforce",
        "LAGO_PLAN_LIMITS": json.dumps({"starter": {"max_api_calls": 10**9, "max_tokens": 10**12}}),
    },
}
# The same, without RateLimit-* headers on allowed responses: what those three headers cost in the server.
APP_ENV["gated-quiet"] = {**APP_ENV["gated"], "LAGO_QUOTA_HEADERS": "false"}
#: The apps whose events reach the emulator (their requests are counted against the events delivered).
BILLING = ("billed", "gated", "floor-delivered")
HEADERS = {"X-Org-Id": "org_bench", "X-User-Id": "ada"}
EMULATOR = [sys.executable, "-m", "lago_org_billing.cli", "emulator", "--api-key", API_KEY]


def app_env(app: str) -> dict[str, str]:
    """The environment ``app`` runs with on top of the emulator's (``request_path`` or ``request-path``). A billing app
    without an entry would run with the package's default, enforcement on: none is measured that way by accident."""
    name = app.replace("_", "-")
    if name not in APP_ENV and name not in ("bare", "passthrough", "floor", "burn"):
        raise KeyError(f"no environment for the app {app!r}: add it to APP_ENV")
    return APP_ENV.get(name, {})


def uvicorn_command(app: str, port: int) -> list[str]:
    """uvicorn serving ``benchmarks._apps:<app>`` (``gated*`` are the billed app with enforcement on)."""
    module = "billed" if app.startswith("gated") else app.replace("-", "_")
    command = [sys.executable, "-m", "uvicorn", f"benchmarks._apps:{module}", "--port", str(port)]
    return [*command, "--log-level", "warning", "--no-access-log", "--http", "h11", "--loop", "asyncio"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--quota",
        action="store_true",
        help="also measure the middleware with quota enforcement on (with and without RateLimit-* headers on allowed"
        " responses)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the least a billing middleware can do in Python (benchmarks/_apps.py Floor: org header, "
        "status and body seen, facts kept; nothing built or delivered)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also measure the billed app's request path alone (benchmarks/_apps.py request_path: its events dropped "
        "as they are handed over): the rest of billed's cost is building and delivering them; and the floor's request "
        "path with its events built and delivered as billed's (floor_delivered): that building and delivery alone",
    )
    parser.add_argument(
        "--calibrate", type=float, metavar="US", help="also measure a pass-through burning US µs of CPU"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    burn = f"burn-{args.calibrate:g}us" if args.calibrate else None
    apps = [
        "bare",
        "passthrough",
        *([burn] if burn else []),
        *(["floor"] if args.floor else []),
        *(["request-path", "floor-delivered"] if args.breakdown else []),
        "billed",
    ] + (["gated", "gated-quiet"] if args.quota else [])
    extra_env = {burn: {"BENCH_BURN_US": str(args.calibrate)}} if burn else {}
    ports = {name: free_port() for name in apps}
    results: dict[str, list[float]] = {name: [] for name in apps}
    cpu_per_request: dict[str, list[float]] = {name: [] for name in apps}  # server CPU µs per request
    busy: dict[str, list[float]] = {name: [] for name in apps}  # share of the wall time the server was on CPU
    pids: dict[str, int] = {}
    after_shutdown: list[int] = []
    with contextlib.ExitStack() as stack:
        lago_url, env = stack.enter_context(emulator())
        # Runs once the servers have stopped (flushing what they held), while the emulator still answers.
        stack.callback(lambda: after_shutdown.append(count_events(lago_url)))
        for name in apps:
            command = uvicorn_command("burn" if name == burn else name, ports[name])
            own = extra_env.get(name) or app_env(name)
            pids[name] = stack.enter_context(process(command, {**env, **own}, cpu="0")).pid
            wait_http(f"http://127.0.0.1:{ports[name]}/v1/chat/warm")
        served = 0
        for name in apps:  # warm up
            _, count = wrk(f"http://127.0.0.1:{ports[name]}/v1/chat/1", 2, args.connections, HEADERS)
            served += count if name.startswith(BILLING) else 0
        for round_number in range(args.rounds):
            for name in apps:
                url = f"http://127.0.0.1:{ports[name]}/v1/chat/1"
                cpu_before, wall_before = cpu_seconds(pids[name]), time.monotonic()
                rps, count = wrk(url, args.seconds, args.connections, HEADERS)
                cpu_used, wall = cpu_seconds(pids[name]) - cpu_before, time.monotonic() - wall_before
                served += count if name.startswith(BILLING) else 0
                results[name].append(rps)
                cpu_per_request[name].append(cpu_used / count * 1e6)
                busy[name].append(cpu_used / wall)
                print(
                    f"round {round_number + 1} {name:<12} {rps:>9.0f} req/s  "
                    f"{cpu_used / count * 1e6:6.1f} µs CPU/request  server busy {cpu_used / wall:4.0%}",
                    flush=True,
                )
        deadline = time.monotonic() + 30  # delivery is asynchronous: give the last batches time to land
        while (delivered := count_events(lago_url)) < served and time.monotonic() < deadline:
            time.sleep(0.2)
    bare = statistics.median(results["bare"])
    bare_cpu = statistics.median(cpu_per_request["bare"])
    print(
        f"\n{'app':<12} {'median req/s':>12} {'vs bare':>8} {'µs/request':>11}   "
        f"{'server CPU µs/request':>21} {'bare/app':>8} {'busy':>5}"
    )
    for name in apps:
        median = statistics.median(results[name])
        cpu = statistics.median(cpu_per_request[name])
        extra = f"+{(1 / median - 1 / bare) * 1e6:.1f}" if name != "bare" else ""
        print(
            f"{name:<12} {median:>12.0f} {median / bare:>7.2f}x {extra:>11}   {cpu:>21.1f} {bare_cpu / cpu:>7.2f}x "
            f"{statistics.median(busy[name]):>5.0%}"
        )
    print(
        "\nserver CPU µs/request: the uvicorn process's user+system CPU time during each wrk run (its background "
        "delivery included) over the requests served; with the server busy ~100%, bare/app is the throughput ratio "
        "without the load generator's and the emulator's noise on CPU 1."
    )
    print(
        f"\nrequests the billing apps served (as wrk counts them): {served}; events in the emulator: {delivered}, "
        f"{after_shutdown[0]} once the servers stopped (wrk does not count requests in flight when it stops: up to "
        f"{args.connections} per run)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
