"""Quota gate, reviewed again (round 2): the rollover estimate's anniversary day (``Snapshot.anchor``), a Redis
reservation whose request a native asyncio cancel cuts off, blocked answers given as the period ends, and
``QuotaConfig.from_env``'s reading of a ``.env`` file.

1. The next period's estimated end (``next_period_end``) checked against the emulator's period arithmetic (lago-api's
   ``DatesService``) for subscriptions made within an hour of a local midnight (the anchor's day was then ignored,
   and a first period's exact start read as a midnight), and for an upgrade made late in the evening; through a gate
   on the emulator, memory and Redis backends.
2. ``RedisBackend.reserve`` cut off by ``task.cancel()`` (``asyncio.wait_for`` / ``asyncio.timeout`` around the app,
   uvicorn cancelling requests at shutdown) after Redis ran the reserve script: the call is released, not held in
   flight for ``inflight_horizon`` (a real ``redis-server`` on 127.0.0.1).
3. ``Retry-After`` / ``RateLimit-Reset`` of a blocked answer are at least 1 when the period ends during the reserve's
   round trip (a pinned clock stepped by the backend).
4. ``QuotaConfig.from_env``: ``export LAGO_QUOTA_*`` lines of ``.env`` are read, quoted values and inline comments
   refused, as :meth:`BillingSettings.from_env` does.

A settable clock; counts and headers only, no sleeps as synchronisation.
"""

# ruff: noqa: F811 (test_quota_redis's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from _pinned_clock import Clock as PinnedClock
from _quota_app import Clock, needs_redis, seed
from lago_org_billing import BillingSettings, ConfigurationError, LagoClient
from lago_org_billing._periods import next_period_end
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing._snapshots import Snapshot
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._util import billing_period
from test_quota_redis import _OPEN, _close_gates, client, clock, fake, prefix  # noqa: F401 (its fixtures)
from test_quota_rollover_billing_days import reset_after_the_boundary

pytestmark = pytest.mark.anyio


UTC = dt.timezone.utc


# ------------------------------------------------------------------- 1. the anniversary day near a midnight


def lagos_next_ends(zone: str, interval: str, anchor: dt.datetime) -> list[tuple[float, float, float, bool]]:
    """(start, end, the following period's end, whether both ends share a UTC offset) of an anniversary
    subscription's first periods, by the emulator's arithmetic; the first period starts at the exact ``anchor``."""
    tz = ZoneInfo(zone)
    out = []
    at = anchor
    for index in range(8):
        start, last = billing_period(interval, "anniversary", anchor, at, tz)
        end = last + dt.timedelta(seconds=1)
        following = billing_period(interval, "anniversary", anchor, end, tz)[1] + dt.timedelta(seconds=1)
        same_offset = end.astimezone(tz).utcoffset() == following.astimezone(tz).utcoffset()
        begun = max(start, anchor) if index == 0 else start
        out.append((begun.timestamp(), end.timestamp(), following.timestamp(), same_offset))
        at = end
    return out


@pytest.mark.parametrize("zone", ["UTC", "Asia/Tokyo", "Pacific/Honolulu", "Pacific/Fiji", "Pacific/Tahiti"])
@pytest.mark.parametrize("interval", ["monthly", "quarterly"])
async def test_subscribed_within_an_hour_of_a_midnight_the_estimate_is_lagos(zone: str, interval: str) -> None:
    """Subscribed at 23:30 or 00:30 (customers in zones without DST): the anchor's day was thrown away (a DST change
    since could have moved it across the midnight), and the first period's exact start (23:30) was read as the next
    day's midnight: its first rollover was estimated a day late (subscribed on the 28th-30th) or three days short (the
    31st), and a quarterly day 31 (Nov 30 to Feb 28) a day short every year. Every estimate is Lago's."""
    tz = ZoneInfo(zone)
    for month in (1, 8):
        for day in (28, 29, 30, 31):
            for hour, minute in ((23, 30), (0, 30), (22, 59)):
                anchor = dt.datetime(2027, month, day, hour, minute, tzinfo=tz)
                for start, end, following, _ in lagos_next_ends(zone, interval, anchor):
                    snap = Snapshot(
                        active=True, interval=interval, period_start=start, period_end=end, anchor=anchor.timestamp()
                    )
                    where = (anchor.isoformat(), dt.datetime.fromtimestamp(end, UTC).isoformat())
                    assert next_period_end(snap) == following, where


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/Los_Angeles", "Pacific/Auckland", "Pacific/Chatham"])
@pytest.mark.parametrize("interval", ["monthly", "quarterly"])
async def test_with_dst_an_anchor_near_a_midnight_is_at_most_an_hour_off_in_its_own_season(
    zone: str, interval: str
) -> None:
    """Zones with DST: an anchor within an hour of a midnight in the season of the period's end (its offset the
    end's) gives Lago's end, or one an hour off across a DST change (not a day)."""
    tz = ZoneInfo(zone)
    for month in (1, 8):
        for day in (28, 29, 30, 31):
            for hour, minute in ((23, 30), (0, 30)):
                anchor = dt.datetime(2027, month, day, hour, minute, tzinfo=tz)
                for start, end, following, same_offset in lagos_next_ends(zone, interval, anchor):
                    if dt.datetime.fromtimestamp(end, tz).utcoffset() != anchor.utcoffset():
                        continue  # (the anchor's day read in another season: it may be a day off, until Lago is read)
                    snap = Snapshot(
                        active=True, interval=interval, period_start=start, period_end=end, anchor=anchor.timestamp()
                    )
                    where = (anchor.isoformat(), dt.datetime.fromtimestamp(end, UTC).isoformat())
                    assert abs(next_period_end(snap) - following) <= (0 if same_offset else 3600), where


