"""The ``lago-org-billing dead-letters`` command: list the dead letters of a spool, count them by reason, send them
to Lago again, or delete them.

``dead-letters [--spool PATH] [--json]`` lists the dead letters of every slot file of the spool
(``LAGO_SPOOL_PATH`` by default), whether or not a live process owns it; ``--summary`` counts them by status, code and
reason; ``--reason TEXT`` keeps only those whose reason or code holds TEXT (any case). ``--purge`` deletes those
selected (Lago never gets them), once confirmed: ``--yes``, or an answer on a terminal.

``--replay [--id ID ...]`` sends them (all, or those named) to the Lago of ``LAGO_API_URL``/``LAGO_API_KEY`` with
their stored text, so an event Lago did take after all is a duplicate there, not a second charge. Then, once every one
has an answer, the delivered letters are deleted and those rejected again get Lago's new reason; if Lago does not
answer for all of them within ``--timeout``, nothing is changed and a later run sends them again. A replayed event
keeps its timestamp: one Lago stores but will never bill (from a billing period before its subscription's current one,
already invoiced unless its invoice is still a draft; before the subscription starts; no subscription) is said, with
what to do. A replay or purge holds ``PATH.dead-letters.lock`` for its run: a second one started meanwhile (another
shell, another worker) does nothing and says so.

The same from Python: :func:`replay_spool_dead_letters` (of :func:`read_spool_dead_letters` or
:func:`find_spool_dead_letters`) holds the same lock (:class:`DeadLettersBusyError` while another replay or purge
runs), sends only the letters still in the spool, and logs at WARNING what the command prints as warnings. In every
case a chunk's letters are deleted only once Lago has answered for all of them and the billing periods of those it
took are checked: one interrupted before leaves them to the next replay, which sends the stored text again (same
``transaction_id``, subscription and timestamp: Lago's Postgres store answers 422 ``value_already_exist``, counted as
a duplicate, its ClickHouse store replaces the row) and reports them.

In-memory dead letters live only in their process: ``EventPipeline.replay_dead_letters()`` replays those.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import decimal
import functools
import json
import logging
import os
import pickle
import re
import sqlite3
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import anyio

from ._client import LagoClient
from ._delivery import EventPipeline
from ._errors import (
    ConfigurationError,
    LagoAPIError,
    LagoAuthenticationError,
    LagoIntegrationError,
    LagoNotFoundError,
)
from ._ids import parse_time, printable
from ._migration import drop_file_lock, take_file_lock
from ._run import run_main
from ._settings import BillingSettings
from ._spool import DEAD_LETTER_COLUMNS, DeadLetter, dead_letter_from_row, spool_slot_files, sqlite_uri

__all__ = [
    "DeadLettersBusyError",
    "ReplayReport",
    "SpoolDeadLetter",
    "add_dead_letters_command",
    "find_spool_dead_letters",
    "read_spool_dead_letters",
    "replay_spool_dead_letters",
]

logger = logging.getLogger("lago_org_billing.dead_letters")

_EPILOG = "\n".join(
    textwrap.fill(paragraph, 79)
    for paragraph in (
        "IDs are the letters' row ids, prefixed by the slot (\"2:17\") for the spool's other slot files (PATH.2 ...).",
        "--replay sends them to the Lago of LAGO_API_URL (base URL, without /api/v1) with LAGO_API_KEY, read from the "
        "environment, else from ./.env (as the app reads them: the other LAGO_* variables there must be valid too, and "
        "LAGO_API_TIMEOUT, LAGO_MAX_RETRIES apply to its calls); listing needs neither. Check that Lago first with "
        "`lago-org-billing health`.",
        "Exit codes: 0 done (every replayed letter delivered); 1 some were rejected again, Lago did not answer in "
        "time, a spool file changed meanwhile, or another --replay/--purge of the spool is running (nothing lost: they "
        "stay dead letters; run again); 2 no spool, a file that is not a spool or is locked, unknown ids, settings "
        "missing, --timeout <= 0, or Lago refusing the API key (nothing sent), or --purge without --yes where no "
        "terminal can confirm (nothing deleted); 1 also --purge answered no; 130 interrupted (Ctrl-C: run again, "
        "events Lago took count as duplicates).",
        "--id, --reason TEXT, --subscription ID and --since/--until TIME select the letters listed, counted "
        "(--summary), replayed or purged. --purge deletes them for good (Lago never gets them: list them first); it "
        "asks on a terminal, and needs --yes elsewhere.",
        "A replayed event keeps its timestamp: one Lago stores but never bills (a billing period before its "
        "subscription's current one, invoiced unless its invoice is still a draft; before the subscription starts; "
        'no subscription) is listed after the replay (--json: "unbilled"): bill it by hand (a one-off invoice, or '
        "an adjustment of the next one).",
    )
)


@dataclasses.dataclass(frozen=True)
class SpoolDeadLetter:
    """A dead letter as stored in one slot file of a spool: the letter, and its stored text."""

    file: str
    slot: int
    letter: DeadLetter
    body: str

    @property
    def key(self) -> str:
        """How the command names it: the row id, prefixed by the slot for slot files other than the first."""
        return f"{self.letter.id}" if self.slot == 0 else f"{self.slot}:{self.letter.id}"


@dataclasses.dataclass
class ReplayReport:
    """What a replay did: letters sent, of which delivered (``duplicates`` already in Lago) or rejected again,
    letters skipped (no whole event), letters left as they were because their spool file changed (or another replay
    or purge of it ran) meanwhile, letters gone from their spool file when their turn came (replayed, purged or moved
    by another run since they were read: not sent), and whether Lago answered for every letter sent in time (if not,
    the letters of the unanswered thousand and after are left as they were)."""

    sent: int = 0
    delivered: int = 0
    duplicates: int = 0
    rejected: list[SpoolDeadLetter] = dataclasses.field(default_factory=list)
    skipped: list[SpoolDeadLetter] = dataclasses.field(default_factory=list)
    unchanged: int = 0
    gone: int = 0
    complete: bool = True
    #: Letters delivered that Lago stores but will not bill, with why and the start of their subscription's current
    #: billing period (when there is one).
    unbilled: list[tuple[SpoolDeadLetter, str, str | None]] = dataclasses.field(default_factory=list)
    #: Letters delivered whose subscription could not be read from Lago (not checked against its billing period).
    unchecked: int = 0
    unchecked_reason: str = ""


#: A subscription not read within the replay's time (see _check_billing_periods).
_NOT_READ = object()

#: Letters read from a spool file, and replayed, at a time: memory stays bounded whatever the table holds.
CHUNK = 1_000

#: Seconds to wait for a spool file another process holds locked (its owner's commits take milliseconds).
BUSY_TIMEOUT = 30.0

#: A letter's key: its row id, or SLOT:ID (at most 100 digits each: ``int()`` refuses more than 4,300).
_ID = re.compile(r"(\d{1,100}:)?\d{1,100}")


def read_spool_dead_letters(path: str) -> Iterator[SpoolDeadLetter]:
    """Every dead letter of the spool at ``path`` (all its slot files), oldest first in each file, read a page at a
    time. A ``ConfigurationError`` when ``path`` has no spool file (a mistyped path is said, not an empty spool)."""
    files = spool_slot_files(path)
    if not files:
        raise ConfigurationError(f"No spool file at {path}.", variable="LAGO_SPOOL_PATH")
    for slot, file in files:
        after = 0
        while True:
            rows = _rows(
                file, f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?", (after, CHUNK)
            )
            if not rows:
                break
            after = rows[-1][0]
            yield from (_letter(file, slot, row) for row in rows)


def find_spool_dead_letters(path: str, keys: Iterable[str | int]) -> tuple[list[SpoolDeadLetter], list[str]]:
    """The letters named by ``keys`` (``"17"`` or ``17``, ``"2:17"`` for slot 2), in that order, and the keys found
    nowhere. A ``ConfigurationError`` naming those that are no id."""
    files = dict(spool_slot_files(path))
    found: list[SpoolDeadLetter] = []
    missing: list[str] = []
    texts: list[str] = []
    bad: list[str] = []
    for key in keys:
        text: object = str(key) if type(key) is int else key  # (a DeadLetter.id; not True)
        if isinstance(text, str) and _ID.fullmatch(text):
            texts.append(text)
        else:
            bad.append(repr(key))
    if bad:
        raise ConfigurationError(f"not an id (N or SLOT:N): {', '.join(bad)}. Nothing was selected.")
    named: dict[tuple[int, int], str] = {}  # one letter named twice ("1", "0:1", "01") is sent once
    for key in texts:
        slot_text, _, id_text = key.rpartition(":")
        named.setdefault((int(slot_text or 0), int(id_text)), key)
    for (slot, row_id), key in named.items():
        rows = (
            _rows(files[slot], f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?", (row_id,))
            if slot in files and row_id < 2**63  # (past SQLite's integers: no such row, not an OverflowError)
            else []
        )
        if rows:
            found.append(_letter(files[slot], slot, rows[0]))
        else:
            missing.append(key)
    return found, missing


def check_spool_files(path: str) -> None:
    """Raise a ``ConfigurationError`` naming the first slot file of the spool at ``path`` that cannot be read (not a
    spool, damaged, locked past :data:`BUSY_TIMEOUT`): before anything is listed or sent."""
    for _, file in spool_slot_files(path):
        _rows(file, "SELECT id FROM dead_letters LIMIT 1", ())


def _rows(file: str, query: str, parameters: tuple[Any, ...]) -> list[Any]:
    try:
        with _connect(file) as conn:
            try:
                return conn.execute(query, parameters).fetchall()
            except sqlite3.OperationalError as exc:
                # a slot file a starting worker has just created (no table yet) holds no letters; a database with
                # other tables is no spool
                if "no such table" in str(exc) and conn.execute("SELECT 1 FROM sqlite_master").fetchone() is None:
                    return []
                raise
    except sqlite3.DatabaseError as exc:
        if not os.path.exists(file):  # the file went away (a starting worker adopted it): its letters moved
            return []
        if "locked" in str(exc):
            message = (
                f"The spool file {file} is locked: another process has held it for {BUSY_TIMEOUT:g} s ({exc}). "
                "Nothing was changed: run again once it lets go."
            )
        else:
            message = (
                f"{file} cannot be read ({type(exc).__name__}: {exc}): not a spool file, a damaged one, or one this "
                "user may not open. Check --spool or LAGO_SPOOL_PATH (a stray file named like a slot file, PATH.N, "
                "can be moved away)."
            )
        raise ConfigurationError(message, variable="LAGO_SPOOL_PATH") from None


def _letter(file: str, slot: int, row: tuple[Any, ...]) -> SpoolDeadLetter:
    """A row of ``DEAD_LETTER_COLUMNS`` (its texts read as bytes): its letter, and its stored text kept as stored
    (``surrogateescape``: the same bytes again, by which it is deleted, a byte that is no UTF-8 included)."""
    return SpoolDeadLetter(file, slot, dead_letter_from_row(row), row[1].decode("utf-8", "surrogateescape"))


def _stored(spooled: SpoolDeadLetter) -> bytes:
    """A letter's text as its spool file holds it (matched as ``CAST(body AS BLOB)``)."""
    return spooled.body.encode("utf-8", "surrogateescape")


