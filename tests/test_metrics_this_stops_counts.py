"""Second review of the Prometheus export (``_metrics.py``): counters and states that the package keeps and that an
operator could not see in Prometheus.

* Dead letters forgotten past the last 10,000 kept in memory (``dead_evicted`` of the memory outbox, and of a SQLite
  spool that cannot be written) were counted and logged only: ``dead_letters_evicted_total``.
* Events sent to Lago from memory because the SQLite spool cannot be written (lost if the process stops before Lago
  takes them) were in ``queue_depth`` but told apart from nothing: ``spool_unwritten``, and ``spool_write_failing``
  (1 while the spool file cannot be written, which Lago taking those events at once hides from ``spool_unwritten``).
* The middleware's counts added on first use (``idempotent_retries``, ``nested``, ``reattributed``,
  ``handed_over``) were never exported; its requests in flight (what a shutdown waits for): ``requests_in_flight``.
* Every new name is described at registration (``/metrics?name[]=...``) and mirrored in multiprocess mode.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import (
    BillingSettings,
    EventPipeline,
    OrgBillingMiddleware,
    PipelineMetrics,
    _metrics,
    _spool,
    register_metrics,
)
from test_delivery import events, make_client, make_fake
from test_delivery_deployment import until
from test_spool_unwritten_dead_letters import Lago
from test_spool_unwritten_events import Switch, Volume, _pipeline

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
from prometheus_client import CollectorRegistry, values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a"}

NEW_COUNTERS = (
    "lago_billing_dead_letters_evicted_total",
    "lago_billing_requests_idempotent_retries_total",
    "lago_billing_requests_nested_total",
    "lago_billing_requests_reattributed_total",
    "lago_billing_requests_handed_over_total",
)
NEW_GAUGES = ("lago_billing_spool_unwritten", "lago_billing_spool_write_failing", "lago_billing_requests_in_flight")


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", retry_backoff=0.001
    )


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


def app() -> Starlette:
    return Starlette(routes=[Route("/v1/chat", chat, methods=["GET", "POST"])])


# -- dead letters forgotten ----------------------------------------------------------------------------------------


async def test_memory_outbox_dead_letters_forgotten_are_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lago rejects every event and the memory outbox keeps its last ``_MEMORY_DEAD_LETTERS`` letters (2 here): the
    3 forgotten are ``dead_letters_evicted_total`` (and ``stats["dead_evicted"]``), not only a log line."""
    monkeypatch.setattr(_spool, "_MEMORY_DEAD_LETTERS", 2)
    registry = CollectorRegistry()
    lago = Lago(make_fake().transport())
    lago.rejecting = True
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    async with make_client(lago, max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.0, retry_backoff=0.001, metrics=metrics)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(5):
                assert pipeline.submit(event)
            await until(lambda: pipeline.stats["dead_lettered"] == 5)
            await pipeline.aclose()
    assert len(pipeline.dead_letters()) == 2
    assert pipeline.stats["dead_evicted"] == 3
    assert registry.get_sample_value("lago_billing_dead_letters_evicted_total") == 3


async def test_spool_that_cannot_be_written_is_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """The spool's volume is full and Lago down: the events it could not write are sent from memory and wait there.
    ``queue_depth`` counts them, ``spool_depth`` does not (no row): ``spool_unwritten`` says how many are in memory
    only, ``spool_write_failing`` that the file cannot be written; both go back to 0 once it can."""
    registry = CollectorRegistry()
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    value = registry.get_sample_value
    path = tmp_path / "spool.db"
    lago = Switch(make_fake().transport())
    volume = Volume(monkeypatch)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, path, metrics=metrics)
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            assert value("lago_billing_spool_write_failing") == 0 and value("lago_billing_spool_unwritten") == 0
            volume.full = True
            for event in events(3):
                pipeline.submit(event)
            await until(lambda: volume.failures >= 1 and len(outbox._unwritten) == 3)
            assert value("lago_billing_queue_depth") == 3 and value("lago_billing_spool_depth") == 0
            assert value("lago_billing_spool_unwritten") == 3
            assert value("lago_billing_spool_write_failing") == 1
            assert pipeline.stats["spool_unwritten"] == 3
            volume.full = False
            await until(lambda: outbox.spool_depth() == 3)
            assert value("lago_billing_spool_unwritten") == 0
            assert value("lago_billing_spool_write_failing") == 0
            lago.down = False
            assert await pipeline.flush(5)
            await pipeline.aclose()


async def test_spool_dead_letters_forgotten_are_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_write_backoff: None
) -> None:
    """The volume stays full and Lago rejects every event: the spool's dead letters waiting in memory past its cap
    (2 here) are forgotten, counted in ``dead_letters_evicted_total``."""
    monkeypatch.setattr(_spool, "_MEMORY_DEAD_LETTERS", 2)
    registry = CollectorRegistry()
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    lago = Lago(make_fake().transport())
    volume = Volume(monkeypatch)
    async with make_client(lago, max_retries=0) as client:
        pipeline = _pipeline(client, tmp_path / "spool.db", metrics=metrics)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            volume.full = lago.rejecting = True
            for index, event in enumerate(events(5)):
                assert pipeline.submit(event)
                await until(lambda index=index: pipeline.stats["dead_lettered"] == index + 1)  # type: ignore[misc]
            assert registry.get_sample_value("lago_billing_dead_letters_evicted_total") == 3
            volume.full = False
            await pipeline.aclose()


