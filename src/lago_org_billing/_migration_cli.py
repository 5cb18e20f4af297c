"""The ``lago-org-billing migrate`` command: move user-keyed Lago customers to org-keyed ones.

``migrate --mapping-file FILE [--execute | --verify] [--prepare] [--journal FILE] [--report FILE]``; dry run by default
(``--prepare``: the first of two phases, for a migration while traffic flows).
Exit codes: 0 all good, 1 some org failed / verification failed / run stopped, 2 unusable mapping or settings, an API
key that may not read entitlements (``--execute`` without ``--allow-unreadable-entitlements``), or another ``--execute``
run holds the journal (``FILE.lock``, an OS lock held for the run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc
import httpx

from ._client import LagoClient
from ._errors import InvalidRequestError, LagoIntegrationError
from ._migration import (
    PLAN_POLICIES,
    CallCounter,
    EntitlementsUnreadableError,
    Journal,
    JournalLock,
    JournalLockedError,
    MappingError,
    MigrationOptions,
    MigrationRun,
    Mode,
    OrgResult,
    _entitlements_path,
    format_entitlements,
    load_mapping_callable,
    read_mapping_file,
    run_migration,
    validate_mapping,
)
from ._run import run_main
from ._settings import BillingSettings, masked_url

__all__ = ["add_migrate_command", "run_migrate_command"]

#: Written out: argparse's keeps "(--mapping-file FILE | --mapping-callable MODULE:FUNCTION)" on the line of the
#: command's name, 90 columns wide (a test checks it names every option of the parser, and their choices).
_USAGE = f"""%(prog)s [-h]
       (--mapping-file FILE | --mapping-callable MODULE:FUNCTION)
       [--execute | --verify] [--prepare] [--journal FILE] [--report FILE]
       [--concurrency CONCURRENCY] [--default-plan CODE]
       [--plan-policy {{{",".join(PLAN_POLICIES)}}}]
       [--on-termination-invoice {{generate,skip}}]
       [--on-termination-credit-note {{credit,refund,offset,skip}}]
       [--allow-unreadable-entitlements] [--accept-unmoved KINDS]
       [--progress {{auto,bar,lines,none}}]"""

_EPILOG = """\
Per org: upsert the org customer (external_id = org id; metadata billing_type,
migrated_from_user, created_by_user_id), subscribe it (subscription external_id
from LAGO_SUBSCRIPTION_ID_TEMPLATE) to the plan the policy picks among its
users' active subscriptions, with the entitlements of its own of the
subscription it takes the plan from (override values, features given beyond the
plan, plan features removed), terminate the users' subscriptions, mark the user
customers (migrated_to_org). The org subscription ends when that subscription
would (ending_at); one paying a price of its own (plan_overrides) fails its org
before any write (make the org subscription by hand, then run again).
Pay-in-advance plans: see --on-termination-credit-note (Lago's default, credit,
leaves the unused part as a credit of the user customer; a warning says so).
Re-running changes nothing already done; --journal skips finished orgs, and
--execute holds an OS lock on FILE.lock for the run: a second --execute on the
same journal stops at once (exit 2).

While traffic flows, migrate in two phases, so that no event is lost:
`--execute --prepare` makes the org customers and subscriptions (with the
entitlement overrides) and leaves the users' subscriptions running (neither
ended nor marked); deploy the middleware; then `--execute` (without --prepare)
ends the users' subscriptions and marks them. In between, the old user-keyed
integration's events are billed on the users' subscriptions and the
middleware's on the org's: each once. The fixed fees of both are billed for
that window (keep it short). --verify in between reports the users' active
subscriptions and that the second phase is pending. (One --execute does both at
once: an org subscribed before the middleware is deployed loses the old
integration's events after it, one subscribed after loses the middleware's
before it.)

--verify picks that subscription again with --plan-policy: give it the
--plan-policy --execute used. An API key that may not read entitlements
(GET /features answers 403): the dry run and --verify warn that overrides are
neither carried nor checked; --execute stops before any write (exit 2) unless
given --allow-unreadable-entitlements (also when GET /features fails otherwise:
run again). Better: give the key read access to features. A plan feature the
donor went without is removed only from an org subscription the migration made:
one the org had before keeps it (a warning names it).

Mapping: CSV with header user_id,org_id,org_name,email[,plan_code], or JSON: a
list of objects with these keys, or --mapping-callable 'module:function'
returning such rows (e.g. a database query).

