"""Child process of test_spool_random_kills.py: record events into a spooled EventPipeline, say what happens on stdout,
and wait to be killed (kill -9), or, for the last run, drain the spool and close.

    python _spool_kill_child.py CONFIG_JSON

CONFIG_JSON: ``spool``, ``url``, ``seed``, ``prefix`` (of this run's transaction ids), ``producers`` (tasks),
``per_producer`` (events each), ``burst`` (most events a producer submits between two yields), ``pad`` (most bytes of
padding in an event's properties), ``commit_window``, ``batch_size``, ``concurrency``, ``close`` (drain, close, exit).

Lines printed (each whole, under one lock: the spool's worker thread prints too):

* ``OPEN <rows>``: the spool is open, with ``rows`` undelivered events left by earlier runs (its own slot file's
  and those it adopted), before any is sent;
* ``DURABLE <id> <id> ...``: a group commit returned with these events in it (the spool's durability point: WAL,
  ``synchronous=FULL``), printed from the worker thread once ``COMMIT`` is done;
* ``SENT <n>``: a batch of ``n`` events is about to be posted; ``DELIVERED <n>``: Lago has taken ``n`` events so far
  (duplicates included);
* ``PRODUCED <n>``: every producer is done; ``IDLE``: and everything was delivered (a flush returned True);
* ``CLOSED <stats as JSON>``: the pipeline was closed (``close``); the process exits 0 then.
"""

from __future__ import annotations

import json
import random
import sys
import threading
from typing import Any

import anyio

from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing._settings import BillingSettings

_out = threading.Lock()


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def hook(pipeline: EventPipeline) -> None:
    """Report the spool's commits, the batches posted and the events delivered (without changing what they do)."""
    file = pipeline.outbox.file  # type: ignore[attr-defined]
    write = file.write

    def reported_write(*args: Any) -> Any:
        result = write(*args)
        written = result[0]
        if written:  # committed: each of these events is durable from here on
            say("DURABLE " + " ".join(json.loads(text)["transaction_id"] for _, text in written))
        return result

    file.write = reported_write
    attempt = pipeline._attempt

    async def reported_attempt(items: Any) -> Any:
        say(f"SENT {len(items)}")
        return await attempt(items)

    pipeline._attempt = reported_attempt  # type: ignore[method-assign]
    progressed = pipeline._progressed
    last = [0]

    def reported_progress() -> None:
        progressed()
        delivered = pipeline.stats["delivered"]
        if delivered != last[0]:
            last[0] = delivered
            say(f"DELIVERED {delivered}")

    pipeline._progressed = reported_progress  # type: ignore[method-assign]


async def produce(pipeline: EventPipeline, config: dict[str, Any], producer: int, rng: random.Random) -> None:
    sent = 0
    while sent < config["per_producer"]:
        for _ in range(min(rng.randint(1, config["burst"]), config["per_producer"] - sent)):
            properties: dict[str, Any] = {"tokens": sent}
            if config["pad"]:
                properties["pad"] = "x" * rng.randint(0, config["pad"])
            accepted = pipeline.submit(
                event_payload(
                    transaction_id=f"{config['prefix']}-{producer}-{sent}",
                    external_subscription_id="org_1",
                    code="api_call",
                    properties=properties,
                )
            )
            assert accepted
            sent += 1
        await anyio.sleep(rng.choice((0, 0, 0.001, 0.003)))  # (paces the producers: some commits take a few bursts)


async def main(config: dict[str, Any]) -> None:
    rng = random.Random(config["seed"])
    settings = BillingSettings(
        api_key="test-api-key", api_url=config["url"], retry_backoff=0.005, max_retries=0, api_timeout=2
    )
    async with LagoClient(settings) as client:
        pipeline = EventPipeline(
            client,
            spool_path=config["spool"],
            commit_window=config["commit_window"],
            flush_interval=0.005,
            batch_size=config["batch_size"],
            concurrency=config["concurrency"],
            max_backoff=0.05,
            shutdown_timeout=30,
        )
        hook(pipeline)
        async with anyio.create_task_group() as tg:
            await pipeline.commit()  # opens the spool (adopting orphan slots), before delivery starts
            say(f"OPEN {pipeline.outbox.spool_depth()}")
            await tg.start(pipeline.run)
            async with anyio.create_task_group() as producers:
                for producer in range(config["producers"]):
                    producers.start_soon(produce, pipeline, config, producer, random.Random(rng.random()))
            say(f"PRODUCED {config['producers'] * config['per_producer']}")
            while not await pipeline.flush(30):
                pass
            say("IDLE")
            if config["close"]:
                await pipeline.aclose()
                say("CLOSED " + json.dumps(pipeline.stats))
                return
            await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