async def replay_spool_dead_letters(
    letters: Iterable[SpoolDeadLetter], settings: BillingSettings, *, wait: float = 60.0
) -> ReplayReport:
    """Send ``letters`` to Lago again, a thousand at a time (see the module docstring): once Lago has answered for
    all of a thousand, and the billing periods of those it took are checked, their spool files are updated; if it
    does not answer within ``wait`` seconds in all, that thousand and the rest are left as they were.

    As ``dead-letters --replay``, it holds each spool's ``PATH.dead-letters.lock`` from before it sends that spool's
    first letter to its last write: a :class:`DeadLettersBusyError` (nothing sent) when another replay or purge holds
    the spool of the first letter; the letters of another spool held meanwhile are left as they were (``unchanged``).
    A letter no longer in its spool file when its thousand is sent (replayed or purged since it was read) is not sent
    (``gone``). What the command prints as warnings (events Lago stores but will not bill, letters left as they were)
    is logged at WARNING on ``lago_org_billing.dead_letters``."""
    if not wait > 0:  # (nan too)
        raise ConfigurationError(f"wait must be a positive number of seconds, got {wait!r}. Nothing was sent.")
    report = ReplayReport()
    try:
        with _SpoolLocks("replay_spool_dead_letters") as locks:
            await _replay_letters(locks.held_letters(letters), settings, wait, report)
            report.unchanged += locks.busy
    except BaseException:
        if report.sent:  # cut short (cancelled, an error) after thousands went through: their letters are updated
            report.complete = False
            _log_report(report)
        raise
    _log_report(report)
    return report


