"""prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): the billing metrics of every worker process,
summed by the ``MultiProcessCollector`` of the registry that serves ``/metrics``.

In process: the plain-int counts are mirrored into the multiprocess files by deltas (never counted twice, none lost
when a pipeline goes between two syncs), once more at exit. Across processes: ``uvicorn --workers 2`` (the app is
this module's ``app``); every scrape, whichever worker answers it, shows the requests of both."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from _quota_app import free_port, seed
from lago_org_billing import BillingSettings, OrgBillingMiddleware, PipelineMetrics, _metrics, register_metrics
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus_client is not installed (extra metrics)"
)
from prometheus_client import values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"X-Org-Id": "org_1"}


# -- the app served by the workers -------------------------------------------------------------------------------------


async def chat(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid(), "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}})


async def health(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


def build() -> Any:
    """The README's setup: ``/metrics`` served from a registry with a ``MultiProcessCollector`` (its answer names the
    worker, for the test), the middleware from ``LAGO_*`` (``LAGO_METRICS=true``)."""
    registry = prometheus_client.CollectorRegistry()
    MultiProcessCollector(registry)
    metrics = prometheus_client.make_asgi_app(registry=registry)

    async def metrics_naming_the_worker(scope: Any, receive: Any, send: Any) -> None:
        async def send_with_pid(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-worker-pid", str(os.getpid()).encode())]
                message = {**message, "headers": headers}
            await send(message)

        await metrics(scope, receive, send_with_pid)

    routes = [Route("/v1/chat", chat), Route("/health", health), Mount("/metrics", app=metrics_naming_the_worker)]
    return OrgBillingMiddleware(Starlette(routes=routes))


def __getattr__(name: str) -> Any:
    if name == "app":  # built on import by uvicorn only
        return build()
    raise AttributeError(name)


# -- helpers -----------------------------------------------------------------------------------------------------------


def reader(directory: Path) -> Callable[..., float | None]:
    """What a scrape of a ``MultiProcessCollector`` registry over ``directory`` shows, sample by sample."""

    def value(name: str, **labels: str) -> float | None:
        registry = prometheus_client.CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))
        return registry.get_sample_value(name, labels)

    return value


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Multiprocess mode in this process, on a fresh directory (prometheus_client chose its value class when first
    imported: replaced here as its own tests do); syncs only when the test calls ``sync()``."""
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


def sync() -> None:
    """What the thread does every second."""
    assert _metrics._multiprocess is not None
    _metrics._multiprocess.sync()


# -- in process --------------------------------------------------------------------------------------------------------


def test_pipeline_counts_are_mirrored_by_deltas_never_twice(multiprocess: Path) -> None:
    """Registered, a pipeline's metrics go to the multiprocess files (not to the registry, which the collector of
    the serving registry would duplicate), zeros included; each sync adds what changed since the last one."""
    value = reader(multiprocess)
    registry = prometheus_client.CollectorRegistry()
    metrics = PipelineMetrics()
    metrics.bind_gauges(lambda: {"depth": 4, "spool_depth": 0})
    assert metrics.register(registry)
    assert list(registry.collect()) == []
    assert value("lago_billing_events_delivered_total") == 0 and value("lago_billing_queue_depth") == 4
    assert value("lago_billing_delivery_seconds_count") == 0

    metrics.recorded += 5
    metrics.delivered += 3
    metrics.lago_error(503)
    metrics.observe_latency(0.02)
    metrics.observe_latency(3.0)
    for _ in range(3):
        sync()
        assert value("lago_billing_events_recorded_total") == 5 and value("lago_billing_events_delivered_total") == 3
        assert value("lago_billing_lago_errors_total", status="503") == 1
        assert value("lago_billing_delivery_seconds_count") == 2
        assert value("lago_billing_delivery_seconds_bucket", le="0.025") == 1
        assert value("lago_billing_delivery_seconds_bucket", le="5.0") == 2
        assert value("lago_billing_delivery_seconds_sum") == pytest.approx(3.02)

    metrics.delivered += 2
    metrics.lago_error(None)
    metrics.bind_gauges(lambda: {"depth": 0, "spool_depth": 0})
    sync()
    sync()
    assert value("lago_billing_events_delivered_total") == 5 and value("lago_billing_events_recorded_total") == 5
    assert value("lago_billing_lago_errors_total", status="network") == 1
    assert value("lago_billing_lago_errors_total", status="503") == 1
    assert value("lago_billing_queue_depth") == 0


def test_a_pipeline_that_goes_between_two_syncs_hands_its_last_counts_over(multiprocess: Path) -> None:
    """Pipeline metrics are held weakly (a discarded app is let go of): those counted after the last sync are
    handed over as they go, mirrored by the next sync, once."""
    value = reader(multiprocess)
    metrics = PipelineMetrics()
    assert metrics.register(prometheus_client.CollectorRegistry())
    metrics.delivered += 2
    sync()
    metrics.delivered += 5
    del metrics
    gc.collect()
    sync()
    sync()
    assert value("lago_billing_events_delivered_total") == 7


