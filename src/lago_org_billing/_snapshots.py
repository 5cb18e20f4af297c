"""What the quota gate and its backends share: :class:`Snapshot` (what Lago said about one org), :class:`Outcome` (a
backend's answer to a reservation) and its codes, the reservation :data:`Mode`, :func:`decide` (which limit one more
call would break) and ``CLOCK_STEP``.

On the request path, before the app runs: the gate (:class:`~._quota.QuotaGate`) asks its backend
(:mod:`._quota_local` in process, :mod:`._quota_redis` for the fleet) to reserve one call of the org on its cached
Snapshot, and decides on the Outcome. The design is in :mod:`._quota`'s docstring.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._quota import QuotaBackend, QuotaConfig

__all__ = [
    "ALLOWED",
    "BLOCKED",
    "CALLS",
    "CLOCK_STEP",
    "COUNTED",
    "MISSING",
    "NOT_STARTED",
    "NO_SUBSCRIPTION",
    "TOKENS",
    "UNAVAILABLE",
    "Mode",
    "Outcome",
    "Snapshot",
    "decide",
]

CALLS = "calls"
TOKENS = "tokens"

# Outcome codes of a reservation (shared with the Redis Lua script).
MISSING = 0  # no usable snapshot: nothing counted
ALLOWED = 1  # within limits: one call reserved
BLOCKED = 2  # over a limit: nothing counted (unless forced)
NO_SUBSCRIPTION = 3  # the org has no active subscription
COUNTED = 4  # no snapshot, counted anyway (forced: fail-open or monitor mode)
UNAVAILABLE = 5  # no snapshot and fail-closed (decided by the gate, not by backends)

#: The counter period of a call allowed before its snapshot's period starts (a subscription whose ``started_at`` is
#: later the same day, active in Lago, which ignores the events dated before it; or Lago's clock ahead of this one's
#: at a rollover, the call billed in the period before): served, nothing counted, its settle dropped.
NOT_STARTED = "not started"

#: ``normal``: reserve within limits; ``force``: reserve even over a limit (monitor mode); ``blind``: reserve
#: even without a snapshot (fail-open); ``peek``: never reserve.
Mode = Literal["normal", "force", "blind", "peek"]

#: A wall-clock time more than this (seconds) after the clock's now was taken before the clock was stepped back (NTP
#: correcting a clock that ran ahead, a VM's clock set wrong at boot), not on another host a moment ahead (Redis:
#: workers' clocks differ by a little): a snapshot read then is due, a newer read replaces it, and its records are
#: counted as made now. Without it, every time stamped on the old clock would hold for as long as the step.
CLOCK_STEP = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What Lago said about one org: subscription, limits, billing period and the usage it had counted.

    Times are Unix seconds. A limit of ``None`` means unlimited. ``active=False``: no active subscription.
    """

    active: bool
    plan_code: str | None = None
    customer_id: str | None = None
    calls_limit: int | None = None
    tokens_limit: int | None = None
    period_start: float = 0.0
    period_end: float = 0.0
    base_calls: int = 0
    base_tokens: int = 0
    #: When the usage was requested (local records older than this minus ``settle_lag`` are in it).
    requested_at: float = 0.0
    fetched_at: float = 0.0
    #: When the subscription part was read.
    plan_fetched_at: float = 0.0
    #: When the next refresh is due (``fetched_at`` + TTL minus jitter).
    refresh_at: float = 0.0
    #: ``entitlements``, ``plan_limits`` or ``none``: where the limits came from.
    limits_source: str = "none"
    #: Version tag (unique per stored snapshot).
    version: str = ""
    #: Whether Lago counts the org's calls / tokens (not when the plan has no charge on the metric, or when the token
    #: metric does not sum ``total_tokens``): what it does not count is kept locally for the whole period.
    lago_counts_calls: bool = True
    lago_counts_tokens: bool = True
    #: The plan's billing interval (``monthly``...; ``monthly`` too for yearly plans billing charges monthly), the
    #: subscription's ``ending_at`` (0: none) and pending downgrade (``next_plan_code``): what a rollover needs.
    interval: str = ""
    ending_at: float = 0.0
    next_plan_code: str | None = None
    #: Estimated end of the next period, when a request after ``period_end`` may be decided at once on a provisional
    #: snapshot of it (see "Billing-period rollover"); 0: not (no subscription, ending or switching plans there).
    next_period_end: float = 0.0
    #: An anniversary subscription's ``subscription_at`` (``CALENDAR_ANCHOR``: calendar billing; 0: not known): its
    #: day in the customer's time zone is the billing day, which a period begun elsewhere (the first, at the exact
    #: ``started_at``; one begun by an upgrade) or ending on a short month's last day does not show.
    anchor: float = 0.0
    #: Of the records counted on top of this snapshot, the calls / tokens Lago may have counted already: recorded in
    #: the ``settle_lag`` seconds before ``requested_at`` (kept: never under-count). Set by the backend storing it. A
    #: block that holds only with them is unsure (:meth:`QuotaGate._unsure_until`): answered with a short
    #: ``Retry-After``, and the org read again once they are ``settle_lag`` old.
    unsure_calls: int = 0
    unsure_tokens: int = 0

    @property
    def limited(self) -> bool:
        return self.calls_limit is not None or self.tokens_limit is not None

    def over(self, now: float) -> bool:
        """Whether its billing period is over at ``now`` (a snapshot of no subscription has none)."""
        return self.active and now >= self.period_end

    def limits(self, config: QuotaConfig) -> dict[str, int | None]:
        return {config.calls_privilege: self.calls_limit, config.tokens_privilege: self.tokens_limit}


@dataclasses.dataclass(slots=True)
class Outcome:
    """A backend's answer to a reservation."""

    code: int
    snapshot: Snapshot | None = None
    calls: int = 0  # calls used (this reservation included when one was made)
    tokens: int = 0
    hit: str = ""  # "calls" or "tokens" when over a limit
    period: str = ""  # the counter period the reservation went to ("" = not known yet)
    bucket: int = 0  # second of the in-flight reservation
    backend: QuotaBackend | None = None


def decide(snapshot: Snapshot, calls: int, tokens: int) -> str:
    """Which limit one more call would break ("" when none): calls are checked with this call included,
    tokens are checked as already exhausted (they are only known after the call)."""
    if snapshot.calls_limit is not None and calls + 1 > snapshot.calls_limit:
        return CALLS
    if snapshot.tokens_limit is not None and tokens >= snapshot.tokens_limit:
        return TOKENS
    return ""