async def _replay_letters(
    letters: Iterable[SpoolDeadLetter], settings: BillingSettings, wait: float, report: ReplayReport | None = None
) -> ReplayReport:
    """:func:`replay_spool_dead_letters` without its locks (the command holds its own) nor its log. ``report``: the
    caller's, which holds what the thousands done did when the replay is cut short (their letters are updated then,
    and those Lago will not bill must still be said)."""
    report = ReplayReport() if report is None else report
    deadline = time.monotonic() + wait
    async with LagoClient(settings) as client:
        # Lago refusing the key (401/403), or a URL that is not Lago's API (its front end's HTML, another 404 page, a
        # redirect: a plain LagoAPIError), is said at once (delivery would retry those until --timeout, then report
        # "Lago did not answer"); an outage (5xx, 408, 429, no connection) is the delivery's to retry.
        checked = anyio.move_on_after(max(0.0, deadline - time.monotonic()))  # (within the replay's time too)
        try:
            with checked:
                await client.list_customers(per_page=1)
        except LagoAuthenticationError as exc:
            if exc.status != 403:
                raise ConfigurationError(f"Lago refuses this API key: {exc}", variable="LAGO_API_KEY") from None
            # a key scoped by resource (Lago's API key permissions) may not read customers: a replay only writes events
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as checked:
                await _check_events_permission(client)
        except LagoNotFoundError as exc:
            raise ConfigurationError(f"Lago refuses this API key or URL: {exc}", variable="LAGO_API_KEY") from None
        except LagoIntegrationError as exc:
            if type(exc) is LagoAPIError and exc.status not in (408, 425):
                raise ConfigurationError(
                    f"LAGO_API_URL ({settings.api_url}) does not answer as Lago's API: {exc}", variable="LAGO_API_URL"
                ) from None
        if checked.cancelled_caught:  # Lago did not answer within the replay's time: nothing sent, every letter kept
            report.complete = False
            return report
        chunk: list[SpoolDeadLetter] = []
        periods: dict[str, _Subscription | LagoIntegrationError | None] = {}
        for spooled in letters:
            if not spooled.letter.replayable:
                report.skipped.append(spooled)
                continue
            chunk.append(spooled)
            if len(chunk) == CHUNK:
                await _replay_chunk(client, chunk, report, periods, deadline)
                if not report.complete:
                    return report
                chunk = []
        if chunk:
            await _replay_chunk(client, chunk, report, periods, deadline)
    return report


def _spool_of(spooled: SpoolDeadLetter) -> str:
    """The spool path of a letter's slot file (``PATH`` for ``PATH.2``)."""
    suffix = f".{spooled.slot}"
    return spooled.file[: -len(suffix)] if spooled.slot and spooled.file.endswith(suffix) else spooled.file