def make_settings(fake: FakeLago) -> BillingSettings:
    return BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        org_header="X-Org-Id",
        exclude_paths=("/health",),
        retry_backoff=0.001,
    )


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def serve(middleware: OrgBillingMiddleware, *paths: str) -> None:
    """Requests without a lifespan (the delivery starts with the first), their events delivered."""
    async with client_for(middleware) as client:
        for path in paths:
            assert (await client.get(path, headers=HEADERS)).status_code == 200
    assert await middleware.pipeline.flush(5)


async def test_middlewares_are_summed_once_whatever_the_registries(multiprocess: Path) -> None:
    """Middlewares of one namespace are summed, each once though registered with two registries; another namespace
    is apart; no registry gets a collector (two apps never clash). A middleware's renewed pipeline and gate: the
    counts of the closed ones are kept, the new ones' added."""
    value = reader(multiprocess)
    fake = seed(FakeLago(api_key="k"), starter_calls=1_000)
    settings = make_settings(fake)
    app = Starlette(routes=[Route("/v1/chat", chat), Route("/health", health)])
    first_registry, second_registry = prometheus_client.CollectorRegistry(), prometheus_client.CollectorRegistry()

    first = OrgBillingMiddleware(app, settings=settings, transport=fake.transport(), metrics_registry=first_registry)
    assert register_metrics(first, second_registry)
    second = OrgBillingMiddleware(app, settings=settings, transport=fake.transport(), metrics_registry=second_registry)
    other = OrgBillingMiddleware(app, settings=settings, transport=fake.transport())
    assert register_metrics(other, first_registry, namespace="other")
    assert list(first_registry.collect()) == [] and list(second_registry.collect()) == []
    assert value("lago_billing_requests_billed_total") == 0 and value("lago_billing_quota_checks_total") == 0
    try:
        await serve(first, "/v1/chat", "/v1/chat", "/health")
        await serve(second, "/v1/chat")
        await serve(other, "/v1/chat")
        sync()
        sync()
        assert value("lago_billing_requests_total") == 3 and value("lago_billing_requests_excluded_total") == 1
        assert value("lago_billing_requests_billed_total") == 3 and value("lago_billing_events_delivered_total") == 3
        assert value("lago_billing_quota_checks_total") == 3 and value("lago_billing_quota_allowed_total") == 3
        assert value("lago_billing_queue_depth") == 0 and value("lago_billing_delivery_seconds_count") >= 2
        assert value("other_requests_billed_total") == 1 and value("other_events_delivered_total") == 1

        closed_pipeline, closed_gate = first.pipeline, first.quota
        await first.aclose()
        await serve(first, "/v1/chat")  # started again: a new pipeline and gate
        assert first.pipeline is not closed_pipeline and first.quota is not closed_gate
        sync()
        sync()
        assert value("lago_billing_requests_billed_total") == 4 and value("lago_billing_events_delivered_total") == 4
        assert value("lago_billing_quota_checks_total") == 4
    finally:
        for middleware in (first, second, other):
            await middleware.aclose()
    assert len(fake.events) == 5


class Gate:
    """A quota gate as the mirror reads it: its own ``stats`` dict (QuotaGate's, RedisBackend's)."""

    def __init__(self, **stats: int) -> None:
        self.stats = dict(stats)
        self.backend = None


class Middleware:
    """What the mirror reads of an OrgBillingMiddleware: ``stats``, ``pipeline.metrics``, ``quota``."""

    def __init__(self, gate: Gate | None) -> None:
        self.stats = {"requests": 0}
        self.pipeline = type("Pipeline", (), {"metrics": PipelineMetrics()})()
        self.quota = gate


def test_a_gate_that_outlives_its_middleware_is_not_counted_twice(multiprocess: Path) -> None:
    """A gate made once (quota=gate) and given to a middleware that is let go of, then to a new one (an app built
    again): what was mirrored of its stats is kept while the gate lives, so its counts are not added again."""
    value = reader(multiprocess)
    gate = Gate(checks=0)
    first = Middleware(gate)
    assert register_metrics(first)
    gate.stats["checks"] = 5
    sync()
    assert value("lago_billing_quota_checks_total") == 5
    del first
    gc.collect()
    sync()  # the gate's dict read a last time, no longer a source
    gate.stats["checks"] = 6  # used meanwhile (by an app not registered): counted when it is mirrored again
    second = Middleware(gate)
    assert register_metrics(second)
    sync()
    sync()
    assert value("lago_billing_quota_checks_total") == 6


