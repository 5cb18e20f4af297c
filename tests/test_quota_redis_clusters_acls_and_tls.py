"""Review of the Redis quota backend as real deployments run Redis (real ``redis-server`` processes on 127.0.0.1):

* Redis Cluster (ElastiCache / Memorystore cluster mode): every key of one org hashes to one slot whatever the org
  id (the multi-key scripts would get CROSSSLOT otherwise); a cluster-mode Redis with one shard (all slots on the
  node ``LAGO_REDIS_URL`` names) works; one with several shards (MOVED) is refused once, clearly, instead of the
  worker falling back and retrying every ``redis_retry_interval`` forever.
* ACL users allowed ``EVAL``/``EVALSHA`` but not ``SCRIPT`` (``SCRIPT LOAD``/``EXISTS`` denied), after the script
  cache was flushed (a failover, a restart).
* ``rediss://`` with the certificate options in the URL (``ssl_ca_certs``, ``ssl_cert_reqs``).

Cluster nodes are started here (``--cluster-enabled yes``, slots assigned by hand); waiting for them to say
``cluster_state:ok`` is a bounded readiness poll of another process, as for any redis-server of the suite.
"""

# ruff: noqa: F811 (test_quota_redis's fixtures, imported, are the tests' parameters)
from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from _quota_app import REDIS_SERVER, TOKENS, Clock, _redis_pid, free_port
from lago_org_billing import LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_redis import RedisBackend
from lago_org_billing.testing import FakeLago
from test_quota_redis import _OPEN, _close_gates, client, clock, fake, prefix  # noqa: F401 (its fixtures)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

#: Org ids a header may carry (printable): a leading "}" (or none at all) made an empty hash tag in "{<org>}".
ODD_IDS = ["}x", "}", "}}", "}{x}", "", "{", "{}", "x}", "a{}b", "{x}", "x", "org é 😀", "a:b", "*"]
KINDS = ["snap", "count", "lock", "merge:0123abcd"]


def make_gate(client: LagoClient, clock: Clock, url: str, prefix: str, **config: Any) -> QuotaGate:
    settings = client.settings.replace(redis_url=url)
    gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix, **config), clock=clock.time)
    _OPEN.append(gate)
    return gate


def backend_of(gate: QuotaGate) -> RedisBackend:
    backend = gate.backend
    assert isinstance(backend, RedisBackend)
    return backend


async def usage(gate: QuotaGate, org: str) -> dict[str, Any]:
    return dict((await gate.enforce_usage_limits(org))["usage"])