class _SpoolLocks:
    """The ``PATH.dead-letters.lock`` of each spool whose letters an in-process replay meets, taken as it meets them
    and held to its end: that of the first letter's spool, or :class:`DeadLettersBusyError` (nothing was sent yet);
    the letters of a spool held by another run after that are passed over (counted in ``busy``)."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.locks: dict[str, _SpoolLettersLock | None] = {}
        self.busy = 0
        self._held = contextlib.ExitStack()

    def __enter__(self) -> _SpoolLocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._held.close()
        self.locks.clear()

    def held_letters(self, letters: Iterable[SpoolDeadLetter]) -> Iterator[SpoolDeadLetter]:
        for spooled in letters:
            spool = os.path.realpath(_spool_of(spooled))
            if spool not in self.locks:
                try:
                    self.locks[spool] = self._held.enter_context(_SpoolLettersLock(spool, self.action))
                except DeadLettersBusyError as exc:
                    if not self.locks:  # the first spool: nothing was sent
                        raise
                    logger.warning("The dead letters of %s are left as they were: %s", spool, exc)
                    self.locks[spool] = None
            if self.locks[spool] is None:
                self.busy += 1
                continue
            yield spooled


#: What to do about delivered events Lago stores but will not bill (said by the command and logged by the function).
_UNBILLED_ADVICE = (
    "A period whose invoice is still a draft (grace period) takes them; otherwise bill them by hand: a one-off "
    "invoice (POST /invoices with an add-on) or an adjustment of the next invoice"
)
#: A replay Lago did not answer for in time (``%s``: "run" for the command, "replay" for the function).
_INCOMPLETE = (
    "Lago did not answer for all the replayed events in time: the letters of the last thousand sent, and any after "
    "them, are kept as they were (%s again: events Lago took meanwhile then count as duplicates, not billed twice)."
)


def _unchecked(report: ReplayReport) -> str:
    return (
        f"{report.unchecked} delivered events were not checked against their subscription's billing period "
        f"({report.unchecked_reason}): one timestamped before it is stored by Lago but not billed."
    )


def _log_report(report: ReplayReport) -> None:
    """Log at WARNING what the command prints as warnings (an in-process replay has no terminal)."""
    if report.unbilled:
        shown = report.unbilled[:20]
        more = len(report.unbilled) - len(shown)
        logger.warning(
            "Replayed dead letters: Lago stores these %d delivered events but will not bill them (a replay keeps each "
            "event's timestamp): %s%s. %s (ReplayReport.unbilled lists them all).",
            len(report.unbilled),
            "; ".join(
                f"{spooled.key} {spooled.letter.event.get('transaction_id')}: {why}" for spooled, why, _ in shown
            ),
            f"; and {more} more" if more else "",
            _UNBILLED_ADVICE,
        )
    if report.unchecked:
        logger.warning("Replayed dead letters: %s", _unchecked(report))
    if not report.complete:
        logger.warning("Replayed dead letters: %s", _INCOMPLETE % "replay")
    if report.unchanged:
        logger.warning(
            "Replayed dead letters: %d were left as they were (their spool file changed or was locked, or another "
            "replay or purge held it): replay again.",
            report.unchanged,
        )


@dataclasses.dataclass(frozen=True)
class _Subscription:
    """What of a Lago subscription says whether an event is billed: its start (``started_at``, else
    ``subscription_at`` for one not started yet) and the start of its current billing period."""

    starts: decimal.Decimal | None
    starts_text: str | None
    period: decimal.Decimal | None
    period_text: str | None


async def _check_billing_periods(
    client: LagoClient,
    delivered: list[SpoolDeadLetter],
    periods: dict[str, _Subscription | LagoIntegrationError | None],
    deadline: float,
) -> dict[int, tuple[str, str | None] | str]:
    """The ``delivered`` letters (by ``id()``) Lago stores but will not bill, with why and the start of their
    subscription's current billing period: a timestamp before that period (Lago bills a late event only while that
    period's invoice is a draft), before the subscription starts, or no subscription at all. One
    ``GET /subscriptions/{id}`` per subscription and run; one Lago cannot answer (or past the deadline) leaves its
    letters unchecked: those get the reason (a ``str``)."""
    verdicts: dict[int, tuple[str, str | None] | str] = {}
    for spooled in delivered:
        event = spooled.letter.event
        external_id = event.get("external_subscription_id")
        moment = _seconds(event.get("timestamp"))
        if not isinstance(external_id, str) or moment is None:  # (no timestamp: Lago's reception time, billed now)
            continue
        if external_id not in periods:
            if time.monotonic() >= deadline:
                periods[external_id] = LagoIntegrationError(
                    "the replay's time (--timeout, or wait) ran out before it was read"
                )
            else:
                subscription: Any = _NOT_READ
                try:
                    # (within the replay's time: a Lago that does not answer is not waited on for its retries)
                    with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                        subscription = await client.get_current_subscription(external_id)
                except LagoIntegrationError as exc:
                    periods[external_id] = exc
                else:
                    if subscription is _NOT_READ:
                        periods[external_id] = LagoIntegrationError(
                            "the replay's time (--timeout, or wait) ran out while it was read"
                        )
                    else:
                        periods[external_id] = None if subscription is None else _subscription_of(subscription)
        known = periods[external_id]
        if isinstance(known, LagoIntegrationError):
            verdicts[id(spooled)] = str(known)
            continue
        when = _when(float(moment))
        if known is None:
            why = (
                f"Lago has no active or pending subscription {external_id!r}: it stores the event but bills it only "
                "if such a subscription covering its time exists when that period is invoiced"
            )
        elif known.starts is None or moment < known.starts:
            why = (
                f"its timestamp ({when} UTC) is before subscription {external_id!r} starts ({known.starts_text}): "
                "Lago stores it and never bills it"
            )
        elif known.period is not None and moment < known.period:
            why = (
                f"its timestamp ({when} UTC) is in a billing period of {external_id!r} before the current one (from "
                f"{known.period_text}): Lago bills it only while that period's invoice is still a draft (grace "
                "period), never once it is finalized"
            )
        else:
            continue
        verdicts[id(spooled)] = (why, known.period_text if known is not None else None)
    return verdicts


def _subscription_of(subscription: dict[str, Any]) -> _Subscription:
    starts = subscription.get("started_at") or subscription.get("subscription_at")
    period = subscription.get("current_billing_period_started_at")
    return _Subscription(
        _iso_seconds(starts),
        starts if isinstance(starts, str) else None,
        _iso_seconds(period),
        period if isinstance(period, str) else None,
    )


def _seconds(timestamp: Any) -> decimal.Decimal | None:
    """An event's ``timestamp`` (Unix seconds, a number or a decimal string) as a Decimal; None when it has none."""
    if timestamp is None or isinstance(timestamp, bool) or timestamp == "":
        return None
    try:
        seconds = decimal.Decimal(str(timestamp))
    except decimal.InvalidOperation:
        return None
    return seconds if seconds.is_finite() and abs(seconds) < 10**11 else None


def _iso_seconds(text: Any) -> decimal.Decimal | None:
    """Lago's ISO 8601 time (``2026-03-01T00:00:00Z``) as Unix seconds; None when absent or unreadable."""
    moment = parse_time(text)
    return None if moment is None else decimal.Decimal(repr(moment.timestamp()))


async def _check_events_permission(client: LagoClient) -> None:
    """Whether the API key may write events: an empty batch, which Lago refuses (422 ``no_events``) after its
    permission check (403) and creates nothing with."""
    try:
        await client.send_event_batch_json(b'{"events":[]}')
    except LagoAuthenticationError as exc:
        raise ConfigurationError(f"Lago refuses this API key for events: {exc}", variable="LAGO_API_KEY") from None
    except LagoIntegrationError:  # 422 no_events: it may; anything else is the delivery's to retry
        pass


