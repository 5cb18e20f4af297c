"""Quota gating: per-org limits read from Lago, cached usage snapshots, exact counting across workers.

Where limits come from
----------------------
``GET /subscriptions/{external_id}`` (status, plan code, customer, **entitlements**: plan values with this
subscription's overrides already applied in ``value``). The privileges of the feature ``api_quota``
(``QuotaConfig.feature_code``) become limits:

=================  ============================================================================
``max_api_calls``  calls in the billing period: ``events_count`` of the ``LAGO_EVENT_CODE`` metric
``max_tokens``     tokens in the billing period: ``units`` of the token metric (by default the same
                   metric, which must then be a ``sum_agg`` over ``total_tokens``)
=================  ============================================================================

A privilege without a value means "no limit". Limits missing from the entitlements come from the plan-code
table ``LAGO_PLAN_LIMITS`` (same names); entitlements win. A Lago serving no entitlements (older than them, or
premium-only there: ``404``/``403 feature_unavailable``) leaves the table alone, said once (and once per plan missing
from it: unlimited). An org with no active subscription is answered
402 (``QuotaConfig.no_subscription``). Limits apply per billing period: ``from_datetime``/``to_datetime`` of
``current_usage`` (``to_datetime`` + 1 s is the reset time given to clients; when Lago gives no period at all, the
calendar one of the plan's interval in UTC, or for an anniversary subscription the one repeating from its
``subscription_at`` day).

Cached, never on the hot path
-----------------------------
Per org, a :class:`Snapshot` (subscription + ``current_usage(apply_taxes=false, billable_metric_code=...)``)
is cached; after ``LAGO_USAGE_CACHE_TTL`` (minus up to ``jitter``) the next request triggers a background
refresh (stale-while-revalidate; one refresh in flight per org per process, and with Redis one per fleet per
TTL through a ``SET NX PX`` lock). The subscription part is re-read every ``plan_ttl`` seconds (default 300;
:meth:`QuotaGate.invalidate` drops it at once, e.g. from a ``subscription.updated`` webhook; one of a usage webhook,
``alert.triggered``, only marks the snapshot due). A worker waiting for another one's read of the org (the fleet's
lock) reads it itself once the lock is free again with no snapshot come (an invalidation frees it). A cold org waits
at most ``cold_timeout`` (2 s) for its first snapshot; after that ``LAGO_FAIL_OPEN`` applies (counted in
``stats["fail_open"]``/``stats["fail_closed"]``, logged once per outage). A stale snapshot keeps serving while
Lago is unreachable, until its billing period ends.

Billing-period rollover
-----------------------
With calendar billing (Lago's default) every org's period ends at 00:00 on the 1st in its customer's time zone: every
cached snapshot of those customers ends at the same instant. A snapshot whose period is over, of a subscription known to
go on (no ``ending_at`` at or before the period end, no pending downgrade switching there: ``next_plan_code``), is
rolled over by the backend at the first request past the end within an hour of it (``reserve``, only reached when
``now >= period_end``; later, the new period's usage is what Lago counted meanwhile, not 0): a *provisional* snapshot of
the next period decides at once (usage base 0, what Lago has at a period start, plus what this deployment recorded since
the boundary; limits and plan unchanged; ``period_start`` = the old ``period_end``, ``period_end`` estimated from the
plan's ``interval``, else from the old period's length, for ``RateLimit-Reset``), and it is due at once: a normal, paced
refresh (``refresh_rate``, not a cold one) replaces it with Lago's. A read of the period that ended (begun before the
boundary, or Lago's clock behind) never replaces it. Other snapshots whose period is over count as missing (the cold
path above).

Counting (never under-count)
----------------------------
Usage = snapshot base (what Lago had counted) + what this deployment recorded that the snapshot may miss.
Local records are kept in 1-second buckets by the time they were recorded:

* ``check`` reserves one call as *in flight* (bucket of the check time);
* ``settle`` turns it into a *recorded* call at the time the event is handed to the delivery pipeline (or
  releases it when the request is not billed) and adds the response's tokens;
* a snapshot requested at time ``T`` drops the recorded buckets older than ``T - settle_lag``: those events
  had ``settle_lag`` seconds (default 5) to go through the delivery queue (flush interval 0.2 s) and Lago's
  asynchronous processing. In-flight reservations are never dropped by snapshots (a long LLM stream keeps its
  call counted until it settles), only after ``inflight_horizon`` (1 h) in case their worker died.

A snapshot of a period begun within the one counted so far (an upgrade, a subscription terminated and made again, a
downgrade switched after the boundary) keeps the records made since it began (in flight included: their settles are
taken), which Lago may not have counted yet; those before it are the old subscription's. One of the period after the
counted one (read at its start, before a request rolled it over) keeps none: the calls checked before its start are
billed in the period that ended. Calls let through before any snapshot (``LAGO_FAIL_OPEN``) are the first snapshot's
period's, but for those checked before it began. A request's tokens, settled once its event is built (after its
call), go with its call: by the second the event is dated, not counted in a period begun after it (their event is
billed in the one before). Calls made before the snapshot's period starts (a subscription whose
``started_at`` is later the same day: Lago ignores the events dated before it) are served and not counted
(:data:`NOT_STARTED`), nor is usage recorded before it (or dated before it); its limits hold from its start.

The price is a slight over-count right after each refresh, at most the calls recorded in the last
``settle_lag`` seconds before it (which Lago may already have counted); it is never an under-count as long as
events reach Lago within ``settle_lag``. Events recorded elsewhere (other services) are seen at the next refresh.
The backend storing a snapshot notes how much of what it keeps is such an unsure record (``unsure_calls``,
``unsure_tokens``). A block that holds only with them is answered with a ``Retry-After`` of the seconds until a read
would trust them to Lago (not the period's end), and a request blocked past that point has the org read again (once
per snapshot, fleet-wide with Redis) and is decided on the new read: near its limit, an org is not refused below it
for a TTL.

Exact across workers and replicas
---------------------------------
In process (default): counters and snapshots live in an LRU cache (``cachetools``). With ``LAGO_REDIS_URL``
(:mod:`._quota_redis`) they live in Redis: one Lua script reads the snapshot and the counters, compares with the
limits and reserves in one round trip, so N workers or pods share one count and one snapshot per org. Lago is
asked for each org's usage at most once per TTL for the whole fleet: at 10,000 active orgs and the default 30 s
TTL that is ~333 ``current_usage`` calls/s, over Lago Cloud's 200/s per organization: use a TTL >= 60 s
(~167/s) there; the subscription part costs ``active_orgs / plan_ttl`` = 33/s at 300 s, within the 50/s of
other endpoints. Idle orgs cost nothing (refreshes are triggered by traffic). Bursts are bounded: at most
``max_concurrent_refreshes`` refreshes per process at once (cold orgs first, but every 4th slot freed goes to a
due snapshot's refresh when both wait: made-up org ids cannot starve real orgs), due snapshots refreshed at
``refresh_rate`` per second (``plan_refresh_rate`` for those re-reading the subscription) while they keep serving,
every refresh paused after a 429 until Lago's reset, and first snapshots due after a random half to whole TTL (orgs
first seen together would otherwise refresh together ever after). A refresh that fails hands the fleet's Redis lock
back after ``failure_backoff``, and folds the org's per-second records so that they stay bounded however long Lago
is down. Redis down: each process falls
back to local counting from the last usage it saw (``stats["redis_fallback"]`` is 1 meanwhile; limits then hold
per process, not per fleet) and tries Redis again every ``redis_retry_interval`` seconds.

Modules
-------
This one holds the gate (:class:`QuotaGate`: a check before the app, a settle after it, refreshes in the background),
:class:`QuotaConfig`, the :class:`QuotaBackend` protocol, the ``RateLimit-*`` headers and the seed's helpers
(:func:`check_org_has_active_subscription`, :func:`get_org_plan_limits`, :func:`enforce_usage_limits`). Beside it:

* :mod:`._snapshots`: what the gate and its backends share: ``Snapshot``, a reservation's ``Outcome`` and its codes,
  ``Mode``, ``decide``, ``CLOCK_STEP``;
* :mod:`._periods`: billing-period arithmetic: period keys, the next period's end, the rollover's provisional snapshot;
* :mod:`._limits`: reading Lago's answers: limits from entitlements, usage totals, times;
* :mod:`._quota_local`: the in-process backend (``LocalBackend``), and :mod:`._quota_redis` the fleet's, in Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import random
import sys
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import anyio
import anyio.abc
from cachetools import LRUCache

from . import _checks as checks
from ._client import JSON, LagoClient
from ._errors import (
    ConfigurationError,
    InvalidIdentifierError,
    LagoAPIError,
    LagoIntegrationError,
    LagoNotFoundError,
    LagoRateLimitError,
    LagoUnavailableError,
    _bare,
    no_such_route,
)
from ._gate import QuotaDecision
from ._identity import billing_scope, get_current_org
from ._ids import ascii_digits
from ._limits import (
    _LARGEST,
    _iso,
    _timestamp,
    _Unreadable,
    charges_metric,
    limits_from_entitlements,
    subscription_entitlements,
    usage_totals,
)
from ._periods import (
    _BEFORE_START,
    CALENDAR_ANCHOR,
    _calendar_period,
    before_period,
    next_period_end,
    period_key,
    provisional,
    rolls_over,
)
from ._settings import (
    BillingSettings,
    _bool,
    _check_raw,
    _read_env_file,
    _seconds,
    _secret_file,
    check_setting_names,
    env_file_of,
)
from ._snapshots import (
    ALLOWED,
    BLOCKED,
    CALLS,
    CLOCK_STEP,
    COUNTED,
    MISSING,
    NO_SUBSCRIPTION,
    TOKENS,
    UNAVAILABLE,
    Mode,
    Outcome,
    Snapshot,
    decide,
)

if sys.version_info >= (3, 11):  # (as _settings: typing.get_type_hints of from_env at run time too)
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "PROBLEM_NO_SUBSCRIPTION",
    "PROBLEM_QUOTA_EXCEEDED",
    "PROBLEM_UNAVAILABLE",
    "QuotaBackend",
    "QuotaConfig",
    "QuotaConfigFields",
    "QuotaGate",
    "check_org_has_active_subscription",
    "enforce_usage_limits",
    "get_current_org",
    "get_org_plan_limits",
]

logger = logging.getLogger("lago_org_billing.quota")

PROBLEM_QUOTA_EXCEEDED = "urn:lago-org-billing:problem:quota-exceeded"
PROBLEM_NO_SUBSCRIPTION = "urn:lago-org-billing:problem:no-active-subscription"
PROBLEM_UNAVAILABLE = "urn:lago-org-billing:problem:quota-unavailable"

#: The subscription statuses Lago documents besides ``active``: an org whose subscription has one has no active one.
_NOT_ACTIVE = frozenset({"pending", "terminated", "canceled", "incomplete"})

#: Webhook types about an org's usage, its subscription unchanged (Lago counted past a threshold): the org's snapshot
#: is marked due (refreshed at its next request, and serving meanwhile, while Lago's API is down too), not dropped.
USAGE_WEBHOOK_TYPES = frozenset({"alert.triggered", "subscription.usage_threshold_reached"})


# ------------------------------------------------------------------------------------------- config


def _env_float(environ: Mapping[str, str], name: str, default: float, *, duration: bool = False) -> float:
    """A number >= 0; with ``duration``, seconds also written with their unit as ``LAGO_API_TIMEOUT`` is (``10s``,
    ``500ms``, ``5m``)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if duration:
        value = _seconds(name, raw)
    else:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{name} must be a number, got {raw!r}.", variable=name) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"{name} must be a number >= 0, got {raw!r}.", variable=name)
    return value


def _env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip()
    return _bool(name, raw) if raw else default  # (the spellings BillingSettings reads)


