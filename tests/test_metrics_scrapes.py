"""The Prometheus metrics as an SRE scrapes them: every exported name known to the registry (its duplicate check and
``/metrics?name[]=...``), and a scrape that never fails because of one odd source."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import (
    BillingSettings,
    EventPipeline,
    LagoClient,
    OrgBillingMiddleware,
    PipelineMetrics,
    register_metrics,
)

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
from prometheus_client import CollectorRegistry, Counter, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a"}


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


def app() -> Starlette:
    return Starlette(routes=[Route("/v1/chat", chat)])


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", retry_backoff=0.001
    )


def scrape(registry: Any, *names: str) -> dict[str, float]:
    """What ``/metrics`` (``?name[]=...`` when names are given, as ``make_asgi_app`` serves it) shows: unlabelled
    samples by name."""
    target = registry.restricted_registry(names) if names else registry
    text = generate_latest(target).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


class _Gate:
    """A quota gate as the exporter reads it."""

    def __init__(self, **stats: Any) -> None:
        self.stats = dict(stats)
        self.backend = None


class _Middleware:
    """What the exporter reads of a middleware."""

    def __init__(self, gate: Any) -> None:
        self.stats = {"requests": 0}
        self.pipeline = type("Pipeline", (), {"metrics": PipelineMetrics()})()
        self.quota = gate


# -- names the registry knows --------------------------------------------------------------------------------------


async def test_names_added_after_registration_are_served_by_name(fake_lago: Any, settings: BillingSettings) -> None:
    """A pipeline's metrics registered first (PipelineMetrics.register), then a middleware given that pipeline with
    metrics on (the README's flow): a scrape filtered by name (``/metrics?name[]=lago_billing_requests_billed_total``,
    Prometheus ``params``) shows the middleware's counts and its gate's, as an unfiltered scrape does."""
    registry = CollectorRegistry()
    async with LagoClient(settings, transport=fake_lago.transport()) as client:
        metrics = PipelineMetrics()
        assert metrics.register(registry)
        pipeline = EventPipeline(client, metrics=metrics, flush_interval=0.0)
        middleware = OrgBillingMiddleware(app(), settings, pipeline=pipeline, metrics_registry=registry)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as h:
                assert (await h.get("/v1/chat", headers=HEADERS)).status_code == 200
            assert await pipeline.flush(5)
        finally:
            await middleware.aclose()
    assert scrape(registry)["lago_billing_requests_billed_total"] == 1
    names = ("lago_billing_requests_billed_total", "lago_billing_quota_checks_total", "lago_billing_requests_total")
    assert scrape(registry, *names) == {name: 1 for name in names}


def test_a_gate_counter_that_appears_later_is_served_by_name() -> None:
    """QuotaGate adds some counters to its stats only when they first happen (``cold_shed``,
    ``refreshes_paused``, ``refreshes_superseded``): once there, they are served by name too."""
    registry = CollectorRegistry()
    gate = _Gate(checks=1)
    assert register_metrics(_Middleware(gate), registry)
    gate.stats["cold_shed"] = 2
    gate.stats["refreshes_paused"] = 1
    assert scrape(registry)["lago_billing_quota_cold_shed_total"] == 2
    names = ("lago_billing_quota_cold_shed_total", "lago_billing_quota_refreshes_paused_total")
    assert scrape(registry, *names) == {names[0]: 2, names[1]: 1}


def test_a_clashing_metric_of_the_app_is_refused_not_exported_twice() -> None:
    """The app registering a metric of a name the billing collector exports (there after a later registration):
    prometheus_client refuses it, instead of a scrape holding the family twice (which Prometheus rejects)."""
    registry = CollectorRegistry()
    assert PipelineMetrics().register(registry)
    assert register_metrics(_Middleware(_Gate(checks=0)), registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("lago_billing_requests_billed", "the app's own", registry=registry)


# -- a scrape never fails because of one source ---------------------------------------------------------------------


class _GateWithStatsMethod:
    """A gate of the app's whose ``stats`` is a method (QuotaGateProtocol does not define ``stats``)."""

    backend = None

    def stats(self) -> dict[str, int]:
        return {"checks": 1}


def test_a_gate_whose_stats_is_a_method_breaks_nothing() -> None:
    """register_metrics with such a gate: no TypeError out of it (the middleware's constructor calls it), and every
    scrape of the registry (the app's own metrics too) still answers, with the billing counts."""
    registry = CollectorRegistry()
    Counter("my_app_calls", "the app's own", registry=registry).inc()
    middleware = _Middleware(_GateWithStatsMethod())
    assert register_metrics(middleware, registry)
    middleware.stats["requests"] = 3
    values = scrape(registry)
    assert values["my_app_calls_total"] == 1 and values["lago_billing_requests_total"] == 3


def test_a_non_numeric_gate_stat_does_not_stop_the_other_counts() -> None:
    """A custom gate's stats holding a non-number (a last error's text, say): ignored; the scrape answers, the other
    counts (of that gate and of the others) go on."""
    registry = CollectorRegistry()
    gate = _Gate(checks=1)
    middleware = _Middleware(gate)
    assert register_metrics(middleware, registry)
    gate.stats["last_error"] = "timeout"
    gate.stats["checks"] = 4
    middleware.stats["requests"] = 2
    values = scrape(registry)
    assert values["lago_billing_quota_checks_total"] == 4 and values["lago_billing_requests_total"] == 2
    assert "lago_billing_quota_last_error_total" not in values


