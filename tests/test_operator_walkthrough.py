"""What README.md's operator sections state, checked against the package: the metric types and the one label its
Metrics section lists, the Redis keys, expiries and memory per org that "Running it in production" gives, the bytes an
event takes in the spool; and where what the package tells an operator contradicts the README (strict xfails naming
the defect, for the owner of the code to fix).

Real pieces only: the emulator served over HTTP as Lago, a throwaway redis-server, Starlette's TestClient.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from _quota_app import REDIS_SERVER
from lago_org_billing import BillingSettings, OrgBillingMiddleware, register_metrics
from lago_org_billing._webhooks import DEFAULT_DEDUPE_TTL
from lago_org_billing.cli import _parser, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PRODUCTION = README.split("### Running it in production\n", 1)[1].split("\n## ", 1)[0]

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def _billing_app(**middleware: Any) -> Starlette:
    """An LLM-style endpoint (the usage in its JSON body) behind the middleware, settings from the environment."""

    async def chat(request: Request) -> JSONResponse:
        usage = {"prompt_tokens": 812, "completion_tokens": 95, "total_tokens": 907}
        return JSONResponse({"model": "gpt-4o-mini-2024-07-18", "usage": usage})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.add_middleware(OrgBillingMiddleware, **middleware)
    return app


@pytest.fixture
def lago(fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The emulator as Lago, ``org_1`` subscribed to a plan with limits, the environment pointing at it."""
    fake_lago_server.add_feature(
        "api_quota",
        privileges=[
            {"code": "max_api_calls", "value_type": "integer"},
            {"code": "max_tokens", "value_type": "integer"},
        ],
    )
    fake_lago_server.add_plan("starter", entitlements={"api_quota": {"max_api_calls": 1000}})
    fake_lago_server.add_subscription("org_1", "starter")
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")
    monkeypatch.setenv("LAGO_USER_HEADER", "X-User-Id")
    return fake_lago_server


# ------------------------------------------------------------------------------------------ metrics


def test_the_metric_types_and_the_one_label_are_the_readmes() -> None:
    """The Metrics section's "Types:" sentence: which names are gauges and which the histogram (the rest counters,
    each ``..._total``), and ``status`` the one label (on ``lago_errors_total``, from the first error)."""
    types = re.search(
        r"Types: each `\.\.\._total` is a counter; (.*?) are gauges; `(\w+)` is a histogram", README, re.S
    )
    assert types, "README's Metrics section lost its Types sentence"
    gauges = set(re.findall(r"`(\w+)`", types.group(1)))
    registry = CollectorRegistry()
    middleware = OrgBillingMiddleware(
        Starlette(), settings=BillingSettings(api_key="k", redis_url="redis://127.0.0.1:1")
    )
    middleware.pipeline.metrics.lago_error(503)
    middleware.pipeline.metrics.lago_error(None)
    assert register_metrics(middleware, registry)
    collector = next(iter(registry._collector_to_names))
    described = {family.name.removeprefix("lago_billing_"): family.type for family in collector.describe()}
    assert {name for name, kind in described.items() if kind == "gauge"} == gauges
    assert {name for name, kind in described.items() if kind == "histogram"} == {types.group(2)}
    assert {kind for kind in described.values()} == {"counter", "gauge", "histogram"}
    labels = {
        (family.name.removeprefix("lago_billing_"), label)
        for family in registry.collect()
        for sample in family.samples
        for label in sample.labels
        if label != "le"  # (the histogram's buckets)
    }
    assert labels == {("lago_errors", "status")}
    values = {s.labels["status"] for f in registry.collect() for s in f.samples if "status" in s.labels}
    assert values == {"503", "network"}
    assert 'lago_errors_total{status="503"}' in README and '`"network"`' in README


# ------------------------------------------------------------------------------------------ redis


