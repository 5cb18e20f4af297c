"""Child process of test_spool_crash.py: spool events, say so on stdout, then wait to be killed (kill -9).

    python _spool_child.py SPOOL_PATH LAGO_URL COUNT [DELIVERED_MARK]

Prints ``COMMITTED <count>`` once every event is in the spool file, and ``DELIVERED <n>`` once Lago has
accepted at least DELIVERED_MARK events (their rows are not yet deleted: the commit window is long).
"""

from __future__ import annotations

import sys

import anyio

from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing._settings import BillingSettings


async def main(spool_path: str, url: str, count: int, mark: int | None) -> None:
    settings = BillingSettings(api_key="test-api-key", api_url=url, retry_backoff=0.01, max_retries=0, api_timeout=5)
    async with LagoClient(settings) as client:
        pipeline = EventPipeline(
            client, spool_path=spool_path, commit_window=3600, flush_interval=0.01, concurrency=1, max_backoff=0.05
        )
        if mark is not None:
            progressed = pipeline._progressed

            def report() -> None:
                progressed()
                if pipeline.stats["delivered"] >= mark:
                    print(f"DELIVERED {pipeline.stats['delivered']}", flush=True)

            pipeline._progressed = report  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            await pipeline.commit()  # open the spool before delivery starts
            for i in range(count):
                pipeline.submit(
                    event_payload(
                        transaction_id=f"crash-{i}",
                        external_subscription_id="org_1",
                        code="api_call",
                        properties={"tokens": i},
                    )
                )
            await pipeline.commit()
            print(f"COMMITTED {count}", flush=True)
            await tg.start(pipeline.run)
            await anyio.sleep_forever()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    anyio.run(main, arguments[0], arguments[1], int(arguments[2]), int(arguments[3]) if len(arguments) > 3 else None)
