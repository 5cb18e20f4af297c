"""CPU instructions per request, counted by valgrind (callgrind): bare vs pass-through vs billed vs gated.

Throughput on a shared 2-core VM moves by +-15 µs per request from run to run (see overhead.py); instruction
counts barely move, so a change of a few hundred instructions per request shows. Two measures:

* **server**: each app as overhead.py serves it (uvicorn pinned to CPU 0, events delivered to the emulator),
  run under callgrind while wrk loads it; instructions counted only during the load, divided by the requests
  wrk completed. ``bare / app`` is the throughput ratio a CPU-bound server would show if an instruction cost
  the same everywhere (it does not quite: the measured ratio is lower, see the closing notes).
* **in process**: the middleware's own cost, exactly (two runs of 0 and N requests, no server, no network):
  the request path alone, and everything a request makes happen (building its event in the outbox, batching,
  writing the batch's request body; only the socket write is left out).

    python benchmarks/instructions.py [--seconds 8] [--requests 2000] [--skip-server] [--skip-in-process]

Needs valgrind (apt-get install valgrind) and, for the server measure, wrk; a few minutes in all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._here import use_this_checkout  # noqa: E402

use_this_checkout()
IN_PROCESS = ("bare", "billed-request", "billed", "gated")
SERVER = ("bare", "passthrough", "billed", "gated")


async def _serve(app_name: str, count: int) -> None:
    """The workload one valgrind run counts: 300 warm-up requests, then ``count`` more."""
    os.environ.update(LAGO_API_KEY="bench", LAGO_ORG_HEADER="X-Org-Id", LAGO_USER_HEADER="X-User-Id")
    from benchmarks import request_path as rp
    from benchmarks._apps import _app, bare, passthrough

    from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBillingMiddleware

    pipeline: Any = None
    if app_name in ("bare", "passthrough"):
        app: Any = bare if app_name == "bare" else passthrough
    elif app_name == "billed-request":  # the request path alone: what is submitted is only kept
        app = OrgBillingMiddleware(_app(), pipeline=rp.AcceptingPipeline(), quota=None)  # type: ignore[arg-type]
    else:
        client = LagoClient(BillingSettings.from_env())

        async def sent(body: bytes) -> None:  # the network edge: the request body is made, not sent
            pass

        client.send_event_batch_json = sent  # type: ignore[method-assign]
        pipeline = EventPipeline(client)
        quota = rp.cached_gate() if app_name == "gated" else None
        app = OrgBillingMiddleware(_app(), pipeline=pipeline, quota=quota)
    if isinstance(app, OrgBillingMiddleware):
        app._running = True  # no lifespan here: the background work is done below, in line

    async def deliver() -> None:
        outbox = pipeline.outbox
        while outbox.available():
            await pipeline._deliver(outbox.take(pipeline.batch_size))

    for batch in (300, count):
        for start in range(0, batch, 100):
            for _ in range(min(100, batch - start)):
                await app(dict(rp.SCOPE), rp.receive, rp.send)
            if pipeline is not None:
                await deliver()


def _in_process_count(app_name: str, requests: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                __file__,
                "--inner",
                app_name,
                "--requests",
                str(requests),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    match = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or not match:
        raise RuntimeError(f"valgrind run of {app_name} failed:\n{run.stderr[-3000:]}")
    return int(match.group(1))


def _server_count(app_name: str, env: dict[str, str], seconds: int) -> tuple[int, int]:
    """(instructions, requests) of ``app_name`` under uvicorn while wrk loads it for ``seconds``."""
    from benchmarks.overhead import HEADERS, app_env, free_port, process, uvicorn_command, wait_http, wrk

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/1"
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        with process(valgrind + uvicorn_command(app_name, port), {**env, **app_env(app_name)}, cpu="0"):
            wait_http(f"http://127.0.0.1:{port}/v1/chat/warm", timeout=180)
            wrk(url, 3, 16, HEADERS)  # warm up (not counted)
            control = ["callgrind_control"]
            pid = _pid_listening(port)
            subprocess.run([*control, "--instr=on", str(pid)], check=True, capture_output=True)
            _, requests = wrk(url, seconds, 16, HEADERS)
            subprocess.run([*control, "--instr=off", str(pid)], check=True, capture_output=True)
            subprocess.run([*control, "--dump", str(pid)], check=True, capture_output=True)
            dumps: list[Path] = []
            deadline = time.monotonic() + 60
            while not dumps or not _total(dumps[-1]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no callgrind dump for {app_name}")
                time.sleep(0.2)
                dumps = sorted(Path(tmp).glob("callgrind.out.*"), key=lambda path: path.stat().st_mtime)
            return _total(dumps[-1]), requests


def _pid_listening(port: int) -> int:
    """The pid of the valgrind-run server (the process whose command line names the port)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"uvicorn" in command and str(port).encode() in command and not command[0].endswith(b"taskset"):
                return int(proc.name)
    raise RuntimeError(f"no server process on port {port}")


def _total(dump: Path) -> int:
    match = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.MULTILINE)
    return int(match.group(1)) if match else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        asyncio.run(_serve(args.inner, args.requests))
        return 0
    missing = [tool for tool in ("valgrind", "callgrind_control", "wrk") if not shutil.which(tool)]
    if missing:
        print(f"not found: {', '.join(missing)} (apt-get install valgrind wrk)", file=sys.stderr)
        return 2
    if not args.skip_server:
        from benchmarks.overhead import emulator

        counts: dict[str, float] = {}
        with emulator() as (_, env):
            for name in SERVER:
                instructions, requests = _server_count(name, env, args.seconds)
                counts[name] = instructions / requests
                print(f"server     {name:<15} {counts[name]:>10,.0f} instructions/request ({requests} requests)")
        _table("server (uvicorn, events to the emulator)", counts)
    if not args.skip_in_process:
        counts = {}
        for name in IN_PROCESS:
            counts[name] = (_in_process_count(name, args.requests) - _in_process_count(name, 0)) / args.requests
            print(f"in process {name:<15} {counts[name]:>10,.0f} instructions/request", flush=True)
        _table("in process (no server)", counts)
    return 0


def _table(title: str, counts: dict[str, float]) -> None:
    bare = counts["bare"]
    print(f"\n{title}\n{'app':<15} {'instr/request':>14} {'over bare':>10} {'bare/app':>9}")
    for name, count in counts.items():
        print(f"{name:<15} {count:>14,.0f} {count - bare:>+10,.0f} {bare / count:>8.3f}x")
    print()


if __name__ == "__main__":
    sys.exit(main())