def test_a_gate_shared_by_two_middlewares_is_one_redis_outage(multiprocess: Path) -> None:
    """One gate (Redis down: redis_fallback 1) shared by two middlewares of a namespace: its counters and its
    gauge are mirrored once."""
    value = reader(multiprocess)
    gate = Gate(checks=3, redis_fallback=1)
    first, second = Middleware(gate), Middleware(gate)
    assert register_metrics(first) and register_metrics(second)
    sync()
    assert value("lago_billing_quota_checks_total") == 3
    assert value("lago_billing_quota_redis_fallback") == 1


async def test_a_pipeline_renewed_twice_between_two_syncs_is_counted(multiprocess: Path) -> None:
    """A real OrgBillingMiddleware closed and served again twice within a sync interval (each time a new pipeline
    and gate): the middle pipeline and gate, never seen by a sync, were adopted when made; their counts are
    mirrored."""
    value = reader(multiprocess)
    fake = seed(FakeLago(api_key="k"), starter_calls=1_000)
    app = Starlette(routes=[Route("/v1/chat", chat)])
    middleware = OrgBillingMiddleware(app, settings=make_settings(fake), transport=fake.transport())
    assert register_metrics(middleware)
    try:
        for _ in range(3):
            await serve(middleware, "/v1/chat")
            await middleware.aclose()
        gc.collect()
        sync()
    finally:
        await middleware.aclose()
    assert len(fake.events) == 3
    assert value("lago_billing_requests_billed_total") == 3
    assert value("lago_billing_quota_checks_total") == 3 and value("lago_billing_events_delivered_total") == 3


def test_last_counts_are_mirrored_when_the_process_exits(tmp_path: Path) -> None:
    """A worker's last counts (those of its shutdown, say) reach the files as it exits, and its gauges go to 0:
    a process that ended holds no queue."""
    child = """
        import lago_org_billing._metrics as m

        m._SYNC_INTERVAL = 3600.0  # the registration's sync and the one at exit only
        metrics = m.PipelineMetrics()
        metrics.bind_gauges(lambda: {"depth": 3, "spool_depth": 1})
        assert metrics.register()
        metrics.delivered += 7
    """
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(child)], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    value = reader(tmp_path)
    assert value("lago_billing_events_delivered_total") == 7
    assert value("lago_billing_queue_depth") == 0 and value("lago_billing_spool_depth") == 0


def test_a_killed_worker_s_gauges_are_not_summed_with_the_live_ones(tmp_path: Path) -> None:
    """uvicorn --workers (no child_exit hook): a worker SIGKILLed with 3 events queued leaves its livesum gauge file;
    the worker started in its place drops the gauges of the dead as its mirroring starts, so queue_depth is the live
    workers' only."""
    child = textwrap.dedent(
        """
        import sys, threading
        import lago_org_billing._metrics as m

        m._SYNC_INTERVAL = 3600.0
        metrics = m.PipelineMetrics()
        metrics.bind_gauges(lambda: {"depth": 3, "spool_depth": 0})
        assert metrics.register()
        print("READY", flush=True)
        threading.Event().wait()
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "READY\n"
    finally:
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
    assert reader(tmp_path)("lago_billing_queue_depth") == 3  # the killed worker's, until a worker starts
    replacement = """
        import lago_org_billing._metrics as m

        m._SYNC_INTERVAL = 3600.0
        metrics = m.PipelineMetrics()
        metrics.bind_gauges(lambda: {"depth": 0, "spool_depth": 0})
        assert metrics.register()
        m._multiprocess.sync()
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        print(registry.get_sample_value("lago_billing_queue_depth"), flush=True)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(replacement)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) == 0, "the dead worker's queue_depth is still summed"
    assert not list(tmp_path.glob(f"gauge_livesum_{worker.pid}.db"))


def test_without_the_variable_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PROMETHEUS_MULTIPROC_DIR: the collector, read at scrape time; no thread, no files."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    monkeypatch.setattr(_metrics, "_multiprocess", None, raising=False)
    registry = prometheus_client.CollectorRegistry()
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    metrics.delivered += 2
    assert registry.get_sample_value("lago_billing_events_delivered_total") == 2
    assert _metrics._multiprocess is None


