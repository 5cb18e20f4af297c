"""The quota gate under extreme values from outside: Lago's times at the ends of the calendar (years 0001 and 9999,
far offsets), billing periods that end before they start, counts and limits of thousands of digits, privileges that
are no whole number, and settings at their limits (a cache TTL of a billion years, a settle lag longer than a period).

Expected of each: no exception in the request path, no ``Retry-After`` past the period's end, counts that Redis and the
headers can hold, and Lago values the gate cannot use decided by LAGO_FAIL_OPEN, said once.

Verified elsewhere (not repeated here): counts that are no number (``"NaN"``, negative, booleans) and statuses Lago does
not document (test_lago_answers_drifting_from_the_spec.py); non-finite and negative settings refused at startup
(test_settings*.py, and here for the quota's own). Lago is the emulator, its answers reshaped at the network edge by
:class:`Drifting`."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from _quota_app import Clock, Drifting, Edit, needs_redis, seed
from lago_org_billing import BillingSettings, LagoClient, _limits
from lago_org_billing._errors import ConfigurationError
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "sk_extremes_never_shown"
BASE = "http://lago.test"
#: The largest count or limit the gate keeps (the package's bound on token counts, exact in Redis's Lua numbers).
LARGEST = 2**53 - 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


_OPEN: list[QuotaGate] = []


@pytest.fixture(autouse=True)
async def _close_gates() -> AsyncIterator[None]:
    """Every gate a test made is closed (its Redis connections with it)."""
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


def lago(
    clock: Clock,
    *,
    calls: int | None = 3,
    tokens: int | None = None,
    subscription: Edit | None = None,
    usage: Edit | None = None,
) -> Drifting:
    """org_1 on ``starter`` (``calls`` / ``tokens`` a period), Lago's answers reshaped."""
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=calls, starter_tokens=tokens)
    return Drifting(fake, subscription=subscription, usage=usage)


def gate_on(client: LagoClient, clock: Clock, config: QuotaConfig | None = None, **changes: Any) -> QuotaGate:
    gate = QuotaGate(client.settings.replace(**changes), client, config=config or QuotaConfig(), clock=clock.time)
    _OPEN.append(gate)
    return gate


def client_on(transport: httpx.AsyncBaseTransport) -> LagoClient:
    return LagoClient(BillingSettings(api_url=BASE, api_key=API_KEY, max_retries=0), transport=transport)


async def decisions(gate: QuotaGate, tries: int) -> list[QuotaDecision]:
    """``tries`` checks of org_1 in a row (each allowed one billed), each answer's problem encoded as it is sent."""
    made = []
    for _ in range(tries):
        decision = await gate.check("org_1")
        made.append(decision)
        if decision.allowed:
            gate.settle("org_1", decision, tokens=1, billed=True)
        if decision.problem is not None:
            json.dumps(decision.problem)
    return made


def header(decision: QuotaDecision, name: bytes) -> int:
    return int(dict(decision.headers)[name])


def period(start: str | None = None, end: str | None = None) -> dict[str, Edit]:
    """Lago's billing period as both answers give it: the subscription's and ``current_usage``'s bounds."""

    def subscription(sub: dict[str, Any]) -> None:
        if start is not None:
            sub["current_billing_period_started_at"] = start
        if end is not None:
            sub["current_billing_period_ending_at"] = end

    def usage(answer: dict[str, Any]) -> None:
        if start is not None:
            answer["from_datetime"] = start
        if end is not None:
            answer["to_datetime"] = end

    return {"subscription": subscription, "usage": usage}


def each_charge(**fields: Any) -> Edit:
    def edit(usage: dict[str, Any]) -> None:
        for charge in usage.get("charges_usage") or []:
            charge.update(fields)

    return edit


def privilege(value: Any, code: str = "max_api_calls") -> Edit:
    def edit(sub: dict[str, Any]) -> None:
        for feature in sub.get("entitlements") or []:
            for entry in feature.get("privileges") or []:
                if entry.get("code") == code:
                    entry["value"] = value

    return edit


def redis_stats(gate: QuotaGate) -> dict[str, int]:
    stats: dict[str, int] = getattr(gate.backend, "stats")  # noqa: B009 (a RedisBackend's; not QuotaBackend's)
    return stats


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# ---------------------------------------------------------------------------------------- times at the calendar's ends


