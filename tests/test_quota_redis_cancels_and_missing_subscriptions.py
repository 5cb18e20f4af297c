"""Quota gate, reviewed again (round 3) after the fix of Redis reservations cut off by a native cancel (e9ca987), and
what an operator is told about an org whose Lago subscription does not exist yet (the migration window).

1. ``RedisBackend.reserve`` writes the org's queued settles first when a released call of the org is among them
   (``_releasing``); that write runs on the request's task: a native ``task.cancel()`` (``asyncio.wait_for`` around
   the app, uvicorn cancelling requests at shutdown; anyio's own cancellations arrive the same way under asyncio)
   cut it off after the batch was taken from the queue and before Redis had it: up to 500 settles of every org were
   lost, the released calls held in flight for ``inflight_horizon`` (an hour). A real ``redis-server``.
2. An org that is a Lago customer whose subscription does not exist yet (before ``migrate --execute``): the 402
   problem names the subscription ``external_id`` looked up; the log says it once, with
   ``LAGO_SUBSCRIPTION_ID_TEMPLATE``; with ``LAGO_QUOTA_NO_SUBSCRIPTION=allow`` it warns once per org that the org's
   events are taken by Lago and never billed. Through the middleware and the emulator.

A settable clock; counts and logs only, no sleeps as synchronisation.
"""

# ruff: noqa: F811 (test_quota_redis's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import Clock, chat, needs_redis, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago
from test_quota_redis import _OPEN, _close_gates, client, clock, fake, prefix  # noqa: F401 (its fixtures)

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------- 1. the reserve's write of queued settles


async def in_redis(backend: RedisBackend, org_id: str) -> tuple[int, int]:
    """(calls recorded, calls held in flight) in the org's Redis counter."""
    held = await backend.redis.hgetall(backend.key(org_id, "count"))
    recorded = sum(int(v) for k, v in held.items() if k.startswith(b"c:"))
    in_flight = sum(int(v) for k, v in held.items() if k.startswith(b"i:"))
    return recorded, in_flight


@needs_redis
async def test_a_native_cancel_during_the_reserves_write_of_queued_settles_loses_none(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """Two calls of org_1 served (one billed, one released: a redirect), their settles queued (no background writer
    yet); the org's next request writes them before its reservation, and is cancelled natively just then. The
    settles were taken from the queue and dropped: the billed call never recorded, the released one held in flight
    for an hour. Now the write goes on apart from the request, and both reach Redis."""
    settings = client.settings.replace(redis_url=redis_url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time)
    _OPEN.append(gate)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    served, redirected = await gate.check("org_1"), await gate.check("org_1")
    gate.settle("org_1", served, tokens=0, billed=True)
    gate.settle("org_1", redirected, tokens=0, billed=False)
    assert len(backend._queue) == 2 and "org_1" in backend._releasing

    cut: list[asyncio.Task[Any]] = []
    real_pipeline = backend.redis.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*eargs: Any, **ekwargs: Any) -> Any:
            if cut:  # the request is cancelled before its write reaches Redis
                cut.pop().cancel()
                await asyncio.sleep(0)
            return await real_execute(*eargs, **ekwargs)

        pipe.execute = execute
        return pipe

    backend.redis.pipeline = pipeline  # type: ignore[method-assign]
    request = asyncio.ensure_future(gate.check("org_1"))
    cut.append(request)
    with pytest.raises(asyncio.CancelledError):
        await request
    backend.redis.pipeline = real_pipeline  # type: ignore[method-assign]
    await asyncio.gather(*backend._orphans)  # (what was cut off, going on apart from the request)
    await backend.flush()
    assert await in_redis(backend, "org_1") == (1, 0)


# ------------------------------------------------------------------- 2. an org whose subscription does not exist yet


@pytest.fixture
def migrating(clock: Clock) -> FakeLago:
    """orgs ``acme`` and ``globex`` Lago customers without a subscription (not migrated yet); ``initech`` subscribed
    (external_id ``initech_main``, as ``LAGO_SUBSCRIPTION_ID_TEMPLATE={org_id}_main`` makes it)."""
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    fake.add_customer("acme")
    fake.add_customer("globex")
    fake.add_customer("initech")
    fake.add_subscription("initech", "starter", external_id="initech_main")
    return fake


async def serve(
    fake: FakeLago, clock: Clock, requests: list[str], quota_mode: str = "enforce", **config: Any
) -> list[httpx.Response]:
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key="k",
        quota_mode=quota_mode,
        org_header="X-Org-Id",
        retry_backoff=0.001,
        subscription_id_template="{org_id}_main",
    )
    responses = []
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)
        app = OrgBillingMiddleware(
            Starlette(routes=[Route("/chat", chat, methods=["POST"])]), settings, quota=gate, client=lago
        )
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                for org_id in requests:
                    responses.append(await http.post("/chat", headers={"X-Org-Id": org_id}))
                    clock.advance(31)  # (its snapshot due again: read from Lago again)
                    await gate.invalidate(org_id)
        finally:
            await app.aclose()
    return responses


def warnings_about(caplog: pytest.LogCaptureFixture, org_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lago_org_billing.quota" and r.levelno >= logging.WARNING and repr(org_id) in r.getMessage()
    ]


async def test_the_402_of_an_org_without_its_subscription_names_what_was_looked_up(
    migrating: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The problem body gives the subscription external_id looked up (LAGO_SUBSCRIPTION_ID_TEMPLATE applied) as a
    field; the log, which said nothing, says it once with the template and what to do (subscribe the org, or
    migrate first)."""
    caplog.set_level(logging.INFO, logger="lago_org_billing")
    responses = await serve(migrating, clock, ["acme", "acme", "globex"])
    assert [r.status_code for r in responses] == [402, 402, 402]
    body = responses[0].json()
    assert body["external_subscription_id"] == "acme_main"
    assert "'acme_main'" in body["detail"]
    said = warnings_about(caplog, "acme")
    assert len(said) == 1, said
    assert "'acme_main'" in said[0] and "LAGO_SUBSCRIPTION_ID_TEMPLATE" in said[0] and "'{org_id}_main'" in said[0]
    assert "402" in said[0] and "migrate" in said[0]
    assert warnings_about(caplog, "globex") == []  # (refused orgs: said once, not per org id a header brings)


@pytest.mark.parametrize(
    ("quota_mode", "config"), [("enforce", {"no_subscription": "allow"}), ("monitor", {})], ids=["allow", "monitor"]
)
async def test_with_no_subscription_allow_the_unbilled_events_are_said_once_per_org(
    migrating: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture, quota_mode: str, config: dict[str, Any]
) -> None:
    """``LAGO_QUOTA_NO_SUBSCRIPTION=allow`` (or monitor mode): the requests are served and their events sent, which
    Lago takes (200) and never bills, silently. Now a warning says so, once per org, at each org's first read."""
    caplog.set_level(logging.INFO, logger="lago_org_billing")
    responses = await serve(migrating, clock, ["acme", "acme", "globex", "initech"], quota_mode, **config)
    assert [r.status_code for r in responses] == [200, 200, 200, 200]
    for org_id, external_id in (("acme", "acme_main"), ("globex", "globex_main")):
        said = warnings_about(caplog, org_id)
        assert len(said) == 1, said
        assert f"'{external_id}'" in said[0] and "never billed" in said[0], said
        assert "LAGO_SUBSCRIPTION_ID_TEMPLATE" in said[0]
    assert warnings_about(caplog, "initech") == []
