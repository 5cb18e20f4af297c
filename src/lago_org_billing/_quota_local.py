"""The in-process backend of the quota gate (:class:`LocalBackend`, the default): each org's snapshot and its local
records (1-second buckets: recorded calls, tokens, calls in flight) in an LRU of ``max_orgs`` orgs. With
``LAGO_REDIS_URL``, :mod:`._quota_redis` keeps them in Redis instead, and falls back to this backend while Redis is
down.

On the request path: the gate's check reserves a call here before the app runs, and its settle records it after the
response (:meth:`~._quota.QuotaGate.check_now` and :meth:`~._quota.QuotaGate.settle` do the common case inline, on
these structures); a refresh stores the snapshot read from Lago here.
"""

from __future__ import annotations

import dataclasses
import itertools

import anyio
import anyio.abc

from ._periods import _BEFORE_START, before_period, period_key, provisional, rolls_over
from ._quota import QuotaConfig
from ._snapshots import (
    ALLOWED,
    BLOCKED,
    CLOCK_STEP,
    COUNTED,
    MISSING,
    NO_SUBSCRIPTION,
    NOT_STARTED,
    Mode,
    Outcome,
    Snapshot,
    decide,
)

__all__ = ["LocalBackend"]


class _Counts:
    """One org's local records: totals plus 1-second buckets (``c`` recorded calls, ``t`` tokens, ``i`` in
    flight)."""

    __slots__ = ("c", "calls", "i", "period", "prior", "t", "tokens")

    def __init__(self, period: str = "") -> None:
        self.period = period
        self.prior = ""  # the period these records were carried over from (see carried)
        self.calls = 0  # recorded + in flight
        self.tokens = 0
        self.c: dict[int, int] = {}
        self.t: dict[int, int] = {}
        self.i: dict[int, int] = {}

    def reserve(self, bucket: int) -> None:
        self.i[bucket] = self.i.get(bucket, 0) + 1
        self.calls += 1

    def settle(self, bucket: int | None, now_bucket: int, tokens: int, billed: bool) -> None:
        if bucket is not None:
            left = self.i.get(bucket, 0)
            if left > 0:
                if left == 1:
                    del self.i[bucket]
                else:
                    self.i[bucket] = left - 1
                self.calls -= 1
        if billed:
            self.c[now_bucket] = self.c.get(now_bucket, 0) + 1
            self.calls += 1
        if tokens > 0:
            self.t[now_bucket] = self.t.get(now_bucket, 0) + tokens
            self.tokens += tokens

    def prune(
        self,
        cutoff: int,
        inflight_cutoff: int,
        *,
        keep_calls: bool = False,
        keep_tokens: bool = False,
        now: int | None = None,
    ) -> None:
        """Drop the records a snapshot covers (older than ``cutoff``); those Lago does not count (``keep_*``) are
        folded into bucket 0 instead, so they keep counting for the period in bounded memory. Records stamped more
        than ``CLOCK_STEP`` after ``now`` (made before the clock was stepped back) are stamped ``now``: the next
        snapshot drops them, not one taken once the clock is back where they were made (counted twice until then)."""
        if now is not None:
            for buckets in (self.c, self.t):
                late = [sec for sec in buckets if sec > now + CLOCK_STEP]
                if late:
                    buckets[now] = buckets.get(now, 0) + sum(buckets.pop(sec) for sec in late)
        self.calls -= _drop_or_fold(self.c, cutoff, keep_calls)
        self.tokens -= _drop_or_fold(self.t, cutoff, keep_tokens)
        for sec in [s for s in self.i if s < inflight_cutoff]:
            self.calls -= self.i.pop(sec)

    def compact(self, before: int) -> None:
        """Fold the recorded seconds older than ``before`` into the last of them: memory stays bounded while no
        snapshot prunes them (Lago down), and nothing is under-counted (a snapshot drops the fold only when it would
        have dropped every second in it). Second 0 (what Lago does not count) and in-flight calls are left."""
        for buckets in (self.c, self.t):
            old = [sec for sec in buckets if 0 < sec < before]
            if len(old) > 1:
                total = sum(buckets.pop(sec) for sec in old)
                buckets[max(old)] = total

    def carried(self, period: str, since: int) -> _Counts:
        """The records of second ``since`` or later (recorded, tokens, in flight), as records of ``period``: a period
        begun within this one's (an upgrade, a subscription terminated and made again, a downgrade switched), whose
        first snapshot may not have them yet. The settles of this period's calls made since are taken (``prior``)."""
        new = _Counts(period)
        new.prior = self.period
        for mine, theirs in ((new.c, self.c), (new.t, self.t), (new.i, self.i)):
            for sec, value in theirs.items():
                if sec >= since:
                    mine[sec] = value
        new.calls = sum(new.c.values()) + sum(new.i.values())
        new.tokens = sum(new.t.values())
        return new

    def add(self, other: _Counts) -> None:
        for mine, theirs in ((self.c, other.c), (self.t, other.t), (self.i, other.i)):
            for sec, value in theirs.items():
                mine[sec] = mine.get(sec, 0) + value
        self.calls += other.calls
        self.tokens += other.tokens