@pytest.mark.parametrize(
    "end",
    ["9999-12-31T23:59:59Z", "9999-12-31T23:59:59-12:00", "9999-12-31T23:59:59.999999999Z"],
    ids=["utc", "west", "nanoseconds"],
)
async def test_a_period_ending_in_year_9999_is_decided_on_lagos_bounds(
    clock: Clock, end: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A period Lago says ends on the last second of year 9999 (its end, to_datetime + 1 s, is in year 10000): the gate
    decides on it (3 calls, then 429) instead of every refresh failing on the next period's estimate (a traceback each
    time, every call let through by LAGO_FAIL_OPEN), and the 429 names the end without crashing the request."""
    async with client_on(lago(clock, **period(end=end))) as client:
        gate = gate_on(client, clock)
        made = await decisions(gate, 4)
    assert [d.allowed for d in made] == [True, True, True, False]
    blocked = made[-1]
    assert blocked.problem is not None and blocked.problem["period_end"].startswith("9999-12-31T")
    assert 0 < header(blocked, b"retry-after") <= header(blocked, b"ratelimit-reset")
    assert gate.stats["fail_open"] == 0 and gate.stats["refresh_errors"] == 0
    assert not tracebacks(caplog)


async def test_a_period_begun_in_year_0001_east_of_utc_is_named_in_the_429(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``from_datetime`` 0001-01-01T00:00:00+14:00 is in year 0 in UTC: the blocked request's problem named it through
    ``datetime.fromtimestamp`` and the request failed (ValueError: year 0 is out of range), at every blocked call."""
    async with client_on(lago(clock, **period(start="0001-01-01T00:00:00+14:00"))) as client:
        gate = gate_on(client, clock)
        made = await decisions(gate, 5)
    assert [d.allowed for d in made] == [True, True, True, False, False]
    assert made[-1].problem is not None and made[-1].problem["period_start"] == "0001-01-01T00:00:00Z"
    assert not tracebacks(caplog)


@pytest.mark.parametrize(
    "subscription",
    [
        {"billing_time": "anniversary", "subscription_at": "0001-01-01T00:00:00+14:00"},
        {"current_billing_period_ending_at": "9999-12-31T23:59:59Z"},
    ],
    ids=["anniversary-in-year-0", "end-in-9999-without-a-start"],
)
async def test_a_subscription_whose_period_cannot_be_reckoned_follows_the_fail_policy_said_once(
    clock: Clock, subscription: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A subscription without both bounds of its period (an older Lago) whose times are out of the calendar's range:
    its period was computed through datetimes that do not exist, and every refresh failed with a traceback. It is an
    answer the gate cannot use: LAGO_FAIL_OPEN decides (closed: 503), said once at WARNING, no traceback."""

    def older(sub: dict[str, Any]) -> None:
        sub.pop("current_billing_period_started_at", None)
        sub.pop("current_billing_period_ending_at", None)
        sub.update(subscription)

    def no_bounds(answer: dict[str, Any]) -> None:
        answer.pop("from_datetime", None)
        answer.pop("to_datetime", None)

    async with client_on(lago(clock, subscription=older, usage=no_bounds)) as client:
        gate = gate_on(client, clock, fail_open=False)
        for _ in range(3):
            made = await decisions(gate, 1)
            assert made[0].status == 503
            clock.advance(10)  # (past failure_backoff: read again, failing again)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "out of range" in r.getMessage()]
    assert len(said) == 1, said
    assert not tracebacks(caplog)


# ----------------------------------------------------------------------------------- periods that end before they start


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2026-03-20T00:00:00Z", "2026-03-15T23:59:59Z"),  # (both after now: read as "not started", served uncounted)
        ("2026-03-10T00:00:00Z", "2026-03-01T23:59:59Z"),
        ("2026-03-10T12:00:00Z", "2026-03-10T11:59:59Z"),  # (zero length: to_datetime + 1 s == from_datetime)
    ],
    ids=["in-the-future", "around-now", "zero-length"],
)
async def test_a_period_that_ends_before_it_starts_follows_the_fail_policy_said_once(
    clock: Clock, start: str, end: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``to_datetime`` before ``from_datetime``: no billing period. One still to come was taken as a subscription not
    started yet (every call served and not counted, the limit never applied); others as Lago's clock behind (a wrong
    diagnosis). Now the answer is unusable: LAGO_FAIL_OPEN decides (closed: 503), said once naming both bounds."""
    async with client_on(lago(clock, **period(start=start, end=end))) as client:
        gate = gate_on(client, clock, fail_open=False)
        for _ in range(3):
            made = await decisions(gate, 2)
            assert [d.status for d in made] == [503, 503]
            clock.advance(10)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "to_datetime" in r.getMessage()]
    assert len(said) == 1 and start[:10] in said[0] and end[:10] in said[0], said
    assert not [r for r in caplog.records if "clock is behind" in r.getMessage()]
    assert not tracebacks(caplog)


