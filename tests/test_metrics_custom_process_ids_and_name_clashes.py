"""Review of the Prometheus metrics as deployed: worker processes whose prometheus_client files are named by a custom
process identifier (``values.MultiProcessValue(worker_id)``, the prometheus_client escape hatch against files piling
up), an app whose registry already holds a metric of a billing name, and a namespace Prometheus cannot take given to
``PipelineMetrics.register``.

* A worker starting (or forked, gunicorn ``--preload``) used to take the files of its live siblings for those of dead
  processes (their identifier is no pid here) and delete them: their gauges (queue depth, in-flight requests, Redis
  fallback) vanished from every scrape until they restarted.
* A clash with the app's own metric raised prometheus_client's bare ``DuplicateTimeseries`` out of the middleware's
  constructor, not a ``LagoIntegrationError`` saying what to do.
* ``PipelineMetrics.register(namespace="my-app")`` was accepted and exported ``my_app_*`` (``"9x"``: ``_x_*``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    LagoIntegrationError,
    OrgBillingMiddleware,
    PipelineMetrics,
    register_metrics,
)

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus_client is not installed (extra metrics)"
)
from prometheus_client import CollectorRegistry, Counter  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# -- custom process identifiers ---------------------------------------------------------------------------------------

#: A worker whose prometheus_client files are named by a worker number (set before anything imports prometheus_client
#: metrics, as uWSGI's ``worker_id`` or a gunicorn hook's pool of ids would): registers a pipeline with ``depth``
#: events queued, syncs, says READY; then waits (a live sibling), or forks once (gunicorn --preload forks the
#: workers from the master) and prints the queue depth a scrape of the directory shows.
WORKER = textwrap.dedent(
    """
    import os, sys, threading
    from prometheus_client import values

    identifier, depth, role = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    values.ValueClass = values.MultiProcessValue(lambda: identifier)

    import lago_org_billing._metrics as m

    m._SYNC_INTERVAL = 3600.0
    metrics = m.PipelineMetrics()
    metrics.bind_gauges(lambda: {"depth": depth, "spool_depth": 0})
    assert metrics.register()
    m._multiprocess.sync()
    print("READY", flush=True)
    if role == "wait":
        threading.Event().wait()
    child = os.fork()  # the at-fork hooks run, as in a worker forked by gunicorn --preload
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    print(registry.get_sample_value("lago_billing_queue_depth"), flush=True)
    """
)


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 4_194_304  # Linux's upper bound


@pytest.mark.skipif(os.name != "posix" or not hasattr(os, "fork"), reason="dead processes are dropped on POSIX only")
def test_live_workers_named_by_a_custom_identifier_keep_their_gauges(tmp_path: Path) -> None:
    """Two live workers whose files are named by worker numbers that are no pid here (above pid_max: certainly no
    process): the second one starting (and forking) must not take the first one's gauge file for a dead process's.
    The first's 3 queued events stay in the summed queue depth."""
    first_id, second_id = _pid_max() + 1, _pid_max() + 2
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(first_id), "3", "wait"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdout.readline() == "READY\n"
        assert (tmp_path / f"gauge_livesum_{first_id}.db").exists()
        done = subprocess.run(
            [sys.executable, "-c", WORKER, str(second_id), "4", "fork"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["READY", "7.0"], "a live worker's queue depth was dropped: " + done.stdout
        assert (tmp_path / f"gauge_livesum_{first_id}.db").exists()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
        assert registry.get_sample_value("lago_billing_queue_depth") == 3  # the second exited: its gauges at 0
    finally:
        first.kill()
        first.wait()
        if first.stdout is not None:
            first.stdout.close()


# -- a name of the app's own ------------------------------------------------------------------------------------------


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", retry_backoff=0.001
    )


@pytest.fixture
def no_multiprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)


@pytest.mark.usefixtures("no_multiprocess")
def test_an_app_metric_of_a_billing_name_is_a_configuration_error(fake_lago: Any, settings: BillingSettings) -> None:
    """The app counted its Lago calls itself as ``lago_billing_requests_billed`` before adopting the package: the
    middleware with metrics on that registry says which names clash and how to export under another prefix (a
    LagoIntegrationError, still a ValueError), instead of prometheus_client's bare DuplicateTimeseries."""
    registry = CollectorRegistry()
    Counter("lago_billing_requests_billed", "the app's own", registry=registry)
    app = Starlette(routes=[Route("/v1/chat", chat)])
    with pytest.raises(LagoIntegrationError) as raised:
        OrgBillingMiddleware(app, settings, transport=fake_lago.transport(), metrics_registry=registry)
    error = raised.value
    assert isinstance(error, ConfigurationError) and isinstance(error, ValueError)
    message = str(error)
    assert "lago_billing_requests_billed" in message and "namespace=" in message, message

    middleware = OrgBillingMiddleware(app, settings, transport=fake_lago.transport())
    assert register_metrics(middleware, registry, namespace="billing")  # what the message says works
    assert registry.get_sample_value("billing_requests_billed_total") == 0


@pytest.mark.usefixtures("no_multiprocess")
def test_a_pipeline_metric_of_an_app_name_is_a_configuration_error() -> None:
    """The same through PipelineMetrics.register."""
    registry = CollectorRegistry()
    Counter("lago_billing_events_recorded", "the app's own", registry=registry)
    with pytest.raises(ConfigurationError, match="namespace="):
        PipelineMetrics().register(registry)


# -- namespaces --------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_multiprocess")
@pytest.mark.parametrize("namespace", ["my-app", "9x", "billing.v2"])
def test_pipeline_metrics_refuse_a_namespace_prometheus_cannot_take(namespace: str) -> None:
    """register_metrics refuses such a namespace; PipelineMetrics.register exported the metrics renamed by
    prometheus_client's escaping (``my_app_*``, ``_x_*``), names no alert or dashboard written for the given prefix
    finds."""
    registry = CollectorRegistry()
    with pytest.raises(ConfigurationError, match="namespace"):
        PipelineMetrics().register(registry, namespace=namespace)
    assert list(registry.collect()) == []


@pytest.mark.usefixtures("no_multiprocess")
def test_pipeline_metrics_refuse_what_is_no_registry() -> None:
    """A registry without ``register`` (a settings object passed by mistake): the same ConfigurationError as
    register_metrics', not an AttributeError."""
    with pytest.raises(ConfigurationError, match="CollectorRegistry"):
        PipelineMetrics().register(object())
