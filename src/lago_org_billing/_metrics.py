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
  ``delivery_retries_total``, ``batches_sent_total``, ``rate_limited_total``, ``dead_letters_evicted_total`` (dead
  letters forgotten past the last 10,000 kept in memory: the memory outbox's, or a spool's that cannot be written)
* ``lago_errors_total{status="503"|"network"|...}``
* ``queue_depth`` (events accepted and not yet resolved), ``spool_depth`` (rows in the SQLite spool),
  ``spool_unwritten`` (events in memory only because the spool cannot be written: in ``queue_depth``, not in
  ``spool_depth``), ``spool_write_failing`` (1 while the spool file cannot be written), ``dead_letters`` (dead letters
  held until replayed or purged: the SQLite spool's table, those waiting in memory for its write included, or the
  memory outbox's list; ``events_dead_lettered_total`` only ever grows)
* ``delivery_seconds`` histogram: duration of each ``POST /events/batch`` call, failed ones too (a timeout shows)

:func:`register_metrics` (what ``LAGO_METRICS=true`` does for each ``OrgBillingMiddleware``) exports those of
the middleware's pipeline plus the middleware's own counts and its quota gate's, summed over the middlewares and
pipelines registered with a registry under one namespace (one collector per registry and namespace, so two
registrations never clash; a pipeline or gate that several registered is counted once; it describes every name it
may export, for the registry's duplicate check and ``/metrics?name[]=...``). The collector adds what
it reads to totals that never go back: a pipeline and gate made anew (an app served again) go on from the counts
of the ones before, and a discarded app's counts stay (it adds no more):

* ``requests_total`` (requests handled, excluded paths and CORS preflights aside), ``requests_billed_total``,
  ``requests_blocked_total`` (answered 402/429 by the gate), ``requests_unresolved_total`` (no org),
  ``requests_excluded_total``, ``requests_preflight_total``, ``requests_unbilled_errors_total`` (5xx not billed),
  ``requests_unbilled_auth_failures_total`` (the app's 401/403, not billed unless ``LAGO_BILL_AUTH_FAILURES``),
  ``requests_unrouted_total`` (answered by the routing, not an endpoint: unknown-path 404, redirect_slashes 307, 405),
  ``requests_ungated_total`` (org known only after the app ran, no ``require_quota``), ``event_build_errors_total``,
  ``event_properties_errors_total`` (billed without ``event_properties``: it failed), ``background_errors_total``
  (the background work stopped on an error, then started again), ``requests_idempotent_retries_total``,
  ``requests_nested_total`` (passed on to the billing middleware around), ``requests_handed_over_total`` (billed by
  one inside), ``requests_reattributed_total`` (billed to another org than the one gated),
  ``requests_unfinished_at_shutdown_total`` (still running when a shutdown stopped waiting for them)
* ``requests_in_flight`` gauge: requests running the app or recording their event (what a shutdown waits for)
* ``quota_<name>_total`` for each counter of the gate's ``stats``: ``checks``, ``allowed``, ``blocked``,
  ``would_block`` (monitor mode), ``no_subscription``, ``refreshes``, ``refresh_errors``, ``cold_waits``,
  ``cold_timeouts``, ``fail_open``, ``fail_closed``, from the first time they happen ``cold_shed``,
  ``refreshes_paused`` and ``refreshes_superseded``, and with Redis ``redis_errors`` and ``fallback_decisions``
* ``quota_redis_fallback`` gauge: 1 while Redis is unreachable and decisions are counted locally

With several worker processes (``uvicorn --workers``, gunicorn), each has its own counts. When
``PROMETHEUS_MULTIPROC_DIR`` is set (checked at registration), prometheus_client's multiprocess mode is used instead
of the collectors: a daemon thread mirrors the plain ints, by deltas, into prometheus_client ``Counter``, ``Gauge``
(``livesum``: the live workers' values summed) and ``Histogram`` objects backed by its per-process files, every
``_SYNC_INTERVAL`` seconds and once more when the process exits (``atexit``; its gauges then go to 0). Those objects
are registered with no registry: the ``MultiProcessCollector`` of the registry that serves ``/metrics`` reads the
files of every worker, dead ones' counters included, and sums them under the same names and labels. A process whose
mirroring starts (or forked from one) drops the live gauges of processes that died without zeroing theirs (a killed
worker: ``uvicorn --workers`` has no ``child_exit`` hook), when prometheus_client names the files by pid (a custom
``process_identifier`` names them by numbers that are no pid here: none are dropped then). A pipeline and gate
that a middleware makes anew (served again after a shutdown) are adopted at once (``mirror_renewed``), so their
counts are mirrored even if they go before the next sync; a gate's mirrored counts are remembered while it lives
(given to another middleware later, it is not counted twice), and a gate shared by middlewares is counted once. The
files belong to the process, not to a registry: middlewares and pipelines registered under one namespace are summed
(each once), whatever the registries given. The request path and the delivery path still never touch
``prometheus_client``.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import functools
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ._errors import ConfigurationError
from ._ids import ascii_digits

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
    "dead_evicted": (
        "dead_letters_evicted",
        "Dead letters forgotten, the oldest first, past the last 10,000 kept in memory (memory outbox, or a SQLite "
        "spool that cannot be written).",
    ),
}
#: Help of the pipeline's other metrics, by name.
_PIPELINE_DOCS = {
    "lago_errors": "Errors answered by Lago, by status.",
    "queue_depth": "Events accepted and not yet resolved.",
    "spool_depth": "Rows in the SQLite spool.",
    "spool_unwritten": "Events in memory only because the SQLite spool cannot be written (lost if the process stops "
    "before Lago takes them).",
    "spool_write_failing": "1 while the SQLite spool file cannot be written (a full or read-only volume).",
    "dead_letters": "Dead letters held until replayed or purged (the SQLite spool's dead_letters table, or the memory "
    "outbox's list): lago-org-billing dead-letters --summary says why.",
    "delivery_seconds": "Duration of each POST /events/batch call.",
}
#: The pipeline's gauges, as :meth:`PipelineMetrics.snapshot` names them (``depth``: ``queue_depth``).
_PIPELINE_GAUGES = ("queue_depth", "spool_depth", "spool_unwritten", "spool_write_failing", "dead_letters")


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
        #: Multiprocess mode: what takes the last counts of these metrics when they go (see ``_Mirror``).
        self._hand_overs: list[Callable[[PipelineMetrics], None]] = []

    def __del__(self) -> None:
        for hand_over in getattr(self, "_hand_overs", ()):
            hand_over(self)

    # ------------------------------------------------------------- recording

    def lago_error(self, status: int | None) -> None:
        key = "network" if status is None else str(status)
        self.lago_errors[key] = self.lago_errors.get(key, 0) + 1

    def observe_latency(self, seconds: float) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def bind_gauges(self, gauges: Callable[[], dict[str, int]]) -> None:
        """Where ``queue_depth`` and ``spool_depth`` are read from (the pipeline binds itself: its outbox's own counts,
        ``dead_evicted`` and the spool's state, are read through it)."""
        self._gauges = gauges

    @property
    def dead_evicted(self) -> int:
        """Dead letters forgotten past the last 10,000 kept in memory, as the pipeline's outbox counts them (the memory
        outbox's list, or the letters a SQLite spool that cannot be written keeps for it)."""
        count = getattr(self._outbox(), "dead_evicted", 0)
        return count if type(count) is int else 0

    def _outbox(self) -> Any:
        """The outbox of the pipeline bound to these metrics (``None`` when none is, or gauges of another kind)."""
        return getattr(getattr(self._gauges, "__self__", None), "outbox", None)

    def _spool_gauges(self) -> dict[str, int]:
        """``spool_unwritten``: the events sent to Lago from memory because the SQLite spool could not be written
        (those waiting to be written again included), lost if the process stops before Lago takes them; in
        ``queue_depth``, not in ``spool_depth``. ``spool_write_failing``: 1 while the spool file cannot be written
        (with Lago up, events sent from memory are delivered at once: ``spool_unwritten`` stays near 0 meanwhile).
        ``dead_letters``: the letters the outbox holds (the spool keeps its count up to date: no read of the file)."""
        outbox = self._outbox()
        count = getattr(outbox, "dead_letter_count", None)
        dead = count() if callable(count) else 0
        dead = dead if type(dead) is int else 0
        unwritten = getattr(outbox, "_unwritten", None)
        if not isinstance(unwritten, set):  # the memory outbox (or none)
            return {"spool_unwritten": 0, "spool_write_failing": 0, "dead_letters": dead}
        again = getattr(outbox, "_requeued", 0) + getattr(outbox, "_rewriting", 0)  # back among those to write
        failing = getattr(getattr(outbox, "_write_errors", None), "count", 0)
        return {
            "spool_unwritten": len(unwritten) + again,
            "spool_write_failing": 1 if failing else 0,
            "dead_letters": dead,
        }

    def snapshot(self) -> dict[str, int]:
        """Every counter and gauge as plain ints (``lago_errors_<status>`` for the errors)."""
        values = {name: getattr(self, name) for name in _COUNTERS}
        values.update(self._gauges())
        values.update(self._spool_gauges())
        for status, count in sorted(self.lago_errors.items()):
            values[f"lago_errors_{status}"] = count
        return values

    # ------------------------------------------------------------ Prometheus

    def register(self, registry: Any = None, *, namespace: str = "lago_billing") -> bool:
        """Export these metrics through ``registry`` (default: ``prometheus_client.REGISTRY``); with
        ``PROMETHEUS_MULTIPROC_DIR`` set, through prometheus_client's multiprocess files instead (see the module).

        Returns False (and logs a warning) when ``prometheus_client`` is not installed:
        ``pip install 'lago-org-billing[metrics]'``.
        """
        _check_registry(registry, namespace, "PipelineMetrics.register", empty=True)
        target = _registry(registry)
        if target is None:
            return False
        if not _mirrored(namespace, pipeline=self):
            _collect(target, namespace, pipeline=self)
        return True


def _registry(registry: Any) -> Any:
    """``registry``, or prometheus_client's default one; ``None`` (with a warning) without prometheus_client."""
    try:
        import prometheus_client
    except ImportError:
        logger.warning("prometheus_client is not installed: pip install 'lago-org-billing[metrics]'")
        return None
    return prometheus_client.REGISTRY if registry is None else registry


# ------------------------------------------------------------------------------------------- middleware

_REQUEST_COUNTERS = {
    "requests": ("requests", "HTTP requests the billing middleware handled (excluded paths, CORS preflights aside)."),
    "billed": ("requests_billed", "Requests whose api_call event went to the delivery pipeline."),
    "blocked": ("requests_blocked", "Requests the quota gate answered 402/429 without calling the app."),
    "unresolved": ("requests_unresolved", "Requests whose organization could not be resolved."),
    "excluded": ("requests_excluded", "Requests on excluded paths (never billed nor gated)."),
    "preflight": ("requests_preflight", "CORS preflights (OPTIONS), passed on: never billed, gated or rejected."),
    "unbilled_errors": ("requests_unbilled_errors", "Requests answered 5xx (or crashed) and not billed."),
    "unbilled_auth_failures": (
        "requests_unbilled_auth_failures",
        "Requests the app answered 401/403, not billed (LAGO_BILL_AUTH_FAILURES off).",
    ),
    "unrouted": (
        "requests_unrouted",
        "Requests answered by the routing, not an endpoint (unknown-path 404, redirect_slashes 307, 405): not billed.",
    ),
    "ungated": ("requests_ungated", "Billed requests whose org was known only after the app ran, not gated."),
    "event_errors": ("event_build_errors", "Events that could not be built (dead-lettered with the reason)."),
    "event_properties_errors": ("event_properties_errors", "Requests billed without event_properties (it failed)."),
    "background_errors": ("background_errors", "Times the background work stopped on an error (then started again)."),
    "idempotent_retries": (
        "requests_idempotent_retries",
        "Billed requests retrying an idempotency key already seen (one event in Lago for both).",
    ),
    "nested": ("requests_nested", "Requests another billing middleware around this one bills: passed on untouched."),
    "handed_over": ("requests_handed_over", "Requests a billing middleware inside this one billed (or blocked)."),
    "reattributed": (
        "requests_reattributed",
        "Requests billed to another org than the one gated (request.state.org_id changed while the app ran).",
    ),
    "unfinished_at_shutdown": (
        "requests_unfinished_at_shutdown",
        "Requests still running when a shutdown stopped waiting for them (their events are dropped).",
    ),
}
#: The middleware's gauges (read from it, not from its ``stats``).
_REQUEST_GAUGES = {
    "requests_in_flight": "Requests running the app or recording their event (a shutdown waits for them)."
}
#: Gate stats exported as gauges (states, not counts).
_GATE_GAUGES = {"redis_fallback": "1 while Redis is unreachable and quota decisions are counted locally."}
#: The counters of QuotaGate's and RedisBackend's stats, some there only from the first time they happen: described
#: at registration with the rest (a registry takes the names once, for its duplicate check and ``?name[]=``).
_GATE_COUNTERS = (
    "checks",
    "allowed",
    "blocked",
    "would_block",
    "no_subscription",
    "refreshes",
    "refresh_errors",
    "cold_waits",
    "cold_timeouts",
    "fail_open",
    "fail_closed",
    "cold_shed",
    "refreshes_paused",
    "refreshes_superseded",
    "redis_errors",
    "fallback_decisions",
)

#: One collector per registry and namespace (the registry keyed by identity, held weakly: one let go of is freed, and
#: its entry dropped), holding what was registered with it.
_registered: dict[tuple[int, str], tuple[Callable[[], Any], _RegistryCollector]] = {}


def register_metrics(middleware: Any, registry: Any = None, *, namespace: str = "lago_billing") -> bool:
    """Export ``middleware``'s metrics (its pipeline's, its own counts and its quota gate's) through ``registry``
    (default: ``prometheus_client.REGISTRY``), summed with the other middlewares and pipelines registered there
    under ``namespace``; with ``PROMETHEUS_MULTIPROC_DIR`` set, through prometheus_client's multiprocess files
    instead, summed with the other middlewares and pipelines registered under ``namespace`` in the process (see the
    module).

    Returns False (and logs a warning) when ``prometheus_client`` is not installed:
    ``pip install 'lago-org-billing[metrics]'``.
    """
    _check_registration(middleware, registry, namespace)
    target = _registry(registry)
    if target is None:
        return False
    if not _mirrored(namespace, middleware=middleware):
        _collect(target, namespace, middleware=middleware)
    return True


def _check_registration(middleware: Any, registry: Any, namespace: Any) -> None:
    """Refuse what cannot be registered, before anything is: a middleware that is not one (``None`` was accepted and
    exported nothing), a registry without ``register``, a namespace Prometheus cannot take in a metric's name."""
    if not (hasattr(middleware, "stats") and hasattr(middleware, "pipeline")):
        raise ConfigurationError(
            "register_metrics(middleware) takes the OrgBillingMiddleware instance served (asgi_app = "
            f"OrgBillingMiddleware(app)), got {type(middleware).__name__}."
        )
    _check_registry(registry, namespace, "register_metrics")


def _check_registry(registry: Any, namespace: Any, caller: str, *, empty: bool = False) -> None:
    """A registry without ``register``, a namespace Prometheus cannot take in a metric's name (prometheus_client
    would export it renamed, ``my-app`` as ``my_app``): refused before anything is registered. ``empty``: no prefix
    at all is taken (``PipelineMetrics.register`` always took it)."""
    if registry is not None and not callable(getattr(registry, "register", None)):
        raise ConfigurationError(
            f"{caller}(registry=...) must be a prometheus_client CollectorRegistry (None: the default one), "
            f"got {registry!r}."
        )
    if not isinstance(namespace, str) or not ((empty and namespace == "") or _NAMESPACE.fullmatch(namespace)):
        raise ConfigurationError(
            f"{caller}(namespace=...) must be a Prometheus metric name prefix such as 'lago_billing' (letters, "
            f"digits and _, not starting with a digit), got {namespace!r}."
        )


#: A metric name's prefix Prometheus takes.
_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _collect(registry: Any, namespace: str, *, pipeline: PipelineMetrics | None = None, middleware: Any = None) -> None:
    """Add ``pipeline`` or ``middleware`` to the collector of ``namespace`` in ``registry`` (made and registered on
    first use: one per registry and namespace, so two registrations never clash and two namespaces stay apart)."""
    key = (id(registry), namespace)
    entry = _registered.get(key)
    if entry is not None and entry[0]() is registry and _still_registered(registry, entry[1]):
        entry[1].add(pipeline, middleware)
        return
    collector = _RegistryCollector(namespace)
    collector.add(pipeline, middleware)
    try:
        registry.register(collector)  # (its names: those of what it holds now, and those it may export later)
    except ValueError as exc:  # prometheus_client's DuplicateTimeseries: a metric of the app's own has such a name
        if "Duplicated timeseries" not in str(exc):
            raise
        raise ConfigurationError(
            f"The billing metrics (prefix {namespace + '_' if namespace else 'none'!r}) cannot be registered: this "
            f"registry already holds metrics of their names ({exc}), the app's own most likely. Export them under "
            "another prefix: register_metrics(middleware, registry, namespace='billing') (with LAGO_METRICS unset and "
            "no metrics_registry=), or PipelineMetrics.register(registry, namespace='billing'); or give the billing "
            "middleware a registry of its own (metrics_registry=) served on another path."
        ) from exc
    held: Callable[[], Any]
    try:
        held = weakref.ref(registry, functools.partial(_forget_registry, key))
    except TypeError:  # a registry that cannot be weakly referenced: held
        held = functools.partial(_same, registry)
    _registered[key] = (held, collector)


def _still_registered(registry: Any, collector: _RegistryCollector) -> bool:
    """Whether ``collector`` is still registered with ``registry``: one unregistered since (a test fixture cleaning
    ``prometheus_client.REGISTRY``, an app made anew that unregisters what it registered) is replaced by a new one,
    registered, rather than fed counts no scrape reads. A registry of another kind is taken at its word."""
    collectors = getattr(registry, "_collector_to_names", None)
    return not isinstance(collectors, dict) or collector in collectors


def _forget_registry(key: tuple[int, str], ref: Any) -> None:
    """A registry was let go of: its collector goes with it (the entry is still its own: its id is not reused yet)."""
    entry = _registered.get(key)
    if entry is not None and entry[0] is ref:
        del _registered[key]


class _Totals:
    """The totals of one :class:`_RegistryCollector`: what a :class:`_Mirror` adds its deltas to, as it does to
    prometheus_client's metrics in multiprocess mode. Counters never go back: the counts of a pipeline or gate that
    was made anew (an app served again) or let go of (a discarded app) stay in them."""

    def __init__(self) -> None:
        #: Metrics by full name: (kind, documentation, values by label value ("" without label), label name).
        self.metrics: dict[str, tuple[str, str, dict[str, _Value], str]] = {}

    def _metric(self, kind: str, name: str, documentation: str, label: str = "") -> dict[str, _Value]:
        metric = self.metrics.get(name)
        if metric is None:
            metric = self.metrics[name] = (kind, documentation, {}, label)
        return metric[2]

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Any:
        values = self._metric("counter", name, documentation, labelnames[0] if labelnames else "")
        return _Labelled(values) if labelnames else values.setdefault("", _Value())

    def gauge(self, name: str, documentation: str) -> Any:
        return self._metric("gauge", name, documentation).setdefault("", _Value())

    def histogram(self, name: str, documentation: str) -> Any:
        values = self._metric("histogram", name, documentation)
        return _Histogram(values)

    def families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for name, (kind, documentation, values, label) in list(self.metrics.items()):
            if kind == "gauge":
                yield GaugeMetricFamily(name, documentation, value=values[""].value)
            elif kind == "histogram":
                cumulative, buckets = 0.0, []
                for index, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
                    cumulative += values[str(index)].value
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                yield HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=values["sum"].value)
            elif label:
                family = CounterMetricFamily(name, documentation, labels=[label])
                for value, count in sorted(values.items()):
                    family.add_metric([value], count.value)
                yield family
            else:
                yield CounterMetricFamily(name, documentation, value=values[""].value)


class _Value:
    """One value of :class:`_Totals` (``inc`` and ``set``, as prometheus_client's values)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class _Labelled:
    def __init__(self, values: dict[str, _Value]) -> None:
        self._values = values

    def labels(self, value: str) -> _Value:
        return self._values.setdefault(value, _Value())


class _Histogram:
    """The ``_buckets`` and ``_sum`` of a :class:`_Totals` histogram (as the mirror reads prometheus_client's)."""

    def __init__(self, values: dict[str, _Value]) -> None:
        self._buckets = [values.setdefault(str(index), _Value()) for index in range(len(LATENCY_BUCKETS) + 1)]
        self._sum = values.setdefault("sum", _Value())


class _RegistryCollector:
    """A prometheus_client custom collector of one namespace: the middlewares and pipelines registered with its
    registry (held weakly, as in multiprocess mode), read at scrape time through a :class:`_Mirror` into
    :class:`_Totals`: each pipeline or gate counted once however many registered it, and counters that go on across
    a pipeline and gate made anew."""

    def __init__(self, namespace: str) -> None:
        self.totals = _Totals()
        self.mirror = _Mirror(self.totals, namespace)
        self.prefix = f"{namespace}_" if namespace else ""
        self.totals.counter(self.prefix + "lago_errors", _PIPELINE_DOCS["lago_errors"], ("status",))  # shown first
        self.lock = threading.Lock()
        self._failed = False

    def add(self, pipeline: PipelineMetrics | None, middleware: Any) -> None:
        with self.lock:
            if pipeline is not None:
                self.mirror.pipelines.add(pipeline)
            if middleware is not None:
                self.mirror.middlewares.add(middleware)
            self.mirror.sync()

    def renewed(self, middleware: Any) -> None:
        with self.lock:
            self.mirror.renewed(middleware)

    def describe(self) -> list[Any]:
        """Every metric exported now, and every one a middleware, pipeline or gate registered later (or a gate counter
        that first happens later) may add: a registry takes the names once, as this collector is registered, for its
        duplicate check and for ``restricted_registry`` (``/metrics?name[]=...``)."""
        described = _Totals()
        for name, documentation in (*_COUNTERS.values(), *_REQUEST_COUNTERS.values()):
            described.counter(self.prefix + name, documentation)
        for key in _GATE_COUNTERS:
            described.counter(f"{self.prefix}quota_{key}", _counter_documentation(f"quota_{key}"))
        for name in _PIPELINE_GAUGES:
            described.gauge(self.prefix + name, _PIPELINE_DOCS[name])
        for name, documentation in _REQUEST_GAUGES.items():
            described.gauge(self.prefix + name, documentation)
        for state, documentation in _GATE_GAUGES.items():
            described.gauge(f"{self.prefix}quota_{state}", documentation)
        described.histogram(self.prefix + "delivery_seconds", _PIPELINE_DOCS["delivery_seconds"])
        with self.lock:
            for name, metric in self.totals.metrics.items():
                described.metrics.setdefault(name, metric)
            return list(described.families())

    def collect(self) -> Iterator[Any]:
        with self.lock:
            try:
                self.mirror.sync()
            except Exception:  # never the end of a scrape (the app's own metrics with it): the counts read so far
                if not self._failed:
                    self._failed = True
                    logger.exception("Could not read the billing metrics: some are not up to date")
            return iter(list(self.totals.families()))


# ------------------------------------------------------------------------------------ multiprocess mode

#: Seconds between two mirrorings of the counts into prometheus_client's multiprocess files.
_SYNC_INTERVAL = 1.0

#: What a source's counts are keyed by: (metric name without the namespace, label value or bucket).
_Counts = dict[tuple[str, str], float]

#: The mirroring of this process, made by the first registration in multiprocess mode.
_multiprocess: _Multiprocess | None = None
_hooks_installed = False
_warned_late = False


def _mirrored(namespace: str, *, pipeline: PipelineMetrics | None = None, middleware: Any = None) -> bool:
    """In prometheus_client's multiprocess mode, add ``pipeline`` or ``middleware`` to the mirror of
    ``namespace`` and return True; False otherwise (the caller registers a collector as usual)."""
    global _multiprocess, _hooks_installed, _warned_late
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    if not directory:
        return False
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:  # chosen by prometheus_client when imported, before the variable
        if not _warned_late:
            _warned_late = True
            logger.warning(
                "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported, so prometheus_client is not "
                "in multiprocess mode: each process exports its own billing metrics. Set it in the environment "
                "the server starts with."
            )
        return False
    state = _multiprocess
    starting = state is None
    if state is None:
        state = _multiprocess = _Multiprocess(directory)
        if not _hooks_installed:
            _hooks_installed = True
            atexit.register(_at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork_child)
    state.add(namespace, pipeline, middleware)
    if starting:  # after the first sync: this process's own files tell how prometheus_client names them
        state.forget_dead()
    return True


def mirror_renewed(middleware: Any) -> None:
    """Called by ``OrgBillingMiddleware`` when it has made a new pipeline and gate (served again after a shutdown):
    in multiprocess mode, the mirrors it is registered with adopt them at once, so that their counts are mirrored
    even if they go before the next sync. Never on the request path; never touches prometheus_client."""
    state = _multiprocess
    if state is not None:
        state.renewed(middleware)
    for _, collector in list(_registered.values()):
        try:
            collector.renewed(middleware)
        except Exception:  # never the end of the middleware's start
            logger.exception("Could not adopt the renewed billing pipeline's metrics")


def _forget_dead_processes(directory: str) -> None:
    """The live gauges (``livesum`` and the like) of processes that died without a last sync (a killed worker, which
    uvicorn replaces without a hook): dropped as mirroring starts in a process, as gunicorn's ``child_exit`` does.
    POSIX only (elsewhere ``os.kill`` with signal 0 would end the process). Only when prometheus_client names the
    files by pid (see :meth:`_Multiprocess.forget_dead`)."""
    if os.name != "posix":
        return
    from prometheus_client import multiprocess

    mark_process_dead: Callable[[int, str], None] = multiprocess.mark_process_dead  # (not typed there)
    dead: set[int] = set()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        kind, _, pid = name.removesuffix(".db").rpartition("_")
        if not (name.endswith(".db") and kind.startswith("gauge_live") and ascii_digits(pid) and int(pid) > 0):
            continue  # not a live gauge's file, or not named by a pid (a custom process identifier)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.add(int(pid))
        except (OSError, OverflowError):  # PermissionError: it exists (another user's); or no pid at all
            pass
    for number in dead:
        with contextlib.suppress(OSError):  # removed meanwhile by another worker starting
            mark_process_dead(number, directory)


def _at_exit() -> None:
    if _multiprocess is not None:
        _multiprocess.close()


def _before_fork() -> None:
    """Synced and locked across ``fork`` (gunicorn ``--preload``): the child starts from what is mirrored, and no
    sync of the parent's thread is halfway through in it."""
    if _multiprocess is not None:
        _multiprocess.forking = _multiprocess.lock.acquire(timeout=5)
        if _multiprocess.forking:
            _multiprocess.sync_locked()


def _after_fork() -> None:
    if _multiprocess is not None and _multiprocess.forking:
        _multiprocess.forking = False
        _multiprocess.lock.release()


def _after_fork_child() -> None:
    if _multiprocess is not None:
        _multiprocess.forked()


class _Multiprocess:
    """Mirrors the plain-int counts of every namespace's registered middlewares and pipelines into prometheus_client
    metrics backed by its multiprocess files: from a daemon thread every ``_SYNC_INTERVAL`` seconds, and at exit."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.mirrors: dict[str, _Mirror] = {}
        #: Held while syncing (one sync at a time, or a delta would be applied twice) and across ``fork``.
        self.lock = threading.Lock()
        #: prometheus_client metrics by full name, one per process: two objects of one name would each cache the
        #: value of their shared file entry, and overwrite each other's counts.
        self._metrics: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self.forking = False
        #: Whether prometheus_client names this process's files by its pid (its default process identifier): known
        #: once its first sync wrote its gauge file (``None`` until then), inherited by a forked child.
        self.by_pid: bool | None = None

    def add(self, namespace: str, pipeline: PipelineMetrics | None, middleware: Any) -> None:
        with self.lock:
            mirror = self.mirrors.get(namespace)
            if mirror is None:
                mirror = self.mirrors[namespace] = _Mirror(self, namespace)
            if pipeline is not None:
                mirror.pipelines.add(pipeline)
            if middleware is not None:
                mirror.middlewares.add(middleware)
            self.sync_locked()  # its metrics exist from now on, zeros included
            self._start()

    def renewed(self, middleware: Any) -> None:
        with self.lock:
            for mirror in list(self.mirrors.values()):
                try:
                    mirror.renewed(middleware)
                except Exception:  # never the end of the middleware's start
                    if not self._failed:
                        self._failed = True
                        logger.exception("Could not mirror the billing metrics into prometheus_client's files")

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="lago-org-billing-metrics", daemon=True
            )
            self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(_SYNC_INTERVAL):
            self.sync()

    def sync(self, *, final: bool = False) -> None:
        with self.lock:
            self.sync_locked(final=final)

    def sync_locked(self, *, final: bool = False) -> None:
        for mirror in list(self.mirrors.values()):
            try:
                mirror.sync(final=final)
            except Exception:  # never the end of the thread, nor of a registration: logged once
                if not self._failed:
                    self._failed = True
                    logger.exception("Could not mirror the billing metrics into prometheus_client's files")

    def close(self) -> None:
        """Stop the thread and sync a last time (the process ends: its gauges go to 0). Never hangs an exit."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        if self.lock.acquire(timeout=5):
            try:
                self.sync_locked(final=True)
            finally:
                self.lock.release()

    def forked(self) -> None:
        """In the child of a ``fork``: the lock held across it and the thread are the parent's."""
        self.lock = threading.Lock()
        self.forking = False
        self._thread = None
        self.forget_dead()  # a worker forked in place of a killed one (gunicorn --preload)
        if self.mirrors:
            self._start()

    def forget_dead(self) -> None:
        """Drop the live gauges of dead processes (:func:`_forget_dead_processes`), when the files are named by pid. A
        custom process identifier (``values.ValueClass = values.MultiProcessValue(worker_id)``, against files piling
        up) names them by numbers that are no pid here: taken for dead, live workers' files (this process's own
        after a fork included) would be deleted, and their gauges would vanish from every scrape. Left alone then:
        such a setup drops its dead workers' files itself."""
        if self.by_pid is None and os.path.exists(os.path.join(self.directory, f"gauge_livesum_{os.getpid()}.db")):
            self.by_pid = True  # (unknown, nothing dropped, while the first sync has not written this process's file)
        if self.by_pid:
            with contextlib.suppress(Exception):
                _forget_dead_processes(self.directory)

    # prometheus_client metrics, registered with no registry: the MultiProcessCollector reads their files.

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            from prometheus_client import Counter

            metric = self._metrics[name] = Counter(name, documentation, labelnames, registry=None)
        return metric

    def gauge(self, name: str, documentation: str) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            from prometheus_client import Gauge

            metric = Gauge(name, documentation, registry=None, multiprocess_mode="livesum")
            self._metrics[name] = metric
        return metric

    def histogram(self, name: str, documentation: str) -> Any:
        """The ``delivery_seconds`` histogram, mirrored by deltas per bucket (``observe`` takes single values;
        the pipeline counts per bucket, with the same bounds): ``None`` if prometheus_client's ``Histogram`` no
        longer has the per-bucket values this relies on."""
        if name not in self._metrics:
            from prometheus_client import Histogram

            histogram: Any = Histogram(name, documentation, buckets=LATENCY_BUCKETS, registry=None)
            if len(getattr(histogram, "_buckets", ())) != len(LATENCY_BUCKETS) + 1 or not hasattr(histogram, "_sum"):
                logger.warning("This prometheus_client's Histogram cannot be mirrored: %s is not exported", name)
                histogram = None
            self._metrics[name] = histogram
        return self._metrics[name]


class _Source:
    """Something whose counts are mirrored, and the counts mirrored so far. A ``stats`` dict (a middleware's, a
    gate's) is held: it holds nothing back, and one let go of (a gate renewed, a middleware discarded) is read a last
    time, then dropped. Pipeline metrics are held weakly (they hold their pipeline, hence its middleware) and hand
    their last counts over as they go."""

    __slots__ = ("last", "read", "ref")

    def __init__(self, source: Any, read: Callable[[Any], _Counts]) -> None:
        self.ref: Callable[[], Any]
        try:
            self.ref = weakref.ref(source)
        except TypeError:  # a dict (or a gate that cannot be weakly referenced)
            self.ref = functools.partial(_same, source)
        self.read = read
        self.last: _Counts = {}


def _same(value: Any) -> Any:
    return value


#: What the mirror reads of a middleware: (source, how its counts are read, the gate or backend it belongs to).
_Part = tuple[Any, Callable[[Any], _Counts], Any]


def _parts(middleware: Any) -> Iterator[_Part]:
    yield middleware.stats, _request_counts, None
    metrics = getattr(middleware.pipeline, "metrics", None)
    if isinstance(metrics, PipelineMetrics):
        yield metrics, _pipeline_counts, None
    gate = middleware.quota
    for part in (gate, getattr(gate, "backend", None)):
        if part is not None:
            stats = getattr(part, "__dict__", {}).get("stats")
            yield (stats if type(stats) is dict else part), _gate_counts, part  # its own dict, else read through it


class _Mirror:
    """The registered middlewares and pipelines of one namespace (held weakly, as the collectors hold them)."""

    def __init__(self, state: _Multiprocess | _Totals, namespace: str) -> None:
        self.middlewares: weakref.WeakSet[Any] = weakref.WeakSet()
        self.pipelines: weakref.WeakSet[PipelineMetrics] = weakref.WeakSet()
        self._state = state
        self._prefix = f"{namespace}_" if namespace else ""
        #: Sources by id (a dead one's id may be another's by now: checked by identity).
        self._sources: dict[int, _Source] = {}
        #: The source of each pipeline's metrics ever seen, while they live.
        self._adopted: weakref.WeakKeyDictionary[PipelineMetrics, _Source] = weakref.WeakKeyDictionary()
        #: The source of each gate's (or Redis backend's) stats ever seen, by the gate's id, while the gate lives: a
        #: gate given to a middleware that goes, then to another, is counted on from what was mirrored of it. By
        #: identity (a gate of the app's may be unhashable, or equal to another); dead ones dropped at each sync.
        self._gates: dict[int, tuple[weakref.ref[Any], _Source]] = {}
        #: Last counts of pipeline metrics that went since the last sync (appended from ``__del__``: no lock).
        self._handed_over: collections.deque[tuple[_Source, _Counts]] = collections.deque()
        #: Gauge values last written (written again only when they change).
        self._gauges: dict[str, float] = {}

    def sync(self, *, final: bool = False) -> None:
        while self._handed_over:
            self._mirror(*self._handed_over.popleft())
        # By id: a pipeline or gate shared by two middlewares (or registered on its own too) is counted once.
        current: dict[int, _Part] = {id(metrics): (metrics, _pipeline_counts, None) for metrics in list(self.pipelines)}
        for middleware in list(self.middlewares):
            for part in _parts(middleware):
                current[id(part[0])] = part
        self._track(current)
        for key, known in list(self._sources.items()):
            source = known.ref()
            if source is not None:
                self._mirror(known, known.read(source))
            if source is None or key not in current:
                del self._sources[key]
        for key, (ref, _) in list(self._gates.items()):
            if ref() is None:
                del self._gates[key]
        gauges: dict[str, float] = dict.fromkeys((*_PIPELINE_GAUGES, *_REQUEST_GAUGES), 0)
        gate_stats: list[dict[str, float]] = []
        for source, read, _ in current.values():
            if read is _pipeline_counts:
                values = {**source._gauges(), **source._spool_gauges()}
                values.setdefault("queue_depth", values.get("depth", 0))
                for name in _PIPELINE_GAUGES:
                    gauges[name] += values.get(name, 0)
            elif read is _gate_counts:
                gate_stats.append(_stats_of(source))
        for middleware in list(self.middlewares):
            in_flight = getattr(middleware, "_in_flight", 0)
            gauges["requests_in_flight"] += in_flight if type(in_flight) is int else 0
        for state in _GATE_GAUGES:
            states = [stats[state] for stats in gate_stats if state in stats]
            if states or f"quota_{state}" in self._gauges:
                gauges[f"quota_{state}"] = sum(states)
        for name, value in gauges.items():
            value = 0 if final else value  # a process that ends holds no queue, no spool rows, no Redis outage
            if self._gauges.get(name) != value:
                documentation = (
                    _PIPELINE_DOCS.get(name) or _REQUEST_GAUGES.get(name) or _GATE_GAUGES[name.removeprefix("quota_")]
                )
                self._state.gauge(self._prefix + name, documentation).set(value)
                self._gauges[name] = value

    def renewed(self, middleware: Any) -> None:
        """``middleware`` (registered here) made a new pipeline and gate: adopted now, from zero, so that their
        counts are mirrored even if they go before the next sync (read then a last time, or handed over)."""
        if middleware in self.middlewares:
            self._track({id(part[0]): part for part in _parts(middleware)})

    def _track(self, parts: dict[int, _Part]) -> None:
        for key, (source, read, owner) in parts.items():
            known = self._sources.get(key)
            if known is None or known.ref() is not source:
                self._sources[key] = self._adopt(source, read, owner)

    def _adopt(self, source: Any, read: Callable[[Any], _Counts], owner: Any) -> _Source:
        """The source of ``source``: that of pipeline metrics or of a gate's stats seen before (another way, or
        before they left), counted on from what was mirrored; else a new one, nothing mirrored yet."""
        if isinstance(source, PipelineMetrics):
            known = self._adopted.get(source)
            if known is None:
                known = self._adopted[source] = _Source(source, read)
                source._hand_overs.append(functools.partial(self._hand_over, known))
            return known
        if owner is None:
            return _Source(source, read)
        entry = self._gates.get(id(owner))
        if entry is not None and entry[0]() is owner and entry[1].ref() is source:
            return entry[1]
        known = _Source(source, read)
        with contextlib.suppress(TypeError):  # a gate that cannot be weakly referenced: not kept once it leaves
            self._gates[id(owner)] = (weakref.ref(owner), known)
        return known

    def _mirror(self, known: _Source, counts: _Counts) -> None:
        for (name, label), value in counts.items():
            target = self._target(name, label)  # made on first sight: zeros are exported too
            delta = value - known.last.get((name, label), 0)
            if delta > 0 and target is not None:
                target.inc(delta)
            known.last[name, label] = value

    def _hand_over(self, known: _Source, metrics: PipelineMetrics) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit, say
            self._handed_over.append((known, _pipeline_counts(metrics)))

    def _target(self, name: str, label: str) -> Any:
        """The prometheus_client value that the count ``(name, label)`` is mirrored into."""
        full = self._prefix + name
        if name == "delivery_seconds":
            histogram = self._state.histogram(full, _PIPELINE_DOCS[name])
            if histogram is None:
                return None
            return histogram._sum if label == "sum" else histogram._buckets[int(label)]
        if name == "lago_errors":
            return self._state.counter(full, _PIPELINE_DOCS[name], ("status",)).labels(label)
        return self._state.counter(full, _counter_documentation(name))


_COUNTER_DOCS = {name: documentation for name, documentation in (*_COUNTERS.values(), *_REQUEST_COUNTERS.values())}


def _counter_documentation(name: str) -> str:
    return _COUNTER_DOCS.get(name) or f"Quota gate: {name.removeprefix('quota_').replace('_', ' ')}."


# The sources are read from the sync thread while the event loop's thread counts: the dicts are copied first (a
# C-level copy, which a key added meanwhile cannot break), and a value read a moment early is mirrored next time.


def _pipeline_counts(metrics: PipelineMetrics) -> _Counts:
    counts: _Counts = {(name, ""): getattr(metrics, attribute) for attribute, (name, _) in _COUNTERS.items()}
    for status, count in dict(metrics.lago_errors).items():
        counts["lago_errors", status] = count
    for index, count in enumerate(list(metrics.latency_buckets)):
        counts["delivery_seconds", str(index)] = count
    counts["delivery_seconds", "sum"] = metrics.latency_sum
    return counts


def _request_counts(source: dict[str, int]) -> _Counts:
    stats = dict(source)
    return {(name, ""): stats.get(key, 0) for key, (name, _) in _REQUEST_COUNTERS.items()}


#: What a stat's name must be to be exported (``quota_<name>_total``: a valid Prometheus metric name).
_STAT_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _stats_of(gate: Any) -> dict[str, float]:
    """A copy of a gate's stats (``gate`` is its stats dict, or the gate): its numbers only, by valid names (a custom
    gate's ``stats`` may be a method, or hold a text: not exported, rather than a scrape that fails)."""
    stats = gate if type(gate) is dict else getattr(gate, "stats", None)
    if not isinstance(stats, Mapping):
        return {}
    return {
        key: value
        for key, value in dict(stats).items()
        if isinstance(value, int | float) and isinstance(key, str) and _STAT_NAME.fullmatch(key)
    }


def _gate_counts(gate: Any) -> _Counts:
    return {(f"quota_{key}", ""): value for key, value in _stats_of(gate).items() if key not in _GATE_GAUGES}
