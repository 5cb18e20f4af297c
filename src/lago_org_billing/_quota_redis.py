"""Redis backend of the quota gate: one count and one snapshot per org for the whole fleet.

Keys (``{org}`` is a Redis Cluster hash tag, so one org's keys share a slot; an org id that is empty or starts with
"}", which would make an empty tag, has ``<prefix>}{~}<org>:<kind>`` instead). On a cluster, ``LAGO_REDIS_URL`` must
hold every slot (cluster mode with one shard): a node answering MOVED is refused once (see ``_refuse_sharded``)::

    <prefix>{<org>}:snap    hash: the Snapshot (v, a, plan, cust, cl, tl, ps, pe, bc, bt, rq, fa, pf, ra, src, lc, lt,
                            iv, ea, np, ne, an)
    <prefix>{<org>}:count   hash: p (period start), calls, tokens, 1-second buckets c:<s>, t:<s>, i:<s>, and per call
                            in flight its reservation's mark r:<mark> = <s> (see ``RedisBackend._release_lost``)
    <prefix>{<org>}:lock    held-until time (SET PX <ttl>): the one process of the fleet refreshing the org; "0"
                            after an invalidation (free, and marks the refresh in flight then as superseded)

* **reserve** (``CHECK`` script, one round trip): read the snapshot and the counters, compare with the limits,
  ``HINCRBY`` when allowed, return (outcome, calls, tokens, limit hit) plus the snapshot fields when the caller's copy
  is out of date. A counter of another period is reset; one made before any snapshot (fail-open) adopts the first
  snapshot's period, less the usage recorded before that period began. The counter expires one hour after its period
  ends (relative to the caller's clock). A snapshot whose period is over is rolled over there, atomically (see
  "Billing-period rollover" in :mod:`._quota`): when its ``ne`` (the next period's estimated end) is later than now,
  and its period ended less than ``PERIOD_MARGIN_MS`` ago, the script turns it into the next period's provisional
  snapshot (``ps`` = the old ``pe``, ``pe`` = ``ne``, usage base 0, due now, version ``<old>+``) and resets the counter
  to that period; it only does so on a snapshot whose period is over, so it never overwrites a newer one another
  worker stored. Otherwise the org is cold (missing).
* **settle** (``SETTLE`` script): queued by the sync ``settle`` and written by a background task, pipelined. One of
  another period than the counter's is dropped (but for the one its records were carried from, ``pp`` below); one
  finding no counter (Redis restarted without its data, or evicted it) makes it again for its period, unless the
  org's snapshot is of another period or its period is over. One of a call checked before the counter's period began
  (the second of its reservation, or the date of its event for a request's tokens settled once that is built) is
  dropped when it names the carried period or none (a call let through before any snapshot): billed in the one before.
  One of none finding no counter (usage recorded without a check) is of the org's snapshot's period, which names the
  counter; before that period starts (``NOT_STARTED``) it is dropped, as usage dated before it is.
* **store** (``STORE`` script): replaces the snapshot unless a newer one is there, drops the recorded buckets
  older than ``requested_at - settle_lag`` or than the period's start (and in-flight ones older than
  ``inflight_horizon``). A counter of another period has the records made since the new period began carried over
  (``pp``: the period they came from, whose settles of those calls then apply), but for a counter of the stored
  snapshot's period when that period ended at or before the new one's start (the next period, read before any check
  rolled it over): it starts afresh. One made before any snapshot adopts its period, less the calls in flight since
  before the period began (billed in the one before). One of a period not started yet
  (a subscription starting later today, see ``NOT_STARTED``) is dropped: nothing is counted before it starts. A
  snapshot of a period before the stored one's (a read begun before a rollover, Lago's clock behind) is not stored:
  the refresh hands its lock back. A refresh whose
  lock is no longer its own (an invalidation in any process set it to "0", or another process took it over) stores
  nothing: what it read may predate the change (the refresher reads again).

Redis down (connection refused, timeout, any ``RedisError``): the backend switches to the in-process
:class:`~._quota_local.LocalBackend`, seeded with the last usage each org was seen at, logs once, sets
``stats["redis_fallback"]`` to 1 and counts ``redis_errors``; every ``redis_retry_interval`` seconds the next
call tries Redis again (and so does the background writer, however idle the worker) with a write (``PROBE``: a
replica's READONLY, an OOM, a missing ACL permission keep it down, where a PING passed). After a READONLY (a failover
made the node a replica) the pooled connections are dropped first: new ones reach the endpoint's new primary. A
misconfiguration or a state only an operator ends (a replica's URL, TLS, credentials, ACL permissions, maxmemory) is
said once, as what to change (``_problem``), not as an outage. When Redis answers again, the
records made meanwhile are added to its counters (those of a period after a counter's, made past a boundary on a
provisional snapshot, replace it) before Redis decides for their orgs again: a check merges its own org's records
itself (or waits for that org's merge alone), the background writer the rest, a few orgs at once. Calls still running
are handed over in flight (kept by snapshots, released or recorded in Redis when they end), not as finished calls.
Before that, what Redis ran for this process while its answers were lost (a connection dropped, a reply slower than
``redis_timeout``) is settled: a reservation CHECK made (its call was counted here) is released, a refresh lock LOCK
took is handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import ssl
import sys
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc
from cachetools import LRUCache

from . import _forks
from ._errors import ConfigurationError, QuotaBackendError
from ._ids import ascii_digits
from ._periods import period_key
from ._quota import QuotaConfig
from ._quota_local import LocalBackend, _Counts, _reads
from ._settings import masked_url, redact_url
from ._snapshots import ALLOWED, BLOCKED, CLOCK_STEP, COUNTED, MISSING, NOT_STARTED, Mode, Outcome, Snapshot

__all__ = ["RedisBackend"]

_T = TypeVar("_T")

logger = logging.getLogger("lago_org_billing.quota")

#: Counters outlive their billing period by this much (ms), snapshots of orgs without a subscription their refresh
#: time, and counters made before any snapshot ``inflight_horizon``; those of a merge after a Redis outage, when
#: nothing else set their expiry, live as long as their records' period (``UNPERIODED_TTL_MS``: records of none).
PERIOD_MARGIN_MS = 3_600_000
UNPERIODED_TTL_MS = 86_400_000


def renew_pool_after_fork(client: Any) -> None:
    """In a process forked from the one that made ``client`` (a redis-py asyncio client this package made): a
    connection pool of its own, made as the parent's was. The parent's pooled connections (its sockets, and a
    ``BlockingConnectionPool``'s condition bound to its event loop) are kept referenced, never used nor closed: a
    command the child wrote on them would have its reply read by the parent as the answer to its own."""
    old = client.connection_pool
    options: dict[str, Any] = {
        "connection_class": old.connection_class,
        "max_connections": old.max_connections,
        **old.connection_kwargs,
    }
    if hasattr(old, "timeout") and hasattr(old, "_condition"):  # (a BlockingConnectionPool: how long to wait for one)
        options["timeout"] = old.timeout
    client.connection_pool = type(old)(**options)
    _forks.left_by_parent.append(old)


def _expiry_ms(until: float, now: float) -> int:
    """The expiry (ms) of a key needed until ``until``: that, and the ``PERIOD_MARGIN_MS`` margin after it."""
    return max(int((until - now) * 1000), 1) + PERIOD_MARGIN_MS


#: Settles kept for Redis while it is down (beyond: counted locally, as a fallback decision would be).
_MAX_QUEUED_SETTLES = 100_000

#: (Lua, heading the scripts that name a counter made before any snapshot after the period starting at ``start``: its
#: records made before then are dropped, as STORE drops them: their events, dated before it, are not billed in it. The
#: calls in flight are left to their settles, which SETTLE drops when checked before it.)
_DROP_BEFORE = """
local function drop_before(cnt, start)
  start = math.floor(tonumber(start))
  local old = redis.call('HGETALL', cnt)
  for i = 1, #old, 2 do
    local kind = string.sub(old[i], 1, 2)
    if kind == 'c:' or kind == 't:' then
      local sec = tonumber(string.sub(old[i], 3))
      if sec and sec < start then
        redis.call('HDEL', cnt, old[i])
        redis.call('HINCRBY', cnt, kind == 't:' and 'tokens' or 'calls', -tonumber(old[i + 1]))
      end
    end
  end
end
"""

#: (Lua, heading the scripts that release a call in flight: one of second ``second`` is no longer, its call uncounted;
#: none there, as a settle of it ran already, nothing is.)
_RELEASE = """
local function release(cnt, second)
  local field = 'i:' .. second
  local left = tonumber(redis.call('HGET', cnt, field) or '0')
  if left > 0 then
    if left == 1 then redis.call('HDEL', cnt, field) else redis.call('HINCRBY', cnt, field, -1) end
    redis.call('HINCRBY', cnt, 'calls', -1)
  end
end
"""

CHECK = (
    _DROP_BEFORE
    + """
local snap, cnt = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local bucket = ARGV[2]
local mode = ARGV[3]
local s = redis.call('HMGET', snap, 'v', 'a', 'cl', 'tl', 'ps', 'pe', 'bc', 'bt')
local v = s[1]
local full = {}
if v and v ~= ARGV[4] then full = redis.call('HGETALL', snap) end
local cp = redis.call('HGET', cnt, 'p')
if v and s[2] == '1' and now >= tonumber(s[6]) then
  if cp == s[5] then redis.call('DEL', cnt); cp = false end
  local ne = redis.call('HGET', snap, 'ne')
  -- (within the margin after the boundary that the snapshot is kept: later, it is cold, as once it expired)
  if ne and tonumber(ne) > now and now < tonumber(s[6]) + tonumber(ARGV[5]) / 1000 then
    -- rollover: the next period's provisional snapshot (see the module docstring), due at once
    v = v .. '+'
    redis.call('HSET', snap, 'v', v, 'ps', s[6], 'pe', ne, 'bc', '0', 'bt', '0', 'uc', '0', 'ut', '0', 'ra', ARGV[1],
      'ne', '0')
    redis.call('PEXPIRE', snap, math.max(1, math.floor((tonumber(ne) - now) * 1000)) + tonumber(ARGV[5]))
    s[5], s[6], s[7], s[8] = s[6], ne, '0', '0'
    full = {}
    if v ~= ARGV[4] then full = redis.call('HGETALL', snap) end
  else
    v = false
  end
end
if not v then
  if mode ~= 'b' then return {0, 0, 0, '', full} end
  local c = redis.call('HINCRBY', cnt, 'calls', 1)
  redis.call('HINCRBY', cnt, 'i:' .. bucket, 1)
  redis.call('HSET', cnt, 'r:' .. ARGV[7], bucket)
  if not cp then redis.call('PEXPIRE', cnt, ARGV[6]) end
  return {4, c, tonumber(redis.call('HGET', cnt, 'tokens') or '0'), '', full}
end
if s[2] ~= '1' then return {3, 0, 0, '', full} end
if now < tonumber(s[5]) then
  -- its period has not started (a subscription starting later today: Lago ignores the events dated before it):
  -- served, nothing counted (the 6th value: see NOT_STARTED)
  return {1, tonumber(s[7]), tonumber(s[8]), '', full, 1}
end
if cp ~= s[5] then
  -- (re)created for this period: it expires with it, whether or not this check reserves (a peek, a block)
  if cp then
    redis.call('DEL', cnt)
  else
    -- made before any snapshot (calls let through, usage recorded) and left so by a worker of the release before
    -- this one (its SETTLE counted usage recorded before a late start there, its STORE does not name such a
    -- counter): its period's, but for the records made before it began
    drop_before(cnt, s[5])
  end
  redis.call('HSET', cnt, 'p', s[5])
  redis.call('PEXPIRE', cnt, math.max(1, math.floor((tonumber(s[6]) - now) * 1000)) + tonumber(ARGV[5]))
end
local calls = tonumber(s[7]) + tonumber(redis.call('HGET', cnt, 'calls') or '0')
local tokens = tonumber(s[8]) + tonumber(redis.call('HGET', cnt, 'tokens') or '0')
local cl, tl = tonumber(s[3]), tonumber(s[4])
local hit = ''
if cl >= 0 and calls + 1 > cl then hit = 'calls' elseif tl >= 0 and tokens >= tl then hit = 'tokens' end
local code = 1
if hit ~= '' then code = 2 end
if mode ~= 'p' and (hit == '' or mode == 'f' or mode == 'b') then
  redis.call('HINCRBY', cnt, 'calls', 1)
  redis.call('HINCRBY', cnt, 'i:' .. bucket, 1)
  -- the reservation's mark (ARGV[7]), deleted by its settle: one whose answer was lost is released by it
  redis.call('HSET', cnt, 'r:' .. ARGV[7], bucket)
  redis.call('PEXPIRE', cnt, math.max(1, math.floor((tonumber(s[6]) - now) * 1000)) + tonumber(ARGV[5]))
  calls = calls + 1
end
return {code, calls, tokens, hit, full}
"""
)

SETTLE = (
    _DROP_BEFORE
    + _RELEASE
    + """
local cnt = KEYS[1]
local period = ARGV[1]
local before = false
-- (ARGV[9]: the mark of the reservation settled, '' none: see CHECK; its answer came, it is no longer needed)
if ARGV[9] ~= '' then redis.call('HDEL', cnt, 'r:' .. ARGV[9]) end
if period ~= '' then
  local cp = redis.call('HGET', cnt, 'p')
  if not cp then
    -- no counter of any period (Redis restarted without its data, or evicted it at maxmemory): the records are of
    -- that period, which the org's next snapshot keeps (if of that period, within settle_lag) or drops; not lost
    -- before Lago has them (the in-process backend keeps them too)
    local s = redis.call('HMGET', KEYS[2], 'v', 'a', 'ps', 'pe')
    -- (the org's period changed since, or is over, or it has no subscription: nothing of it counts any more)
    if s[1] and (s[2] ~= '1' or s[3] ~= period or tonumber(s[4]) <= tonumber(ARGV[3])) then return 0 end
    redis.call('HSET', cnt, 'p', period)
    if s[1] then  -- (as long as its period, as the CHECK script's; else until the next snapshot's STORE)
      redis.call('PEXPIRE', cnt, math.floor((tonumber(s[4]) - tonumber(ARGV[3])) * 1000) + ARGV[7])
    end
  elseif cp ~= period then
    -- a period begun within this one since (STORE carried its records over, 'pp' naming the one they came from):
    -- the calls of that one made since the new one began are its own
    -- (ARGV[8]: the second its call was checked in, its reservation's or its event's date; '' not known): one
    -- checked before the new period began is the old one's, its tokens settled when its event is built included
    if redis.call('HGET', cnt, 'pp') ~= period then return 0 end
    before = ARGV[8] ~= '' and tonumber(ARGV[8]) < math.floor(tonumber(cp))
  end
else
  -- of no period (a call let through before any snapshot, usage recorded without a check): of the counter's period
  local cp = redis.call('HGET', cnt, 'p')
  if not cp then
    -- none yet (the org's snapshot was stored while its period had not started, which dropped the counter): named
    -- after the snapshot's period, as the CHECK script names it (and the in-process backend its records)
    local s = redis.call('HMGET', KEYS[2], 'v', 'a', 'ps', 'pe')
    if s[1] and s[2] == '1' and tonumber(ARGV[3]) < tonumber(s[4]) then
      if tonumber(ARGV[3]) < tonumber(s[3]) then
        before = true  -- its period has not started (see NOT_STARTED): Lago bills none of it
      else
        cp = s[3]
        drop_before(cnt, cp)
        redis.call('HSET', cnt, 'p', cp)
        redis.call('PEXPIRE', cnt, math.max(1, math.floor((tonumber(s[4]) - tonumber(ARGV[3])) * 1000)) + ARGV[7])
      end
    end
  end
  -- a call checked before any snapshot (fail-open), before the period its counter was then adopted into (see
  -- STORE), or usage dated before the period: billed in the period before (or in none: a subscription's first),
  -- nothing of it counts here (nor a call's tokens, settled when its event is built)
  local start = tonumber(cp or '')
  if start and ARGV[8] ~= '' and tonumber(ARGV[8]) < math.floor(start) then before = true end
end
if ARGV[2] ~= '' then
  -- (released even so: one checked before the period, in flight here still, was adopted with a counter made before
  -- any snapshot by a check, or a STORE of a release before this one, or handed over by a MERGE)
  release(cnt, ARGV[2])
end
if before then return 0 end
if ARGV[4] == '1' then
  redis.call('HINCRBY', cnt, 'c:' .. ARGV[3], 1)
  redis.call('HINCRBY', cnt, 'calls', 1)
end
local tk = tonumber(ARGV[5])
if tk > 0 then
  redis.call('HINCRBY', cnt, 't:' .. ARGV[3], tk)
  redis.call('HINCRBY', cnt, 'tokens', tk)
end
if redis.call('PTTL', cnt) == -1 then redis.call('PEXPIRE', cnt, ARGV[6]) end
return 1
"""
)

STORE = """
local snap, cnt, lock = KEYS[1], KEYS[2], KEYS[3]
if ARGV[10] ~= '' then
  -- the refresh took the lock: if it is no longer its own, the org was invalidated meanwhile (a webhook in any
  -- process) or another process refreshes it since: what this one read may predate the change
  local holder = redis.call('GET', lock)
  if holder and holder ~= ARGV[10] then return -1 end
end
local cur = redis.call('HMGET', snap, 'rq', 'a', 'ps', 'pe', 'bc', 'bt', 'uc', 'ut', 'cust', 'cl', 'tl', 'lc', 'lt')
-- (one requested past ARGV[13], the caller's now + CLOCK_STEP, was read on a clock stepped back since: replaced)
if cur[1] and tonumber(cur[1]) > tonumber(ARGV[1]) and tonumber(cur[1]) <= tonumber(ARGV[13]) then return 0 end
if cur[2] == '1' and cur[3] and ARGV[6] ~= '' and tonumber(ARGV[6]) <= tonumber(cur[3]) then
  -- a period before the stored one's (read before a rollover, or Lago's clock behind): not stored; the lock this
  -- refresh took is handed back (its process reads again after its backoff, others when theirs ask)
  if ARGV[10] ~= '' and redis.call('GET', lock) == ARGV[10] then
    redis.call('SET', lock, ARGV[6], 'PX', math.max(1, tonumber(ARGV[7])))
  end
  return 0
end
redis.call('DEL', snap)
redis.call('HSET', snap, unpack(ARGV, 20))
redis.call('PEXPIRE', snap, ARGV[4])
if ARGV[10] ~= '' and redis.call('GET', lock) == ARGV[10] then
  -- the lock this refresh took ends when the snapshot is due (its jittered time), not a whole TTL after it began
  redis.call('SET', lock, ARGV[11], 'PX', ARGV[12])
end
if ARGV[6] ~= '' then
  -- the fleet's refresh lock ends with the snapshot's period at the latest: the first gate to see the new period
  -- refreshes at once, instead of every gate waiting out the TTL without a usable snapshot
  local held = tonumber(redis.call('GET', lock) or '0')
  if held > tonumber(ARGV[6]) then redis.call('SET', lock, ARGV[6], 'PX', math.max(1, tonumber(ARGV[7]))) end
end
local ps = ARGV[5]
local cp = redis.call('HGET', cnt, 'p')
local since = tonumber(ps)
-- the last read of Lago, of these records (its period's, the same customer's): its usage and the unsure records it
-- kept, of the calls ('c') and tokens ('t') where both reads bound what Lago lacks (ARGV[17], ARGV[18]: this read's
-- usage, -1 where not; see _not_in_lago)
local was = {}
if cur[2] == '1' and cp and cp == ps and cur[3] == ps and (cur[9] or '') == ARGV[19] then
  if cur[10] ~= '-1' and cur[12] ~= '0' then was.c = {tonumber(cur[5] or '0'), tonumber(cur[7] or '0')} end
  if cur[11] ~= '-1' and cur[13] ~= '0' then was.t = {tonumber(cur[6] or '0'), tonumber(cur[8] or '0')} end
end
if since and tonumber(ARGV[16]) < since then
  -- its period has not started (see the CHECK script): nothing is counted until it does
  redis.call('DEL', cnt)
  return 1
end
if cp and cp ~= ps then
  if ARGV[6] == '' then redis.call('DEL', cnt); return 1 end
  if cur[2] == '1' and cur[3] == cp and cur[4] and tonumber(cur[4]) <= since then
    -- the period after the stored one (read as it ended, before any check rolled it over): its records begin with
    -- it. Those kept are of calls checked before its start (recorded after it, some), billed in the period that
    -- ended, as are the tokens of those calls still to be settled (no 'pp': their settles are dropped)
    redis.call('DEL', cnt)
    redis.call('HSET', cnt, 'p', ps)
  else
    -- a period begun within the counter's (an upgrade, terminated and subscribed again, a downgrade switched after
    -- the boundary): the records made since it began, which Lago may not have counted yet (the last settle_lag
    -- seconds', those in flight), are carried over to it ('pp': the settles of the old period's calls made since
    -- apply here); those before it are the old subscription's
    local old = redis.call('HGETALL', cnt)
    redis.call('DEL', cnt)
    redis.call('HSET', cnt, 'p', ps, 'pp', cp)
    local start = math.floor(since)
    for i = 1, #old, 2 do
      local f = old[i]
      if string.sub(f, 2, 2) == ':' then
        local kind, sec, val = string.sub(f, 1, 1), tonumber(string.sub(f, 3)), tonumber(old[i + 1])
        if sec and sec >= start and (kind == 'c' or kind == 't' or kind == 'i') then
          redis.call('HINCRBY', cnt, f, val)
          redis.call('HINCRBY', cnt, kind == 't' and 'tokens' or 'calls', val)
        elseif kind == 'r' and val >= start then
          redis.call('HSET', cnt, f, val)  -- (the mark of a reservation carried over: its value is its second)
        end
      end
    end
  end
  cp = ps
elseif not cp and ARGV[6] ~= '' and redis.call('EXISTS', cnt) == 1 then
  -- records made before any snapshot (calls LAGO_FAIL_OPEN let through) are its period's, but for the calls in
  -- flight since before it began (before a boundary, or an upgrade made meanwhile): their events, dated at their
  -- checks, are billed in the period before (SETTLE drops their settles, which name no period)
  redis.call('HSET', cnt, 'p', ps)
  local start = math.floor(since)
  local old = redis.call('HGETALL', cnt)
  for i = 1, #old, 2 do
    local f = old[i]
    if string.sub(f, 1, 2) == 'i:' then
      local sec = tonumber(string.sub(f, 3))
      if sec and sec < start then
        redis.call('HDEL', cnt, f)
        redis.call('HINCRBY', cnt, 'calls', -tonumber(old[i + 1]))
      end
    end
  end
  cp = ps
end
-- a counter of this period lives as long as it (one a settle made again after Redis lost it expires sooner)
if cp and ARGV[6] ~= '' then redis.call('PEXPIRE', cnt, ARGV[4]) end
local cutc, cuti = tonumber(ARGV[2]), tonumber(ARGV[3])
-- (and the records before the period's start: dated before it, their events are not billed in it)
if since and ARGV[6] ~= '' then cutc = math.max(cutc, math.floor(since)) end
-- records stamped after ARGV[14] (made before a clock was stepped back) are stamped ARGV[15] (now): see prune()
local late, now = tonumber(ARGV[14]), ARGV[15]
-- records Lago does not count (ARGV[8] calls, ARGV[9] tokens: '1') are folded into second 0, not dropped
local keep = {c = ARGV[8] == '1', t = ARGV[9] == '1'}
-- what is kept that Lago may have counted (recorded from the cutoff to the read's own second, of what Lago counts):
-- the snapshot's 'uc'/'ut' (see LocalBackend.store_now)
-- (to the read's answer, stored now (ARGV[15]): what was recorded while Lago computed it may be in it too, its events
-- delivered meanwhile; as LocalBackend.store_now takes them)
local last = math.max(math.floor(tonumber(ARGV[1])), math.floor(tonumber(ARGV[15])))
local unsure = {c = 0, t = 0}
-- the records of the period held before the prune, and those it keeps (see the bound below)
local held, kept = {c = 0, t = 0}, {c = 0, t = 0}
local fields = redis.call('HGETALL', cnt)
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, 2, 2) == ':' then
    local kind, sec, val = string.sub(f, 1, 1), tonumber(string.sub(f, 3)), tonumber(fields[i + 1])
    if (kind == 'c' or kind == 't') then
      if since and sec >= math.floor(since) then held[kind] = held[kind] + val end
      if sec > late or sec >= cutc or keep[kind] then kept[kind] = kept[kind] + val end
    end
    if kind == 'r' then
      -- (a reservation's mark, its value its second: gone with the calls in flight no settle came for)
      if val < cuti then redis.call('HDEL', cnt, f) end
    elseif kind == 'i' and sec < cuti then
      redis.call('HDEL', cnt, f)
      redis.call('HINCRBY', cnt, 'calls', -val)
    elseif (kind == 'c' or kind == 't') and sec > late then
      redis.call('HDEL', cnt, f)
      redis.call('HINCRBY', cnt, kind .. ':' .. now, val)
      -- (made before the read, on a clock stepped back since: unsure as the records of second now are)
      if tonumber(now) >= cutc and tonumber(now) <= last and not keep[kind] then unsure[kind] = unsure[kind] + val end
    elseif (kind == 'c' or kind == 't') and sec < cutc then
      if keep[kind] then
        if sec ~= 0 then
          redis.call('HDEL', cnt, f)
          redis.call('HINCRBY', cnt, kind .. ':0', val)
        end
      else
        redis.call('HDEL', cnt, f)
        redis.call('HINCRBY', cnt, kind == 'c' and 'calls' or 'tokens', -val)
      end
    elseif (kind == 'c' or kind == 't') and sec <= last and not keep[kind] then
      unsure[kind] = unsure[kind] + val
    end
  end
end
-- Lago's usage bounds what it lacks, whatever the clock says (see LocalBackend.store_now): of the records held since
-- the last read, all but its unsure ones and what the usage grew by since. Those the prune dropped (made before the
-- clock was stepped forward, their events on their way) are stamped as recorded in the read's second: unsure
if last >= cutc then
  for kind, read in pairs({c = tonumber(ARGV[17]), t = tonumber(ARGV[18])}) do
    local w = was[kind]
    if w and read >= 0 and w[1] >= 0 and w[1] <= read then
      local lost = held[kind] - w[2] - (read - w[1]) - kept[kind]
      if lost > 0 then
        redis.call('HINCRBY', cnt, kind .. ':' .. last, lost)
        redis.call('HINCRBY', cnt, kind == 'c' and 'calls' or 'tokens', lost)
        unsure[kind] = unsure[kind] + lost
      end
    end
  end
end
redis.call('HSET', snap, 'uc', unsure.c, 'ut', unsure.t)
return 1
"""

MERGE = """
-- ARGV[3] the recorded calls (in second ARGV[2]), ARGV[4] the tokens, ARGV[7] the calls in flight ('<second>:<n>,...':
-- kept in flight, released or recorded by their settle, as a call reserved here is; not dropped by the next snapshots).
-- KEYS[2] this merge's mark; KEYS[3..] the marks of earlier merges of these records cut off (their outcome unknown),
-- latest first, ARGV[3k - 1], ARGV[3k], ARGV[3k + 1] the recorded calls, tokens and calls in flight each handed over
-- (cumulative: each one the org's records at its time, the earlier ones' included). Only what the latest one applied
-- leaves is added: a merge cut off after Redis applied it, merged again with the records counted since, counts them
-- once.
local cnt = KEYS[1]
local calls, tokens = tonumber(ARGV[3]), tonumber(ARGV[4])
local inflight = {}
for sec, n in string.gmatch(ARGV[7], '(%d+):(%d+)') do inflight[sec] = (inflight[sec] or 0) + tonumber(n) end
for k = 3, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    calls = calls - tonumber(ARGV[3 * k - 1])
    tokens = tokens - tonumber(ARGV[3 * k])
    for sec, n in string.gmatch(ARGV[3 * k + 1], '(%d+):(%d+)') do
      inflight[sec] = (inflight[sec] or 0) - tonumber(n)
    end
    break
  end
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[6])
local cp = redis.call('HGET', cnt, 'p')
if ARGV[1] ~= '' and cp and cp ~= ARGV[1] then
  -- records of a later period than the counter's (made here past the boundary, on a provisional snapshot, while
  -- Redis was down and nobody rolled the org over there): the counter's period is over, it is replaced
  local old, new = tonumber(cp), tonumber(ARGV[1])
  if not old or not new or old >= new then return 0 end
  redis.call('DEL', cnt)
  redis.call('HSET', cnt, 'p', ARGV[1])
  redis.call('PEXPIRE', cnt, ARGV[5])
elseif ARGV[1] ~= '' and not cp then
  -- (no counter, Redis restarted or it expired: these records keep their period, so that a snapshot of another
  -- period drops them instead of adopting them as those of a counter made before any snapshot; one made before any
  -- snapshot adopts it, as at a check, and the settles of the calls in flight, of that period, apply to it)
  redis.call('HSET', cnt, 'p', ARGV[1])
  redis.call('PEXPIRE', cnt, ARGV[5])
end
if calls ~= 0 then
  redis.call('HINCRBY', cnt, 'c:' .. ARGV[2], calls)
  redis.call('HINCRBY', cnt, 'calls', calls)
end
if tokens ~= 0 then
  redis.call('HINCRBY', cnt, 't:' .. ARGV[2], tokens)
  redis.call('HINCRBY', cnt, 'tokens', tokens)
end
for sec, n in pairs(inflight) do
  if n ~= 0 then
    local field = 'i:' .. sec
    local old = tonumber(redis.call('HGET', cnt, field) or '0')
    local left = math.max(old + n, 0)
    if left > 0 then redis.call('HSET', cnt, field, left) else redis.call('HDEL', cnt, field) end
    redis.call('HINCRBY', cnt, 'calls', left - old)
  end
end
if redis.call('PTTL', cnt) == -1 then redis.call('PEXPIRE', cnt, ARGV[5]) end
return 1
"""


#: Merges of one org's records cut off in a row that the next merge looks for: bounded (a Redis failing every merge
#: of it), the oldest are let go (one of them applied and none of the later: its calls would be counted twice).
_MAX_UNCERTAIN = 8


EXPIRE_SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ra', '0', 'pf', '0')
end
redis.call('SET', KEYS[2], '0', 'PX', ARGV[2])
return 1
"""

#: Mark one org's snapshot due (a usage webhook): a new version (the gates' copies are sent again), due now; its lock
#: is freed and marked (a refresh in flight stores nothing, reading again).
MARK_DUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ra', '0')
end
redis.call('SET', KEYS[2], '0', 'PX', ARGV[2])
return 1
"""

#: Invalidate one org: its snapshot goes, its lock is freed and marked (a refresh in flight stores nothing).
INVALIDATE = """
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '0', 'PX', ARGV[1])
return 1
"""

#: How long an invalidation's mark on the lock lasts: longer than any refresh in flight takes (client timeouts).
_INVALIDATION_MARK_MS = 600_000


#: An unsure block (see QuotaGate._unsure_until): the fleet's refresh lock, held since the org's snapshot was stored
#: until it is due, is freed when that snapshot (ARGV[1], its version) is still the stored one and no refresh holds
#: the lock (its value is the snapshot's due time as STORE left it, or its period's end when STORE capped it there):
#: the org is read again at once, by one gate. An invalidation's mark ("0", free to take) is left: a refresh in
#: flight in any process since before it still stores nothing.
READ_AGAIN = """
local s = redis.call('HMGET', KEYS[1], 'v', 'ra', 'pe')
if s[1] ~= ARGV[1] then return 0 end
local cur = redis.call('GET', KEYS[2])
if cur and (cur == '0' or (cur ~= s[2] and cur ~= s[3])) then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""


UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


#: A reservation whose answer was lost (see ``RedisBackend._release_lost``): released (as SETTLE releases a call not
#: billed) when its mark (ARGV[1]) says CHECK made it, and its settle did not come. Once: the mark goes with it.
RELEASE_LOST = (
    _RELEASE
    + """
local cnt = KEYS[1]
if redis.call('HDEL', cnt, 'r:' .. ARGV[1]) == 0 then return 0 end
release(cnt, ARGV[2])
return 1
"""
)


COMPACT = """
local cnt = KEYS[1]
local before = tonumber(ARGV[1])
local fields = redis.call('HGETALL', cnt)
local sum, last = {c = 0, t = 0}, {c = -1, t = -1}
for i = 1, #fields, 2 do
  local f = fields[i]
  local kind = string.sub(f, 1, 1)
  if (kind == 'c' or kind == 't') and string.sub(f, 2, 2) == ':' then
    local sec = tonumber(string.sub(f, 3))
    if sec > 0 and sec < before then
      redis.call('HDEL', cnt, f)
      sum[kind] = sum[kind] + tonumber(fields[i + 1])
      if sec > last[kind] then last[kind] = sec end
    end
  end
end
for _, kind in ipairs({'c', 't'}) do
  if last[kind] >= 0 then redis.call('HINCRBY', cnt, kind .. ':' .. last[kind], sum[kind]) end
end
return 1
"""


LOCK = """
local cur = redis.call('GET', KEYS[1])
-- taken when free (expired, or '0': invalidated; or held until after ARGV[5], the caller's now + the longer of TTL
-- and failure_backoff + CLOCK_STEP: taken on a clock stepped back since), or renewed by the process holding it
-- (ARGV[4], its value)
local held = tonumber(cur or '0')
if cur ~= ARGV[4] and held > tonumber(ARGV[1]) and held <= tonumber(ARGV[5]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


#: The recovery probe: whether Redis takes this process's writes again (a ``SET``, which a replica answers with
#: READONLY, a Redis out of memory with OOM, an ACL user without the permission with NOPERM; a ``PING`` passes all
#: three, and the next write failed again: the worker flapped between Redis and its own counts for ever). Run with
#: ``EVALSHA``/``EVAL`` as the scripts are, on a key of its own that expires at once.
PROBE = """
redis.call('SET', KEYS[1], '1', 'PX', 1000)
return 1
"""


def _redis() -> Any:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError:
        raise ConfigurationError(
            "LAGO_REDIS_URL is set but the redis client is not installed: pip install 'lago-org-billing[redis]'.",
            variable="LAGO_REDIS_URL",
        ) from None
    return redis_asyncio


def _redis_errors(*names: str) -> tuple[type[BaseException], ...]:
    """The redis-py exception classes named (none without redis-py: a custom client)."""
    try:
        from redis import exceptions
    except ImportError:  # pragma: no cover - a custom client
        return ()
    return tuple(getattr(exceptions, name) for name in names)


@dataclasses.dataclass(frozen=True)
class RedisUse:
    """A user of Redis, as :func:`redis_problem` names it: ``who`` (``"the quota backend"``), what it ``writes``
    (``"its counters"``), ``refused`` (whose writes an OOM refuses: ``"the quota counters'"``), ``keys`` (``"quota
    key"``), ``prefix`` (its keys' prefix, for the ACL to grant) and ``meanwhile`` (what happens until it is fixed)."""

    who: str
    writes: str
    refused: str
    keys: str
    prefix: str
    meanwhile: str


_QUOTA_USE = RedisUse("the quota backend", "its counters", "the quota counters'", "quota key", "", "")


def redis_is_readonly(exc: BaseException) -> bool:
    """Whether ``exc`` is a replica's refusal of a write (READONLY: a failover made the node a replica, or the URL
    names one; MASTERDOWN: a replica whose link to its primary is down, with replica-serve-stale-data no)."""
    return isinstance(exc, _redis_errors("ReadOnlyError")) or any(
        words in str(exc) for words in ("read only replica", "Link with MASTER is down")
    )


class LoopConnections:
    """The event loop a redis client's pooled connections were last used on, for a client made once and used on one
    loop after another (Starlette's ``TestClient`` without ``with``, a loop per request; pytest's anyio or asyncio
    plugins, a loop per test; ``asyncio.run`` per call): its idle connections belong to the loop that opened them, and
    each first call on the next loop failed with them ("attached to a different loop", "Event loop is closed"), said as
    Redis being unavailable. :meth:`drop_others` drops them before a call on another loop (under trio, and at the first
    use, nothing). Used by the webhooks' dedupe and the idempotency keys' store (the quota backend has its own writer:
    see ``_on_loop``)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    async def drop_others(self, redis: Any, what: str, log: logging.Logger) -> None:
        """Drop ``redis``'s idle pooled connections if this runs on another event loop than the last call's."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (not asyncio: the redis client cannot run here anyway, and its user says so)
            return
        before = self._loop() if self._loop is not None else None
        used, self._loop = self._loop is not None, weakref.ref(loop)
        if before is loop or not used:
            return
        pool = getattr(redis, "connection_pool", None)
        if pool is None:
            return
        try:
            await pool.disconnect(inuse_connections=False)
        except Exception:  # (a dead loop's connection raises as it is dropped: it is dropped all the same)
            log.debug("Dropping %s's connections of another event loop failed", what, exc_info=True)

    def forget(self) -> None:
        """The client is closed: the next one's first use is on whatever loop runs it."""
        self._loop = None


def reconnecting_pool_options(redis_asyncio: Any) -> dict[str, Any]:
    """Options of a redis-py connection pool (or ``from_url``) that hand out a live connection after Redis closed a
    pooled one. redis-py 8 turns maintenance notifications on with RESP3, and with them on its pool hands out a
    connection the server closed without reconnecting it: every connection open when Redis restarted, failed over, or
    dropped idle clients (its ``timeout``, a proxy's) then failed its next command, taken for an outage (the quota gate
    counted alone for ``redis_retry_interval``; the idempotency store and the webhooks' dedupe went without Redis for
    that call: a retry reaching another worker billed again, a webhook run without dedupe)."""
    if hasattr(redis_asyncio.BlockingConnectionPool, "maint_notifications_enabled"):
        from redis.maint_notifications import MaintNotificationsConfig

        return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
    return {}


def unreadable_redis_url(url: str, exc: Exception, what: str) -> ConfigurationError:
    """The error of a ``LAGO_REDIS_URL`` redis-py cannot read (``?socket_timeout=5s``: the settings leave its query to
    redis-py, which refused it with a bare ``ValueError``), naming ``what`` cannot be made; the password masked, in the
    URL and in redis-py's reason. Raise it outside the ``except`` (no chained traceback whose frames held the URL)."""
    problem = f"{type(exc).__name__}: {exc}"
    password = url.rpartition("@")[0].partition("://")[2]
    password = password.partition(":")[2] or password  # (``redis://secret@host``: the password alone)
    if password:
        problem = problem.replace(password, "***")
    return ConfigurationError(
        f"LAGO_REDIS_URL ({masked_url(url)}) cannot be read by redis-py ({problem}): {what} cannot be made. Fix it "
        "(redis://[user:password@]host:port/db, the password percent-encoded, options as redis-py reads them, e.g. "
        "?socket_timeout=5) or unset it.",
        variable="LAGO_REDIS_URL",
    )


class RedisProblems:
    """What one of the package's Redis clients knows of its Redis, for :func:`redis_problem`, and what it said of it:
    whether Redis answered once and took a write once (``READONLY`` after a write: a failover; before: a replica's
    URL), and the kinds of problem said since it last answered (each said once). ``url``: ``None`` for a client
    given; ``log``: the client's own logger."""

    def __init__(self, use: RedisUse, url: str | None, log: logging.Logger) -> None:
        self.use = use
        self.shown_url = redact_url(url) if url else "the given client"  # for logs: no password
        self.plain = bool(url) and str(url).lower().startswith("redis://")
        self.log = log
        self.answered = False
        self.wrote = False
        self.said: set[str] = set()

    def succeeded(self, *, write: bool) -> None:
        """Redis answered (and took a write, ``write``): the problems may be said again should they come back."""
        self.answered = True
        self.wrote = self.wrote or write
        self.said.clear()

    async def failed(self, exc: BaseException, client: Any) -> tuple[bool, bool]:
        """Say what :func:`redis_problem` makes of ``exc`` (once per kind); after a ``READONLY`` drop the idle pooled
        connections of ``client`` (they reach a node a failover made a replica; those in use drop at their own
        READONLY). ``(known, again)``: ``known``, a problem it named (else an outage, the caller's to say); ``again``,
        a READONLY after a write (a failover: the endpoint may name the new primary already), to call once more."""
        problem = redis_problem(
            exc, self.use, url=self.shown_url, wrote=self.wrote, answered=self.answered, plain=self.plain
        )
        if problem is None:
            return False, False
        kind, level, message = problem
        again = False
        if kind == "readonly":
            pool = getattr(client, "connection_pool", None)
            if pool is not None:
                with contextlib.suppress(Exception):
                    await pool.disconnect(inuse_connections=False)
            again = self.wrote
        if kind not in self.said:
            self.said.add(kind)
            self.log.log(level, "%s", message)
        return True, again


def redis_problem(
    exc: BaseException, use: RedisUse, *, url: str, wrote: bool, answered: bool, plain: bool
) -> tuple[str, int, str] | None:
    """What a Redis error says beyond "Redis is down", when it is a misconfiguration or a state of Redis that only
    an operator ends: (kind, log level, the message saying what to change); None for an outage. ``url``: Redis's URL
    as it may be shown (no password); ``wrote``: Redis took a write of this client once (READONLY after that: a
    failover, before: a replica's URL); ``answered``: it answered once; ``plain``: the URL is ``redis://``. Kinds:
    ``readonly`` (drop the pooled connections: new ones reach the endpoint's primary), ``oom``, ``auth``, ``acl``,
    ``db`` (the URL's database refused), ``tls``."""
    text = f"{type(exc).__name__}: {exc}"
    meanwhile = use.meanwhile
    if redis_is_readonly(exc):
        if wrote:
            return (
                "readonly",
                logging.WARNING,
                f"Redis ({url}) answered READONLY ({text}): a failover (Sentinel, ElastiCache, a replica promoted) "
                "made the node this process is connected to a read-only replica. Its pooled connections are "
                "dropped and it reconnects to LAGO_REDIS_URL, which names the new primary once the failover is "
                "over (its DNS name follows the primary; if LAGO_REDIS_URL holds this node's own address, set it "
                f"to the primary endpoint's). {meanwhile}",
            )
        return (
            "readonly",
            logging.ERROR,
            f"LAGO_REDIS_URL ({url}) names a read-only replica ({text}): {use.who} writes {use.writes}, "
            "so it must be the primary's endpoint (ElastiCache: the primary endpoint, not the reader endpoint; "
            f"Sentinel: the current master's address). {meanwhile}",
        )
    if isinstance(exc, _redis_errors("OutOfMemoryError")) or "used memory > 'maxmemory'" in str(exc):
        return (
            "oom",
            logging.ERROR,
            f"Redis ({url}) is out of memory ({text}): maxmemory is reached and maxmemory-policy is noeviction, "
            f"so it refuses {use.refused} writes. Give it more memory (maxmemory, a larger node; ElastiCache: a "
            "larger node type), and keep noeviction: an eviction policy would drop the quota counters first (they "
            f"expire), forgetting the calls made since each org's last snapshot. {meanwhile}",
        )
    if isinstance(exc, _redis_errors("AuthenticationError", "AuthorizationError")) or any(
        code in str(exc) for code in ("WRONGPASS", "NOAUTH", "invalid username-password")
    ):
        return (
            "auth",
            logging.ERROR,
            f"Redis ({url}) refused the credentials of LAGO_REDIS_URL ({text}): set the user and password it "
            "expects there (redis://<user>:<password>@<host>:<port>/<db>, or redis://:<password>@... for the "
            "default user; after rotating an AUTH token, the new one) and restart, or give the password to the "
            f"user on the Redis side. {meanwhile}",
        )
    if isinstance(exc, _redis_errors("NoPermissionError")) or any(
        code in str(exc) for code in ("NOPERM", "no permissions", "can't run this command")
    ):
        return (
            "acl",
            logging.ERROR,
            f"The Redis ACL user of LAGO_REDIS_URL ({url}) lacks a permission {use.who} needs ({text}): "
            f"grant it, e.g. ACL SETUSER <user> ~{use.prefix}* +@read +@write +eval +evalsha "
            f"(ElastiCache: an access string with these). {meanwhile}",
        )
    if any(words in str(exc) for words in ("DB index is out of range", "invalid DB index", "not allowed in cluster")):
        # (every connection's SELECT of the URL's database fails, so no command ever runs: no wait ends it. A Redis
        # Cluster, which a one-shard cluster-mode Redis is, has database 0 only)
        return (
            "db",
            logging.ERROR,
            f"Redis ({url}) refuses the database LAGO_REDIS_URL names ({text}): a cluster-mode Redis (ElastiCache or "
            "Memorystore cluster mode enabled, Redis Cluster) has database 0 only, so drop the /<db> (or make it "
            "/0); another Redis has the databases its `databases` setting gives (16 by default: 0 to 15), so name "
            f"one of those. {meanwhile}",
        )
    cause: BaseException | None = exc
    for _depth in range(8):  # (the ssl error is the redis error's context)
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                "tls",
                logging.ERROR,
                f"The TLS certificate of Redis ({url}) does not verify ({text}): give LAGO_REDIS_URL the "
                "certificate of the CA that signed it (rediss://<host>:<port>/<db>?ssl_ca_certs=/path/to/ca.pem), "
                "or add that CA to the system's trust store (ssl_cert_reqs=none turns verification off: not "
                f"recommended). {meanwhile}",
            )
        if isinstance(cause, ssl.SSLError):
            return (
                "tls",
                logging.ERROR,
                f"The TLS handshake with Redis ({url}) failed ({text}): check that the port of LAGO_REDIS_URL "
                "speaks TLS (rediss://; a plain port needs redis://) and its certificate options (ssl_ca_certs; "
                f"ssl_certfile and ssl_keyfile when Redis asks for a client certificate). {meanwhile}",
            )
        cause = cause.__cause__ or cause.__context__
    if (
        not answered
        and plain
        and isinstance(exc, _redis_errors("ConnectionError"))
        and ("Connection reset by peer" in str(exc) or "Connection closed by server" in str(exc))
    ):
        # (a server reached that closes the connection before answering anything: a TLS-only port, which takes
        # the plain-text command as a broken handshake, most likely)
        return (
            "tls",
            logging.ERROR,
            f"Redis ({url}) closed the connection without answering ({text}): if it accepts TLS only "
            "(ElastiCache in-transit encryption, Redis Cloud, Upstash, a TLS port), LAGO_REDIS_URL must start "
            "with rediss:// instead of redis://; else a proxy in front of it has no Redis to reach. "
            f"{meanwhile}",
        )
    return None


class _Script:
    """A Lua script run with ``EVALSHA``, and with ``EVAL`` when Redis does not have it (its script cache emptied: a
    restart, a failover, ``SCRIPT FLUSH``). Not ``SCRIPT LOAD`` (nor ``SCRIPT EXISTS`` before a pipeline), as redis-py's
    registered scripts do: an ACL user may be allowed ``EVAL``/``EVALSHA`` and not ``SCRIPT`` (every call then failed,
    the worker never counted in Redis), and ``EVAL`` caches the script in one round trip instead of two."""

    def __init__(self, client: Any, body: str) -> None:
        self.client = client
        self.body = body
        self.sha = hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()
        self._missing = _redis_errors("NoScriptError")

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except self._missing:
            return await self.client.eval(self.body, len(keys), *keys, *args)

    def queue(self, pipe: Any, *, keys: list[Any], args: list[Any], load: bool) -> None:
        """Queue a run on ``pipe`` (``load``: with ``EVAL``, caching it for the ``EVALSHA`` runs after it)."""
        if load:
            pipe.eval(self.body, len(keys), *keys, *args)
        else:
            pipe.evalsha(self.sha, len(keys), *keys, *args)

    def _queue_marked(
        self,
        pipe: Any,
        calls: list[tuple[list[Any], list[Any]]],
        which: Sequence[int],
        mark: _Mark | None,
        again: str,
        *,
        first_loads: bool,
    ) -> list[int]:
        """Queue the calls ``which`` on ``pipe`` (the first with ``EVAL`` when ``first_loads``, else each) with the
        marks :meth:`run_all` says: the indexes of their answers among the pipeline's."""
        answered: list[int] = []
        last = len(which) - 1
        for m, n in enumerate(which):
            answered.append(len(answered) + (m // _MARK_EVERY if mark is not None else 0))
            self.queue(pipe, keys=calls[n][0], args=calls[n][1], load=m == 0 or not first_loads)
            if mark is not None and ((m + 1) % _MARK_EVERY == 0 or m == last):
                pipe.set(mark.key, f"{mark.write_id}{again}:{m + 1}", px=_MARK_TTL_MS)
        return answered

    async def run_all(
        self,
        client: Any,
        calls: list[tuple[list[Any], list[Any]]],
        *,
        mark: _Mark | None = None,
    ) -> list[Any]:
        """Run ``calls`` (keys, args) pipelined, not in a transaction: Redis's answers, errors among them. The first
        with ``EVAL``; those Redis still did not have the script for (flushed meanwhile: not run) again with it.

        ``mark``: every :data:`_MARK_EVERY`-th call and the last are followed by a ``SET`` of its key to the write's id
        and the number of calls before it (``<id>:<n>``; ``<id>+:<n>`` in the pipeline of the calls run again, counting
        those): Redis runs a connection's commands in order, so a write whose answers were lost can tell which calls
        Redis ran (see ``RedisBackend._resolve_cut``), but for at most ``_MARK_EVERY - 1`` after the last mark it
        read, written again (counted twice until the org's next snapshot: never under-counted). One mark after the
        last call could not: a pipeline is no transaction, and one cut off while it was being sent had its first calls
        run, its mark never (all of them were written again). Not one mark per call: that doubled the client's CPU per
        settle (redis-py packs each command in Python, some 11 µs), for a cut that comes with a loop's end or a
        dropped connection."""
        async with client.pipeline(transaction=False) as pipe:
            answered = self._queue_marked(pipe, calls, range(len(calls)), mark, "", first_loads=True)
            replies = list(await pipe.execute(raise_on_error=False))
        results = [replies[index] for index in answered]
        missing = [n for n, result in enumerate(results) if self._missing and isinstance(result, self._missing)]
        if missing:
            if mark is not None:
                mark.again = missing
            async with client.pipeline(transaction=False) as pipe:
                answered = self._queue_marked(pipe, calls, missing, mark, "+", first_loads=False)
                replies = list(await pipe.execute(raise_on_error=False))
            answers = [replies[index] for index in answered]
            for n, result in zip(missing, answers, strict=True):
                results[n] = result
        return results


def _num(value: Any, default: float = 0.0) -> float:
    if value is None or value == b"" or value == "":
        return default
    return float(value)


def _limit(value: int | None) -> str:
    return "-1" if value is None else str(value)


def encode(snapshot: Snapshot) -> list[str]:
    """The snapshot as ``HSET`` field/value pairs."""
    fields = {
        "v": snapshot.version,
        "a": "1" if snapshot.active else "0",
        "plan": snapshot.plan_code or "",
        "cust": snapshot.customer_id or "",
        "cl": _limit(snapshot.calls_limit),
        "tl": _limit(snapshot.tokens_limit),
        "ps": period_key(snapshot),
        "pe": repr(snapshot.period_end),
        "bc": str(snapshot.base_calls),
        "bt": str(snapshot.base_tokens),
        "rq": repr(snapshot.requested_at),
        "fa": repr(snapshot.fetched_at),
        "pf": repr(snapshot.plan_fetched_at),
        "ra": repr(snapshot.refresh_at),
        "src": snapshot.limits_source,
        "lc": "1" if snapshot.lago_counts_calls else "0",
        "lt": "1" if snapshot.lago_counts_tokens else "0",
        "iv": snapshot.interval,
        "ea": repr(snapshot.ending_at),
        "np": snapshot.next_plan_code or "",
        "ne": repr(snapshot.next_period_end),
        "an": repr(snapshot.anchor),
    }
    out: list[str] = []
    for name, value in fields.items():
        out += [name, value]
    return out


def decode(raw: Any) -> Snapshot | None:
    """A snapshot from ``HGETALL`` output (a flat list or a dict, bytes or str)."""
    if not raw:
        return None
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        items = [(raw[i], raw[i + 1]) for i in range(0, len(raw) - 1, 2)]
    data = {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in items
    }
    if "v" not in data:
        return None
    calls_limit = int(data.get("cl") or -1)
    tokens_limit = int(data.get("tl") or -1)
    return Snapshot(
        active=data.get("a") == "1",
        plan_code=data.get("plan") or None,
        customer_id=data.get("cust") or None,
        calls_limit=None if calls_limit < 0 else calls_limit,
        tokens_limit=None if tokens_limit < 0 else tokens_limit,
        period_start=_num(data.get("ps")),
        period_end=_num(data.get("pe")),
        base_calls=int(data.get("bc") or 0),
        base_tokens=int(data.get("bt") or 0),
        unsure_calls=int(data.get("uc") or 0),
        unsure_tokens=int(data.get("ut") or 0),
        requested_at=_num(data.get("rq")),
        fetched_at=_num(data.get("fa")),
        plan_fetched_at=_num(data.get("pf")),
        refresh_at=_num(data.get("ra")),
        limits_source=data.get("src") or "none",
        version=data["v"],
        lago_counts_calls=data.get("lc", "1") == "1",
        lago_counts_tokens=data.get("lt", "1") == "1",
        interval=data.get("iv") or "",
        ending_at=_num(data.get("ea")),
        next_plan_code=data.get("np") or None,
        next_period_end=_num(data.get("ne")),
        anchor=_num(data.get("an")),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: A settle queued for Redis: (org, period, in-flight bucket or "", billed "1"/"0", its second, tokens, the second
#: its call was checked in or "": see QuotaBackend.settle, its reservation's mark or "": see CHECK).
_Queued = tuple[str, str, str, str, str, int, str, str]

#: Reservations and refresh locks whose answers were lost, kept for when Redis answers again (see
#: ``RedisBackend._release_lost``), and reservations' marks awaiting their settles: bounded (beyond, forgotten: a lost
#: reservation is then held in flight until ``inflight_horizon``, a lock until its TTL, an unsettled mark pruned then).
_MAX_LOST = 10_000
_MAX_MARKED = 100_000

#: How long the mark of a write of settles lasts (see _Mark): longer than Redis stays down, or a next event loop takes
#: to come, in any likely case (one key per run of the writer: nothing piles up).
_MARK_TTL_MS = UNPERIODED_TTL_MS
#: Settles of a write between two of its marks (see ``_Script.run_all``).
_MARK_EVERY = 16


@dataclasses.dataclass(slots=True)
class _Mark:
    """The marks a write of settles leaves in Redis after each of them (``key`` set to ``<write_id>:<settles run>``,
    see ``_Script.run_all``), and the settles it ran again (``again``: Redis lacked the script), for a write whose
    answers were lost (see ``RedisBackend._resolve_cut``)."""

    key: str
    write_id: str
    batch: list[_Queued]
    again: list[int] = dataclasses.field(default_factory=list)

    def not_run(self, value: str) -> list[_Queued]:
        """The settles of the write that Redis did not run, its mark's ``value`` read after the write ended (``""``:
        no mark; another write's: none of this one ran)."""
        written, _, count = value.rpartition(":")
        ran = int(count) if ascii_digits(count) else 0
        if written == self.write_id + "+":  # (the first pipeline answered: all ran but those run again)
            return [self.batch[n] for n in self.again[ran:]]
        if written != self.write_id:  # (it never had them, or its first was cut off as it was sent)
            return list(self.batch)
        if self.again:  # (answered, but for those run again, whose pipeline Redis did not have)
            return [self.batch[n] for n in self.again]
        return self.batch[ran:]


#: Orgs whose outage records one task hands to Redis at once (each its own round trip, on a connection of the pool;
#: at most a quarter of the pool, the rest left to requests).
_MERGE_CONCURRENCY = 16


def _inflight_spec(counts: _Counts) -> str:
    """The calls in flight of ``counts`` as the MERGE script reads them: ``<second>:<n>,...``."""
    return ",".join(f"{sec}:{n}" for sec, n in counts.i.items() if n > 0)


class _Merging:
    """The records counted during an outage that are being handed to Redis: those no merge took yet (``pending``),
    and the orgs whose merge runs (each with an event set when it ends)."""

    def __init__(self, drained: list[tuple[str, Snapshot | None, _Counts]]) -> None:
        self.pending: dict[str, tuple[Snapshot | None, _Counts]] = {
            org_id: (snapshot, counts) for org_id, snapshot, counts in drained
        }
        self.running: dict[str, anyio.Event] = {}
        self.bulk = False  # a task merges the pending records (the others each merge their own org's)

    def __contains__(self, org_id: object) -> bool:
        return org_id in self.pending or org_id in self.running


class RedisBackend:
    """Snapshots and counters in Redis (``redis.asyncio``), with an in-process fallback.

    **Parameters:** ``url`` (``LAGO_REDIS_URL``), ``config`` (:class:`QuotaConfig`), ``fallback`` (the
    :class:`LocalBackend` used while Redis is down), ``client`` (*optional*, a ``redis.asyncio.Redis``).
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        config: QuotaConfig | None = None,
        *,
        fallback: LocalBackend | None = None,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or QuotaConfig()
        #: The URL as it may be shown: its password masked (the pool keeps the real one; ``vars()``, a debugger and an
        #: error tracker's locals see this one).
        self.url = masked_url(url) if url else ""
        self._shown_url = redact_url(url) if url else "the given client"  # for logs: no password
        self.fallback = fallback or LocalBackend(self.config)
        self._clock = clock
        if client is None:
            redis_asyncio = _redis()
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            try:
                pool = redis_asyncio.BlockingConnectionPool.from_url(
                    url,
                    max_connections=self.config.redis_max_connections,
                    timeout=self.config.redis_pool_timeout,
                    socket_timeout=self.config.redis_timeout,
                    socket_connect_timeout=self.config.redis_timeout,
                    retry=Retry(NoBackoff(), 0),
                    **reconnecting_pool_options(redis_asyncio),
                )
            except (ValueError, TypeError) as exc:  # (TypeError: redis-py converting a query option)
                failure: ConfigurationError | None = unreadable_redis_url(url, exc, "the quota gate's Redis backend")
            else:
                failure = None
            if failure is not None:
                del url  # (nor this frame: an error tracker's locals)
                raise failure
            client = redis_asyncio.Redis.from_pool(pool)  # closes the pool with the client
            _forks.track(self)  # (its pool made here: a forked child makes its own, see _forked)
        self.redis = client
        self._check = _Script(self.redis, CHECK)
        self._settle = _Script(self.redis, SETTLE)
        self._store = _Script(self.redis, STORE)
        self._merge = _Script(self.redis, MERGE)
        self._expire = _Script(self.redis, EXPIRE_SNAPSHOT)
        self._invalidate = _Script(self.redis, INVALIDATE)
        self._mark_due = _Script(self.redis, MARK_DUE)
        self._read_again = _Script(self.redis, READ_AGAIN)
        self._lock = _Script(self.redis, LOCK)
        self._unlock = _Script(self.redis, UNLOCK)
        self._release = _Script(self.redis, RELEASE_LOST)
        self._compact = _Script(self.redis, COMPACT)
        self._probe = _Script(self.redis, PROBE)
        self._sharded = False  # LAGO_REDIS_URL named a node of a cluster of several shards (see _refuse_sharded)
        self._redirected = _redis_errors("AskError")  # (MovedError is one)
        self._held: dict[str, str] = {}  # org -> the value of the refresh lock this process holds
        # (org, second) -> the marks of the calls reserved then, for their settles (see CHECK); and the reservations
        # (org, mark, second) and refresh locks (org, value) whose answers were lost: see _release_lost
        self._marks: dict[tuple[str, int], list[str]] = {}
        self._lost_reservations: set[tuple[str, str, int]] = set()
        self._lost_locks: set[tuple[str, str]] = set()
        self.stats: dict[str, int] = {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0}
        self._down_until = 0.0
        # Misconfigurations and states of Redis said (a kind each: see _problem) since it last took a write: each is
        # said once, not at every retry
        self._said: set[str] = set()
        self._answered = False  # Redis answered once (a connection reset before any answer: maybe a TLS port)
        self._wrote = False  # Redis took a write once (READONLY after that: a failover; before: a replica's URL)
        self._reconnect = False  # READONLY seen: the pooled connections go to a replica, dropped before the probe
        self._on_asyncio = False  # the redis client's loop seen (see _usable)
        self._queue: deque[_Queued] = deque()
        self._wakeup = anyio.Event()
        self._flush_lock = anyio.Lock()
        self._running = False
        self._closed = False
        self._last_seen: LRUCache[str, Outcome] = LRUCache(maxsize=self.config.max_orgs)
        self._probing = False  # asking Redis whether it answers again (after an outage)
        self._releasing: set[str] = set()  # orgs with a reserved call released in the queue (not yet in Redis)
        self._merging: _Merging | None = None  # the orgs whose outage records are being handed to Redis
        # org -> its merges cut off (failed or cancelled once Redis may have applied them): (mark, recorded calls,
        # tokens, their second, calls in flight), latest first; the next merge of its records adds only what the
        # latest one applied leaves (see MERGE)
        self._uncertain: dict[str, list[tuple[str, int, int, int, str]]] = {}
        # org -> second -> its calls decided on the fallback, handed to Redis in flight (settled there: handed_over)
        self._handed: LRUCache[str, dict[int, int]] = LRUCache(maxsize=self.config.max_orgs)
        self._orphans: set[asyncio.Task[Any]] = set()  # reserves whose request a native cancel cut off (released)
        # The key each write of settles marks (see _Mark; one per run of the writer), and the writes whose answers were
        # lost once Redis may have run them, in whole or in part (cut off by a native cancel, an event loop ending:
        # asyncio.run() cancels every task; or failed, a connection dropped, a timeout): their settles are queued again,
        # and those Redis ran taken back out of the queue, as their marks tell, before any other write (_resolve_cut)
        self._mark_key = self.key("", f"written:{uuid.uuid4().hex}")
        self._cut: list[_Mark] = []
        # refresh locks being handed back in other tasks (unlock()), which the end of a loop waits for (detach())
        self._handing_back = 0
        self._handed_back: anyio.Event | None = None
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None  # that of the writer's last run
        # A counter made without a snapshot (fail-open, or a settle of a request whose org was known only after the
        # app ran) lives this long: what a first snapshot would keep of it is younger (in flight for inflight_horizon
        # at most), and every fresh org id (a spoofable header, a JWT claim) let through makes one
        self._blind_ttl_ms = int(self.config.inflight_horizon * 1000) + PERIOD_MARGIN_MS

    def _forked(self) -> None:
        """In a forked child: a connection pool of its own (see :func:`renew_pool_after_fork`)."""
        renew_pool_after_fork(self.redis)

    # ------------------------------------------------------------------------------ keys

    def key(self, org_id: str, kind: str) -> str:
        if not org_id or org_id[0] == "}":
            # ("{}" would be an empty hash tag: Redis Cluster would hash each whole key, the org's keys in different
            # slots, its scripts refused with CROSSSLOT) the constant tag "~", and "}" where the others have "{"
            return f"{self.config.redis_prefix}}}{{~}}{org_id}:{kind}"
        return f"{self.config.redis_prefix}{{{org_id}}}:{kind}"

    # ------------------------------------------------------------------------------ health

    def _up(self) -> bool:
        if not self._down_until:
            return self._on_asyncio or self._usable()
        return self._clock() >= self._down_until

    def _usable(self) -> bool:
        """Whether this event loop can use the redis client (asked until an async library is seen): it runs only
        under asyncio. Under another (trio: ``hypercorn -k trio``) every call would raise ``RuntimeError``; the
        backend counts in the process for good instead, as while Redis is down, and says so once."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            trio = sys.modules.get("trio")
            try:
                if trio is None or trio.lowlevel.current_task() is None:
                    return True
            except RuntimeError:  # (no event loop: a synchronous settle, queued for the writer)
                return True
            library = "trio"
        else:
            self._on_asyncio = True
            return True
        logger.error(
            "LAGO_REDIS_URL is set but the redis client (redis.asyncio) runs only under asyncio, not %s: quota "
            "counting stays in each process (limits per worker, not shared). Run the server on asyncio (uvicorn, "
            "hypercorn -k asyncio) to share counts in Redis (%s), or unset LAGO_REDIS_URL.",
            library,
            self._shown_url,
        )
        self.stats["redis_fallback"] = 1
        self._down_until = math.inf  # (never tried again: _unusable)
        return False

    @property
    def _unusable(self) -> bool:
        """Whether the redis client cannot run on this event loop (see :meth:`_usable`)."""
        return self._down_until == math.inf

    def _failed(self, exc: BaseException) -> None:
        self.stats["redis_errors"] += 1
        if self._sharded:
            return
        if isinstance(exc, self._redirected):
            self._refuse_sharded(exc)
            return
        problem = self._problem(exc)
        if problem is not None:  # a misconfiguration, or a state of Redis an operator fixes: said once, what to do
            kind, level, message = problem
            if kind == "readonly":  # (the pooled connections reach a replica: dropped before the next probe)
                self._reconnect = True
            if kind not in self._said and not self._closed:
                self._said.add(kind)
                logger.log(level, "%s", message)
        elif not self.stats["redis_fallback"] and not self._closed:  # (closed: a refresh still running at shutdown)
            logger.warning(
                "Redis (%s) failed (%s: %s): quota counting falls back to this process until it answers "
                "(retry every %g s).",
                self._shown_url,
                type(exc).__name__,
                exc,
                self.config.redis_retry_interval,
            )
        self.stats["redis_fallback"] = 1
        self._down_until = self._clock() + self.config.redis_retry_interval
        if self._running:  # the writer tries Redis again when due, however idle this worker is (nothing queued)
            self._wakeup.set()

    def _problem(self, exc: BaseException) -> tuple[str, int, str] | None:
        """What a Redis error says beyond "Redis is down", when it is a misconfiguration or a state of Redis that only
        an operator ends: (kind, log level, the message saying what to change); None for an outage. Either way quota
        counting falls back to this process (the outage policy) and Redis is tried again every
        ``redis_retry_interval`` (a fix on the Redis side ends it without a restart)."""
        meanwhile = (
            "Quota counting falls back to this process meanwhile (limits per worker, not shared); Redis is tried "
            f"again every {self.config.redis_retry_interval:.0f} s."
        )
        use = dataclasses.replace(_QUOTA_USE, prefix=self.config.redis_prefix, meanwhile=meanwhile)
        plain = self.url.lower().startswith("redis://")
        return redis_problem(exc, use, url=self._shown_url, wrote=self._wrote, answered=self._answered, plain=plain)

    def _refuse_sharded(self, exc: BaseException) -> None:
        """Redis answered MOVED (or ASK): ``LAGO_REDIS_URL`` names one node of a Redis Cluster of several shards, which
        holds some orgs' keys only. Said once, as the error it is, and quota counting stays in this process (never
        tried again, as under trio: a partly served fleet fell back and came back every ``redis_retry_interval``,
        forever); the settles queued for Redis are counted here."""
        self._sharded = True
        logger.error(
            "LAGO_REDIS_URL (%s) is a node of a Redis Cluster with several shards (%s: %s): the quota backend keeps "
            "each org's keys in one hash slot but talks to one node, which does not hold every slot. Quota counting "
            "stays in each process (limits per worker, not shared) until restarted. Use a Redis without cluster "
            "mode (ElastiCache or Memorystore with cluster mode disabled, or cluster mode with a single shard), or "
            "unset LAGO_REDIS_URL.",
            self._shown_url,
            type(exc).__name__,
            exc,
        )
        self.stats["redis_fallback"] = 1
        self._down_until = math.inf  # (_unusable)

    async def _recovered(self, first: str | None = None) -> None:
        """Hand what this process counted during an outage to Redis once it answers (asked first: while it does not,
        the fallback keeps its snapshots). A check (``first``: its org) merges its own org's records itself, or waits
        for the merge of that org alone when one runs: not for those of every other org (thousands, after an outage
        of a busy worker). The rest is merged by the background writer when it runs, else by this task, a few orgs at
        once (:meth:`_merge_rest`)."""
        merging = self._merging
        if merging is None:
            if not self.stats["redis_fallback"] or self._probing:
                return
            self._probing = True
            try:
                if self._reconnect:
                    # READONLY: the pooled connections reach a node that a failover made a replica; new ones go where
                    # LAGO_REDIS_URL names now (the new primary, once its DNS follows)
                    self._reconnect = False
                    pool = getattr(self.redis, "connection_pool", None)
                    if pool is not None:
                        await pool.disconnect()
                await self._probe(keys=[self.key("", "probe")], args=[])  # (a write: see PROBE)
                await self._release_lost()  # (before the outage's records are merged: see there)
            except self._errors() as exc:
                self._failed(exc)
                return
            finally:
                self._probing = False
            self._answered = self._wrote = True
            self._said.clear()
            if not self.stats["redis_fallback"] or self._merging is not None:  # (done by another task meanwhile)
                return
            self.stats["redis_fallback"] = 0
            self._down_until = 0.0
            logger.info("Redis (%s) answers again: quota counters are shared again.", self._shown_url)
            merging = self._merging = _Merging(self.fallback.drain())
            self._merged(merging)  # (nothing to merge)
        if first is not None:
            await self._merge_org(first, merging)
            if self._running:  # the rest by the background writer, not on this request's time
                self._wakeup.set()
                return
        await self._merge_rest(merging)

    async def _release_lost(self) -> None:
        """What Redis did for this process while its answers were lost (a connection dropped, a reply slower than
        ``redis_timeout``), once it answers again. A reservation CHECK made is released when its mark is there: its
        call was served and counted here, and merged with the outage's records it was held twice (its reservation in
        flight for ``inflight_horizon``: the org's last calls refused early). A refresh lock LOCK took is handed back
        (else held by nobody for its TTL: the fleet waited for a refresh that stores nothing in Redis). Each runs
        once (a mark, a lock's value, is gone once used): kept when Redis fails again, for its next recovery."""
        lost, locks = list(self._lost_reservations), list(self._lost_locks)
        results: list[Any] = []
        if lost:
            calls = [([self.key(org_id, "count")], [mark, bucket]) for org_id, mark, bucket in lost]
            results += await self._release.run_all(self.redis, calls)
        if locks:
            results += await self._unlock.run_all(self.redis, self._freeing(locks))
        for result in results:
            if isinstance(result, Exception):
                raise result
        self._lost_reservations.difference_update(lost)
        self._lost_locks.difference_update(locks)

    def _lost_answer(self, org_id: str, args: list[Any]) -> None:
        """A CHECK (``args``: its arguments) whose answer was lost once Redis may have run it: released, if it
        reserved, when Redis answers again (:meth:`_release_lost`)."""
        if len(self._lost_reservations) >= _MAX_LOST:
            self._lost_reservations.clear()
        self._lost_reservations.add((org_id, args[6], args[1]))

    def _marked(self, org_id: str, args: list[Any], outcome: Outcome) -> None:
        """Keep the mark of the call CHECK reserved (``args``: its arguments), for its settle to delete (see CHECK)."""
        code, mode = outcome.code, args[2]
        if outcome.period == NOT_STARTED or not (
            (code in (ALLOWED, COUNTED) and mode != "p") or (code == BLOCKED and mode in ("f", "b"))
        ):
            return
        if len(self._marks) >= _MAX_MARKED:  # (bounded: those forgotten are pruned by the org's next STORE then)
            self._marks.clear()
        self._marks.setdefault((org_id, args[1]), []).append(args[6])

    def _unmark(self, org_id: str, bucket: int) -> str:
        """The mark of a call of the org reserved in second ``bucket`` ("" none: reserved before, or elsewhere)."""
        marks = self._marks.get((org_id, bucket))
        if not marks:
            return ""
        mark = marks.pop()
        if not marks:
            del self._marks[(org_id, bucket)]
        return mark

    async def _merge_org(self, org_id: str, merging: _Merging) -> None:
        """Merge the org's pending records (one round trip), or wait for the merge of them that runs."""
        running = merging.running.get(org_id)
        if running is not None:
            await running.wait()
            return
        taken = merging.pending.pop(org_id, None)
        if taken is None:
            return
        done = merging.running[org_id] = anyio.Event()
        try:
            await self._merge_one(org_id, *taken)
        except BaseException:  # (cut off) what no merge took yet is counted here again, merged at the next recovery
            self._abandon(merging)
            raise
        else:
            if self.stats["redis_fallback"]:  # (Redis failed again)
                self._abandon(merging)
        finally:
            del merging.running[org_id]
            done.set()
            self._merged(merging)

    async def _merge_rest(self, merging: _Merging) -> None:
        """Merge every org's pending records, ``_MERGE_CONCURRENCY`` at once. Cut off, or Redis failing again, what is
        left is counted here again (merged at the next recovery)."""
        if merging.bulk or not merging.pending:
            return
        merging.bulk = True

        async def merging_orgs() -> None:
            while merging.pending and not self.stats["redis_fallback"]:
                await self._merge_org(next(iter(merging.pending)), merging)

        try:
            width = min(_MERGE_CONCURRENCY, max(1, self.config.redis_max_connections // 4), len(merging.pending))
            async with anyio.create_task_group() as tasks:
                for _ in range(width):
                    tasks.start_soon(merging_orgs)
        finally:
            merging.bulk = False
            self._abandon(merging)  # (what is left: cut off, or Redis failed again)
            self._merged(merging)

    def _abandon(self, merging: _Merging) -> None:
        """The records no merge took yet are counted here again (merged at the next recovery: the gauge is set)."""
        if merging.pending:
            self.fallback.restore([(org_id, *taken) for org_id, taken in merging.pending.items()])
            merging.pending.clear()
            self.stats["redis_fallback"] = 1

    def _merged(self, merging: _Merging) -> None:
        """The end of a recovery, once no record is left to merge nor being merged. Records counted here meanwhile
        (a merge cut off, a check that could not wait for its org's) are merged at the next check (or writer's
        round): the fallback gauge is set again for them."""
        if merging.pending or merging.running or self._merging is not merging:
            return
        self._merging = None
        if self.fallback.has_records():
            self.stats["redis_fallback"] = 1

    async def _merge_one(self, org_id: str, snapshot: Snapshot | None, counts: _Counts) -> None:
        """Merge one org's records: its recorded calls and tokens, and its calls in flight, kept in flight in Redis
        (settled there when they end: :meth:`handed_over`). Failed or cut off, they are counted here again."""
        now = int(time.time())
        # (a counter of the records' period expires with it, as one the CHECK script makes)
        ttl_ms = UNPERIODED_TTL_MS
        if snapshot is not None and snapshot.active:
            ttl_ms = _expiry_ms(snapshot.period_end, now)
        # A merge that failed or was cut off may have been applied (Redis ran it, its answer was lost): each merge
        # leaves a mark, and the next one of the org's records (those taken back, and the ones counted since) adds
        # only what the latest applied one leaves, in the same second's bucket.
        uncertain = self._uncertain.get(org_id, [])
        mark = self.key(org_id, f"merge:{uuid.uuid4().hex}")
        # (stamped with the second of their latest record, not the merge's: a snapshot then drops them as it drops any
        # record Lago has had settle_lag seconds to count, and one of a period begun after them does not carry them
        # over as its own, as it carries the records made since it began: see STORE)
        latest = max((sec for buckets in (counts.c, counts.t) for sec in buckets if sec > 0), default=0)
        bucket = uncertain[-1][3] if uncertain else (min(latest, now) if latest else now)
        inflight = _inflight_spec(counts)
        recorded = counts.calls - sum(counts.i.values())
        keys = [self.key(org_id, "count"), mark, *(earlier for earlier, _, _, _, _ in uncertain)]
        args: list[Any] = [period_key(snapshot), bucket, recorded, counts.tokens, ttl_ms, ttl_ms, inflight]
        for _, calls, tokens, _, spec in uncertain:
            args += [calls, tokens, spec]
        this = (mark, recorded, counts.tokens, bucket, inflight)
        try:
            applied = await self._merge(keys=keys, args=args)
        except self._errors() as exc:  # Redis failed again: counted here again
            self._uncertain[org_id] = [this, *uncertain][:_MAX_UNCERTAIN]
            self._failed(exc)
            self.fallback.restore([(org_id, snapshot, counts)])
            return
        except BaseException:  # cut off (its time is up, a native cancel): kept here, merged at the next check
            self._uncertain[org_id] = [this, *uncertain][:_MAX_UNCERTAIN]
            self.fallback.restore([(org_id, snapshot, counts)])
            self.stats["redis_fallback"] = 1
            raise
        self._uncertain.pop(org_id, None)
        if applied == 1 and counts.i:
            handed = self._handed.get(org_id)
            if handed is None:
                handed = self._handed[org_id] = {}
            for sec, n in counts.i.items():
                handed[sec] = handed.get(sec, 0) + n

    def handed_over(self, org_id: str, bucket: int) -> bool:
        """Whether a call of the org decided on the fallback in second ``bucket`` was handed to Redis in flight when
        it answered again (and is no longer held here): its settle goes to Redis (once: the hand-over is used up)."""
        handed = self._handed.get(org_id)
        if not handed or not handed.get(bucket):
            return False
        if handed[bucket] == 1:
            del handed[bucket]
            if not handed:
                del self._handed[org_id]
        else:
            handed[bucket] -= 1
        return True

    def _errors(self) -> tuple[type[BaseException], ...]:
        try:
            from redis.exceptions import RedisError
        except ImportError:  # pragma: no cover - a custom client
            return (OSError, TimeoutError)
        return (RedisError, OSError, TimeoutError)

    # ------------------------------------------------------------------------------ backend API

    async def reserve(self, org_id: str, now: float, mode: Mode, known: Snapshot | None) -> Outcome:
        if self._releasing and org_id in self._releasing and self._up():
            # A call of the org released (unbilled: a redirect the client follows at once, a 5xx) is still queued:
            # written first, or this reservation would find that call still held (a 429 for the org's last call)
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.redis_timeout):
                await self.flush()
        if self._up():
            args = [repr(now), int(now), {"normal": "n", "force": "f", "blind": "b", "peek": "p"}[mode]]
            args += [known.version if known is not None else "", PERIOD_MARGIN_MS, self._blind_ttl_ms]
            # (the reservation's mark: a field of the org's counter set with the reservation, deleted by its settle.
            # Only the calls in flight hold one, a few bytes each, and a check writes one more field: not a key per
            # request kept minutes or an hour, whose memory would follow the traffic)
            args.append(os.urandom(6).hex())
            result = None
            try:
                # Shielded (bounded by redis_timeout): a request cancelled meanwhile (a client gone, a timeout) still
                # learns whether its call was reserved, to release it after, instead of holding it for an hour.
                # The merge of what was counted here during an outage, once Redis answers again, too: cut off, those
                # records would be lost. It comes first: Redis's counts lack them until then (the checks made when
                # Redis comes back would let an org at its limit through), so until the org's records are merged it
                # is decided here, where they are.
                with anyio.CancelScope(shield=True):
                    if self.stats["redis_fallback"] or self._merging is not None:
                        with anyio.move_on_after(self.config.redis_timeout):  # (bounded: what is left, later)
                            await self._recovered(org_id)
                    if self._up() and not self._unmerged(org_id):
                        keys = [self.key(org_id, "snap"), self.key(org_id, "count")]
                        result = await self._reserve(org_id, keys, args, known, now)
            except self._errors() as exc:
                self._failed(exc)
            else:
                if result is not None:
                    self._answered = True
                    outcome = self._outcome(org_id, result, known, int(now))
                    self._marked(org_id, args, outcome)
                    return outcome
        self._seed_fallback(org_id)
        outcome = self.fallback.reserve_now(org_id, now, mode)
        if outcome.code != MISSING:  # (a miss is no decision: the gate reads the org's usage, then asks again)
            self.stats["fallback_decisions"] += 1
        return outcome

    async def _reserve(self, org_id: str, keys: list[str], args: list[Any], known: Snapshot | None, now: float) -> Any:
        """The ``CHECK`` script's answer. Under asyncio it runs as a task of its own: a native cancel of the request
        (``task.cancel()``: ``asyncio.wait_for`` or ``asyncio.timeout`` around the app, uvicorn cancelling requests at
        shutdown), which the anyio shield does not stop, leaves it running, and the call it reserved is released when
        its answer comes (:meth:`_orphaned`), instead of staying in flight for ``inflight_horizon``. Under trio every
        cancellation goes through anyio's scopes, which the caller's shield stops: it is awaited in place."""
        try:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # (trio)
                return await self._check(keys=keys, args=args)
            late = functools.partial(self._orphaned, org_id, args, known, now)
            return await self._outliving_its_caller(loop, self._check(keys=keys, args=args), late)
        except self._errors():
            self._lost_answer(org_id, args)  # (maybe run by Redis, its answer lost)
            raise

    async def _outliving_its_caller(
        self, loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, _T], late: Callable[[asyncio.Task[_T]], None]
    ) -> _T:
        """``work``'s result, ``work`` run as a task of its own: a native cancel of the caller leaves it going, kept
        in ``_orphans`` (which :meth:`aclose` waits for), and ``late`` gets the task when it ends."""
        task = loop.create_task(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._orphans.add(task)
            task.add_done_callback(late)
            raise

    def _orphaned(
        self, org_id: str, args: list[Any], known: Snapshot | None, now: float, task: asyncio.Task[Any]
    ) -> None:
        """The answer of a reserve whose request is gone: the call it reserved (if any) is released."""
        self._orphans.discard(task)
        if task.cancelled():  # (the loop is closing)
            return
        exc = task.exception()
        if exc is not None:
            if isinstance(exc, self._errors()):
                self._lost_answer(org_id, args)
                self._failed(exc)
            return
        outcome = self._outcome(org_id, task.result(), known, int(now))
        self._marked(org_id, args, outcome)
        code, mode = outcome.code, args[2]
        if (code in (ALLOWED, COUNTED) and mode != "p") or (code == BLOCKED and mode in ("f", "b")):
            self.settle(org_id, outcome.period, outcome.bucket, now, tokens=0, billed=False)

    def _outcome(self, org_id: str, result: Any, known: Snapshot | None, bucket: int) -> Outcome:
        code, calls, tokens, hit, full = int(result[0]), int(result[1]), int(result[2]), _text(result[3]), result[4]
        snapshot = decode(full) if full else known
        if code == MISSING or code == COUNTED:
            return Outcome(code, None, calls, tokens, "", "", bucket, self)
        if snapshot is None:  # pragma: no cover - the script sends the snapshot when we hold none
            return Outcome(MISSING, backend=self)
        period = NOT_STARTED if len(result) > 5 else period_key(snapshot)  # (before its period starts: see CHECK)
        outcome = Outcome(code, snapshot, calls, tokens, hit, period, bucket, self)
        if code in (ALLOWED, BLOCKED):
            self._last_seen[org_id] = outcome
        return outcome

    def _unmerged(self, org_id: str) -> bool:
        """Whether records of the org counted here during an outage are not in Redis yet (being merged, or kept here
        after a merge cut off)."""
        merging = self._merging
        if merging is not None and org_id in merging:
            return True
        return bool(self.stats["redis_fallback"]) and self.fallback.knows(org_id)

    def _seed_fallback(self, org_id: str) -> None:
        """Start local counting from the usage last seen in Redis (once per org per outage)."""
        seen = self._last_seen.pop(org_id, None)
        if seen is None or seen.snapshot is None or self.fallback.peek_snapshot(org_id) is not None:
            return
        self.fallback.seed(org_id, dataclasses.replace(seen.snapshot, base_calls=seen.calls, base_tokens=seen.tokens))

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
        if period == NOT_STARTED:  # (allowed before its subscription started: nothing counted)
            return
        mark = ""
        if bucket is not None:
            checked = bucket  # (the second of its check: see QuotaBackend.settle)
            mark = self._unmark(org_id, bucket)
        # A call reserved in Redis is settled in Redis, even after an outage began: there its reservation waits to be
        # released (the local counts, seeded with what Redis showed, hold it already). Kept queued until Redis
        # answers, within reason (beyond the bound, and once closed, they are counted here instead).
        if self._closed or (not self._up() and (self._unusable or len(self._queue) >= _MAX_QUEUED_SETTLES)):
            self.fallback.settle(org_id, period, None, now, tokens=tokens, billed=billed, checked=checked)
            return
        if bucket is None and not self._up():
            # Nothing reserved in Redis (tokens counted after the call, a call billed without a check): counted here,
            # where the outage's decisions are made (a token limit holds meanwhile), and merged into Redis after it
            self._seed_fallback(org_id)
            self.fallback.settle(org_id, period, None, now, tokens=tokens, billed=billed, checked=checked)
            return
        item = (
            org_id,
            period,
            "" if bucket is None else str(bucket),
            "1" if billed else "0",
            str(int(now)),
            tokens,
            "" if checked is None else str(checked),
            mark,
        )
        self._queue.append(item)
        if bucket is not None and not billed:
            self._releasing.add(org_id)
        if self._running:
            self._wakeup.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued settles (pipelined) until cancelled; while Redis is down, try again when it is due."""
        if self._on_loop():
            await self._forget_other_loops()
        self._running = True
        self._wakeup = anyio.Event()  # this loop's (a run on another loop, started lazily, makes its own)
        # (this run's writes' mark: a forked worker's run has its own, not its parent's)
        self._mark_key = self.key("", f"written:{uuid.uuid4().hex}")
        if self._queue or self._cut or self.stats["redis_fallback"]:
            self._wakeup.set()
        task_status.started()
        try:
            while True:
                # What Redis could not take, and what was counted here during an outage: tried again when it is due
                # (or at the next settle), however idle this worker is
                if self._queue or self._cut or self.stats["redis_fallback"]:
                    due = max(self._down_until - self._clock(), self.config.redis_retry_interval, 0.05)
                    with anyio.move_on_after(due):
                        await self._wakeup.wait()
                else:
                    await self._wakeup.wait()
                self._wakeup = anyio.Event()
                await self.flush()
        finally:
            self._running = False
            await self.detach()

    async def detach(self) -> None:
        """The end of the event loop this backend's work runs in, without :meth:`aclose` (cancelled: an app served
        without a lifespan, whose loop ``asyncio.run()`` ends by cancelling every task). What this process holds for
        the fleet is not left in memory, for a next loop that may never come (the process exits): the writes the
        loop's end cut off are settled, the settles queued are written (their calls recorded or released, not held
        in flight for ``inflight_horizon``; their tokens counted), and the refresh locks it holds are handed back
        (their refreshes were cut off: another process may read those orgs at once, not a TTL later). Then the loop's
        connections are dropped: a next run, on another loop, has the pool make new ones. Bounded by
        ``redis_timeout``; called again (the middleware does, once delivery's last chance settled the tokens of the
        events it built), it writes what was settled since."""
        if self._closed or self._unusable or not self._on_loop():
            return
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.config.redis_timeout):
                await self.flush()  # (the cut writes first, once the writes still going on apart have ended)
                held, self._held = self._held, {}
                lost, self._lost_locks = self._lost_locks, set()
                await self._hand_back([*held.items(), *lost])
                while self._handing_back:  # (unlock() in a refresh's task: on a connection about to be dropped)
                    done = self._handed_back = anyio.Event()
                    await done.wait()
            try:
                await self.redis.connection_pool.disconnect()
            except Exception:  # best effort: they are dropped all the same
                logger.debug("Disconnecting from Redis failed", exc_info=True)

    async def _forget_other_loops(self) -> None:
        """The writer runs on another event loop than before (a loop per request: an app served without a lifespan
        by a test client): the pool's connections of another loop are dropped before any is used on this one. Those
        made by a loop this writer did not run in (the gate used there without its background work: a webhook's
        invalidation) were left in the pool when it ended, and their first use here failed ("Event loop is closed",
        raised by the request, or by the background work, counting then falling back to the process)."""
        loop = asyncio.get_running_loop()
        before = self._loop() if self._loop is not None else None
        self._loop = weakref.ref(loop)
        if before is loop:  # (started again after an error, on the same loop: its connections are in use)
            return
        try:
            await self.redis.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # (a dead loop's connection raises as it is dropped: it is dropped all the same)
            logger.debug("Dropping the connections of another event loop failed", exc_info=True)

    async def release_idle(self) -> None:
        """Drop the pool's idle connections: the gate's work does not run on this event loop (see
        ``QuotaGate._not_running_here``), so nothing would as it ends."""
        if self._closed or self._unusable or not self._on_loop():
            return
        try:
            await self.redis.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # best effort: they are dropped all the same
            logger.debug("Disconnecting from Redis failed", exc_info=True)

    @staticmethod
    def _on_loop() -> bool:
        """Whether an asyncio loop runs (the redis client's: under trio it has nothing to write nor drop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    async def _hand_back(self, held: Sequence[tuple[str, str]]) -> None:
        """Free the refresh locks ``held`` ((org, this process's value) pairs), each unless it is no longer this
        process's (a STORE replaced it, another process took it over)."""
        if not held or not self._up():
            return
        with self._handing():
            for result in await self._unlock.run_all(self.redis, self._freeing(held)):
                if isinstance(result, Exception):
                    raise result

    def _freeing(self, held: Sequence[tuple[str, str]]) -> list[tuple[list[Any], list[Any]]]:
        """The UNLOCK calls freeing the refresh locks ``held`` ((org, value) pairs), each if it still holds that value:
        its own value for a millisecond (freed, not marked as an invalidation's "0" is)."""
        return [([self.key(org_id, "lock")], [value, value, 1]) for org_id, value in held]

    @contextlib.contextmanager
    def _handing(self) -> Iterator[None]:
        """A lock being handed back (the end of its loop waits for it: see :meth:`detach`); a Redis error is said and
        counted, not raised (the lock expires by itself)."""
        self._handing_back += 1
        try:
            yield
        except self._errors() as exc:
            self._failed(exc)
        finally:
            self._handing_back -= 1
            if self._handed_back is not None:
                self._handed_back.set()

    async def flush(self) -> None:
        """Write every queued settle now (after any write in progress)."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        await self._resolve_cut()
        while self._queue and self._up() and not self._cut:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
            mark = _Mark(self._mark_key, uuid.uuid4().hex, batch)
            try:
                results = await self._write(mark)
            except self._errors() as exc:  # not written (or not known to be): kept for when Redis answers again
                self._failed(exc)
                # (maybe run by Redis, whole or in part, its answers lost: a connection dropped, a timeout; what it ran
                # is not written again, as its marks tell)
                self._unsure(mark)
                break
            if not self._applied(batch, results):
                break
        if not self._queue and not self._cut:
            self._releasing.clear()
        if not self._queue and (self.stats["redis_fallback"] or self._merging is not None) and self._up():
            # Redis takes writes again: shared counting resumes now (with the outage's records merged), not at the
            # next quota check, which an idle or ungated worker may never make (its records missing from the fleet's
            # counts, its fallback gauge stuck at 1), whether or not settles were queued meanwhile
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.redis_timeout):
                await self._recovered()
        if self._queue and self._unusable:  # (refused: never written; counted here, as those made since are)
            self._settle_locally(list(self._queue))
            self._queue.clear()
            self._cut.clear()
        if len(self._queue) > _MAX_QUEUED_SETTLES:  # (what is left at aclose() is counted locally there)
            self._settle_locally([self._queue.popleft() for _ in range(len(self._queue) - _MAX_QUEUED_SETTLES)])

    def _unsure(self, mark: _Mark) -> None:
        """A write whose answers were lost once Redis may have run it: its settles are queued again (first), until its
        marks tell which of them Redis ran (:meth:`_resolve_cut`)."""
        self._queue.extendleft(reversed(mark.batch))
        self._cut.append(mark)

    async def _resolve_cut(self) -> None:
        """Settle the writes whose answers were lost once Redis may have run them, in whole or in part: cut off by a
        native cancel (:meth:`_written_late`), or failed (a connection dropped, a timeout) after their settles were
        sent. What Redis ran of each is read from its marks (see :class:`_Mark`), and those settles are taken out of the
        queue, not written twice (a call recorded twice, an org on a 3-call plan refused its third); the others stay
        queued. Before any other write, which replaces the mark, and after the writes still going on apart (their
        outcome decides whether there is anything to settle)."""
        if self._orphans:
            await asyncio.wait(set(self._orphans), timeout=self.config.redis_timeout)
        while self._cut and self._up():
            mark = self._cut[0]
            try:
                value = await self.redis.get(mark.key)
            except self._errors() as exc:  # (settled once Redis answers again)
                self._failed(exc)
                return
            del self._cut[0]
            # (by identity: a settle is one tuple from settle() on, whatever became of it; one no longer queued, counted
            # here meanwhile, is not looked for)
            ran = {id(item) for item in mark.batch} - {id(item) for item in mark.not_run(_text(value or ""))}
            if ran:
                self._queue = deque(item for item in self._queue if id(item) not in ran)

    async def _pipelined(self, batch: list[_Queued], mark: _Mark) -> list[Any]:
        calls = [
            (
                [self.key(org_id, "count"), self.key(org_id, "snap")],
                [period, bucket, now, billed, tokens, self._blind_ttl_ms, PERIOD_MARGIN_MS, checked, reserved],
            )
            for org_id, period, bucket, billed, now, tokens, checked, reserved in batch
        ]
        return await self._settle.run_all(self.redis, calls, mark=mark)

    async def _write(self, mark: _Mark) -> list[Any]:
        """Redis's answers to a batch of settles, taken from the queue. Under asyncio the write runs as a task of its
        own, as :meth:`_reserve` does: a native cancel of its caller (a request writing its org's queued releases
        first, in :meth:`reserve`; the background writer cut off) leaves it going, and what Redis did not take is
        queued again when it ends (:meth:`_written_late`), instead of the batch being lost (its billed calls never
        recorded, its released ones held in flight for ``inflight_horizon``). Under trio, shielded (its time is
        bounded by ``redis_timeout``). Each write leaves its marks after its settles (:class:`_Mark`): one cut off in
        turn (its loop ending), or failed, is settled by them (:meth:`_resolve_cut`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (trio)
            with anyio.CancelScope(shield=True):
                return await self._pipelined(mark.batch, mark)
        return await self._outliving_its_caller(
            loop, self._pipelined(mark.batch, mark), functools.partial(self._written_late, mark)
        )

    def _applied(self, batch: list[_Queued], results: list[Any]) -> bool:
        """Whether Redis took every settle of ``batch``; those it refused are queued again (:meth:`_refused`)."""
        refused = self._refused(batch, results)
        self._queue.extendleft(reversed(refused))
        if not refused:
            self._answered = True
            self._wrote = self._wrote or 1 in results
        return not refused

    def _refused(self, batch: list[_Queued], results: list[Any]) -> list[_Queued]:
        """The settles of ``batch`` Redis refused (an OOM at maxmemory, a BUSY script, a failover's READONLY...), to
        be written again; not the others: applied already, written again they would be counted twice."""
        refused = [index for index, result in enumerate(results) if isinstance(result, Exception)]
        if refused:
            self._failed(results[refused[0]])
        return [batch[index] for index in refused]

    def _written_late(self, mark: _Mark, task: asyncio.Task[list[Any]]) -> None:
        """The end of a write whose caller was cancelled: what Redis did not take is queued again."""
        self._orphans.discard(task)
        batch = mark.batch
        unsure = task.cancelled()  # (the loop is ending: cut off, maybe once Redis ran it, which its marks tell)
        if not unsure and (exc := task.exception()) is not None:
            if not isinstance(exc, self._errors()):  # (as one awaited in place would raise it: not kept)
                logger.error("Writing quota settles to Redis failed", exc_info=exc)
                return
            self._failed(exc)
            unsure = True  # (maybe run by Redis, in part, as in _flush)
        kept = batch if unsure else self._refused(batch, task.result())
        if not kept:
            return
        if self._closed:  # (aclose() did not wait for it: counted here, as what is left at aclose() is)
            self._settle_locally(kept)
            return
        if unsure:
            self._unsure(mark)
        else:
            self._queue.extendleft(reversed(kept))
        if self._running:
            self._wakeup.set()

    def _settle_locally(self, batch: list[_Queued]) -> None:
        for org_id, period, _bucket, billed, now, tokens, checked, _mark in batch:
            second = int(checked) if checked else None
            self.fallback.settle(org_id, period, None, float(now), tokens=tokens, billed=billed == "1", checked=second)

    async def load(self, org_id: str) -> Snapshot | None:
        if self._up():
            try:
                return decode(await self.redis.hgetall(self.key(org_id, "snap")))
            except self._errors() as exc:
                self._failed(exc)
        return self.fallback.peek_snapshot(org_id)

    async def store(self, org_id: str, snapshot: Snapshot, now: float) -> bool:
        if not self._up():
            self.fallback.store_now(org_id, snapshot, now)
            return True
        if snapshot.active:
            ttl_ms = _expiry_ms(snapshot.period_end, now)
        else:  # due again at refresh_at; kept a margin after it (serving while Lago is down), not a day per org id
            ttl_ms = _expiry_ms(snapshot.refresh_at, now)
        args: list[Any] = [
            repr(snapshot.requested_at),
            int(snapshot.requested_at - self.config.settle_lag),
            int(now - self.config.inflight_horizon),
            ttl_ms,
            period_key(snapshot),
            repr(snapshot.period_end) if snapshot.active else "",
            max(1, int((snapshot.period_end - now) * 1000)),
            "0" if snapshot.lago_counts_calls else "1",
            "0" if snapshot.lago_counts_tokens else "1",
            self._held.get(org_id, ""),
            repr(snapshot.refresh_at),
            max(1, int((snapshot.refresh_at - now) * 1000)),
            repr(now + CLOCK_STEP),
            int(now) + int(CLOCK_STEP),
            int(now),
            repr(now),
            *_reads(snapshot),  # (what bounds the records Lago lacks: see _not_in_lago)
            snapshot.customer_id or "",
            *encode(snapshot),
        ]
        try:
            keys = [self.key(org_id, "snap"), self.key(org_id, "count"), self.key(org_id, "lock")]
            superseded = await self._store(keys=keys, args=args) == -1
        except self._errors() as exc:
            self._held.pop(org_id, None)
            self._failed(exc)
            self.fallback.store_now(org_id, snapshot, now)
            return True
        # (the lock is no longer held once Redis answered: a STORE cut off before, its loop ending, leaves it to be
        # handed back, by the refresh or by detach(), unless the STORE did replace it)
        self._held.pop(org_id, None)
        return not superseded  # (superseded: invalidated, or taken over, since this process took the lock)

    async def try_lock(self, org_id: str, ttl: float, now: float) -> bool:
        """The fleet's refresh lock: held until ``now + ttl`` on the gates' clock (``SET ... PX`` cleans up)."""
        if not self._up():
            return True
        held = repr(now + ttl)
        before = self._held.get(org_id)
        args = [
            repr(now),
            held,
            max(1, int(ttl * 1000)),
            before or "",
            # (a failed refresh's unlock holds it failure_backoff: maybe longer than a TTL)
            repr(now + max(ttl, self.config.failure_backoff) + CLOCK_STEP),
        ]
        if before is None and len(self._held) >= self.config.max_orgs:  # (bounded: refreshes cut off keep theirs)
            self._held.clear()
        # Held from before it is asked: a lock Redis set whose answer a native cancel cut off (anyio's shield lets it
        # through: its loop ending) is handed back, here or by detach(), not held a whole TTL by nobody
        self._held[org_id] = held
        try:
            # shielded (bounded by redis_timeout): a refresh cut off meanwhile knows it holds the lock, to hand it back
            with anyio.CancelScope(shield=True):
                locked = bool(await self._lock(keys=[self.key(org_id, "lock")], args=args) == 1)
        except self._errors() as exc:
            self._keep_held(org_id, held, before)
            # Maybe taken, its answer lost (a connection dropped, a reply slower than redis_timeout): this process
            # refreshes the org on its own, storing nothing in Redis, so the lock is handed back as soon as Redis
            # answers again (_release_lost; or by detach()), not held by nobody for a TTL while the fleet waits.
            # (Not at once, here: that would be one more round trip, maybe a whole redis_timeout, on this request.)
            if len(self._lost_locks) >= self.config.max_orgs:
                self._lost_locks.clear()
            self._lost_locks.add((org_id, held))
            self._failed(exc)
            return True
        except BaseException:
            if self._held.get(org_id) == held:  # (else detach() hands it back)
                self._keep_held(org_id, held, before)
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.redis_timeout):
                    await self._hand_back([(org_id, held)])
            raise
        self._answered = True
        if locked:
            self._wrote = True
        else:
            self._keep_held(org_id, held, before)
        return locked

    def _keep_held(self, org_id: str, asked: str, before: str | None) -> None:
        """The org's lock is not (known to be) the one asked for: this process holds what it held before, if any."""
        if self._held.get(org_id) != asked:
            return
        if before is None:
            del self._held[org_id]
        else:
            self._held[org_id] = before

    async def unlock(self, org_id: str, now: float, seconds: float) -> None:
        """This process's refresh of the org failed: the fleet may try again in ``seconds`` (not a TTL later)."""
        held = self._held.pop(org_id, None)
        if held is None or not self._up():
            return
        with self._handing():
            await self._unlock(
                keys=[self.key(org_id, "lock")], args=[held, repr(now + seconds), max(1, int(seconds * 1000))]
            )

    async def compact(self, org_id: str, before: int) -> None:
        """Fold the org's recorded seconds older than ``before`` into their last one (see LocalBackend.compact)."""
        await self.fallback.compact(org_id, before)
        if not self._up():
            return
        try:
            await self._compact(keys=[self.key(org_id, "count")], args=[before])
        except self._errors() as exc:
            self._failed(exc)

    async def wait_snapshot(self, org_id: str, timeout: float, after: float = 0.0) -> None:  # noqa: ASYNC109
        """Poll (5 ms doubling to 100 ms) until the refreshing process has stored a snapshot requested after
        ``after`` (a Unix time; 0: any snapshot)."""
        delay = 0.005
        with anyio.move_on_after(timeout):
            while self._up():
                try:
                    requested = await self.redis.hget(self.key(org_id, "snap"), "rq")
                    if requested is not None and float(requested) > after:
                        return
                except self._errors() as exc:
                    self._failed(exc)
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)

    async def invalidate(self, org_id: str) -> None:
        """Drop the org's snapshot fleet-wide and mark its lock, so that a refresh in flight in any process stores
        nothing it read before the change. Tried even while Redis is thought down; a Redis error is raised (as
        :class:`~._errors.QuotaBackendError`) after the local state is dropped: a webhook that could not
        invalidate the fleet fails, and Lago sends it again."""
        self._last_seen.pop(org_id, None)
        await self.fallback.invalidate(org_id)
        if not self._up() and self._unusable:  # (no fleet to tell: every process counts on its own)
            return
        try:
            keys = [self.key(org_id, "snap"), self.key(org_id, "lock")]
            await self._invalidate(keys=keys, args=[_INVALIDATION_MARK_MS])
        except self._errors() as exc:
            self._failed(exc)
            raise QuotaBackendError(
                f"Could not invalidate the quota state of org {org_id!r} in Redis ({exc}): other workers keep the "
                "cached plan and usage until their next refresh. Check LAGO_REDIS_URL; a webhook answered with this "
                "error is sent again by Lago."
            ) from exc

    async def read_again(self, org_id: str, version: str) -> None:
        """Let the org's snapshot ``version`` be read again before it is due (an unsure block: see
        ``QuotaGate._unsure_until``), unless a newer one is stored or a refresh is in flight. A Redis error is
        counted and the block stands (the snapshot is read when due)."""
        if not self._up():
            return
        try:
            await self._read_again(keys=[self.key(org_id, "snap"), self.key(org_id, "lock")], args=[version])
        except self._errors() as exc:
            self._failed(exc)

    async def mark_due(self, org_id: str) -> None:
        """Mark the org's snapshot due fleet-wide (a usage webhook): every gate refreshes it at the org's next request
        and decides on it meanwhile. A Redis error is raised as :class:`~._errors.QuotaBackendError`, as for
        :meth:`invalidate`."""
        await self.fallback.mark_due(org_id)
        if not self._up() and self._unusable:  # (no fleet to tell)
            return
        try:
            keys = [self.key(org_id, "snap"), self.key(org_id, "lock")]
            await self._mark_due(keys=keys, args=[f"due:{time.time()!r}", _INVALIDATION_MARK_MS])
        except self._errors() as exc:
            self._failed(exc)
            raise QuotaBackendError(
                f"Could not mark the quota snapshot of org {org_id!r} due in Redis ({exc}): other workers keep its "
                "cached usage until their next refresh. Check LAGO_REDIS_URL; a webhook answered with this error is "
                "sent again by Lago."
            ) from exc

    async def invalidate_all(self) -> None:
        """Every org's snapshot becomes due (SCAN over the keys ``<prefix>{<org>}:snap``, then ``:lock``; fleet-wide),
        locks freed and marked (a refresh in flight stores nothing, an org's first one too). A Redis error is raised as
        :class:`~._errors.QuotaBackendError`, as for :meth:`invalidate`."""
        await self.fallback.invalidate_all()
        self._last_seen.clear()
        if not self._up() and self._unusable:  # (no fleet to tell)
            return
        version = f"expired:{time.time()!r}"
        try:
            batch: list[str] = []
            # (the prefix taken literally, then this backend's key shape: not the keys of another app whose prefix
            # starts with this one's, nor, for a prefix holding glob characters, those its pattern would match)
            # (and the form of org ids starting with "}": see key())
            prefix = "".join("\\" + c if c in "*?[]\\" else c for c in self.config.redis_prefix)
            # The orgs with a snapshot, then those with a lock and none yet: a worker reading an org's first snapshot
            # (cold: after a deploy, a flush) read the plan before the change, and its STORE, finding its lock as it
            # left it, stored the old limits for the whole fleet until the plan's next read
            for kind in ("snap", "lock"):
                async for key in self.redis.scan_iter(match=f"{prefix}[{{}}]*:{kind}", count=1000):
                    batch.append(_text(key)[: -len(kind)] + "snap")
                    if len(batch) >= 500:
                        await self._expire_batch(batch, version)
                        batch = []
            if batch:
                await self._expire_batch(batch, version)
        except self._errors() as exc:
            self._failed(exc)
            raise QuotaBackendError(
                f"Could not mark the orgs' quota snapshots due in Redis ({exc}): other workers keep the cached plans "
                "until their next refresh. Check LAGO_REDIS_URL; a webhook answered with this error is sent again by "
                "Lago."
            ) from exc

    async def _expire_batch(self, keys: list[str], version: str) -> None:
        calls = [([key, key[: -len(":snap")] + ":lock"], [version, _INVALIDATION_MARK_MS]) for key in keys]
        for result in await self._expire.run_all(self.redis, calls):
            if isinstance(result, Exception):
                raise result

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._orphans:  # (their releases queued before the last writes)
            await asyncio.wait(set(self._orphans), timeout=self.config.redis_timeout)
        await self.flush()
        self._closed = True
        self._cut.clear()  # (Redis is down: whether it ran their settles is not known; counted here, as the queue is)
        if self._queue:  # Redis is down: what it could not take is counted here, like the rest of the outage
            self._settle_locally(list(self._queue))
            self._queue.clear()
        if self._unusable and not self._sharded:  # (never connected: the redis client does not run on this loop)
            return
        try:
            await self.redis.aclose()
        except self._errors():  # pragma: no cover - closing a dead connection
            pass