@contextlib.contextmanager
def _redis(url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        client.close()


@needs_redis
def test_an_orgs_redis_keys_expiry_and_size_are_the_readmes(
    lago: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running it in production, Redis: per org ``<prefix>{<org>}:snap``, ``:count`` (and ``:lock``), ``snap`` and
    ``count`` expiring an hour after the org's billing period ends, about 1 KB per org; an org without a subscription's
    snapshot gone within about an hour."""
    prefix = "lago_org_billing:quota:"
    assert f"`LAGO_QUOTA_REDIS_PREFIX` (`{prefix}`)" in PRODUCTION
    for kind in ("snap", "count", "lock"):
        assert f"`{{<org>}}:{kind}`" in PRODUCTION, kind
    monkeypatch.setenv("LAGO_REDIS_URL", redis_url)
    monkeypatch.setenv("LAGO_QUOTA_REDIS_PREFIX", prefix)
    with _redis(redis_url) as redis:
        redis.flushdb()
        with TestClient(_billing_app()) as client:
            for _ in range(5):
                answer = client.post("/v1/chat/completions", headers={"X-Org-Id": "org_1", "X-User-Id": "u_1"})
                assert answer.status_code == 200
            assert client.post("/v1/chat/completions", headers={"X-Org-Id": "org_none"}).status_code == 402
        # (the process's own short-lived keys, ``<prefix>}{~}:...``, aside)
        keys = {key.decode() for key in redis.scan_iter(match=f"{prefix}*")} - set(
            key.decode() for key in redis.scan_iter(match=f"{prefix}}}{{~}}:*")
        )
        kinds = {key.removeprefix(prefix + "{org_1}:") for key in keys if key.startswith(prefix + "{org_1}:")}
        assert {"snap", "count"} <= kinds <= {"snap", "count", "lock"}, keys
        others = {key.removeprefix(prefix + "{org_none}:") for key in keys if "{org_1}" not in key}
        assert "snap" in others and others <= {"snap", "lock"}, keys
        now = time.time()
        period_end = float(redis.hget(prefix + "{org_1}:snap", "pe"))
        for kind in ("snap", "count"):
            left = redis.pttl(f"{prefix}{{org_1}}:{kind}") / 1000
            assert abs(left - (period_end + 3600 - now)) < 120, (kind, left, period_end - now)
        unsubscribed = redis.pttl(prefix + "{org_none}:snap") / 1000
        assert 3000 < unsubscribed <= 3600 + 60, unsubscribed  # (the usage TTL, 30 s, then the hour)
        size = sum(int(redis.memory_usage(f"{prefix}{{org_1}}:{kind}") or 0) for kind in kinds)
        assert size <= 1536, size  # "About 1 KB per org"
        redis.flushdb()
    assert "About 1 KB per org" in PRODUCTION and "for 7 days" in PRODUCTION
    assert DEFAULT_DEDUPE_TTL == 7 * 24 * 3600


# ------------------------------------------------------------------------------------------ the spool


def test_a_spooled_event_takes_the_bytes_the_readme_says(
    lago: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running it in production, spool size: "An event takes about 500 bytes". Lago down, 300 requests of an
    LLM endpoint (a user, a model, tokens) end in the spool; once closed (its WAL folded in), the file over them."""
    spool = tmp_path / "spool" / "events.db"
    monkeypatch.setenv("LAGO_SPOOL_PATH", str(spool))
    monkeypatch.setenv("LAGO_QUOTA_MODE", "off")
    lago.inject_fault(status=503)
    count = 300
    with TestClient(_billing_app(shutdown_timeout=0.2)) as client:
        for index in range(count):
            headers = {"X-Org-Id": "org_1", "X-User-Id": f"user_{index:05d}"}
            assert client.post("/v1/chat/completions", headers=headers).status_code == 200
    assert not lago.events
    assert not os.path.exists(f"{spool}-wal") or os.path.getsize(f"{spool}-wal") == 0
    per_event = os.path.getsize(spool) / count
    assert 300 <= per_event <= 650, per_event
    assert "An event takes about 500 bytes" in PRODUCTION


# ------------------------------------------------------------------------------------------ defects (xfail)


def test_health_does_what_its_help_says_about_retries(lago: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``lago-org-billing health --help`` said "each call within LAGO_API_TIMEOUT seconds (retried up to
    LAGO_MAX_RETRIES times)", but the command makes one attempt of each call (a probe). Either the command retries (a
    single 503 of Lago's ``/health`` is then healthy) or the help does not say it does (README: "one attempt of each
    call ... not retried")."""
    health = next(a for a in _parser()._actions if getattr(a, "choices", None) and "health" in a.choices)
    says_retried = "retried" in (health.choices["health"].description or "")
    lago.inject_fault(status=503, count=1, path="/health")
    code = main(["health"])
    capsys.readouterr()
    assert code == 0 or not says_retried


@needs_redis
def test_what_a_full_redis_is_told_agrees_with_the_readme(
    lago: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """README: "Give it a Redis that does not evict (`maxmemory-policy noeviction`...): `volatile-*` policies
    (ElastiCache's default) evict them first". Redis at its maxmemory (noeviction) refuses the gate's writes; the
    ERROR then logged should not advise the eviction policy the README warns about."""
    monkeypatch.setenv("LAGO_REDIS_URL", redis_url)
    monkeypatch.setenv("LAGO_QUOTA_REDIS_PREFIX", "operator-oom:")
    with _redis(redis_url) as redis:
        redis.flushdb()
        redis.config_set("maxmemory-policy", "noeviction")
        # (a limit of 1 byte: every write is over it. A limit just under the memory used after a 2 MB ballast's SET
        # counted that SET's query buffer, freed a moment later: on a loaded machine the writes then fit, untold)
        redis.config_set("maxmemory", "1")
        try:
            with caplog.at_level(logging.WARNING, logger="lago_org_billing"), TestClient(_billing_app()) as client:
                headers = {"X-Org-Id": "org_1"}
                assert client.post("/v1/chat/completions", headers=headers).status_code == 200
        finally:
            redis.config_set("maxmemory", "0")
            redis.flushdb()
    told = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert told, [r.getMessage() for r in caplog.records]
    assert "noeviction" in README
    assert not any("volatile-lru" in message for message in told), told
