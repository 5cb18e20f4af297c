"""Python bytecodes executed per request, by function: bare vs billed (vs gated) in a real uvicorn server.

instructions.py says how much the middleware costs; this says where, in a few seconds and without valgrind. Each
app is served by uvicorn (h11, asyncio) in this process, events delivered to the emulator, while wrk loads it; a
``sys.settrace`` opcode tracer on the server's thread counts the bytecodes each function runs while wrk is timed,
divided by the requests wrk completed. Tracing slows the server a hundredfold, but a count is a count: the
figures are deterministic to within the few requests in flight at the edges.

    python benchmarks/opcodes.py [--apps bare,billed,gated] [--seconds 5] [--top 30]

A bytecode is not a fixed cost (a call or a dict build is worth several simple ones), so read the totals next to
instructions.py's; the per-function rows show where the middleware's share goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._here import use_this_checkout  # noqa: E402

use_this_checkout()

Key = tuple[str, str]


def _count(app_name: str, env: dict[str, str], seconds: int) -> tuple[collections.Counter[Key], int]:
    """(bytecodes by (file, function), requests) of ``app_name`` served here while wrk loads it."""
    from benchmarks import _apps
    from benchmarks.overhead import BILLING, app_env

    # the app reads its settings from the environment when it builds its middleware, at the first request
    saved = dict(os.environ)
    os.environ.update({**env, **app_env(app_name)})
    try:
        app = getattr(_apps, "billed" if app_name.startswith("gated") else app_name)
        return _serve_and_count(app, seconds, env["LAGO_API_URL"] if app_name.startswith(BILLING) else None)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _delivered(lago_url: str | None, count: int) -> None:
    """Wait (at most 60 s) until the emulator at ``lago_url`` holds ``count`` events: the events of the requests
    served so far are built and delivered, in the window that counts them, not in the next one."""
    if lago_url is None:
        return
    from benchmarks.overhead import count_events

    deadline = time.monotonic() + 60
    while count_events(lago_url) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the emulator did not receive the {count} events of the requests served")
        time.sleep(0.05)  # (polling the emulator: a wait for delivery, bounded above)


def _serve_and_count(app: Any, seconds: int, lago_url: str | None) -> tuple[collections.Counter[Key], int]:
    """``lago_url``: the emulator the app bills to (None: it bills nowhere). Its events are counted with their
    requests: those of the warm-up delivered before the count starts, those of the counted requests before it ends."""
    import uvicorn
    from benchmarks.overhead import HEADERS, count_events, free_port, wait_http

    counts: collections.Counter[Key] = collections.Counter()

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        key = (Path(frame.f_code.co_filename).name, frame.f_code.co_name)

        def local(frame: types.FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return local

        return local

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, port=port, log_level="warning", access_log=False, http="h11", loop="asyncio")
    )
    tracing, traced, done = threading.Event(), threading.Event(), threading.Event()

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        await asyncio.to_thread(tracing.wait)
        sys.settrace(tracer)  # this thread's: the event loop's
        traced.set()
        await asyncio.to_thread(done.wait)
        sys.settrace(None)
        server.should_exit = True
        await task

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/1"
        wait_http(url)
        headers = [part for name, value in HEADERS.items() for part in ("-H", f"{name}: {value}")]
        before = count_events(lago_url) if lago_url is not None else 0
        warm = subprocess.run(["wrk", "-t1", "-c16", "-d2s", *headers, url], capture_output=True, text=True, check=True)
        _delivered(lago_url, before + _served(warm.stdout))
        before = count_events(lago_url) if lago_url is not None else 0
        tracing.set()
        traced.wait()
        counts.clear()
        out = subprocess.run(
            ["wrk", "-t1", "-c16", f"-d{seconds}s", *headers, url], capture_output=True, text=True, check=True
        ).stdout
        _delivered(lago_url, before + _served(out))
    finally:
        tracing.set()
        done.set()
        thread.join()
    return counts, _served(out)


def _served(out: str) -> int:
    """The requests wrk completed (those in flight as it stopped are served too, not counted: at most 16)."""
    match = re.search(r"(\d+) requests in", out)
    if not match:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", default="bare,billed,gated")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    from benchmarks.overhead import emulator

    apps = args.apps.split(",")
    per_request: dict[str, dict[Key, float]] = {}
    with emulator() as (_, env):
        for name in apps:
            counts, requests = _count(name, env, args.seconds)
            per_request[name] = {key: value / requests for key, value in counts.items()}
            total = sum(per_request[name].values())
            print(f"{name:<12} {total:>8,.0f} bytecodes/request ({requests} requests)", flush=True)
    base = per_request[apps[0]]
    base_total = sum(base.values())
    for name in apps[1:]:
        rows = per_request[name]
        total = sum(rows.values())
        print(f"\n{name}: {total:,.0f} bytecodes/request, {total - base_total:+,.0f} over {apps[0]}")
        deltas = sorted(((value - base.get(key, 0.0), key) for key, value in rows.items()), reverse=True)
        for delta, (file, function) in deltas[: args.top]:
            print(f"  {delta:>+8.1f}  {file}:{function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
