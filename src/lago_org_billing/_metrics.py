"""Counters of the event delivery pipeline, optionally exported to Prometheus (extra ``metrics``).

The counters are plain ints on :class:`PipelineMetrics` (the source of truth, read by ``EventPipeline.stats``
and by tests). Prometheus reads them at scrape time through a custom collector, so the request path never
touches ``prometheus_client``::

    metrics = PipelineMetrics()
    metrics.register()                      # the default registry; or metrics.register(my_registry)
    pipeline = EventPipeline(client, metrics=metrics)

Without ``prometheus_client`` installed, :meth:`PipelineMetrics.register` logs a warning and returns False;
everything else works the same.

Exported metrics (prefix ``lago_billing_`` by default):

* ``events_recorded_total``, ``events_delivered_total`` (accepted by Lago, duplicates included),
  ``events_duplicate_total`` (already in Lago), ``events_dead_lettered_total``, ``events_replayed_total`` (dead
  letters sent again), ``events_dropped_total``
  (outbox full or pipeline closed), ``events_lost_at_shutdown_total`` (memory outbox only),
  ``delivery_retries_total``, ``batches_sent_total``, ``rate_limited_total``
* ``lago_errors_total{status="503"|"network"|...}``
* ``queue_depth`` (events accepted and not yet resolved), ``spool_depth`` (rows in the SQLite spool)
* ``delivery_seconds`` histogram: duration of each ``POST /events/batch`` call, failed ones too (a timeout shows)

:func:`register_metrics` (what ``LAGO_METRICS=true`` does for each ``OrgBillingMiddleware``) exports those of
the middleware's pipeline plus the middleware's own counts and its quota gate's, summed over the middlewares
registered in a process (one collector per registry, so two apps never clash):

* ``requests_total`` (requests handled, excluded paths aside), ``requests_billed_total``,
  ``requests_blocked_total`` (answered 402/429 by the gate), ``requests_unresolved_total`` (no org),
  ``requests_excluded_total``, ``requests_unbilled_errors_total`` (5xx not billed), ``requests_ungated_total``
  (org known only after the app ran, no ``require_quota``), ``event_build_errors_total``
* ``quota_<name>_total`` for each counter of the gate's ``stats``: ``checks``, ``allowed``, ``blocked``,
  ``would_block`` (monitor mode), ``no_subscription``, ``refreshes``, ``refresh_errors``, ``cold_waits``,
  ``cold_timeouts``, ``fail_open``, ``fail_closed``, and with Redis ``redis_errors`` and ``fallback_decisions``
* ``quota_redis_fallback`` gauge: 1 while Redis is unreachable and decisions are counted locally
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["LATENCY_BUCKETS", "PipelineMetrics", "register_metrics"]

logger = logging.getLogger("lago_org_billing.delivery")

#: Upper bounds (seconds) of the ``delivery_seconds`` histogram buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_COUNTERS = {
    "recorded": ("events_recorded", "Usage events handed to the delivery pipeline."),
    "delivered": ("events_delivered", "Events Lago holds thanks to the pipeline (duplicates included)."),
    "duplicates": ("events_duplicate", "Events Lago already had (value_already_exist): counted as delivered."),
    "dead_lettered": ("events_dead_lettered", "Events Lago rejected for good, kept in the dead-letter store."),
    "replayed": ("events_replayed", "Dead-lettered events put back for delivery (replay_dead_letters)."),
    "dropped": ("events_dropped", "Events refused because the outbox was full or the pipeline closed."),
    "lost_at_shutdown": ("events_lost_at_shutdown", "Events of the memory outbox undelivered at shutdown."),
    "retries": ("delivery_retries", "Batches put back for a later attempt after a transient failure."),
    "batches_sent": ("batches_sent", "POST /events/batch calls made."),
    "rate_limited": ("rate_limited", "429 answers from Lago that paused delivery."),
}


class PipelineMetrics:
    """Counters, gauges and a latency histogram of one :class:`EventPipeline`."""

    def __init__(self) -> None:
        self.recorded = 0
        self.delivered = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.replayed = 0
        self.dropped = 0
        self.lost_at_shutdown = 0
        self.retries = 0
        self.batches_sent = 0
        self.rate_limited = 0
        #: Lago errors by HTTP status (``"network"`` when no response came back).
        self.lago_errors: dict[str, int] = {}
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self._gauges: Callable[[], dict[str, int]] = dict

    # ------------------------------------------------------------- recording

    def lago_error(self, status: int | None) -> None:
        key = "network" if status is None else str(status)
        self.lago_errors[key] = self.lago_errors.get(key, 0) + 1

    def observe_latency(self, seconds: float) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def bind_gauges(self, gauges: Callable[[], dict[str, int]]) -> None:
        """Where ``queue_depth`` and ``spool_depth`` are read from (the pipeline binds itself)."""
        self._gauges = gauges

    def snapshot(self) -> dict[str, int]:
        """Every counter and gauge as plain ints (``lago_errors_<status>`` for the errors)."""
        values = {name: getattr(self, name) for name in _COUNTERS}
        values.update(self._gauges())
        for status, count in sorted(self.lago_errors.items()):
            values[f"lago_errors_{status}"] = count
        return values

    # ------------------------------------------------------------ Prometheus

    def register(self, registry: Any = None, *, namespace: str = "lago_billing") -> bool:
        """Export these metrics through ``registry`` (default: ``prometheus_client.REGISTRY``).

        Returns False (and logs a warning) when ``prometheus_client`` is not installed:
        ``pip install 'lago-org-billing[metrics]'``.
        """
        target = _registry(registry)
        if target is None:
            return False
        target.register(_Collector(self, namespace))
        return True


def _registry(registry: Any) -> Any:
    """``registry``, or prometheus_client's default one; ``None`` (with a warning) without prometheus_client."""
    try:
        import prometheus_client
    except ImportError:
        logger.warning("prometheus_client is not installed: pip install 'lago-org-billing[metrics]'")
        return None
    return prometheus_client.REGISTRY if registry is None else registry