#: The variables :meth:`QuotaConfig.from_env` reads (checked for quotes and, in ``.env``, inline comments).
_QUOTA_VARIABLES = (
    "LAGO_QUOTA_STATUS",
    "LAGO_QUOTA_NO_SUBSCRIPTION",
    "LAGO_QUOTA_NO_SUBSCRIPTION_STATUS",
    "LAGO_QUOTA_COLD_TIMEOUT",
    "LAGO_QUOTA_HEADERS",
    "LAGO_QUOTA_SETTLE_LAG",
    "LAGO_QUOTA_PLAN_TTL",
    "LAGO_QUOTA_REDIS_RETRY",
    "LAGO_QUOTA_REFRESH_RATE",
    "LAGO_QUOTA_PLAN_REFRESH_RATE",
    "LAGO_QUOTA_REFRESH_CONCURRENCY",
    "LAGO_QUOTA_FEATURE",
    "LAGO_QUOTA_CALLS_PRIVILEGE",
    "LAGO_QUOTA_TOKENS_PRIVILEGE",
    "LAGO_QUOTA_TOKEN_METRIC",
    "LAGO_QUOTA_REDIS_PREFIX",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuotaConfig:
    """Quota settings beyond :class:`BillingSettings` (``QuotaConfig.from_env()`` reads ``LAGO_QUOTA_*``)."""

    #: ``LAGO_QUOTA_STATUS``: status of an over-quota answer, 429 or 402.
    over_quota_status: int = 429
    #: ``LAGO_QUOTA_NO_SUBSCRIPTION``: ``block`` (answer ``no_subscription_status``) or ``allow``.
    no_subscription: Literal["block", "allow"] = "block"
    #: ``LAGO_QUOTA_NO_SUBSCRIPTION_STATUS``: 402 (default) or 403.
    no_subscription_status: int = 402
    #: Status when Lago cannot be asked about a cold org and ``LAGO_FAIL_OPEN=false``.
    unavailable_status: int = 503
    #: ``LAGO_QUOTA_COLD_TIMEOUT``: seconds a request of a cold org waits for its first snapshot.
    cold_timeout: float = 2.0
    #: ``LAGO_QUOTA_HEADERS``: add ``RateLimit-*`` headers to allowed responses too.
    headers: bool = True
    #: ``LAGO_QUOTA_FEATURE``: the Lago feature whose privileges are limits.
    feature_code: str = "api_quota"
    #: ``LAGO_QUOTA_CALLS_PRIVILEGE``: privilege (and plan-table key) limiting calls per period.
    calls_privilege: str = "max_api_calls"
    #: ``LAGO_QUOTA_TOKENS_PRIVILEGE``: privilege (and plan-table key) limiting tokens per period.
    tokens_privilege: str = "max_tokens"
    #: ``LAGO_QUOTA_TOKEN_METRIC``: billable metric summing ``total_tokens`` (default: ``LAGO_EVENT_CODE``).
    token_metric: str | None = None
    #: ``LAGO_QUOTA_SETTLE_LAG``: seconds an event may take to be counted by Lago after it is recorded.
    settle_lag: float = 5.0
    #: ``LAGO_QUOTA_PLAN_TTL``: seconds the subscription part of a snapshot (plan, limits) is trusted.
    plan_ttl: float = 300.0
    #: Refreshes start up to this fraction of the TTL early, at random (spreads the fleet's refreshes).
    jitter: float = 0.1
    #: Seconds between refresh attempts of one org while Lago fails (per process).
    failure_backoff: float = 5.0
    #: ``LAGO_QUOTA_REFRESH_CONCURRENCY``: snapshot refreshes running at once per process (the others queue, those
    #: of cold orgs first, every 4th freed slot to a due one when both wait): keeps a burst of new orgs from flooding
    #: Lago and the client's connection pool.
    max_concurrent_refreshes: int = 16
    #: ``LAGO_QUOTA_REFRESH_RATE``: refreshes of due (stale) snapshots started per second per process, at most (0: no
    #: limit). One reads the org's current usage; a snapshot keeps serving until its turn comes. Cold orgs (a
    #: request waiting) are not paced, only bounded by ``max_concurrent_refreshes``.
    refresh_rate: float = 100.0
    #: ``LAGO_QUOTA_PLAN_REFRESH_RATE``: of those, refreshes that also read the subscription (``plan_ttl`` passed,
    #: or ``invalidate_all()`` after a ``plan.updated`` webhook) per second per process (Lago Cloud allows 50/s).
    plan_refresh_rate: float = 40.0
    #: Orgs whose state is kept in process (LRU).
    max_orgs: int = 100_000
    #: Seconds after which an unsettled reservation is forgotten (its worker died).
    inflight_horizon: float = 3600.0
    #: ``LAGO_QUOTA_REDIS_PREFIX``: prefix of the Redis keys.
    redis_prefix: str = "lago_org_billing:quota:"
    #: Seconds a Redis command may take before Redis counts as down.
    redis_timeout: float = 2.0
    #: Connections per process to Redis (more concurrent checks wait for one, up to ``redis_pool_timeout``).
    redis_max_connections: int = 128
    #: Seconds a check may wait for a free Redis connection before Redis counts as down.
    redis_pool_timeout: float = 10.0
    #: ``LAGO_QUOTA_REDIS_RETRY``: seconds between reconnection attempts while Redis is down.
    redis_retry_interval: float = 5.0

    def __post_init__(self) -> None:
        _check_config_types(self)
        opening = self.redis_prefix.find("{")
        if opening >= 0 and self.redis_prefix.find("}", opening + 1) == opening + 1:
            raise ConfigurationError(
                f"LAGO_QUOTA_REDIS_PREFIX must not hold an empty {{}}, got {self.redis_prefix!r}: Redis Cluster then "
                "hashes each whole key, and an org's keys land in several hash slots (every check of it a CROSSSLOT "
                "error). Use e.g. 'myapp:quota:'.",
                variable="LAGO_QUOTA_REDIS_PREFIX",
            )
        if self.calls_privilege == self.tokens_privilege:
            raise ConfigurationError(
                f"LAGO_QUOTA_CALLS_PRIVILEGE and LAGO_QUOTA_TOKENS_PRIVILEGE both name {self.calls_privilege!r}: one "
                "limit would cap both the calls and the tokens (300 calls a period refusing an org at 300 tokens). "
                "Name two privileges (the defaults: 'max_api_calls' and 'max_tokens').",
                variable="LAGO_QUOTA_TOKENS_PRIVILEGE",
            )
        if self.over_quota_status not in (402, 429):
            raise ConfigurationError(
                f"LAGO_QUOTA_STATUS must be 429 or 402, got {self.over_quota_status!r}.", variable="LAGO_QUOTA_STATUS"
            )
        if self.no_subscription not in ("block", "allow"):
            raise ConfigurationError(
                f"LAGO_QUOTA_NO_SUBSCRIPTION must be 'block' or 'allow', got {self.no_subscription!r}.",
                variable="LAGO_QUOTA_NO_SUBSCRIPTION",
            )
        if self.no_subscription_status not in (402, 403):
            raise ConfigurationError(
                f"LAGO_QUOTA_NO_SUBSCRIPTION_STATUS must be 402 or 403, got {self.no_subscription_status!r}.",
                variable="LAGO_QUOTA_NO_SUBSCRIPTION_STATUS",
            )
        if not 0 <= self.jitter < 1:
            raise ConfigurationError(f"QuotaConfig.jitter must be in [0, 1), got {self.jitter!r}.")
        for name, rate in (
            ("LAGO_QUOTA_REFRESH_RATE", self.refresh_rate),
            ("LAGO_QUOTA_PLAN_REFRESH_RATE", self.plan_refresh_rate),
        ):
            if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
                raise ConfigurationError(f"{name} must be a number >= 0 (0: no limit), got {rate!r}.", variable=name)
        if not isinstance(self.max_concurrent_refreshes, int) or self.max_concurrent_refreshes < 1:
            raise ConfigurationError(
                f"LAGO_QUOTA_REFRESH_CONCURRENCY must be a whole number >= 1, got {self.max_concurrent_refreshes!r}.",
                variable="LAGO_QUOTA_REFRESH_CONCURRENCY",
            )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = ".env",
        **overrides: Unpack[QuotaConfigFields],
    ) -> QuotaConfig:
        """Read the ``LAGO_QUOTA_*`` variables from ``environ`` (default: ``env_file``, skipped when absent, overlaid
        by the process environment, as :meth:`BillingSettings.from_env` does); unset ones keep their defaults;
        ``overrides`` win. The gate a middleware makes reads the file its ``BillingSettings.from_env()`` read."""
        try:
            return cls._from_env(environ, env_file, overrides)
        except ConfigurationError as exc:
            failure = exc
        # (raised bare, as BillingSettings.from_env raises its errors: the frames it went through held the whole
        # environment as locals, the API key, the webhook key and Redis passwords included)
        del environ, overrides
        raise _bare(failure)

    @classmethod
    def _from_env(
        cls, environ: Mapping[str, str] | None, env_file: str | os.PathLike[str] | None, overrides: Mapping[str, Any]
    ) -> QuotaConfig:
        check_setting_names("QuotaConfig", overrides, _QUOTA_FIELD_NAMES)
        file_values: dict[str, str] = {}
        if environ is None:
            # (read as BillingSettings.from_env reads it: as python-dotenv does, ``export`` lines included)
            file_values = _read_env_file(env_file) if env_file is not None and os.path.isfile(env_file) else {}
            source: Mapping[str, str] = os.environ
            env: dict[str, str] = {**file_values, **os.environ}
        else:
            source, env = environ, dict(environ)
        secrets: set[str] = set()
        for name in _QUOTA_VARIABLES:
            # ``<name>_FILE``: the value read from the file it names, as BillingSettings.from_env reads every variable
            secret = _secret_file(name, source, file_values, env_file)
            if secret is not None:
                env[name] = secret
                secrets.add(name)
            raw = env.get(name)
            if raw is not None and name not in secrets:
                _check_raw(name, raw, str(env_file) if name in file_values and name not in source else None)
        values: dict[str, Any] = {}
        status = env.get("LAGO_QUOTA_STATUS", "").strip()
        if status:
            if not ascii_digits(status):
                raise ConfigurationError(
                    f"LAGO_QUOTA_STATUS must be 429 or 402, got {status!r}.", variable="LAGO_QUOTA_STATUS"
                )
            values["over_quota_status"] = int(status)
        no_sub = env.get("LAGO_QUOTA_NO_SUBSCRIPTION", "").strip().lower()
        if no_sub:
            values["no_subscription"] = no_sub
        no_sub_status = env.get("LAGO_QUOTA_NO_SUBSCRIPTION_STATUS", "").strip()
        if no_sub_status:
            if not ascii_digits(no_sub_status):
                raise ConfigurationError(
                    f"LAGO_QUOTA_NO_SUBSCRIPTION_STATUS must be 402 or 403, got {no_sub_status!r}.",
                    variable="LAGO_QUOTA_NO_SUBSCRIPTION_STATUS",
                )
            values["no_subscription_status"] = int(no_sub_status)
        values["cold_timeout"] = _env_float(env, "LAGO_QUOTA_COLD_TIMEOUT", cls.cold_timeout, duration=True)
        values["headers"] = _env_bool(env, "LAGO_QUOTA_HEADERS", cls.headers)
        values["settle_lag"] = _env_float(env, "LAGO_QUOTA_SETTLE_LAG", cls.settle_lag, duration=True)
        values["plan_ttl"] = _env_float(env, "LAGO_QUOTA_PLAN_TTL", cls.plan_ttl, duration=True)
        values["redis_retry_interval"] = _env_float(
            env, "LAGO_QUOTA_REDIS_RETRY", cls.redis_retry_interval, duration=True
        )
        values["refresh_rate"] = _env_float(env, "LAGO_QUOTA_REFRESH_RATE", cls.refresh_rate)
        values["plan_refresh_rate"] = _env_float(env, "LAGO_QUOTA_PLAN_REFRESH_RATE", cls.plan_refresh_rate)
        concurrency = env.get("LAGO_QUOTA_REFRESH_CONCURRENCY", "").strip()
        if concurrency:
            if not ascii_digits(concurrency):
                raise ConfigurationError(
                    f"LAGO_QUOTA_REFRESH_CONCURRENCY must be a whole number >= 1, got {concurrency!r}.",
                    variable="LAGO_QUOTA_REFRESH_CONCURRENCY",
                )
            values["max_concurrent_refreshes"] = int(concurrency)
        for name, field in (
            ("LAGO_QUOTA_FEATURE", "feature_code"),
            ("LAGO_QUOTA_CALLS_PRIVILEGE", "calls_privilege"),
            ("LAGO_QUOTA_TOKENS_PRIVILEGE", "tokens_privilege"),
            ("LAGO_QUOTA_TOKEN_METRIC", "token_metric"),
            ("LAGO_QUOTA_REDIS_PREFIX", "redis_prefix"),
        ):
            raw = env.get(name, "").strip()
            if raw:
                values[field] = raw
        values.update(overrides)
        return cls(**values)


_QUOTA_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(QuotaConfig) if field.init)


class QuotaConfigFields(TypedDict, total=False):
    """The fields of :class:`QuotaConfig` as keywords, for the overrides of :meth:`QuotaConfig.from_env`: a type
    checker sees a misspelt one or a value of the wrong type (kept in step with the fields by the tests)."""

    over_quota_status: int
    no_subscription: Literal["block", "allow"]
    no_subscription_status: int
    unavailable_status: int
    cold_timeout: float
    headers: bool
    feature_code: str
    calls_privilege: str
    tokens_privilege: str
    token_metric: str | None
    settle_lag: float
    plan_ttl: float
    jitter: float
    failure_backoff: float
    max_concurrent_refreshes: int
    refresh_rate: float
    plan_refresh_rate: float
    max_orgs: int
    inflight_horizon: float
    redis_prefix: str
    redis_timeout: float
    redis_max_connections: int
    redis_pool_timeout: float
    redis_retry_interval: float


# ------------------------------------------------------------------------------------------ backend


class QuotaBackend(Protocol):
    """Where snapshots and counters live (in process, or Redis shared by the fleet)."""

    name: str

    async def reserve(self, org_id: str, now: float, mode: Mode, known: Snapshot | None) -> Outcome:
        """Atomically: read the snapshot and counters, compare with the limits, reserve one call if allowed
        (see :data:`Mode`). ``known`` is the caller's last copy of the snapshot
        (a backend may skip sending it back when unchanged)."""

    def settle(
        self,
        org_id: str,
        period: str,
        bucket: int | None,
        now: float,
        *,
        tokens: int,
        billed: bool,
        checked: int | None = None,
    ) -> None:
        """Non-blocking: release or record the reserved call (in flight since second ``bucket``), add tokens.
        ``checked``: with no call reserved (``bucket`` ``None``), the second the call was checked in, when known: one
        checked before the counter's period began is not of it (billed in the period before)."""

    async def load(self, org_id: str) -> Snapshot | None: ...

    async def store(self, org_id: str, snapshot: Snapshot, now: float) -> bool:
        """Save a new snapshot and drop the local records it covers. False (nothing saved) when the refresh lock
        this process took is no longer its own: the org was invalidated since (in any process), or another process
        refreshes it; what was read may predate the change."""

    async def try_lock(self, org_id: str, ttl: float, now: float) -> bool:
        """Whether this process should refresh the org now (one refresher per fleet per ``ttl``)."""

    async def wait_snapshot(self, org_id: str, timeout: float, after: float = 0.0) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout``) for another process to store a snapshot requested after ``after``."""

    async def invalidate(self, org_id: str) -> None: ...

    async def invalidate_all(self) -> None:
        """Make every org's snapshot due for a refresh, subscription part included (kept serving meanwhile)."""

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...

    async def aclose(self) -> None: ...


