"""Delivery throughput of EventPipeline vs the official lago-python-client, CPU per event, RSS with a backlog.

Run by hand (prints figures; about 1-2 minutes, ``--quick`` for a few seconds)::

    python benchmarks/delivery.py [--quick] [--events N] [--official-events N] [--backlog N]

What it measures, each target served by uvicorn in a *separate process* on 127.0.0.1 (so the server's CPU does not
share the measured process's GIL):

1. ``sink``: a minimal ASGI app that accepts ``POST /api/v1/events/batch`` (it reads the body, answers 200). This
   measures the delivery path, not a server.
2. ``emulator``: the package's Lago emulator (``lago-org-billing emulator``), which validates, deduplicates and
   stores every event: closer to a real Lago, and slower.

On each target, in the same run: ``EventPipeline`` (batches of 100, concurrency 4, memory outbox, then the SQLite
spool) against the official client's batch mode, ``Client(...).events().batch_create(BatchEvent(events=[...]))``
called in a loop with batches of 100 (it is sync, opens a connection per call and has no background sender).
Both send the same number of events. Reported: events/s (wall time, submit to last event acknowledged), the
ratio, and the CPU microseconds per event of the sending process (``time.process_time``).

3. Peak RSS (``VmHWM``, else ``ru_maxrss``) of a fresh process that spools 1,000,000 events into the SQLite
   spool while Lago is down (an unreachable port), and of another fresh process that restarts on that backlog
   and drains it into the sink.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._here import use_this_checkout

use_this_checkout()

API_KEY = "bench-key"


# ------------------------------------------------------------------------------------------ servers


async def sink_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accept anything; 200 ``{"events":[]}`` (the pipeline ignores the echoed events)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = b'{"events":[]}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


@contextmanager
def serve(kind: str) -> Iterator[str]:
    port = free_port()
    if kind == "sink":
        command = [sys.executable, __file__, "--serve-sink", str(port)]
    else:
        command = [sys.executable, "-m", "lago_org_billing.cli", "emulator", "--port", str(port), "--api-key", API_KEY]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def run_sink(port: int) -> None:
    import uvicorn

    uvicorn.run(sink_app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")


# ------------------------------------------------------------------------------------------ senders


def make_events(count: int, prefix: str) -> list[dict[str, Any]]:
    from lago_org_billing._events import event_payload

    template = event_payload(
        transaction_id="x",
        external_subscription_id="org_bench",
        code="api_call",
        properties={"method": "POST", "path": "/v1/chat", "status": 200, "model": "gpt-x", "tokens": 1234},
    )
    return [{**template, "transaction_id": f"{prefix}-{i}"} for i in range(count)]


def official(url: str, events: list[dict[str, Any]]) -> tuple[float, float]:
    """The official client's batch mode, batches of 100, one after the other."""
    from lago_python_client.client import Client
    from lago_python_client.models import BatchEvent, Event

    client = Client(api_key=API_KEY, api_url=url)
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(events), 100):
        batch = BatchEvent(events=[Event(**event) for event in events[start : start + 100]])
        client.events().batch_create(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


async def pipeline_run(url: str, events: list[dict[str, Any]], spool_path: str | None) -> tuple[float, float, float]:
    """EventPipeline: submit everything, flush; (wall s, cpu s, submit cpu s)."""
    from lago_org_billing._client import LagoClient
    from lago_org_billing._delivery import EventPipeline
    from lago_org_billing._settings import BillingSettings

    settings = BillingSettings(api_key=API_KEY, api_url=url)
    async with LagoClient(settings) as client:
        pipeline = EventPipeline(client, spool_path=spool_path, memory_capacity=len(events) + 1)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            wall, cpu = time.perf_counter(), time.process_time()
            submit = pipeline.submit
            for event in events:
                submit(event)
            submit_cpu = time.process_time() - cpu
            assert await pipeline.flush(600), "not everything was delivered"
            result = time.perf_counter() - wall, time.process_time() - cpu, submit_cpu
            await pipeline.aclose()
    stats = pipeline.stats
    assert stats["delivered"] == len(events) and stats["dead_lettered"] == 0, stats
    return result


# ------------------------------------------------------------------------------------------ RSS children


async def fill_backlog(spool_path: str, count: int) -> dict[str, Any]:
    """Spool ``count`` events while Lago is down (an unreachable port); the pipeline runs and retries."""
    from lago_org_billing._client import LagoClient
    from lago_org_billing._delivery import EventPipeline
    from lago_org_billing._settings import BillingSettings

    settings = BillingSettings(api_key=API_KEY, api_url=f"http://127.0.0.1:{free_port()}", max_retries=0)
    chunk = 10_000
    template = make_events(1, "backlog")[0]
    async with LagoClient(settings) as client:
        pipeline = EventPipeline(client, spool_path=spool_path, max_backoff=1.0)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            started = time.perf_counter()
            for start in range(0, count, chunk):
                for i in range(start, min(count, start + chunk)):
                    pipeline.submit({**template, "transaction_id": f"backlog-{i}"})
                await pipeline.commit()  # requests arrive over time; the spool keeps up
            elapsed = time.perf_counter() - started
            stats = pipeline.stats
            await pipeline.aclose(timeout=0)
    return {"spooled": stats["spool_depth"], "seconds": elapsed, "rss_mb": peak_rss_mb()}


async def drain_backlog(spool_path: str, url: str) -> dict[str, Any]:
    """Restart on an existing backlog and deliver it all into the sink."""
    from lago_org_billing._client import LagoClient
    from lago_org_billing._delivery import EventPipeline
    from lago_org_billing._settings import BillingSettings

    async with LagoClient(BillingSettings(api_key=API_KEY, api_url=url)) as client:
        pipeline = EventPipeline(client, spool_path=spool_path)
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            backlog = pipeline.stats["spool_depth"]
            assert await pipeline.flush(900)
            elapsed = time.perf_counter() - started
            await pipeline.aclose()
    return {"drained": pipeline.stats["delivered"], "backlog": backlog, "seconds": elapsed, "rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """Peak RSS of this process. On Linux from ``VmHWM``: ``ru_maxrss`` survives ``execve`` and would report the
    parent's peak at fork time."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def child(*args: str) -> dict[str, Any]:
    output = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------------------ main


def throughput(target: str, count: int, official_count: int) -> None:
    with serve(target) as url:
        events = make_events(count, f"{target}-pipe")
        wall, cpu, submit_cpu = anyio.run(pipeline_run, url, events, None)
        ours = count / wall
        print(f"  EventPipeline (memory):   {ours:>10,.0f} events/s  {cpu / count * 1e6:6.1f} µs CPU/event "
              f"(submit {submit_cpu / count * 1e6:.2f} µs)  [{count:,} events, {wall:.2f} s]")  # fmt: skip
        with tempfile.TemporaryDirectory() as directory:
            events = make_events(count, f"{target}-spool")
            wall_s, cpu_s, submit_s = anyio.run(pipeline_run, url, events, os.path.join(directory, "spool.db"))
        spooled = count / wall_s
        print(f"  EventPipeline (SQLite):   {spooled:>10,.0f} events/s  {cpu_s / count * 1e6:6.1f} µs CPU/event "
              f"(submit {submit_s / count * 1e6:.2f} µs)  [{count:,} events, {wall_s:.2f} s]")  # fmt: skip
        events = make_events(official_count, f"{target}-official")
        wall_o, cpu_o = official(url, events)
        theirs = official_count / wall_o
        per_event = cpu_o / official_count * 1e6
        print(f"  lago-python-client batch: {theirs:>10,.0f} events/s  {per_event:6.1f} µs CPU/event "
              f"[{official_count:,} events, {wall_o:.2f} s]")  # fmt: skip
        print(f"  ratio: memory {ours / theirs:.1f}x, SQLite spool {spooled / theirs:.1f}x the official client")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small runs (a few seconds)")
    parser.add_argument("--events", type=int, help="events per pipeline run on the sink")
    parser.add_argument("--official-events", type=int, help="events for the official client on the sink")
    parser.add_argument("--backlog", type=int, help="events backlogged in the spool for the RSS figure")
    parser.add_argument("--serve-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fill-backlog", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--drain-backlog", nargs=2, metavar=("PATH", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("lago_org_billing").setLevel(logging.ERROR)  # the outage of the backlog run is deliberate
    if args.serve_sink:
        run_sink(args.serve_sink)
        return
    if args.fill_backlog:
        print(json.dumps(anyio.run(fill_backlog, args.fill_backlog[0], int(args.fill_backlog[1]))))
        return
    if args.drain_backlog:
        print(json.dumps(anyio.run(drain_backlog, *args.drain_backlog)))
        return

    count = args.events or (20_000 if args.quick else 100_000)
    official_count = args.official_events or count  # same number of events on the same target
    backlog = args.backlog or (100_000 if args.quick else 1_000_000)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; servers in separate processes on 127.0.0.1")
    print("\n[sink] minimal ASGI app answering 200 to POST /api/v1/events/batch")
    throughput("sink", count, official_count)
    emulator_count = max(count // 5, 4_000)
    print("\n[emulator] lago-org-billing emulator (validates, deduplicates, stores)")
    throughput("emulator", emulator_count, emulator_count)

    print(f"\n[backlog] {backlog:,} events spooled with Lago down, then drained after a restart (fresh processes)")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "spool.db")
        filled = child("--fill-backlog", path, str(backlog))
        size = os.path.getsize(path) / 1e6
        print(f"  spooled {filled['spooled']:,} events in {filled['seconds']:.1f} s "
              f"({filled['spooled'] / filled['seconds']:,.0f}/s); file {size:.0f} MB; "
              f"peak RSS {filled['rss_mb']:.1f} MB")  # fmt: skip
        with serve("sink") as url:
            drained = child("--drain-backlog", path, url)
        print(f"  restart: drained {drained['drained']:,} of {drained['backlog']:,} in {drained['seconds']:.1f} s "
              f"({drained['drained'] / drained['seconds']:,.0f}/s); peak RSS {drained['rss_mb']:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