# -- the middleware's counts ---------------------------------------------------------------------------------------


async def test_middleware_counts_added_on_first_use_are_exported(fake_lago: Any, settings: BillingSettings) -> None:
    """A retry of an idempotent request (``stats["idempotent_retries"]``) and a billing middleware inside another
    (the inner one's ``stats["nested"]``): counted in ``stats``, and exported."""
    registry = CollectorRegistry()
    value = registry.get_sample_value
    inner = OrgBillingMiddleware(app(), settings, transport=fake_lago.transport(), metrics_registry=registry)
    outer = OrgBillingMiddleware(
        inner, settings, transport=fake_lago.transport(), idempotency_header="Idempotency-Key", quota=None
    )
    assert register_metrics(outer, registry)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t") as http:
            for _ in range(2):
                response = await http.post("/v1/chat", headers={**HEADERS, "Idempotency-Key": "k1"})
                assert response.status_code == 200
        assert outer.stats.get("idempotent_retries") == 1 and inner.stats.get("nested") == 2
        assert value("lago_billing_requests_idempotent_retries_total") == 1
        assert value("lago_billing_requests_nested_total") == 2
        assert value("lago_billing_requests_reattributed_total") == 0
        assert value("lago_billing_requests_handed_over_total") == 0
    finally:
        await outer.aclose()
        await inner.aclose()


async def test_requests_in_flight_gauge(fake_lago: Any, settings: BillingSettings) -> None:
    """A request still running the app is ``requests_in_flight`` (what a shutdown waits for), 0 once it ended."""
    registry = CollectorRegistry()
    started, release = anyio.Event(), anyio.Event()

    async def slow(request: Request) -> Response:
        started.set()
        await release.wait()
        return JSONResponse({})

    inner = Starlette(routes=[Route("/slow", slow)])
    middleware = OrgBillingMiddleware(inner, settings, transport=fake_lago.transport(), metrics_registry=registry)
    try:
        assert registry.get_sample_value("lago_billing_requests_in_flight") == 0
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(functools.partial(http.get, "/slow", headers=HEADERS))
                await started.wait()
                assert registry.get_sample_value("lago_billing_requests_in_flight") == 1
                release.set()
        assert registry.get_sample_value("lago_billing_requests_in_flight") == 0
    finally:
        await middleware.aclose()


# -- names and multiprocess mode -----------------------------------------------------------------------------------


def test_new_names_are_described_at_registration() -> None:
    """Registered (before any count), the registry knows every new name: its duplicate check and ``?name[]=``."""
    registry = CollectorRegistry()
    assert PipelineMetrics().register(registry)
    described = set(registry._names_to_collectors)
    for name in (*NEW_COUNTERS, *NEW_GAUGES):
        assert name in described, name


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Multiprocess mode in this process (as in test_metrics_multiprocess), synced only when the test says."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    value_class = values.MultiProcessValue()
    monkeypatch.setattr(values, "ValueClass", value_class)
    monkeypatch.setattr(_metrics, "_multiprocess", None)
    monkeypatch.setattr(_metrics, "_SYNC_INTERVAL", 3600.0)
    yield directory
    state = _metrics._multiprocess
    if state is not None:
        state.close()
    value_class.close_all_files()


async def test_new_metrics_are_mirrored_in_multiprocess_mode(
    multiprocess: Path, fake_lago: Any, settings: BillingSettings
) -> None:
    """In multiprocess mode the new counters and gauges go to the files too; a pipeline that goes hands its last
    ``dead_evicted`` over; at exit the gauges go to 0."""

    def value(name: str) -> float | None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(multiprocess))
        return registry.get_sample_value(name)

    middleware = OrgBillingMiddleware(app(), settings, transport=fake_lago.transport(), quota=None)
    assert register_metrics(middleware, CollectorRegistry())
    state = _metrics._multiprocess
    assert state is not None
    for name in (*NEW_COUNTERS, *NEW_GAUGES):
        assert value(name) == 0, name
    outbox = middleware.pipeline.outbox
    assert isinstance(outbox, _spool.MemoryOutbox)
    outbox.dead_evicted = 4  # (as 4 letters forgotten: see the tests above for the real thing)
    middleware._in_flight = 2
    middleware.stats["reattributed"] = 1
    state.sync()
    assert value("lago_billing_dead_letters_evicted_total") == 4
    assert value("lago_billing_requests_in_flight") == 2
    assert value("lago_billing_requests_reattributed_total") == 1
    outbox.dead_evicted = 5
    middleware._in_flight = 0
    del middleware, outbox
    gc.collect()
    state.sync()
    assert value("lago_billing_dead_letters_evicted_total") == 5
    assert value("lago_billing_requests_in_flight") == 0