async def _replay_chunk(
    client: LagoClient,
    chunk: list[SpoolDeadLetter],
    report: ReplayReport,
    periods: dict[str, _Subscription | LagoIntegrationError | None],
    deadline: float,
) -> None:
    """Send one chunk (those of its letters still in their spool file); once Lago has answered for all of it
    (``report.complete`` False when it has not in time) and the billing periods of those it took are checked, update
    the spool and the report. Nothing is written before that: a replay interrupted meanwhile leaves the letters for
    the next one, which sends them again as they are (Lago counts those it took as duplicates) and reports them."""
    chunk = _still_spooled(chunk, report)
    if not chunk:
        return
    pipeline = EventPipeline(
        client, memory_capacity=len(chunk), flush_interval=0.0, shutdown_timeout=0.0, max_backoff=10.0
    )
    delivery_log = logging.getLogger("lago_org_billing.delivery")
    quiet = delivery_log.disabled
    try:
        async with anyio.create_task_group() as tasks:
            try:
                await tasks.start(pipeline.run)
                for letters in _rounds(chunk):  # (letters sharing a transaction_id never in one batch: see _rounds)
                    for spooled in letters:
                        pipeline.submit(functools.partial(str, spooled.body))  # the stored text, as it is
                    answered = await pipeline.flush(max(0.0, deadline - time.monotonic()))
                    if not answered:
                        break
            except BaseException:  # interrupted (Ctrl-C): the pipeline stops as cancelled, its events unanswered
                delivery_log.disabled = True
                raise
            answered = answered and pipeline.metrics.dropped == 0  # (the outbox holds the whole chunk: none refused)
            # unanswered events are not "lost at shutdown" (nor "stopped without a shutdown" when interrupted) as the
            # pipeline would log: they are still dead letters
            delivery_log.disabled = quiet or not answered
            await pipeline.aclose()
    finally:
        delivery_log.disabled = quiet
    report.sent += len(chunk)
    if not answered:
        report.complete = False
        return
    # Matched by the whole event, not its transaction_id: Lago takes the same one on several subscriptions.
    again = {_event_key(letter.event): letter for letter in pipeline.dead_letters()}
    outcomes = [(spooled, again.get(_event_key(spooled.letter.event))) for spooled in chunk]
    # Checked before the letters Lago took are deleted: never deleted without being said unbilled (or unchecked).
    verdicts = await _check_billing_periods(
        client, [spooled for spooled, new in outcomes if new is None], periods, deadline
    )
    # From here to the end, no await: what is written to the spool and what the report says go together.
    report.duplicates += pipeline.metrics.duplicates
    by_file: dict[str, list[tuple[SpoolDeadLetter, DeadLetter | None]]] = {}
    for spooled, new in outcomes:
        by_file.setdefault(spooled.file, []).append((spooled, new))
    for file, file_outcomes in by_file.items():
        deletes = [(spooled.letter.id, _stored(spooled)) for spooled, new in file_outcomes if new is None]
        updates = [
            (new.reason, new.status, new.code, new.created_at, spooled.letter.id, _stored(spooled))
            for spooled, new in file_outcomes
            if new is not None
        ]
        try:
            with _connect(file) as conn:  # by id and text: never a letter that took a freed id meanwhile
                conn.executemany("DELETE FROM dead_letters WHERE id = ? AND CAST(body AS BLOB) = ?", deletes)
                conn.executemany(
                    "UPDATE dead_letters SET reason = ?, status = ?, code = ?, created_at = ? "
                    "WHERE id = ? AND CAST(body AS BLOB) = ?",
                    updates,
                )
        except sqlite3.OperationalError as exc:  # the file went away (a starting worker adopted it), or is locked
            logger.warning(
                "Spool file %s changed or was locked during the replay (%s): its letters are left as they were",
                file,
                exc,
            )
            report.unchanged += len(file_outcomes)
            continue
        for spooled, new in file_outcomes:
            if new is not None:
                renewed = dataclasses.replace(new, id=spooled.letter.id)
                report.rejected.append(dataclasses.replace(spooled, letter=renewed))
                continue
            report.delivered += 1
            verdict = verdicts.get(id(spooled))
            if isinstance(verdict, str):
                report.unchecked += 1
                report.unchecked_reason = verdict
            elif verdict is not None:
                report.unbilled.append((spooled, *verdict))


def _rounds(chunk: list[SpoolDeadLetter]) -> list[list[SpoolDeadLetter]]:
    """``chunk`` in rounds sent one after the other, none holding two letters of one ``transaction_id``. Lago's
    Postgres store matches the rows a batch inserted back to its events by ``transaction_id`` alone: of two events of
    one batch sharing one (on two subscriptions, where each is an event of its own) it answers the second
    ``value_already_exist`` although Lago never stored it. (The pipeline sends such an event again alone, see
    ``_delivery._shared_ids``; rounds spare a replay that 422 and its resends.)"""
    rounds: list[list[SpoolDeadLetter]] = []
    seen: dict[str, int] = {}
    for spooled in chunk:
        transaction_id = str(spooled.letter.event.get("transaction_id"))
        turn = seen[transaction_id] = seen.get(transaction_id, -1) + 1
        if turn == len(rounds):
            rounds.append([])
        rounds[turn].append(spooled)
    return rounds


def _still_spooled(chunk: list[SpoolDeadLetter], report: ReplayReport) -> list[SpoolDeadLetter]:
    """The letters of ``chunk`` whose row is still in their spool file (read before the spool's lock was taken, or
    replayed by a worker since): one gone is not sent (``report.gone``); those of a file that cannot be read now are
    left as they were (``report.unchanged``)."""
    by_file: dict[str, list[SpoolDeadLetter]] = {}
    for spooled in chunk:
        by_file.setdefault(spooled.file, []).append(spooled)
    present: set[tuple[str, int]] = set()
    unreadable: set[str] = set()
    for file, letters in by_file.items():
        ids = [spooled.letter.id for spooled in letters if spooled.letter.id is not None]
        try:
            for start in range(0, len(ids), 500):  # (SQLite's older builds take at most 999 parameters)
                part = ids[start : start + 500]
                query = f"SELECT id FROM dead_letters WHERE id IN ({', '.join('?' * len(part))})"
                present.update((file, row[0]) for row in _rows(file, query, tuple(part)))
        except ConfigurationError as exc:
            logger.warning("The dead letters of %s are left as they were: %s", file, exc)
            report.unchanged += len(letters)
            unreadable.add(file)
    kept = []
    for spooled in chunk:
        if spooled.file in unreadable:
            continue
        if (spooled.file, spooled.letter.id) in present:
            kept.append(spooled)
        else:
            report.gone += 1
    return kept


class DeadLettersBusyError(LagoIntegrationError):
    """Another ``dead-letters --replay`` or ``--purge`` of the same spool is running: nothing was done."""


class _SpoolLettersLock:
    """An exclusive OS lock on ``PATH.dead-letters.lock``, held by a ``--replay`` or ``--purge`` for its whole run, so
    that a purge never deletes what a replay is sending, nor a second replay sends it again. Taken without waiting;
    the OS drops it when the process ends (killed too): the file left behind means nothing. A spool directory where
    the file cannot be made (read-only) gets no lock, with a warning."""

    def __init__(self, path: str, action: str) -> None:
        self.path = os.path.realpath(path) + ".dead-letters.lock"
        self.action = action
        self._fd: int | None = None
        self._taken = False

    def __enter__(self) -> _SpoolLettersLock:
        if self._taken:  # (taken already, by an explicit __enter__() before its with block)
            return self
        self._taken = True
        try:
            fd, holder = take_file_lock(
                self.path, f"{self.action}, pid {os.getpid()}, started {_when(time.time())} UTC"
            )
        except OSError as exc:
            logger.warning("No lock against a concurrent replay or purge (%s cannot be made: %s)", self.path, exc)
            return self
        except BaseException:
            self._taken = False
            raise
        if fd is None:
            self._taken = False
            done = "Nothing was deleted" if self.action == "--purge" else "Nothing was sent"
            raise DeadLettersBusyError(
                f"another dead-letters --replay or --purge of this spool (or an in-process replay_spool_dead_letters) "
                f"is running ({holder or 'lock ' + self.path}). {done} (a purge must not delete what a replay is "
                "sending, nor a second replay send it again): run it again once that one ends."
            )
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._taken = False
        fd, self._fd = self._fd, None
        drop_file_lock(fd)