async def test_a_first_period_begun_at_2330_on_day_30_rolls_over_to_the_30th(redis: str | None) -> None:
    """Subscribed on 30 January at 23:30 UTC (anniversary, day 30): the first period runs from then to 28 February;
    the next ends on 30 March. The estimate read the start as 31 January's midnight: 31 March (a day late)."""
    clock = Clock(dt.datetime(2026, 1, 30, 23, 30, tzinfo=UTC))
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter", billing_time="anniversary", subscription_at="2026-01-30T23:30:00Z")
    clock.at = dt.datetime(2026, 2, 27, 23, 0, tzinfo=UTC)
    reset = await reset_after_the_boundary(fake, clock, redis, dt.datetime(2026, 2, 28, tzinfo=UTC))
    assert reset == int(dt.datetime(2026, 3, 30, tzinfo=UTC).timestamp() - clock.time())


async def test_a_period_begun_by_a_late_evening_upgrade_rolls_over_to_the_billing_day(redis: str | None) -> None:
    """Anniversary day 29 (subscribed at noon), upgraded on 30 January at 23:30: the new period runs from then to 28
    February, the next to 29 March. The upgrade's time was read as 31 January's midnight, and the estimate, taking the
    later of that day and the anchor's, said 31 March (two days late)."""
    clock = Clock(dt.datetime(2025, 12, 29, 12, 0, tzinfo=UTC))
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter", billing_time="anniversary", subscription_at="2025-12-29T12:00:00Z")
    clock.at = dt.datetime(2026, 1, 30, 23, 30, tzinfo=UTC)
    fake.add_subscription("org_a", "pro")  # (an upgrade: effective at once)
    clock.at = dt.datetime(2026, 2, 27, 23, 0, tzinfo=UTC)
    reset = await reset_after_the_boundary(fake, clock, redis, dt.datetime(2026, 2, 28, tzinfo=UTC))
    assert reset == int(dt.datetime(2026, 3, 29, tzinfo=UTC).timestamp() - clock.time())


async def test_a_calendar_subscription_keeps_no_anchor_and_a_provisional_snapshot_keeps_it() -> None:
    """A calendar subscription's estimate does not depend on an anchor; a rollover's provisional snapshot keeps the
    anchor (its own rollover estimate, once Lago is read, needs it)."""
    from lago_org_billing._periods import provisional

    end = dt.datetime(2027, 2, 28, tzinfo=UTC).timestamp()
    snap = Snapshot(
        active=True,
        interval="quarterly",
        period_start=dt.datetime(2026, 11, 30, tzinfo=UTC).timestamp(),
        period_end=end,
        anchor=dt.datetime(2026, 8, 31, 12, tzinfo=UTC).timestamp(),
    )
    snap = dataclass_replace(snap, next_period_end=next_period_end(snap))
    assert snap.next_period_end == dt.datetime(2027, 5, 31, tzinfo=UTC).timestamp()
    assert provisional(snap, end + 1).anchor == snap.anchor


def dataclass_replace(snap: Snapshot, **changes: Any) -> Snapshot:
    import dataclasses

    return dataclasses.replace(snap, **changes)


# ------------------------------------------------------------------- 2. a native cancel during a Redis reserve