def _replanned(outcome: Outcome) -> bool:
    """Whether the outcome's snapshot is one :meth:`QuotaBackend.invalidate_all` marked (its plan read again at its
    next refresh: ``plan_fetched_at`` 0, which no read of Lago leaves)."""
    return outcome.snapshot is not None and not outcome.snapshot.plan_fetched_at


# ----------------------------------------------------------------------------------------- refreshes


#: The longest ``LAGO_USAGE_CACHE_TTL`` the gate keeps (seconds): a longer one means no more (no billing period is
#: longer: a snapshot is read again at its period's end), and Redis cannot hold it as a key's expiry.
_LONGEST_TTL = 366 * 86400.0

#: Fraction of the TTL (and of ``plan_ttl``) a first snapshot's next refresh may come early, at random.
_FIRST_SPREAD = 0.5
#: Refreshes of cold orgs queued at once per process, at most (and at most ``max_orgs``): enough for every org of a
#: large fleet after a deploy, while a flood of fresh org ids (a spoofable header) with Lago slow or down cannot pile
#: up refresh tasks without end, each reading Lago long after its request was answered.
_MAX_COLD_QUEUE = 10_000


#: A refresh waiting for another process's read of the org looks whether the fleet's lock is free again (the snapshot it
#: waits for dropped by an invalidation, which frees it) this many times within ``cold_timeout``.
_WAIT_PARTS = 4


