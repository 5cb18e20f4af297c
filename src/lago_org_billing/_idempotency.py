"""The idempotency store shared by workers: with ``idempotency_header`` and ``LAGO_REDIS_URL``, the first timestamp of
each idempotent transaction kept in Redis, so that a retry reaching another worker is the same event. Asked by
``_middleware.OrgBillingMiddleware`` when a request with an idempotency key is over, before its event is enqueued
(the per-process memory of first timestamps stays in the middleware).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from typing import Any

from . import _forks
from ._errors import ConfigurationError
from ._quota_redis import LoopConnections, RedisProblems, RedisUse, reconnecting_pool_options, unreadable_redis_url

# (the middleware's logger: its messages keep the name they were logged under)
logger = logging.getLogger("lago_org_billing.middleware")

#: Seconds a Redis call may take (its connection's too), as the quota gate's and the webhooks' dedupe's. Without it,
#: redis-py's own (5 s in redis-py 8, none before): a Redis that stopped answering (a network partition, a firewall
#: dropping packets, a frozen node) held each idempotent request that long after its answer, and with LAGO_API_TIMEOUT
#: below it (the middleware's bound, which cancels the call) the outage was never said.
_REDIS_TIMEOUT = 2.0


class SharedFirstSeen:
    """The first timestamp of each idempotent transaction, in Redis for a day: one round trip (set if absent, then
    read). Redis unavailable: ``None`` (the caller keeps its own), logged once per outage; asked again at the next
    request. A misconfiguration or a state of Redis only an operator ends (a replica's URL, TLS, credentials, ACL
    permissions, maxmemory) is said once as what to change (as the quota store says it: ``redis_problem``). After a
    READONLY (a failover made the node a replica) the pooled connections are dropped, so that new ones reach the
    endpoint's new primary, and the call is made once more on a new connection. So is a call whose pooled connection
    Redis had closed meanwhile (a restart, its ``timeout`` or a proxy dropping idle clients): not an outage."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as redis_asyncio
            from redis.exceptions import ConnectionError as RedisConnectionError
        except ImportError:
            raise ConfigurationError(
                "idempotency_header with LAGO_REDIS_URL shares first timestamps in Redis, which needs the redis "
                "client: pip install 'lago-org-billing[redis]'.",
                variable="LAGO_REDIS_URL",
            ) from None
        failure: ConfigurationError | None
        try:  # (read now, not at the first idempotent request: redis-py refused its query there, a ValueError each)
            redis_asyncio.connection.parse_url(url)
        except (ValueError, TypeError) as exc:
            failure = unreadable_redis_url(url, exc, "the idempotency keys' store shared by workers")
        else:
            failure = None
        if failure is not None:
            raise failure
        # (bounded: a Redis that does not answer is unavailable, said; the URL's socket_timeout wins, as redis-py
        # applies its query last)
        self._from_url = functools.partial(
            redis_asyncio.from_url,
            url,
            socket_timeout=_REDIS_TIMEOUT,
            socket_connect_timeout=_REDIS_TIMEOUT,
            **reconnecting_pool_options(redis_asyncio),
        )
        self._connection_error: type[Exception] = RedisConnectionError
        self.redis: Any = None  # made on first use, closed with the loop it belongs to (see aclose)
        #: The event loop the client's connections were last used on (see ``_forget_other_loops``).
        self._loops = LoopConnections()
        _forks.track(self)
        self.down = False
        self._said_unusable = False
        self._problems = RedisProblems(_IDEMPOTENCY_REDIS_USE, url, logger)

    def _forked(self) -> None:
        """In a forked child: a client of its own, made on first use (the parent's, its pooled sockets, kept
        referenced, never used: the parent would read the replies to the child's commands as its own)."""
        if self.redis is not None:
            _forks.left_by_parent.append(self.redis)
            self.redis = None

    def _usable(self) -> bool:
        """Whether the running event loop can use the redis client: it runs only under asyncio. Under trio
        (``hypercorn -k trio``) each call raised, and closing the client raised at shutdown: the first timestamps stay
        in the process instead (as while Redis is down), said once."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            library = "trio" if "trio" in sys.modules else "this event loop"
        else:
            return True
        if not self._said_unusable:
            self._said_unusable = True
            logger.error(
                "LAGO_REDIS_URL is set but the redis client (redis.asyncio) runs only under asyncio, not %s: the first "
                "timestamps of idempotency keys stay in each process (a retry reaching another worker gets its own, "
                "billed again on Lago's ClickHouse store). Run the server on asyncio (uvicorn, hypercorn -k asyncio), "
                "or unset LAGO_REDIS_URL.",
                library,
            )
        return False

    async def first(self, transaction_id: str, candidate: float) -> float | None:
        if not self._usable():
            return None
        if self.redis is None:
            self.redis = self._from_url()
        await self._forget_other_loops()
        key = f"lago_org_billing:first_seen:{transaction_id}"
        for attempt in range(2):  # (a second one only after a failover's READONLY, on a new connection)
            try:
                value = await self._eval(_FIRST_SEEN, key, repr(candidate))
            except Exception as exc:  # redis errors, OSError, timeouts
                if not await self._failed(exc) or attempt:
                    return None
            else:
                if self.down:
                    self._recovered()
                self._problems.succeeded(write=True)
                return float(value)
        return None  # pragma: no cover - (the loop returns)

    async def forget(self, transaction_id: str, first: float) -> None:
        """Drop the first timestamp of a transaction if it is still ``first`` (its event was dropped: a retry's is the
        first). Redis unavailable: left to expire (the retry then counts as a retry until the next snapshot)."""
        if not self._usable():
            return
        if self.redis is None:
            self.redis = self._from_url()
        await self._forget_other_loops()
        try:
            await self._eval(_FORGET, f"lago_org_billing:first_seen:{transaction_id}", repr(first))
        except Exception as exc:  # redis errors, OSError, timeouts
            await self._failed(exc)

    async def _eval(self, script: str, key: str, argument: str) -> Any:
        """``EVAL`` of a script of one key, made once more (on a new connection) when the pooled connection it took
        was closed by Redis meanwhile. :func:`reconnecting_pool_options` has the pool reconnect a connection whose close
        it has read; one closed as it is handed out (Redis's ``timeout`` or a proxy dropping idle clients at that
        moment, a restart) still fails its command, and a client made from a URL makes no second attempt (its
        connections' ``Retry`` has none). That call was taken for an outage (said at WARNING) and its first timestamp
        stayed in the process, so that a retry reaching another worker was billed again though Redis answered all
        along. Not while Redis is known to be down (one attempt per request then), nor after a timeout (a second one
        would double the wait); both scripts may run twice."""
        try:
            return await self.redis.eval(script, 1, key, argument)
        except Exception as exc:  # (an exact ConnectionError: not auth, not busy loading, not a full pool)
            if self.down or type(exc) is not self._connection_error:
                raise
        return await self.redis.eval(script, 1, key, argument)  # (the failed connection was dropped: a new one)

    async def _failed(self, exc: Exception) -> bool:
        """Say what failed (once per outage; a problem once per kind, with what to change); after a READONLY, drop the
        pooled connections (they reach a node a failover made a replica). Whether to try again at once (a READONLY
        after a write: a failover, its endpoint may name the new primary already)."""
        # a misconfiguration, or a state of Redis an operator fixes: said once, what to do
        known, again = await self._problems.failed(exc, self.redis)
        if not known:
            self._outage(exc)
        self.down = True
        return again

    def timed_out(self, bound: float) -> None:
        """The caller's bound (``LAGO_API_TIMEOUT``, when under this store's own timeout) cancelled a call before
        Redis answered: an outage, said (once) as the call's own timeout would have said it. Without this, a Redis
        that stopped answering was never said, and ``down`` stayed false."""
        self._outage(f"no answer within LAGO_API_TIMEOUT, {bound:g} s")
        self.down = True

    def _outage(self, reason: object) -> None:
        if not self.down:
            logger.warning(
                "Redis (LAGO_REDIS_URL) is unavailable for idempotency keys (%s): a retry reaching another worker "
                "gets its own timestamp meanwhile (billed again on Lago's ClickHouse store).",
                reason,
            )

    def _recovered(self) -> None:
        self.down = False
        logger.info(
            "Redis (%s) answers again: idempotency keys' first timestamps are shared again.", self._problems.shown_url
        )

    async def _forget_other_loops(self) -> None:
        """Drop the client's idle connections when this call runs on another event loop than the last one: they
        belong to that loop. The middleware closes the client as each loop it serves on ends (its lifespan's shutdown,
        or the end of the background work it started without one); a client left open by a loop that ended otherwise
        had each first call on the next loop fail ("Event loop is closed", "attached to a different loop"): said as
        Redis being unavailable, that key's first timestamp kept in the process (a retry reaching another worker
        billed again), and ``aclose()`` from that loop raised (as the webhooks' dedupe did: see ``RedisDedupe``)."""
        await self._loops.drop_others(self.redis, "the idempotency store", logger)

    async def aclose(self) -> None:
        """Close the client (its connections belong to the running loop); the next use makes another."""
        if self.redis is not None:
            await self._forget_other_loops()  # (closed from another loop than its last call's: "Event loop is closed")
        redis, self.redis = self.redis, None
        self._loops.forget()
        if redis is not None:
            await redis.aclose()


#: What the idempotency store's Redis problems say it is (see redis_problem).
_IDEMPOTENCY_REDIS_USE = RedisUse(
    who="the idempotency store (idempotency_header)",
    writes="the first timestamp of each idempotency key",
    refused="the idempotency keys'",
    keys="idempotency key",
    prefix="lago_org_billing:first_seen:",
    meanwhile=(
        "Meanwhile a retry reaching another worker gets its own timestamp (billed again on Lago's ClickHouse store); "
        "Redis is asked again at each idempotent request."
    ),
)


#: KEYS[1] the transaction, ARGV[1] this request's start: the first one stored (for a day) wins.
_FIRST_SEEN = """
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', 86400)
return redis.call('GET', KEYS[1])
"""


_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