def _event_key(event: Any) -> str:
    return json.dumps(event, sort_keys=True)


class _connect:
    """A connection to an existing spool file that commits on success (and waits for a busy owner's commit)."""

    def __init__(self, file: str) -> None:
        self.conn = sqlite3.connect(sqlite_uri(file, "rw"), uri=True, timeout=BUSY_TIMEOUT)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self.conn.commit()
        finally:
            self.conn.close()


# --------------------------------------------------------------------------------------------- the command


def add_dead_letters_command(commands: Any) -> None:
    """Register ``dead-letters`` on the CLI's subparsers."""
    command = commands.add_parser(
        "dead-letters",
        help="list the dead letters of the event spool, send them to Lago again (--replay) or delete them (--purge)",
        description=textwrap.fill(
            "List the events Lago rejected for good, kept in the SQLite spool (--spool, else LAGO_SPOOL_PATH); "
            "--summary counts them by reason; --replay sends them again to the Lago of LAGO_API_URL and LAGO_API_KEY "
            "(environment, else ./.env); --purge deletes them.",
            79,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--spool", metavar="PATH", help="the spool file (default: $LAGO_SPOOL_PATH)")
    action = command.add_mutually_exclusive_group()
    action.add_argument("--replay", action="store_true", help="send them to Lago again (default: only list)")
    action.add_argument("--summary", action="store_true", help="count them by status, code and reason")
    action.add_argument("--purge", action="store_true", help="delete them for good (asks first, unless --yes)")
    command.add_argument("--yes", action="store_true", help="with --purge: do not ask for a confirmation")
    command.add_argument(
        "--id", dest="ids", action="extend", nargs="+", metavar="ID", help="only these letters (default: all)"
    )
    command.add_argument("--reason", metavar="TEXT", help="only letters whose reason or code holds TEXT (any case)")
    command.add_argument(
        "--subscription",
        dest="subscriptions",
        action="append",
        metavar="ID",
        help="only letters of this external_subscription_id (exact; repeat for several)",
    )
    command.add_argument(
        "--since",
        metavar="TIME",
        help="only events timestamped at or after TIME (ISO 8601, UTC if no offset; or Unix s)",
    )
    command.add_argument("--until", metavar="TIME", help="only events timestamped before TIME (as --since)")
    command.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for Lago's answers with --replay (default 60)"
    )
    command.add_argument(
        "--json",
        action="store_true",
        help='print the letters (or the replay\'s result) as JSON; an error as {"error": ..., "exit_code": N}',
    )
    command.set_defaults(handler=run_dead_letters_command)


def run_dead_letters_command(args: argparse.Namespace) -> int:
    if not args.timeout > 0:  # (nan too: no time at all for Lago, then "Lago did not answer")
        raise ConfigurationError(f"--timeout must be a positive number of seconds, got {args.timeout}.")
    # Listing, counting and purging a spool named by --spool read nothing else: a malformed LAGO_* variable (perhaps
    # why the app is down) does not keep the operator from its dead letters. A replay talks to Lago as the app does.
    settings = BillingSettings.from_env(require_api_key=True) if args.replay else None
    path = args.spool or (settings or BillingSettings.from_env(require_api_key=False)).spool_path
    if not path:
        raise ConfigurationError(
            "No spool: pass --spool PATH or set LAGO_SPOOL_PATH. (Without a spool, dead letters live in the app's "
            "memory: EventPipeline.dead_letters() and replay_dead_letters().)",
            variable="LAGO_SPOOL_PATH",
        )
    if not spool_slot_files(path):
        raise ConfigurationError(f"No spool file at {path}.", variable="LAGO_SPOOL_PATH")
    check_spool_files(path)  # one that cannot be read is said before anything is listed or sent
    args.since_seconds = _time_option("--since", args.since)
    args.until_seconds = _time_option("--until", args.until)
    if args.since_seconds is not None and args.until_seconds is not None and args.since_seconds >= args.until_seconds:
        raise ConfigurationError(
            f"--since {args.since} is not before --until {args.until} (from --since, inclusive, to --until, "
            "exclusive): no letter could be selected. Nothing was selected: swap them, or check their dates."
        )
    if args.ids:
        bad = [key for key in args.ids if not _ID.fullmatch(key)]
        if bad:
            raise ConfigurationError(f"not an id (N or SLOT:N): {', '.join(bad)}")
    if not args.purge and settings is None:
        letters = _selected(path, args)
        if args.summary:
            _print_summary(letters, path, args.json)
            return 0
        args.json_started = args.json  # (the CLI then adds no error object to a JSON array begun)
        _print_letters(letters, path, args.json)
        return 0
    # A purge or a replay holds the spool's lock from before it reads the letters to its last write.
    try:
        lock = _SpoolLettersLock(path, "--purge" if args.purge else "--replay").__enter__()
    except DeadLettersBusyError as exc:  # exit 1 (run again), not 2: nothing is wrong with the settings
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(exc), "exit_code": 1}))
        return 1
    with lock:
        letters = _selected(path, args)
        if args.purge:
            return _purge(path, args, letters)
        assert settings is not None
        return _replay(letters, settings, args)


def _selected(path: str, args: argparse.Namespace) -> Iterable[SpoolDeadLetter]:
    """The letters of the spool at ``path`` that ``--id`` and ``--reason`` select (all by default)."""
    letters: Iterable[SpoolDeadLetter]
    if args.ids:
        letters, missing = find_spool_dead_letters(path, args.ids)
        if missing:
            raise ConfigurationError(f"no such dead letter in {path}: {', '.join(missing)}")
    else:
        letters = read_spool_dead_letters(path)
    if args.reason is not None:
        letters = _matching(letters, args.reason)
    if args.subscriptions or args.since_seconds is not None or args.until_seconds is not None:
        letters = _of_subscriptions_and_times(letters, args.subscriptions, args.since_seconds, args.until_seconds)
    return letters


