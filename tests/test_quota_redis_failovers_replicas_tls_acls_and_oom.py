"""Review of the Redis quota backend as production runs Redis: failovers and misconfigurations (real ``redis-server``
processes on 127.0.0.1).

* A failover (Sentinel, ElastiCache, a replica promoted): the old primary, now a replica, answers the writes of the
  pooled connections with ``READONLY``; the endpoint (a DNS name, here a forwarder switched to the new primary) names
  the new one. The backend drops its pooled connections, reconnects and comes back on its own, said once.
* ``LAGO_REDIS_URL`` naming a replica from the start: said once, at first use, as the configuration error it is.
* TLS misconfigurations (``rediss://`` to a certificate that does not verify, ``redis://`` to a TLS-only port), a
  wrong password, an ACL user without ``EVALSHA``/``EVAL``, and a Redis out of memory (``maxmemory`` with
  ``noeviction``): each said once, with what to change, while the gate falls back to counting in the process (the
  documented outage policy); not a generic outage said again at every retry.

Waiting for a redis-server to listen is a bounded readiness poll of another process (as in the rest of the suite).
"""

# ruff: noqa: F811 (test_quota_redis's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import REDIS_SERVER, TOKENS, Clock, _redis_pid, chat, free_port, redis_server
from lago_org_billing import LagoClient, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing._snapshots import Outcome
from test_quota_redis import _OPEN, _close_gates, client, clock, fake, prefix  # noqa: F401 (its fixtures)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

LOGGER = "lago_org_billing.quota"


def said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The warnings and errors the quota backend logged."""
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def dead_port() -> int:
    return free_port()


def settle(org: str, outcome: Outcome) -> None:
    """The call billed, settled where it was decided (as the gate does: Redis, or the process during an outage)."""
    assert outcome.backend is not None
    outcome.backend.settle(org, outcome.period, outcome.bucket, time.time(), tokens=TOKENS, billed=True)


async def cycles(backend: RedisBackend, now: list[float], org: str, rounds: int = 3) -> None:
    """``rounds`` retry intervals, each with a check, its settle and the writer's flush (the backend's clock moved
    past each retry)."""
    for _ in range(rounds):
        now[0] += 3600
        outcome = await backend.reserve(org, time.time(), "blind", None)
        settle(org, outcome)
        await backend.flush()


class Endpoint:
    """A managed Redis's endpoint (ElastiCache's primary endpoint, a Sentinel-updated DNS name): connections made
    after ``target`` changes go to the new node; those open stay with the node they were made to, as TCP
    connections to the old address do after a DNS change."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


@contextlib.contextmanager
def tls_redis(directory: Path, cert: Path, key: Path) -> Iterator[int]:
    """A redis-server with a TLS port (its certificate self-signed); yields that port. Skipped when redis-server was
    built without TLS."""
    assert REDIS_SERVER is not None
    port, tls_port = free_port(), free_port()
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    args += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--dir", str(directory)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while _redis_pid(port) != proc.pid and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # (readiness of another process: it has no other way to say it listens)
        if proc.poll() is not None:
            pytest.skip("redis-server was built without TLS (or its ports were taken)")
        yield tls_port
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------- 1. a failover