class _Pace:
    """A token bucket on the gate's clock: ``rate`` per second, bursts of up to one second's worth (0: no limit)."""

    __slots__ = ("at", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = max(rate, 1.0)
        self.at: float | None = None

    def ready(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        if self.at is not None:
            self.tokens = min(max(self.rate, 1.0), self.tokens + max(now - self.at, 0.0) * self.rate)
        self.at = now
        return self.tokens >= 1.0

    def take(self) -> None:
        if self.rate > 0:
            self.tokens -= 1.0


#: While both cold and due refreshes wait, every ``_DUE_TURN``-th slot freed goes to a due one: a flood of made-up org
#: ids (a spoofable header) keeping the cold queue full while Lago is slow cannot stop real orgs' refreshes.
_DUE_TURN = 4


class _RefreshSlots:
    """At most ``size`` refreshes at once; the others wait their turn, those a request waits for (cold orgs) first,
    but every ``_DUE_TURN``-th freed slot goes to a due refresh when both wait. Plain counters and queues of events: a
    slot freed is handed to the next waiter directly."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self._cold_turns = 0  # slots handed to cold refreshes in a row while due ones waited
        self._urgent: dict[anyio.Event, None] = {}  # (insertion-ordered: first come, first served)
        self._later: dict[anyio.Event, None] = {}
        self._later_orgs: dict[str, anyio.Event] = {}  # the queued background refresh of each org (to promote it)

    async def acquire(self, org_id: str | None = None, urgent: bool = True) -> None:
        if self.busy < self.size and not self._urgent and not self._later:
            self.busy += 1
            return
        event = anyio.Event()
        if urgent:
            self._urgent[event] = None
        else:
            self._later[event] = None
            if org_id is not None:
                self._later_orgs[org_id] = event
        try:
            await event.wait()
        except BaseException:
            if event in self._urgent:  # still queued: taken out
                del self._urgent[event]
            elif event in self._later:
                del self._later[event]
            elif event.is_set():  # handed a slot as it was cancelled: passed on
                self.release()
            raise
        finally:
            if org_id is not None and self._later_orgs.get(org_id) is event:
                del self._later_orgs[org_id]

    @property
    def waiting(self) -> int:
        return len(self._urgent) + len(self._later)

    def release(self) -> None:
        urgent, later = self._urgent, self._later
        if later and (not urgent or self._cold_turns >= _DUE_TURN - 1):
            queue = later
            self._cold_turns = 0
        elif urgent:
            queue = urgent
            if later:
                self._cold_turns += 1
        else:
            self.busy -= 1
            return
        event = next(iter(queue))
        del queue[event]
        event.set()  # the slot goes to the next one (still busy)

    def promote(self, org_id: str) -> None:
        """A request now waits for this org's queued refresh: it goes with the urgent ones."""
        event = self._later_orgs.pop(org_id, None)
        if event is not None and event in self._later:
            del self._later[event]
            self._urgent[event] = None


async def _call_optional(backend: Any, name: str, *args: Any) -> None:
    """Call a backend method that custom backends may lack (added after :class:`QuotaBackend`); errors logged."""
    method = getattr(backend, name, None)
    if method is not None:
        try:
            await method(*args)
        except Exception:
            logger.exception("Quota backend %s(%r) failed", name, args[0] if args else None)


# --------------------------------------------------------------------------------------------- gate


@dataclasses.dataclass(slots=True)
class _Decision(QuotaDecision):
    """A decision plus where its reservation went (for ``settle``): the counter ``period`` and the second of the check
    (``bucket``: its reservation's). An unreserved one settles a request's tokens once its event is built (the
    middleware's ``_tokens_only``): ``bucket`` is then the second the event is dated (``None``: not known), which tells
    whether the call was checked before a period begun since (its tokens billed in the one before)."""

    period: str = ""
    bucket: int | None = None
    backend: Any = None


#: What a gate reads of Lago through its client (a stand-in for Lago, as tests make, needs only these).
_CLIENT_READS = ("get_subscription", "get_current_usage")
#: What a gate calls of its backend (:class:`QuotaBackend`; ``compact``, ``unlock``, ``handed_over`` and
#: ``mark_due`` are optional).
_BACKEND_METHODS = (
    "reserve",
    "settle",
    "load",
    "store",
    "try_lock",
    "wait_snapshot",
    "invalidate",
    "invalidate_all",
    "run",
    "aclose",
)


def _check_gate_parts(client: object, backend: object) -> None:
    """Refuse a ``QuotaGate`` client or backend that cannot work, where it was written: ``client=None`` or a URL, a
    backend named by a string (``"redis"``: it is chosen by ``LAGO_REDIS_URL``) or a class instead of an instance were
    accepted, and failed in the background, at the first refresh or request. Test doubles are accepted."""
    checks.built("QuotaGate(client)", client, what="a LagoClient (LagoClient(settings))")
    if not checks.double(client):
        missing = [read for read in _CLIENT_READS if not callable(getattr(client, read, None))]
        if missing:
            raise ConfigurationError(
                f"QuotaGate(client) must be a LagoClient (LagoClient(settings)), got {type(client).__name__}, which "
                f"lacks {', '.join(missing)}."
            )
    if backend is None or checks.double(backend):
        return
    missing = [method for method in _BACKEND_METHODS if not callable(getattr(backend, method, None))]
    if missing or isinstance(backend, type):
        if isinstance(backend, type):
            got = f"the class {backend.__name__} (build one: {backend.__name__}(...))"
        else:
            got = f"{type(backend).__name__}, which lacks {', '.join(missing)}"
        if isinstance(backend, str):
            got += " (Redis is used when BillingSettings.redis_url / LAGO_REDIS_URL is set: leave backend=None)"
        raise ConfigurationError(
            f"QuotaGate(backend=...) must be None (Redis when LAGO_REDIS_URL is set, else in process) or a "
            f"QuotaBackend such as LocalBackend(config), got {got}."
        )


_LAST: list[weakref.ref[QuotaGate]] = []  # the gate made last (scripts, tests)
_RUNNING: weakref.WeakSet[QuotaGate] = weakref.WeakSet()  # gates whose run() is going (one per app)


class QuotaGate:
    """Gate requests on each org's Lago plan limits (see the module docstring for the whole design).

    ::

        gate = QuotaGate(settings, client)       # OrgBillingMiddleware builds one by itself
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            decision = await gate.check("org_1")  # reserves one call when allowed
            ...
            gate.settle("org_1", decision, tokens=42, billed=True)

    **Parameters:**

    * **settings** - :class:`BillingSettings` (``quota_mode``, ``fail_open``, ``usage_cache_ttl``,
      ``plan_limits``, ``redis_url``, ``event_code``, ``subscription_id_template``).
    * **client** - the :class:`LagoClient` used for refreshes.
    * **backend** - *(optional)* a :class:`QuotaBackend`; default: Redis when ``redis_url`` is set (needs
      ``lago-org-billing[redis]``), else :class:`LocalBackend`.
    * **config** - *(optional)* :class:`QuotaConfig`; default ``QuotaConfig.from_env()``.
    * **clock** - wall clock in Unix seconds (tests).

    The seed's helpers are methods (and module functions using the last gate started):
    :meth:`check_org_has_active_subscription`, :meth:`get_org_plan_limits`, :meth:`enforce_usage_limits`.
    """

    def __init__(
        self,
        settings: BillingSettings,
        client: LagoClient,
        *,
        backend: QuotaBackend | None = None,
        config: QuotaConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        checks.instance("QuotaGate(settings)", settings, BillingSettings, what="a BillingSettings")
        if config is not None:
            checks.instance("QuotaGate(config=...)", config, QuotaConfig, what="a QuotaConfig")
        checks.function("QuotaGate(clock=...)", clock, what="a function returning the time in seconds (time.time)")
        _check_gate_parts(client, backend)
        self.settings = settings
        self.client = client
        self.config = config if config is not None else QuotaConfig.from_env(env_file=env_file_of(settings))
        self.clock = clock
        self.mode = settings.quota_mode
        # (held to a year: a snapshot is read again at its period's end anyway, and Redis refuses the lock of a TTL
        # past ~9e15 s: LAGO_USAGE_CACHE_TTL=1e18 had every worker count alone, Redis taken for down)
        self.ttl = min(settings.usage_cache_ttl, _LONGEST_TTL)
        self.token_metric = self.config.token_metric or settings.event_code
        _check_limit_names(settings.plan_limits, self.config)
        from ._quota_local import LocalBackend  # (here: that module, as _quota_redis, imports this one's QuotaConfig)

        self.local = LocalBackend(self.config)
        if backend is None and settings.redis_url:
            from ._quota_redis import RedisBackend

            backend = RedisBackend(settings.redis_url, self.config, fallback=self.local)
        self.backend: QuotaBackend = backend if backend is not None else self.local
        self._shared = self.backend is not self.local  # keep a copy of snapshots (Redis: sent back only on change)
        self.stats: dict[str, int] = {
            "checks": 0,
            "allowed": 0,
            "blocked": 0,
            "would_block": 0,
            "no_subscription": 0,
            "refreshes": 0,
            "refresh_errors": 0,
            "cold_waits": 0,
            "cold_timeouts": 0,
            "fail_open": 0,
            "fail_closed": 0,
        }
        self._refreshing: dict[str, anyio.Event] = {}
        self._slots = _RefreshSlots(self.config.max_concurrent_refreshes)
        self._cold_queued = 0  # refreshes of cold orgs spawned and not started yet (bounded: _MAX_COLD_QUEUE)
        self._paused_until = 0.0  # Lago answered a refresh 429: none is sent before then (on the gate's clock)
        self._usage_pace = _Pace(self.config.refresh_rate)
        self._plan_pace = _Pace(self.config.plan_refresh_rate)
        self._stale: set[str] = set()  # orgs invalidated while a refresh of theirs was in flight
        self._next_attempt: dict[str, float] = {}
        self._gave_up: dict[str, float] = {}
        # the longest a snapshot waits for its refresh, and a backoff or 429 pause lasts, on this clock (beyond: stamped
        # on a clock stepped back since)
        self._due_within = self.ttl + CLOCK_STEP
        self._longest_wait = max(self.config.failure_backoff, self.ttl, 60.0) + 1.0
        self._refresh_errors: dict[str, LagoIntegrationError] = {}  # org -> why its last refresh failed (seed helpers)
        self._known: LRUCache[str, Snapshot] = LRUCache(maxsize=self.config.max_orgs)
        self._tasks: anyio.abc.TaskGroup | None = None
        self._loose: set[asyncio.Task[None]] = set()
        self._loose_trio: dict[anyio.CancelScope, anyio.Event] = {}  # the same under trio: its scope -> set as it ends
        self._scopes: set[anyio.CancelScope] = set()  # those of run(): aclose() ends them all
        self._ended: anyio.Event | None = None  # set once run()'s work has ended (aclose() waits for it)
        self._outage_logged = False
        self._outage_logged_at = 0.0
        # A refresh's failure is said once (WARNING, then DEBUG) until a refresh works again (said at INFO): an outage
        # fails every org's. An org whose last refresh failed (-> when) is not said again when it fails again after
        # other orgs' refreshes worked (one org's usage Lago fails to compute, again and again), until its own works
        # (an org not asked again meanwhile, its traffic gone, is forgotten after _longest_wait)
        self._refresh_warned = False
        self._refresh_failing: dict[str, float] = {}
        self._config_warnings: set[tuple[str, str]] = set()
        _LAST[:] = [weakref.ref(self)]

    # ------------------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Background work: snapshot refreshes and the backend's writer. Runs until cancelled or closed. Run again
        while running (one gate given to two middlewares), it only waits (for :meth:`aclose`, or to be cancelled):
        one gate has one background."""
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self._tasks is not None:
                    task_status.started()
                    await anyio.sleep_forever()
                ended = self._ended = anyio.Event()
                try:
                    async with anyio.create_task_group() as tasks:
                        await tasks.start(self.backend.run)
                        self._tasks = tasks
                        _LAST[:] = [weakref.ref(self)]
                        _RUNNING.add(self)
                        task_status.started()
                        await anyio.sleep_forever()
                finally:
                    _RUNNING.discard(self)
                    self._tasks = None
                    self._slots = _RefreshSlots(self.config.max_concurrent_refreshes)  # (its waiters were this loop's)
                    self._cold_queued = 0
                    ended.set()
            finally:
                self._scopes.discard(scope)

    async def _loop_ended(self) -> None:
        """The event loop that ran :meth:`run` ends without :meth:`aclose` (an app served without a lifespan): what was
        settled since the backend's writer ended (the tokens of the events delivery built at its last chance, after
        this gate's work was cancelled with it) goes to the backend now, not kept for a next loop that may never come
        (see ``RedisBackend.detach``)."""
        await _call_optional(self.backend, "detach")

    def __deepcopy__(self, memo: dict[int, Any]) -> QuotaGate:
        """Itself: a scope holding the gate (the request's billing state) is deep-copied by some middlewares
        (hypercorn's ``ProxyFixMiddleware``); a gate is a process-wide service, not request data."""
        return self

    async def aclose(self) -> None:
        """Write pending settles, stop refreshes, close the backend."""
        loose = list(self._loose)
        for task in loose:
            task.cancel()
        if loose:  # ended before the backend closes: none is left holding a connection of a loop about to close
            await asyncio.gather(*loose, return_exceptions=True)
        loose_trio = list(self._loose_trio.items())
        for scope, _ in loose_trio:
            scope.cancel()
        for _, done in loose_trio:
            await done.wait()
        for event in self._refreshing.values():  # (a task cancelled before it ran left its entry)
            event.set()
        self._refreshing.clear()
        self._cold_queued = 0
        for scope in list(self._scopes):
            scope.cancel()
        # The background work ended before the backend closes: a refresh cut off hands its lock back on a connection
        # the close then drops (after it, one was made again and left open as the loop ended: ResourceWarning). And
        # this returns once that work has ended, as EventPipeline.aclose() does: the middleware closes the gate last
        # at shutdown, and its lifespan's task group, ending right after, was cut off by a server's loop ending
        # first ("Exception in 'lifespan' protocol ... CancelledError").
        if self._ended is not None:
            await self._ended.wait()
        await self.backend.aclose()

    # ------------------------------------------------------------------------------ hot path

    def check_now(self, org_id: str) -> QuotaDecision | None:
        """:meth:`check` without a coroutine, when the decision needs no I/O (in process, the org cached);
        ``None`` means: call :meth:`check` (nothing was counted)."""
        local = self.local
        if self.backend is not local:
            return None
        now = self.clock()
        # Fast path, the common case: an org cached here, in its snapshot's period, within its limits. This is
        # LocalBackend.reserve_now, _cached, _decision and _headers inline for that case only (the same counts, stats,
        # refresh and headers); anything else (no snapshot, a period over, no subscription, over a limit) takes the
        # general path below, which finds the same state (nothing was changed here but the org's LRU place, which it
        # sets again).
        orgs = local._orgs
        state = orgs.pop(org_id, None)
        if state is not None:
            orgs[org_id] = state  # (most recently used last, as LocalBackend._org does)
            snap = state.snapshot
            if snap is not None and snap.active and now < snap.period_end:
                counts = state.counts
                if state.key_of is snap:
                    key = state.key
                else:
                    key = state.key = period_key(snap)
                    state.key_of = snap
                if counts.period == key:
                    calls = snap.base_calls + counts.calls
                    tokens = snap.base_tokens + counts.tokens
                    calls_limit = snap.calls_limit
                    tokens_limit = snap.tokens_limit
                    if (calls_limit is None or calls + 1 <= calls_limit) and (
                        tokens_limit is None or tokens < tokens_limit
                    ):  # (decide(): no limit hit)
                        bucket = int(now)
                        inflight = counts.i  # (_Counts.reserve)
                        inflight[bucket] = inflight.get(bucket, 0) + 1
                        counts.calls += 1
                        calls += 1
                        stats = self.stats
                        stats["checks"] += 1
                        refresh_at = snap.refresh_at  # (_cached)
                        if refresh_at <= now or refresh_at > now + self._due_within:
                            self._refresh_due(org_id, snap, now)
                        stats["allowed"] += 1
                        return _Decision(
                            True,
                            None,
                            _allowed_headers(snap, calls, tokens, now) if self.config.headers else (),
                            None,
                            False,
                            True,
                            key,
                            bucket,
                            local,
                        )
        outcome = local.reserve_now(org_id, now, "force" if self.mode == "monitor" else "normal")
        if outcome.code == MISSING or (
            outcome.code == BLOCKED and self.mode != "monitor" and self._read_again(outcome, now)
        ):
            return None
        self.stats["checks"] += 1
        return self._cached(org_id, outcome, now)

    async def check(self, org_id: str) -> QuotaDecision:
        """Decide before the app runs; reserve one call when allowed. No Lago call once the org is cached."""
        decision = self.check_now(org_id)  # in process and cached: no I/O
        if decision is not None:
            return decision
        self.stats["checks"] += 1
        mode: Mode = "force" if self.mode == "monitor" else "normal"
        now = self.clock()
        if self.backend is not self.local:
            outcome = await self.backend.reserve(org_id, now, mode, self._known.get(org_id) if self._shared else None)
        else:
            outcome = self.local.reserve_now(org_id, now, mode)  # (missing, or blocked on plans changed since)
        if outcome.code == BLOCKED and mode == "normal" and self._read_again(outcome, now):
            outcome = await self._reread(org_id, mode, outcome)
            now = self.clock()
        if outcome.code != MISSING:
            return self._cached(org_id, outcome, now)
        outcome = await self._cold(org_id, mode)
        return self._decision(org_id, outcome, self.clock())

    async def _reread(self, org_id: str, mode: Mode, blocked: Outcome) -> Outcome:
        """A request blocked on a snapshot of plans that changed since (:meth:`invalidate_all`: a ``plan.updated``
        webhook, the limit maybe raised) waits, at most ``cold_timeout``, for the org's refresh and is decided again
        (a 429 now would tell the client to come back at the period's end: days); so does one blocked only by
        records that Lago may have counted already, once a read can tell (:meth:`_unsure_until`). If Lago does not
        answer in time, the blocked answer stands, asking the client back after ``failure_backoff``
        (:meth:`_retry_after`), and the org's next blocked requests until then are answered at once."""
        now = self.clock()
        if self._backing_off(self._gave_up.get(org_id, 0.0), now):  # a wait for its refresh went unanswered just now
            return blocked
        if org_id not in self._refreshing:
            if self._backing_off(self._next_attempt.get(org_id, 0.0), now):  # its last refresh failed moments ago
                return blocked  # (nothing asked of the backend either: a client asking again and again costs nothing)
            if not _replanned(blocked) and blocked.snapshot is not None:
                # an unsure block: the fleet's lock on a snapshot not due yet is freed for this read (Redis)
                await _call_optional(self.backend, "read_again", org_id, blocked.snapshot.version)
        event = self._schedule_refresh(org_id, now, urgent=True)
        if event is None:  # its last refresh failed moments ago
            return blocked
        self.stats["cold_waits"] += 1  # (a request waiting for Lago)
        with anyio.move_on_after(self.config.cold_timeout):
            await event.wait()
        if not event.is_set():
            self.stats["cold_timeouts"] += 1
        known = self._known.get(org_id) if self._shared else None
        outcome = await self.backend.reserve(org_id, self.clock(), mode, known)
        if outcome.code == BLOCKED and (_replanned(outcome) or not event.is_set()):
            # not read again in time (Lago slow or failing): the org's next blocked requests are answered at once
            # until failure_backoff has passed, as a cold org's are, not each held cold_timeout while Lago is slow
            self._give_up(org_id)
        return outcome

    def _unsure_until(self, outcome: Outcome) -> float | None:
        """For a block that holds only with the records Lago may have counted already (``Snapshot.unsure_calls``,
        ``unsure_tokens``: kept by the last read, and maybe counted twice), the time a read of Lago no longer keeps
        them (they are ``settle_lag`` older than it): until then the block is answered with a short ``Retry-After``,
        from then on the org is read again before the answer (:meth:`_reread`). ``None``: a sure block (what Lago
        cannot have yet is over the limit: in flight, recorded since the read), or no block."""
        snap = outcome.snapshot
        if outcome.code != BLOCKED or snap is None or not (snap.unsure_calls or snap.unsure_tokens):
            return None
        # (in monitor mode the blocked call was reserved all the same, and is in outcome.calls: not a record of before)
        reserved = 1 if self.mode == "monitor" else 0
        if decide(snap, outcome.calls - reserved - snap.unsure_calls, outcome.tokens - snap.unsure_tokens):
            return None
        return self._trusted_at(snap)

    def _trusted_at(self, snap: Snapshot) -> float:
        """When a read of Lago no longer keeps the records ``snap`` keeps as unsure (they are ``settle_lag`` older than
        it): records are kept by the second, those of the read's own second are dropped by a read ``settle_lag``
        after it."""
        return int(snap.requested_at) + 1 + self.config.settle_lag

    def _read_again(self, outcome: Outcome, now: float) -> bool:
        """Whether a blocked request has the org read again before its answer: a plan change since (``plan.updated``),
        or an unsure block whose records a read now would trust to Lago (:meth:`_unsure_until`)."""
        if _replanned(outcome):
            return True
        until = self._unsure_until(outcome)
        return until is not None and now >= until

    def _cached(self, org_id: str, outcome: Outcome, now: float) -> QuotaDecision:
        """The decision on a snapshot the backend had; a refresh is scheduled when the snapshot is due."""
        snap = outcome.snapshot
        if snap is not None:
            refresh_at = snap.refresh_at
            # (checked here: the hot path makes no call for a fresh snapshot; one due beyond a TTL was read on a
            # clock stepped back since, and is due now)
            if refresh_at <= now or refresh_at > now + self._due_within:
                self._refresh_due(org_id, snap, now)
            if self._shared and self._known.get(org_id) is not snap:
                self._known[org_id] = snap
        return self._decision(org_id, outcome, now)

    def settle(self, org_id: str, decision: QuotaDecision, *, tokens: int, billed: bool) -> None:
        """After the response: count ``tokens``; turn the reserved call into a recorded one, or release it
        when the request was not billed. Synchronous; Redis writes go through a background queue."""
        if type(decision) is _Decision or isinstance(decision, _Decision):
            reserved = decision.reserved
            if not reserved and not billed and tokens <= 0:
                return
            backend = decision.backend
            if backend is None:
                backend = self.backend
            # the second of the call's check (of its reservation, or the date of its event: see _Decision)
            checked = decision.bucket
            bucket = checked if reserved else None
            if backend is self.local and not self._shared:
                # Fast path (in process): LocalBackend.settle inline for an org still known here in the decision's
                # period (or none given); else (forgotten meanwhile, or the period changed) LocalBackend.settle
                state = self.local._orgs.get(org_id)
                if state is not None:
                    counts = state.counts
                    period = decision.period
                    if counts.period == period or (
                        # (records of no period, but when its period has not started: see LocalBackend.settle)
                        not period and counts.period != _BEFORE_START and not before_period(counts.period, checked)
                    ):
                        now_bucket = int(self.clock())
                        if bucket is not None and billed and tokens <= 0:
                            # the reserved call recorded (_Counts.settle inline): out of flight (its total unchanged),
                            # into this second's records
                            inflight = counts.i
                            left = inflight.get(bucket, 0)
                            if left > 1:
                                inflight[bucket] = left - 1
                            elif left == 1:
                                del inflight[bucket]
                            else:
                                counts.calls += 1
                            recorded = counts.c
                            recorded[now_bucket] = recorded.get(now_bucket, 0) + 1
                        else:
                            counts.settle(bucket, now_bucket, tokens, billed)
                        return
            elif self._shared and backend is self.local and bucket is not None and not self.local.holds(org_id, bucket):
                # decided here during a Redis outage, its call no longer held here: handed to Redis in flight when it
                # answered again (drain), settled there as a call reserved there is (recorded, or released: a 5xx);
                # else (forgotten here meanwhile) its record and tokens go there
                handed_over = getattr(self.backend, "handed_over", None)
                if handed_over is None or not handed_over(org_id, bucket):
                    bucket = None
                    if not billed and tokens <= 0:
                        return
                self.backend.settle(
                    org_id, decision.period, bucket, self.clock(), tokens=tokens, billed=billed, checked=checked
                )
                return
            backend.settle(org_id, decision.period, bucket, self.clock(), tokens=tokens, billed=billed, checked=checked)
        elif billed or tokens > 0:  # billed without a check (org known only after the app ran)
            self.backend.settle(org_id, "", None, self.clock(), tokens=tokens, billed=billed)

    async def invalidate(self, org_id: str, *, refresh: bool = False, webhook_type: str | None = None) -> None:
        """Forget what is cached about the org's subscription and usage (local records are kept): the next
        request waits (at most ``cold_timeout``) for fresh data. ``refresh=True`` starts fetching it now.

        ``webhook_type``: the Lago webhook that asked for it. One about the org's usage only
        (:data:`USAGE_WEBHOOK_TYPES`: ``alert.triggered``, ``subscription.usage_threshold_reached``) marks the
        org's snapshot due instead: its next request refreshes it and is decided on it meanwhile (while Lago's API is
        down too), and a backoff after a failed read of the org stays (each such webhook is no extra Lago read while
        Lago fails). Any other (``subscription.terminated``...), or none, drops it as said above: a subscription
        changed is never decided on its old snapshot."""
        if webhook_type in USAGE_WEBHOOK_TYPES:
            await self._mark_due(org_id, refresh)
            return
        self._known.pop(org_id, None)
        self._next_attempt.pop(org_id, None)
        self._gave_up.pop(org_id, None)
        if org_id in self._refreshing:  # what it is fetching may predate the change: it fetches again
            self._stale.add(org_id)
        try:
            await self.backend.invalidate(org_id)  # (Redis: raises when the fleet could not be told)
        finally:
            if self.backend is not self.local:
                await self.local.invalidate(org_id)
            if refresh:
                self._schedule_refresh(org_id, self.clock(), force=True)
            await self._not_running_here()

    async def _mark_due(self, org_id: str, refresh: bool) -> None:
        """:meth:`invalidate` of a usage webhook: the org's snapshot is due (its usage read again), kept serving."""
        self._known.pop(org_id, None)  # (the backend's copy, marked, is taken at the next check)
        if org_id in self._refreshing:  # what it is fetching may predate the threshold: it fetches again
            self._stale.add(org_id)
        mark_due = getattr(self.backend, "mark_due", None)
        try:
            if mark_due is not None:
                await mark_due(org_id)  # (Redis: raises when the fleet could not be told)
            else:  # (a backend of old: dropped)
                await self.backend.invalidate(org_id)
        finally:
            if self.backend is not self.local:
                await self.local.mark_due(org_id)
            if refresh:
                self._schedule_refresh(org_id, self.clock())
            await self._not_running_here()

    async def invalidate_all(self) -> None:
        """Plans or features changed for everyone: every cached snapshot is refreshed (subscription part
        included) at its org's next request, and keeps serving until then. Local records are kept."""
        self._known.clear()
        self._next_attempt.clear()
        self._gave_up.clear()
        self._stale.update(self._refreshing)
        try:
            await self.backend.invalidate_all()
        finally:
            if self.backend is not self.local:
                await self.local.invalidate_all()
            await self._not_running_here()

    async def _not_running_here(self) -> None:
        """After a webhook's invalidation: without this gate's work running (a webhook served in an event loop of its
        own, the gate's app not started there: a test client without ``with``), nothing drops the backend's
        connections as that loop ends, and the next loop's first Redis call failed on one: dropped now."""
        if self._tasks is None:
            await _call_optional(self.backend, "release_idle")

    # ------------------------------------------------------------------------------ decisions

    def _decision(self, org_id: str, outcome: Outcome, now: float) -> QuotaDecision:
        code = outcome.code
        snap = outcome.snapshot
        monitor = self.mode == "monitor"
        if code == ALLOWED or code == COUNTED:
            self.stats["allowed"] += 1
            headers = self._headers(org_id, snap, outcome, now, blocked=False) if self.config.headers else ()
            return _Decision(
                allowed=True,
                headers=headers,
                reserved=True,
                period=outcome.period,
                bucket=outcome.bucket,
                backend=outcome.backend,
            )
        if code == BLOCKED:
            assert snap is not None
            headers = self._headers(org_id, snap, outcome, now, blocked=True)
            problem = self._problem_quota(org_id, snap, outcome, now)
            if monitor:
                self.stats["would_block"] += 1
                return _Decision(
                    allowed=True,
                    status=self.config.over_quota_status,
                    headers=headers if self.config.headers else (),
                    problem=problem,
                    would_block=True,
                    reserved=True,
                    period=outcome.period,
                    bucket=outcome.bucket,
                    backend=outcome.backend,
                )
            self.stats["blocked"] += 1
            return _Decision(allowed=False, status=self.config.over_quota_status, headers=headers, problem=problem)
        if code == NO_SUBSCRIPTION:
            self.stats["no_subscription"] += 1
            if self.config.no_subscription == "allow":  # (said once per org at its read: see _no_subscription)
                return _Decision(allowed=True)
            status = self.config.no_subscription_status
            subscription_id = self.settings.subscription_id_for(org_id)
            problem = {
                "type": PROBLEM_NO_SUBSCRIPTION,
                "title": "No active subscription",
                "status": status,
                "detail": f"Organization {org_id!r} has no active Lago subscription "
                f"(external_id {subscription_id!r}): subscribe it to a plan.",
                "org_id": org_id,
                "external_subscription_id": subscription_id,
            }
            if monitor:
                self.stats["would_block"] += 1
                return _Decision(allowed=True, status=status, problem=problem, would_block=True)
            self.stats["blocked"] += 1
            return _Decision(allowed=False, status=status, problem=problem)
        # UNAVAILABLE: cold org, Lago unreachable, fail closed. The client is asked back once the gate asks Lago
        # again: after failure_backoff, or, Lago having answered a read 429, once every refresh's pause is over (a
        # client back after failure_backoff meanwhile was refused again, up to a minute long, without Lago being asked)
        status = self.config.unavailable_status
        retry = max(1, math.ceil(self.config.failure_backoff), math.ceil(self._reads_again_in(org_id, now)))
        self.stats["blocked"] += 1
        return _Decision(
            allowed=False,
            status=status,
            headers=((b"retry-after", str(retry).encode()),),
            problem={
                "type": PROBLEM_UNAVAILABLE,
                "title": "Quota cannot be checked",
                "status": status,
                "detail": f"The usage of organization {org_id!r} cannot be read from Lago right now and "
                "LAGO_FAIL_OPEN is false; retry later.",
                "org_id": org_id,
            },
        )

    def _headers(
        self, org_id: str, snap: Snapshot | None, outcome: Outcome, now: float, *, blocked: bool
    ) -> tuple[tuple[bytes, bytes], ...]:
        if snap is None or not snap.limited:
            return ()
        calls_limit, tokens_limit = snap.calls_limit, snap.tokens_limit
        if tokens_limit is None:
            use_tokens = False
        elif calls_limit is None or outcome.hit == TOKENS:
            use_tokens = True
        elif outcome.hit == CALLS:
            use_tokens = False
        else:  # both limits: report the one closer to exhaustion
            calls_left = max(0, calls_limit - outcome.calls)
            tokens_left = max(0, tokens_limit - outcome.tokens)
            use_tokens = _ratio(tokens_left, tokens_limit) < _ratio(calls_left, calls_limit)
        if use_tokens:
            assert tokens_limit is not None
            limit, left = tokens_limit, max(0, tokens_limit - outcome.tokens)
        else:
            assert calls_limit is not None
            limit, left = calls_limit, max(0, calls_limit - outcome.calls)
        # (a blocked client asked back at least a second on: the period may have ended during the reserve's round
        # trip, and a 0 has clients retry at once, in a loop)
        reset = b"%d" % max(1 if blocked else 0, math.ceil(snap.period_end - now))
        if blocked:
            return (
                (b"ratelimit-limit", b"%d" % limit),
                (b"ratelimit-remaining", b"%d" % left),
                (b"ratelimit-reset", reset),
                (b"retry-after", b"%d" % self._retry_after(org_id, snap, outcome, now)),
            )
        return (
            (b"ratelimit-limit", b"%d" % limit),
            (b"ratelimit-remaining", b"%d" % left),
            (b"ratelimit-reset", reset),
        )

    def _problem_quota(self, org_id: str, snap: Snapshot, outcome: Outcome, now: float) -> dict[str, Any]:
        if outcome.hit == TOKENS:
            name, limit, usage, unit = self.config.tokens_privilege, snap.tokens_limit, outcome.tokens, "tokens"
        else:
            name, limit, usage, unit = self.config.calls_privilege, snap.calls_limit, outcome.calls, "API calls"
        status = self.config.over_quota_status
        retry_after = self._retry_after(org_id, snap, outcome, now)
        detail = (
            f"Organization {org_id!r} has used {usage} of the {limit} {unit} its plan {snap.plan_code!r} allows per "
            f"billing period ({name}). The quota resets at {_iso(snap.period_end)}, or at once with a plan upgrade."
        )
        if self._unsure_until(outcome) is not None:  # (counted with calls Lago may have counted already)
            detail += f" The usage may be lower than counted here: retry in {retry_after} s, when it is known."
        return {
            "type": PROBLEM_QUOTA_EXCEEDED,
            "title": "Quota exceeded",
            "status": status,
            "detail": detail,
            "org_id": org_id,
            "limit_name": name,
            "limit": limit,
            "usage": usage,
            "plan_code": snap.plan_code,
            "period_start": _iso(snap.period_start),
            "period_end": _iso(snap.period_end),
            "retry_after": retry_after,
        }

    def _retry_after(self, org_id: str, snap: Snapshot, outcome: Outcome, now: float) -> int:
        """Seconds a blocked client is asked to wait: until the period's end, or, while the plan is to be read again
        (one :meth:`invalidate_all` marked: ``plan.updated``, and not read in time), until the gate asks Lago again:
        the new plan may allow the call, which a client told to come back in days would not learn. The same for a
        block that holds only with records Lago may have counted already (:meth:`_unsure_until`): until a read can
        tell, or, past that (the read failed or is late), after ``failure_backoff``. Neither before the gate asks Lago
        about the org again (:meth:`_reads_again_in`: a 429 of Lago's pauses every refresh), which the answer to a
        client back earlier would be decided without."""
        # never past the period's end, where the quota resets anyway (a settle_lag or failure_backoff longer than what
        # is left of the period: LAGO_QUOTA_SETTLE_LAG=1e9 asked clients back in 31 years)
        to_end = max(1, math.ceil(snap.period_end - now))  # (0 when the period ended during the round trip)
        again = math.ceil(self._reads_again_in(org_id, now))
        backoff = min(max(1, math.ceil(self.config.failure_backoff), again), to_end)
        if not snap.plan_fetched_at:
            return backoff
        until = self._unsure_until(outcome)
        if until is not None:
            if until <= now:  # (a read was due: it failed, is late, or waits its backoff)
                return backoff
            # (never more than settle_lag + 1: a read stamped later than that was made on a clock stepped back since,
            # and is read again at once, not trusted when the clock comes back there)
            return min(max(1, math.ceil(min(until - now, self.config.settle_lag + 1)), again), to_end)
        return to_end

    def _reads_again_in(self, org_id: str, now: float) -> float:
        """Seconds until a request of the org may have it read from Lago again (0: at once): not while every refresh
        of this process waits out a 429 of Lago's (``_paused_until``: up to a minute, or a TTL), nor while a wait for
        the org's read went unanswered moments ago (``_gave_up``) or its last refresh failed moments ago (none in
        flight: one is, its read may land any moment). Each as :meth:`_backing_off` reads it: bounded, not one stamped
        before the clock was stepped back."""
        wait = 0.0
        for until in (
            self._paused_until,
            self._gave_up.get(org_id, 0.0),
            0.0 if org_id in self._refreshing else self._next_attempt.get(org_id, 0.0),
        ):
            if self._backing_off(until, now) and until - now > wait:
                wait = until - now
        return wait

    # ------------------------------------------------------------------------------ cold path

    async def _cold(self, org_id: str, mode: Mode) -> Outcome:
        """No usable snapshot: wait (at most ``cold_timeout``) for one, then apply ``LAGO_FAIL_OPEN``."""
        now = self.clock()
        self._known.pop(org_id, None)
        if not self._backing_off(self._gave_up.get(org_id, 0.0), now):
            deadline = anyio.current_time() + self.config.cold_timeout
            waited = False
            pause = 0.05
            while True:
                event = self._schedule_refresh(org_id, self.clock(), urgent=True)
                if event is None:  # its last refresh failed moments ago
                    break
                if not waited:
                    self.stats["cold_waits"] += 1
                    waited = True
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await event.wait()
                outcome = await self.backend.reserve(org_id, self.clock(), mode, self._known.get(org_id))
                if outcome.code != MISSING:
                    if outcome.snapshot is not None:
                        self._known[org_id] = outcome.snapshot
                    return outcome
                if not event.is_set():
                    self.stats["cold_timeouts"] += 1
                    break
                if anyio.current_time() >= deadline:
                    break
                # the refresh ended without a snapshot: it failed (the next round stops), or the org was
                # invalidated between its end and now (a webhook): wait for the next one, within the same budget
                fresh = self._known.get(org_id)
                if fresh is not None and fresh.over(self.clock()):
                    # or Lago still reports the period that just ended here (its clock is behind this host's, at the
                    # rollover): read again after a pause (doubling), not back to back for the whole budget
                    await anyio.sleep(min(pause, max(0.0, deadline - anyio.current_time())))
                    pause *= 2
            self._give_up(org_id)
        if self.settings.fail_open or self.mode == "monitor":
            self.stats["fail_open"] += 1
            self._log_outage(org_id, "allowed (LAGO_FAIL_OPEN=true)")
            outcome = await self.backend.reserve(org_id, self.clock(), "blind", None)
            if outcome.code == BLOCKED and self.mode != "monitor":
                # a snapshot came meanwhile (another worker stored it), over a limit: the request is blocked, and
                # the call the blind reservation counted all the same is released (a block is never settled)
                backend = outcome.backend if outcome.backend is not None else self.backend
                backend.settle(org_id, outcome.period, outcome.bucket, self.clock(), tokens=0, billed=False)
                # and taken out of the usage the answer tells (its problem body's, RateLimit-Remaining, and whether
                # the block holds only with unsure records): an org at its limit of 2 was said to have used 3, and an
                # unsure block taken for a sure one was asked back at the period's end
                outcome.calls -= 1
            return outcome
        self.stats["fail_closed"] += 1
        self._log_outage(org_id, "refused (LAGO_FAIL_OPEN=false)")
        return Outcome(UNAVAILABLE)

    def _backing_off(self, until: float, now: float) -> bool:
        """Whether a backoff or pause ending at ``until`` (on this gate's clock) lasts at ``now``: not one stamped
        before the clock was stepped back (it would last as long as the step: an org refused, refreshes stopped)."""
        return now < until <= now + self._longest_wait

    def _give_up(self, org_id: str) -> None:
        """No request of the org waits for its refresh again before ``failure_backoff`` has passed."""
        if len(self._gave_up) >= self.config.max_orgs:  # bounded, however many org ids requests bring
            self._gave_up.clear()
        self._gave_up[org_id] = self.clock() + self.config.failure_backoff

    def _warn_once(self, key: tuple[str, str], message: str, *args: object) -> None:
        """A configuration problem of one org, said once (not at every refresh)."""
        if key not in self._config_warnings:
            # (bounded as the orgs kept are: below that, past 10,000 such orgs the set was emptied over and over, and
            # each org warned again at every read of its usage, a WARNING per org and LAGO_USAGE_CACHE_TTL)
            if len(self._config_warnings) >= max(10_000, self.config.max_orgs):
                self._config_warnings.clear()
            self._config_warnings.add(key)
            logger.warning(message, *args)

    def _no_subscription(self, org_id: str, subscription_id: str, why: str) -> None:
        """Lago has no active subscription for the org (read from Lago: not per request). Refused (``block``): said
        once, for the first such org (each answer names its external_id; ids from a header would flood the log).
        Served (``allow``, or monitor mode): said once per org (bounded), its events being taken by Lago and never
        billed."""
        template = self.settings.subscription_id_template
        if self.config.no_subscription == "allow" or self.mode == "monitor":
            self._warn_once(
                (org_id, "unbilled"),
                "Org %r has no active Lago subscription: subscription %r (LAGO_SUBSCRIPTION_ID_TEMPLATE %r) %s. Its "
                "requests are served (%s) and their events are taken by Lago and never billed, not even once the "
                "subscription is made (they are dated before it starts). Subscribe the org "
                "(OrgBilling.create_subscription, or run `lago-org-billing migrate --execute` for orgs not migrated "
                "yet), or fix LAGO_SUBSCRIPTION_ID_TEMPLATE if its subscription has another external_id; said once "
                "per org.",
                org_id,
                subscription_id,
                template,
                why,
                "LAGO_QUOTA_NO_SUBSCRIPTION=allow"
                if self.config.no_subscription == "allow"
                else "LAGO_QUOTA_MODE=monitor",
            )
        else:
            self._warn_once(
                ("", "no subscription"),
                "Org %r has no active Lago subscription: subscription %r (LAGO_SUBSCRIPTION_ID_TEMPLATE %r) %s. Its "
                "requests are answered %d (LAGO_QUOTA_NO_SUBSCRIPTION=block), as are those of other such orgs, each "
                "answer naming the external_id looked up. Subscribe the org (OrgBilling.create_subscription, or run "
                "`lago-org-billing migrate --execute` before deploying the middleware, for orgs not migrated yet), or "
                "fix LAGO_SUBSCRIPTION_ID_TEMPLATE if its subscription has another external_id; said once.",
                org_id,
                subscription_id,
                template,
                why,
                self.config.no_subscription_status,
            )

    def _log_outage(self, org_id: str, what: str) -> None:
        now = time.monotonic()
        if not self._outage_logged_at or now - self._outage_logged_at >= 60.0:  # once a minute at most
            self._outage_logged = True
            self._outage_logged_at = now
            waiting = self._slots.waiting
            logger.warning(
                "No usage snapshot of org %r could be read from Lago (it failed, logged above, or took over %.1f s%s): "
                "requests of orgs without a snapshot are %s until Lago answers (counted in "
                "stats['fail_open'/'fail_closed']).",
                org_id,
                self.config.cold_timeout,
                f"; {waiting} refreshes were waiting their turn (LAGO_QUOTA_REFRESH_CONCURRENCY)" if waiting else "",
                what,
            )

    # ------------------------------------------------------------------------------ refreshes

    def _refresh_due(self, org_id: str, snapshot: Snapshot, now: float) -> None:
        """Start the refresh of a snapshot that is due (``refresh_at`` passed), at the pace allowed (``refresh_rate``,
        ``plan_refresh_rate``): orgs whose snapshots fell due together (first seen together, ``invalidate_all``) are
        refreshed at a steady pace, serving their snapshots meanwhile, instead of all at once (Lago's 429s for them,
        and for the app's calls)."""
        if org_id in self._refreshing or self._backing_off(self._next_attempt.get(org_id, 0.0), now):
            return  # (in flight, or failed recently: no pace token spent)
        plan = (
            not snapshot.active
            or now - snapshot.plan_fetched_at >= self.config.plan_ttl
            or snapshot.plan_fetched_at > now + CLOCK_STEP  # (read on a clock stepped back since)
            or now >= snapshot.period_end
        )
        if not self._usage_pace.ready(now) or (plan and not self._plan_pace.ready(now)):
            return
        self._usage_pace.take()
        if plan:
            self._plan_pace.take()
        self._schedule_refresh(org_id, now)

    def _schedule_refresh(
        self, org_id: str, now: float, *, force: bool = False, urgent: bool = False
    ) -> anyio.Event | None:
        """Start a background refresh unless one is in flight or the last attempt failed recently. ``urgent``: a
        request waits for it (a cold org), so it goes before the refreshes of stale snapshots."""
        if org_id in self._refreshing:
            if urgent:
                self._slots.promote(org_id)
            return self._refreshing[org_id]
        if not force and self._backing_off(self._next_attempt.get(org_id, 0.0), now):
            return None
        if urgent:
            if self._cold_queued >= min(self.config.max_orgs, _MAX_COLD_QUEUE):  # a flood of unknown org ids
                self.stats["cold_shed"] = self.stats.get("cold_shed", 0) + 1
                return None
            self._cold_queued += 1
        event = self._refreshing[org_id] = anyio.Event()
        if len(self._next_attempt) >= self.config.max_orgs:  # bounded, however many org ids requests bring
            self._next_attempt.clear()
        self._next_attempt[org_id] = now + self.config.failure_backoff
        self._spawn(self._refresh, org_id, event, urgent)
        return event

    def _spawn(
        self,
        func: Callable[[str, anyio.Event, bool], Coroutine[Any, Any, None]],
        org_id: str,
        event: anyio.Event,
        urgent: bool,
    ) -> None:
        if self._tasks is not None:
            self._tasks.start_soon(func, org_id, event, urgent)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio (hypercorn -k trio): a system task, cancelled as trio.run() ends
            self._spawn_on_trio(func, org_id, event, urgent)
            return
        task: asyncio.Task[None] = loop.create_task(func(org_id, event, urgent))
        self._loose.add(task)
        task.add_done_callback(self._loose.discard)

    def _spawn_on_trio(
        self,
        func: Callable[[str, anyio.Event, bool], Coroutine[Any, Any, None]],
        org_id: str,
        event: anyio.Event,
        urgent: bool,
    ) -> None:
        """:meth:`_spawn` without the gate's work running (its seed helpers called from a script, a webhook's refresh
        in an app that did not start it), under trio: ``asyncio.get_running_loop()`` raised ``RuntimeError`` there,
        out of every cold check and seed helper. A system task, as the middleware's lazy start is; :meth:`aclose`
        cancels it and waits for its end, as it does an asyncio task's."""
        import trio

        scope = anyio.CancelScope()
        done = anyio.Event()
        self._loose_trio[scope] = done

        async def run() -> None:  # (a system task must not raise: the refresh keeps its errors, as in the task group)
            try:
                with scope:
                    await func(org_id, event, urgent)
            except Exception:  # pragma: no cover - _refresh catches what a refresh raises
                logger.exception("Unexpected error refreshing the quota snapshot of org %r", org_id)
            finally:
                self._loose_trio.pop(scope, None)
                done.set()

        trio.lowlevel.spawn_system_task(run, name="lago-org-billing quota refresh")

    async def _refresh(self, org_id: str, event: anyio.Event, urgent: bool = False) -> None:
        slots = self._slots
        try:
            await slots.acquire(org_id, urgent)
        except BaseException:
            self._refreshing.pop(org_id, None)
            event.set()
            raise
        finally:
            if urgent:  # (queued no more: started, or given up)
                self._cold_queued = max(0, self._cold_queued - 1)
        held = True

        def release() -> None:  # (once: when the refresh only waits for another process's, or when it ends)
            nonlocal held
            if held:
                held = False
                slots.release()

        async def take() -> None:  # (again: it reads Lago after all, the snapshot it waited for dropped meanwhile)
            nonlocal held
            if not held:
                await slots.acquire(org_id, True)
                held = True

        try:
            await self._refresh_now(org_id, release, urgent, take)
        finally:
            release()
            self._refreshing.pop(org_id, None)
            self._stale.discard(org_id)
            event.set()

    async def _refresh_now(
        self,
        org_id: str,
        release_slot: Callable[[], None],
        urgent: bool = False,
        take_slot: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        backend = self.backend
        self._stale.discard(org_id)  # (invalidated while queued: nothing was read yet, nothing to read again)
        locked = stored = False
        try:
            if self._backing_off(self._paused_until, self.clock()):  # Lago throttles us: asked again once it said so
                self._next_attempt[org_id] = self._paused_until
                self.stats["refreshes_paused"] = self.stats.get("refreshes_paused", 0) + 1
                return
            locked = await backend.try_lock(org_id, self.ttl, self.clock())
            previous = await backend.load(org_id) if locked else None  # the fleet's copy: maybe invalidated
            again = 0  # reads made again because the org was invalidated meanwhile (at most 3)
            waited = False  # (waited for another process's read once: a second wait takes no lock freed meanwhile)
            while True:
                if not locked:  # another process refreshes it (it holds the fleet's lock): wait for its snapshot
                    if waited:
                        break
                    waited = True
                    locked = await self._wait_for_fleet(org_id, urgent, release_slot)
                    if not locked:
                        break
                    if take_slot is not None:  # (it reads Lago after all: within the bound on reads at once)
                        await take_slot()
                    previous = None
                snapshot = await self.fetch(org_id, previous)
                if org_id in self._stale:  # invalidated while fetching (a plan change...): what was read may be stale
                    if again < 3:  # read again, under a new lock (an invalidation frees the fleet's)
                        self._stale.discard(org_id)
                        again += 1
                        previous = None
                        locked = await backend.try_lock(org_id, self.ttl, self.clock())
                        continue
                    snapshot = dataclasses.replace(snapshot, refresh_at=0.0)  # serve it, read again at next request
                if await backend.store(org_id, snapshot, self.clock()) is not False:  # (None: a backend of old)
                    stored = True
                    break
                # Invalidated in another process meanwhile (a webhook there), or another process refreshes it since:
                # nothing was stored. Read again under a new lock, or wait for that process's snapshot.
                self.stats["refreshes_superseded"] = self.stats.get("refreshes_superseded", 0) + 1
                again += 1
                previous = None
                locked = again <= 3 and await backend.try_lock(org_id, self.ttl, self.clock())
            if stored:
                # (shared: the backend's copy also says which of its records are unsure, which only it knows: with no
                # version, this one is replaced by it at the org's next check)
                self._known[org_id] = dataclasses.replace(snapshot, version="") if self._shared else snapshot
                self._refresh_errors.pop(org_id, None)
                # (a period already over when it was asked: Lago's clock behind at the rollover; the backoff before
                # reading again stays. One asked before its end and answered after is not Lago behind: the org's next
                # request reads the new period at once, not LAGO_FAIL_OPEN for failure_backoff with Lago answering)
                if not snapshot.over(self.clock()) or snapshot.requested_at < snapshot.period_end:
                    self._next_attempt.pop(org_id, None)
                    self._gave_up.pop(org_id, None)
                if self._refresh_failing:
                    self._refresh_failing.pop(org_id, None)
                    self._forget_old_failures()
                if self._outage_logged or self._refresh_warned:
                    self._outage_logged = self._refresh_warned = False
                    logger.info("Lago answers again: usage snapshots are being refreshed.")
        except LagoIntegrationError as exc:
            self.stats["refresh_errors"] += 1
            self._pause_after(exc)
            if len(self._refresh_errors) >= self.config.max_orgs:  # (bounded: raised by the seed helpers, then gone)
                self._refresh_errors.clear()
            # Kept without its traceback: its frames (the client's request, its answer...) held about 6 KB per org,
            # hundreds of MB once the orgs of an outage (or a flood of org ids meanwhile) reached max_orgs. Raised
            # again, it says what failed all the same (Lago's answer, the call).
            self._refresh_errors[org_id] = exc.with_traceback(None)
            # the records of an org whose refreshes fail (Lago down) keep growing by the second: folded
            await _call_optional(backend, "compact", org_id, int(self.clock() - self.config.settle_lag))
            if isinstance(exc, _Unreadable):  # (Lago answers, in a shape it keeps: said once per kind, not per outage)
                if ("", exc.kind) in self._config_warnings:
                    logger.debug("Could not refresh the quota snapshot of org %r: %s", org_id, exc)
                else:
                    self._warn_once(("", exc.kind), "Could not refresh the quota snapshot of org %r: %s", org_id, exc)
            else:
                self._forget_old_failures()
                said = self._refresh_warned or org_id in self._refresh_failing
                (logger.debug if said else logger.warning)(
                    "Could not refresh the quota snapshot of org %r: %s (further failures are logged at DEBUG until "
                    "Lago answers again; counted in stats['refresh_errors'])",
                    org_id,
                    exc,
                )
                self._refresh_warned = self._refresh_warned or not said
                if len(self._refresh_failing) >= self.config.max_orgs:  # (bounded)
                    self._refresh_failing.clear()
                self._refresh_failing.pop(org_id, None)  # (moved to the end: the dict is in the order of failures)
                self._refresh_failing[org_id] = self.clock()
        except Exception:  # never let a refresh crash the background task group
            self.stats["refresh_errors"] += 1
            logger.exception("Unexpected error refreshing the quota snapshot of org %r", org_id)
        finally:
            if locked and not stored:  # failed or cut off: the fleet may ask again after failure_backoff, not a TTL
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.redis_timeout):
                    await _call_optional(backend, "unlock", org_id, self.clock(), self.config.failure_backoff)

    def _forget_old_failures(self) -> None:
        """Forget the failing orgs not asked again for ``_longest_wait`` (their traffic gone: no refresh tells). The
        dict is in the order of their last failures: only the old ones at its head are looked at (amortized O(1))."""
        oldest = self.clock() - self._longest_wait
        failing = self._refresh_failing
        while failing:
            org_id = next(iter(failing))
            if failing[org_id] >= oldest:
                break
            del failing[org_id]

    async def _wait_for_fleet(self, org_id: str, urgent: bool, release_slot: Callable[[], None]) -> bool:
        """Another process refreshes the org (it holds the fleet's lock): wait, at most ``cold_timeout``, for its
        snapshot (newer than one whose period is over...). True when the lock was taken here instead, to read the org
        now: no snapshot came, and the lock is free (an invalidation frees it: the snapshot it waited for, or the one
        stored since, dropped by a webhook; or its holder ended without storing). Waiting on until the end for a read
        no one makes, a request of the org meanwhile (which joins this refresh) went to LAGO_FAIL_OPEN with Lago
        answering."""
        backend = self.backend
        current = await backend.load(org_id)
        after = 0.0
        now = self.clock()
        if current is not None and (
            current.over(now)
            # (or one invalidate_all marked, its plan to be read again: its requests blocked on it wait for it)
            or not current.plan_fetched_at
            # (or one a request blocked on its unsure records waits to see read again, as the fleet's refresh now
            # does: decided on that read, not refused at once on the records it is to settle)
            or (urgent and (current.unsure_calls or current.unsure_tokens) and now >= self._trusted_at(current))
        ):
            after = current.requested_at
        release_slot()  # waiting asks nothing of Lago: the slot goes to another org's refresh
        deadline = anyio.current_time() + self.config.cold_timeout
        while True:
            # (in parts: the lock is tried between them, and the whole wait stays within cold_timeout)
            left = deadline - anyio.current_time()
            await backend.wait_snapshot(org_id, max(0.0, min(left, self.config.cold_timeout / _WAIT_PARTS)), after)
            arrived = await backend.load(org_id)
            now = self.clock()
            if arrived is not None and arrived.requested_at > after and not arrived.over(now):
                if now < arrived.refresh_at <= now + self._due_within:
                    # Read (by the other process), not due: nothing failed here to back off from. A request of the
                    # org that finds no snapshot moments later (dropped fleet-wide by a webhook another worker got)
                    # has it read at once, not decided by LAGO_FAIL_OPEN with Lago answering. (One still due, the
                    # other process reading it: the backoff stays, or each request would start a refresh to wait.)
                    self._next_attempt.pop(org_id, None)
                    self._gave_up.pop(org_id, None)
                return False
            if not self._backing_off(self._paused_until, self.clock()) and await backend.try_lock(
                org_id, self.ttl, self.clock()
            ):
                return True
            if anyio.current_time() >= deadline:
                return False

    def _pause_after(self, exc: BaseException) -> None:
        """After a 429, every refresh of this process waits it out, not only this org's (a burst would go on hitting
        the closed window), each until a random point of the second after it (not all at the reset instant). Capped:
        a reset that reads as hours (a gateway's epoch time) does not stop refreshes for hours."""
        if isinstance(exc, LagoRateLimitError) and exc.status == 429:
            wait = min(max(exc.retry_after or 0.0, 1.0), max(self.ttl, 60.0))
            now = self.clock()
            # (one stamped before the clock was stepped back is over: not kept instead of this one)
            paused = self._paused_until if self._backing_off(self._paused_until, now) else 0.0
            self._paused_until = max(paused, now + wait + random.random())

    async def fetch(self, org_id: str, previous: Snapshot | None = None) -> Snapshot:
        """Read the org's subscription (unless ``previous`` holds a recent one) and current usage from Lago."""
        self.stats["refreshes"] += 1
        spread = previous is None  # a first snapshot (or one invalidated): its next refresh is spread wider
        subscription_id = self.settings.subscription_id_for(org_id)
        now = self.clock()
        if (
            previous is not None
            and previous.active
            and now - previous.plan_fetched_at < self.config.plan_ttl
            and previous.plan_fetched_at <= now + CLOCK_STEP  # (not read on a clock stepped back since)
            and now < previous.period_end
        ):
            base = previous
        else:
            base = await self._fetch_subscription(org_id, subscription_id, now)
            if not base.active:
                return self._finish(base, now, now, spread=spread)
            # the plan is read again after plan_ttl less a random part (more for a first snapshot), so that orgs
            # first seen together do not all re-read their subscriptions together
            early = self.config.plan_ttl * (_FIRST_SPREAD if spread else self.config.jitter) * random.random()
            base = dataclasses.replace(base, plan_fetched_at=now - early)
        requested_at = self.clock()
        calls = tokens = 0
        counts_calls = counts_tokens = True
        start, end = base.period_start, base.period_end
        if base.limited and base.customer_id:
            single = self.token_metric == self.settings.event_code or base.tokens_limit is None
            try:
                usage = await self.client.get_current_usage(
                    base.customer_id,
                    subscription_id,
                    apply_taxes=False,
                    billable_metric_code=self.settings.event_code if single else None,
                )
            except LagoNotFoundError as exc:
                if exc.code != "charge_not_found":
                    if base is previous and exc.code == "customer_not_found":  # (moved off a customer since deleted)
                        return await self.fetch(org_id, dataclasses.replace(previous, plan_fetched_at=-math.inf))
                    raise
                usage = {}  # the plan has no charge on the metric: Lago counts nothing
            except LagoAPIError as exc:
                if exc.status == 405 and base is previous:
                    # no active subscription of that id *on the customer kept here*: it may have moved to another
                    # one (terminated and made again there: no webhook wired, or not yet come), or ended; the
                    # subscription is read again before concluding (not 402 until the plan's next read)
                    return await self.fetch(org_id, dataclasses.replace(previous, plan_fetched_at=-math.inf))
                if exc.status == 405:  # no_active_subscription
                    self._no_subscription(org_id, subscription_id, "is no longer active (current_usage: 405)")
                    return self._finish(Snapshot(active=False), requested_at, now, spread=spread)
                raise
            calls, token_units = usage_totals(usage, self.settings.event_code, self.token_metric)
            tokens = token_units or 0
            # (a charge on the metric, not just an answer: one read unfiltered, or from a Lago ignoring the filter,
            # may list the plan's charges on other metrics only)
            counts_calls = charges_metric(usage, self.settings.event_code)
            counts_tokens = bool(usage) and (token_units is not None or base.tokens_limit is None)
            if base.tokens_limit is not None and token_units is None and usage:
                self._warn_once(
                    (org_id, "tokens"),
                    "max_tokens is set for org %r but Lago does not sum total_tokens in the metric %r (not a "
                    "sum_agg over total_tokens): its tokens are counted from the gate's own records only (those of "
                    "requests other deployments serve are missed). Set LAGO_QUOTA_TOKEN_METRIC to such a metric.",
                    org_id,
                    self.token_metric,
                )
            if not counts_calls:
                self._warn_once(
                    (org_id, "charge"),
                    "The plan of org %r has no charge on the metric %r: Lago counts none of its calls, so its "
                    "limits are checked against the gate's own records only (those of requests other deployments "
                    "serve are missed), and bills none of them. Add the charge to the plan, or, if LAGO_EVENT_CODE "
                    "is not the code of the metric the plan charges requests on, set it to that code.",
                    org_id,
                    self.settings.event_code,
                )
            start = _timestamp(usage.get("from_datetime")) or start
            to = _timestamp(usage.get("to_datetime"))
            end = to + 1 if to is not None else end
            if end <= start:  # (one still to come was taken for a subscription not started: served, never counted)
                raise _Unreadable(
                    f"Lago's billing period of org {org_id!r} ends before it starts (from_datetime {_iso(start)}, "
                    f"to_datetime {_iso(end - 1)}): its usage is in no period, so LAGO_FAIL_OPEN decides for orgs on "
                    "such answers until Lago answers a period. Check what stands between this app and Lago "
                    "(LAGO_API_URL) and Lago's version; said once.",
                    "inverted period",
                )
            if start > requested_at + CLOCK_STEP:
                self._warn_once(
                    (org_id, "not started"),
                    "The subscription of org %r starts at %s (its started_at, later than now): Lago ignores the "
                    "events dated before it, so the org's calls until then are served and not counted against its "
                    "limits (nor billed). Subscribe with subscription_at now or earlier to bill them; said once per "
                    "org.",
                    org_id,
                    _iso(start),
                )
            if base is previous and previous.period_start < start < previous.period_end:
                # a usage period that starts within the known one: the subscription was replaced (an upgrade, or
                # terminated and subscribed again) and the plan kept here is no longer its own: read it again now
                return await self.fetch(org_id, dataclasses.replace(previous, plan_fetched_at=-math.inf))
        if base.active and end <= now:  # (over before it was asked, not while it was read)
            self._warn_once(
                ("", "behind"),
                "Lago reports a billing period of org %r that ended at %s by this host's clock: Lago's clock is "
                "behind this one's (check both hosts' time sync). Its usage is read again until Lago is in the new "
                "period; said once.",
                org_id,
                _iso(end),
            )
        return self._finish(
            dataclasses.replace(
                base,
                base_calls=calls,
                base_tokens=tokens,
                period_start=start,
                period_end=end,
                lago_counts_calls=counts_calls,
                lago_counts_tokens=counts_tokens,
            ),
            requested_at,
            now,
            spread=spread,
        )

    def _finish(self, snapshot: Snapshot, requested_at: float, now: float, *, spread: bool = False) -> Snapshot:
        """The snapshot with its times; its refresh is due after the TTL less a random part: up to ``jitter`` of it,
        or half of it for a first snapshot (orgs first seen together, after a deploy or an outage, would otherwise
        refresh together ever after: a burst of ``current_usage`` calls every TTL)."""
        fetched = self.clock()
        jitter = self.ttl * (_FIRST_SPREAD if spread else self.config.jitter) * random.random()
        return dataclasses.replace(
            snapshot,
            next_period_end=next_period_end(snapshot),
            requested_at=requested_at,
            fetched_at=fetched,
            refresh_at=fetched + self.ttl - jitter,
            plan_fetched_at=snapshot.plan_fetched_at or now,
            version=f"{fetched!r}:{random.getrandbits(32):08x}",
        )

    async def _fetch_subscription(self, org_id: str, subscription_id: str, now: float) -> Snapshot:
        try:
            subscription: JSON = await self.client.get_subscription(subscription_id)
        except LagoNotFoundError as exc:
            if no_such_route(exc):  # Lago's catch-all for a route it does not serve: LAGO_API_URL is
                raise  # wrong (a path), not every org without a subscription: the fail policy applies, the error said
            self._no_subscription(org_id, subscription_id, "does not exist (404)")
            return Snapshot(active=False, plan_fetched_at=now)
        except InvalidIdentifierError as exc:  # no subscription can be made nor read for it: not "Lago is down"
            self._warn_once(
                ("", "id"),  # once, not per org: ids from a header (LAGO_ORG_HEADER) would flood the log
                "Org %r has no subscription Lago can address (%s): it is treated as having none (not as Lago being "
                "unreachable, which LAGO_FAIL_OPEN would let through); so are other such org ids, said once. Give such "
                "orgs ids without those characters where the middleware resolves them (your auth layer, or "
                "resolve_org=: e.g. map 'acme.com' to 'acme-com'), or refuse them there.",
                org_id,
                exc,
            )
            return Snapshot(active=False, plan_fetched_at=now)
        status = subscription.get("status")
        if status not in (None, "active"):
            if (
                not isinstance(status, str) or status not in _NOT_ACTIVE
            ):  # a status Lago added since: whether the org may be served is unknown
                raise _Unreadable(
                    f"Lago answered the active subscription {subscription_id!r} of org {org_id!r} with status "
                    f"{str(status)[:40]!r}, which this package does not know (Lago's: active, "
                    f"{', '.join(sorted(_NOT_ACTIVE))}): neither served as active nor refused as without a "
                    "subscription, its requests are decided by LAGO_FAIL_OPEN while Lago answers so (a newer Lago: "
                    "upgrade lago-org-billing); said once per status.",
                    f"status {str(status)[:40]}",
                )
            self._no_subscription(org_id, subscription_id, f"is {status}")
            return Snapshot(active=False, plan_fetched_at=now)
        entitlements = await subscription_entitlements(self.client, subscription, subscription_id)
        plan = subscription.get("plan")
        plan = plan if isinstance(plan, Mapping) else {}  # (null, or not the documented object)
        plan_code = subscription.get("plan_code") or plan.get("code")
        limits: dict[str, int | None] = {}
        source = "none"
        table = self.settings.plan_limits.get(plan_code or "")
        if table is not None:
            # (held to the largest count read from Lago, as its privileges are: a count Lago reports past it is over)
            limits.update({name: min(limit, _LARGEST) for name, limit in table.items()})
            source = "plan_limits"
        elif entitlements is None:
            self._warn_once(
                ("plan", str(plan_code)),  # (per plan, not per org)
                "The plan %r of org %r has no limits: Lago serves no entitlements (said above) and LAGO_PLAN_LIMITS "
                "has no entry for it, so its orgs are unlimited. Add it to LAGO_PLAN_LIMITS if it has limits; said "
                "once per plan.",
                plan_code,
                org_id,
            )
        from_entitlements = limits_from_entitlements(entitlements, self.config)
        if from_entitlements:
            limits.update(from_entitlements)
            source = "entitlements"
        interval = plan.get("interval") or ""
        if plan.get("bill_charges_monthly") and interval in ("yearly", "semiannual"):
            interval = "monthly"  # (its usage periods are months)
        interval = interval if isinstance(interval, str) else ""
        started = _timestamp(subscription.get("current_billing_period_started_at"))
        end_raw = _timestamp(subscription.get("current_billing_period_ending_at"))
        anchor = None  # (an anniversary subscription's periods repeat from its subscription date)
        if subscription.get("billing_time") == "anniversary":
            anchor = _timestamp(subscription.get("subscription_at")) or _timestamp(subscription.get("started_at"))
        try:
            if end_raw is not None:
                end = end_raw + 1
                # (no start: the guessed period's ending a day before it, in whatever time zone: not now, so that the
                # period's counter key stays the same across reads)
                start = started or _calendar_period(end_raw - 86400, interval, anchor)[0]
            else:  # (an older Lago: the usage's bounds replace these when it has them)
                start, end = _calendar_period(now, interval, anchor)
                if started is not None and start <= started <= now:
                    start = started
        except (OverflowError, ValueError):  # (a period reckoned past the calendar's ends: a traceback per refresh)
            raise _Unreadable(
                f"Lago answered the subscription {subscription_id!r} of org {org_id!r} with times out of range "
                f"(current_billing_period_ending_at {str(subscription.get('current_billing_period_ending_at'))[:40]!r}"
                f", subscription_at {str(subscription.get('subscription_at'))[:40]!r}): its billing period cannot be "
                "reckoned, so LAGO_FAIL_OPEN decides for orgs on such answers until Lago answers a period; said once.",
                "period out of range",
            ) from None
        return Snapshot(
            active=True,
            plan_code=plan_code,
            customer_id=subscription.get("external_customer_id"),
            calls_limit=limits.get(self.config.calls_privilege),
            tokens_limit=limits.get(self.config.tokens_privilege),
            period_start=start,
            period_end=end,
            plan_fetched_at=now,
            limits_source=source,
            interval=interval,
            ending_at=_timestamp(subscription.get("ending_at")) or 0.0,
            next_plan_code=subscription.get("next_plan_code") or None,
            anchor=anchor or (CALENDAR_ANCHOR if subscription.get("billing_time") == "calendar" else 0.0),
        )

    # ------------------------------------------------------------------------------ seed helpers

    async def snapshot(self, org_id: str) -> Snapshot:
        """The org's current snapshot, read from Lago first when none is cached (or its period is over).

        Raises the Lago error when Lago cannot be asked and nothing is cached.
        """
        now = self.clock()
        known = await self._usable_snapshot(org_id, now)
        if known is not None:
            if known.refresh_at <= now or known.refresh_at > now + self._due_within:
                self._refresh_due(org_id, known, now)
            return known
        if self._backing_off(self._paused_until, self.clock()):
            raise LagoRateLimitError(
                f"Lago rate-limited this process's quota reads until {_iso(self._paused_until)}: try again then.",
                status=429,
                retry_after=self._paused_until - self.clock(),
            )
        # Read as a refresh (ahead of background ones, or the one in flight): the bound on Lago reads, the fleet's
        # lock, and what an invalidation meanwhile (a webhook: the plan changed) makes a read do are the refreshes'.
        self._refresh_errors.pop(org_id, None)
        event = self._schedule_refresh(org_id, now, force=True, urgent=True)
        if event is not None:
            await event.wait()
        known = await self._usable_snapshot(org_id, self.clock())
        if known is not None:
            return known
        error = self._refresh_errors.pop(org_id, None)
        if error is not None:
            raise error
        raise LagoUnavailableError(
            f"The usage of org {org_id!r} could not be read in time (another worker is reading it from Lago, or Lago "
            "is slow): try again."
        )

    async def _usable_snapshot(self, org_id: str, now: float) -> Snapshot | None:
        """This process's copy of the org's snapshot, else (none, or its billing period is over: another worker may
        have stored the new period's since) the backend's; ``None`` when neither is of the current period. With a
        shared backend (Redis), always the backend's: another worker may have dropped the org's snapshot since (a
        webhook it was sent: this copy answered the old plan, and no usage, until it fell due) or stored a newer one."""
        known = self._known.get(org_id)
        if known is None or known.over(now) or self._shared:
            known = await self.backend.load(org_id)
        if known is not None and known.over(now):  # (as the backend decides: it makes the same at the next check)
            known = provisional(known, now) if rolls_over(known, now) else None
        return known

    async def check_org_has_active_subscription(self, org_id: str) -> bool:
        """Whether the org has an active Lago subscription (cached like the gate's snapshots)."""
        return (await self.snapshot(org_id)).active

    async def get_org_plan_limits(self, org_id: str) -> dict[str, Any]:
        """``{"plan_code", "max_api_calls", "max_tokens", "source"}`` of the org (``None`` = unlimited)."""
        snap = await self.snapshot(org_id)
        return {"plan_code": snap.plan_code, **snap.limits(self.config), "source": snap.limits_source}

    async def enforce_usage_limits(self, org_id: str) -> dict[str, Any]:
        """Where the org stands, without reserving anything: ``{"allowed", "reason", "limits", "usage",
        "remaining", "plan_code", "period_end"}``; ``reason`` is the limit hit, ``no_active_subscription`` or
        ``None``. The usage of an org without limits, which the gate does not track, is read from Lago (each value
        ``None`` when it cannot be read)."""
        snap = await self.snapshot(org_id)
        outcome: Outcome | None = None
        if snap.active:
            outcome = await self.backend.reserve(org_id, self.clock(), "peek", self._known.get(org_id))
            if outcome.snapshot is not None:  # (the one the counts were compared with: stored since by another worker)
                snap = outcome.snapshot
        limits = snap.limits(self.config)
        if outcome is None or not snap.active:
            return {
                "allowed": self.config.no_subscription == "allow",
                "reason": "no_active_subscription",
                "limits": limits,
                "usage": {},
                "remaining": {},
                "plan_code": None,
                "period_end": None,
            }
        calls, tokens = outcome.calls, outcome.tokens
        if outcome.code == MISSING:
            calls, tokens = snap.base_calls, snap.base_tokens
        usage: dict[str, int | None] = {self.config.calls_privilege: calls, self.config.tokens_privilege: tokens}
        if not snap.limited:
            # The gate never reads the usage of an org without limits (nothing to compare it with): read here, off
            # the request path, as Lago counts it (None when it cannot be read: not a made-up 0)
            usage = dict.fromkeys(usage)
            if snap.customer_id:
                try:
                    read = await self.client.get_current_usage(
                        snap.customer_id, self.settings.subscription_id_for(org_id), apply_taxes=False
                    )
                except LagoIntegrationError as exc:
                    logger.debug("Could not read the usage of org %r: %s", org_id, exc)
                else:
                    calls_read, tokens_read = usage_totals(read, self.settings.event_code, self.token_metric)
                    usage = {
                        # (None, not 0, when the plan has no charge on the metric: Lago counts none of the calls)
                        self.config.calls_privilege: calls_read
                        if charges_metric(read, self.settings.event_code)
                        else None,
                        self.config.tokens_privilege: tokens_read,
                    }
        remaining = {
            name: (None if limit is None else max(0, limit - (usage[name] or 0))) for name, limit in limits.items()
        }
        hit = outcome.hit
        return {
            "allowed": not hit,
            "reason": (self.config.calls_privilege if hit == CALLS else self.config.tokens_privilege) if hit else None,
            "limits": limits,
            "usage": usage,
            "remaining": remaining,
            "plan_code": snap.plan_code,
            "period_end": _iso(snap.period_end),
        }


def _allowed_headers(snap: Snapshot, calls: int, tokens: int, now: float) -> tuple[tuple[bytes, bytes], ...]:
    """:meth:`QuotaGate._headers` of an allowed request (no limit hit), for the fast path of
    :meth:`QuotaGate.check_now`: the same values, with the limit and reset pairs taken from caches (a plan has one
    limit, and the orgs of one billing period share its reset, which changes once a second)."""
    calls_limit, tokens_limit = snap.calls_limit, snap.tokens_limit
    if tokens_limit is None:
        if calls_limit is None:
            return ()
        limit, left = calls_limit, calls_limit - calls
    else:
        tokens_left = tokens_limit - tokens
        if tokens_left < 0:
            tokens_left = 0
        if calls_limit is None:
            limit, left = tokens_limit, tokens_left
        else:
            left = calls_limit - calls
            if left < 0:
                left = 0
            # the one closer to exhaustion (_ratio() inline; a limit of 0 counts as 0.0 there)
            if (tokens_left / tokens_limit if tokens_limit else 0.0) < (left / calls_limit if calls_limit else 0.0):
                limit, left = tokens_limit, tokens_left
            else:
                limit = calls_limit
    if left < 0:
        left = 0
    limit_pair = _LIMIT_PAIRS.get(limit)
    if limit_pair is None:
        if len(_LIMIT_PAIRS) >= 1024:
            _LIMIT_PAIRS.clear()
        limit_pair = _LIMIT_PAIRS[limit] = (b"ratelimit-limit", b"%d" % limit)
    reset = math.ceil(snap.period_end - now)
    if reset < 0:
        reset = 0
    reset_pair = _RESET_PAIRS.get(reset)
    if reset_pair is None:
        if len(_RESET_PAIRS) >= 4096:
            _RESET_PAIRS.clear()
        reset_pair = _RESET_PAIRS[reset] = (b"ratelimit-reset", b"%d" % reset)
    return (limit_pair, (b"ratelimit-remaining", b"%d" % left), reset_pair)


#: ``ratelimit-limit`` and ``ratelimit-reset`` header pairs by value (bounded: cleared when full)
_LIMIT_PAIRS: dict[int, tuple[bytes, bytes]] = {}
_RESET_PAIRS: dict[int, tuple[bytes, bytes]] = {}


def _ratio(left: int, limit: int | None) -> float:
    return left / limit if limit else 0.0


# ------------------------------------------------------------------------------ module-level helpers


def current_gate(request: Any = None) -> QuotaGate:
    """The :class:`QuotaGate` the seed's helpers use: the one of the app serving ``request`` when given, else the
    one gate running in this process (or, when none runs, the last made)."""
    if request is not None:
        billing = billing_scope(request)
        gate = billing.get("quota") if billing is not None else None
        if gate is None:
            raise ConfigurationError(
                "This request has no quota gate: it did not go through OrgBillingMiddleware, or quota gating is off "
                "there (LAGO_QUOTA_MODE=off)."
            )
        if not isinstance(gate, QuotaGate):
            raise ConfigurationError(
                f"This app's quota gate is a {type(gate).__name__}, not a QuotaGate: call its own methods."
            )
        return gate
    running = list(_RUNNING)
    if len(running) > 1:
        raise ConfigurationError(
            f"{len(running)} quota gates run in this process (one per app, each with its own settings and cache): "
            "pass request= to use the gate of the app serving it, or call the method on the gate itself "
            "(middleware.quota)."
        )
    gate = running[0] if running else (_LAST[0]() if _LAST else None)
    if gate is None:
        raise ConfigurationError(
            "No QuotaGate is running: add OrgBillingMiddleware with LAGO_QUOTA_MODE enforce or monitor, "
            "or call the method on your QuotaGate."
        )
    return gate


async def check_org_has_active_subscription(org_id: str, *, request: Any = None) -> bool:
    """The seed's helper, on the gate's cache (see :meth:`QuotaGate.check_org_has_active_subscription`; with
    several apps in one process, pass the ``request`` to use its app's gate)."""
    return await current_gate(request).check_org_has_active_subscription(org_id)


def _check_limit_names(plan_limits: Mapping[str, Mapping[str, int]], config: QuotaConfig) -> None:
    """A misspelt limit in ``LAGO_PLAN_LIMITS`` would never be enforced: refuse it."""
    known = (config.calls_privilege, config.tokens_privilege)
    for plan, limits in plan_limits.items():
        unknown = sorted(set(limits) - set(known))
        if unknown:
            raise ConfigurationError(
                f"LAGO_PLAN_LIMITS[{plan!r}] has limits no quota reads: {', '.join(map(repr, unknown))}. The limits "
                f"are {known[0]!r} (calls per billing period) and {known[1]!r} (tokens per billing period); "
                "LAGO_QUOTA_CALLS_PRIVILEGE / LAGO_QUOTA_TOKENS_PRIVILEGE rename them.",
                variable="LAGO_PLAN_LIMITS",
            )


async def get_org_plan_limits(org_id: str, *, request: Any = None) -> dict[str, Any]:
    """The seed's helper, on the gate's cache (see :meth:`QuotaGate.get_org_plan_limits`; ``request`` as above)."""
    return await current_gate(request).get_org_plan_limits(org_id)


async def enforce_usage_limits(org_id: str, *, request: Any = None) -> dict[str, Any]:
    """The seed's helper, on the gate's cache (see :meth:`QuotaGate.enforce_usage_limits`; ``request`` as above)."""
    return await current_gate(request).enforce_usage_limits(org_id)


def _check_config_types(config: QuotaConfig) -> None:
    """Refuse a ``QuotaConfig`` field of the wrong type or range, given in code: a string read from the environment
    (``cold_timeout="2"`` failed at the first cold check, in the request), NaN, a negative
    duration), a bool for a count, ``None`` for a name."""
    name = "QuotaConfig"
    for field in ("feature_code", "calls_privilege", "tokens_privilege", "redis_prefix"):
        checks.text(f"{name}.{field}", getattr(config, field), example=getattr(QuotaConfig, field))
    if config.token_metric is not None:
        checks.text(f"{name}.token_metric", config.token_metric, example="api_tokens")
    checks.flag(f"{name}.headers", config.headers)
    for field in (
        "cold_timeout", "plan_ttl", "failure_backoff", "inflight_horizon", "redis_timeout", "settle_lag",
        "redis_pool_timeout", "redis_retry_interval", "jitter",
    ):  # fmt: skip
        checks.number(f"{name}.{field}", getattr(config, field), inclusive=True)
    checks.whole(f"{name}.max_orgs", config.max_orgs)
    checks.whole(f"{name}.redis_max_connections", config.redis_max_connections)
    if isinstance(config.max_concurrent_refreshes, bool):
        checks.whole(f"{name}.max_concurrent_refreshes", config.max_concurrent_refreshes)
    if config.unavailable_status not in range(500, 600) or isinstance(config.unavailable_status, bool):
        raise ConfigurationError(
            f"{name}.unavailable_status must be a 5xx status such as 503, got {config.unavailable_status!r}."
        )
