"""The ``lago-org-billing dead-letters`` command: list the dead letters of a spool, and send them to Lago again.

``dead-letters [--spool PATH] [--json]`` lists the dead letters of every slot file of the spool
(``LAGO_SPOOL_PATH`` by default), whether or not a live process owns it. ``--replay [--id ID ...]`` sends them
(all, or those named) to the Lago of ``LAGO_API_URL``/``LAGO_API_KEY`` with their stored text, so an event Lago
did take after all is a duplicate there, not a second charge. Then, once every one has an answer, the delivered
letters are deleted and those rejected again get Lago's new reason; if Lago does not answer for all of them within
``--timeout``, nothing is changed and a later run sends them again.

In-memory dead letters live only in their process: ``EventPipeline.replay_dead_letters()`` replays those.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import re
import sqlite3
import sys
from typing import Any

import anyio

from ._client import LagoClient
from ._delivery import EventPipeline
from ._errors import ConfigurationError
from ._settings import BillingSettings
from ._spool import DeadLetter, _loads_or_raw, spool_slot_files

__all__ = ["SpoolDeadLetter", "add_dead_letters_command", "read_spool_dead_letters", "replay_spool_dead_letters"]

_EPILOG = """\
IDs are the letters' row ids, prefixed by the slot ("2:17") for the spool's other slot files (PATH.2 ...).
Exit codes: 0 done (every replayed letter delivered); 1 some were rejected again or Lago did not answer in time
(nothing lost: they stay dead letters); 2 no spool, unknown ids or settings missing.
"""


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
    letters skipped (no whole event), and whether Lago answered for every one in time."""

    sent: int = 0
    delivered: int = 0
    duplicates: int = 0
    rejected: list[SpoolDeadLetter] = dataclasses.field(default_factory=list)
    skipped: list[SpoolDeadLetter] = dataclasses.field(default_factory=list)
    complete: bool = True


def read_spool_dead_letters(path: str) -> list[SpoolDeadLetter]:
    """Every dead letter of the spool at ``path`` (all its slot files), oldest first in each file."""
    letters: list[SpoolDeadLetter] = []
    for slot, file in spool_slot_files(path):
        with _connect(file) as conn:
            try:
                rows = conn.execute(
                    "SELECT id, body, reason, status, code, created_at FROM dead_letters ORDER BY id"
                ).fetchall()
            except sqlite3.OperationalError:  # no such table: a spool that never had a dead letter
                rows = []
        for row_id, body, reason, status, code, created_at in rows:
            letter = DeadLetter(_loads_or_raw(body), reason, status, code, created_at, row_id)
            letters.append(SpoolDeadLetter(file, slot, letter, body))
    return letters


async def replay_spool_dead_letters(
    letters: list[SpoolDeadLetter], settings: BillingSettings, *, wait: float = 60.0
) -> ReplayReport:
    """Send ``letters`` to Lago again (see the module docstring); update their spool files when Lago answered
    for every one of them."""
    report = ReplayReport()
    chosen: list[SpoolDeadLetter] = []
    for spooled in letters:
        (chosen if spooled.letter.replayable else report.skipped).append(spooled)
    if not chosen:
        return report
    async with LagoClient(settings) as client:
        pipeline = EventPipeline(client, flush_interval=0.0, shutdown_timeout=0.0, max_backoff=min(wait, 10.0))
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for spooled in chosen:
                pipeline.submit(functools.partial(str, spooled.body))  # the stored text, as it is
            report.complete = await pipeline.flush(wait)
            delivery_log = logging.getLogger("lago_org_billing.delivery")
            quiet = delivery_log.disabled
            # unanswered events are not "lost at shutdown" as the pipeline would log: they are still dead letters
            delivery_log.disabled = quiet or not report.complete
            try:
                await pipeline.aclose()
            finally:
                delivery_log.disabled = quiet
    report.sent = len(chosen)
    if not report.complete:
        return report
    again = {letter.event.get("transaction_id"): letter for letter in pipeline.dead_letters()}
    report.duplicates = pipeline.metrics.duplicates
    by_file: dict[str, tuple[list[int], list[tuple[str, int | None, str | None, float, int]]]] = {}
    for spooled in chosen:
        deletes, updates = by_file.setdefault(spooled.file, ([], []))
        assert spooled.letter.id is not None
        new = again.get(spooled.letter.event["transaction_id"])
        if new is None:
            deletes.append(spooled.letter.id)
            report.delivered += 1
        else:
            updates.append((new.reason, new.status, new.code, new.created_at, spooled.letter.id))
            report.rejected.append(dataclasses.replace(spooled, letter=dataclasses.replace(new, id=spooled.letter.id)))
    for file, (deletes, updates) in by_file.items():
        with _connect(file) as conn:
            conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(row_id,) for row_id in deletes])
            conn.executemany(
                "UPDATE dead_letters SET reason = ?, status = ?, code = ?, created_at = ? WHERE id = ?", updates
            )
    return report