def test_variable_set_after_prometheus_client_was_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """prometheus_client is then not in multiprocess mode (it decides when imported): said once, and the metrics
    are exported per process as without the variable."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    monkeypatch.setattr(_metrics, "_multiprocess", None)
    monkeypatch.setattr(_metrics, "_warned_late", False)
    registry = prometheus_client.CollectorRegistry()
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.delivery"):
        for _ in range(2):
            metrics = PipelineMetrics()
            assert metrics.register(prometheus_client.CollectorRegistry())
        assert PipelineMetrics().register(registry)
    assert registry.get_sample_value("lago_billing_events_delivered_total") == 0
    warnings = [record for record in caplog.records if "after prometheus_client was imported" in record.getMessage()]
    assert len(warnings) == 1
    assert _metrics._multiprocess is None and list(tmp_path.iterdir()) == []


# -- across processes --------------------------------------------------------------------------------------------------


@pytest.fixture
def lago() -> Iterator[tuple[FakeLago, str]]:
    fake = seed(FakeLago(api_key="k"), starter_calls=10_000)
    with serve_in_thread(fake) as url:
        yield fake, url


@pytest.mark.slow
async def test_every_scrape_sums_both_uvicorn_workers(lago: tuple[FakeLago, str], tmp_path: Path) -> None:
    """``uvicorn --workers 2``, requests until both workers served some: once synced, every scrape of ``/metrics``,
    whichever worker answers it, shows all of them billed and delivered; after shutdown the dead workers' counters
    are kept and their gauges gone."""
    fake, lago_url = lago
    directory = tmp_path / "prometheus"
    directory.mkdir()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LAGO_")},
        "LAGO_API_URL": lago_url,
        "LAGO_API_KEY": "k",
        "LAGO_ORG_HEADER": "X-Org-Id",
        "LAGO_EXCLUDE_PATHS": "/health,/metrics",
        "LAGO_METRICS": "true",
        "LAGO_QUOTA_COLD_TIMEOUT": "20",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    # --app-dir: some installed distributions ship a top-level ``tests`` package that would shadow ours.
    command = [sys.executable, "-m", "uvicorn", "test_metrics_multiprocess:app", "--app-dir", "tests"]
    command += ["--port", str(port), "--workers", "2", "--log-level", "warning", "--no-access-log"]
    command += ["--timeout-worker-healthcheck", "60"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
    workers: set[int] = set()
    sent = 0
    try:
        # No keep-alive: each request a new connection, which either worker may accept.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as http:
            ready: set[int] = set()
            with anyio.fail_after(30):
                while len(ready) < 2:  # until both workers serve (one may start long after the other)
                    assert server.poll() is None, "uvicorn exited before serving"
                    with contextlib.suppress(httpx.TransportError):
                        ready.add(int((await http.get("/health")).text))
                    await anyio.sleep(0.02)  # polling

            async def one() -> None:
                response = await http.get("/v1/chat", headers=HEADERS)
                assert response.status_code == 200
                workers.add(response.json()["pid"])

            with anyio.fail_after(30):
                while len(workers) < 2:  # rounds of concurrent requests, until both workers served some
                    async with anyio.create_task_group() as tasks:
                        for _ in range(10):
                            tasks.start_soon(one)
                    sent += 10

            def sample(text: str, name: str) -> float:
                families = text_string_to_metric_families(text)
                found = [s.value for f in families for s in f.samples if s.name == name and not s.labels]
                assert found, f"{name} is not exported:\n{text}"
                return found[0]

            def counts(text: str) -> tuple[float, ...]:
                names = ("requests_billed_total", "events_delivered_total", "quota_allowed_total", "queue_depth")
                return tuple(sample(text, f"lago_billing_{name}") for name in names)

            # Synced: every count of every request written (a scrape may fall between two writes of a sync).
            done, synced, answered_by = (sent, sent, sent, 0), 0, set()
            with anyio.fail_after(30):
                while synced < 6 or workers - answered_by:
                    response = await http.get("/metrics/")
                    assert response.status_code == 200
                    seen = counts(response.text)
                    assert all(count <= sent for count in seen), response.text
                    if synced or seen == done:
                        # Once synced, every scrape: whichever worker answers, the counts of both.
                        assert seen == done, response.text
                        synced += 1
                        answered_by.add(int(response.headers["x-worker-pid"]))
                    else:
                        await anyio.sleep(0.05)  # the workers sync every second: scrape again
    finally:
        server.send_signal(signal.SIGTERM)  # graceful: each worker's lifespan flushes, its last sync at exit
        try:
            _, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
        log = err.decode(errors="replace")[-3000:]
    assert server.returncode == 0, log
    assert len(fake.events) == sent

    value = reader(directory)
    assert value("lago_billing_requests_billed_total") == sent  # dead workers' counters kept
    assert value("lago_billing_requests_total") == sent and value("lago_billing_events_recorded_total") == sent
    assert value("lago_billing_delivery_seconds_count") >= 2  # a batch of each worker, at least
    assert value("lago_billing_queue_depth") == 0  # zeroed by each worker as it exited
    for pid in workers:  # gunicorn's child_exit does this
        mark_process_dead(pid, str(directory))
    assert value("lago_billing_requests_billed_total") == sent and value("lago_billing_queue_depth") is None
