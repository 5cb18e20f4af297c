"""Events of several orgs sharing one ``transaction_id`` (a caller's own id, such as a nightly job's
``daily-2026-11-28`` given to every org's ``record_usage_nowait``) are all delivered. Lago's Postgres event store
allows them (its unique key is the id and the subscription), but its batch insert matches the rows it stored back to
the events by id alone: all but one of them are answered ``value_already_exist`` and the batch rolled back, although
Lago has none of them. They were counted as duplicates and dropped, lost without a dead letter."""

from __future__ import annotations

from typing import Any

import pytest

from lago_org_billing import EventPipeline
from lago_org_billing._events import event_payload
from test_delivery import make_client, make_fake, run_pipeline

pytestmark = pytest.mark.anyio


def _event(transaction_id: str, org: str) -> dict[str, Any]:
    return event_payload(transaction_id=transaction_id, external_subscription_id=org, code="api_call")


def _stored(fake: Any) -> list[tuple[str, str]]:
    return sorted((e["transaction_id"], e["external_subscription_id"]) for e in fake.events)


async def test_one_id_on_several_orgs_in_one_batch_is_delivered_for_each() -> None:
    """Five orgs' events sharing an id, between events of their own: every one stored, none counted a duplicate."""
    fake = make_fake()
    submitted = [_event("daily-2026-11-28", f"org_{n}") for n in range(5)]
    submitted += [_event(f"own-{n}", f"org_{n}") for n in range(5)]
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, submitted)
    assert _stored(fake) == sorted((e["transaction_id"], e["external_subscription_id"]) for e in submitted)
    assert pipeline.stats["delivered"] == 10
    assert pipeline.stats.get("duplicates", 0) == 0
    assert pipeline.dead_letters() == []


async def test_a_resend_beside_another_orgs_event_of_its_id_is_a_duplicate_and_the_other_is_stored() -> None:
    """``org_a``'s event is in Lago already (a resend after a lost answer); ``org_b``'s, of the same id, is new: one
    duplicate, and ``org_b``'s stored."""
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        first = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(first, [_event("job-7", "org_a")])
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, [_event("job-7", "org_a"), _event("job-7", "org_b")])
    assert _stored(fake) == [("job-7", "org_a"), ("job-7", "org_b")]
    assert pipeline.stats["delivered"] == 2 and pipeline.stats["duplicates"] == 1


async def test_the_same_event_twice_in_one_batch_is_stored_once() -> None:
    """One org's event submitted twice (a caller's retry) is one event in Lago: the second a duplicate."""
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        event = _event("job-8", "org_a")
        assert await run_pipeline(pipeline, [event, dict(event)])
    assert _stored(fake) == [("job-8", "org_a")]
    assert pipeline.stats["delivered"] == 2 and pipeline.stats["duplicates"] == 1
