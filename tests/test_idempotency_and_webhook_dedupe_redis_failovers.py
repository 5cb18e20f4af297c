"""Redis failovers and misconfigurations under the idempotency store (``idempotency_header`` with
``LAGO_REDIS_URL``: :class:`~lago_org_billing._idempotency.SharedFirstSeen`) and the webhooks' ``RedisDedupe`` (real
``redis-server`` processes on 127.0.0.1).

* A failover (Sentinel, ElastiCache, a replica promoted): the old primary, now a replica, answered the pooled
  connections' writes with ``READONLY`` for the life of the process (said once, then never again); a retry reaching
  another worker was billed again. The store now drops its pooled connections and reconnects to the endpoint (the
  new primary), said once as the failover it is, and shares the first timestamps there again.
* ``LAGO_REDIS_URL`` naming a replica, a wrong password, an ACL user without ``EVAL``, a Redis out of memory, a
  certificate that does not verify, ``redis://`` to a TLS-only port: each was said as "Redis is unavailable"; each is
  now said once, as an error naming what to change, and the store comes back on its own once it is changed.
* The webhooks' ``RedisDedupe`` after a failover: every claim answered READONLY, every delivery processed without
  dedupe for good (a delivery Lago sends again ran its handlers twice). It drops its pooled connections and makes the
  claim again on a new one, as the idempotency store does.

The failover's endpoint is a forwarder switched to the new primary (as a DNS name follows it): connections open stay
with the old node. Waiting for a redis-server to listen is the suite's bounded readiness poll of another process.
"""

# ruff: noqa: F811 (the fixtures imported are the tests' parameters)
from __future__ import annotations

import logging
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import REDIS_SERVER, chat, free_port, redis_server
from lago_org_billing import BillingSettings, OrgBillingMiddleware, _middleware
from lago_org_billing.testing import FakeLago
from test_quota_redis_failovers_replicas_tls_acls_and_oom import Endpoint, tls_redis
from test_webhooks import SUB_STARTED, Calls, hmac_headers, hmac_receiver, post  # noqa: F401 (post: a fixture)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

LOGGER = "lago_org_billing.middleware"


def said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The warnings and errors the middleware logged about Redis."""
    return [
        r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING and "Redis" in r.getMessage()
    ]


class Fleet:
    """Workers (each a middleware with its own memory) sharing first timestamps through ``url``, billing into one
    Lago that keeps an event per (transaction id, timestamp), as its ClickHouse store does; the clock is theirs."""

    def __init__(self, url: str, workers: int = 2) -> None:
        self.lago = FakeLago(api_key="k", event_store="clickhouse")
        settings = BillingSettings(
            api_url=self.lago.base_url, api_key="k", org_header="X-Org-Id", quota_mode="off", redis_url=url
        )
        self.workers = [
            OrgBillingMiddleware(
                Starlette(routes=[Route("/v1/chat", chat)]),
                settings,
                idempotency_header="Idempotency-Key",
                transport=self.lago.transport(),
            )
            for _ in range(workers)
        ]

    async def call(self, worker: int, key: str) -> None:
        """A request with the idempotency key ``key`` on ``worker``, its event delivered."""
        app = self.workers[worker]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1", "Idempotency-Key": key})
        assert response.status_code == 200
        assert await app.pipeline.flush(5)

    async def aclose(self) -> None:
        for worker in self.workers:
            await worker.aclose()


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The middleware's wall clock (a retry comes seconds after its request: another timestamp of its own)."""
    clock = [1_700_000_000.0]
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    return clock


@pytest.fixture
async def fleet_of() -> AsyncIterator[Callable[[str], Fleet]]:
    made: list[Fleet] = []

    def make(url: str) -> Fleet:
        made.append(Fleet(url))
        return made[-1]

    yield make
    for fleet in made:
        await fleet.aclose()


async def retried(fleet: Fleet, now: list[float]) -> bool:
    """A request on worker 0 then its retry on worker 1 five seconds later: whether Lago has one event of them."""
    before = len(fleet.lago.events)
    key = f"k-{uuid.uuid4()}"
    await fleet.call(0, key)
    now[0] += 5
    await fleet.call(1, key)
    now[0] += 5
    return len(fleet.lago.events) == before + 1


