"""Outboxes of the event pipeline: bounded in memory (default) or a durable SQLite spool (``LAGO_SPOOL_PATH``).

Both hold each event as it was made (a dict from ``_events.event_payload``, or the JSON text a builder wrote:
``transaction_id`` and a millisecond ``timestamp`` string fixed at creation), encode it once, and send that text
on every attempt, so a resend is byte-identical (Lago's ClickHouse store deduplicates on ``transaction_id`` +
``timestamp``).

**Memory outbox** (:class:`MemoryOutbox`): a deque bounded by ``capacity``; a full outbox refuses the event
(the pipeline counts and logs it). What is left at shutdown is lost (and counted).

**SQLite spool** (:class:`SqliteOutbox`):

* ``put`` appends to an in-memory *pending* list (bounded by ``capacity``); the pipeline's spool task writes
  pending rows in **one transaction per commit window** (group commit, default 50 ms) in a worker thread,
  so the event loop never waits on the disk. WAL journal, ``synchronous=FULL``: a committed event survives a
  crash, ``kill -9`` or a power cut. An event is at most ``commit_window`` from durable.
* Rows are delivered FIFO by rowid. Only a bounded **window** of rows is in memory at a time (loaded from
  disk as it drains; just-committed rows are handed over directly when there is no backlog), so memory stays
  bounded whatever the backlog on disk (a Lago outage of hours just grows the file).
* A delivered row is deleted, and a dead-lettered row moved to the ``dead_letters`` table, in the next group
  commit. A crash before that commit means the row is sent again: Lago deduplicates it (Postgres store:
  ``value_already_exist``, counted as a duplicate; ClickHouse: the byte-identical copy replaces itself).
* On restart the rows left in the file are delivered first: they have the lowest rowids.
* Dead letters stay in the file until replayed or purged (never dropped: a misconfiguration that dead-letters every
  event grows the table without bound). The spool counts them (``COUNT(*)`` once at open; then each commit adds what it
  wrote and removed, and counts again only when another connection wrote to the file since: the ``dead-letters``
  command's purges and replays, seen at the next commit or idle check), exported as the ``dead_letters`` gauge; past
  ``_DEAD_LETTERS_WARN`` letters, then at each tenfold, a WARNING says so, with the most common recent cause and what
  to do (once per process each).
* A file that is no spool this version can write (another program's SQLite database, a spool of another schema) is
  refused at start, untouched; a damaged one too, with how to recover its events. So is a slot whose database file is
  missing or empty while its -wal file holds data (the file deleted after a crash): SQLite would reset that -wal as
  it made a new database, and the events in it be lost; an orphan slot in that state is left untouched, not adopted.
* A spool file (or its directory, its -wal or -shm file) deleted while the process runs, which SQLite would go on
  writing without a word (everything in it gone with the process), is made again at its path before the next write
  (and at shutdown) with everything it held, said at ERROR; until it can be, its writes fail as on a full volume.

**Several processes** (e.g. ``uvicorn --workers 4``) may share one ``LAGO_SPOOL_PATH``. Each process owns
one *slot* file, locked with ``fcntl.flock`` for its lifetime: slot 0 is ``LAGO_SPOOL_PATH`` itself, slot
``k`` is ``LAGO_SPOOL_PATH.k`` (lock files ``<file>.lock``). A process takes the first free slot, then
*adopts* every slot file whose lock is free (its process died or shrank away): it copies that file's events
and dead letters into its own spool in one transaction, then deletes the orphan file. A crash between the
two steps only causes a resend, which Lago deduplicates. The lock is released by the OS when a process
dies, even on ``kill -9``. Without ``fcntl`` (Windows) there is no locking: one process per spool file.

**fork**: a process forked from one with an open spool (a helper a worker starts with ``multiprocessing``'s ``fork``,
``os.fork()``) inherits the slot's lock descriptor and SQLite connection. Its copy of the descriptor is closed at once
(the slot stays the parent's, and is free once the parent is gone, however long the child lives on), the connection
is left untouched (SQLite connections must not cross a fork) and the child's outbox starts empty and unopened: the
events held are the parent's; if the child opens it again, it takes a slot of its own, never the file of the
connection it inherited (nor adopts it), even once the parent has let go of it: SQLite would share that connection's
locks with the child's own (see ``_inherited_files``).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import heapq
import itertools
import json
import logging
import operator
import os
import re
import reprlib
import shlex
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from . import _forks
from ._errors import ConfigurationError, _chain
from ._ids import format_timestamp

_flock: Callable[[int, int], None] | None
try:
    import fcntl

    _flock, _LOCK_FLAGS = fcntl.flock, fcntl.LOCK_EX | fcntl.LOCK_NB
except ImportError:  # pragma: no cover - Windows: one process per spool file
    _flock, _LOCK_FLAGS = None, 0

__all__ = [
    "DEAD_LETTER_COLUMNS",
    "DeadLetter",
    "Item",
    "MemoryOutbox",
    "Outbox",
    "SqliteOutbox",
    "dead_letter_from_row",
    "dumps_event",
    "spool_slot_files",
    "spool_slot_path",
]

logger = logging.getLogger("lago_org_billing.delivery")

JSON = dict[str, Any]
_MAX_SLOTS = 1024
_MEMORY_DEAD_LETTERS = 10_000
#: A failed spool write or read is tried again after this many seconds, doubled at each failure up to ``_RETRY_MAX``:
#: not every commit window (each attempt of a write carries every event waiting for it).
_RETRY_FIRST = 0.1
_RETRY_MAX = 1.0
#: Seconds between two log lines about a condition that lasts (a spool that cannot be written, a full dead-letter
#: list): said when it starts, then at this rate with a count, never once per attempt or per event.
_LOG_EVERY = 60.0
#: What a process out of file descriptors is told to do: one wording, for the spool's errors and the delivery's.
_OUT_OF_DESCRIPTORS = (
    "this process is out of file descriptors (EMFILE/ENFILE): raise its limit (ulimit -n, systemd's LimitNOFILE, the "
    "container's nofile ulimit) or find what holds them open"
)
#: Free bytes in a drained spool file (at most ``_SHRINK_ROWS`` events left: traffic goes on meanwhile) past which it
#: is vacuumed (given back to the volume).
_SHRINK_FREE = 4 << 20
_SHRINK_ROWS = 10_000
#: The same once no event is left (the rest of a backlog vacuumed while traffic went on, given back when it ends).
_SHRINK_FREE_EMPTY = 256 << 10
#: Seconds before a VACUUM that failed (too little room on the volume for its copy of the file) is tried again,
#: doubled at each failure up to ``_SHRINK_RETRY_MAX``: not at every commit that deletes rows.
_SHRINK_RETRY_FIRST = 60.0
_SHRINK_RETRY_MAX = 3600.0
#: A spool's ``dead_letters`` table past this many letters is said at WARNING, then again at each tenfold (100,000,
#: 1,000,000...), each once per process (:meth:`_SpoolFile._dead_letters_grew`): nothing else bounds it (no letter is
#: dropped), and a cause that dead-letters every event fills the volume at the rate of the traffic.
_DEAD_LETTERS_WARN = 10_000
#: How many of the most recent letters that warning reads for their most common cause.
_DEAD_LETTERS_SAMPLE = 1_000
#: The highest threshold said, by slot file, in this process.
_dead_letters_said: dict[str, int] = {}


class _Streak:
    """Occurrences in a row of one failure (a spool write, a spool read) or condition: :meth:`hit` counts one and
    says whether to log it (the first, then one per ``_LOG_EVERY`` seconds); :meth:`waiting` whether the next attempt
    is still to wait its backoff; :meth:`end` closes the streak and says so."""

    __slots__ = ("count", "logged_at", "retry_at", "since")

    def __init__(self) -> None:
        self.count = 0
        self.since = self.logged_at = self.retry_at = 0.0

    def hit(self) -> bool:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.since = now
        self.retry_at = now + min(_RETRY_MAX, _RETRY_FIRST * 2 ** min(self.count - 1, 16))
        if self.count == 1 or now - self.logged_at >= _LOG_EVERY:
            self.logged_at = now
            return True
        return False

    def waiting(self) -> bool:
        return bool(self.count) and time.monotonic() < self.retry_at

    def lasting(self) -> str:
        """`` for N s (M attempts)`` once the streak is more than one failure long."""
        return f" for {time.monotonic() - self.since:.0f} s ({self.count} attempts)" if self.count > 1 else ""

    def end(self, works: str, *args: object) -> None:
        """Close the streak, saying that what failed ``works`` again (a %-format with ``args``), after how long."""
        failures, seconds = self.count, time.monotonic() - self.since
        self.count = 0
        logger.warning(works + " again (after %d failed attempts in %.0f s)", *args, failures, seconds)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """An event Lago rejected for good (or that could not be built), with the reason.

    ``id`` numbers it in its store (the spool's row id; in memory, a counter): what
    ``EventPipeline.replay_dead_letters(ids=...)`` takes. ``None`` until the store has it."""

    event: JSON
    reason: str
    status: int | None = None
    code: str | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    id: int | None = None

    @property
    def replayable(self) -> bool:
        """Whether the letter holds a whole event that can be sent again (one that could not be built or
        serialised holds only what is known of it)."""
        return _replayable(self.event)


#: The columns of a ``dead_letters`` row, in the order :func:`dead_letter_from_row` takes them: its texts read as
#: bytes (one that is no UTF-8, a byte flipped on disk, which ``PRAGMA integrity_check`` does not see, failed the
#: whole read).
DEAD_LETTER_COLUMNS = "id, CAST(body AS BLOB), CAST(reason AS BLOB), status, CAST(code AS BLOB), created_at"


def dead_letter_from_row(row: tuple[Any, ...]) -> DeadLetter:
    """A ``dead_letters`` row (:data:`DEAD_LETTER_COLUMNS`) as a :class:`DeadLetter`: a byte of its texts that is no
    UTF-8 as a ``\\xNN`` escape (no JSON then: never replayed)."""
    row_id, body, reason, status, code, created_at = row
    # (body and reason are NOT NULL)
    return DeadLetter(
        _loads_or_raw(body.decode(errors="backslashreplace")),
        reason.decode(errors="backslashreplace"),
        status,
        _text(code),
        created_at,
        row_id,
    )


def _replayable(event: Any) -> bool:
    return isinstance(event, dict) and isinstance(event.get("transaction_id"), str) and bool(event["transaction_id"])


@dataclasses.dataclass(slots=True, eq=False)
class Item:
    """One event in an outbox: its dict, or (loaded from the spool) its stored JSON text, or both.

    ``attempts``/``mark`` track failures attributable to the event itself."""

    event: EventOrBuilder | None
    id: int = 0
    attempts: int = 0
    mark: int = -1
    raw: str | None = None

    def payload(self) -> JSON:
        """The event as a dict (parsed from the stored text when needed; built when it was submitted lazily)."""
        if self.event is not None and not isinstance(self.event, dict):
            self._build(self.event)
        event = self.event
        if event is None:
            event = self.event = _loads_or_raw(self.raw or "")
        assert isinstance(event, dict)
        if type(event) is _Unbuildable:
            raise EventBuildError(event.reason)
        return event

    def encoded(self) -> str:
        """The event's JSON text: the stored text when there is one, so every resend is byte-identical."""
        if self.raw is None and self.event is not None and not isinstance(self.event, dict):
            self._build(self.event)  # may set the text itself
        if self.raw is None:
            self.raw = dumps_event(self.payload())
        return self.raw

    def _build(self, builder: Callable[[], JSON | str]) -> None:
        """Run the builder (once, even when it fails): the event's dict, or its JSON text when it wrote that."""
        built = _built_or_unbuildable(builder)
        if isinstance(built, str):
            self.event, self.raw = None, built
        else:
            self.event = built


class Outbox:
    """What the pipeline needs from a store. Everything but the ``async`` methods runs on the event loop."""

    durable = False
    #: Events dead-lettered by the store itself as they were written (the SQLite spool).
    dead_on_write = 0

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.window: collections.deque[Item] = collections.deque()
        self.in_flight = 0
        #: ``time.monotonic()`` when the window last went from empty to non-empty.
        self.ready_since = 0.0
        #: Called (on the event loop) when events become available; set by the pipeline.
        self.on_ready: Callable[[], None] = _nothing
        #: Called (on the event loop) with how many events the store dead-lettered as it wrote them (``dead_on_write``
        #: grew by that much), whichever commit wrote them; set by the pipeline, which counts them.
        self.on_dead_written: Callable[[int], None] = _ignore

    def put(self, event: EventOrBuilder) -> bool:
        """Accept ``event`` (sync, O(1), no I/O); False when full."""
        raise NotImplementedError

    def lane(self, build: Callable[[Any], JSON | str]) -> Callable[[Any], bool]:
        """A ``put`` for events submitted as *facts* that ``build(facts)`` turns into the event (or its JSON text)
        later, in the background. This store keeps one builder per event; the memory outbox keeps just the facts.
        """
        put = self.put
        return lambda facts: put(functools.partial(build, facts))

    def available(self) -> int:
        return len(self.window)

    def take(self, n: int) -> list[Item]:
        """Up to ``n`` events, oldest first, now in flight."""
        window = self.window
        count = min(n, len(window))
        items = [window.popleft() for _ in range(count)]
        self.in_flight += count
        return items

    def release(self, items: list[Item]) -> None:
        """Put in-flight events back at the front, for a later attempt."""
        self.in_flight -= len(items)
        if not self.window:
            self.ready_since = time.monotonic()
        self.window.extendleft(reversed(items))
        self.on_ready()

    def resolve(self, items: list[Item]) -> None:
        """In-flight events are in Lago (delivered or duplicates)."""
        raise NotImplementedError

    def dead(self, item: Item, letter: DeadLetter) -> None:
        """An in-flight event goes to the dead letters."""
        raise NotImplementedError

    def unresolved(self) -> int:
        """Events accepted and not yet delivered nor dead-lettered."""
        raise NotImplementedError

    def spool_depth(self) -> int:
        return 0

    def dead_letter_count(self) -> int:
        """How many dead letters the store holds (O(1): read by the metrics at each scrape)."""
        return 0

    def dead_letters(self) -> list[DeadLetter]:
        raise NotImplementedError

    async def open(self) -> None:
        """Prepare the store (the SQLite spool opens, locks and adopts here)."""

    async def replay_dead(self, ids: set[int] | None) -> int:
        """Put the dead letters numbered ``ids`` (all when ``None``) that hold a whole event back among the
        events to deliver, as far as there is room; return how many."""
        raise NotImplementedError

    async def commit(self) -> None:
        """Make accepted events durable and record resolutions (group commit)."""

    async def fill(self) -> None:
        """Load more events from the store into the window if it runs low."""

    def closing(self) -> None:
        """The pipeline is shutting down: no event comes any more, what is left is to be delivered now."""

    async def close(self) -> int:
        """Commit and release the store; return how many undelivered events it could not keep (lost)."""
        return 0


def _nothing() -> None:
    return None


def _ignore(count: int) -> None:
    return None


class MemoryOutbox(Outbox):
    """A bounded in-memory outbox: lost on exit, refuses events beyond ``capacity``."""

    def __init__(self, capacity: int = 100_000) -> None:
        super().__init__(capacity)
        self._dead: collections.deque[DeadLetter] = collections.deque(maxlen=_MEMORY_DEAD_LETTERS)
        self._dead_ids = itertools.count(1)
        self.dead_evicted = 0
        self._evictions = _Streak()  # (logged when they start, then once a minute: one per event would flood the log)
        self._unbuilt: list[Item] = []
        # Events submitted through a lane: (builder, facts waiting for it); counted in ``_deferred``.
        self._lanes: list[tuple[Callable[[Any], JSON | str], list[Any]]] = []
        self._deferred = 0
        _forks.track(self)

    def _forked(self) -> None:
        """In the child of a ``fork``: the events queued here are the parent's, which delivers them as its pipeline
        runs. The child starts empty (kept, the child running the pipeline it inherited sent each of them again). The
        window and lanes are emptied in place: a lane's ``put_facts`` holds them."""
        if not (self.window or self._deferred or self.in_flight):
            return
        _forks.left_by_parent.append((list(self.window), [list(pending) for _, pending in self._lanes]))
        self.window.clear()
        self._unbuilt.clear()
        for _, pending in self._lanes:
            pending.clear()
        self._deferred = 0
        self.in_flight = 0

    def put(self, event: EventOrBuilder) -> bool:
        window = self.window
        if len(window) + self._deferred >= self.capacity:
            return False
        item = Item(event)
        window.append(item)
        if type(event) is not dict:
            self._unbuilt.append(item)
        if len(window) + self._deferred == 1:
            self.ready_since = time.monotonic()
            self.on_ready()
        return True

    def lane(self, build: Callable[[Any], JSON | str]) -> Callable[[Any], bool]:
        pending: list[Any] = []
        self._lanes.append((build, pending))
        window = self.window

        def put_facts(facts: Any) -> bool:
            if len(window) + self._deferred >= self.capacity:
                return False
            pending.append(facts)
            self._deferred += 1
            if self._deferred == 1 and not window:
                self.ready_since = time.monotonic()
                self.on_ready()
            return True

        return put_facts

    def available(self) -> int:
        return len(self.window) + self._deferred

    def take(self, n: int) -> list[Item]:
        if self._deferred:
            self._materialize()
        return super().take(n)

    def _materialize(self) -> None:
        """Build the events waiting in lanes, in one go, into the window (behind what is already there)."""
        for build, pending in self._lanes:
            if pending:
                batch = pending.copy()
                pending.clear()
                self._deferred -= len(batch)
                items: list[Item] = []
                append = items.append
                for facts in batch:  # JSON text, the usual result, is stored as it is
                    built = _built_or_unbuildable(build, facts)
                    append(Item(None, 0, 0, -1, built) if isinstance(built, str) else Item(built))
                self.window.extend(items)

    def build_pending(self) -> None:
        """Build and encode the events submitted as builders or facts since the last call, so that what a request
        left behind (its response body, ...) is freed soon even while Lago is down and nothing is sent."""
        if self._deferred:
            self._materialize()
        items, self._unbuilt = self._unbuilt, []
        for item in items:
            try:
                item.encoded()
            except ValueError:  # its builder failed or JSON cannot carry it: dead-lettered when it is sent
                pass

    def resolve(self, items: list[Item]) -> None:
        self.in_flight -= len(items)

    def dead(self, item: Item, letter: DeadLetter) -> None:
        self.in_flight -= 1
        if len(self._dead) == self._dead.maxlen:
            self.dead_evicted += 1
            if self._evictions.hit():
                logger.error(
                    "The in-memory dead-letter list is full (%d letters): forgetting the oldest (%s); %d forgotten so "
                    "far. Fix what Lago rejects and replay them, or set LAGO_SPOOL_PATH to keep them all on disk.",
                    self._dead.maxlen,
                    self._dead[0].reason,
                    self.dead_evicted,
                )
        self._dead.append(dataclasses.replace(letter, id=next(self._dead_ids)))

    async def replay_dead(self, ids: set[int] | None) -> int:
        room = self.capacity - len(self.window) - self._deferred
        chosen = [letter for letter in self._dead if (ids is None or letter.id in ids) and letter.replayable][
            : max(room, 0)
        ]
        if not chosen:
            return 0
        gone = {id(letter) for letter in chosen}
        self._dead = collections.deque(
            (letter for letter in self._dead if id(letter) not in gone), maxlen=_MEMORY_DEAD_LETTERS
        )
        for letter in chosen:
            self.put(dict(letter.event))
        return len(chosen)

    def unresolved(self) -> int:
        return len(self.window) + self._deferred + self.in_flight

    def dead_letter_count(self) -> int:
        return len(self._dead)

    def dead_letters(self) -> list[DeadLetter]:
        return list(self._dead)

    def discard(self) -> int:
        """Forget what is left (shutdown); how many events that was."""
        count = len(self.window) + self._deferred + self.in_flight
        self.window.clear()
        for _, pending in self._lanes:
            pending.clear()
        self._deferred = 0
        return count


# --------------------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER,
    code TEXT,
    created_at REAL NOT NULL
);
"""
#: The columns of each table of a spool this version writes. A file it opens may have no table yet (a new spool), these
#: tables with any other column it need not write (nullable or with a default), and the tables SQLite makes itself
#: (``sqlite_*``: AUTOINCREMENT, ANALYZE) or ``sqlite3 .recover`` adds (``lost_and_found``); any other file is not a
#: spool (another program's database, a spool of another version), refused untouched (:func:`_check_spool_schema`).
_SPOOL_COLUMNS = {
    "events": ("id", "body"),
    "dead_letters": ("id", "body", "reason", "status", "code", "created_at"),
}
_OTHER_TABLES_ALLOWED = ("lost_and_found",)


def spool_slot_path(path: str, slot: int) -> str:
    """The database file of a slot: ``path`` for slot 0, ``path.<slot>`` otherwise."""
    return path if slot == 0 else f"{path}.{slot}"


def spool_slot_files(path: str) -> list[tuple[int, str]]:
    """The slot files of the spool at ``path`` that exist, as (slot, file), slot 0 first. Only names a process can
    own (:func:`spool_slot_path` of a slot below ``_MAX_SLOTS``): a copy named ``PATH.20240101``, ``PATH.01`` or
    ``PATH.0`` is no slot file, never adopted (its events sent again, the file deleted) nor listed."""
    base = os.path.abspath(path)
    directory, prefix = os.path.dirname(base), os.path.basename(base) + "."
    pattern = re.compile(re.escape(base) + r"(?:\.([1-9][0-9]*))?")
    try:
        names = os.listdir(directory)
    except OSError as exc:
        # (not ``glob``, which lists nothing when the directory cannot be read: out of descriptors, the orphans were
        # left unadopted without a word)
        if _out_of_descriptors(exc):
            raise
        names = []
    found = []
    for candidate in [base, *(os.path.join(directory, name) for name in names if name.startswith(prefix))]:
        match = pattern.fullmatch(candidate)
        if match is None or not os.path.isfile(candidate):
            continue
        slot = int(match.group(1) or 0)
        if slot < _MAX_SLOTS:
            found.append((slot, candidate))
    return sorted(found)


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

#: What ``EventPipeline.submit`` takes: an event, or a function building it later (the middleware defers the
#: building off the request path; the pipeline calls it once, in the background, before storing or sending).
#: A builder returns the event, or the event's JSON text (a ``str``) when it writes that itself.
EventOrBuilder = JSON | Callable[[], JSON | str]


class EventBuildError(ValueError):
    """A lazily submitted event could not be built: it goes to the dead letters (the builder logged why)."""


def dumps_event(event: JSON | str) -> str:
    """The one JSON encoding of an event, used for the spool and for every request body (an event built as its
    JSON text is that text). A ``ValueError`` for an event that cannot be: one that could not be built, one nested
    deeper than ``json`` goes (its ``RecursionError``, raised as what it is here: an event JSON cannot carry), or text
    that is no UTF-8 (a ``UnicodeEncodeError``)."""
    if type(event) is str:
        text: str = event
    elif type(event) is _Unbuildable:
        raise ValueError(event.reason)
    else:
        if type(event) is dict and "transaction_id" in event:
            stamp(event)  # (a builder's event: fixed once, as submit() does it)
        try:
            text = _encode(event)
        except RecursionError:
            raise ValueError("nested too deeply for JSON") from None
    if not text.isascii():
        text.encode()  # a lone surrogate ("\ud800" from a client's JSON) is no UTF-8: a UnicodeEncodeError here
    return text


def stamp(event: JSON) -> None:
    """Give ``event`` the time now when it has no ``timestamp``, once, as it is made: without one Lago stamps each copy
    it receives, so on its ClickHouse store a resend after a lost answer is a second event, billed twice (and one sent
    after an outage is billed at the time it was sent)."""
    if event.get("timestamp") is None:
        event["timestamp"] = format_timestamp()


class _Unbuildable(dict):  # type: ignore[type-arg]
    """Stands for a lazily submitted event whose builder failed, or a spool row that is no text (damaged on disk): it
    is written to the dead letters."""

    def __init__(self, reason: str, **known: str) -> None:
        super().__init__(error=reason, **known)  # (what is known of the event, kept in its dead letter)
        self.reason = reason


def _built_or_unbuildable(event: EventOrBuilder | str | Callable[..., Any], *args: Any) -> JSON | str:
    """The event itself (or its JSON text), calling ``event(*args)`` if a builder is what was submitted. A builder
    that raises, or returns anything but a dict or a str, gives an :class:`_Unbuildable` saying why (the event goes
    to the dead letters with that reason)."""
    if isinstance(event, (dict, str)):
        return event
    try:
        built = event(*args)
    except Exception as exc:
        return _Unbuildable(f"the event could not be built: {type(exc).__name__}: {exc}")
    if isinstance(built, (dict, str)):
        return built
    return _Unbuildable(f"the event builder returned {type(built).__name__}, not a dict")


#: Seconds between two checks of an idle spool's files (:meth:`SqliteOutbox._idle_check`): three ``stat`` calls in a
#: worker thread.
_IDLE_CHECK = 1.0
#: Worker threads the spools of one event loop use at once (each spool's thread work runs one step at a time: a
#: write, a load, a check; these are for several spools, and for an opening or a close beside them).
_SPOOL_THREADS = 4
_spool_threads: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar("lago_org_billing spool threads")


def _threads() -> anyio.CapacityLimiter:
    """The worker threads of the spools of the running event loop (made at its first use: one per loop, forgotten with
    it). Not anyio's default limiter, which the app's sync endpoints share (Starlette, FastAPI: 40 threads): under load
    a group commit waited behind every request queued there, the events it carried not durable meanwhile (lost to a
    ``kill -9`` well past the commit window), delivery stalled and, the commit queue full, new events were dropped."""
    try:
        return _spool_threads.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(_SPOOL_THREADS)
        _spool_threads.set(limiter)
        return limiter


class _SpoolFile:
    """The blocking half of the SQLite spool. Every method runs in a worker thread, under ``lock``."""

    def __init__(self, path: str, synchronous: str) -> None:
        # (``~`` as BillingSettings reads LAGO_SPOOL_PATH: a path given to EventPipeline as is means the same file)
        self.base_path = os.path.abspath(os.path.expanduser(path))
        self.synchronous = synchronous
        self.lock = threading.Lock()
        self.path = ""
        self.conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.adopted = 0
        self.slot = 0
        #: The slot files found as the spool was last opened (:meth:`_adopt_orphans` adopts those no process holds).
        self._slot_files: list[tuple[int, str]] = []
        #: (device, inode) of the slot file ``conn`` has open: a file at ``path`` that is not this one (deleted,
        #: replaced) no longer holds what is written (:meth:`_keep_in_place`).
        self._identity: tuple[int, int] | None = None
        #: The same of its -wal and -shm files, as SQLite made them when it opened the file.
        self._sidecars: dict[str, tuple[int, int]] = {}
        #: ``conn`` was closed to be opened again (:meth:`_reopen`), and could not be yet (:meth:`_reconnect`).
        self._closed_to_reopen = False
        self._shrink_failures = 0
        self._shrink_retry_at = 0.0
        #: Dead letters of events never written (sent from memory), in the write in progress: forgotten here as that
        #: write commits, under ``lock`` (:meth:`dead_letters` lists each letter once, from here or from the table).
        self.letters_writing: list[DeadLetter] = []
        #: The letters of the ``dead_letters`` table: counted at open, then kept up to date by each write (what it
        #: added and removed), counted again when another connection wrote to the file since (:meth:`_count_dead`).
        self.dead_count = 0
        #: ``PRAGMA data_version`` of ``conn`` when ``dead_count`` was last right: another value means that another
        #: connection committed to the file since (the ``dead-letters`` command's purges and replays). None: unknown.
        self._data_version: int | None = None

    # ------------------------------------------------------------------ opening

    def open(self) -> tuple[int, int, int]:
        """Lock a slot, open it, adopt orphans; return (row count, max id, adopted rows)."""
        with self.lock:
            if self.conn is not None:
                # Opened already by a call whose caller was cancelled natively as it ran (an event loop ending): that
                # opening stands. Opening again would lock another slot, this process holding its own.
                count, max_id = self.conn.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM events").fetchone()
                return int(count), int(max_id), self.adopted
            try:
                _check_regular_file(self.base_path)
                directory = os.path.dirname(self.base_path)
                os.makedirs(directory, mode=0o700, exist_ok=True)  # (a directory made here: the owner's only)
                # The orphans to adopt, listed before a slot is taken: the listing takes a descriptor for a moment,
                # which the slot's four (its lock, the database, its -wal and -shm) must not leave none for.
                self._slot_files = spool_slot_files(self.base_path)
                slot, conn = -1, None
                while conn is None:
                    slot = self.slot = self._acquire_slot(slot + 1)
                    self.path = spool_slot_path(self.base_path, slot)
                    try:
                        conn = self._connect()
                    except _WalWithoutDatabase as exc:
                        # An orphan slot whose database file went after a crash, its -wal kept (a worker starting
                        # beside a live one takes the slots after the first): left untouched, said, the next slot taken
                        if slot == 0:
                            raise
                        logger.error(
                            "The spool slot file %s is %s, but its write-ahead log %s-wal (%d bytes) holds events "
                            "committed since it was last written: left untouched, and another slot taken. Restore the "
                            "database file at %s (from where it was moved, or a backup): the next process to start "
                            "delivers its events.",
                            exc.filename,
                            "empty" if os.path.exists(exc.filename) else "missing",
                            exc.filename,
                            exc.wal_bytes,
                            exc.filename,
                        )
                        self._release()
                    except sqlite3.DatabaseError as exc:
                        # An orphan slot file SQLite cannot read (torn, or a stray file named like one) is no spool to
                        # write to: left where it is (said by ``_adopt_orphans``), and the next slot taken. (Not
                        # LAGO_SPOOL_PATH itself, nor a failure of the volume, which another slot would not escape.)
                        if slot == 0 or not (type(exc) is sqlite3.DatabaseError or isinstance(exc, _NotASpool)):
                            raise
                        self._release()
                adopted = self.adopted = self._adopt_orphans(slot)
                count = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
                max_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
                self._count_dead(conn)
            except (OSError, sqlite3.Error) as exc:
                # Let go of the slot (its lock), or the next attempt would take the next slot and hide the problem.
                self._release()
                if isinstance(exc, _WalWithoutDatabase):
                    where = exc.filename
                    raise ConfigurationError(
                        f"The event spool {where} cannot be opened: its database file is "
                        f"{'empty' if os.path.exists(where) else 'missing'}, but its write-ahead log {where}-wal "
                        f"({exc.wal_bytes} bytes) is there, holding the events committed since the database file was "
                        "last written (was the file deleted or moved after a crash?). Opening the spool would make a "
                        "new database, and SQLite would reset that log: its events would be lost. Nothing was "
                        f"touched. Restore the database file at {where} (from where it was moved, or a backup) and "
                        "start again: the events of both are delivered then. Or, to start with an empty spool and "
                        f"give up the events in that log, move it away, with its -shm file if there is one: mv "
                        f"{where}-wal {where}.orphan-wal; mv {where}-shm {where}.orphan-shm.",
                        variable="LAGO_SPOOL_PATH",
                    ) from exc
                backlog = ""
                if isinstance(exc, _NoFileLocks):
                    advice = "Set LAGO_SPOOL_PATH to a file on a volume that supports them (a local disk)"
                    backlog = _backlog_left(self.base_path)
                elif isinstance(exc, _NotASpool):
                    advice = (
                        "The file was left untouched. Set LAGO_SPOOL_PATH to a file of its own (a new path: the spool "
                        "makes it)"
                    )
                elif _damaged(exc):
                    where = self.path or self.base_path
                    advice = (
                        f"If it is a spool, it is damaged, and its undelivered events are still to recover: stop every "
                        f"process using it, move it away with its -wal file if there is one (mv {where} "
                        f"{where}.damaged; mv {where}-wal {where}.damaged-wal), recover what it holds into a slot file "
                        f"that the next start adopts and delivers (SQLite's recovery: sqlite3 {where}.damaged "
                        f"'.recover' | sqlite3 {self.base_path}.1000), and keep the damaged file until that is done. "
                        "If it is not a spool, set LAGO_SPOOL_PATH to a file of its own (a new path: the spool "
                        "makes it)"
                    )
                elif _out_of_descriptors(exc) or (_cannot_open(exc) and _descriptors_short()):
                    # (not "a writable directory", nor "unset it": the file is fine, and its events would stay in it)
                    if isinstance(exc, _OrphanOutOfDescriptors):
                        what, cause = f"The orphan spool file {exc.filename} cannot be adopted", exc.__cause__
                        kept = "the spool and the orphan file hold are kept in them (nothing was removed)"
                    else:
                        what, cause = f"The event spool {self.path or self.base_path} cannot be opened", exc
                        kept = "the spool holds are kept in it"
                    raise ConfigurationError(
                        f"{what} ({type(cause).__name__}: {cause}): {_OUT_OF_DESCRIPTORS}, and start again: the "
                        f"undelivered events {kept}, and delivered then.",
                        variable="LAGO_SPOOL_PATH",
                    ) from exc
                elif _volume_full(exc):
                    # (not "a writable directory", nor "unset it": the file's events would stay in it, undelivered)
                    raise ConfigurationError(
                        f"The event spool {self.path or self.base_path} cannot be opened ({type(exc).__name__}: "
                        f"{exc}): its volume is full or failing (opening a spool writes its -wal and -shm files). "
                        f"Free space on it (df -h {os.path.dirname(self.base_path)}) and start again: the undelivered "
                        "events the spool holds are kept in it, and delivered then.",
                        variable="LAGO_SPOOL_PATH",
                    ) from exc
                else:
                    advice = (
                        "Set LAGO_SPOOL_PATH to a file path in a writable directory (not a directory, nor a file that "
                        "is not a spool)"
                    )
                    backlog = _backlog_left(self.base_path)
                said = str(exc) if isinstance(exc, _NotASpool) else f"{type(exc).__name__}: {exc}"
                raise ConfigurationError(
                    f"The event spool {self.path or self.base_path} cannot be used ({said}). "
                    f"{advice}, or unset it to keep events in memory{backlog}.",
                    variable="LAGO_SPOOL_PATH",
                ) from exc
            self._dead_letters_grew(conn)
            return int(count), int(max_id), adopted

    def _connect(self) -> sqlite3.Connection:
        """Open the slot file ``path`` (made if need be) as ``conn``, in WAL mode, with the schema."""
        # A -wal file left without its database (deleted after a crash): SQLite would reset it as it opens the new,
        # empty database, and the events it holds with it. (Checked before the file is made, under the slot's lock.)
        wal_bytes = _wal_without_database(self.path)
        if wal_bytes:
            raise _WalWithoutDatabase(self.path, wal_bytes)
        # Events name orgs, users and models: a new file is the owner's only (SQLite gives its -wal and -shm files the
        # database's mode); an existing one keeps the mode it was given.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._data_version = None  # (a new connection: its own numbering; the letters are counted again)
        conn = self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            _check_spool_schema(conn)  # (before anything is written to it: another program's database stays untouched)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.executescript(_SCHEMA)
            identity = _file_id(self.path)
            if identity is None:
                raise FileNotFoundError(errno.ENOENT, "deleted as it was opened", self.path)
        except BaseException:
            conn.close()
            self.conn = None
            raise
        self._identity = identity
        sidecars = ((suffix, _file_id(self.path + suffix)) for suffix in ("-wal", "-shm"))
        self._sidecars = {suffix: made for suffix, made in sidecars if made is not None}
        return conn

    # ------------------------------------------------------------------ files removed while in use

    def keep_in_place(self) -> None:
        """:meth:`_keep_in_place` between writes (an idle spool's check): under ``lock``; an ``OperationalError``
        when the file cannot be made again now (the next write says so). The dead letters are counted again if another
        connection wrote to the file since (a purge while no event comes)."""
        with self.lock:
            self._keep_in_place()
            if self.conn is not None:
                version = self.conn.execute("PRAGMA data_version").fetchone()[0]
                if version != self._data_version:
                    self._count_dead(self.conn)

    def _keep_in_place(self) -> None:
        """Under ``lock``, before each write and at close: make sure the files at the slot's path are those the
        connection writes. SQLite goes on writing, without a word, to a database file or a WAL deleted while it has
        them open (``rm spool.db*``, the directory removed by a deploy or a cleanup): every event "made durable" from
        then on, and the backlog the file held, would vanish with the process. A deleted (or replaced) database file is
        made again, at the path, with everything the connection still reads (:meth:`_make_again`); a deleted -wal or
        -shm file is made again by reopening the connection once the WAL's content is in the database file. An
        ``OperationalError`` when that cannot be done now (the write fails, and is tried again)."""
        if self._closed_to_reopen:
            self._reconnect()
            return
        if self.conn is None or self._identity is None:
            return
        try:
            if _file_id(self.path) != self._identity:
                self._make_again()
            elif any(_file_id(self.path + suffix) != made for suffix, made in self._sidecars.items()):
                self._reopen()
            elif self._lock_fd is not None and not _same_file(self._lock_fd, self.path + ".lock"):
                self._lock_again()
        except OSError as exc:
            raise sqlite3.OperationalError(
                f"the spool file {self.path} was deleted while in use and cannot be made again ({exc})"
            ) from exc

    def _lock_again(self) -> None:
        """The slot's lock file was removed (``rm *.lock``, a tmp cleaner: it is never modified) while this process
        uses the slot: locked again at once, made anew, before a process starting meanwhile takes the slot as free and
        writes this spool file too (both sending its events, their row ids colliding)."""
        fd = self._try_lock(self.path)
        # (the old lock, of a file gone, holds nothing; with none taken again, the slot is not looked at again)
        old_fd, self._lock_fd = self._lock_fd, fd if fd is not None and fd >= 0 else None
        if old_fd is not None:
            _close_lock(old_fd)
        if fd is None:
            logger.error(
                "The lock file %s.lock of the event spool was removed while this process used it, and another process "
                "has taken the slot since: both now use the spool file %s (their events may be sent twice, which Lago "
                "counts once). Restart this process to have it take a slot of its own; never remove a spool's lock "
                "files while a process uses it.",
                self.path,
                self.path,
            )
        else:
            logger.warning(
                "The lock file %s.lock of the event spool was removed while this process used it: made and locked "
                "again. Never remove a spool's lock files while a process uses it.",
                self.path,
            )

    def _reopen(self) -> None:
        """The -wal or -shm file of the spool was deleted: the WAL's content goes into the database file, and the
        connection is opened again (a new WAL and index at the path)."""
        conn = self.conn
        assert conn is not None
        busy, frames, moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy or moved != frames:  # (another connection reads it: the dead-letters CLI) closed now, it would be lost
            raise sqlite3.OperationalError(f"the -wal file of the spool {self.path} was deleted, and is still read")
        logger.error(
            "The -wal or -shm file of the event spool %s was deleted while this process used it: made again (events "
            "committed since were in the deleted file, and are now in the spool). Never remove a spool's files while "
            "a process uses it.",
            self.path,
        )
        conn.close()
        self.conn, self._closed_to_reopen = None, True
        self._reconnect()

    def _reconnect(self) -> sqlite3.Connection:
        """Under ``lock``: the connection, opened again if :meth:`_reopen` closed it and could not open it again (an
        ``OperationalError`` while it still cannot be: a read or write that fails, tried again after a backoff)."""
        if self.conn is None and self._closed_to_reopen:
            try:
                self._connect()
            except (OSError, sqlite3.Error) as exc:  # (``_connect`` closed what it opened)
                if isinstance(exc, sqlite3.Error):
                    raise
                raise sqlite3.OperationalError(f"the spool file {self.path} cannot be opened again ({exc})") from exc
            self._closed_to_reopen = False
        assert self.conn is not None
        return self.conn

    def _make_again(self) -> None:
        """The spool's database file was deleted or replaced: a new one at the slot's path (its directory made again if
        need be, its lock taken again if its lock file went too) receives a copy of everything the connection still
        reads (SQLite's backup: the events with their ids, the dead letters), and is used from then on. Another file
        at the path (replaced, or a process took the slot since) is left to the next start to adopt, and the next free
        slot taken. On failure nothing changes (the old connection is kept, to try again)."""
        old = self.conn
        assert old is not None
        old_path, old_fd, old_slot = self.path, self._lock_fd, self.slot
        os.makedirs(os.path.dirname(self.base_path), mode=0o700, exist_ok=True)
        slot, fd = old_slot, None
        while True:
            if slot >= _MAX_SLOTS:
                raise OSError(f"every one of {_MAX_SLOTS} spool slots of {self.base_path} is taken")
            path = spool_slot_path(self.base_path, slot)
            ours = slot == old_slot and old_fd is not None and _same_file(old_fd, path + ".lock")
            if not ours:
                fd = self._try_lock(path)
                if fd is None:  # a process took it since
                    slot += 1
                    continue
            if not os.path.exists(path):
                break
            if fd is not None and fd >= 0:  # another file there: left to the next start to adopt
                _close_lock(fd)
            fd = None
            slot += 1
        try:
            # the copy is made in SQLite's rollback mode (durable as it commits), before the file has a WAL: no WAL nor
            # index is opened at the path while the old connection, which may still have those of the deleted file
            # open (and deletes its own by name as it closes), is open
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            try:
                copy = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                try:
                    old.backup(copy)
                finally:
                    copy.close()
            except BaseException:
                for suffix in ("", "-journal"):
                    try:
                        os.remove(path + suffix)
                    except FileNotFoundError:
                        pass
                raise
        except BaseException:
            if fd is not None and fd >= 0:
                _close_lock(fd)
            raise
        # Everything is in the new file now. The -wal and -shm files of the deleted file left at its path are removed
        # (the WAL of the file at that path must not start from them), and the old connection closed; kept open for
        # life when other -wal or -shm files are there (closing, SQLite would delete them by name).
        count = old.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        foreign = False
        for suffix, made in self._sidecars.items():
            found = _file_id(old_path + suffix)
            if found is not None and (found == made or path == old_path):  # (the deleted file's)
                os.remove(old_path + suffix)
            elif found is not None:  # (another's, next to the file put at the path)
                foreign = True
        if foreign:
            _keep_open(old)
        else:
            old.close()
        if fd is not None:  # the slot's lock is the new lock file's (or another slot's)
            self._lock_fd = fd if fd >= 0 else None
            if old_fd is not None:
                _close_lock(old_fd)
        self.slot, self.path, self.conn, self._closed_to_reopen = slot, path, None, True
        logger.error(
            "The event spool file %s was deleted or replaced while this process used it: made again at %s with the %d "
            "undelivered events and the dead letters it held. Never remove a spool's files while a process uses it "
            "(stop it first).",
            old_path,
            path,
            count,
        )
        self._reconnect()  # (should it fail, the next read or write opens it)

    def _try_lock(self, db_path: str) -> int | None:
        """The descriptor of ``db_path``'s lock, now locked by this process; None when another process holds it."""
        if _flock is None:  # pragma: no cover - Windows: single writer, documented
            return -1
        fd = _open_lock(db_path + ".lock")
        try:
            _flock(fd, _LOCK_FLAGS)
        except OSError as exc:
            _close_lock(fd)
            if isinstance(exc, BlockingIOError) or exc.errno in (errno.EACCES, errno.EAGAIN):
                return None  # held by another process
            # ENOLCK, EOPNOTSUPP...: no lock can be taken here, not one of 1024 slots (each leaving a lock file)
            raise _NoFileLocks(
                f"its volume does not support file locks, which keep the processes sharing a spool off each other's "
                f"file (flock {db_path}.lock: {exc})"
            ) from exc
        return fd

    def _acquire_slot(self, first: int = 0) -> int:
        for slot in range(first, _MAX_SLOTS):
            if _inherited(spool_slot_path(self.base_path, slot)):  # (a forked child: see _keep_for_life)
                continue
            fd = self._try_lock(spool_slot_path(self.base_path, slot))
            if fd is not None:
                self._lock_fd = fd if fd >= 0 else None
                return slot
        raise OSError(f"every one of {_MAX_SLOTS} spool slots of {self.base_path} is locked by a live process")

    def _adopt_orphans(self, my_slot: int) -> int:
        if _flock is None:  # pragma: no cover
            return 0
        assert self.conn is not None
        adopted = 0
        for slot, candidate in self._slot_files:
            if slot == my_slot or _inherited(candidate):  # (left to another process to adopt)
                continue
            try:
                fd = self._try_lock(candidate)
            except OSError as exc:
                if _out_of_descriptors(exc):
                    raise _OrphanOutOfDescriptors(candidate) from exc
                raise
            if fd is None:  # a live process owns it
                continue
            wal_bytes = _wal_without_database(candidate)
            if wal_bytes:  # (attached, SQLite would reset the -wal, and the events in it be lost)
                _close_lock(fd)
                logger.error(
                    "The orphan spool file %s is empty, but its write-ahead log %s-wal (%d bytes) holds the events "
                    "committed to it: left where it is, untouched. Restore its database file (from where it was moved, "
                    "or a backup) for the next start to adopt its events, or move the -wal away to give them up.",
                    candidate,
                    candidate,
                    wal_bytes,
                )
                continue
            try:
                adopted += self._adopt(candidate)
            except sqlite3.DatabaseError as exc:
                if _cannot_open(exc) and _descriptors_short(3):
                    # No descriptor left for the orphan's database, -wal or -shm file (SQLite says only "unable to
                    # open"): the file is fine, not to be checked or removed with its events; the opening fails
                    # saying so, and the orphan is adopted by a start that has the descriptors.
                    raise _OrphanOutOfDescriptors(candidate) from exc
                # One unreadable orphan (torn by a failing disk, a stray file named like a slot) must not keep every
                # process from starting: it is left where it is, and said.
                logger.error(
                    "The orphan spool file %s cannot be adopted (%s: %s): left where it is, with whatever events it "
                    "holds. Check it (sqlite3 %s 'PRAGMA integrity_check'); remove it if it is not a spool file.",
                    candidate,
                    type(exc).__name__,
                    exc,
                    candidate,
                )
            finally:
                _close_lock(fd)
        return adopted

    def _adopt(self, orphan: str) -> int:
        conn = self.conn
        assert conn is not None
        conn.execute("ATTACH DATABASE ? AS orphan", (orphan,))
        try:
            _check_spool_schema(conn, "orphan")  # (a file named like a slot, another program's: left untouched)
            tables = {row[0] for row in conn.execute("SELECT name FROM orphan.sqlite_master WHERE type='table'")}
            moved = 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                if "events" in tables:
                    moved = conn.execute(
                        "INSERT INTO main.events(body) SELECT body FROM orphan.events ORDER BY id"
                    ).rowcount
                if "dead_letters" in tables:
                    conn.execute(
                        "INSERT INTO main.dead_letters(body, reason, status, code, created_at) "
                        "SELECT body, reason, status, code, created_at FROM orphan.dead_letters ORDER BY id"
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.execute("DETACH DATABASE orphan")
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.remove(orphan + suffix)
            except FileNotFoundError:
                pass
        if moved:
            logger.warning("Adopted %d undelivered events from the orphan spool %s", moved, orphan)
        return moved

    # ------------------------------------------------------------------ I/O

    def write(
        self,
        rows: list[tuple[int, JSON | str]],
        deletes: list[int],
        dead: list[tuple[int, DeadLetter]],
        revived: list[tuple[int, str, int]],
        unwritten_dead: list[DeadLetter],
    ) -> tuple[list[tuple[int, str]], list[int], list[int]]:
        """One transaction: insert ``rows``, move ``dead`` rows to dead letters, add the letters ``unwritten_dead``
        (of events that were never written), delete ``deletes`` and the dead letters ``revived`` (replayed: (letter id,
        its text, the id of its event among ``rows``)). A replayed letter no longer in the file (purged, or replayed by
        another process, since it was read) has its event left out.

        Each event of ``rows`` is replaced by its JSON text as it is encoded: when the transaction fails, the caller
        keeps ``rows`` for the next attempt, which does not encode them again.

        Returns the rows written as (id, JSON text), the ids of rows JSON cannot carry (dead-lettered) and those of
        replayed events left out (their letters gone)."""
        encoded: list[tuple[int, str]] = []
        unencodable: list[int] = []
        letters = [
            (_safe_dumps(letter.event), letter.reason, letter.status, letter.code, letter.created_at)
            for letter in itertools.chain((letter for _, letter in dead), unwritten_dead)
        ]
        for index, (row_id, event) in enumerate(rows):
            try:
                text = dumps_event(event)
            except (TypeError, ValueError) as exc:
                unencodable.append(row_id)
                reason = event.reason if type(event) is _Unbuildable else f"not JSON-serialisable: {exc}"
                letters.append((_safe_dumps(event), reason, None, "invalid_event", time.time()))
                continue
            encoded.append((row_id, text))
            rows[index] = (row_id, text)
        with self.lock:
            self._keep_in_place()
            conn = self._reconnect()
            conn.execute("BEGIN")
            try:
                vanished: list[int] = []
                revived_gone = 0
                for dead_id, body, row_id in revived:
                    # by id and text: never another letter that took a freed id (older spool files reuse ids)
                    deleted = conn.execute(
                        "DELETE FROM dead_letters WHERE id = ? AND body = ?", (dead_id, body)
                    ).rowcount
                    revived_gone += deleted
                    if deleted == 0:
                        vanished.append(row_id)
                written = [row for row in encoded if row[0] not in vanished] if vanished else encoded
                if written:
                    conn.executemany("INSERT INTO events(id, body) VALUES (?, ?)", written)
                if letters:
                    conn.executemany(
                        "INSERT INTO dead_letters(body, reason, status, code, created_at) VALUES (?, ?, ?, ?, ?)",
                        letters,
                    )
                gone = [(row_id,) for row_id in deletes] + [(row_id,) for row_id, _ in dead]
                if gone:
                    conn.executemany("DELETE FROM events WHERE id = ?", gone)
                # the letters this write added and removed; counted again (in this transaction, which sees the file as
                # it is) only when another connection committed to the file since the last count: not at each commit
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version == self._data_version:
                    dead_count = self.dead_count + len(letters) - revived_gone
                else:
                    dead_count = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
                conn.execute("COMMIT")
                self.dead_count, self._data_version = dead_count, version  # (its own commit leaves the version as is)
                self.letters_writing = []
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if gone:
                self._shrink_if_drained(conn)
            if letters:
                self._dead_letters_grew(conn)
        return written, unencodable, vanished

    def _count_dead(self, conn: sqlite3.Connection) -> None:
        """Under ``lock``: count the letters of the ``dead_letters`` table (at open, and when another connection wrote
        to the file). The version is read first: a commit of another connection between the two is counted again."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        self.dead_count = int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])
        self._data_version = version

    def _dead_letters_grew(self, conn: sqlite3.Connection) -> None:
        """Under ``lock``: a WARNING when the table holds ``_DEAD_LETTERS_WARN`` letters or more, then each tenfold,
        once per process each: nothing else bounds it (no letter is ever dropped), and the per-kind error lines of the
        rejections do not say how many are kept nor what to do."""
        said = _dead_letters_said.get(self.path, 0)
        level = max(_DEAD_LETTERS_WARN, said * 10)
        count = self.dead_count
        if count < level:
            return
        while count >= level * 10:
            level *= 10
        _dead_letters_said[self.path] = level
        spool = shlex.quote(self.base_path)
        logger.warning(
            "The event spool %s holds %d dead letters (events Lago rejected for good, or that could not be built), "
            "past %d%s. They are all kept, none dropped, and the file grows with each one. See why with: "
            "lago-org-billing dead-letters --spool %s --summary; fix the cause (a billable metric code or an event "
            "property Lago rejects, a missing subscription...), then send them again with: lago-org-billing "
            "dead-letters --spool %s --replay; or delete those Lago will never take with --purge (list them first). "
            "Said again at %d.",
            self.path,
            count,
            level,
            self._common_cause(conn),
            spool,
            spool,
            level * 10,
        )

    def _common_cause(self, conn: sqlite3.Connection) -> str:
        """``: K of the last N for REASON (status S, code C)``: the most common cause among the most recent letters (a
        read of at most ``_DEAD_LETTERS_SAMPLE`` rows by id); "" when they cannot be read (the warning is said all the
        same)."""
        try:
            rows = conn.execute(
                "SELECT status, code, reason FROM dead_letters ORDER BY id DESC LIMIT ?", (_DEAD_LETTERS_SAMPLE,)
            ).fetchall()
        except sqlite3.Error:
            return ""
        if not rows:
            return ""
        (status, code, reason), times = collections.Counter(
            (status, code, " ".join(str(reason).split())) for status, code, reason in rows
        ).most_common(1)[0]
        if len(reason) > 300:
            reason = reason[:300] + "..."
        return f": {times} of the last {len(rows)} for {reason} (status {status or '-'}, code {code or '-'})"

    def _shrink_if_drained(self, conn: sqlite3.Connection) -> None:
        """Give the space of a delivered backlog (an outage's high-water mark) back to the volume: a file with at
        least ``_SHRINK_FREE`` bytes free, half of it at least, and at most ``_SHRINK_ROWS`` events left is vacuumed,
        and its WAL truncated; with no event left, from ``_SHRINK_FREE_EMPTY`` bytes free.
        (Not "no event left": under steady traffic every commit writes new rows, so the table is never empty then.)
        VACUUM keeps the ids (``events.id`` is an INTEGER PRIMARY KEY), which the rows in flight are known by. Best
        effort: one that fails is tried again after a backoff (:data:`_SHRINK_RETRY_FIRST`)."""
        if self._shrink_failures and time.monotonic() < self._shrink_retry_at:
            return
        try:
            free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
            free = free_pages * conn.execute("PRAGMA page_size").fetchone()[0]
            if free < _SHRINK_FREE_EMPTY:
                return
            # VACUUM rewrites what the file holds (dead letters included) under the lock (commits wait): only when that
            # is no more than it frees, or a large dead-letter table would be rewritten whole after every small drain
            if 2 * free_pages < conn.execute("PRAGMA page_count").fetchone()[0]:
                return
            # the span of ids bounds the rows from above (O(log n), no scan): rows are taken and resolved oldest first
            span = conn.execute("SELECT COALESCE(MAX(id) - MIN(id) + 1, 0) FROM events").fetchone()[0]
            if span > _SHRINK_ROWS or (span and free < _SHRINK_FREE):
                return
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            # (too little room for VACUUM's copy of the file, most likely): every attempt rewrites the file's live data
            # and fills the volume anew, holding the spool's reads meanwhile; not tried at every commit
            self._shrink_failures += 1
            delay = min(_SHRINK_RETRY_MAX, _SHRINK_RETRY_FIRST * 2 ** min(self._shrink_failures - 1, 16))
            self._shrink_retry_at = time.monotonic() + delay
            (logger.warning if self._shrink_failures == 1 else logger.debug)(
                "Could not shrink the event spool %s (%s: %s): its free space stays in the file; tried again in %.0f s",
                self.path,
                type(exc).__name__,
                exc,
                delay,
            )
        else:
            self._shrink_failures = 0

    def load(self, after_id: int, limit: int) -> tuple[list[Item], int]:
        """Up to ``limit`` rows after ``after_id``, as items carrying their stored text; and the last id.

        Read as bytes, decoded row by row: read as text, one row that is no UTF-8 (a byte flipped on disk, which
        ``PRAGMA integrity_check`` does not see) failed the whole read, every time, and nothing was delivered again.
        Such a row is an event that cannot be sent: dead-lettered with what its text holds."""
        with self.lock:
            rows = (
                self._reconnect()
                .execute(
                    "SELECT id, CAST(body AS BLOB) FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
                )
                .fetchall()
            )
        # not parsed here: the stored text is sent as is (a corrupt row is isolated by Lago's answer)
        return [_loaded(row_id, body) for row_id, body in rows], (rows[-1][0] if rows else after_id)

    def dead_letters(self) -> list[DeadLetter]:
        """The table's letters, then those of events never written that the write in progress holds (no id yet)."""
        query = f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters ORDER BY id"
        with self.lock:
            writing = self.letters_writing
            if self.conn is not None:
                rows = self.conn.execute(query).fetchall()
            elif os.path.exists(self.path or self.base_path):  # closed or not yet opened: read the file
                conn = sqlite3.connect(self.path or self.base_path)
                try:
                    rows = conn.execute(query).fetchall()
                finally:
                    conn.close()
            else:
                rows = []
        return [dead_letter_from_row(row) for row in rows] + writing

    def dead_bodies(self, after: int, limit: int) -> list[tuple[int, str]]:
        """(id, stored text) of up to ``limit`` dead letters after id ``after``, oldest first. A text that is no UTF-8
        (damaged on disk) is given with its bad bytes as ``\\xNN`` escapes: no JSON, so no event to replay."""
        with self.lock:
            rows: list[tuple[int, bytes]] = (
                self._reconnect()
                .execute(
                    "SELECT id, CAST(body AS BLOB) FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
                )
                .fetchall()
            )
        return [(row_id, _text(body) or "") for row_id, body in rows]

    def close(self) -> int:
        """Release the slot; how many events were lost with it: those of a file deleted while in use that could not be
        made again (:meth:`_keep_in_place`, said at ERROR)."""
        with self.lock:
            lost = 0
            if self.conn is not None:
                try:
                    self._keep_in_place()
                except sqlite3.Error as exc:
                    lost = self.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
                    logger.error(
                        "Shutdown: %s; the %d undelivered events it held are lost with it. Never remove a spool's "
                        "files while a process uses it.",
                        exc,
                        lost,
                    )
            self._release()
        return int(lost)

    def _release(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self._lock_fd is not None:
            _close_lock(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def forked(self) -> None:
        """In the child of a ``fork``: let go of the parent's slot. The child's copy of the lock descriptor is closed
        (by :func:`_close_inherited_locks`, with every other lock descriptor of the parent's: a flock is released
        when its last descriptor closes: the parent's keeps it, and the slot is free once the parent is gone, not
        once this child is too); the connection is never used here, nor closed (SQLite: a connection must not cross
        a fork; closing it could roll back the transaction a thread of the parent was writing). The thread lock,
        perhaps held by one of those threads, is made anew."""
        self.lock = threading.Lock()
        self._lock_fd = None
        self._closed_to_reopen = False
        if self.conn is not None:
            _keep_for_life(self.conn, self.path)
            self.conn = None


class _NoFileLocks(OSError):
    """The spool's volume takes no ``flock`` (some network and FUSE file systems)."""


class _OrphanOutOfDescriptors(OSError):
    """An orphan slot file (``filename``) could not be opened to be adopted: this process is out of descriptors (the
    cause: its lock's ``EMFILE``, or SQLite's SQLITE_CANTOPEN as it attached the file)."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.EMFILE, "out of file descriptors as it was adopted", path)


class _WalWithoutDatabase(OSError):
    """A slot's -wal file holds data, and its database file is missing or empty (deleted after a crash)."""

    def __init__(self, path: str, wal_bytes: int) -> None:
        super().__init__(errno.ENOENT, "a write-ahead log without its database", path)
        self.wal_bytes = wal_bytes


def _wal_without_database(path: str) -> int:
    """The size of the -wal file of ``path`` when it holds data and ``path`` is missing or empty (SQLite, opening
    such a database, resets the log: what it held is lost); else 0."""
    try:
        wal_bytes = os.stat(path + "-wal").st_size
    except OSError:
        return 0
    if not wal_bytes:
        return 0
    try:
        return 0 if os.stat(path).st_size else wal_bytes
    except FileNotFoundError:
        return wal_bytes
    except OSError:
        return 0  # (left to opening it to say what is wrong)


def sqlite_uri(path: str, mode: str) -> str:
    """The SQLite URI of the file ``path`` opened in ``mode`` (``ro``, ``rw``), quoted from the bytes the OS names it
    by: a name that is no UTF-8 (read by Python as surrogates) raised ``UnicodeEncodeError`` in ``quote()``."""
    return f"file:{urllib.parse.quote(os.fsencode(path))}?mode={mode}"


def _count_read_only(path: str) -> int | None:
    """The rows of the ``events`` table of the spool file ``path``, read without writing anything; None if that
    cannot be known (unreadable, not a spool, its -wal unreadable)."""
    uri = sqlite_uri(path, "ro")
    try:
        wal = os.stat(path + "-wal").st_size
    except FileNotFoundError:
        wal = 0
    except OSError:
        return None
    tries = [uri] if wal else [uri, uri + "&immutable=1"]  # (without a -wal, the file itself is the whole spool)
    for attempt in tries:
        try:
            conn = sqlite3.connect(attempt, uri=True, timeout=0)
        except sqlite3.Error:
            continue
        try:
            return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        except sqlite3.Error:
            continue
        finally:
            conn.close()
    return None


def _backlog_left(base_path: str) -> str:
    """What keeping events in memory instead of the spool at ``base_path`` leaves behind, to append to that advice:
    the events its files hold, counted if they can be read, else said in general terms ("" when it has none)."""
    try:
        counts = [_count_read_only(file) for _slot, file in spool_slot_files(base_path)]
    except OSError:  # (its directory not listed: out of descriptors) said in general terms, not raised instead
        counts = [None]
    until = "until a process that can write it starts with LAGO_SPOOL_PATH set to it"
    if None in counts:
        return f" (any undelivered events the spool file holds would then stay in it, undelivered, {until})"
    total = sum(count or 0 for count in counts)
    if total:
        return f" (the {total} undelivered events the spool file holds would then stay in it, {until})"
    return ""


class _NotASpool(sqlite3.DatabaseError):
    """An SQLite database that is no spool this version can write: another program's, or a spool of another schema."""


def _check_regular_file(path: str) -> None:
    """Raise :class:`_NotASpool` if ``path`` is a device, a FIFO or a socket: ``LAGO_SPOOL_PATH=/dev/null`` (tried to
    keep no spool) was opened by SQLite, whose "disk I/O error" was said as a full or failing volume, with advice to
    free space on ``/dev``. (A directory is refused as such by the opening.)"""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # (missing: the spool makes it; anything else is said by the opening)
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = (
        "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
        else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
    )  # fmt: skip
    raise _NotASpool(f"it is {kind}, not a file")


def _check_spool_schema(conn: sqlite3.Connection, schema: str = "main") -> None:
    """Raise :class:`_NotASpool` unless the database ``schema`` of ``conn`` (an attached orphan's too) is empty or a
    spool this version can read and write (:data:`_SPOOL_COLUMNS`). Used as a spool, or adopted, another program's
    database would have its ``events`` rows sent to Lago and deleted, or be read and written in vain (every event in
    memory only) with advice about disk space."""
    tables = [row[0] for row in conn.execute(f"SELECT name FROM {schema}.sqlite_master WHERE type = 'table'")]
    problems: list[str] = []
    foreign = sorted(
        name
        for name in tables
        if name not in _SPOOL_COLUMNS and name not in _OTHER_TABLES_ALLOWED and not name.startswith("sqlite_")
    )
    if foreign:
        problems.append(f"it holds tables no spool has ({', '.join(foreign)})")
    for table, needed in _SPOOL_COLUMNS.items():
        if table not in tables:
            continue
        # (cid, name, type, notnull, default, pk)
        columns = {row[1]: row for row in conn.execute(f"PRAGMA {schema}.table_info({table})")}
        missing = [name for name in needed if name not in columns]
        if missing:
            problems.append(f"its table {table} has no column {', '.join(missing)}")
        required = [name for name, row in columns.items() if name not in needed and row[3] and row[4] is None]
        if required:
            problems.append(
                f"its table {table} needs a value for column {', '.join(required)}, which this version does not write"
            )
    if problems:
        raise _NotASpool(
            "not an event spool: " + "; ".join(problems) + " (another program's database, or a spool of another "
            "version of lago-org-billing)"
        )


def _volume_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the spool's volume is full or failing: ENOSPC, a quota, a file size limit; SQLite's
    SQLITE_FULL, or an SQLITE_IOERR (a full volume as SQLite opens a WAL file: it cannot size its -shm file)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None)  # (Python 3.11+)
    if isinstance(name, str):
        return name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR")
    text = str(exc).lower()
    return "disk i/o error" in text or "disk is full" in text


def _out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by the process (or the system) running out of file descriptors: an ``EMFILE`` or
    ``ENFILE`` anywhere in its causes (anyio hides each connection attempt's error under "All connection attempts
    failed", in a cause or an exception group)."""
    return any(
        isinstance(each, OSError) and each.errno in (errno.EMFILE, errno.ENFILE) for each in _chain(exc, groups=True)
    )


def _cannot_open(exc: BaseException) -> bool:
    """Whether SQLite's ``exc`` is SQLITE_CANTOPEN, which does not say why (a directory it cannot write, or no file
    descriptor left for the database, its -wal or its -shm file)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None)  # (Python 3.11+)
    return name == "SQLITE_CANTOPEN" if isinstance(name, str) else "unable to open" in str(exc).lower()


def _descriptors_short(needed: int = 4) -> bool:
    """Whether this process cannot open the ``needed`` descriptors an opening spool takes (its slot lock, the database,
    its -wal and -shm files): what SQLITE_CANTOPEN meant then, rather than a directory it cannot write."""
    opened: list[int] = []
    try:
        for _ in range(needed):
            opened.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    finally:
        for fd in opened:
            os.close(fd)
    return False


def _damaged(exc: BaseException) -> bool:
    """Whether SQLite's ``exc`` says the file is damaged or not a database (SQLITE_CORRUPT, SQLITE_NOTADB)."""
    text = str(exc).lower()
    return type(exc) is sqlite3.DatabaseError or "malformed" in text or "not a database" in text


#: The slot lock descriptors this process holds open (its own slot's, an orphan's while it adopts it). A forked child
#: closes its copies at once (:func:`_close_inherited_locks`): a flock lasts as long as any copy of its descriptor, and
#: the child would hold the parent's slot for its own life. Changed only under ``_lock_fds_guard``, which ``fork``
#: takes first: no child is forked between a descriptor's opening and its being noted here (by a thread other than the
#: one opening the spool), nor between its closing and its removal (the child would close a number reused since).
_lock_fds: set[int] = set()
_lock_fds_guard = threading.RLock()


def _open_lock(path: str) -> int:
    with _lock_fds_guard:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        _lock_fds.add(fd)
    return fd


def _close_lock(fd: int) -> None:
    with _lock_fds_guard:
        _lock_fds.discard(fd)
        os.close(fd)


def _hold_locks_for_fork() -> None:
    _lock_fds_guard.acquire()


def _locks_forked_in_parent() -> None:
    _lock_fds_guard.release()


def _close_inherited_locks() -> None:
    """In a forked child: close its copies of the parent's slot lock descriptors (the parent keeps its locks)."""
    global _lock_fds_guard
    fds = list(_lock_fds)
    _lock_fds.clear()
    _lock_fds_guard = threading.RLock()  # (the parent's is held by the forking thread)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover - closed by the app meanwhile (a daemonizing library closing every fd)
            pass


if _flock is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_hold_locks_for_fork, after_in_parent=_locks_forked_in_parent, after_in_child=_close_inherited_locks
    )


#: Connections to spool files deleted while in use, never closed (see :meth:`_SpoolFile._make_again`).
_kept_open: list[sqlite3.Connection] = []


def _keep_open(conn: sqlite3.Connection) -> None:
    """Keep ``conn`` open for the life of the process, even as the interpreter exits (which would close it)."""
    _kept_open.append(conn)
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))
    except (ImportError, AttributeError, OSError):  # pragma: no cover - no ctypes (then at least never collected)
        pass


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None when there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` names the file open as ``fd``."""
    try:
        here, there = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_advice(exc: Exception, path: str) -> str:
    """What to do about a spool write failing with ``exc``."""
    if not isinstance(exc, sqlite3.Error):
        return "an unexpected error: please report it"
    text = str(exc).lower()
    if "locked" in text or "busy" in text:  # SQLITE_BUSY: this process's own writes never overlap
        return (
            "another program holds a write lock on it (an sqlite3 shell or a backup tool left in a transaction?): "
            "end that transaction"
        )
    if _damaged(exc):  # SQLITE_CORRUPT, SQLITE_NOTADB
        return (
            f"the file is damaged (sqlite3 {path} 'PRAGMA integrity_check'): stop this process (what waits in memory "
            "is sent to Lago as it stops), recover the file's events (sqlite3 .recover) and move it away"
        )
    if _out_of_descriptors(exc) or (_cannot_open(exc) and _descriptors_short(3)):
        # (the file made again, or opened again, with no descriptor left: not the volume's fault)
        return _OUT_OF_DESCRIPTORS
    if isinstance(exc, sqlite3.OperationalError):  # SQLITE_FULL, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN
        return "free space on its volume, or make it writable"
    return "an unexpected error: please report it"  # (an IntegrityError, a ProgrammingError: a defect here)


def _safe_dumps(event: JSON | str) -> str:
    try:
        return dumps_event(event)
    except (TypeError, ValueError):
        try:
            text = repr(event)
        except RecursionError:  # nested too deep for repr too: its outer levels, abbreviated
            text = reprlib.repr(event)
        return json.dumps({"repr": text})


def _loaded(row_id: int, body: bytes) -> Item:
    """A row of the events table, read as bytes, as an item carrying its stored text; one that is no UTF-8 (damaged
    on disk) as an event that cannot be sent, dead-lettered with what its text holds."""
    try:
        return Item(None, row_id, raw=body.decode())
    except UnicodeDecodeError as exc:
        reason = f"the spool's row {row_id} is not UTF-8 text (damaged on disk?): {exc}"
        return Item(_Unbuildable(reason, body=_text(body) or ""), row_id)


def _text(value: bytes | None) -> str | None:
    """A text column read as bytes (``CAST(... AS BLOB)``): decoded, a byte that is no UTF-8 (damaged on disk) as a
    ``\\xNN`` escape."""
    return None if value is None else value.decode(errors="backslashreplace")


def _loads_or_raw(body: str) -> JSON:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return {"body": body}
    return value if isinstance(value, dict) else {"body": value}


class _Once:
    """A spool write run in a worker thread, unless abandoned before the thread took it up: :meth:`abandon` says
    whether it was too late (the write runs, or ran). A write that ran keeps its outcome (``result`` or ``error``),
    ``done`` set once it is known: what its caller, cancelled meanwhile, settles later."""

    def __init__(self, write: Callable[..., Any]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._state = 0  # 1: started, 2: abandoned
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def __call__(self, *args: Any) -> Any:
        with self._lock:
            if self._state == 2:
                return None
            self._state = 1
        try:
            self.result = self._write(*args)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.done.set()
        return self.result

    def abandon(self) -> bool:
        with self._lock:
            if self._state == 0:
                self._state = 2
            return self._state == 1


#: In the child of a ``fork``: (device, inode) of the files those connections hold. SQLite shares its state of a file
#: (the locks held, a write in progress among them) among the connections of a process to it: a connection of the
#: child's own to one of them would share the locks the parent held at the fork ('database is locked' for ever). The
#: child never opens them again, nor adopts them: they are left to another process.
_inherited_files: set[tuple[int, int]] = set()


def _inherited(path: str) -> bool:
    """Whether ``path`` is the file of a connection this forked child inherited (:data:`_inherited_files`)."""
    if not _inherited_files:
        return False
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) in _inherited_files


def _keep_for_life(conn: sqlite3.Connection, path: str) -> None:
    """Keep the parent's ``conn`` in this forked child, never closed: not even as the interpreter exits, where a
    module's list is cleared and sqlite3 closes what it frees. Closed here, a connection copied while a thread of the
    parent was writing would roll that write back, rewriting the WAL index the parent shares (the shm file is mapped
    in both): its spool would be corrupt. One reference more, never given back, and the connection is never freed."""
    _forks.left_by_parent.append(conn)
    try:
        stat = os.stat(path)
        _inherited_files.add((stat.st_dev, stat.st_ino))
    except OSError:  # (removed: nothing to open again)
        pass
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))
    except (ImportError, AttributeError, OSError):  # pragma: no cover - no ctypes (then at least never collected)
        pass


class SqliteOutbox(Outbox):
    """The durable spool (see the module docstring). ``capacity`` bounds the events waiting for a commit;
    ``window`` bounds the rows of the file held in memory for delivery (waiting in the window, or in flight).

    A file that cannot be written (a full disk, a volume gone read-only) is tried again with a backoff; the events a
    failed write took are sent to Lago from memory meanwhile (within ``capacity``), and those Lago has not taken yet
    are written with the next write that succeeds (durable from then on: not in memory only until Lago is back); the
    dead letters of those Lago rejects wait in memory for that write too (the last ``_MEMORY_DEAD_LETTERS``, as the
    memory outbox keeps them: the oldest are forgotten beyond, counted in ``dead_evicted``, logged); rows of the file's
    backlog are loaded for delivery only while at most ``capacity`` resolutions (deletes, dead letters) wait for a
    write, so memory does not grow with the backlog. At shutdown those
    neither delivered nor written are lost (counted: :meth:`close` returns how many). A failed read is tried again
    too."""

    durable = True

    def __init__(self, path: str, *, capacity: int = 100_000, window: int = 2_000, synchronous: str = "FULL") -> None:
        super().__init__(capacity)
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.file = _SpoolFile(path, synchronous.upper())
        self.window_size = max(window, 1)
        self.pending: list[tuple[int, EventOrBuilder | str]] = []
        #: Events :meth:`close` could not keep (a spool never opened), also when it raised: the pipeline counts them.
        self.lost_at_close = 0
        self._to_delete: list[int] = []
        self._to_dead: list[tuple[int, DeadLetter]] = []
        # replayed dead letters (id, stored text), deleted with the commit that writes their events; and the ids of
        # those events, never sent before they are written (their letters would stay, or go with nothing written)
        self._revived: list[tuple[int, str, int]] = []  # replayed letters: (id, text, the id of their event)
        self._replayed: set[int] = set()
        self._next_id = 1
        self._rows = 0  # rows in the file (committed, not yet deleted)
        self._loaded_upto = 0  # highest id put into the window (or beyond, in flight / resolved)
        self._committed_upto = 0
        self._writing = (0, 0)  # (rows inserted, rows removed) by the commit in progress
        self._io: anyio.Lock | None = None
        self._checked_at = time.monotonic()  # the files' last check between writes (:meth:`_idle_check`)
        self._opened = False
        self.adopted = 0
        self._write_errors = _Streak()
        #: A load found the window's room taken by the rows held for delivery (:meth:`_room`): the answers of the
        #: batches in flight wake the dispatcher to load once they leave room (:meth:`_answered`).
        self._short = False
        self._read_errors = _Streak()
        self._closing = False
        # with a file that cannot be written: the ids of the events sent from memory, never written, and the dead
        # letters of those Lago rejected (written by the next commit that succeeds); those of the first kind in
        # ``pending`` again (taken back to be written: :meth:`_requeue_unwritten`), and in the commit in progress
        self._unwritten: set[int] = set()
        self._unwritten_dead: collections.deque[DeadLetter] = collections.deque()
        #: Dead letters of events sent from memory forgotten, the oldest first, past ``_MEMORY_DEAD_LETTERS`` waiting
        #: for a write (a volume that stays full while Lago rejects every event): as the memory outbox's list.
        self.dead_evicted = 0
        self._evictions = _Streak()
        self._requeued = 0
        self._rewriting = 0
        # a write whose commit was cancelled natively (an event loop ending) once its thread had started it: what it
        # took, settled by its outcome (:meth:`_settle_orphan`); and whether a rewind came meanwhile
        self._orphan: tuple[_Once, list[Any], list[int], list[tuple[int, DeadLetter]], list[Any], list[Any]] | None
        self._orphan = None
        self._orphan_rewound = False
        #: Rows resolved (delivered, dead-lettered) whose resolution no commit had written when a run was rewound (a
        #: full volume): still in the file, not loaded again (see :meth:`rewind`).
        self._resolved_rows: set[int] = set()
        self._resolved_upto = 0  # (the highest of them)
        _forks.track(self)

    def _forked(self) -> None:
        """In the child of a ``fork`` (see the module docstring): an opened spool is the parent's. The child lets go
        of its slot and starts over, empty and unopened (what this outbox held is the parent's to deliver; kept
        referenced, not freed: no copy-on-write of its pages); a spool never opened is kept as it is, unless it holds
        events (submitted before the parent's pipeline first ran): those are the parent's too, which commits and
        delivers them as its pipeline runs. Kept, the child running the pipeline it inherited sent each of them again
        (and Lago, whose batches are atomic, refused the child's own events sent with them as duplicates)."""
        file = self.file
        opened = self._opened or file.conn is not None or file._lock_fd is not None
        file.forked()
        if not opened and not self.pending:
            return
        _forks.left_by_parent.append(vars(self).copy())
        on_ready, on_dead_written = self.on_ready, self.on_dead_written
        SqliteOutbox.__init__(
            self, file.base_path, capacity=self.capacity, window=self.window_size, synchronous=file.synchronous
        )
        self.on_ready, self.on_dead_written = on_ready, on_dead_written

    @property
    def path(self) -> str:
        """The slot file this process owns (``LAGO_SPOOL_PATH`` itself unless another process holds it)."""
        return self.file.path

    # ------------------------------------------------------------- loop side

    def put(self, event: EventOrBuilder) -> bool:
        if len(self.pending) >= self.capacity or (
            (self._unwritten or self._rewriting)
            and len(self.pending) + len(self._unwritten) + self._rewriting >= self.capacity
        ):
            return False  # (those sent unwritten wait in memory too, as they are written again)
        self.pending.append((self._next_id, event))
        self._next_id += 1
        return True

    def resolve(self, items: list[Item]) -> None:
        if self._unwritten:  # (a shutdown with a file that cannot be written) events sent unwritten have no row
            unwritten = self._unwritten
            self._to_delete.extend(item.id for item in items if item.id not in unwritten)
            unwritten.difference_update(item.id for item in items)
        else:
            self._to_delete.extend(item.id for item in items)
        self.in_flight -= len(items)
        if self._short:
            self._answered()

    def dead(self, item: Item, letter: DeadLetter) -> None:
        self.in_flight -= 1
        if item.id in self._unwritten:
            self._unwritten.discard(item.id)
            self._unwritten_dead.append(letter)
            if len(self._unwritten_dead) > _MEMORY_DEAD_LETTERS:
                self._forget_unwritten_dead()
        else:
            self._to_dead.append((item.id, letter))
        if self._short:
            self._answered()

    def _answered(self) -> None:
        """Batches in flight were answered after a load found no room for them (:meth:`_room`): once they leave room,
        the dispatcher is woken to load (not left to its next timeout or the spool task's next commit window)."""
        if self._free() >= self._low_water:
            self._short = False
            self.on_ready()

    def _free(self) -> int:
        """The window's room: rows it may still hold, those waiting in it and those in flight counted."""
        return self.window_size - len(self.window) - self.in_flight

    @property
    def _low_water(self) -> int:
        """The least room a load waits for (half the window): it then reads enough rows to be worth a trip to the
        file."""
        return max(self.window_size // 2, 1)

    def _forget_unwritten_dead(self) -> None:
        """Keep the last ``_MEMORY_DEAD_LETTERS`` dead letters waiting in memory for a write (their events were never
        written: the file cannot be), as the memory outbox keeps its list: memory stays bounded however long the
        volume stays full while Lago rejects events. Those forgotten are counted, and logged at a bounded rate."""
        letters = self._unwritten_dead
        excess = len(letters) - _MEMORY_DEAD_LETTERS
        if excess <= 0:
            return
        for _ in range(excess):
            oldest = letters.popleft()
        self.dead_evicted += excess
        if self._evictions.hit():
            logger.error(
                "The event spool %s cannot be written, and the dead letters waiting in memory for it are at their cap "
                "(%d): forgetting the oldest (%s); %d forgotten so far (Lago's rejections were logged). Free space on "
                "its volume or make it writable: the letters kept are written then.",
                self.path,
                _MEMORY_DEAD_LETTERS,
                oldest.reason,
                self.dead_evicted,
            )

    def unresolved(self) -> int:
        added, removed = self._writing
        return (
            len(self.pending)
            + len(self._unwritten)
            + added
            + self._rows
            - removed
            - len(self._to_delete)
            - len(self._to_dead)
        )

    def spool_depth(self) -> int:
        return self._rows

    def dead_letter_count(self) -> int:
        """The letters of the spool's table (as of its last commit, or open), with those of events never written that
        wait in memory for a write (the file could not be written)."""
        file = self.file
        return file.dead_count + len(file.letters_writing) + len(self._unwritten_dead)

    def dead_letters(self) -> list[DeadLetter]:
        """The spool's ``dead_letters`` table (a short blocking read: not for the request path), then the letters of
        events sent from memory that wait for a write (the file could not be written), with no ``id`` yet."""
        return self.file.dead_letters() + list(self._unwritten_dead)

    async def replay_dead(self, ids: set[int] | None) -> int:
        await self.open()
        assert self._io is not None
        chosen: list[tuple[int, str]] = []
        if ids is not None and not ids:
            return 0
        # Letters named by id: only the span of ids they are in is read (ordered by id), not the whole table: paged
        # from its first letter, a replay of one letter of a million read the file whole (half a gigabyte), holding
        # the commits (below) meanwhile, the events submitted not durable for as long.
        after = 0 if ids is None else max(min(ids) - 1, 0)
        last = None if ids is None else max(ids)
        async with self._io:  # not while a commit is writing (it may be deleting letters replayed before)
            if self._orphan is not None:  # (nor while a cancelled commit's write may be)
                await self._settle_orphan()
            # (read once no commit holds them: one that fails puts the letters it took back among those waiting)
            waiting = {dead_id for dead_id, _, _ in self._revived}
            room = self.capacity - len(self.pending) - len(self._unwritten) - self._rewriting
            while len(chosen) < room and (last is None or after < last):  # page through the table: it may be large
                rows = await anyio.to_thread.run_sync(self.file.dead_bodies, after, 500, limiter=_threads())
                if not rows:
                    break
                after = rows[-1][0]
                chosen += [
                    (dead_id, body)
                    for dead_id, body in rows
                    if (ids is None or dead_id in ids) and dead_id not in waiting and _replayable(_loads_or_raw(body))
                ]
        chosen = chosen[: max(room, 0)]
        for dead_id, body in chosen:
            # the stored text, as it is: the event goes back to the events table in the commit that deletes its letter
            self.pending.append((self._next_id, body))
            self._replayed.add(self._next_id)
            self._next_id += 1
            self._revived.append((dead_id, body, self._next_id - 1))
        return len(chosen)

    # ------------------------------------------------------------ thread side

    async def open(self) -> None:
        if self._opened:
            return
        self._io = anyio.Lock()
        count, max_id, self.adopted = await anyio.to_thread.run_sync(self.file.open, limiter=_threads())
        self._opened = True
        self._rows = count
        # ids assigned before open (events submitted early) are renumbered after the existing rows
        first = max_id + 1
        self.pending = [(first + index, event) for index, (_, event) in enumerate(self.pending)]
        self._next_id = first + len(self.pending)
        self._committed_upto = max_id
        if count:
            logger.info("Spool %s holds %d undelivered events: delivering them first", self.path, count)

    async def commit(self) -> None:
        await self._commit(last=False)

    async def _commit(self, *, last: bool) -> None:
        if not self._opened:
            return
        if self._unwritten and not last and not self._write_errors.waiting():
            self._requeue_unwritten()  # (the volume may take writes again: then they are durable from now on)
        if not (self.pending or self._to_delete or self._to_dead or self._unwritten_dead or self._orphan):
            if self._writing != (0, 0) and self._io is not None:
                # another commit is writing rows or resolutions, already counted as done by unresolved(): this one
                # returns once they are in the file (flush() says the spool is empty only then, not before)
                async with self._io:
                    pass
            await self._idle_check()
            return  # (replayed letters wait on their events in ``pending``)
        if not last and self._write_errors.waiting():
            return  # the file failed to write: tried again after a backoff, not at every commit window
        assert self._io is not None
        async with self._io:
            if self._orphan is not None:
                await self._settle_orphan()
                if not (self.pending or self._to_delete or self._to_dead or self._unwritten_dead):
                    return
                if not last and self._write_errors.waiting():
                    return  # it failed (a full volume): written again after the backoff, one attempt at a time
            rows = [(row_id, _built_or_unbuildable(event)) for row_id, event in self.pending]
            self.pending = []
            deletes, self._to_delete = self._to_delete, []
            dead, self._to_dead = self._to_dead, []
            revived, self._revived = self._revived, []
            letters = self.file.letters_writing = list(self._unwritten_dead)
            self._unwritten_dead.clear()
            self._writing = (len(rows), len(deletes) + len(dead))
            self._rewriting, self._requeued = self._requeued, 0
            write = _Once(self.file.write)
            try:
                # shielded whole: cancelled while it waits for a worker thread (before anyio's own shield), it would
                # drop what it took from memory above, events included, uncounted
                with anyio.CancelScope(shield=True):
                    encoded, unencodable, vanished = await anyio.to_thread.run_sync(
                        write, rows, deletes, dead, revived, letters, limiter=_threads()
                    )
            except Exception as exc:  # (sqlite3.Error; anything else would lose the window's events: kept too)
                # sent from memory (Lago may well be up) rather than held there for a volume that may stay full
                # until memory is full too and new events are dropped; not by the run's last commit (nothing sends)
                sent = self._take_back(rows, deletes, dead, revived, letters, send=not last)
                self._write_failed(exc, sent=sent)
                return
            except BaseException:  # a native cancellation (an event loop ending), which anyio's shield lets through
                if not write.abandon():  # never written: kept for the next commit (the run's last one, at the latest)
                    self._take_back(rows, deletes, dead, revived, letters, send=False)
                else:  # being written by its thread: its outcome decides, settled by the next commit (or close)
                    # (counted as being written meanwhile: ``_writing``; counted written, a write that then failed
                    # would lose its events uncounted)
                    self._orphan, self._orphan_rewound = (write, rows, deletes, dead, revived, letters), False
                raise
            self._replayed.clear()  # (every replayed event was among the rows just written)
            self._written(rows, unencodable, deletes, dead, vanished)
            self._hand_over(rows, dict(encoded))

    async def _idle_check(self) -> None:
        """Nothing to write: its files are still checked, every ``_IDLE_CHECK`` seconds, so that a spool deleted while
        idle (Lago down, no traffic) is made again with its backlog before a crash would take it, not at the next
        write."""
        now = time.monotonic()
        if now - self._checked_at < _IDLE_CHECK or self._io is None or self._write_errors.waiting():
            return
        self._checked_at = now
        async with self._io:
            try:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.file.keep_in_place, limiter=_threads())
            except sqlite3.Error:  # (cannot be made again now: the next write fails visibly, and is retried)
                logger.debug("The spool %s could not be checked between writes", self.file.path, exc_info=True)

    def _written(
        self,
        rows: list[tuple[int, JSON | str]],
        unencodable: list[int],
        deletes: list[int],
        dead: list[Any],
        vanished: list[int],
    ) -> None:
        """A commit's write succeeded: its rows are in the file, its resolutions recorded."""
        self._writing = (0, 0)
        self._rewriting = 0
        if self._write_errors.count:
            self._write_errors.end("The event spool %s is written", self.path)
        self._rows += len(rows) - len(unencodable) - len(vanished) - len(deletes) - len(dead)
        if vanished:
            logger.warning(
                "%d replayed dead letters of the spool %s were deleted by another process (dead-letters --purge or "
                "--replay) before this one wrote their events back: not sent (a purged letter is never sent, a "
                "replayed one was sent by that replay)",
                len(vanished),
                self.path,
            )
        if unencodable:
            self.dead_on_write += len(unencodable)
            logger.error(
                "%d events could not be built or serialised and went to the dead letters (reasons kept there)",
                len(unencodable),
            )
            self.on_dead_written(len(unencodable))

    async def _settle_orphan(self) -> None:
        """Under ``_io``: the outcome of a write whose commit was cancelled natively once its thread had started it
        (:meth:`_commit`). Written: its rows are counted (loaded from the file, not handed over: a new run may have
        rewound the window). Failed (a full volume): what it took goes back, its events to be written by this commit,
        or counted lost at close if the file never takes them (not lost uncounted); its resolutions too, for the next
        write to record, their rows not loaded again after a rewind (dropped, each was sent again: a delivered event
        counted twice, a rejected one dead-lettered twice)."""
        assert self._orphan is not None
        write, rows, deletes, dead, revived, letters = self._orphan
        with anyio.CancelScope(shield=True):  # (the thread is writing: a short wait, off the event loop)
            await anyio.to_thread.run_sync(write.done.wait, limiter=_threads())
        self._orphan = None
        if write.error is None:
            _, unencodable, vanished = write.result
            self._replayed.difference_update(row_id for row_id, _ in rows)
            self._written(rows, unencodable, deletes, dead, vanished)
            if rows:
                self._committed_upto = max(self._committed_upto, rows[-1][0])
            return
        if self._orphan_rewound:  # (a new run reads the file again: their rows, still there, are not loaded again)
            self._resolved_rows.update([*deletes, *(row_id for row_id, _ in dead)])
            self._resolved_upto = max(self._resolved_rows, default=0)
        self._take_back(rows, deletes, dead, revived, letters, send=False)
        if isinstance(write.error, Exception):
            self._write_failed(write.error, sent=0)

    def _take_back(
        self,
        rows: list[tuple[int, JSON | str]],
        deletes: list[int],
        dead: list[tuple[int, DeadLetter]],
        revived: list[tuple[int, str, int]],
        letters: list[DeadLetter],
        *,
        send: bool,
    ) -> int:
        """What a commit took and did not write goes back for the next one (or is sent unwritten: ``send``); how many
        events were sent unwritten."""
        self._writing = (0, 0)
        if not send:
            self._requeued += self._rewriting
        self._rewriting = 0
        self._to_delete[:0] = deletes
        self._to_dead[:0] = dead
        self._revived[:0] = revived
        self.file.letters_writing = []
        self._unwritten_dead.extendleft(reversed(letters))
        self._forget_unwritten_dead()
        if send:
            return self._send_unwritten(rows)
        self.pending[:0] = rows  # (as JSON text when encoded: the next attempt does not encode them again)
        return 0

    def _write_failed(self, exc: Exception, *, sent: int) -> None:
        """Said when the failures start, then once a minute: a line per attempt would flood the log."""
        errors = self._write_errors
        if not errors.hit():
            return
        advice = _write_advice(exc, self.path)
        logger.error(
            "Could not write the event spool %s%s (%s: %s): %s. Meanwhile events are sent to Lago from memory (%d "
            "now), where they wait for Lago (beyond %d waiting, new ones are dropped); the write is tried again every "
            "%.0f s at most.",
            self.path,
            errors.lasting(),
            type(exc).__name__,
            exc,
            advice,
            sent,
            self.capacity,
            _RETRY_MAX,
        )

    def closing(self) -> None:
        self._closing = True
        if self._write_errors.count and self.pending:  # the file fails: no use waiting for its next attempt
            rows = [(row_id, _built_or_unbuildable(event)) for row_id, event in self.pending]
            self.pending, self._requeued = [], 0
            self._send_unwritten(rows)

    def _send_unwritten(self, rows: list[tuple[int, JSON | str]]) -> int:
        """The file cannot be written (a full or read-only volume, or at shutdown): the events waiting for it are sent
        from memory (Lago may well be up) rather than wait for a write that may not come, lost if this process dies
        before Lago has them, as they would be waiting; :meth:`close` tries to write those left, once. A replayed dead
        letter's event keeps waiting: its letter is deleted only with the write of it, in its place by id among the
        events submitted meanwhile (written out of id order, the rows after it would not be loaded: see
        :meth:`_hand_over`). Returns how many events are sent."""
        items: list[Item] = []
        waiting: list[tuple[int, EventOrBuilder | str]] = []
        for row_id, event in rows:
            if row_id in self._replayed:
                waiting.append((row_id, event))
            else:
                items.append(Item(None, row_id, raw=event) if isinstance(event, str) else Item(event, row_id))
        if waiting:
            self.pending = list(heapq.merge(waiting, self.pending, key=operator.itemgetter(0)))
        if not items:
            return 0
        if self._closing:
            logger.warning(
                "Shutdown: the event spool %s cannot be written; its %d waiting events are sent to Lago from memory",
                self.path,
                len(items),
            )
        else:  # (said with the write's error, once a minute at most: then only counted at debug level)
            (logger.warning if not self._write_errors.count else logger.debug)(
                "The event spool %s cannot be written: %d events are sent to Lago from memory meanwhile (lost if this "
                "process dies before Lago has them)",
                self.path,
                len(items),
            )
        self._unwritten.update(item.id for item in items)
        if not self.window:
            self.ready_since = time.monotonic()
        self.window.extend(items)
        self.on_ready()
        return len(items)

    def _requeue_unwritten(self) -> None:
        """Events sent from memory because the file could not be written (:meth:`_send_unwritten`) and waiting in the
        window (Lago down too) go back among those to write, under new ids (their own may be below the rows already
        loaded from the file, which the window would never load again): once the volume takes writes again they are
        in the file, and survive a crash, not in memory only until Lago takes them. Those in flight stay as they are
        (taken back here if Lago does not take them). Should the write fail again, they are sent from memory again."""
        unwritten = self._unwritten
        if not unwritten or not self.window:
            return
        kept: collections.deque[Item] = collections.deque()
        back: list[tuple[int, EventOrBuilder | str]] = []
        for item in self.window:
            if item.id not in unwritten:
                kept.append(item)
                continue
            unwritten.discard(item.id)
            event = item.raw if item.raw is not None else item.event
            assert event is not None
            back.append((self._next_id, event))
            self._next_id += 1
        if back:
            self.window = kept
            self.pending.extend(back)
            self._requeued += len(back)

    def _hand_over(self, rows: list[tuple[int, JSON | str]], encoded: dict[int, str]) -> None:
        """Just-committed rows go straight to the window when nothing older waits on disk."""
        if not rows:
            return
        first, last = rows[0][0], rows[-1][0]
        no_backlog = self._loaded_upto == self._committed_upto == first - 1
        self._committed_upto = last
        if no_backlog and len(self.window) + len(rows) <= self.window_size:
            was_empty = not self.window
            self.window.extend(
                Item(event if isinstance(event, dict) else None, row_id, raw=encoded[row_id])
                for row_id, event in rows
                if row_id in encoded
            )
            self._loaded_upto = last
            if was_empty and self.window:
                self.ready_since = time.monotonic()
            self.on_ready()

    def rewind(self) -> None:
        """A new run after one was cancelled: what was loaded or in flight then is forgotten (its rows are still in the
        file, committed by the cancelled run) and read again from the first row, but the rows already resolved; and the
        events sent from memory (the file could not be written), which no file holds, go back among those to write."""
        if self._unwritten:
            self._requeue_unwritten()
            self._unwritten.clear()  # (none in flight: a cancelled run puts back what it was sending)
        self._orphan_rewound = self._orphan is not None
        self.window.clear()
        self.in_flight = 0
        self._loaded_upto = 0
        # Resolutions a failed commit did not write (a full volume) stay, for the next write to record: their rows,
        # still in the file, are not loaded again. Forgotten, they were: each sent again, a delivered event counted
        # delivered twice (and a duplicate), a rejected one dead-lettered twice (two letters for one event).
        self._resolved_rows = {*self._to_delete, *(row_id for row_id, _ in self._to_dead)}
        self._resolved_upto = max(self._resolved_rows, default=0)

    @property
    def needs_commit(self) -> bool:
        """Loading waits for a commit to record the rows resolved (see :meth:`fill`) and the file takes writes: the
        pipeline commits now rather than at the end of its commit window (a small ``capacity`` would otherwise drain a
        backlog one window of rows per commit window)."""
        return len(self._to_delete) + len(self._to_dead) > self.capacity and not self._write_errors.count

    async def fill(self) -> None:
        if not self._opened or self._loaded_upto >= self._committed_upto or self._read_errors.waiting():
            return
        if not self._room():
            return
        assert self._io is not None
        async with self._io:
            if self._orphan is not None:  # (its rows may be deleted by it, or not be in the file)
                await self._settle_orphan()
            if self._loaded_upto >= self._committed_upto:
                return
            # measured again: while this load waited, another (the spool task's, the dispatcher's) may have filled the
            # window, and the rows resolved meanwhile (or given back by a failed write) may have paused the loading
            room = self._room()
            if not room:
                return
            try:
                items, last = await anyio.to_thread.run_sync(
                    self.file.load, self._loaded_upto, room, limiter=_threads()
                )
            except sqlite3.Error as exc:
                # Not raised: it would end the delivery tasks, and the app's lifespan they run in. The rows stay in
                # the file and the read is tried again after a backoff.
                self._read_failed(exc)
                return
            if self._read_errors.count:
                self._read_errors.end("The event spool %s is read", self.path)
            self._loaded_upto = last if items else self._committed_upto
            if self._resolved_rows:  # (after a rewind: rows resolved, not yet deleted from the file)
                resolved = self._resolved_rows
                items = [item for item in items if item.id not in resolved]
                if self._loaded_upto >= self._resolved_upto:  # (loaded past them: never read again, but by a rewind)
                    self._resolved_rows = set()
            if items:
                if not self.window:
                    self.ready_since = time.monotonic()
                self.window.extend(items)
                self.on_ready()

    def _room(self) -> int:
        """How many rows of the file's backlog to load now: none while the loading is paused or while the rows held
        for delivery fill more than half the window; else as many as the window has room for.

        Paused while more rows are resolved than a commit has recorded (the file cannot be written: a full volume):
        each row resolved from here on would wait in memory for a write too (a delete, a dead letter carrying its
        event), carried by every attempt, as many as the backlog on disk holds. The rows stay in the file, loaded once
        a commit has recorded those (within a commit window when the file takes writes: see :attr:`needs_commit`).

        The rows in flight (taken into batches, waiting for Lago's answer) are rows of the spool held in memory too:
        not counted, a dispatcher that took its window into batches loaded as much again, and the resolutions waiting
        for a write reached ``capacity`` plus the window plus every batch in flight."""
        if len(self._to_delete) + len(self._to_dead) > self.capacity:
            return 0
        room = self._free()
        if room < self._low_water:
            self._short = True  # (the batches in flight make room as they are answered: :meth:`_answered`)
            return 0
        return room

    def _read_failed(self, exc: sqlite3.Error) -> None:
        """Said when the failures start, then once a minute."""
        errors = self._read_errors
        if not errors.hit():
            return
        logger.error(
            "Could not read the event spool %s%s (%s); %d undelivered events wait in it, and the read is tried "
            "again every %.0f s at most. If this lasts, check its volume, and the file (PRAGMA integrity_check).",
            self.path,
            errors.lasting(),
            exc,
            self._rows,
            _RETRY_MAX,
        )

    async def close(self) -> int:
        if not self._opened:
            if self.pending:  # submitted before the spool was ever opened: still make them durable
                try:
                    await self.open()
                except ConfigurationError as exc:
                    # Lost all the same: counted (lost_at_close, read by the pipeline even when this raises) and said
                    # with why and what to do. Out of file descriptors (as the opening found it: an EMFILE, or
                    # SQLITE_CANTOPEN while short of them), raised, it failed a shutdown that can do nothing about it
                    # (the steps after it not taken): returned. A path that is no spool is the configuration's: raised,
                    # as at start.
                    lost, self.pending = len(self.pending), []
                    self.lost_at_close += lost
                    logger.error(
                        "Shutdown: the %d events submitted before the event spool was opened cannot be written to it "
                        "and are lost: %s",
                        lost,
                        exc,
                    )
                    if not (_out_of_descriptors(exc) or _descriptors_short()):
                        raise
                    return lost
            else:  # (an opening cut short may have locked a slot all the same)
                await anyio.to_thread.run_sync(self.file.close, limiter=_threads())
                return 0
        with anyio.CancelScope(shield=True):
            self._take_back_unwritten()
            await self._commit(last=True)
            lost = self._give_up_unwritten()
            # (a file deleted in use, not made again)
            gone = await anyio.to_thread.run_sync(self.file.close, limiter=_threads())
            self._rows -= gone
            lost += gone
        self._opened = False
        return lost

    def _take_back_unwritten(self) -> None:
        """Events sent unwritten (:meth:`_send_unwritten`) and not delivered go back among those to write, for the
        last attempt."""
        if not self._unwritten:
            return
        unwritten = self._unwritten
        back: list[tuple[int, EventOrBuilder | str]] = []
        kept: collections.deque[Item] = collections.deque()
        for item in self.window:
            if item.id not in unwritten:
                kept.append(item)
            elif item.raw is not None:
                back.append((item.id, item.raw))
            elif isinstance(item.event, dict):
                back.append((item.id, item.event))
        self.window = kept
        unwritten.difference_update(row_id for row_id, _ in back)
        self.pending[:0] = back

    def _give_up_unwritten(self) -> int:
        """After the last commit: how many events it could not write (lost, but replayed dead letters: those stay
        letters) with what is still unwritten; forgotten."""
        lost = sum(1 for row_id, _ in self.pending if row_id not in self._replayed) + len(self._unwritten)
        if self._unwritten_dead:
            logger.error(
                "Shutdown: %d dead letters could not be written to the event spool %s and are lost (Lago's "
                "rejections were logged above)",
                len(self._unwritten_dead),
                self.path,
            )
        self.pending, self._revived = [], []
        self._unwritten_dead.clear()
        self._requeued = 0
        self._replayed.clear()
        self._unwritten.clear()
        return lost