Lago: the one of LAGO_API_URL (base URL, without /api/v1), with LAGO_API_KEY,
read from the environment, else from ./.env (as the app reads them: the other
LAGO_* variables there must be valid too). Also read:
LAGO_SUBSCRIPTION_ID_TEMPLATE (the org subscriptions' external_id: give the
app's), LAGO_API_TIMEOUT (seconds per call); LAGO_MAX_RETRIES and
LAGO_RETRY_DEADLINE are raised to at least 10 retries and 600 s per call (a
migration waits out Lago's rate limits). The dry run only reads from Lago;
check the target first with `lago-org-billing health`.

Exit codes: 0 all good; 1 an org failed, verification failed or the run
stopped; 2 unusable mapping/settings, an API key that may not read features
(--execute without --allow-unreadable-entitlements), or another run holds the
journal.
"""


def add_migrate_command(commands: Any) -> None:
    """Register ``migrate`` on the CLI's subparsers."""
    migrate = commands.add_parser(
        "migrate",
        help="move billing from user-keyed Lago customers to org-keyed ones (dry run by default)",
        usage=_USAGE,
        description="Move billing from per-user Lago customers to per-org customers, in the Lago\n"
        "of LAGO_API_URL and LAGO_API_KEY (environment, else ./.env). Dry run by default.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = migrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--mapping-file", metavar="FILE", help="user to org mapping, CSV or JSON")
    source.add_argument(
        "--mapping-callable", metavar="MODULE:FUNCTION", help="a function (sync or async) returning the mapping rows"
    )
    mode = migrate.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true", help="make the changes (default: print the plan only)")
    mode.add_argument(
        "--verify",
        action="store_true",
        help="check every org has its customer (billing_type=organization) and active subscription, no user still has "
        "one and every user is marked migrated_to_org",
    )
    migrate.add_argument(
        "--prepare",
        action="store_true",
        help="the first phase of a migration while traffic flows (with --execute, or a dry run): make the org "
        "customers and subscriptions only, leaving the users' subscriptions active and unmarked; deploy the "
        "middleware, then run --execute without --prepare to end and mark them",
    )
    migrate.add_argument(
        "--journal",
        metavar="FILE",
        help="JSON-lines journal; an interrupted --execute resumes (one --execute at a time: FILE.lock), a dry run "
        "given it shows what is left",
    )
    migrate.add_argument("--report", metavar="FILE", help="write the JSON report here")
    migrate.add_argument("--concurrency", type=int, default=8, help="orgs migrated at once (default 8)")
    migrate.add_argument(
        "--plan-policy",
        choices=PLAN_POLICIES,
        default="highest",
        help="the org's plan among its users' active subscriptions: highest (default) / lowest yearly amount, "
        "oldest / newest subscription",
    )
    migrate.add_argument("--default-plan", metavar="CODE", help="plan of orgs whose users have no active subscription")
    migrate.add_argument(
        "--on-termination-invoice",
        choices=("generate", "skip"),
        default="generate",
        help="bill the users' partial period when terminating their subscriptions (default generate)",
    )
    migrate.add_argument(
        "--on-termination-credit-note",
        choices=("credit", "refund", "offset", "skip"),
        default=None,
        help="pay-in-advance plans: what to do with the unused part (default: Lago's, credit)",
    )
    migrate.add_argument(
        "--allow-unreadable-entitlements",
        action="store_true",
        help="--execute: go on when the API key may not read entitlements (GET /features answers 403, or fails "
        "otherwise); the users' entitlement overrides are then not carried (default: stop before any write)",
    )
    migrate.add_argument(
        "--accept-unmoved",
        metavar="KINDS",
        default="",
        help="comma-separated: wallets, coupons, payment_provider, integrations, or all: migrate orgs whose users' "
        "customers hold these, leaving them on the users' customers (the migration never moves money); without it "
        "such an org fails before any write, naming what to move. Give --verify the same",
    )
    migrate.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="progress on stderr: a bar on a terminal, log lines otherwise (default auto)",
    )
    migrate.set_defaults(handler=_handle)


#: Test hook: called after each org by the ``migrate`` command (the subprocess kill test freezes the run here).
ORG_DONE_HOOK: Callable[[OrgResult, int, int], None] | None = None


class Terminated(LagoIntegrationError):
    """The run was stopped by SIGTERM (``timeout``, systemd, a Kubernetes job stopped), as Ctrl-C stops it: the writes
    of each org in progress that belong together finished, the others cancelled (see :func:`_until_sigterm`)."""


def _handle(args: argparse.Namespace) -> int:
    # Ids and names stdout's encoding cannot hold (a redirected stdout on Windows is in its ANSI code page, cp1252)
    # are printed escaped, as stderr prints them: a UnicodeEncodeError stopped the run (after its writes) with a
    # traceback.
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return run_migrate_command(args, on_org_done=ORG_DONE_HOOK)
    except KeyboardInterrupt:  # (the CLI exits 130) what was done is done, each step idempotent: say how to go on
        _say_stopped(args, "interrupted")
        raise
    except Terminated:
        _say_stopped(args, "stopped (SIGTERM)")
        return 128 + signal.SIGTERM


def _say_stopped(args: argparse.Namespace, how: str) -> None:
    print(f"\n{_stopped(args, how)}", file=sys.stderr)


def _stopped(args: argparse.Namespace, how: str) -> str:
    """What a run stopped ``how`` says (on stderr, and in its ``--report``)."""
    if args.execute:
        again = "the same command" if args.journal else "the same command (with --journal FILE, it skips done orgs)"
        return f"migrate {how}: every step is safe to make again; run {again} to finish."
    return f"migrate {how}: nothing was changed (a {'--verify' if args.verify else 'dry run'} only reads)."


def run_migrate_command(
    args: argparse.Namespace,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    settings: BillingSettings | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    on_org_done: Callable[[OrgResult, int, int], None] | None = None,
) -> int:
    """Run ``migrate`` for parsed ``args``; returns the exit code.

    The hooks are for tests and embedding: ``transport`` (e.g. ``FakeLago().transport()``), ``settings``
    (default ``BillingSettings.from_env()``), output streams, and a callback after each org.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    settings = settings if settings is not None else BillingSettings.from_env()
    # A migration outlasts Lago's rate-limit windows: wait them out rather than fail the org.
    settings = settings.replace(
        max_retries=max(settings.max_retries, 10), retry_deadline=max(settings.retry_deadline, 600.0)
    )
    try:
        options = _options(args)
    except InvalidRequestError as exc:  # (--accept-unmoved with an unknown kind: said before anything is read)
        print(f"error: --accept-unmoved: {exc}", file=err)
        return 2
    mode: Mode = "execute" if args.execute else "verify" if args.verify else "dry-run"
    if mode == "verify" and options.prepare_only:
        print(
            "error: --prepare goes with --execute (or a dry run), not --verify: --verify checks the end state and, "
            "after the first phase, says the second is pending",
            file=err,
        )
        return 2
    if args.concurrency < 1:
        print("error: --concurrency must be at least 1", file=err)
        return 2
    # Files are checked before anything is read from or written to Lago (a report path that cannot be written failed
    # only after every write was made).
    if args.report:
        report = Path(args.report)
        if report.is_dir() or not report.resolve().parent.is_dir():
            print(f"error: --report {args.report}: not a file path in an existing directory", file=err)
            return 2
        for what, other in (("mapping file", args.mapping_file), ("journal", args.journal)):
            if other and _same_file(report, Path(other)):  # (the report written at the end replaced it)
                print(
                    f"error: --report {args.report} is the {what} ({other}): the report would replace it; give the "
                    "report a path of its own",
                    file=err,
                )
                return 2
        try:  # writable? (a file made to find out is removed: a run stopped early leaves no empty report)
            existed = report.exists()
            report.open("a", encoding="utf-8").close()
            if not existed:
                report.unlink()
        except OSError as exc:
            print(f"error: --report {args.report} cannot be written ({type(exc).__name__}: {exc})", file=err)
            return 2
    if args.journal and args.mapping_file and _same_file(Path(args.journal), Path(args.mapping_file)):
        # (the journal's lines were appended to the mapping, which every later run then refused as broken)
        print(
            f"error: --journal {args.journal} is the mapping file: the journal would be written into it; give the "
            "journal a path of its own",
            file=err,
        )
        return 2
    lock: JournalLock | None = None
    if args.journal and mode == "execute":  # (before the journal is read: another run may be writing it)
        lock = JournalLock(args.journal)
        try:
            lock.acquire()
        except JournalLockedError as exc:  # (the report left as it is: the same command's, that run's)
            print(f"error: {exc}", file=err)
            return 2
        except OSError as exc:
            return _refuse(
                args,
                f"--journal {args.journal}: its lock {lock.path} cannot be taken ({type(exc).__name__}: {exc}); "
                "nothing was done. The lock file is made next to the journal: give a --journal in a directory this "
                "user can write, on a file system with file locks (a local disk: some network shares have none)",
                err,
            )
    try:
        if args.report:
            # From here on the report is this run's: a run that did not get to write its own (killed, stopped, Lago not
            # answering) left the report of the run before it under this run's name ("ok": true, a dry run's).
            try:
                _write_report(args.report, {"ok": False, "problems": [_unfinished(args)]})
            except OSError as exc:  # (checked above, but a disk fills up, a directory goes)
                print(f"error: --report {args.report} cannot be written ({type(exc).__name__}: {exc})", file=err)
                return 2
        return _run(args, mode, options, settings, transport, out, err, on_org_done)
    except KeyboardInterrupt:
        _report_problem(args, _stopped(args, "interrupted"))
        raise
    except Terminated:
        _report_problem(args, _stopped(args, "stopped (SIGTERM)"))
        raise
    except LagoIntegrationError as exc:  # (said by the CLI's main as it exits: Lago not answering, a key refused)
        _report_problem(args, str(exc))
        raise
    finally:
        if lock is not None:
            lock.release()


def _options(args: argparse.Namespace) -> MigrationOptions:
    return MigrationOptions(
        plan_policy=args.plan_policy,
        default_plan=args.default_plan,
        on_termination_invoice=args.on_termination_invoice,
        on_termination_credit_note=args.on_termination_credit_note,
        prepare_only=bool(getattr(args, "prepare", False)),
        accept_unmoved=getattr(args, "accept_unmoved", "") or (),
    )


def _run(
    args: argparse.Namespace,
    mode: Mode,
    options: MigrationOptions,
    settings: BillingSettings,
    transport: httpx.AsyncBaseTransport | None,
    out: TextIO,
    err: TextIO,
    on_org_done: Callable[[OrgResult, int, int], None] | None,
) -> int:
    opened: Journal | None = None
    if args.journal and mode != "verify":  # (a dry run reads it to plan what --execute would do with it)
        try:
            opened = Journal(args.journal)
        except UnicodeDecodeError as exc:  # (a torn last line is skipped by Journal: this is more)
            return _refuse(
                args,
                f"--journal {args.journal} is not a journal of this command (not UTF-8: {exc}); nothing was "
                "done. Give the journal of the run to resume, or a new path to start one (without it, a run plans "
                "from what Lago has). If it is the journal of a run killed while writing its first line, move it "
                "aside: nothing had been recorded yet",
                err,
            )
        except OSError as exc:
            return _refuse(args, f"--journal {args.journal} cannot be read ({type(exc).__name__}: {exc})", err)
    if opened is not None and mode == "execute":
        try:  # writable, before the first write to Lago (its directory made, as its first record would)
            opened.path.parent.mkdir(parents=True, exist_ok=True)
            opened.path.open("a", encoding="utf-8").close()
        except OSError as exc:
            return _refuse(args, f"--journal {args.journal} cannot be written ({type(exc).__name__}: {exc})", err)

    async def main() -> int:
        counter = CallCounter(transport or httpx.AsyncHTTPTransport(retries=0, limits=_limits(args.concurrency)))
        progress = Progress(err, args.progress, mode)
        counter.on_rate_limit = progress.rate_limited
        journal: Journal | None = None
        try:
            async with LagoClient(settings, transport=counter) as client:
                if args.mapping_file:
                    records = read_mapping_file(args.mapping_file)
                else:
                    records = await load_mapping_callable(args.mapping_callable)
                orgs, warnings = await validate_mapping(client, records, options)
                journal = opened
                if journal is not None:  # (its entries of another Lago organization at the same URL never match)
                    journal.use_lago(client.settings)
                users = sum(len(org.users) for org in orgs)
                print(
                    f"migrate ({mode}): {len(orgs)} orgs, {users} users, Lago at {masked_url(settings.api_url)}",
                    file=err,
                )
                if journal is not None and journal.done_count:
                    # (an org done with another mapping row, options, Lago or id template is planned again)
                    same = sum(journal.is_done(org.org_id, org.fingerprint(options, client.settings)) for org in orgs)
                    # (done by the first phase, --prepare: the second phase finishes them)
                    prepared_orgs = journal.prepared  # (a set built once, not once per org)
                    prepared = (
                        0
                        if options.prepare_only
                        else sum(
                            journal.was_done(org.org_id)
                            and org.org_id in prepared_orgs
                            and not journal.is_done(org.org_id, org.fingerprint(options, client.settings))
                            for org in orgs
                        )
                    )
                    other = sum(journal.was_done(org.org_id) for org in orgs) - same - prepared
                    if same:
                        print(f"journal {journal.path}: {same} orgs done before, skipping them", file=err)
                    if prepared:
                        print(
                            f"journal {journal.path}: {prepared} orgs prepared by the first phase (--prepare): this "
                            "second phase ends their users' subscriptions and marks them",
                            file=err,
                        )
                    if other:
                        print(
                            f"journal {journal.path}: {other} orgs done before with another mapping row, options or "
                            "Lago: planned again (from what Lago has)",
                            file=err,
                        )

                def done(result: OrgResult, count: int, total: int) -> None:
                    progress.update(result, count, total)
                    if on_org_done is not None:
                        on_org_done(result, count, total)

                run = await run_migration(
                    client,
                    orgs,
                    mode=mode,
                    options=options,
                    concurrency=args.concurrency,
                    journal=journal,
                    counter=counter,
                    on_org_done=done,
                    allow_unreadable_entitlements=args.allow_unreadable_entitlements,
                )
        except MappingError as exc:
            return _mapping_failed(exc, args, err)
        except EntitlementsUnreadableError as exc:
            print(f"error: {exc}", file=err)
            if args.report:
                _write_report(args.report, {"ok": False, "problems": [str(exc)]})
            return 2
        finally:
            progress.close()
            if journal is not None:
                journal.close()
        run.warnings[:0] = warnings
        # The report first: printing can fail (the reader of a pipe gone, ``| head``), and then there was none.
        report_failed: OSError | None = None
        if args.report:
            try:
                _write_report(args.report, run.to_json())
            except OSError as exc:  # checked up front, but it can still fail (disk full, removed directory...)
                report_failed = exc
        if mode == "dry-run":
            _print_plan(run, out)
        _print_summary(run, out)
        if mode == "execute" and journal is None:
            _print_list("Left to do by hand", _removals_left(run), out)
        if mode == "execute" and options.prepare_only and run.ok:
            print(
                "\nFirst phase done: the orgs are subscribed, their users' subscriptions still bill the old "
                "integration's events (their fixed fees too, until the second phase). Next: deploy the middleware, "
                "then run the same command without --prepare to end the users' subscriptions and mark them.",
                file=out,
            )
        if report_failed is not None:
            print(f"error: the report could not be written to {args.report}: {report_failed}", file=err)
            return 1
        if args.report:
            print(f"report written to {args.report}", file=out)
        return 0 if run.ok else 1

    return run_main(_until_sigterm, main)


async def _until_sigterm(work: Callable[[], Awaitable[int]]) -> int:
    """``work()``, cancelled by SIGTERM as Ctrl-C cancels it (the org writes that belong together finished first:
    see ``apply_org``), then :class:`Terminated` raised. Without it SIGTERM ended the process at once, silently,
    between any two writes. Only where signals can be received (the main thread, not Windows)."""
    codes: list[int] = []
    failed: list[Exception] = []

    async def watch(group: anyio.abc.TaskGroup, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as received:
            task_status.started()
            async for _ in received:
                group.cancel_scope.cancel()
                return

    async with anyio.create_task_group() as group:
        if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
            await group.start(watch, group)
        try:
            codes.append(await work())
        except Exception as exc:  # (raised as it is, not in the task group's ExceptionGroup)
            failed.append(exc)
        group.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not codes:
        raise Terminated(
            "migrate was stopped by SIGTERM; every step is safe to make again: run the same command to finish"
        )
    return codes[0]


def _limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)


def _mapping_failed(exc: MappingError, args: argparse.Namespace, err: TextIO) -> int:
    print(f"error: the mapping has {len(exc.problems)} problem(s); nothing was changed:", file=err)
    for problem in exc.problems:
        print(f"  - {problem}", file=err)
    if args.report:
        _write_report(args.report, {"ok": False, "problems": exc.problems})
    return 2


def _write_report(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _unfinished(args: argparse.Namespace) -> str:
    """What ``--report`` holds while the run is made, and after a run that never got to write its own (killed)."""
    if args.execute:
        return (
            "migrate --execute did not finish (still running, or killed before writing its report: see its stderr); "
            "every step is safe to make again: run the same command to finish"
        )
    return (
        f"migrate {'--verify' if args.verify else 'dry run'} did not finish (still running, or killed before writing "
        "its report: see its stderr); nothing was changed (it only reads): run it again"
    )


def _report_problem(args: argparse.Namespace, problem: str) -> None:
    """``--report``: this run stopped, saying why (instead of :func:`_unfinished`). Best effort: the run stops anyway,
    for a reason said on stderr."""
    if args.report:
        with contextlib.suppress(OSError):
            _write_report(args.report, {"ok": False, "problems": [problem]})


def _refuse(args: argparse.Namespace, problem: str, err: TextIO) -> int:
    """Exit 2 before anything is done, saying ``problem`` on stderr and in ``--report``."""
    print(f"error: {problem}", file=err)
    _report_problem(args, problem)
    return 2


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name the same file (through ``..``, a symbolic or a hard link)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- output


class Progress:
    """Progress on ``stream``: a one-line ``\\r`` bar with counts and ETA on a terminal, a log line every 5%
    otherwise (and at least once a minute while orgs finish: 5% of a long run can be many minutes apart).

    The ETA is of the orgs worked on: those a resumed run's journal skips (in no time) are left out of the rate. Lago's
    rate limits are said once a minute at most (their count is on every progress line)."""

    #: Seconds: at least one progress line this often in log mode, at most one rate-limit line this often.
    EVERY = 60.0

    def __init__(self, stream: TextIO, style: str, mode: str) -> None:
        self.stream = stream
        if style == "auto":
            style = "bar" if _isatty(stream) else "lines"
        self.style = style
        self.mode = mode
        self.started = time.monotonic()
        self.failed = 0
        self.changed = 0
        self.skipped = 0
        self.rate_limit_waits = 0
        self._last_draw = 0.0
        self._last_line = self.started
        self._said_rate_limit: float | None = None
        self._drawn = False

    def rate_limited(self, seconds: float) -> None:
        self.rate_limit_waits += 1
        if self.style != "lines":
            return  # (the bar counts them)
        now = time.monotonic()
        if self._said_rate_limit is not None and now - self._said_rate_limit < self.EVERY:
            return  # (every worker in flight gets a 429 in each window: a line each flooded the log)
        self._said_rate_limit = now
        print(
            f"migrate: Lago rate limit, waiting {seconds:.1f} s ({self.rate_limit_waits} so far; the progress lines "
            "count them)",
            file=self.stream,
            flush=True,
        )

    def update(self, result: OrgResult, done: int, total: int) -> None:
        if result.status in ("failed", "unverified"):
            self.failed += 1
        if result.status in ("migrated", "prepared", "planned"):
            self.changed += 1
        if result.status == "journal":
            self.skipped += 1
        now = time.monotonic()
        elapsed = now - self.started
        worked = done - self.skipped
        eta = elapsed / worked * (total - done) if worked > 0 else 0.0
        bad = "unverified" if self.mode == "verify" else "failed"
        counts = f"{done}/{total} orgs ({done * 100 // max(total, 1)}%), {self.changed} changed, {self.failed} {bad}"
        if self.rate_limit_waits:
            counts += f", {self.rate_limit_waits} rate-limit waits"
        if self.style == "bar":
            if done < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 30
            filled = width * done // max(total, 1)
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r[{bar}] {counts} | {_clock(elapsed)} elapsed, ETA {_clock(eta)} "
            self.stream.write(line)
            self.stream.flush()
            self._drawn = True
        elif self.style == "lines":
            step = max(1, total // 20)
            if done % step == 0 or done == total or now - self._last_line >= self.EVERY:
                self._last_line = now
                print(f"migrate: {counts}, elapsed {elapsed:.1f} s, ETA {eta:.0f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


#: How the dry run names what an org's plan is (``OrgResult.phase``).
_PHASES = {
    "prepare": "phase 1 of 2 (--prepare): the users' subscriptions keep running",
    "finish": "phase 2 of 2: the org subscribed already, its users' subscriptions ended",
    "both": "both phases at once: the org subscribed and its users' subscriptions ended in this run",
}


def _print_plan(run: MigrationRun, out: TextIO) -> None:
    first = "; phase 1 of 2, --prepare: org customers and subscriptions only" if run.options.prepare_only else ""
    print(f"Plan (dry run, nothing changed{first}):", file=out)
    for result in run.orgs:
        if not result.steps and not result.errors:
            continue
        plan = f"plan {result.plan_code} ({result.plan_source})" if result.plan_code else "no plan"
        users = f"{len(result.users)} user{'' if len(result.users) == 1 else 's'}"
        phase = f" [{_PHASES[result.phase]}]" if result.phase in _PHASES and result.steps else ""
        if result.phase == "finish" and result.plan_code is None:  # (nothing subscribed, before nor now: no phase)
            phase = " [no subscription to make: its users have none]"
        print(f"org {result.org_id} [{users}]: {plan}{phase}", file=out)
        if result.entitlement_overrides is not None:
            values = format_entitlements(result.entitlement_overrides, result.entitlements_removed)
            print(f"  entitlement overrides (those of {result.entitlements_from}): {values}", file=out)
        for step in result.steps:
            print(f"  - {step.description}", file=out)
        for unmoved in result.unmoved:  # (wallets, coupons, payment links... left on the users' customers)
            print(f"  ~ not moved: user {unmoved.user_id}: {unmoved.what}; {unmoved.todo}", file=out)
        for error in result.errors:
            print(f"  ! {error}", file=out)


def _print_summary(run: MigrationRun, out: TextIO) -> None:
    report = run.to_json()
    totals = report["totals"]
    verdict = "OK" if run.ok else "FAILED" if not run.aborted else "STOPPED"
    print(f"\nMigration {run.mode}: {totals['orgs']} orgs, {totals['users']} users: {verdict}", file=out)
    rows = [("org status", "orgs")] + [(status, str(count)) for status, count in sorted(run.counts.items())]
    steps = run.step_counts()
    if steps:
        rows.append(("", ""))
        rows.append(("step:outcome", "count"))
        rows.extend((name, str(count)) for name, count in sorted(steps.items()))
    lago = report["lago"]
    rows.append(("", ""))
    rows.append(("Lago calls", f"{lago['calls']} ({lago['writes']} writes)"))
    rows.append(("calls per org", str(totals["calls_per_org"])))
    if totals["calls_per_migrated_org"] is not None:
        rows.append(("calls per migrated org", str(totals["calls_per_migrated_org"])))
    rows.append(("rate-limit waits", f"{lago['rate_limited']} ({lago['rate_limit_wait_s']} s)"))
    rows.append(("wall time", f"{run.duration_s:.2f} s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}" if name else "", file=out)
    if run.aborted:
        print(f"\nStopped: {run.aborted}\nRun the same command again to resume.", file=out)
    _print_list("Problems", [f"{r.org_id}: {e}" for r in run.orgs for e in r.errors], out)
    _print_list("Warnings", [*run.warnings, *(w for r in run.orgs for w in r.warnings)], out)


def _removals_left(run: MigrationRun) -> list[str]:
    """The plan features the donors went without that a run stopped (or an org failed) left on org subscriptions it
    made, when it had no journal: a run again cannot tell those subscriptions from ones the orgs had before, and
    leaves them their plan's features (see ``plan_org``); so they are named here, with their calls."""
    left = []
    for result in run.orgs:
        made = next((s for s in result.steps if s.kind == "create_subscription" and s.outcome == "done"), None)
        if made is None:
            continue
        status = str((result.subscription or {}).get("status") or "active")
        calls = [
            f"DELETE {_entitlements_path(step.target, status, (str(feature), None if p is None else str(p)))}"
            for step in result.steps
            if step.kind == "remove_entitlements" and step.outcome != "done"
            for feature, p in step.payload["removals"]
        ]
        if calls:
            left.append(
                f"org {result.org_id}: its subscription {made.target} was made by this run, which stopped before "
                f"taking from it what {result.entitlements_from} went without: {', '.join(calls)}. A run again "
                "without a journal cannot tell it from a subscription the org had before, and leaves it these: make "
                "the calls by hand (give every --execute a --journal FILE: a run resumed with its journal makes them)"
            )
    return left


def _print_list(title: str, items: list[str], out: TextIO, limit: int = 20) -> None:
    if not items:
        return
    print(f"\n{title} ({len(items)}):", file=out)
    for item in items[:limit]:
        print(f"  - {item}", file=out)
    if len(items) > limit:
        print(f"  ... {len(items) - limit} more in the JSON report (--report FILE)", file=out)