def _not_in_lago(buckets: dict[int, int], since: int, base: int, before: tuple[int, int]) -> int:
    """How many of the records in ``buckets`` (second ``since`` on) the usage Lago just answered (``base``) cannot
    include, whatever their seconds say. Lago counts each event once, so of them it has at most those the last read
    may have had (``before``: that read's usage and the unsure records it kept) plus what its usage grew by since: a
    lower bound of what it lacks (0 or less when it may have them all)."""
    return sum(n for sec, n in buckets.items() if sec >= since) - before[1] - (base - before[0])


def _reads(snapshot: Snapshot) -> tuple[int, int]:
    """The calls and tokens Lago had counted as of ``snapshot``, where they bound the records it lacks (see
    :func:`_not_in_lago`); -1 where they do not: no limit on them (not read), or Lago does not count them."""
    calls = snapshot.base_calls if snapshot.calls_limit is not None and snapshot.lago_counts_calls else -1
    tokens = snapshot.base_tokens if snapshot.tokens_limit is not None and snapshot.lago_counts_tokens else -1
    return calls, tokens


def _drop_or_fold(buckets: dict[int, int], cutoff: int, keep: bool) -> int:
    """Remove the buckets older than ``cutoff``, returning how much they held; with ``keep``, fold them into bucket 0
    instead (nothing leaves the total: 0 is returned)."""
    old = [sec for sec in buckets if sec < cutoff and not (keep and sec == 0)]
    removed = sum(buckets.pop(sec) for sec in old)
    if keep:
        if old:
            buckets[0] = buckets.get(0, 0) + removed
        return 0
    return removed


class _LocalOrg:
    __slots__ = ("counts", "key", "key_of", "seeded", "snapshot")

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.seeded = False  # the snapshot is not a read of Lago (Redis's usage: see seed, restore)
        self.counts = _Counts()
        # period_key(key_of), kept for QuotaGate.check_now's fast path (whatever snapshot is stored since: it
        # compares key_of with the current one)
        self.key_of: Snapshot | None = None
        self.key = ""


def _only_here(state: _LocalOrg) -> bool:
    """Whether some of the org's records are counted nowhere else: Lago does not count them (a plan with no charge
    on the calls metric, a token metric that is not a sum: see ``Snapshot.lago_counts_*``; folded into second 0 at
    each snapshot), so a snapshot read again after they are forgotten does not have them."""
    counts, snap = state.counts, state.snapshot
    if counts.c.get(0) or counts.t.get(0):
        return True
    return snap is not None and (
        (not snap.lago_counts_calls and bool(counts.c)) or (not snap.lago_counts_tokens and bool(counts.t))
    )