def test_a_scrape_answers_when_reading_a_source_fails() -> None:
    """Whatever fails while the collector reads what it exports (here a pipeline's depths): logged, and the scrape
    still answers with the app's own metrics and the billing counts read so far, never a 500 for all of them."""
    registry = CollectorRegistry()
    Counter("my_app_calls", "the app's own", registry=registry).inc()
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    metrics.recorded = 2
    assert scrape(registry)["lago_billing_events_recorded_total"] == 2

    def broken() -> dict[str, int]:
        raise RuntimeError("a bug")

    metrics.bind_gauges(broken)
    metrics.recorded = 5
    values = scrape(registry)
    assert values["my_app_calls_total"] == 1
    assert values["lago_billing_events_recorded_total"] in (2, 5)


# -- multiprocess mode: one odd gate does not freeze the namespace ---------------------------------------------------


def test_multiprocess_an_odd_gate_does_not_freeze_the_other_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR: a middleware whose gate's ``stats`` is a method, registered with one that is
    fine: every sync mirrors the counts of both (before, each sync stopped at the odd gate, logged once, and the
    namespace's counts froze)."""
    from prometheus_client import values
    from prometheus_client.multiprocess import MultiProcessCollector

    from lago_org_billing import _metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(values, "ValueClass", value_class)
    monkeypatch.setattr(_metrics, "_multiprocess", None)
    monkeypatch.setattr(_metrics, "_SYNC_INTERVAL", 3600.0)
    try:
        odd, fine = _Middleware(_GateWithStatsMethod()), _Middleware(_Gate(checks=0))
        assert register_metrics(odd) and register_metrics(fine)
        odd.stats["requests"], fine.stats["requests"] = 2, 3
        fine.quota.stats["checks"] = 3
        assert _metrics._multiprocess is not None
        _metrics._multiprocess.sync()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
        assert registry.get_sample_value("lago_billing_requests_total") == 5
        assert registry.get_sample_value("lago_billing_quota_checks_total") == 3
    finally:
        state = _metrics._multiprocess
        if state is not None:
            state.close()
        value_class.close_all_files()


# -- the redis_fallback gauge after Redis came back (a fix needed in _quota_redis.py) --------------------------------


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
async def test_redis_fallback_gauge_clears_once_redis_takes_writes_again(tmp_path: Path) -> None:
    """Redis goes down while a settle is queued (the gauge goes to 1, right), then comes back: the backend writes the
    queued settle to it (Redis answers), yet ``quota_redis_fallback`` stays 1 until some request's quota check
    happens to run: an idle worker (or one whose requests are all ungated) keeps an SRE's "Redis outage" alert firing
    for as long as it gets no checked request."""
    from _quota_app import Clock, free_port, redis_server, seed
    from lago_org_billing._quota import QuotaConfig, QuotaGate
    from lago_org_billing._quota_redis import RedisBackend
    from lago_org_billing.testing import FakeLago

    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=300)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    registry = CollectorRegistry()
    port = free_port()
    async with LagoClient(settings, transport=fake.transport()) as client:
        with redis_server(tmp_path, port) as url:
            config = QuotaConfig(redis_prefix="t:", redis_retry_interval=0.0)
            gate = QuotaGate(settings.replace(redis_url=url), client, config=config, clock=clock.time)
            middleware = _Middleware(gate)
            assert register_metrics(middleware, registry)
            decision = await gate.check("org_1")
            assert decision.allowed
        backend = gate.backend
        assert isinstance(backend, RedisBackend)
        try:
            gate.settle("org_1", decision, tokens=5, billed=True)
            await backend.flush()  # Redis is down: kept queued
            assert registry.get_sample_value("lago_billing_quota_redis_fallback") == 1
            with redis_server(tmp_path, port):
                await backend.flush()  # Redis answers: the settle is written there
                assert not backend._queue
                assert registry.get_sample_value("lago_billing_quota_redis_fallback") == 0
        finally:
            await gate.aclose()


async def test_every_counter_of_a_real_gate_is_described(fake_lago: Any, settings: BillingSettings) -> None:
    """The names described at registration cover every counter a QuotaGate starts with (kept in step with
    ``_quota.py``), and those it adds later."""
    from lago_org_billing import _metrics
    from lago_org_billing._quota import QuotaGate

    registry = CollectorRegistry()
    async with LagoClient(settings, transport=fake_lago.transport()) as client:
        gate = QuotaGate(settings, client)
        assert register_metrics(_Middleware(gate), registry)
        await gate.aclose()
    described = set(registry._names_to_collectors)
    gauges = set(_metrics._GATE_GAUGES)
    for key in [*gate.stats, "cold_shed", "refreshes_paused", "refreshes_superseded", "redis_errors"]:
        if key not in gauges:
            assert f"lago_billing_quota_{key}_total" in described, key


def test_every_counter_of_the_middleware_is_exported(fake_lago: Any, settings: BillingSettings) -> None:
    """Each of the middleware's own counts (``stats``) has its Prometheus counter: one added to the middleware
    (``unrouted``, the routing's own answers) and not here was counted but never scraped."""
    from lago_org_billing import OrgBillingMiddleware, _metrics

    middleware = OrgBillingMiddleware(lambda scope, receive, send: None, settings, quota=None)
    assert set(middleware.stats) <= set(_metrics._REQUEST_COUNTERS)