async def test_a_failover_drops_the_pooled_connections_and_recovers_on_its_own(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The old primary, made a replica by a failover, answered the pooled connections' writes with READONLY. The
    recovery probe (PING, which a replica answers) said "answers again", the next write failed again: the worker
    flapped between Redis and its own counts every ``redis_retry_interval`` for the life of the process, logging
    each time, never reaching the new primary its endpoint named. Now its connections are dropped, it reconnects to
    the endpoint (the new primary) and counts there again, having said once what happened."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with redis_server(tmp_path / "a") as old_url, redis_server(tmp_path / "b") as new_url:
        old = redis.Redis.from_url(old_url)
        new = redis.Redis.from_url(new_url)
        endpoint = Endpoint(old.connection_pool.connection_kwargs["port"])
        await endpoint.start()
        now = [1000.0]
        backend = RedisBackend(
            f"redis://127.0.0.1:{endpoint.port}/0", QuotaConfig(redis_prefix=prefix), clock=lambda: now[0]
        )
        try:
            for _ in range(2):
                outcome = await backend.reserve("org_f", time.time(), "blind", None)
                settle("org_f", outcome)
            await backend.flush()
            assert backend.stats == {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0}
            # the failover: the old primary follows another node (read-only from now on), the endpoint names the new
            old.execute_command("REPLICAOF", "127.0.0.1", dead_port())
            endpoint.target = new.connection_pool.connection_kwargs["port"]
            outcome = await backend.reserve("org_f", time.time(), "blind", None)
            assert backend.stats["redis_fallback"] == 1  # (the outage policy meanwhile: counted here)
            settle("org_f", outcome)
            await cycles(backend, now, "org_f")
            assert backend.stats["redis_fallback"] == 0, backend.stats
            calls = int(new.hget(backend.key("org_f", "count"), "calls") or 0)
            assert calls == 4  # the outage's call merged, and the three made since: all on the new primary
            warnings = said(caplog)
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert "READONLY" in warnings[0].getMessage() or "read-only" in warnings[0].getMessage()
            assert "reconnect" in warnings[0].getMessage()
        finally:
            await backend.aclose()
            await endpoint.close()
            old.close()
            new.close()


# ------------------------------------------------------------------- 2. a replica's URL


async def test_a_replica_url_is_said_at_first_use_to_be_the_wrong_one(
    tmp_path: Path, client: LagoClient, clock: Clock, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """LAGO_REDIS_URL named a replica (ElastiCache's reader endpoint, a replica's address): the reads worked, the
    first write got READONLY, logged as a generic "Redis failed ... falls back until it answers" warning, and again
    at every retry (PING, which a replica answers, counted as Redis being back). Now the first request says once, as
    an error, that the URL must be the primary's; requests are served meanwhile (counted in the process)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with redis_server(tmp_path) as url:
        admin = redis.Redis.from_url(url)
        admin.execute_command("REPLICAOF", "127.0.0.1", dead_port())
        now = [1000.0]
        backend = RedisBackend(url, QuotaConfig(redis_prefix=prefix), clock=lambda: now[0])
        settings = client.settings.replace(org_header="X-Org-Id", redis_url=url)
        gate = QuotaGate(settings, client, backend=backend, config=backend.config, clock=clock.time)
        _OPEN.append(gate)
        app = OrgBillingMiddleware(Starlette(routes=[Route("/v1/chat", chat)]), settings, quota=gate, client=client)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                for _ in range(4):
                    assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})).status_code == 200
                    now[0] += 3600
            assert backend.stats["redis_fallback"] == 1
            warnings = said(caplog)
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert warnings[0].levelno == logging.ERROR
            message = warnings[0].getMessage()
            assert "LAGO_REDIS_URL" in message and "replica" in message and "primary" in message
        finally:
            await app.aclose()
            admin.close()


# ------------------------------------------------------------------- 3. TLS, passwords, ACLs


async def test_a_certificate_that_does_not_verify_is_said_once_with_the_fix(
    tmp_path: Path, tls_files: tuple[Path, Path], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """rediss:// to a Redis whose certificate is signed by a private CA not given: logged as Redis being down, "until
    it answers" (it never would). Now said once as an error naming the option to set (ssl_ca_certs)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with tls_redis(tmp_path, *tls_files) as tls_port:
        now = [1000.0]
        backend = RedisBackend(
            f"rediss://127.0.0.1:{tls_port}/0", QuotaConfig(redis_prefix=prefix), clock=lambda: now[0]
        )
        try:
            outcome = await backend.reserve("org_t", time.time(), "blind", None)
            settle("org_t", outcome)
            await cycles(backend, now, "org_t")
            assert backend.stats["redis_fallback"] == 1 and backend.stats["fallback_decisions"] == 4
        finally:
            await backend.aclose()
    warnings = said(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert warnings[0].levelno == logging.ERROR
    assert "certificate" in message and "ssl_ca_certs" in message and "LAGO_REDIS_URL" in message


async def test_a_plain_url_to_a_tls_port_is_said_once_with_the_fix(
    tmp_path: Path, tls_files: tuple[Path, Path], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis:// to a TLS-only port (ElastiCache with in-transit encryption): the server resets each connection, logged
    as Redis being down. Now said once: use rediss://."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with tls_redis(tmp_path, *tls_files) as tls_port:
        now = [1000.0]
        backend = RedisBackend(
            f"redis://127.0.0.1:{tls_port}/0", QuotaConfig(redis_prefix=prefix), clock=lambda: now[0]
        )
        try:
            await cycles(backend, now, "org_t")
            assert backend.stats["redis_fallback"] == 1 and backend.stats["fallback_decisions"] == 3
        finally:
            await backend.aclose()
    warnings = said(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].levelno == logging.ERROR and "rediss://" in warnings[0].getMessage()


async def test_a_wrong_password_is_said_once_with_the_fix(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """WRONGPASS (a rotated AUTH token, a user's password changed): an error naming the credentials to fix, said
    once; the password itself never logged."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    user = f"app_{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(user, enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
    now = [1000.0]
    url = redis_url.replace("redis://", f"redis://{user}:Wr0ngS3cret@")
    backend = RedisBackend(url, QuotaConfig(redis_prefix=prefix), clock=lambda: now[0])
    try:
        await cycles(backend, now, "org_p")
        assert backend.stats["redis_fallback"] == 1
    finally:
        await backend.aclose()
        admin.acl_deluser(user)
        admin.close()
    warnings = said(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert warnings[0].levelno == logging.ERROR and "password" in message and "LAGO_REDIS_URL" in message
    assert "Wr0ngS3cret" not in caplog.text


async def test_an_acl_user_without_evalsha_is_said_once_with_the_fix(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user denied EVALSHA and EVAL (a read/write template without scripting): NOPERM at every check. PING
    worked, so every retry announced "Redis answers again" and the next check warned of an outage once more (two
    lines per retry interval, for ever). Now said once: the permissions to grant. When they are granted, the
    backend counts in Redis again on its own."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    user = f"app_{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-evalsha", "-eval"])
    now = [1000.0]
    backend = RedisBackend(
        redis_url.replace("redis://", f"redis://{user}:pw@"), QuotaConfig(redis_prefix=prefix), clock=lambda: now[0]
    )
    try:
        await cycles(backend, now, "org_a")
        assert backend.stats["redis_fallback"] == 1
        warnings = said(caplog)
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        message = warnings[0].getMessage()
        assert warnings[0].levelno == logging.ERROR and "ACL" in message and "+evalsha" in message
        admin.acl_setuser(user, commands=["+evalsha", "+eval"])
        await cycles(backend, now, "org_a", rounds=1)
        assert backend.stats["redis_fallback"] == 0
        assert int(admin.hget(backend.key("org_a", "count"), "calls") or 0) == 4
    finally:
        await backend.aclose()
        admin.acl_deluser(user)
        admin.close()


# ------------------------------------------------------------------- 4. out of memory


async def test_a_redis_out_of_memory_is_said_once_with_the_fix(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """maxmemory reached with noeviction: every write answered OOM. PING worked: the worker flapped between Redis
    and its own counts, a warning at each retry interval. Now said once (an eviction policy or more memory), counted
    in the process meanwhile, and back in Redis when memory is freed."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with redis_server(tmp_path) as url:
        admin = redis.Redis.from_url(url)
        now = [1000.0]
        backend = RedisBackend(url, QuotaConfig(redis_prefix=prefix), clock=lambda: now[0])
        try:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            await cycles(backend, now, "org_m")
            assert backend.stats["redis_fallback"] == 1 and backend.stats["fallback_decisions"] == 3
            warnings = said(caplog)
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            message = warnings[0].getMessage()
            assert "maxmemory" in message and "maxmemory-policy" in message
            admin.config_set("maxmemory", "0")
            await cycles(backend, now, "org_m", rounds=1)
            assert backend.stats["redis_fallback"] == 0
            assert int(admin.hget(backend.key("org_m", "count"), "calls") or 0) == 4
            assert len(said(caplog)) == 1
        finally:
            await backend.aclose()
            admin.close()