@needs_redis
async def test_a_native_cancel_after_redis_reserved_releases_the_call(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """``asyncio.wait_for`` around the app (or uvicorn cancelling a request at shutdown) cancels the request's task
    with ``task.cancel()``, which ``anyio.CancelScope(shield=True)`` does not stop. Redis ran the reserve script; its
    answer never reached the request: the call stayed reserved in flight for ``inflight_horizon`` (an hour), the
    org nearer its quota. Now the reply is awaited apart from the request, and the call released when it comes."""
    settings = client.settings.replace(redis_url=redis_url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix), clock=clock.time)
    _OPEN.append(gate)
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        warm = await gate.check("org_1")  # the snapshot read, one call reserved
        gate.settle("org_1", warm, tokens=0, billed=True)
        await backend.flush()
        original = backend._check
        cut: list[asyncio.Task[Any]] = []

        async def answered_after_the_cancel(**kwargs: Any) -> Any:
            result = await original(**kwargs)  # Redis ran the script: the call is reserved there
            cut[0].cancel()  # the request is cancelled before the reply reaches it
            await asyncio.sleep(0)
            return result

        backend._check = answered_after_the_cancel  # type: ignore[method-assign]
        request = asyncio.ensure_future(gate.check("org_1"))
        cut.append(request)
        with pytest.raises(asyncio.CancelledError):
            await request
        backend._check = original  # type: ignore[method-assign]
        await asyncio.gather(*getattr(backend, "_orphans", ()))  # (the reply, awaited apart from the request)
        await backend.flush()
        held = await backend.redis.hgetall(backend.key("org_1", "count"))
        in_flight = {k: v for k, v in held.items() if k.startswith(b"i:")}
        assert in_flight == {}, held
        status = await gate.enforce_usage_limits("org_1")
        assert status["usage"]["max_api_calls"] == 1  # the served call only
        tasks.cancel_scope.cancel()


# ------------------------------------------------------------------- 3. a blocked answer as the period ends


async def test_a_blocked_answer_as_the_period_ends_asks_for_at_least_a_second() -> None:
    """A cold org over its limit, checked half a second before its period ends; the period ends during the
    reserve's round trip (the gate reads its clock again after it): ``Retry-After: 0`` and ``RateLimit-Reset: 0``,
    a client retrying at once, in a loop, until the boundary. Both are at least 1."""
    pinned = PinnedClock(dt.datetime(2026, 3, 31, 23, 59, 59, 500_000, tzinfo=UTC))
    fake = seed(FakeLago(api_key="k", clock=pinned), starter_calls=1)
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, plan_limits={})
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(lago.settings, lago, config=QuotaConfig(), clock=lambda: pinned.now.timestamp())
        _OPEN.append(gate)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            first = await gate.check("org_a")  # (its one call)
            assert first.allowed
            gate.settle("org_a", first, tokens=0, billed=True)
            await gate.invalidate("org_a")  # cold again
            original = gate.backend.reserve

            async def reserve_across_the_boundary(*args: Any) -> Any:
                outcome = await original(*args)
                pinned.now = dt.datetime(2026, 4, 1, tzinfo=UTC)  # the round trip crossed the period's end
                return outcome

            gate.backend.reserve = reserve_across_the_boundary  # type: ignore[method-assign]
            decision = await gate.check("org_a")
            tasks.cancel_scope.cancel()
    assert not decision.allowed
    headers = {name.decode(): value.decode() for name, value in decision.headers}
    assert int(headers["retry-after"]) >= 1 and int(headers["ratelimit-reset"]) >= 1, headers
    assert decision.problem is not None and decision.problem["retry_after"] >= 1


# ------------------------------------------------------------------- 4. QuotaConfig.from_env and .env files


@pytest.fixture
def in_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    import os

    for name in list(os.environ):
        if name.startswith("LAGO_"):
            monkeypatch.delenv(name)
    return tmp_path


async def test_export_lines_of_the_env_file_are_read(in_dir: Path) -> None:
    """A ``.env`` also ``source``d by a shell (``export LAGO_QUOTA_STATUS=402``): starlette reads the name as
    ``export LAGO_QUOTA_STATUS``, so the setting was ignored (429 answered where 402 was configured)."""
    (in_dir / ".env").write_text("export LAGO_QUOTA_STATUS=402\nexport LAGO_QUOTA_FEATURE=quota\n")
    config = QuotaConfig.from_env()
    assert (config.over_quota_status, config.feature_code) == (402, "quota")


async def test_an_inline_comment_in_the_env_file_is_refused(in_dir: Path) -> None:
    """``LAGO_QUOTA_FEATURE=api_quota  # our feature``: starlette keeps the comment in the value, so no entitlement
    matched and every org was unlimited, silently."""
    (in_dir / ".env").write_text("LAGO_QUOTA_FEATURE=api_quota  # our feature\n")
    with pytest.raises(ConfigurationError, match="inline comment"):
        QuotaConfig.from_env()


async def test_a_quoted_value_from_the_environment_is_refused(in_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``docker run --env-file`` keeps quotes: ``LAGO_QUOTA_REDIS_PREFIX="myapp:"`` made keys starting with a
    quote, never those of the other services using ``myapp:``."""
    monkeypatch.setenv("LAGO_QUOTA_REDIS_PREFIX", '"myapp:"')
    with pytest.raises(ConfigurationError, match="quotes"):
        QuotaConfig.from_env()
    with pytest.raises(ConfigurationError, match="quotes"):
        QuotaConfig.from_env({"LAGO_QUOTA_FEATURE": "'quota'"})
    assert QuotaConfig.from_env({"LAGO_QUOTA_FEATURE": "quota"}).feature_code == "quota"