class LocalBackend:
    """Snapshots and counters in this process (an LRU of ``max_orgs`` orgs)."""

    name = "memory"

    def __init__(self, config: QuotaConfig | None = None) -> None:
        self.config = config or QuotaConfig()
        # A plain dict (the hot path reads it twice per request); bounded by _evict.
        self._orgs: dict[str, _LocalOrg] = {}

    def _org(self, org_id: str) -> _LocalOrg:
        orgs = self._orgs
        state = orgs.pop(org_id, None)  # (and put back last: the dict's order is least recently used first)
        if state is None:
            if len(orgs) >= self.config.max_orgs:
                self._evict()
            state = _LocalOrg()
        orgs[org_id] = state
        return state

    def _evict(self) -> None:
        """Over ``max_orgs``: forget a tenth of the orgs, taken among the least recently used half (an org used since
        stays, however many ids came after it: a flood of ids seen once cannot push out an org in use, say one over
        its quota, whose blocked requests count nothing): first those with nothing counted locally (their snapshot is
        fetched again when needed), then those with no call in flight whose records Lago counts (those not yet in a
        snapshot are lost, long after they were made), then those with no call in flight whose records are their only
        count (see _only_here: forgotten, the org's usage of the period starts again from Lago's 0); only if every
        one of them has calls in flight, the least recently used."""
        orgs = self._orgs
        tenth = max(1, self.config.max_orgs // 10)
        older = list(itertools.islice(orgs.items(), max(tenth, len(orgs) // 2)))
        victims = [org_id for org_id, state in older if not state.counts.calls and not state.counts.tokens][:tenth]
        for keep_own in (True, False):
            if len(victims) >= tenth:
                break
            idle = set(victims)
            victims += [
                org_id
                for org_id, state in older
                if org_id not in idle and not state.counts.i and not (keep_own and _only_here(state))
            ][: tenth - len(victims)]
        if not victims:
            victims = [org_id for org_id, _ in older[:tenth]]
        for org_id in victims:
            del orgs[org_id]

    def reserve_now(self, org_id: str, now: float, mode: Mode) -> Outcome:
        state = self._org(org_id)
        snap = state.snapshot
        counts = state.counts
        bucket = int(now)
        if snap is not None and snap.active and now >= snap.period_end:  # over (Snapshot.over, inline: hot path)
            if counts.period == period_key(snap):
                counts = state.counts = _Counts()
            if rolls_over(snap, now):  # the subscription goes on: decided at once on the next period's
                snap = state.snapshot = provisional(snap, now)
            else:  # cold (kept: the refresh reads the subscription again from it)
                snap = None
        if snap is None:
            if mode != "blind":
                return Outcome(MISSING, backend=self)
            counts.reserve(bucket)
            # (of no period, as the Redis CHECK script's: these counts may be named after a period the call is not of,
            # the one before an invalidation or a boundary, which a snapshot of the next period drops with its settle;
            # the first snapshot's period takes it, but for one checked before that period began: see settle)
            return Outcome(COUNTED, None, counts.calls, counts.tokens, "", "", bucket, self)
        if not snap.active:
            return Outcome(NO_SUBSCRIPTION, snap, backend=self)
        if now < snap.period_start:  # not started: served, nothing counted (see NOT_STARTED)
            if counts.period != _BEFORE_START:
                state.counts = _Counts(_BEFORE_START)
            return Outcome(ALLOWED, snap, snap.base_calls, snap.base_tokens, "", NOT_STARTED, bucket, self)
        key = period_key(snap)
        if counts.period != key:
            if counts.period:
                counts = state.counts = _Counts(key)
            else:
                counts.period = key  # records made before the first snapshot belong to its period
        calls = snap.base_calls + counts.calls
        tokens = snap.base_tokens + counts.tokens
        hit = decide(snap, calls, tokens)
        if mode == "peek":
            return Outcome(BLOCKED if hit else ALLOWED, snap, calls, tokens, hit, key, bucket, self)
        if not hit or mode in ("force", "blind"):
            counts.reserve(bucket)
            calls += 1
        return Outcome(BLOCKED if hit else ALLOWED, snap, calls, tokens, hit, key, bucket, self)

    async def reserve(self, org_id: str, now: float, mode: Mode, known: Snapshot | None) -> Outcome:
        return self.reserve_now(org_id, now, mode)

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
        state = self._orgs.get(org_id)  # (not moved in the LRU order: its check did that moments ago)
        if period == NOT_STARTED:  # (before its subscription started: Lago bills none of it)
            return
        counts = (state if state is not None else self._org(org_id)).counts
        if bucket is not None:
            checked = bucket  # (the second of its check: see QuotaBackend.settle)
        if counts.period == _BEFORE_START and state is not None:
            # Its snapshot's period had not started when stored: nothing is counted before it starts (Lago bills
            # none of it; the Redis SETTLE script drops it too). From its start, these records are the period's, but
            # for usage dated before it (below): they were kept under _BEFORE_START until the next check dropped
            # them, usage recorded from the start meanwhile with them (Lago bills it: under-counted until a read).
            snap = state.snapshot
            if snap is not None and snap.active and now < snap.period_start:
                return
            if snap is not None and snap.active and now < snap.period_end:
                counts = state.counts = _Counts(period_key(snap))
            else:  # (invalidated since, or its period over: of no period, as an org's unknown here; see store_now)
                counts.period = ""
        if period and counts.period != period:
            if counts.period:
                # the period changed since: nothing of it is counted any more, but for the calls made since the new
                # one began (carried over: their events, dated then, are billed in it); the tokens of one checked
                # before it (settled when its event is built, after the call) are the old period's too (below)
                if period != counts.prior:
                    return
            else:
                # nothing known of the org here (forgotten, or handed to Redis after an outage): records of that
                # period, which its next snapshot keeps (if of that period), not dropped. Not when the org's snapshot
                # says that period is over or not its own (the counts reset at its end, the org cold: a late settle of
                # a call checked before it, as the Redis SETTLE script drops it): named after it, these counts, with
                # the calls let through since, would be dropped as the ended period's by the next period's snapshot
                snap = state.snapshot if state is not None else None
                if snap is not None and (not snap.active or period_key(snap) != period or snap.period_end <= int(now)):
                    return
                counts.period = period
        if counts.period != period and before_period(counts.period, checked):
            # of none (checked before any snapshot, before the period its records were then taken into: see
            # store_now) or of the period carried from: checked before the counts' period began, its call, and its
            # tokens settled when its event is built, are billed in the period before. Its call is released even so,
            # if held here still (records taken back after a merge into Redis was cut off, as the SETTLE script
            # releases one a check adopted or a merge handed over)
            counts.settle(bucket, 0, 0, False)
            return
        counts.settle(bucket, int(now), tokens, billed)

    def holds(self, org_id: str, bucket: int) -> bool:
        """Whether a call of the org reserved here in second ``bucket`` is still in flight here (not handed out by
        :meth:`drain`)."""
        state = self._orgs.get(org_id)
        return state is not None and bucket in state.counts.i

    def knows(self, org_id: str) -> bool:
        """Whether anything of the org (a snapshot, records) is kept here."""
        return org_id in self._orgs

    def peek_snapshot(self, org_id: str) -> Snapshot | None:
        state = self._orgs.get(org_id)
        return state.snapshot if state is not None else None

    async def load(self, org_id: str) -> Snapshot | None:
        return self.peek_snapshot(org_id)

    def store_now(self, org_id: str, snapshot: Snapshot, now: float) -> None:
        if snapshot.unsure_calls or snapshot.unsure_tokens:  # (a read made from an older one: set below, from here)
            snapshot = dataclasses.replace(snapshot, unsure_calls=0, unsure_tokens=0)
        state = self._org(org_id)
        current = state.snapshot
        if current is not None and (
            # (unless requested on a clock stepped back since: later reads would all be refused for the step's length)
            snapshot.requested_at < current.requested_at <= now + CLOCK_STEP
            # a read of a period before the current one's (begun before a rollover, or Lago's clock behind)
            or (current.active and snapshot.active and snapshot.period_end <= current.period_start)
        ):
            return  # a newer one arrived first
        state.snapshot = snapshot
        key = period_key(snapshot)
        counts = state.counts
        # (the last read of Lago, of these records: see _not_in_lago)
        last_read = (
            current
            if current is not None
            and not state.seeded
            and current.active
            and counts.period == key == period_key(current)
            and current.customer_id == snapshot.customer_id
            else None
        )
        state.seeded = False
        since = 0
        if snapshot.active:
            if now < snapshot.period_start:  # not started: nothing is counted until it does (see NOT_STARTED)
                state.counts = _Counts(_BEFORE_START)
                return
            since = int(snapshot.period_start)
        if counts.period and counts.period != key:
            if not snapshot.active:
                state.counts = _Counts()
                return
            if (
                current is not None
                and current.active
                and counts.period == period_key(current)
                and current.period_end <= snapshot.period_start
            ):
                # The period after the known one (read as it ended, before any request here rolled it over): its
                # records begin with it. Those kept are of calls checked before its start (recorded after it, some),
                # billed in the period that ended, as are the tokens of those calls still to be settled.
                counts = state.counts = _Counts(key)
            else:
                # A period begun within the known one (an upgrade, terminated and subscribed again, a downgrade
                # switched after the boundary): the records made since it began that Lago may not have counted yet
                # (recorded in the last settle_lag seconds, in flight) are its own; not dropped (the org under-counted
                # until the next refresh). Those before it are the old subscription's.
                counts = state.counts = counts.carried(key, since)
        elif not counts.period and snapshot.active:
            # Records made before any snapshot (calls LAGO_FAIL_OPEN let through) are its period's, but for the calls
            # in flight since before it began (before a boundary, or an upgrade made meanwhile): their events, dated at
            # their checks, are billed in the period before (see before_period for their settles)
            counts.period = key
            for sec in [s for s in counts.i if s < since]:
                counts.calls -= counts.i.pop(sec)
        cutoff = max(int(snapshot.requested_at - self.config.settle_lag), since)
        # Lago's usage bounds what it lacks whatever the clock says: it counts each event once and drops none, so
        # of the records held since the last read, it lacks all but those that read may have had (its unsure ones)
        # and what its usage grew by since. Those are not dropped, however old their seconds look: made just before
        # the clock was stepped forward (NTP correcting a clock behind, a VM resumed), their events still on their way,
        # they lie before the cutoff of a read on the new clock. (A usage that fell, another subscription's, bounds
        # nothing.)
        lacking = [0, 0]
        if last_read is not None:
            for kind, (buckets, was, now_read) in enumerate(
                zip((counts.c, counts.t), _reads(last_read), _reads(snapshot), strict=True)
            ):
                if 0 <= was <= now_read:
                    unsure = (last_read.unsure_calls, last_read.unsure_tokens)[kind]
                    lacking[kind] = _not_in_lago(buckets, since, now_read, (was, unsure))
        counts.prune(
            # (and those before the period's start: dated before it, their events are not billed in it)
            cutoff,
            int(now - self.config.inflight_horizon),
            keep_calls=not snapshot.lago_counts_calls,
            keep_tokens=not snapshot.lago_counts_tokens,
            now=int(now),
        )
        # What is kept that Lago may have counted: recorded in the seconds up to the read's answer, stored now (its
        # own second included: its records may precede it; and those made while Lago computed it, their events
        # delivered meanwhile: a slow read's calls were counted twice, the org refused below its limit until its
        # period's end). As the Redis STORE script takes them.
        last = int(max(snapshot.requested_at, now))
        if last >= cutoff:
            # Those of them the prune dropped are stamped as recorded in the read's second: unsure, as its records
            # (counted twice at worst, not under-counted), dropped by a read settle_lag later as they are
            for kind, buckets in enumerate((counts.c, counts.t)):
                lost = lacking[kind] - sum(buckets.values())
                if lost > 0:
                    buckets[last] = buckets.get(last, 0) + lost
                    if kind:
                        counts.tokens += lost
                    else:
                        counts.calls += lost
        unsure_calls = (
            sum(n for sec, n in counts.c.items() if cutoff <= sec <= last) if snapshot.lago_counts_calls else 0
        )
        unsure_tokens = (
            sum(n for sec, n in counts.t.items() if cutoff <= sec <= last) if snapshot.lago_counts_tokens else 0
        )
        if (unsure_calls, unsure_tokens) != (snapshot.unsure_calls, snapshot.unsure_tokens):
            state.snapshot = dataclasses.replace(snapshot, unsure_calls=unsure_calls, unsure_tokens=unsure_tokens)

    async def store(self, org_id: str, snapshot: Snapshot, now: float) -> bool:
        self.store_now(org_id, snapshot, now)
        return True

    def seed(self, org_id: str, snapshot: Snapshot) -> None:
        """Start local counting from ``snapshot`` (Redis fallback: the last usage seen; what was counted here since,
        of its period, is kept)."""
        state = self._org(org_id)
        if state.snapshot is None or state.snapshot.requested_at < snapshot.requested_at:
            key = period_key(snapshot)
            # (what Redis counted is its base here, the unsure records among it: a block that holds only with them
            # stays unsure, answered in seconds and read again, not for the period's end until the snapshot is due)
            state.snapshot = snapshot
            state.seeded = True  # (Redis's usage, its records included: no bound on what Lago lacks)
            if snapshot.active and snapshot.period_start > snapshot.requested_at:  # (not started: see NOT_STARTED)
                state.counts = _Counts(_BEFORE_START)
            elif state.counts.period in ("", key):  # records made here since (not in what Redis showed) are kept
                state.counts.period = key
            else:
                state.counts = _Counts(key)

    def drain(self) -> list[tuple[str, Snapshot | None, _Counts]]:
        """Every org's local records, cleared (handed to Redis when it is back)."""
        out = [
            (org_id, state.snapshot, state.counts)
            for org_id, state in self._orgs.items()
            if state.counts.calls or state.counts.tokens
        ]
        self._orgs.clear()
        return out

    def has_records(self) -> bool:
        """Whether any org's records are kept here (what :meth:`drain` would hand out)."""
        return any(state.counts.calls or state.counts.tokens for state in self._orgs.values())

    def restore(self, drained: list[tuple[str, Snapshot | None, _Counts]]) -> None:
        """Take back records :meth:`drain` handed out that could not be merged into Redis."""
        for org_id, snapshot, counts in drained:
            state = self._org(org_id)
            if state.snapshot is None:
                state.snapshot = snapshot
                state.seeded = True  # (maybe seeded; of records older than it, some: no bound on what Lago lacks)
            if not state.counts.period:
                state.counts.period = counts.period
            state.counts.add(counts)

    async def try_lock(self, org_id: str, ttl: float, now: float) -> bool:
        return True

    async def wait_snapshot(self, org_id: str, timeout: float, after: float = 0.0) -> None:  # noqa: ASYNC109
        return None

    async def invalidate(self, org_id: str) -> None:
        state = self._orgs.get(org_id)
        if state is not None:
            state.snapshot = None

    async def mark_due(self, org_id: str) -> None:
        """The org's usage is read again at its next request; its snapshot serves until then (a usage webhook)."""
        state = self._orgs.get(org_id)
        if state is not None and state.snapshot is not None and state.snapshot.refresh_at:
            state.snapshot = dataclasses.replace(state.snapshot, refresh_at=0.0)

    async def unlock(self, org_id: str, now: float, seconds: float) -> None:
        return None  # (the lock of one process is its in-flight refresh)

    async def compact(self, org_id: str, before: int) -> None:
        state = self._orgs.get(org_id)
        if state is not None:
            state.counts.compact(before)

    async def invalidate_all(self) -> None:
        for state in self._orgs.values():
            if state.snapshot is not None:
                state.snapshot = dataclasses.replace(state.snapshot, refresh_at=0.0, plan_fetched_at=0.0, version="")

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        return None