def _time_option(option: str, text: str | None) -> decimal.Decimal | None:
    """``--since``/``--until``: an ISO 8601 date or time (UTC when it has no offset) or Unix seconds."""
    if text is None:
        return None
    day = _basic_date(text.strip())
    if day is not None:  # a date in ISO 8601's basic format, or Unix seconds of 1970-73 (when no letter was written)
        raise ConfigurationError(
            f"{option} {text.strip()} is ambiguous: a date ({day}) or Unix seconds ({_when(int(text))} UTC). Write "
            f"{option} {day} for the date, or {option} {text.strip()}.0 for the seconds. Nothing was selected."
        )
    seconds = _seconds(text.strip())
    if seconds is None:
        seconds = _iso_seconds(text.strip())
    if seconds is None:
        raise ConfigurationError(
            f"{option} takes an ISO 8601 date or time (2026-03-01, 2026-03-01T12:00:00Z; UTC without an offset) or "
            f"Unix seconds, got {text!r}. Nothing was selected."
        )
    return seconds


def _basic_date(text: str) -> str | None:
    """``2026-03-01`` for ``20260301`` (eight digits that are a date, on every Python: 3.10's ``fromisoformat`` does not
    read them); None otherwise."""
    if not re.fullmatch(r"[0-9]{8}", text):
        return None
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        return None


def _of_subscriptions_and_times(
    letters: Iterable[SpoolDeadLetter],
    subscriptions: list[str] | None,
    since: decimal.Decimal | None,
    until: decimal.Decimal | None,
) -> Iterator[SpoolDeadLetter]:
    """The letters of those subscriptions (any when None) whose event's timestamp is in [since, until)."""
    wanted = set(subscriptions) if subscriptions else None
    for spooled in letters:
        event = spooled.letter.event
        if wanted is not None and event.get("external_subscription_id") not in wanted:
            continue
        if since is not None or until is not None:
            moment = _seconds(event.get("timestamp"))
            if moment is None or (since is not None and moment < since) or (until is not None and moment >= until):
                continue
        yield spooled