async def settled(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


# ------------------------------------------------------------------- cluster nodes


def _start_node(directory: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on a free port of 127.0.0.1 (with ``extra`` arguments; "{port}" in them: that port)."""
    assert REDIS_SERVER is not None
    for _attempt in range(5):
        port = free_port()
        args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += [arg.replace("{port}", str(port)) for arg in extra]
        proc = subprocess.Popen([*args, "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while _redis_pid(port) != proc.pid and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # (readiness of another process: it has no other way to say it listens)
        if proc.poll() is None and _redis_pid(port) == proc.pid:
            return proc, port
        proc.terminate()
        proc.wait(10)
    raise RuntimeError("a cluster-enabled redis-server did not start")


def _cluster(directory: Path, shards: int) -> Iterator[list[int]]:
    cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes-{port}.conf")]
    nodes = [_start_node(directory, *cluster) for _ in range(shards)]
    try:
        ports = [port for _, port in nodes]
        admins = [redis.Redis(port=port) for port in ports]
        width = 16384 // shards
        for n, admin in enumerate(admins):
            last = 16383 if n == shards - 1 else (n + 1) * width - 1
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", n * width, last)
        for port in ports[1:]:
            admins[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # (the nodes' gossip: bounded readiness poll)
            infos = [admin.cluster("info") for admin in admins]
            if all(info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == shards for info in infos):
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("the cluster did not come up")
        for admin in admins:
            admin.close()
        yield ports
    finally:
        for proc, _ in nodes:
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A cluster-mode Redis of one shard (ElastiCache cluster mode enabled, 1 shard): every slot on its node."""
    for ports in _cluster(tmp_path_factory.mktemp("one_shard"), 1):
        yield f"redis://127.0.0.1:{ports[0]}/0"


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A cluster of two shards (slots 0-8191 on the first node, which LAGO_REDIS_URL names)."""
    for ports in _cluster(tmp_path_factory.mktemp("two_shards"), 2):
        yield f"redis://127.0.0.1:{ports[0]}/0"


# ------------------------------------------------------------------- 1. one slot per org


@pytest.mark.parametrize("redis_prefix", ["lago_org_billing:quota:", "app}:", "app{:"])
async def test_every_key_of_an_org_hashes_to_one_cluster_slot(redis_prefix: str) -> None:
    """The scripts take an org's snapshot, counter, lock and merge marks together: on a cluster they must share one
    slot, or Redis answers CROSSSLOT. ``{<org>}`` is the hash tag, but for an org id starting with "}" (or empty)
    the tag was empty and Redis hashed each whole key: four slots. The keys of different orgs stay different."""
    backend = RedisBackend("redis://127.0.0.1:1/0", QuotaConfig(redis_prefix=redis_prefix))
    keys = set()
    for org in ODD_IDS:
        slots = {key_slot(backend.key(org, kind).encode()) for kind in KINDS}
        assert len(slots) == 1, (org, slots)
        keys |= {backend.key(org, kind) for kind in KINDS}
    assert len(keys) == len(ODD_IDS) * len(KINDS)


# ------------------------------------------------------------------- 2. a cluster of one shard works


async def test_a_one_shard_cluster_counts_every_org_id(
    client: LagoClient, fake: FakeLago, clock: Clock, one_shard: str, prefix: str
) -> None:
    """On a cluster-mode Redis of one shard (which a plain client can use: no MOVED), a request whose org id starts
    with "}" (a header any caller sets) got CROSSSLOT: the whole worker fell back to counting alone for
    ``redis_retry_interval``, each time. Now its calls are counted in Redis, and a plan webhook's invalidate_all
    reaches its snapshot too."""
    fake.add_customer("}x")
    fake.add_subscription("}x", "starter")
    gate = make_gate(client, clock, one_shard, prefix)
    backend = backend_of(gate)
    orgs = ["}x", "org_1"]
    for org in orgs:
        decisions = [await gate.check(org) for _ in range(2)]
        assert all(decision.allowed for decision in decisions)
        await settled(gate)
        for decision in decisions:
            gate.settle(org, decision, tokens=TOKENS, billed=True)
    await backend.flush()
    assert backend.stats == {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0}
    before = {org: (await backend.load(org)).version for org in orgs}  # type: ignore[union-attr]
    await gate.invalidate_all()
    after = {org: (await backend.load(org)).version for org in orgs}  # type: ignore[union-attr]
    assert all(after[org] != before[org] for org in orgs), (before, after)
    assert (await usage(gate, "}x"))["max_api_calls"] == 2
    assert backend.stats["redis_errors"] == 0


# ------------------------------------------------------------------- 3. a sharded cluster is refused clearly


async def test_a_sharded_cluster_is_refused_once_and_clearly(
    two_shards: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """LAGO_REDIS_URL names one node of a cluster of several shards: the orgs whose slot is on another node get
    MOVED. The worker logged a generic "Redis failed ... falls back until it answers", and tried again every
    ``redis_retry_interval`` forever (each time some orgs counted in Redis, the others MOVED, the whole worker back
    to local counting). Now it says once, as an error, that a sharded cluster is not supported and what to use, and
    counts in the process from then on."""
    now = [1000.0]
    backend = RedisBackend(two_shards, QuotaConfig(redis_prefix=prefix), clock=lambda: now[0])
    here = next(f"o{n}" for n in range(100) if key_slot(backend.key(f"o{n}", "snap").encode()) < 8192)
    there = next(f"o{n}" for n in range(100) if key_slot(backend.key(f"o{n}", "snap").encode()) >= 8192)
    caplog.set_level(logging.INFO, logger="lago_org_billing.quota")
    try:
        for _round in range(3):
            for org in (here, there):
                outcome = await backend.reserve(org, time.time(), "blind", None)
                backend.settle(org, outcome.period, outcome.bucket, time.time(), tokens=1, billed=True)
            await backend.flush()
            now[0] += 3600  # (every retry interval over)
        errors = backend.stats["redis_errors"]
        assert errors == 1, backend.stats
        assert backend.stats["redis_fallback"] == 1
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1 and records[0].levelno == logging.ERROR, [r.getMessage() for r in records]
        message = records[0].getMessage()
        assert "Redis Cluster" in message and "LAGO_REDIS_URL" in message
    finally:
        await backend.aclose()


# ------------------------------------------------------------------- 4. ACL users without SCRIPT


async def test_an_acl_user_without_script_load_runs_the_scripts(
    client: LagoClient, clock: Clock, redis_url: str, prefix: str
) -> None:
    """A least-privilege ACL user allowed EVAL and EVALSHA but not SCRIPT (``+@all -script``; managed Redis ACL
    templates differ). Once the script cache was empty (a restart, a failover, SCRIPT FLUSH), redis-py loaded the
    scripts with SCRIPT LOAD (checks) and SCRIPT EXISTS + LOAD (settle batches): NoPermissionError, every time, so
    the worker never counted in Redis. The scripts are run with EVAL when Redis does not have them."""
    user = f"app_{uuid.uuid4().hex[:8]}"
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-script"])
        url = redis_url.replace("redis://", f"redis://{user}:pw@")
        gate = make_gate(client, clock, url, prefix)
        backend = backend_of(gate)
        await admin.script_flush()
        decisions = [await gate.check("org_1") for _ in range(3)]
        assert all(decision.allowed for decision in decisions)
        await settled(gate)
        await admin.script_flush()
        for decision in decisions:
            gate.settle("org_1", decision, tokens=TOKENS, billed=True)
        await backend.flush()
        await admin.script_flush()
        await gate.invalidate_all()
        assert await usage(gate, "org_1") == {"max_api_calls": 3, "max_tokens": 3 * TOKENS}
        assert backend.stats == {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0}
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()


# ------------------------------------------------------------------- 5. TLS


@pytest.mark.parametrize("options", ["ssl_ca_certs={cert}", "ssl_cert_reqs=none"])
async def test_rediss_with_certificate_options_in_the_url(
    client: LagoClient, clock: Clock, tmp_path: Path, tls_files: tuple[Path, Path], prefix: str, options: str
) -> None:
    """A TLS Redis (ElastiCache in-transit encryption, Upstash, Redis Cloud) with a private CA given in the URL, or
    verification turned off there: counted in Redis (a regression guard: the pool is built with from_url)."""
    cert, key = tls_files
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    proc, _ = _start_node(tmp_path, *tls, "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?" + options.format(cert=cert)
        gate = make_gate(client, clock, url, prefix)
        backend = backend_of(gate)
        decisions = [await gate.check("org_1") for _ in range(2)]
        await settled(gate)
        for decision in decisions:
            gate.settle("org_1", decision, tokens=TOKENS, billed=True)
        await backend.flush()
        assert await usage(gate, "org_1") == {"max_api_calls": 2, "max_tokens": 2 * TOKENS}
        assert backend.stats == {"redis_errors": 0, "redis_fallback": 0, "fallback_decisions": 0}
        await gate.aclose()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.anyio
async def test_a_redis_prefix_with_an_empty_hash_tag_is_refused() -> None:
    """``LAGO_QUOTA_REDIS_PREFIX=app{}:`` spread each org's keys over several cluster slots (the prefix's empty tag
    comes first, and Redis then hashes each whole key)."""
    from lago_org_billing import ConfigurationError
    from lago_org_billing._quota import QuotaConfig

    for braced in ("app{}:", "{}", "a{}{b}:"):
        with pytest.raises(ConfigurationError, match="must not hold an empty"):
            QuotaConfig(redis_prefix=braced)
    for fine in ("app:quota:", "app}:", "app{:", "app{x}:"):
        assert QuotaConfig(redis_prefix=fine).redis_prefix == fine
