"""Background delivery of usage events to Lago: batching, sending, retries, dead letters.

::

    pipeline = EventPipeline(client, spool_path=settings.spool_path)
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        pipeline.submit(event_payload(...))   # sync, O(1), never waits on Lago
        ...
        await pipeline.aclose()                 # flush within shutdown_timeout, leave the rest in the spool

A dispatcher task forms batches of up to ``batch_size`` events (100, Lago's limit) as soon as a batch is
full or the oldest waiting event is ``flush_interval`` old, and hands them to ``concurrency`` worker tasks
that ``POST /events/batch`` over the client's connection pool. The outbox is in memory (bounded) or the
SQLite spool of :mod:`._spool` (durable, group commit).

**Retry policy** (nothing is dropped silently; nothing is retried forever *for a reason of its own*):

* **Lago unreachable, 408/425/502/503/504** (Lago, or the way to it, is down), and **other 4xx but 400, 413 and
  422, and redirects** (401/403/404/405/409...: the configuration, not an event; logged at ERROR once): the batch
  goes back to the outbox and the whole pipeline backs off (exponential, jittered, capped at ``max_backoff``, 60 s).
  This lasts as long as the outage; with the SQLite spool the events wait on disk, with the memory outbox new events
  are refused (counted, logged) once it is full.
* **No answer to a batch of 1 MiB or more** (a proxy before Lago may drop a body over its limit, or its upload outlast
  LAGO_API_TIMEOUT): as a 500 below (split, strikes only in healthy intervals), so an event too large for the way to
  Lago is dead-lettered and cannot hold back the events behind it for good; in an outage nothing is struck, nor when
  no connection could be made (refused, DNS, a process out of file descriptors: no byte of the body was sent).
* **429**: the whole pipeline pauses for ``X-RateLimit-Reset`` (or ``Retry-After``) seconds, kept between
  ``retry_backoff`` and ``max_backoff``; no attempt is counted against the events.
* **500 and other 5xx** (Lago answered, and failed, perhaps because of an event): the batch is split in halves
  (after the backoff), so one event Lago fails on cannot hold back the events queued with it. An event failing
  alone gets a strike, but at most one per "healthy interval" (only when another batch succeeded since its last
  strike), so a plain outage never strikes anyone twice; it goes back to the outbox, or to the dead letters once it
  has ``max_attempts`` strikes. (An event that fails alone while nothing else is sent gets no
  new strike: it is tried again every ``max_backoff`` at most, until other events give Lago a chance to show it is
  up.)
* **422 with every error ``transaction_id: value_already_exist``**: already in Lago (a retry whose first
  attempt was ingested, or a resend after a crash): counted as delivered (``duplicates``).
* **422 naming some events** (Lago rejects the batch atomically): duplicates are counted as delivered, the
  invalid events go to the dead letters with Lago's reason, and the rest is sent again at once.
* **400, 413, or a 422 naming no event**: the batch is split in halves until the culprit is alone; it goes
  to the dead letters with the status and Lago's code. (A 422 ``too_many_events``, a self-hosted Lago taking fewer
  events per batch, also halves the batch size from then on, logged at WARNING.)

Dead letters are kept in memory (the last 10,000) or in the spool's ``dead_letters`` table, logged at ERROR
with Lago's reason, counted in metrics and returned by :meth:`EventPipeline.dead_letters`;
:meth:`EventPipeline.replay_dead_letters` (or ``lago-org-billing dead-letters --replay`` for a spool) sends
them again once the cause is fixed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _checks as checks, _forks
from ._client import LagoClient, connection_never_made
from ._errors import (
    ClosedError,
    ConfigurationError,
    InvalidRequestError,
    LagoAPIError,
    LagoAuthenticationError,
    LagoNotFoundError,
    LagoRateLimitError,
    LagoUnavailableError,
    LagoValidationError,
    is_duplicate_error,
)
from ._events import MAX_BATCH_SIZE
from ._metrics import PipelineMetrics
from ._settings import _names_a_directory, redact_url
from ._spool import (
    _OUT_OF_DESCRIPTORS,
    DeadLetter,
    EventBuildError,
    EventOrBuilder,
    Item,
    MemoryOutbox,
    Outbox,
    SqliteOutbox,
    _out_of_descriptors,
    dumps_event,
    stamp,
)

__all__ = ["DeadLetter", "EventPipeline"]

logger = logging.getLogger("lago_org_billing.delivery")

JSON = dict[str, Any]
_Facts = TypeVar("_Facts")
_OUTAGE_STATUSES = (408, 425, 502, 503, 504)
#: Answers that blame the content of some event of the batch (other 4xx are about the request or the configuration).
_EVENT_AT_FAULT = (400, 413)
#: What ``_post`` raises before any request is made (see ``_deliver_stack``): no ``POST`` to count, nor to time.
_UNSENT = (InvalidRequestError, ClosedError)
#: Bytes of a batch's body from which a failure without an answer (a reset, a timeout) may be the body's own doing: a
#: proxy before Lago that drops a request over its limit instead of answering 413 (nginx's ``client_max_body_size`` is
#: 1 MiB by default), or a body too slow to upload within LAGO_API_TIMEOUT. Such a batch is split as on a 500; an
#: ordinary batch (100 events are some 50 kB) failing so is an outage, and only waited out.
_LARGE_BODY = 1 << 20
#: The most batches in flight at once (``EventPipeline(concurrency=...)``): the client's default pool holds 50
#: connections, and batches past it waited for one (failing as a transient error past ``LAGO_API_TIMEOUT``); each is a
#: worker task, and the spool's window is sized from it. ``10**30`` was taken, and would start that many tasks.
MAX_CONCURRENCY = 50
#: The shortest ``commit_window``: shorter, the spool's task and the dispatcher, waiting a window at a time, spun (a
#: microsecond took a whole CPU core while idle) and each event was its own transaction, fsync'd.
_MIN_COMMIT_WINDOW = 0.001
#: The shortest pause between two builds of the events waiting in the memory outbox (``flush_interval`` when longer):
#: with ``flush_interval=0`` its task woke at every turn of the event loop, a CPU core busy while idle.
_MIN_BUILD_INTERVAL = 0.01
#: The largest ``spool_window``: SQLite's largest integer, the ``LIMIT`` of a load of the backlog (``10**30`` was
#: taken, and the first load raised ``OverflowError``, ending the background delivery).
_MAX_SPOOL_WINDOW = 2**63 - 1


class EventPipeline:
    """Delivers the events handed to :meth:`submit` to Lago in the background (see the module docstring).

    **Parameters:**

    * **client** - the :class:`LagoClient` whose connection pool sends the batches (one attempt per call: the
      retries are the pipeline's own, below; errors map as in the client).
    * **spool_path** - SQLite file of the durable spool (``LAGO_SPOOL_PATH``); ``None``: in memory.
    * **memory_capacity** - events the memory outbox holds (with the spool: events waiting for a commit).
    * **batch_size** - events per ``POST /events/batch`` (1 to 100).
    * **flush_interval** - seconds the oldest event may wait for a batch to fill.
    * **concurrency** - batches in flight at once (1 to ``MAX_CONCURRENCY``, 50: the client's default pool).
    * **commit_window** - seconds between group commits of the spool (an event is durable within it; at least
      0.001).
    * **shutdown_timeout** - seconds :meth:`aclose` spends delivering what is left.
    * **max_attempts** - 500-class strikes before an event is isolated and dead-lettered.
    * **max_backoff** - cap of the pause after transient failures (seconds).
    * **retry_backoff** - first pause after a transient failure (default: the client's ``retry_backoff``).
    * **metrics** - a :class:`PipelineMetrics` (e.g. registered with Prometheus); one is made if omitted.
    * **spool_window** - rows of the spool held in memory at a time, waiting in the window or in flight (default
      ``max(8000, 16 * batch_size * concurrency)`` plus the ``concurrency + 1`` batches that may be in flight:
      8,500 rows, a few MB).
    """

    def __init__(
        self,
        client: LagoClient,
        *,
        spool_path: str | None = None,
        memory_capacity: int = 100_000,
        batch_size: int = MAX_BATCH_SIZE,
        flush_interval: float = 0.2,
        concurrency: int = 4,
        commit_window: float = 0.05,
        shutdown_timeout: float = 5.0,
        max_attempts: int = 10,
        max_backoff: float = 60.0,
        retry_backoff: float | None = None,
        metrics: PipelineMetrics | None = None,
        spool_window: int | None = None,
    ) -> None:
        _check_pipeline_arguments(
            client, memory_capacity, batch_size, flush_interval, concurrency, commit_window, shutdown_timeout,
            max_attempts, max_backoff, retry_backoff, metrics, spool_window,
        )  # fmt: skip
        # kept as checked: an int or a float, whatever real number was given (numpy's int64 reached SQLite's
        # LIMIT ?, which cannot bind it: the spool's backlog was never loaded)
        batch_size, memory_capacity, concurrency, max_attempts = (
            int(batch_size), int(memory_capacity), int(concurrency), int(max_attempts)
        )  # fmt: skip
        spool_window = int(spool_window) if spool_window is not None else None
        flush_interval, commit_window = float(flush_interval), float(commit_window)
        shutdown_timeout, max_backoff = float(shutdown_timeout), float(max_backoff)
        retry_backoff = float(retry_backoff) if retry_backoff is not None else None
        if spool_path is not None and not isinstance(spool_path, (str, os.PathLike)):
            raise ConfigurationError(
                f"EventPipeline(spool_path=...) must be a file path (a str or a pathlib.Path), got "
                f"{type(spool_path).__name__}."
            )
        if spool_path and _names_a_directory(os.fsdecode(spool_path)):
            raise ConfigurationError(
                f"EventPipeline(spool_path={spool_path!r}) ends with a separator: it names a directory, and the "
                "spool is a SQLite file (SQLite would make a file of the directory's name). Name the spool's file in "
                "it, e.g. DIR/spool.db."
            )
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ConfigurationError(f"batch_size must be from 1 to {MAX_BATCH_SIZE} (Lago's limit), got {batch_size}")
        if concurrency < 1 or memory_capacity < 1 or max_attempts < 1:
            raise ConfigurationError("concurrency, memory_capacity and max_attempts must be >= 1")
        if flush_interval < 0 or commit_window <= 0 or shutdown_timeout < 0 or max_backoff <= 0:
            raise ConfigurationError("flush_interval, shutdown_timeout must be >= 0; commit_window, max_backoff > 0")
        self.client = client
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.concurrency = concurrency
        self.commit_window = commit_window
        self.shutdown_timeout = shutdown_timeout
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        self.retry_backoff = retry_backoff if retry_backoff is not None else client.settings.retry_backoff
        self.metrics = metrics if metrics is not None else PipelineMetrics()
        self.metrics.bind_gauges(self._gauges)
        self.outbox: Outbox
        if spool_path:
            # (the rows in flight count against the window: room for them on top. A larger window than the 2,000 rows
            # it was: a load begins once the window has drained to half, and with only one load at a time (they are
            # no longer made twice at once) a 1,000,000-row backlog drained in 7.5-8.7 s, against 5.5 s before and
            # 4.7 s with this one: benchmarks/delivery.py)
            window = spool_window or max(8_000, 16 * batch_size * concurrency) + batch_size * (concurrency + 1)
            self.outbox = SqliteOutbox(spool_path, capacity=memory_capacity, window=window)
        else:
            self.outbox = MemoryOutbox(memory_capacity)
        self.outbox.on_ready = self._notify
        self.outbox.on_dead_written = self._dead_written
        self._sleep = anyio.sleep  # tests replace it to observe the pauses
        self._gate_scopes: set[anyio.CancelScope] = set()  # the pauses being waited out (lifted at shutdown)
        self._closed = False
        self._running = False
        self._ran = False
        self._loop_thread: int | None = None
        #: Runs a function soon on the running loop's thread, from any thread (see :meth:`_notify`).
        self._call_soon: Callable[[Callable[[], object]], object] | None = None
        self._wakeup: anyio.Event | None = None
        self._kick: anyio.Event | None = None
        self._progress: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        #: Batches the dispatcher handed to the workers, by id, until a worker starts on one (see _dispatcher).
        self._handed: dict[int, list[Item]] = {}
        self._flushing = 0
        self._not_before = 0.0
        self._failures = 0  # consecutive transient failures (backoff exponent)
        self._successes = 0  # batches accepted so far (the "healthy interval" of strikes)
        self._limited = 0  # consecutive 429 answers (logged when they start, then every 20th)
        self._dead_counts: dict[tuple[int | None, str | None], int] = {}  # dead letters by (status, code), for logs
        self._drop_burst = 0
        self._config_error_logged = False
        self._exit_stack: anyio.abc.TaskGroup | None = None
        _forks.track(self)

    def _forked(self) -> None:
        """In the child of a ``fork`` made while this pipeline ran (``multiprocessing`` from a served app): its run is
        the parent's, on the parent's loop, which the child does not have. The child's pipeline is one not running,
        which the child may run on a loop of its own (it answered "already running", and the events the child had
        queued were never sent); the batches handed out in the parent are the parent's to deliver. (Its outbox starts
        over by itself: see ``_forked`` there.)"""
        if not self._running:
            return
        _forks.left_by_parent.append((self._handed, self._scope, self._exit_stack))
        self._running = False
        self._loop_thread = self._call_soon = None
        self._wakeup = self._kick = self._progress = self._stopped = None
        self._scope = self._exit_stack = None
        self._handed = {}
        self._flushing = 0

    # ------------------------------------------------------------------ request path

    def submit(self, event: EventOrBuilder) -> bool:
        """Queue ``event`` for delivery: sync, O(1), no I/O. The pipeline owns the dict from now on.

        ``event`` may also be a function returning the event (or its JSON text): the pipeline calls it once, in
        the background, when it stores or batches the event (if it raises, the event goes to the dead letters).

        A full outbox or a closed pipeline never raises: it counts the event in ``dropped``, logs an ERROR (once per
        burst), and the answer is False (True: accepted). Something that is neither an event (a mapping) nor a
        function raises :class:`InvalidRequestError` (it could only be dead-lettered)."""
        if type(event) is not dict:
            if isinstance(event, Mapping):  # (a read-only mapping, a ChainMap: taken for a builder, then dead-lettered)
                event = dict(event)
            elif not callable(event):  # (it would be dead-lettered in the background)
                raise InvalidRequestError(
                    f"EventPipeline.submit() takes an event (a dict such as {{'transaction_id': ..., "
                    f"'external_subscription_id': ..., 'code': ..., 'properties': {{...}}}}) or a function returning "
                    f"one, got {type(event).__name__}: nothing was queued."
                )
        if type(event) is dict:
            stamp(event)
        self.metrics.recorded += 1
        if not self._closed and self.outbox.put(event):
            if self._drop_burst:
                self._accepted_again()
            return True
        self._refused(event.get("transaction_id") if isinstance(event, Mapping) else event)
        return False

    def lane(self, build: Callable[[_Facts], JSON | str]) -> Callable[[_Facts], bool]:
        """A cheaper :meth:`submit` for events that one function builds: ``submit_facts = pipeline.lane(build)``,
        then ``submit_facts(facts)`` per event (False when it was dropped: the outbox is full or the pipeline closed),
        and ``build(facts)`` returns the event (or its JSON text) later, in the background, batched. The memory
        outbox keeps nothing but ``facts`` per waiting event (best a tuple of plain values), which keeps the request
        path light. Same guarantees as :meth:`submit`."""
        checks.function("EventPipeline.lane(build)", build, what="a function (facts) -> event (or its JSON text)")
        put = self.outbox.lane(build)
        metrics = self.metrics

        def submit_facts(facts: _Facts) -> bool:
            metrics.recorded += 1
            if not self._closed and put(facts):
                if self._drop_burst:
                    self._accepted_again()
                return True
            self._refused(f"built by {getattr(build, '__qualname__', build)}")
            return False

        return submit_facts

    def _accepted_again(self) -> None:
        logger.warning("Billing events are accepted again after %d were dropped", self._drop_burst)
        self._drop_burst = 0

    def _refused(self, what: object) -> None:
        self.metrics.dropped += 1
        if not self._drop_burst:
            if self._closed:  # (not Lago's fault: events recorded once the app shut its billing down)
                logger.error(
                    "Dropping billing event %s: the pipeline is closed (the app's lifespan ended, or the pipeline was "
                    "closed). Record events while the app runs: finish requests and background work before shutdown.",
                    what,
                )
            elif self.outbox.durable:  # (the spool holds what Lago has not taken: full with what it has not written)
                logger.error(
                    "Dropping billing event %s: the outbox is full (%d events wait for the event spool's next commit, "
                    "or are sent from memory while it cannot be written). Its writes fail or stall: see the spool's "
                    "errors logged, and its volume. For more room, give the middleware "
                    "pipeline=EventPipeline(client, spool_path=..., memory_capacity=...).",
                    what,
                    self.outbox.capacity,
                )
            else:
                logger.error(
                    "Dropping billing event %s: the outbox is full (%d events). Lago is slow or down; set "
                    "LAGO_SPOOL_PATH for a durable spool (or give the middleware "
                    "pipeline=EventPipeline(client, memory_capacity=...) with more room).",
                    what,
                    self.outbox.capacity,
                )
        self._drop_burst += 1

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the background tasks until :meth:`aclose` or cancellation. ``await tg.start(pipeline.run)``."""
        if self._running:
            raise ClosedError("This EventPipeline is already running.")
        if self._closed:
            raise ClosedError("This EventPipeline is closed; create a new one.")
        if self._ran and isinstance(self.outbox, SqliteOutbox):  # after a cancelled run: its batches were cut short
            self.outbox.rewind()
        self._running = self._ran = True
        self._loop_thread = threading.get_ident()
        self._call_soon = _threadsafe_caller()
        self._wakeup, self._kick, self._progress = anyio.Event(), anyio.Event(), anyio.Event()
        self._stopped = anyio.Event()
        # (made before the outbox opens: an aclose() while a spool opens, in a worker thread, stops the run too)
        self._scope = anyio.CancelScope()
        try:
            with self._scope:
                await self.outbox.open()
                send, receive = anyio.create_memory_object_stream[list[Item]](0)
                async with anyio.create_task_group() as tg:
                    if self.outbox.durable:
                        tg.start_soon(self._spool_task)
                    elif isinstance(self.outbox, MemoryOutbox):
                        tg.start_soon(self._build_task, self.outbox)
                    for _ in range(self.concurrency):
                        tg.start_soon(self._worker, receive.clone())
                    receive.close()
                    tg.start_soon(self._dispatcher, send)
                    task_status.started()
        finally:
            self._running = False
            with anyio.CancelScope(shield=True):
                for batch in self._handed.values():  # handed over, never started on: not sent, back in the outbox
                    self.outbox.release(batch)
                self._handed.clear()
                if not self._closed and isinstance(self.outbox, MemoryOutbox) and self.outbox.available():
                    await self._last_chance()
                await self._finish()
                if not self._closed:  # cancelled: its loop may be ending, and a next run be on another one
                    await close_idle_quietly(self.client)
            self._stopped.set()

    async def _last_chance(self) -> None:
        """Cancelled without :meth:`aclose` (an app mounted in another gets no lifespan, and its loop ends with the
        process): what memory holds is delivered now, within ``shutdown_timeout``, not lost with the process."""
        outbox = self.outbox
        failed = 0
        with anyio.move_on_after(self.shutdown_timeout):
            while outbox.available() and failed < 2:  # a hiccup is retried once, an outage not waited out
                before = outbox.available()
                await self._deliver(outbox.take(self.batch_size))
                failed = failed + 1 if outbox.available() >= before else 0
        if outbox.available():
            logger.warning(
                "Billing delivery was stopped without a shutdown (no ASGI lifespan: call the middleware's aclose() "
                "from the serving app's lifespan) and %d events could not be delivered then (Lago failed, or took "
                "over %.1f s)",
                outbox.available(),
                self.shutdown_timeout,
            )

    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - the pipeline's API
        """Deliver everything submitted so far; True when the outbox is empty (False on timeout).

        Needs :meth:`run` to be running. Transient failures are retried with the usual pauses meanwhile.
        ``timeout``: seconds >= 0, ``None`` or ``math.inf`` for no limit (anything else: :class:`ConfigurationError`).
        """
        timeout = checks.timeout("EventPipeline.flush(timeout)", timeout)
        if not self._running:
            raise ClosedError("EventPipeline.flush() needs the pipeline running: await tg.start(pipeline.run)")
        self._flushing += 1
        try:
            with anyio.move_on_after(timeout):
                while self.outbox.unresolved():
                    progress = self._progress
                    if progress is None or progress.is_set():  # one event for every flush() waiting at once
                        progress = self._progress = anyio.Event()
                    self._poke()
                    await progress.wait()
        finally:
            self._flushing -= 1
        with anyio.CancelScope(shield=True):
            await self.outbox.commit()
        return self.outbox.unresolved() == 0

    async def commit(self) -> None:
        """Write submitted events to the spool now (no-op in memory). Tests and tools use it."""
        if not self._running:
            await self.outbox.open()
        await self.outbox.commit()

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the pipeline's API
        """Stop accepting events, deliver what is left within ``timeout`` (default ``shutdown_timeout``),
        stop the background tasks and close the spool. Undelivered events stay in the spool (memory, or a spool
        that cannot be written: lost, counted in ``lost_at_shutdown`` and logged). ``timeout``: seconds >= 0 or
        ``math.inf`` (anything else: :class:`ConfigurationError`, raised before anything is closed)."""
        timeout = checks.timeout("EventPipeline.aclose(timeout)", timeout)
        if self._closed and not self._running:
            return
        self._closed = True
        self.outbox.closing()
        deadline = self.shutdown_timeout if timeout is None else timeout
        if self._running:
            # One try now, within a deadline: a pause after failures (up to max_backoff, 60 s) outlasted it without a
            # request to Lago, and the memory outbox's events were lost though Lago had come back. (None asked for:
            # nothing is sent.)
            if deadline > 0:
                self._not_before = 0.0
                for scope in list(self._gate_scopes):
                    scope.cancel()
            delivered = await self.flush(deadline)
            if not delivered and not self.outbox.durable:
                logger.warning(
                    "Shutdown: %d billing events not delivered within %.1f s", self.outbox.unresolved(), deadline
                )
            assert self._scope is not None and self._stopped is not None
            self._scope.cancel()
            await self._stopped.wait()
            # said once the spool is closed, of what it does hold (what it could not write was counted lost)
            if not delivered and self.outbox.durable and self.outbox.unresolved():
                logger.warning(
                    "Shutdown: %d billing events not delivered within %.1f s: they stay in the spool %s",
                    self.outbox.unresolved(),
                    deadline,
                    self.spool_file,
                )
        else:
            await self._finish()

    async def __aenter__(self) -> EventPipeline:
        self._exit_stack = anyio.create_task_group()
        await self._exit_stack.__aenter__()
        await self._exit_stack.start(self.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            assert self._exit_stack is not None
            await self._exit_stack.__aexit__(exc_type, exc_value, traceback)

    async def _finish(self) -> None:
        outbox = self.outbox
        if isinstance(outbox, MemoryOutbox):
            if not self._closed:  # cancelled: kept for the next run()
                if outbox.unresolved():
                    logger.warning(
                        "Billing delivery stopped with %d events in memory: they wait for the pipeline to run again "
                        "(and are lost if the process ends first)",
                        outbox.unresolved(),
                    )
                return
            lost = outbox.discard()
            if lost:
                self.metrics.lost_at_shutdown += lost
                logger.error(
                    "Shutdown: %d billing events in memory were not delivered and are lost; "
                    "set LAGO_SPOOL_PATH to keep them across restarts.",
                    lost,
                )
        elif self._closed:
            try:
                lost = await outbox.close()
            except ConfigurationError:  # a path that is no spool, never opened: what was submitted is lost, counted
                self.metrics.lost_at_shutdown += outbox.lost_at_close if isinstance(outbox, SqliteOutbox) else 0
                raise
            if lost:
                self.metrics.lost_at_shutdown += lost
                # (the errors above say what to do: not only a full or read-only volume, but a spool never opened
                # for want of file descriptors, whose slot file has no name yet)
                logger.error(
                    "Shutdown: %d billing events were neither delivered nor written to the spool %s (it cannot be "
                    "written: the errors above say why, and what to do) and are lost.",
                    lost,
                    self.spool_file or (outbox.file.base_path if isinstance(outbox, SqliteOutbox) else None),
                )
        else:  # cancelled without aclose: make everything durable, keep the file open for a new run()
            await outbox.commit()

    # ------------------------------------------------------------------ introspection

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (a closed pipeline cannot run again)."""
        return self._closed

    @property
    def stats(self) -> dict[str, int]:
        """Counters and depths as plain ints (see :mod:`._metrics`)."""
        return self.metrics.snapshot()

    def _gauges(self) -> dict[str, int]:
        return {"depth": self.outbox.unresolved(), "spool_depth": self.outbox.spool_depth()}

    def dead_letters(self) -> list[DeadLetter]:
        """Events Lago rejected for good, with Lago's reason (memory list or the spool's table)."""
        return self.outbox.dead_letters()

    async def replay_dead_letters(self, ids: Iterable[int | None] | None = None) -> int:
        """Send dead letters again, once what made Lago reject them is fixed (a missing subscription, a metric
        created since...): those numbered ``ids`` (``DeadLetter.id``; all when ``None``) leave the dead letters and
        are delivered like new events, with their own ``transaction_id`` and ``timestamp``, so one Lago did take
        after all is counted as a duplicate, not billed twice. One rejected again comes back with the new reason.

        Letters without a whole event (it could not be built or serialised) stay where they are. With the SQLite
        spool a letter is deleted in the same transaction that spools its event again: a crash loses neither.
        Returns how many were put back (fewer when the outbox is full: replay the rest later). With a spool shared
        by several workers, each replays the letters of its own slot file: ``lago-org-billing dead-letters --replay``
        covers them all."""
        if self._closed:
            raise ClosedError("This EventPipeline is closed; replay dead letters with a running one.")
        count = await self.outbox.replay_dead(None if ids is None else {i for i in ids if i is not None})
        if count:
            self.metrics.replayed += count
            logger.info("%d dead-lettered billing events put back for delivery", count)
            self._poke()
        return count

    @property
    def spool_file(self) -> str | None:
        """The SQLite file this process owns, or None in memory."""
        return self.outbox.path if isinstance(self.outbox, SqliteOutbox) else None

    # ------------------------------------------------------------------ background tasks

    def _notify(self) -> None:
        wakeup = self._wakeup
        if wakeup is None:
            return
        if threading.get_ident() == self._loop_thread:
            wakeup.set()
            return
        # Another thread (a sync endpoint's record_usage_nowait, run in a thread pool): an anyio Event is not
        # thread-safe, and the dispatcher, idle with nothing to send, has no timeout to find the event by. The
        # loop's thread sets it, soon.
        call_soon = self._call_soon
        if call_soon is not None:
            try:
                call_soon(wakeup.set)
            except Exception:  # the loop has ended: the run is over, what it left waits for the next run or aclose
                logger.debug("Could not wake the pipeline's loop from another thread", exc_info=True)

    def _poke(self) -> None:
        for event in (self._wakeup, self._kick):
            if event is not None:
                event.set()

    def _dead_written(self, count: int) -> None:
        """The spool dead-lettered ``count`` events as it wrote them (they could not be built or serialised), in
        whichever commit: the spool task's, :meth:`commit`, :meth:`flush`'s, a cancelled run's or the last one."""
        self.metrics.dead_lettered += count
        self._progressed()

    def _progressed(self) -> None:
        if self._progress is not None:
            self._progress.set()
        if self._kick is not None and getattr(self.outbox, "needs_commit", False):
            # the loading waits for these resolutions to be written: the spool task commits now (a commit running
            # meanwhile took only those before it, and its own load would otherwise wait out the commit window)
            self._kick.set()

    async def _build_task(self, outbox: MemoryOutbox) -> None:
        """Build lazily submitted events within ``flush_interval`` (or :data:`_MIN_BUILD_INTERVAL`), whether or not
        Lago takes them now."""
        # (a flush_interval of 0, "send at once", made this task wake at every turn of the loop: a whole CPU core
        # taken while idle. A batch sent at once builds its events itself; this is for those waiting meanwhile)
        interval = max(self.flush_interval, _MIN_BUILD_INTERVAL)
        while True:
            await anyio.sleep(interval)
            outbox.build_pending()

    async def _spool_task(self) -> None:
        outbox = self.outbox
        kick = self._kick = anyio.Event()
        while True:
            with anyio.move_on_after(self.commit_window):
                await kick.wait()
            # a new request before this commit: one made while it writes is for the rows resolved meanwhile (made next)
            kick = self._kick = anyio.Event()
            await outbox.commit()
            await outbox.fill()

    async def _dispatcher(self, send: MemoryObjectSendStream[list[Item]]) -> None:
        outbox = self.outbox
        async with send:
            while True:
                await self._wait_gate()
                if outbox.available() < self.batch_size:
                    await outbox.fill()  # the spool loads more rows when its window runs low
                    if getattr(outbox, "needs_commit", False) and self._kick is not None:
                        self._kick.set()  # (it waits for a commit of the rows resolved: made now)
                available = outbox.available()
                if available >= self.batch_size or (
                    available and (self._flushing or time.monotonic() - outbox.ready_since >= self.flush_interval)
                ):
                    batch = outbox.take(self.batch_size)
                    # Held here until a worker starts on it: cancelled with the batch in hand, or handed to a worker
                    # cancelled before it ran (asyncio.run() ending the loop cancels every task at once, and the item
                    # a memory stream gave a waiting receiver is dropped with its CancelledError), the run's end puts
                    # it back in the outbox (see run).
                    self._handed[id(batch)] = batch
                    await send.send(batch)
                    continue
                wakeup = self._wakeup = anyio.Event()
                if not available and outbox.available():
                    # an event submitted from a thread meanwhile woke the event before this one (the outbox wakes the
                    # dispatcher only as it stops being empty): waited on, nothing would ever set this one
                    continue
                if available:
                    timeout: float | None = self.flush_interval - (time.monotonic() - outbox.ready_since)
                else:
                    timeout = None if not outbox.durable else self.commit_window * 4
                with anyio.move_on_after(timeout):
                    await wakeup.wait()

    async def _wait_gate(self) -> None:
        while True:
            delay = self._not_before - time.monotonic()
            if delay <= 0:
                return
            with anyio.CancelScope() as scope:  # (cancelled by aclose(): see there)
                self._gate_scopes.add(scope)
                try:
                    await self._sleep(delay)
                finally:
                    self._gate_scopes.discard(scope)

    def _pause(self, seconds: float) -> None:
        self._not_before = max(self._not_before, time.monotonic() + seconds)

    def _backoff(self) -> float:
        self._failures += 1
        ceiling = min(self.max_backoff, self.retry_backoff * 2 ** min(self._failures - 1, 30))
        delay = random.uniform(ceiling / 2, ceiling)
        self._pause(delay)
        return delay

    async def _worker(self, receive: MemoryObjectReceiveStream[list[Item]]) -> None:
        async with receive:
            async for batch in receive:
                if self._handed.pop(id(batch), None) is not None:  # (else the run's end took it back: not sent)
                    await self._deliver(batch)

    async def _deliver(self, batch: list[Item]) -> None:
        stack = [batch]
        try:
            await self._deliver_stack(stack)
        except BaseException:  # cancelled mid-batch (the run is stopped): what was not sent goes back to the outbox
            if stack:
                self.outbox.release([item for part in reversed(stack) for item in part])
            raise

    async def _deliver_stack(self, stack: list[list[Item]]) -> None:
        outbox, metrics = self.outbox, self.metrics
        while stack:
            items = stack.pop()
            if len(items) > self.batch_size:  # (made before Lago was found to take fewer: see _fewer_per_batch)
                size = self.batch_size
                stack.extend(items[start : start + size] for start in reversed(range(0, len(items), size)))
                items = stack.pop()
            started: float | None = None
            try:
                await self._wait_gate()
                started = time.monotonic()
                failure = await self._attempt(items)
            except BaseException:  # cancelled: this batch goes back to the outbox with the rest
                if started is not None:  # (cut short in its POST: a call made, with no answer and no duration)
                    metrics.batches_sent += 1
                stack.append(items)
                raise
            # Every call, failed ones too (timeouts show); not an attempt that made none: an event JSON cannot carry
            # (the body is built first) or a closed client, which raise before any request. Counted, they showed
            # batches_sent_total and delivery_seconds_count growing, with near-zero durations, while nothing was sent.
            if not isinstance(failure, _UNSENT):
                metrics.batches_sent += 1
                metrics.observe_latency(time.monotonic() - started)
            try:
                if failure is not None:
                    raise failure
            except LagoValidationError as exc:
                if not exc.lago_envelope:  # a proxy's or a gateway's 422 page: no event is at fault (all were struck)
                    metrics.lago_error(exc.status)
                    if self._server_failure(items, exc, stack):
                        continue
                    return
                stack.extend(self._rejected(items, exc))
            except LagoRateLimitError as exc:
                metrics.lago_error(exc.status)
                metrics.rate_limited += 1
                wait = exc.retry_after if exc.retry_after is not None else self._backoff()
                # within reason: a proxy's epoch timestamp or "inf" must not pause delivery for years, nor 0 spin
                wait = min(max(wait, self.retry_backoff), self.max_backoff) if math.isfinite(wait) else self.max_backoff
                self._pause(wait)
                self._limited += 1
                _every_20th(self._limited)(
                    "Lago rate limit (429, %d in a row): delivery paused for %.2f s", self._limited, wait
                )
                self._retry(items, stack)
                return
            except (LagoUnavailableError, LagoAuthenticationError, LagoNotFoundError) as exc:
                metrics.lago_error(exc.status)
                if self._server_failure(items, exc, stack):
                    continue
                return
            except LagoAPIError as exc:  # other answers
                metrics.lago_error(exc.status)
                # the content of some event: split until it is alone (not a 400 of a proxy's or a gateway's: Lago's
                # is its JSON envelope, and an HTTP request to an HTTPS port would dead-letter every event)
                if exc.status in _EVENT_AT_FAULT and (exc.status != 400 or exc.lago_envelope):
                    self._isolate(items, exc, stack)
                elif self._server_failure(items, exc, stack):  # 405, 408, 409...: not one event's doing
                    continue
                else:
                    return
            except InvalidRequestError:
                self._invalid(items, stack)
            except Exception:
                logger.exception("Unexpected error while sending billing events; retrying later")
                self._backoff()
                self._retry(items, stack)
                return
            else:
                metrics.delivered += len(items)
                self._succeeded()
                outbox.resolve(items)
                self._progressed()

    async def _attempt(self, items: list[Item]) -> Exception | None:
        """One ``POST``: the error it raised (handled by the caller), or None."""
        try:
            await self._post(items)
        except Exception as exc:
            return exc
        return None

    def _succeeded(self) -> None:
        self._successes += 1
        self._limited = 0
        if self._failures or self._config_error_logged:
            logger.info("Lago accepts billing events again")
        self._failures = 0
        self._config_error_logged = False

    def _retry(self, items: list[Item], stack: list[list[Item]]) -> None:
        """Put ``items`` and the pending sub-batches back in the outbox for a later attempt."""
        everything = [item for part in reversed(stack) for item in part] if stack else []
        everything = items + everything
        stack.clear()
        self.metrics.retries += 1
        self.outbox.release(everything)

    def _dead(self, item: Item, reason: str, status: int | None, code: str | None) -> None:
        try:
            event = item.payload()
        except ValueError:  # an event whose builder failed: keep what is known of it
            event = dict(item.event) if isinstance(item.event, dict) else {"error": reason}
        letter = DeadLetter(event=event, reason=reason, status=status, code=code)
        self.outbox.dead(item, letter)
        self.metrics.dead_lettered += 1
        # said for the first event of a kind (status and code), then every 100th: a proxy answering 400 to every
        # event must not write a line per event
        kind = (status, code)
        count = self._dead_counts[kind] = self._dead_counts.get(kind, 0) + 1
        if count == 1 or count % 100 == 0:
            logger.error(
                "Lago rejected billing event %s for good (%s): %s; kept in the dead letters (%d like it so far)"
                if status is not None
                else "Billing event %s cannot be sent (%s): %s; kept in the dead letters (%d like it so far)",
                event.get("transaction_id", "(not built)"),
                status if status is not None else code,
                reason,
                count,
            )
        self._progressed()

    def _server_failure(self, items: list[Item], exc: LagoAPIError, stack: list[list[Item]]) -> bool:
        """Network error, 5xx, 401/403/404. True when the caller should go on with ``stack``."""
        status = exc.status
        # (a connection never made wrote nothing of the body: a process out of file descriptors, refused, DNS)
        size = _body_size(items) if status is None and not connection_never_made(exc) else 0
        if size >= _LARGE_BODY:
            # No answer to a large body: perhaps the way to Lago refuses it (a reset, an upload cut off at the timeout)
            # rather than an outage. Split as on a 500, so one event too large for it cannot hold back every event
            # behind it for good; alone, it is struck once per healthy interval (in an outage, never).
            delay = self._backoff()
            _every_20th(self._failures)(
                "Lago (or a proxy before it) did not answer a batch of %d events (%d bytes): %s; it is retried (in "
                "%.2f s) and split, in case an event is too large for the way to Lago (dead-lettered after %d "
                "failures like this while other events get through)",
                len(items),
                size,
                str(exc).rstrip("."),
                delay,
                self.max_attempts,
            )
            reason = (
                f"no answer to this {size}-byte event {self.max_attempts} times while other events were delivered: too "
                "large for Lago or a proxy before it (raise its request body limit, e.g. nginx's client_max_body_size, "
                f"or LAGO_API_TIMEOUT, then replay it): {exc}"
            )
            self._strike_or_split(items, stack, reason, None, "request_too_large")
            return True
        if status in _OUTAGE_STATUSES or status is None:
            pass  # Lago (or the way to it) is down: wait and retry, no event is at fault
        elif isinstance(exc, (LagoAuthenticationError, LagoNotFoundError)) or status < 500:
            if not self._config_error_logged:
                logger.error("Lago refuses billing events (%s): %s Events are kept and retried.", status, exc)
                self._config_error_logged = True
        else:
            # Lago answered and failed. A batch is split (below) until its events are alone; an event failing alone
            # gets a strike, at most one per healthy interval, so events that only shared a batch with the culprit
            # (or met an intermittent 500) are not struck.
            delay = self._backoff()
            _every_20th(self._failures)(  # (recovery is logged at INFO)
                "Lago failed on billing events (%s): %s; events are retried (in %.2f s) and split to find one it "
                "cannot take (dead-lettered after %d answers like this); %d events wait",
                status,
                str(exc).rstrip("."),
                delay,
                self.max_attempts,
                self.outbox.unresolved(),
            )
            self._strike_or_split(
                items, stack, f"Lago answered {status} {self.max_attempts} times: {exc}", status, exc.code
            )
            return True
        delay = self._backoff()
        hint = " (check LAGO_API_URL if this lasts)" if status is None else ""
        if status is None and _out_of_descriptors(exc):
            hint = f": {_OUT_OF_DESCRIPTORS}"
        _every_20th(self._failures)(  # (recovery is logged at INFO)
            "Lago delivery to %s failed: %s; events are kept and retried in %.2f s%s",
            redact_url(self.client.settings.api_url),
            str(exc).rstrip("."),
            delay,
            hint,
        )
        self._retry(items, stack)
        return False

    def _strike_or_split(
        self, items: list[Item], stack: list[list[Item]], reason: str, status: int | None, code: str | None
    ) -> None:
        """A failure that may be one event's doing (after the backoff it set): a batch is split, an event alone gets a
        strike (at most one per healthy interval) and goes back to the outbox, or to the dead letters with ``reason``
        once it has ``max_attempts`` strikes."""
        if len(items) > 1:
            # One event Lago fails on would fail its batch and every event queued behind it, and with no batch
            # getting through its strikes would never add up: split, so the others are delivered (a healthy
            # interval) and the culprit ends up alone.
            half = len(items) // 2
            stack.extend([items[half:], items[:half]])
            return
        item = items[0]
        if item.mark != self._successes:
            item.mark = self._successes
            item.attempts += 1
        if item.attempts >= self.max_attempts:
            self._dead(item, reason, status, code)
        else:  # back to the outbox for a later attempt; the rest of the batch goes on meanwhile
            self.metrics.retries += 1
            self.outbox.release(items)

    def _isolate(self, items: list[Item], exc: LagoAPIError, stack: list[list[Item]]) -> None:
        """A rejection that names no event: split until the culprit is alone."""
        if len(items) == 1:
            self._dead(items[0], _reason(exc), exc.status, exc.code)
            return
        half = len(items) // 2
        stack.extend([items[half:], items[:half]])

    def _rejected(self, items: list[Item], exc: LagoValidationError) -> list[list[Item]]:
        """Handle a 422 (Lago rejects a batch atomically); return the sub-batches still to send."""
        self._succeeded()  # Lago answered: it is up
        failed = exc.failed_indexes()
        if len(items) == 1 and not failed and is_duplicate_error(exc.details):
            self._duplicates(items)  # (a resend of what Lago has: not an error of Lago's to count)
            return []
        if not failed or not all(is_duplicate_error(error) for error in failed.values()):
            self.metrics.lago_error(exc.status)
        if not failed or any(index >= len(items) for index in failed):
            if not failed and len(items) > 1 and exc.details.get("events") == ["too_many_events"]:
                self._fewer_per_batch(len(items))
            stack: list[list[Item]] = []
            self._isolate(items, exc, stack)
            return stack
        duplicates: list[Item] = []
        rest: list[Item] = []
        for index, item in enumerate(items):
            error = failed.get(index)
            if error is None:
                rest.append(item)
            elif is_duplicate_error(error):
                duplicates.append(item)
            else:
                self._dead(item, _describe(error), exc.status, exc.code)
        alone: list[list[Item]] = []
        if duplicates:
            # Lago's Postgres store matches the rows a batch inserted back to its events by transaction_id alone: of
            # events of several subscriptions sharing one (a caller's own id), all but one are answered
            # value_already_exist though none is stored. Those are sent again alone, where the answer is theirs.
            shared = _shared_ids(items)
            if shared:
                alone = [[item] for item in duplicates if _transaction_id(item) in shared]
                duplicates = [item for item in duplicates if _transaction_id(item) not in shared]
        if duplicates:
            self._duplicates(duplicates)
        return ([rest] if rest else []) + alone

    def _fewer_per_batch(self, refused: int) -> None:
        """Lago refused a batch of ``refused`` events as ``too_many_events``: a self-hosted Lago whose
        ``LAGO_EVENTS_BATCH_MAX_LENGTH`` is under the batch size. Batches are made of half as many from now on (each
        such batch was split in halves, and its halves in halves, three calls or more where one would do, for every
        batch and with nothing said but the count of 422 answers)."""
        size = max(1, refused // 2)
        if size >= self.batch_size:
            return
        self.batch_size = size
        logger.warning(
            "Lago takes fewer than %d events per batch (a self-hosted Lago's LAGO_EVENTS_BATCH_MAX_LENGTH is under "
            "it): batches of at most %d events from now on. Set EventPipeline(batch_size=...) to Lago's maximum.",
            refused,
            size,
        )

    def _duplicates(self, items: list[Item]) -> None:
        self.metrics.duplicates += len(items)
        self.metrics.delivered += len(items)
        self.outbox.resolve(items)
        self._progressed()

    def _invalid(self, items: list[Item], stack: list[list[Item]]) -> None:
        """Some event cannot be encoded as JSON: dead-letter those, send the rest."""
        valid: list[Item] = []
        for item in items:
            try:
                dumps_event(item.raw) if item.raw is not None else item.encoded()  # (text a builder wrote: checked)
            except EventBuildError as exc:  # its builder failed (and logged why)
                self._dead(item, str(exc), None, "invalid_event")
            except (TypeError, ValueError) as exc:
                self._dead(item, f"not JSON-serialisable: {exc}", None, "invalid_event")
            else:
                valid.append(item)
        if valid:
            stack.append(valid)

    async def _post(self, items: list[Item]) -> None:
        """``POST /events/batch`` with each event's stored JSON text: the body of every attempt is built from
        the same bytes. Errors map as in :class:`LagoClient`."""
        client = self.client
        if client.is_closed:
            raise ClosedError("The LagoClient of this EventPipeline is closed.")
        try:
            parts = [item.raw if item.raw is not None else item.encoded() for item in items]
            body = ('{"events":[' + ",".join(parts) + "]}").encode()  # (UnicodeEncodeError: a lone surrogate)
        except (TypeError, ValueError) as exc:  # (dumps_event's ValueError: nested too deep for JSON, among others)
            raise InvalidRequestError(f"an event is not JSON-serialisable: {exc}") from exc
        await client.send_event_batch_json(body)


def _transaction_id(item: Item) -> str | None:
    """An event's ``transaction_id`` (``None`` when it cannot be read: such an event never reached Lago)."""
    try:
        key = item.payload().get("transaction_id")
    except Exception:  # (its builder failed: dead-lettered before any batch)
        return None
    return key if isinstance(key, str) else None


def _shared_ids(items: list[Item]) -> set[str | None]:
    """The transaction ids more than one event of a batch has (read on a 422 only: never on the happy path)."""
    seen: set[str | None] = set()
    shared: set[str | None] = set()
    for item in items:
        key = _transaction_id(item)
        (shared if key in seen else seen).add(key)
    shared.discard(None)
    return shared


def running_here(pipeline: Any) -> anyio.Event | None:
    """The event an :class:`EventPipeline` sets when its run stops, if it is running on this thread (its loop: this
    one), else ``None``: what a second middleware given the same pipeline follows instead of running it twice. (A run
    on another thread is not followed: it refuses a second run; a pipeline of another kind is never "running here".)"""
    if not getattr(pipeline, "_running", False) or getattr(pipeline, "_loop_thread", None) != threading.get_ident():
        return None
    stopped = getattr(pipeline, "_stopped", None)
    return stopped if isinstance(stopped, anyio.Event) and not stopped.is_set() else None


def _threadsafe_caller() -> Callable[[Callable[[], object]], object] | None:
    """What runs a function soon on the running event loop's thread, called from any thread (asyncio's
    ``call_soon_threadsafe``, trio's token's ``run_sync_soon``); ``None`` on another loop."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: trio (hypercorn -k trio), which is imported then
        trio = sys.modules.get("trio")
        try:
            return trio.lowlevel.current_trio_token().run_sync_soon if trio is not None else None
        except RuntimeError:  # pragma: no cover - anyio runs on asyncio or trio
            return None


def _body_size(items: list[Item]) -> int:
    """About the bytes of the body that carried ``items`` (their JSON text: ASCII, mostly)."""
    return sum(len(item.raw) for item in items if item.raw is not None)


def _describe(error: Any) -> str:
    return error if isinstance(error, str) else json.dumps(error, sort_keys=True, default=str)


def _reason(exc: LagoAPIError) -> str:
    if exc.details:
        return _describe(exc.details)
    return exc.error or str(exc)


def _every_20th(count: int) -> Callable[..., None]:
    """How to log the ``count``-th failure in a row: a WARNING when they start, then every 20th; DEBUG between."""
    return logger.warning if count % 20 == 1 else logger.debug


def _check_pipeline_arguments(
    client: object,
    memory_capacity: object,
    batch_size: object,
    flush_interval: object,
    concurrency: object,
    commit_window: object,
    shutdown_timeout: object,
    max_attempts: object,
    max_backoff: object,
    retry_backoff: object,
    metrics: object,
    spool_window: object,
) -> None:
    """Refuse an argument of ``EventPipeline(...)`` that cannot work where it was written: a string read from the
    environment (``TypeError: '<' not supported``), NaN or infinity (the delivery loop then never flushes or never
    waits), a bool for a count, a client that is not one (an ``AttributeError`` here, or in the background)."""
    name = "EventPipeline"
    checks.client(f"{name}(client)", client)
    checks.whole(f"{name}(batch_size=...)", batch_size, maximum=MAX_BATCH_SIZE)
    for argument, count in (("memory_capacity", memory_capacity), ("max_attempts", max_attempts)):
        checks.whole(f"{name}({argument}=...)", count)
    checks.whole(f"{name}(concurrency=...)", concurrency, maximum=MAX_CONCURRENCY)
    if spool_window is not None:
        checks.whole(f"{name}(spool_window=...)", spool_window, maximum=_MAX_SPOOL_WINDOW)
    checks.number(f"{name}(flush_interval=...)", flush_interval, inclusive=True)
    checks.number(f"{name}(shutdown_timeout=...)", shutdown_timeout, inclusive=True)
    if checks.number(f"{name}(commit_window=...)", commit_window) < _MIN_COMMIT_WINDOW:
        raise ConfigurationError(
            f"{name}(commit_window=...) must be at least {_MIN_COMMIT_WINDOW:g} s, got {commit_window!r}: shorter is "
            "no window (the spool's task and the dispatcher spin, a CPU core busy while idle, and each event is a "
            "transaction of its own, fsync'd). The default, 0.05 s, makes an event durable within 50 ms."
        )
    checks.number(f"{name}(max_backoff=...)", max_backoff)
    if retry_backoff is not None:
        checks.number(f"{name}(retry_backoff=...)", retry_backoff)
    if metrics is not None and not isinstance(metrics, PipelineMetrics):
        raise ConfigurationError(f"{name}(metrics=...) must be a PipelineMetrics, got {type(metrics).__name__}.")


async def close_idle_quietly(client: LagoClient, *, pool: bool = False) -> None:
    """``client.close_idle_connections(pool=...)`` as an event loop ends, best effort (the connections are dropped
    all the same); a stand-in client without the method is left alone."""
    close = getattr(client, "close_idle_connections", None)
    if close is not None:
        try:
            await close(pool=pool)
        except Exception:
            logger.debug("Closing idle connections failed", exc_info=True)