class _Spilled:
    """A list kept in a temporary file (each item pickled): what the command reports of a replay, however many letters
    are rejected again or not billed (a store of a million, replayed before its cause is fixed), in bounded memory.
    Appended to, counted, then read through once or more."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._count = 0

    def append(self, item: Any) -> None:
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.write(len(data).to_bytes(8, "big") + data)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        self._file.flush()
        self._file.seek(0)
        for _ in range(self._count):
            size = int.from_bytes(self._file.read(8), "big")
            yield pickle.loads(self._file.read(size))
        self._file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self._file.close()


def _replay(letters: Iterable[SpoolDeadLetter], settings: BillingSettings, args: argparse.Namespace) -> int:
    replay_settings = settings
    spilled = [_Spilled(), _Spilled(), _Spilled()]
    report = ReplayReport(rejected=cast(Any, spilled[0]), skipped=cast(Any, spilled[1]), unbilled=cast(Any, spilled[2]))
    try:
        return _replay_reported(letters, replay_settings, args, report)
    finally:
        for kept in spilled:
            kept.close()


def _replay_reported(
    letters: Iterable[SpoolDeadLetter], replay_settings: BillingSettings, args: argparse.Namespace, report: ReplayReport
) -> int:
    try:
        # (the command holds the spool's lock already, and prints what the function would log)
        run_main(lambda: _replay_letters(letters, replay_settings, args.timeout, report))
    except (KeyboardInterrupt, ConfigurationError) as exc:
        if isinstance(exc, KeyboardInterrupt):
            print(
                "Interrupted: the letters of the thousand being replayed, and any after them, are left as they were "
                "(run again: events Lago took meanwhile count as duplicates, not billed twice).",
                file=sys.stderr,
            )
        if report.sent:  # thousands went through before: their letters are updated, what they did is said
            report.complete = False
            _print_report(report, args.json)
        raise
    _print_report(report, args.json)
    return 0 if report.complete and not report.rejected and not report.unchanged else 1


def _matching(letters: Iterable[SpoolDeadLetter], text: str) -> Iterator[SpoolDeadLetter]:
    """The letters whose reason or code holds ``text``, whatever the case."""
    needle = text.casefold()
    for spooled in letters:
        if needle in spooled.letter.reason.casefold() or needle in (spooled.letter.code or "").casefold():
            yield spooled


def _one_line(text: str) -> str:
    """``text`` on one line (a reason on several would split a letter over several lines of the listing)."""
    return " ".join(text.split())


def _print_summary(letters: Iterable[SpoolDeadLetter], path: str, as_json: bool) -> None:
    counts: dict[tuple[int | None, str | None, str], int] = {}
    for spooled in letters:
        letter = spooled.letter
        group = (letter.status, letter.code, _one_line(letter.reason))
        counts[group] = counts.get(group, 0) + 1
    groups = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    if as_json:
        print(
            json.dumps(
                [
                    {"count": n, "status": status, "code": code, "reason": reason}
                    for (status, code, reason), n in groups
                ],
                indent=2,
            )
        )
        return
    if groups:
        print(f"{'COUNT':>7} {'STATUS':<6} {'CODE':<18} REASON")
    for (status, code, reason), count in groups:
        print(f"{count:>7} {status or '-'!s:<6} {printable(code or '-'):<18} {printable(reason[:200])}")
    print(f"{sum(counts.values())} dead letters in {printable(path)}")


def _purge(path: str, args: argparse.Namespace, letters: Iterable[SpoolDeadLetter]) -> int:
    """Delete the letters selected, once confirmed; those written after they were counted are kept."""
    named = list(letters) if args.ids else None  # a few named letters; else the spool is read again to delete
    newest: dict[str, int] = {}
    count = 0
    for spooled in named if named is not None else letters:
        count += 1
        newest[spooled.file] = max(newest.get(spooled.file, 0), spooled.letter.id or 0)
    if not count:
        print(json.dumps({"purged": 0}) if args.json else f"No dead letters to purge in {printable(path)}.")
        return 0
    what = f"{count} dead letters of {path}" + (f" whose reason holds {args.reason!r}" if args.reason else "")
    if args.subscriptions or args.since or args.until:
        what += " (of the subscriptions and times selected)"
    if not args.yes:
        if not _isatty(sys.stdin):
            raise ConfigurationError(
                f"--purge deletes {what} for good (Lago never gets them): add --yes to confirm. Nothing was deleted."
            )
        print(f"Delete {what} for good (Lago never gets them)? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print(f"Nothing was deleted ({what} kept).", file=sys.stderr)
            if args.json:  # (stdout stays JSON whatever the answer)
                print(json.dumps({"purged": 0}))
            return 1
    chosen: Iterable[SpoolDeadLetter]
    if named is not None:
        chosen = named
    else:  # read again: only the letters counted above (ids up to the newest seen), as they were (by text)
        again = _selected(path, args)  # (the same filters)
        chosen = (spooled for spooled in again if (spooled.letter.id or 0) <= newest.get(spooled.file, 0))
    purged = 0
    batch: list[SpoolDeadLetter] = []
    try:
        for spooled in chosen:
            batch.append(spooled)
            if len(batch) == CHUNK:
                purged += _delete(batch, purged)
                batch = []
        if batch:
            purged += _delete(batch, purged)
    except KeyboardInterrupt:  # a thousand at a time, each its own transaction: the one interrupted is rolled back
        print(
            f"Interrupted: {purged} dead letters were deleted, the others are kept (run the same command again to "
            "delete them).",
            file=sys.stderr,
        )
        raise
    logger.info("Purged %d dead letters of %s", purged, path)
    print(json.dumps({"purged": purged}) if args.json else f"Purged {purged} dead letters of {printable(path)}.")
    return 0


def _delete(letters: list[SpoolDeadLetter], done: int) -> int:
    """Delete ``letters`` (by id and text: never a letter that took a freed id), a transaction per spool file."""
    by_file: dict[str, list[tuple[int | None, bytes]]] = {}
    for spooled in letters:
        by_file.setdefault(spooled.file, []).append((spooled.letter.id, _stored(spooled)))
    deleted = 0
    for file, keys in by_file.items():
        try:
            with _connect(file) as conn:
                deleted += conn.executemany(
                    "DELETE FROM dead_letters WHERE id = ? AND CAST(body AS BLOB) = ?", keys
                ).rowcount
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(
                f"The spool file {file} could not be changed ({type(exc).__name__}: {exc}): {done + deleted} dead "
                "letters were deleted before it, the rest are kept. Run again once it lets go.",
                variable="LAGO_SPOOL_PATH",
            ) from None
    return deleted


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _as_json(spooled: SpoolDeadLetter) -> dict[str, Any]:
    letter = spooled.letter
    return {
        "id": spooled.key,
        "file": spooled.file,
        "created_at": letter.created_at,
        "status": letter.status,
        "code": letter.code,
        "reason": letter.reason,
        "replayable": letter.replayable,
        "event": letter.event,
    }


def _print_letters(letters: Iterable[SpoolDeadLetter], path: str, as_json: bool) -> None:
    if as_json:  # a JSON array, written as the letters are read
        print("[", end="")
        for index, spooled in enumerate(letters):
            print(("," if index else "") + "\n" + json.dumps(_as_json(spooled), indent=2), end="")
        print("\n]")
        return
    count = replayable = 0
    for spooled in letters:
        if not count:
            print(f"{'ID':<8} {'WHEN (UTC)':<19} {'STATUS':<6} {'CODE':<18} {'TRANSACTION':<34} REASON")
        count += 1
        replayable += spooled.letter.replayable
        letter = spooled.letter
        transaction = printable(str(letter.event.get("transaction_id", "(no event)")))
        print(
            f"{spooled.key:<8} {_when(letter.created_at):<19} {letter.status or '-'!s:<6} "
            f"{printable(letter.code or '-'):<18} {transaction[:34]:<34} {printable(_one_line(letter.reason)[:200])}"
        )
    print(f"{count} dead letters in {printable(path)} ({replayable} can be replayed)")


def _print_report(report: ReplayReport, as_json: bool) -> None:
    if as_json:  # (as json.dumps(..., indent=2) writes it, its lists written item by item: any length)
        counts = {
            "sent": report.sent,
            "complete": report.complete,
            "unchanged": report.unchanged,
            "gone": report.gone,
            "delivered": report.delivered,
            "duplicates": report.duplicates,
        }
        lists: dict[str, Iterable[dict[str, Any]]] = {
            "rejected": (_as_json(spooled) for spooled in report.rejected),
            "skipped": (_as_json(spooled) for spooled in report.skipped),
            "unbilled": (
                {**_as_json(spooled), "why": why, "period_started_at": period}
                for spooled, why, period in report.unbilled
            ),
        }
        write = sys.stdout.write
        write("{\n")
        for name, value in counts.items():
            write(f"  {json.dumps(name)}: {json.dumps(value)},\n")
        for name, items in lists.items():
            write(f"  {json.dumps(name)}: [")
            first = True
            for item in items:
                write(("\n" if first else ",\n") + textwrap.indent(json.dumps(item, indent=2), "    "))
                first = False
            write("],\n" if first else "\n  ],\n")
        write(f'  "unchecked": {json.dumps(report.unchecked)}\n}}\n')
        return
    print(
        f"Replayed {report.sent}: {report.delivered} delivered ({report.duplicates} already in Lago), "
        f"{len(report.rejected)} rejected again."
    )
    for spooled in report.rejected:
        reason = printable(_one_line(spooled.letter.reason)[:200])
        print(f"  {spooled.key}: rejected again ({spooled.letter.status}): {reason}")
    if not report.complete:
        print(_INCOMPLETE % "run", file=sys.stderr)
    if report.gone:
        print(
            f"{report.gone} letters were not sent: they had left the spool since they were read (replayed by a worker, "
            "or its file adopted by one)."
        )
    if report.unchanged:
        print(
            f"{report.unchanged} letters were left as they were: their spool file changed or was locked meanwhile "
            "(run again: events Lago took count as duplicates, not billed twice)."
        )
    if report.skipped:
        print(f"Skipped {len(report.skipped)} letters holding no whole event (it could not be built or serialised):")
        for spooled in report.skipped:
            print(f"  {spooled.key}: {printable(_one_line(spooled.letter.reason)[:200])}")
    if report.unbilled:
        print(
            f"Delivered, but Lago will not bill these {len(report.unbilled)} (a replay keeps each event's timestamp):"
        )
        for spooled, why, _ in report.unbilled:
            transaction = printable(str(spooled.letter.event.get("transaction_id")))
            print(f"  {spooled.key}: {transaction}: {printable(why)}")
        print(
            f"Warning: Lago stores the {len(report.unbilled)} events listed above but will not bill them (--json "
            f"gives them whole). {_UNBILLED_ADVICE}.",
            file=sys.stderr,
        )
    if report.unchecked:
        print(f"Warning: {_unchecked(report)}", file=sys.stderr)