async def test_a_period_of_one_second_now_is_decided_on(clock: Clock) -> None:
    """``from_datetime`` == ``to_datetime`` (a subscription begun in the period's last second): a period of one second,
    not an inverted one; decided on (allowed, reset in 1 s), not refused."""
    at = clock.now().isoformat().replace("+00:00", "Z")
    async with client_on(lago(clock, **period(start=at, end=at))) as client:
        gate = gate_on(client, clock, fail_open=False)
        made = await decisions(gate, 1)
    assert made[0].allowed and header(made[0], b"ratelimit-reset") == 1


# ------------------------------------------------------------------------------------------- counts and limits


@pytest.mark.parametrize(
    "count", ["1e5000", "1e1000000", "1e400", 2**70], ids=["5000-digits", "million", "400", "2**70"]
)
async def test_an_events_count_past_2_53_is_taken_as_2_53(
    clock: Clock, count: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``events_count`` too large for any Lago: the org is over its limit (429), its usage said as 2**53 - 1. As
    read, a count of 5,001 digits failed every blocked request (Python prints no int past 4,300 digits), and one of a
    million digits took seconds of the event loop to read, at each refresh."""
    async with client_on(lago(clock, usage=each_charge(events_count=count))) as client:
        gate = gate_on(client, clock)
        made = await decisions(gate, 2)
    assert [d.allowed for d in made] == [False, False]
    assert made[0].problem is not None and made[0].problem["usage"] == LARGEST
    assert header(made[0], b"ratelimit-remaining") == 0
    assert not tracebacks(caplog)


async def test_token_units_past_2_53_are_taken_as_2_53(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """The token metric's ``units`` of 5,001 digits: over the token limit (429), not a crash of each blocked request."""
    async with client_on(lago(clock, calls=None, tokens=100, usage=each_charge(units="1e5000"))) as client:
        gate = gate_on(client, clock)
        made = await decisions(gate, 2)
    assert [d.status for d in made] == [429, 429]
    assert made[0].problem is not None and made[0].problem["usage"] == LARGEST
    assert not tracebacks(caplog)


@needs_redis
@pytest.mark.parametrize("count", [2**70, "1e400"], ids=["2**70", "1e400"])
async def test_a_count_past_2_63_reads_back_from_redis_as_itself(clock: Clock, redis_url: str, count: Any) -> None:
    """With Redis, a count past 2**63 came back from the Lua script as -2**63 (Redis's integer of a double it cannot
    hold): the 429 said 9223372036854775811 calls remaining and a negative usage."""
    async with client_on(lago(clock, usage=each_charge(events_count=count))) as client:
        config = QuotaConfig(redis_prefix=f"test:{uuid.uuid4().hex[:8]}:")
        gate = gate_on(client, clock, config, redis_url=redis_url)
        made = await decisions(gate, 2)
    assert [d.status for d in made] == [429, 429]
    assert header(made[0], b"ratelimit-remaining") == 0
    assert made[0].problem is not None and made[0].problem["usage"] == LARGEST
    assert redis_stats(gate) == {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0}


@pytest.mark.parametrize("value", ["1e5000", 10**400, 2**70], ids=["5000-digits", "400-digits", "2**70"])
async def test_a_privilege_past_2_53_is_a_limit_of_2_53(
    clock: Clock, value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A privilege of thousands of digits: as good as no limit, but its ``RateLimit-Limit`` header could not be printed
    and every request of the org failed. Taken as 2**53 - 1 (printable, exact in Redis's numbers)."""
    async with client_on(lago(clock, subscription=privilege(value))) as client:
        gate = gate_on(client, clock)
        made = await decisions(gate, 2)
    assert all(d.allowed for d in made)
    assert header(made[0], b"ratelimit-limit") == LARGEST
    assert header(made[1], b"ratelimit-remaining") == LARGEST - 2
    assert (await gate.get_org_plan_limits("org_1"))["max_api_calls"] == LARGEST
    assert not tracebacks(caplog)


async def test_lago_plan_limits_past_2_53_are_limits_of_2_53(clock: Clock) -> None:
    """``LAGO_PLAN_LIMITS`` of 2**70 (accepted: a whole number) is held to 2**53 - 1, as Lago's privileges are: a
    count Lago reports past that is then over the limit, as it would be past 2**70."""
    limits = {"starter": {"max_api_calls": 2**70}}
    async with client_on(lago(clock, subscription=lambda sub: sub.update(entitlements=[]))) as client:
        gate = gate_on(client, clock, plan_limits=limits)
        made = await decisions(gate, 1)
    assert made[0].allowed and header(made[0], b"ratelimit-limit") == LARGEST


@pytest.mark.parametrize(
    ("value", "shown"),
    [(-1, "-1"), ("lots", "'lots'"), (True, "True"), ("1e400x", "'1e400x'")],
    ids=["negative", "word", "boolean", "garbled"],
)
async def test_a_privilege_that_is_no_whole_number_is_said_once_not_at_every_plan_read(
    clock: Clock, value: Any, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A privilege value that is no limit is ignored (the org unlimited unless LAGO_PLAN_LIMITS has its plan), said
    once: it was said at every read of every org's plan (each org every LAGO_QUOTA_PLAN_TTL), and a boolean not at
    all."""
    _limits._ignored_said.clear()  # (said once per process: not already by another test of this run)
    async with client_on(lago(clock, subscription=privilege(value))) as client:
        gate = gate_on(client, clock, config=QuotaConfig(plan_ttl=60))
        for _ in range(3):
            made = await decisions(gate, 1)
            assert made[0].allowed and not made[0].headers
            for event in list(gate._refreshing.values()):  # (a due snapshot's refresh, in the background)
                await event.wait()
            clock.advance(120)  # (past the plan TTL and the cache TTL: the plan read again)
    said = [
        r.getMessage() for r in caplog.records if "max_api_calls" in r.getMessage() and r.levelno == logging.WARNING
    ]
    assert len(said) == 1 and shown in said[0], said


# ------------------------------------------------------------------------------------------------------- settings


@needs_redis
async def test_a_usage_cache_ttl_longer_than_redis_can_expire_keeps_the_fleets_count(
    clock: Clock, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``LAGO_USAGE_CACHE_TTL=1e18`` (accepted: finite, positive): the refresh lock's ``SET ... PX`` was out of Redis's
    range, each lock an error, and every worker fell back to counting alone (limits per process, not per fleet) with
    an outage said. No TTL beyond a year means more than a year (a snapshot is read again at its period's end): held to
    that, the fleet shares one count."""
    async with client_on(lago(clock)) as client:
        prefix = f"test:{uuid.uuid4().hex[:8]}:"
        gates = [gate_on(client, clock, QuotaConfig(redis_prefix=prefix), redis_url=redis_url, usage_cache_ttl=1e18)]
        gates.append(
            gate_on(client, clock, QuotaConfig(redis_prefix=prefix), redis_url=redis_url, usage_cache_ttl=1e18)
        )
        allowed = [(await gates[n % 2].check("org_1")).allowed for n in range(5)]
    assert allowed == [True, True, True, False, False]
    assert all(redis_stats(gate) == {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0} for gate in gates)
    assert not [r for r in caplog.records if "Redis" in r.getMessage() and r.levelno >= logging.WARNING]


async def test_a_settle_lag_longer_than_the_period_never_asks_a_client_past_the_periods_end(clock: Clock) -> None:
    """``LAGO_QUOTA_SETTLE_LAG=1e9`` (accepted): a block that holds only with calls Lago may have counted already asked
    the client back in settle_lag + 1 s (31 years; 301 digits at 1e300), past the period's end and its RateLimit-Reset.
    Held to the period's end, when the quota resets anyway."""
    async with client_on(lago(clock)) as client:
        gate = gate_on(client, clock, QuotaConfig(settle_lag=1e9))
        await decisions(gate, 3)  # (recorded here, not delivered to Lago: unsure to a read within settle_lag)
        clock.advance(31)
        await gate.check("org_1")  # (due: refreshed; blocked or not, not settled)
        for event in list(gate._refreshing.values()):
            await event.wait()
        blocked = await gate.check("org_1")
    assert blocked.status == 429
    assert 0 < header(blocked, b"retry-after") <= header(blocked, b"ratelimit-reset")
    assert blocked.problem is not None and blocked.problem["retry_after"] == header(blocked, b"retry-after")


@pytest.mark.parametrize("raw", ["inf", "nan", "1e400", "-1"])
@pytest.mark.parametrize("name", ["LAGO_QUOTA_PLAN_TTL", "LAGO_QUOTA_COLD_TIMEOUT", "LAGO_QUOTA_SETTLE_LAG"])
async def test_quota_durations_that_are_no_number_of_seconds_are_refused_at_startup(name: str, raw: str) -> None:
    """Verified: non-finite and negative quota durations are a ConfigurationError naming the variable (0 is allowed:
    no wait, a plan read at every refresh)."""
    with pytest.raises(ConfigurationError) as refused:
        QuotaConfig.from_env({name: raw})
    assert refused.value.variable == name and raw in str(refused.value)
    QuotaConfig.from_env({name: "0"})


async def test_the_period_end_named_in_a_problem_is_lagos_own_to_datetime() -> None:
    """Year 10000 is one second past the calendar: named as 9999-12-31T23:59:59Z, Lago's to_datetime."""
    end = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp() + 1
    assert _limits._iso(end) == "9999-12-31T23:59:59Z"
    assert _limits._iso(-62135647200.0) == "0001-01-01T00:00:00Z"