class _connect:
    """A connection to a spool file that commits on success (and waits for a busy owner's commit)."""

    def __init__(self, file: str) -> None:
        self.conn = sqlite3.connect(file, timeout=30)

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
        help="list the dead letters of the event spool, or send them to Lago again (--replay)",
        description="List the events Lago rejected for good, kept in the SQLite spool; --replay sends them again.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--spool", metavar="PATH", help="the spool file (default: $LAGO_SPOOL_PATH)")
    command.add_argument("--replay", action="store_true", help="send them to Lago again (default: only list)")
    command.add_argument(
        "--id", dest="ids", action="append", metavar="ID", help="only this letter (repeatable; default: all)"
    )
    command.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for Lago's answers with --replay (default 60)"
    )
    command.add_argument("--json", action="store_true", help="print the letters (or the replay's result) as JSON")
    command.set_defaults(handler=run_dead_letters_command)


def run_dead_letters_command(args: argparse.Namespace) -> int:
    settings = BillingSettings.from_env(require_api_key=args.replay)
    path = args.spool or settings.spool_path
    if not path:
        raise ConfigurationError(
            "No spool: pass --spool PATH or set LAGO_SPOOL_PATH. (Without a spool, dead letters live in the app's "
            "memory: EventPipeline.dead_letters() and replay_dead_letters().)",
            variable="LAGO_SPOOL_PATH",
        )
    if not spool_slot_files(path):
        raise ConfigurationError(f"No spool file at {path}.", variable="LAGO_SPOOL_PATH")
    letters = read_spool_dead_letters(path)
    if args.ids:
        bad = [key for key in args.ids if not re.fullmatch(r"(\d+:)?\d+", key)]
        known = {spooled.key: spooled for spooled in letters}
        unknown = [key for key in args.ids if key not in known and key not in bad]
        if bad or unknown:
            raise ConfigurationError(
                "; ".join(
                    part
                    for part in (
                        f"not an id (N or SLOT:N): {', '.join(bad)}" if bad else "",
                        f"no such dead letter in {path}: {', '.join(unknown)}" if unknown else "",
                    )
                    if part
                )
            )
        letters = [known[key] for key in dict.fromkeys(args.ids)]
    if not args.replay:
        _print_letters(letters, path, args.json)
        return 0
    report = anyio.run(lambda: replay_spool_dead_letters(letters, settings, wait=args.timeout))
    _print_report(report, args.json)
    return 0 if report.complete and not report.rejected else 1


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


def _print_letters(letters: list[SpoolDeadLetter], path: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps([_as_json(spooled) for spooled in letters], indent=2))
        return
    replayable = sum(spooled.letter.replayable for spooled in letters)
    print(f"{len(letters)} dead letters in {path} ({replayable} can be replayed)")
    if not letters:
        return
    print(f"{'ID':<8} {'WHEN (UTC)':<19} {'STATUS':<6} {'CODE':<18} {'TRANSACTION':<34} REASON")
    for spooled in letters:
        letter = spooled.letter
        transaction = str(letter.event.get("transaction_id", "(no event)"))
        print(
            f"{spooled.key:<8} {_when(letter.created_at):<19} {letter.status or '-'!s:<6} {letter.code or '-':<18} "
            f"{transaction[:34]:<34} {letter.reason[:200]}"
        )


def _print_report(report: ReplayReport, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "sent": report.sent,
                    "complete": report.complete,
                    "delivered": report.delivered,
                    "duplicates": report.duplicates,
                    "rejected": [_as_json(spooled) for spooled in report.rejected],
                    "skipped": [_as_json(spooled) for spooled in report.skipped],
                },
                indent=2,
            )
        )
        return
    if not report.complete:
        print(
            f"Lago did not answer for all {report.sent} replayed events in time: the dead letters are kept as they "
            "were (run again; events Lago took meanwhile are then counted as duplicates, not billed twice).",
            file=sys.stderr,
        )
    else:
        print(
            f"Replayed {report.sent}: {report.delivered} delivered ({report.duplicates} already in Lago), "
            f"{len(report.rejected)} rejected again."
        )
        for spooled in report.rejected:
            print(f"  {spooled.key}: rejected again ({spooled.letter.status}): {spooled.letter.reason[:200]}")
    if report.skipped:
        print(f"Skipped {len(report.skipped)} letters holding no whole event (it could not be built or serialised):")
        for spooled in report.skipped:
            print(f"  {spooled.key}: {spooled.letter.reason[:200]}")
