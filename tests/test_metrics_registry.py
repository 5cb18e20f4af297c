"""The Prometheus metrics as an operator reads them (one registry, no multiprocess mode): two namespaces in
one registry, a pipeline registered next to its middleware, a gate shared by two apps, counters across a restart of
the background work, and the background work's failures."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from _lifespan import background_failed, serving_lifespan
from lago_org_billing import (
    BillingSettings,
    EventPipeline,
    LagoClient,
    OrgBillingMiddleware,
    PipelineMetrics,
    register_metrics,
)

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a"}


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


def app() -> Starlette:
    return Starlette(routes=[Route("/v1/chat", chat, methods=["GET", "POST"])])


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", retry_backoff=0.001
    )


def reader(registry: Any) -> Any:
    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    return value


async def test_a_second_namespace_in_one_registry_is_its_own(fake_lago: Any, settings: BillingSettings) -> None:
    """register_metrics(..., namespace="other") with a registry that already exports a middleware under the default
    namespace: the second app's counts are its own under ``other_``, not added to the first app's."""
    registry = prometheus_client.CollectorRegistry()
    value = reader(registry)
    first = OrgBillingMiddleware(app(), settings, transport=fake_lago.transport(), metrics_registry=registry)
    second = OrgBillingMiddleware(app(), settings, transport=fake_lago.transport())
    assert register_metrics(second, registry, namespace="other")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://t") as http:
            for _ in range(3):
                assert (await http.get("/v1/chat", headers=HEADERS)).status_code == 200
        assert await second.pipeline.flush(5)
        assert value("other_requests_billed_total") == 3
        assert value("other_events_delivered_total") == 3
        assert value("lago_billing_requests_billed_total") == 0
        assert value("lago_billing_events_delivered_total") == 0
    finally:
        await first.aclose()
        await second.aclose()


def test_two_pipelines_registered_with_one_registry_are_summed() -> None:
    """PipelineMetrics.register of two pipelines with one registry (the default one, say): no DuplicateTimeseries
    error, their counts summed."""
    registry = prometheus_client.CollectorRegistry()
    first, second = PipelineMetrics(), PipelineMetrics()
    assert first.register(registry)
    assert second.register(registry)
    assert first.register(registry)  # again: still counted once
    first.recorded, second.recorded = 2, 5
    first.lago_error(503)
    second.lago_error(503)
    second.observe_latency(0.2)
    value = reader(registry)
    assert value("lago_billing_events_recorded_total") == 7
    assert value("lago_billing_lago_errors_total", status="503") == 2
    assert value("lago_billing_delivery_seconds_count") == 1


async def test_a_registered_pipeline_given_to_a_middleware_with_metrics(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """A pipeline whose metrics are registered, given to a middleware that exports to the same registry
    (LAGO_METRICS=true does so with the default one): the middleware starts (no DuplicateTimeseries), and each
    event is counted once."""
    registry = prometheus_client.CollectorRegistry()
    value = reader(registry)
    async with LagoClient(settings, transport=fake_lago.transport()) as client:
        metrics = PipelineMetrics()
        assert metrics.register(registry)
        pipeline = EventPipeline(client, metrics=metrics, flush_interval=0.0)
        middleware = OrgBillingMiddleware(app(), settings, pipeline=pipeline, metrics_registry=registry)
        try:
            async with serving_lifespan(middleware):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as h:
                    for _ in range(2):
                        assert (await h.get("/v1/chat", headers=HEADERS)).status_code == 200
                assert await pipeline.flush(5)
                assert value("lago_billing_events_recorded_total") == 2
                assert value("lago_billing_events_delivered_total") == 2
                assert value("lago_billing_requests_billed_total") == 2
        finally:
            await middleware.aclose()
    assert len(fake_lago.events) == 2


class _Gate:
    """A quota gate's counters (what the exporter reads of it)."""

    def __init__(self, **stats: int) -> None:
        self.stats = dict(stats)


class _Middleware:
    """What the exporter reads of a middleware."""

    def __init__(self, gate: _Gate) -> None:
        self.stats = {"requests": 0}
        self.pipeline = type("Pipeline", (), {"metrics": PipelineMetrics()})()
        self.quota = gate


def test_a_gate_shared_by_two_middlewares_is_counted_once() -> None:
    """One gate (Redis down) given to two middlewares exported through one registry: its counts and its
    redis_fallback gauge are its own, not doubled (as in multiprocess mode)."""
    registry = prometheus_client.CollectorRegistry()
    value = reader(registry)
    gate = _Gate(checks=3, fail_open=2, redis_fallback=1)
    first, second = _Middleware(gate), _Middleware(gate)
    assert register_metrics(first, registry) and register_metrics(second, registry)
    assert value("lago_billing_quota_checks_total") == 3
    assert value("lago_billing_quota_fail_open_total") == 2
    assert value("lago_billing_quota_redis_fallback") == 1


def test_counters_go_on_when_the_app_is_served_again(fake_lago: Any, settings: BillingSettings) -> None:
    """An app served, shut down and served again in one process (its middleware makes a new pipeline and gate):
    the pipeline's and the gate's counters go on from where they were, never back to 0, and agree with the request
    counters and with what Lago holds."""
    registry = prometheus_client.CollectorRegistry()
    value = reader(registry)
    middleware = OrgBillingMiddleware(app(), settings, transport=fake_lago.transport(), metrics_registry=registry)
    for served in (1, 2):
        with TestClient(middleware) as http:
            for _ in range(2):
                assert http.get("/v1/chat", headers=HEADERS).status_code == 200
        assert len(fake_lago.events) == 2 * served
        assert value("lago_billing_requests_billed_total") == 2 * served
        assert value("lago_billing_events_recorded_total") == 2 * served
        assert value("lago_billing_events_delivered_total") == 2 * served
        assert value("lago_billing_batches_sent_total") >= served
        assert value("lago_billing_quota_checks_total") == 2 * served
        assert value("lago_billing_queue_depth") == 0


class _FailsOnce(EventPipeline):
    """A pipeline whose first run fails once started (a bug in the delivery loop)."""

    crash: anyio.Event

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        if not getattr(self, "failed", False):
            self.failed = True
            task_status.started()
            await self.crash.wait()
            raise RuntimeError("a bug in the delivery loop")
        await super().run(task_status=task_status)


async def test_background_failures_are_exported(fake_lago: Any, settings: BillingSettings) -> None:
    """The background work stopping on an error (and starting again) is counted in stats["background_errors"]:
    an operator sees it in the metrics too."""
    registry = prometheus_client.CollectorRegistry()
    value = reader(registry)
    async with LagoClient(settings, transport=fake_lago.transport()) as client:
        pipeline = _FailsOnce(client, flush_interval=0.0)
        pipeline.crash = anyio.Event()
        middleware = OrgBillingMiddleware(app(), settings, pipeline=pipeline, quota=None, metrics_registry=registry)
        assert value("lago_billing_background_errors_total") == 0
        async with serving_lifespan(middleware):
            pipeline.crash.set()
            await background_failed(middleware)
            assert value("lago_billing_background_errors_total") == 1