# ------------------------------------------------------------------- 1. a failover


async def test_a_failover_reconnects_the_idempotency_store_to_the_new_primary(
    tmp_path: Path, now: list[float], fleet_of: Callable[[str], Fleet], caplog: pytest.LogCaptureFixture
) -> None:
    """After a failover each worker's pooled connections stayed on the old primary (a replica now): every request's
    Redis call answered READONLY for the life of the process, and a retry reaching another worker was billed again.
    Now the first READONLY drops the pool, the store reconnects to the endpoint (the new primary) at once, and says
    once per worker what happened."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with redis_server(tmp_path / "a") as old_url, redis_server(tmp_path / "b") as new_url:
        old, new = redis.Redis.from_url(old_url), redis.Redis.from_url(new_url)
        endpoint = Endpoint(old.connection_pool.connection_kwargs["port"])
        await endpoint.start()
        try:
            fleet = fleet_of(f"redis://127.0.0.1:{endpoint.port}/0")
            assert await retried(fleet, now)  # (each worker's pool holds a connection to the old primary)
            old.execute_command("REPLICAOF", "127.0.0.1", free_port())  # the failover
            endpoint.target = new.connection_pool.connection_kwargs["port"]
            assert await retried(fleet, now)  # (the request reconnects and asks the new primary)
            assert await retried(fleet, now)
            assert len(new.keys("lago_org_billing:first_seen:*")) == 2
            warnings = said(caplog)
            assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per worker
            for record in warnings:
                message = record.getMessage()
                assert record.levelno == logging.WARNING and "READONLY" in message and "failover" in message
                assert "reconnect" in message and "unavailable" not in message
        finally:
            await endpoint.close()
            old.close()
            new.close()


# ------------------------------------------------------------------- 2. misconfigurations, said once with the fix


async def test_a_replica_url_is_said_once_as_the_configuration_error_it_is(
    tmp_path: Path, now: list[float], fleet_of: Callable[[str], Fleet], caplog: pytest.LogCaptureFixture
) -> None:
    """LAGO_REDIS_URL naming a replica (ElastiCache's reader endpoint): said as "Redis is unavailable", a warning of
    an outage. Now an error, once, saying that it must be the primary's endpoint; requests are served and billed."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with redis_server(tmp_path) as url:
        admin = redis.Redis.from_url(url)
        try:
            admin.execute_command("REPLICAOF", "127.0.0.1", free_port())
            fleet = fleet_of(url)
            for _ in range(2):
                await retried(fleet, now)
            assert len(fleet.lago.events) == 4  # served and billed (each worker's own timestamp: the outage policy)
        finally:
            admin.close()
    warnings = said(caplog)
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per worker
    for record in warnings:
        message = record.getMessage()
        assert record.levelno == logging.ERROR and "LAGO_REDIS_URL" in message
        assert "replica" in message and "primary" in message


async def test_a_wrong_password_is_said_once_with_the_fix_and_never_shown(
    redis_url: str, now: list[float], fleet_of: Callable[[str], Fleet], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    user = f"app_{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(user, enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
    try:
        fleet = fleet_of(redis_url.replace("redis://", f"redis://{user}:Wr0ngS3cret@"))
        for _ in range(2):
            await retried(fleet, now)
    finally:
        admin.acl_deluser(user)
        admin.close()
    warnings = said(caplog)
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    for record in warnings:
        message = record.getMessage()
        assert record.levelno == logging.ERROR and "LAGO_REDIS_URL" in message and "credentials" in message
    assert "Wr0ngS3cret" not in caplog.text


async def test_an_acl_user_without_eval_is_said_once_and_the_store_recovers_when_granted(
    redis_url: str, now: list[float], fleet_of: Callable[[str], Fleet], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    user = f"app_{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-eval"])
    try:
        fleet = fleet_of(redis_url.replace("redis://", f"redis://{user}:pw@"))
        for _ in range(2):
            assert not await retried(fleet, now)
        warnings = said(caplog)
        assert len(warnings) == 2, [r.getMessage() for r in warnings]
        for record in warnings:
            message = record.getMessage()
            assert record.levelno == logging.ERROR and "ACL" in message and "+eval" in message
            assert "lago_org_billing:first_seen:*" in message
        admin.acl_setuser(user, commands=["+eval"])
        assert await retried(fleet, now)  # back on its own
        assert len(said(caplog)) == 2
    finally:
        admin.acl_deluser(user)
        admin.close()


async def test_a_redis_out_of_memory_is_said_once_and_the_store_recovers_when_freed(
    tmp_path: Path, now: list[float], fleet_of: Callable[[str], Fleet], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with redis_server(tmp_path) as url:
        admin = redis.Redis.from_url(url)
        try:
            fleet = fleet_of(url)
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            for _ in range(2):
                assert not await retried(fleet, now)
            warnings = said(caplog)
            assert len(warnings) == 2, [r.getMessage() for r in warnings]
            for record in warnings:
                message = record.getMessage()
                assert record.levelno == logging.ERROR and "maxmemory" in message and "maxmemory-policy" in message
            admin.config_set("maxmemory", "0")
            assert await retried(fleet, now)
            assert len(said(caplog)) == 2
        finally:
            admin.close()


@pytest.mark.parametrize(
    ("scheme", "fix"),
    [("rediss", ("certificate", "ssl_ca_certs")), ("redis", ("rediss://",))],
    ids=["a-certificate-that-does-not-verify", "a-plain-url-to-a-tls-port"],
)
async def test_a_tls_mistake_is_said_once_with_the_fix(
    scheme: str,
    fix: tuple[str, ...],
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    now: list[float],
    fleet_of: Callable[[str], Fleet],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with tls_redis(tmp_path, *tls_files) as tls_port:
        fleet = fleet_of(f"{scheme}://127.0.0.1:{tls_port}/0")
        for _ in range(2):
            await retried(fleet, now)
    warnings = said(caplog)
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    for record in warnings:
        message = record.getMessage()
        assert record.levelno == logging.ERROR and all(words in message for words in fix)


# ------------------------------------------------------------------- 3. the webhooks' dedupe after a failover


async def test_a_failover_under_the_webhook_dedupe_reconnects_to_the_new_primary(
    tmp_path: Path, post: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failover every claim of the dedupe answered READONLY: each delivery was processed without dedupe for
    the life of the process, so a delivery Lago sent again ran its handlers again. The claim that meets READONLY must
    drop the pooled connections: the next delivery's reach the endpoint's new primary."""
    caplog.set_level(logging.INFO, logger="lago_org_billing.webhooks")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with redis_server(tmp_path / "a") as old_url, redis_server(tmp_path / "b") as new_url:
        old, new = redis.Redis.from_url(old_url), redis.Redis.from_url(new_url)
        endpoint = Endpoint(old.connection_pool.connection_kwargs["port"])
        await endpoint.start()
        calls = Calls()
        receiver = hmac_receiver(calls, redis_url=f"redis://127.0.0.1:{endpoint.port}/0")
        try:
            assert (await post(receiver, SUB_STARTED, hmac_headers(SUB_STARTED))).json()["status"] == "processed"
            old.execute_command("REPLICAOF", "127.0.0.1", free_port())  # the failover
            endpoint.target = new.connection_pool.connection_kwargs["port"]
            await post(receiver, SUB_STARTED, hmac_headers(SUB_STARTED))  # (may meet READONLY: processed anyway)
            headers = hmac_headers(SUB_STARTED, unique_key=f"again-{uuid.uuid4()}")
            first = await post(receiver, SUB_STARTED, headers)
            second = await post(receiver, SUB_STARTED, headers)
            assert (first.json()["status"], second.json()["status"]) == ("processed", "duplicate")
            assert len(calls.events) == 3
        finally:
            await receiver.aclose()
            await endpoint.close()
            old.close()
            new.close()