class _Collector:
    """A prometheus_client custom collector reading :class:`PipelineMetrics` at scrape time."""

    def __init__(self, metrics: PipelineMetrics, namespace: str) -> None:
        self._metrics = metrics
        self._prefix = f"{namespace}_" if namespace else ""

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        return _pipeline_families(self._prefix, [self._metrics])


def _pipeline_families(prefix: str, sources: list[PipelineMetrics]) -> Iterator[Any]:
    """The pipeline metrics of ``sources``, summed."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    for attribute, (name, documentation) in _COUNTERS.items():
        value = sum(getattr(metrics, attribute) for metrics in sources)
        yield CounterMetricFamily(prefix + name, documentation, value=value)
    errors = CounterMetricFamily(prefix + "lago_errors", "Errors answered by Lago, by status.", labels=["status"])
    for status, count in sorted(_summed(metrics.lago_errors for metrics in sources).items()):
        errors.add_metric([status], count)
    yield errors
    gauges = _summed(metrics._gauges() for metrics in sources)
    yield GaugeMetricFamily(
        prefix + "queue_depth", "Events accepted and not yet resolved.", value=gauges.get("depth", 0)
    )
    yield GaugeMetricFamily(prefix + "spool_depth", "Rows in the SQLite spool.", value=gauges.get("spool_depth", 0))
    cumulative, buckets = 0, []
    counts = [sum(column) for column in zip(*(metrics.latency_buckets for metrics in sources), strict=True)]
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts or [0] * (len(LATENCY_BUCKETS) + 1), strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    yield HistogramMetricFamily(
        prefix + "delivery_seconds",
        "Duration of each POST /events/batch call.",
        buckets=buckets,
        sum_value=sum(metrics.latency_sum for metrics in sources),
    )


def _summed(mappings: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for mapping in mappings:
        for key, value in mapping.items():
            total[key] = total.get(key, 0) + value
    return total


# ------------------------------------------------------------------------------------------- middleware

_REQUEST_COUNTERS = {
    "requests": ("requests", "HTTP requests the billing middleware handled (excluded paths aside)."),
    "billed": ("requests_billed", "Requests whose api_call event went to the delivery pipeline."),
    "blocked": ("requests_blocked", "Requests the quota gate answered 402/429 without calling the app."),
    "unresolved": ("requests_unresolved", "Requests whose organization could not be resolved."),
    "excluded": ("requests_excluded", "Requests on excluded paths (never billed nor gated)."),
    "unbilled_errors": ("requests_unbilled_errors", "Requests answered 5xx (or crashed) and not billed."),
    "ungated": ("requests_ungated", "Billed requests whose org was known only after the app ran, not gated."),
    "event_errors": ("event_build_errors", "Events that could not be built (dead-lettered with the reason)."),
}
#: Gate stats exported as gauges (states, not counts).
_GATE_GAUGES = {"redis_fallback": "1 while Redis is unreachable and quota decisions are counted locally."}

#: One collector per registry (keyed by identity), holding the middlewares registered with it.
_registered: dict[int, tuple[Any, _MiddlewareCollector]] = {}


def register_metrics(middleware: Any, registry: Any = None, *, namespace: str = "lago_billing") -> bool:
    """Export ``middleware``'s metrics (its pipeline's, its own counts and its quota gate's) through ``registry``
    (default: ``prometheus_client.REGISTRY``), summed with the other middlewares registered there.

    Returns False (and logs a warning) when ``prometheus_client`` is not installed:
    ``pip install 'lago-org-billing[metrics]'``.
    """
    target = _registry(registry)
    if target is None:
        return False
    entry = _registered.get(id(target))
    if entry is None or entry[0] is not target:
        collector = _MiddlewareCollector(namespace)
        target.register(collector)
        entry = _registered[id(target)] = (target, collector)
    entry[1].middlewares.add(middleware)
    return True


class _MiddlewareCollector:
    """Reads the registered middlewares (held weakly: a discarded app stops counting) at scrape time."""

    def __init__(self, namespace: str) -> None:
        self.middlewares: weakref.WeakSet[Any] = weakref.WeakSet()
        self._prefix = f"{namespace}_" if namespace else ""

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        middlewares = list(self.middlewares)
        prefix = self._prefix
        pipelines = [getattr(middleware.pipeline, "metrics", None) for middleware in middlewares]
        yield from _pipeline_families(prefix, [metrics for metrics in pipelines if metrics is not None])
        requests = _summed(middleware.stats for middleware in middlewares)
        for key, (name, documentation) in _REQUEST_COUNTERS.items():
            yield CounterMetricFamily(prefix + name, documentation, value=requests.get(key, 0))
        gates = [middleware.quota for middleware in middlewares if middleware.quota is not None]
        gate_stats = _summed(
            {**getattr(gate, "stats", {}), **getattr(getattr(gate, "backend", None), "stats", {})} for gate in gates
        )
        for key, value in sorted(gate_stats.items()):
            if key in _GATE_GAUGES:
                yield GaugeMetricFamily(f"{prefix}quota_{key}", _GATE_GAUGES[key], value=value)
            else:
                yield CounterMetricFamily(f"{prefix}quota_{key}", f"Quota gate: {key.replace('_', ' ')}.", value=value)
