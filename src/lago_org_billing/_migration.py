"""Moving billing from user-keyed Lago customers (``external_id = user id``) to org-keyed ones.

Lago can neither rename a customer's ``external_id`` nor move a subscription to another customer, so each org
is migrated in this order (every step idempotent, keyed by deterministic ids):

1. **Upsert the org customer** (``external_id = org_id``): name and email when the customer is new or lacks
   them (an existing billing email is never overwritten), metadata ``billing_type=organization``,
   ``migrated_from_user`` (the org's user ids, shortened to fit Lago's 100 characters) and
   ``created_by_user_id`` (the org's first user). Existing metadata items are kept; Lago allows 5 in all.
2. **Subscribe the org** (``external_id = settings.subscription_id_for(org_id)``) to the plan the *plan
   policy* picks among its users' active subscriptions (default ``highest``: the most expensive per year;
   ties go to the oldest subscription), unless a ``plan_code`` column or ``--default-plan`` says otherwise.
   An org that already has an active subscription keeps it, whatever its plan. The org subscription ends when the
   donor's would (its ``ending_at``: a fixed-term contract). A donor paying a price of its own (Lago's
   ``plan_overrides``: another amount, or charges, than its plan's) cannot be copied: that org fails before any
   write, saying how to make its subscription by hand (then run again); another user's own price is named in a
   warning. The policy compares what each subscription pays (``plan_amount_cents``), not the plans' list prices.
   **Entitlement overrides** go with the plan: what a subscription has of its own beyond its plan's entitlements,
   i.e. override values (``PATCH /subscriptions/{id}/entitlements``: an enterprise user's custom
   ``max_api_calls``...; never the plan values), features given to it outside its plan (``{"sso": {}}``) and plan
   features or privileges removed for it (``DELETE /subscriptions/{id}/entitlements/{feature_code}``, ``.../privileges
   /{privilege_code}``). The org subscription gets those of the one subscription the plan policy picks, the *donor*
   (the user whose plan, and billing identity, the org takes), when it is on that subscription's plan. Other users'
   differing ones are not carried (a warning names them), nor are the donor's when the org is on another plan (a
   mapping ``plan_code``, an existing org subscription). An override the org subscription already has is kept,
   never overwritten nor removed (a warning says so), so the step is idempotent: a run stopped between subscribing
   the org and setting them sets them when resumed. A plan feature the donor went without is removed only from an
   org subscription this migration made (the journal says so when resumed): one the org had before keeps it, for
   all its users, and a warning names it. When Lago does not let the API key read entitlements (``GET /features``
   answers 403) they can be neither carried nor verified: a dry run or a verification says so, and ``execute`` stops
   before its first write unless told to go on (``allow_unreadable_entitlements``), as it does when that cannot be
   checked (``GET /features`` failing otherwise: a 429 after the client's retries).
3. **Terminate the users' active subscriptions** (``on_termination_invoice``/``on_termination_credit_note``
   as chosen) and cancel their pending (not yet started) ones; the donor's last, so that a run stopped half-way
   still finds, when resumed, the subscription whose overrides the org takes.
4. **Mark each user customer** with metadata ``migrated_to_org = <org id>``.

**Two phases** (``prepare_only``, ``migrate --execute --prepare``), for a migration made while traffic flows: the
first makes steps 1 and 2 only, so that the old user-keyed integration's events go on being billed on the users'
subscriptions while the middleware, deployed next, bills the org's; the second (a run without it) makes steps 3 and
4. Every event is billed once, on the subscription it names; the fixed fees of both are billed for the window (a
warning says so). The second phase keeps the donor of the first (its journal names it; without the journal, the
candidate whose entitlements of its own the org subscription has, should another ``--plan-policy`` pick another), and
``verify`` picks it as ``execute`` did: never a subscription begun after the org subscription was made (a plan bought
or upgraded in the window; for an org subscription the org had before, after the migration first wrote to its customer,
whose ``migrated_from_user`` item's ``created_at`` says when). ``verify`` in between reports the users' active
subscriptions and that the second phase is pending.
One run doing both loses events either way: the old integration's sent after it to the users' ended subscriptions, or
the middleware's sent before it for orgs without a subscription (Lago takes both and never bills them).

**Dates.** The org subscription starts *now* (Lago's clock: no ``subscription_at`` is sent, so clock skew
cannot leave it pending; unless no user has an active subscription and some have one starting later: the org's
then starts when the first of those would have) and the user subscriptions are terminated right after, so the
old and the new subscription cover adjacent periods: with ``on_termination_invoice=generate`` Lago bills the
user's partial period up to the termination, and the org's first (prorated) period starts at the cut-over; nothing
is backdated, so no period is billed twice. The org subscription keeps the ``billing_time`` of the user
subscription its plan came from (calendar stays calendar; an anniversary subscription gets the cut-over day as
its new anniversary, since backdating ``subscription_at`` to the old anniversary would bill those days twice).
The org is subscribed *before* any user subscription is terminated, so it is never left without a plan and
Lago's state alone tells a re-run what is left to do (the journal only makes re-runs faster).
"""

from __future__ import annotations

import contextvars
import csv
import dataclasses
import datetime as dt
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import re
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Literal

import anyio
import httpx

from ._billing import (
    MAX_METADATA_ITEMS,
    MAX_METADATA_VALUE,
    METADATA_BILLING_TYPE,
    METADATA_CREATED_BY,
    METADATA_MIGRATED_FROM,
    ORGANIZATION,
    customer_metadata,
    metadata_update_items,
)
from ._client import JSON, LagoClient, _retry_after
from ._dashboard import _DECIMALS, subunits_per_unit
from ._errors import (
    InvalidIdentifierError,
    InvalidRequestError,
    LagoAuthenticationError,
    LagoIntegrationError,
    LagoNotFoundError,
    LagoUnavailableError,
    LagoValidationError,
    traceback_text,
)
from ._ids import _FORBIDDEN, MAX_ID_LENGTH, parse_time, path_segment, validate_id
from ._limits import privileges_of
from ._settings import BillingSettings

if TYPE_CHECKING:
    from ._billing import OrgBilling

__all__ = [
    "METADATA_MIGRATED_TO",
    "PLAN_POLICIES",
    "CallCounter",
    "EntitlementsUnreadableError",
    "UNMOVED_KINDS",
    "UnmovedHoldingsError",
    "Unmoved",
    "Journal",
    "JournalLock",
    "JournalLockedError",
    "MappingError",
    "MigrationOptions",
    "MigrationRun",
    "OrgMapping",
    "OrgResult",
    "build_mapping",
    "load_mapping_callable",
    "migrate_user",
    "read_mapping_file",
    "run_migration",
    "validate_mapping",
]

logger = logging.getLogger("lago_org_billing.migration")

#: Set on the user customer once its billing has moved to the org.
METADATA_MIGRATED_TO = "migrated_to_org"
#: How the org's plan is picked among its users' active subscriptions.
PLAN_POLICIES = ("highest", "lowest", "oldest", "newest")
#: What a user customer holds besides subscriptions that the migration does not move, and refuses to leave behind
#: unless told to (``MigrationOptions.accept_unmoved``).
UNMOVED_KINDS = ("wallets", "coupons", "payment_provider", "integrations")
#: What it holds that stays collectible or usable where it is: reported, never refused.
_REPORTED_KINDS = ("unpaid_invoices", "credit_notes")
MAPPING_COLUMNS = ("user_id", "org_id", "org_name", "email")
OPTIONAL_COLUMNS = ("plan_code",)
_PERIODS_PER_YEAR = {"weekly": 52, "monthly": 12, "quarterly": 4, "semiannual": 2, "yearly": 1}
_MAX_NAME = 255

Mode = Literal["dry-run", "execute", "verify"]
#: Per-subscription entitlement overrides: ``{feature_code: {privilege_code: value}}`` (``{feature_code: {}}``: a
#: feature given to the subscription beyond its plan's, without values).
Overrides = dict[str, dict[str, Any]]
#: A plan's feature (``(feature_code, None)``) or privilege (``(feature_code, privilege_code)``) removed for one
#: subscription.
Removal = tuple[str, str | None]


# ---------------------------------------------------------------------------------------------- mapping


class MappingError(InvalidRequestError):
    """The user-to-org mapping is not usable; ``problems`` lists every problem found (nothing was changed)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems)
        super().__init__(
            f"The mapping has {len(self.problems)} problem(s); fix them all, nothing was changed:\n  - {shown}"
        )


class EntitlementsUnreadableError(LagoIntegrationError):
    """``--execute`` stopped before its first write: Lago does not let the API key read entitlements (``GET
    /features`` answered 403), so the users' entitlement overrides could not be carried (see
    ``allow_unreadable_entitlements`` of :func:`run_migration`)."""


def _entitlements_refused(exc: LagoAuthenticationError, mode: Mode, *, refused: bool) -> str:
    """What a 403 on ``GET /features`` means for a run of ``mode``, and what to do."""
    code = f" {exc.code}" if exc.code else ""
    what = (
        f"Lago refused GET /features (403{code}): this API key may not read entitlements, so the entitlements of the "
        "users' subscriptions (an enterprise user's custom max_api_calls, a feature given to one subscription) are "
        "neither carried to the org subscriptions nor verified"
    )
    fix = (
        "give the API key read access to features (its permissions in Lago's API key settings; entitlements must "
        "be available on that Lago)"
    )
    if refused:
        return (
            f"{what}. Nothing was done: {fix} and run again, or, to migrate without them, run again with "
            "--allow-unreadable-entitlements (allow_unreadable_entitlements=True from Python)"
        )
    if mode == "execute":
        return (
            f"{what} (--allow-unreadable-entitlements). To find the org subscriptions that lack their donor's: {fix}, "
            "then run --verify, which prints the calls that set them"
        )
    if mode == "verify":
        return f"{what}: --verify did not check them. {fix[0].upper()}{fix[1:]} and run --verify again"
    return f"{what}. --execute stops before its first write unless given --allow-unreadable-entitlements: {fix}"


def _entitlements_unchecked(exc: LagoIntegrationError) -> str:
    """``execute`` stopped: ``GET /features`` failed otherwise than with a 403 (or a 401), so whether the API key may
    read entitlements is not known."""
    return (
        f"GET /features failed ({exc}): whether this API key may read entitlements could not be checked, and without "
        "them the entitlements of the users' subscriptions (an enterprise user's custom max_api_calls, a feature "
        "given to one subscription) would not be carried to the org subscriptions. Nothing was done: run again once "
        "Lago answers it, or, to migrate even if they cannot be read, run again with --allow-unreadable-entitlements "
        "(allow_unreadable_entitlements=True from Python)"
    )


@dataclasses.dataclass(frozen=True)
class OrgMapping:
    """One org of the mapping with its users, in mapping order (the first user is taken as its creator)."""

    org_id: str
    org_name: str
    email: str | None
    users: tuple[str, ...]
    plan_code: str | None = None

    #: ``users`` are all the org's users (a mapping's rows), so a user an earlier run moved to the org and not among
    #: them was moved elsewhere since (a warning says so). Not a field: the journal's fingerprints stay as they were.
    every_user: ClassVar[bool] = True

    def fingerprint(self, options: MigrationOptions, settings: BillingSettings | None = None) -> str:
        """A short hash of everything that decides this org's migration (the journal skips an org only when
        it was done with the same mapping and options, on the same Lago and subscription id template; the same Lago
        organization too, which the journal tells by its entries' ``lago``: see :meth:`Journal.use_lago`)."""
        target = [settings.api_url, settings.subscription_id_template] if settings is not None else []
        # (``prepare_only`` only when set: the fingerprints of a journal written before the phases existed still match)
        # (nor ``accept_unmoved``: it decides whether an org may be migrated, not what its migration does)
        chosen = [
            getattr(options, field.name)
            for field in dataclasses.fields(options)
            if (field.name != "prepare_only" or options.prepare_only) and field.name != "accept_unmoved"
        ]
        data = json.dumps([dataclasses.astuple(self), chosen, target], sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class _OneUserMapping(OrgMapping):
    """The org of ``OrgBilling.migrate_user_to_org``: the one user moved by the call, the org's others not named (the
    seed's API moves a user at a time), so those an earlier call moved to the org have not left it."""

    every_user: ClassVar[bool] = False


def read_mapping_file(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Read a JSON (list of objects) or CSV (header ``user_id,org_id,org_name,email[,plan_code]``) mapping
    file; returns ``(location, record)`` pairs. Raises :class:`MappingError` when it cannot be read at all: not
    UTF-8 (the line named), empty, a CSV header or JSON object giving a column twice, a CSV quoted field running
    over lines (a quote not closed: the rows after it would be read as that field), a CSV line ``csv`` cannot read."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MappingError([f"{path}: cannot read the mapping file ({exc})"]) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MappingError([_not_utf8(path, raw, exc)]) from exc
    if not text.strip():
        raise MappingError(
            [
                f"{path.name} is empty: expected a CSV header {','.join(MAPPING_COLUMNS)}[,plan_code] and a row per "
                "user, or a JSON list of objects with these keys"
            ]
        )
    looks_json = path.suffix.lower() == ".json" or (path.suffix.lower() != ".csv" and text.lstrip()[:1] == "[")
    if looks_json:
        repeated: dict[int, list[str]] = {}

        def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            item = dict(pairs)
            if len(item) < len(pairs):  # (json.loads keeps the last value of a key given twice: said, not guessed)
                keys = [key for key, _ in pairs]
                repeated[id(item)] = sorted({key for key in keys if keys.count(key) > 1})
            return item

        try:
            data = json.loads(text, object_pairs_hook=unique_keys)
        except (ValueError, RecursionError) as exc:  # (RecursionError: nested thousands deep)
            raise MappingError([f"{path}: not valid JSON ({exc})"]) from exc
        if not isinstance(data, list):
            raise MappingError([f"{path}: JSON mapping must be a list of objects, got {type(data).__name__}"])
        twice = [
            f"{path.name} item {index}: key(s) given more than once: {', '.join(repeated[id(item)])} (which one is "
            "meant cannot be told)"
            for index, item in enumerate(data, 1)
            if id(item) in repeated
        ]
        if twice:
            raise MappingError(twice)
        return [(f"{path.name} item {index}", item) for index, item in enumerate(data, 1)]
    # Python 3.10's csv refuses a NUL ("line contains NUL", out of the CLI as a traceback); 3.11 reads it as the
    # character it is, named by the checks of the field it is in. The file is read with a character it does not hold
    # in its place, put back in each field.
    nul = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text), "\x00") if "\x00" in text else ""
    if nul:
        text = text.replace("\x00", nul)
    reader = csv.reader(io.StringIO(text, newline=""))
    first: list[str] | None = []
    try:  # (blank lines before the header skipped, as those between rows are: a spreadsheet's ",,," rows too)
        while first is not None and not any(name.strip() for name in first):
            start = reader.line_num + 1
            first = next(reader, None)
    except csv.Error as exc:
        raise MappingError([_unreadable_csv(path, start, reader.line_num, exc)]) from exc
    header = [name.replace(nul, "\x00").strip() if nul else name.strip() for name in first or []]
    # A spreadsheet's export ends the header with unnamed columns when its used range is wider than the data
    # ("user_id,org_id,org_name,email,,"): no columns, as long as the rows leave them empty (see below). One among the
    # named columns is said as such ("given more than once: " naming nothing, and "unknown column(s) ''", before).
    width = len(header)
    while header and not header[-1]:
        header.pop()
    unnamed = [str(index) for index, column in enumerate(header, 1) if not column]
    missing = [column for column in MAPPING_COLUMNS if column not in header]
    unknown = [column for column in header if column and column not in (*MAPPING_COLUMNS, *OPTIONAL_COLUMNS)]
    doubled = [column for column in dict.fromkeys(header) if column and header.count(column) > 1]
    if missing or unknown or doubled or unnamed:
        problems = []
        if doubled:  # (which value is meant cannot be told)
            problems.append(f"{path.name} header: column(s) given more than once: {', '.join(doubled)}")
        if missing:
            problems.append(f"{path.name} header: missing column(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"{path.name} header: unknown column(s) {', '.join(map(repr, unknown))}")
        if unnamed:
            problems.append(f"{path.name} header: unnamed column(s) {', '.join(unnamed)}")
        problems[-1] += f" (expected {','.join(MAPPING_COLUMNS)}[,plan_code])"
        raise MappingError(problems)
    records: list[tuple[str, dict[str, Any]]] = []
    runaway: list[str] = []
    end = reader.line_num
    while True:
        start = end + 1  # (the line the row begins on: a quoted field may hold line breaks)
        try:
            row = next(reader, None)
        except csv.Error as exc:  # (a quote not closed in a large file: a field over csv's limit)
            raise MappingError([_unreadable_csv(path, start, reader.line_num, exc)]) from exc
        if row is None:
            break
        end = reader.line_num
        if not any(field.strip() for field in row):  # a blank line, or a spreadsheet's row of empty cells (",,,")
            continue
        if len(row) > len(header) and not any(field.strip() for field in row[len(header) : width]):
            row = row[: len(header)] + row[width:]  # (the header's unnamed columns, left empty; a value there is said)
        if nul:
            row = [field.replace(nul, "\x00") for field in row]
        # (as csv.DictReader: the fields beyond the header under None, a short row's missing ones None)
        record: dict[str, Any] = dict(zip(header, row, strict=False))
        record.update({column: None for column in header[len(row) :]})
        if len(row) > len(header):
            record[None] = row[len(header) :]  # type: ignore[index]
        if end > start:
            runaway.append(
                f"{path.name} line {start}: a quoted field runs on to line {end} (a double quote opened and not "
                "closed?): the lines in between would be read as that field, not as rows; close the quote, or "
                "remove it"
            )
        records.append((f"{path.name} line {start}", record))
    if runaway:
        raise MappingError(runaway)
    return records


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A lone surrogate: what a JSON export's ``"\ud800"`` decodes to, no Unicode text (it cannot be sent as UTF-8)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unreadable_csv(path: Path, start: int, end: int, exc: csv.Error) -> str:
    """The problem of a CSV mapping file that ``csv`` cannot read from line ``start`` (stopped at line ``end``)."""
    if "field limit" in str(exc) and end > start:
        return (
            f"{path.name} line {start}: a quoted field runs on to line {end} and beyond, longer than any name ({exc}): "
            "a double quote opened and not closed? Close the quote, or remove it"
        )
    return f"{path.name} line {start}: not readable as CSV ({exc}); fix the line, or export the file again"


def _not_utf8(path: Path, raw: bytes, exc: UnicodeDecodeError) -> str:
    """The problem of a mapping file that is not UTF-8: the line and byte, and how to convert it."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        what = "UTF-16 (Excel's 'Unicode Text'?), not UTF-8"
    else:
        what = f"not UTF-8 (byte 0x{raw[exc.start]:02x}; Latin-1 or Windows-1252, as Excel writes 'CSV' on Windows?)"
    line = raw[: exc.start].count(b"\n") + 1
    return (
        f"{path.name} line {line}: {what}; save it as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f WINDOWS-1252 -t UTF-8 "
        f"{path.name}) and run again"
    )


async def load_mapping_callable(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Call ``module:function`` (no arguments; sync or async, e.g. a database query) and return its rows:
    mappings, named tuples, dataclasses or objects with ``user_id``, ``org_id``, ``org_name``, ``email``."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise MappingError([f"--mapping-callable {spec!r} must look like 'package.module:function'"])
    if os.getcwd() not in sys.path:  # like ``uvicorn module:app``: the project's modules import from here
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise MappingError([f"--mapping-callable {spec!r}: {exc}"]) from exc
    except Exception as exc:  # (the module's own code failing at import: a database connection made there)
        raise _callable_failed(spec, exc) from exc
    try:
        result = function()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, AsyncIterable):  # an async generator (rows streamed from an async database query)
            result = [row async for row in result]
        if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
            raise MappingError(
                [
                    f"--mapping-callable {spec!r} must return an iterable of rows (a list, a generator, an async "
                    f"generator), got {type(result).__name__}"
                ]
            )
        return [(f"{spec} row {index}", _ids_as_text(_row_dict(row))) for index, row in enumerate(result, 1)]
    except LagoIntegrationError:  # (this package's own errors: a MappingError above, Lago down under one using it)
        raise
    except Exception as exc:  # (its database down, a cursor failing midway)
        raise _callable_failed(spec, exc) from exc


def _callable_failed(spec: str, exc: Exception) -> MappingError:
    """The error of a mapping callable (or its module) that raised ``exc``: reported as an unreadable mapping file is
    (exit 2, one line, the ``--report`` written, nothing sent to Lago), not raised out of the command as a traceback
    with no report; the traceback is logged (``-v``) to find where it failed."""
    logger.info("--mapping-callable %r failed\n%s", spec, traceback_text(exc))
    return MappingError([f"--mapping-callable {spec!r} failed: {type(exc).__name__}: {exc}"])


def _ids_as_text(record: dict[str, Any]) -> dict[str, Any]:
    """A mapping callable's row with its integer and UUID ids as their text: a query's column types, whose text is the
    id the app keyed its customers with (``str(user.id)``). Exact, unlike a file's JSON numbers (``1e3``, a float of
    an id past 2**53), which stay refused there; a bool or a float stays refused here too."""
    for key in ("user_id", "org_id"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            record[key] = str(int(value))  # (an IntEnum's str() is its name on Python 3.10)
        elif isinstance(value, uuid.UUID):
            record[key] = str(value)
    return record


def _row_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    if hasattr(row, "_asdict"):
        return dict(row._asdict())
    if hasattr(row, "_mapping"):  # SQLAlchemy Row
        return dict(row._mapping)
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return dataclasses.asdict(row)
    return {key: getattr(row, key) for key in (*MAPPING_COLUMNS, *OPTIONAL_COLUMNS) if hasattr(row, key)}


def build_mapping(records: Sequence[tuple[str, Any]], settings: BillingSettings) -> tuple[list[OrgMapping], list[str]]:
    """Validate every record and group them by org. Returns ``(orgs, warnings)``; raises :class:`MappingError`
    listing *all* problems (missing keys, empty or URL-unsafe ids, duplicate users, conflicting org names or
    plans, an org id that is also a mapped user id)."""
    problems: list[str] = []
    warnings: list[str] = []
    if not records:
        problems.append("the mapping has no rows")
    seen_users: dict[str, str] = {}
    orgs: dict[str, dict[str, Any]] = {}
    for where, record in records:
        if not isinstance(record, Mapping):
            problems.append(f"{where}: expected an object with {', '.join(MAPPING_COLUMNS)}, got {record!r}")
            continue
        if None in record:  # csv.DictReader puts the fields beyond the header under None
            problems.append(f"{where}: more fields than the header has columns (a comma inside an unquoted name?)")
        unknown = [key for key in record if key is not None and key not in (*MAPPING_COLUMNS, *OPTIONAL_COLUMNS)]
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
        values: dict[str, str | None] = {}
        mistyped: set[str] = set()
        for key in (*MAPPING_COLUMNS, *OPTIONAL_COLUMNS):
            raw = record.get(key)
            if raw is not None and not isinstance(raw, str):
                hint = f' (quote it: "{raw}")' if isinstance(raw, int) and not isinstance(raw, bool) else ""
                problems.append(f"{where}: {key} must be a string{hint}, got {raw!r}")
                mistyped.add(key)
                raw = None
            values[key] = raw
        row_ok = True
        for key in ("user_id", "org_id"):
            value = values[key]
            if key not in record:
                problems.append(f"{where}: missing {key}")
                row_ok = False
            elif key in mistyped:  # (said above)
                row_ok = False
            elif not value or not value.strip():
                problems.append(f"{where}: empty {key}")
                row_ok = False
            else:
                try:
                    validate_id(value, key)
                except InvalidIdentifierError as exc:
                    problems.append(f"{where}: {(_unaddressable_user(value) if key == 'user_id' else None) or exc}")
                    row_ok = False
        org_name = values["org_name"]
        if "org_name" in mistyped:
            pass  # (said above)
        elif not org_name or not org_name.strip():
            problems.append(f"{where}: empty org_name")
        elif len(org_name) > _MAX_NAME:
            problems.append(f"{where}: org_name is longer than Lago's {_MAX_NAME} characters")
        elif control := _CONTROL.search(org_name):  # (a NUL is refused by Lago's database: an org failing mid-run)
            problems.append(
                f"{where}: org_name contains the control character {control.group()!r} (a line break of a quote not "
                "closed, or a byte of a binary export?): remove it"
            )
        elif _SURROGATE.search(org_name):  # (else the org's customer write failed mid-run, unencodable)
            problems.append(
                f"{where}: org_name {org_name!r} holds a lone surrogate (a JSON '\\ud800' escape of half a character, "
                "from a broken export): no Unicode text; fix the export"
            )
        email = (values["email"] or "").strip() or None
        if email is not None and (
            "@" not in email or any(c.isspace() or _CONTROL.match(c) for c in email) or _SURROGATE.search(email)
        ):
            problems.append(f"{where}: email {email!r} is not an email address")
        plan_code = (values["plan_code"] or "").strip() or None
        if plan_code is not None:
            try:
                validate_id(plan_code, "plan_code")
            except InvalidIdentifierError as exc:
                problems.append(f"{where}: {exc}")
        if not row_ok:
            continue
        user_id, org_id = str(values["user_id"]), str(values["org_id"])
        if user_id in seen_users:
            problems.append(f"{where}: duplicate user_id {user_id!r} (already in {seen_users[user_id]})")
            continue
        seen_users[user_id] = where
        org = orgs.setdefault(
            org_id, {"where": where, "name": org_name, "email": None, "emails": set(), "users": [], "plans": {}}
        )
        org["users"].append(user_id)
        if org_name and org["name"] and org_name != org["name"]:
            problems.append(f"{where}: org {org_id!r} is named {org_name!r} here but {org['name']!r} in {org['where']}")
        if email is not None:
            org["emails"].add(email)
            org["email"] = org["email"] or email
        if plan_code is not None:
            org["plans"].setdefault(plan_code, where)
    for org_id, org in orgs.items():
        if org_id in seen_users:
            problems.append(
                f"org_id {org_id!r} ({org['where']}) is also a mapped user_id ({seen_users[org_id]}): Lago keys "
                "customers by external_id only, so the org and the user customer would be the same one"
            )
        if len(org["plans"]) > 1:
            listed = ", ".join(f"{code!r} ({where})" for code, where in org["plans"].items())
            problems.append(f"org {org_id!r} has conflicting plan_code values: {listed}")
        try:
            validate_id(settings.subscription_id_for(org_id), f"subscription id of org {org_id!r}")
        except InvalidIdentifierError as exc:
            problems.append(f"{org['where']}: {exc} (check LAGO_SUBSCRIPTION_ID_TEMPLATE)")
    if problems:
        raise MappingError(problems)
    several = [org_id for org_id, org in orgs.items() if len(org["emails"]) > 1]
    if several:
        warnings.append(
            f"{len(several)} org(s) (e.g. {several[0]!r}) have rows with different emails: each org customer gets "
            "the email of its first row"
        )
    result = [
        OrgMapping(
            org_id=org_id,
            org_name=str(org["name"]),
            email=org["email"],
            users=tuple(org["users"]),
            plan_code=next(iter(org["plans"]), None),
        )
        for org_id, org in orgs.items()
    ]
    return result, warnings


def _unaddressable_user(user_id: str) -> str | None:
    """The problem of a user id with a character Lago's ``/customers/{id}`` cannot take ('.', '/'...), with what to
    do; ``None`` for other invalid ids (blanks, length: the mapping can fix those)."""
    bad = _FORBIDDEN.search(user_id)
    if bad is None or user_id != user_id.strip() or len(user_id) > MAX_ID_LENGTH:
        return None
    char = bad.group()
    if char == ".":
        head, _, tail = user_id.partition(".")
        why = f"GET /customers/{user_id} is read as customer {head!r} in format {tail!r}"
    else:
        why = "it cannot be sent in a URL path"
    return (
        f"user_id {user_id!r} contains {char!r}: Lago cannot address this user's customer ({why}), so the "
        "migration can neither read it nor end its subscriptions. Do not rename it here (another id is another "
        "customer: this one would keep its subscriptions and stay billed). Remove this row and move this user by "
        "hand in Lago's dashboard: terminate its subscriptions once its org is subscribed (give the org a plan_code "
        "if it should get this user's plan)"
    )


async def validate_mapping(
    client: LagoClient, records: Sequence[tuple[str, Any]], options: MigrationOptions
) -> tuple[list[OrgMapping], list[str]]:
    """:func:`build_mapping` plus a check, in Lago (reads only), that every ``plan_code`` of the rows and
    ``options.default_plan`` exist. Raises one :class:`MappingError` listing every problem of both kinds."""
    # One read first: a refused key is the same error (exit 2) whatever the mapping holds.
    await client.list_customers(per_page=1)
    problems: list[str] = []
    orgs: list[OrgMapping] = []
    warnings: list[str] = []
    try:
        orgs, warnings = build_mapping(records, client.settings)
    except MappingError as exc:
        problems.extend(exc.problems)
    codes: dict[str, list[str]] = {}
    for where, record in records:
        code = record.get("plan_code") if isinstance(record, Mapping) else None
        if isinstance(code, str) and code.strip():
            try:
                codes.setdefault(validate_id(code.strip(), "plan_code"), []).append(where)
            except InvalidIdentifierError:
                pass  # reported by build_mapping
    plans = PlanCatalog(client)
    for code, places in codes.items():
        if await plans.get(code) is None:
            more = f" (and {len(places) - 1} more rows)" if len(places) > 1 else ""
            problems.append(f"{places[0]}: plan_code {code!r} is not a plan in Lago{more}")
    if options.default_plan is not None and await plans.get(options.default_plan) is None:
        problems.append(f"--default-plan {options.default_plan!r} is not a plan in Lago")
    if problems:
        raise MappingError(problems)
    return orgs, warnings


# ------------------------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class MigrationOptions:
    """What the migration does where the mapping leaves a choice.

    * **plan_policy** - ``highest`` (default: the plan with the largest yearly amount among the org's users'
      active subscriptions), ``lowest``, ``oldest`` (the longest-running subscription's plan) or ``newest``.
    * **default_plan** - plan of orgs whose users have no active subscription (default: none, the org gets a
      customer but no subscription, and ``--verify`` reports it).
    * **on_termination_invoice** - ``generate`` (default: bill the user's partial period) or ``skip``.
    * **on_termination_credit_note** - ``credit``/``refund``/``offset``/``skip`` for pay-in-advance plans
      (default: Lago's, ``credit``).
    * **prepare_only** - the first phase of a migration made while traffic flows (``--prepare``): the org customers
      and subscriptions (with the donor's entitlement overrides) only; the users' subscriptions are neither ended nor
      their customers marked, so the old user-keyed integration's events go on being billed on them while the
      middleware's are billed on the org's. Deploy the middleware, then run again without it (the second phase ends
      and marks them). The fixed fees of both are billed for that window. Default ``False``: both phases at once.
    * **accept_unmoved** - what the users' customers hold besides subscriptions that the migration may leave on
      them (it never moves money): any of ``wallets`` (active wallets with a balance or recurring top-ups),
      ``coupons`` (active applied coupons), ``payment_provider`` (a payment provider link the org customer lacks),
      ``integrations`` (accounting/tax integration customers the org customer lacks), or ``all``; a set, or a
      comma-separated string. An org whose users hold one not accepted fails, before any write, when its users'
      subscriptions would be ended (not in the first phase, ``prepare_only``), saying what to move where; default
      none. Whatever is accepted is reported (``OrgResult.unmoved`` and a warning), as are the users' unpaid invoices
      and credit notes with credit left, never refused.
    """

    plan_policy: str = "highest"
    default_plan: str | None = None
    on_termination_invoice: str = "generate"
    on_termination_credit_note: str | None = None
    prepare_only: bool = False
    accept_unmoved: Collection[str] = ()

    def __post_init__(self) -> None:
        # (kept as a sorted tuple: hashable, and written to the journal and the JSON report as a list)
        object.__setattr__(self, "accept_unmoved", _unmoved_kinds(self.accept_unmoved))
        if self.plan_policy not in PLAN_POLICIES:
            raise InvalidRequestError(f"plan_policy must be one of {', '.join(PLAN_POLICIES)}.")
        if self.on_termination_invoice not in ("generate", "skip"):
            raise InvalidRequestError("on_termination_invoice must be 'generate' or 'skip'.")
        if self.on_termination_credit_note not in (None, "credit", "refund", "offset", "skip"):
            raise InvalidRequestError("on_termination_credit_note must be 'credit', 'refund', 'offset' or 'skip'.")
        if self.default_plan is not None:
            validate_id(self.default_plan, "default_plan")
        if not isinstance(self.prepare_only, bool):
            raise InvalidRequestError("prepare_only must be True or False.")


def _unmoved_kinds(raw: Any) -> tuple[str, ...]:
    """``accept_unmoved`` as a sorted tuple of :data:`UNMOVED_KINDS` (``all``: every one)."""
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else list(raw) if isinstance(raw, Iterable) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise InvalidRequestError(
            f"accept_unmoved must be a set of {', '.join(UNMOVED_KINDS)} (or 'all'), or those comma-separated."
        )
    kinds = {item.strip() for item in items if item.strip()}
    if "all" in kinds:
        kinds = (kinds - {"all"}) | set(UNMOVED_KINDS)
    unknown = sorted(kinds - set(UNMOVED_KINDS))
    if unknown:
        raise InvalidRequestError(
            f"accept_unmoved: unknown kind(s) {', '.join(map(repr, unknown))}; choose among "
            f"{', '.join(UNMOVED_KINDS)} (or 'all')."
        )
    return tuple(sorted(kinds))


# ----------------------------------------------------------------------------------------- counting


@dataclasses.dataclass
class CallStats:
    """Lago calls made (all, writes, per method) and rate-limit waits."""

    calls: int = 0
    writes: int = 0
    rate_limited: int = 0
    rate_limit_wait_s: float = 0.0
    by_method: Counter[str] = dataclasses.field(default_factory=Counter)

    def to_json(self) -> JSON:
        return {
            "calls": self.calls,
            "writes": self.writes,
            "reads": self.calls - self.writes,
            "rate_limited": self.rate_limited,
            "rate_limit_wait_s": round(self.rate_limit_wait_s, 3),
            "by_method": dict(sorted(self.by_method.items())),
        }


_org_stats: contextvars.ContextVar[CallStats | None] = contextvars.ContextVar("lago_migration_org", default=None)


class CallCounter(httpx.AsyncBaseTransport):
    """An httpx transport wrapper that counts Lago calls (in total and per org being migrated) and, when Lago
    answers 429, holds every other request until the ``X-RateLimit-Reset`` window ends (the client retries the
    throttled one itself), so concurrent workers do not keep hitting the limit."""

    #: Seconds between two WARNING lines about rate limits (the others are logged at DEBUG): at Lago Cloud's 50 req/s
    #: a long run meets the limit every second or so, and a line per 429 flooded its log.
    WARN_EVERY = 60.0

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.inner = inner if inner is not None else httpx.AsyncHTTPTransport(retries=0)
        self.stats = CallStats()
        self._paused_until = 0.0
        self._warned_at: float | None = None
        self.on_rate_limit: Callable[[float], None] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        wait = self._paused_until - time.monotonic()
        if wait > 0:  # (counted once, when the 429 set it: not again per request waiting it out)
            await anyio.sleep(wait)
        response = await self.inner.handle_async_request(request)
        if request.url.path.startswith("/api/"):
            write = request.method != "GET"
            for stats in (self.stats, _org_stats.get()):
                if stats is not None:
                    stats.calls += 1
                    stats.writes += write
                    stats.by_method[request.method] += 1
        if response.status_code == 429:
            # Without X-RateLimit-Reset the client backs off on its own and the others go on. Read as the client reads
            # it (a proxy's Unix time of the reset is not 56 years to hold the run for); one read as infinite ("inf",
            # "1e999") is no wait either: every call after it was held until its timeout, and each org failed
            reset = _retry_after(response.headers, ("x-ratelimit-reset",))
            reset = reset if reset is not None and math.isfinite(reset) else 0.0
            now = time.monotonic()
            self.stats.rate_limited += 1
            # the time the run is held: the 429s of one window (every worker in flight gets one) extend the pause,
            # they do not add a window each (a sum over requests exceeded the run's wall time)
            self.stats.rate_limit_wait_s += max(0.0, now + reset - max(self._paused_until, now))
            self._paused_until = max(self._paused_until, now + reset)
            if self._warned_at is None or now - self._warned_at >= self.WARN_EVERY:
                self._warned_at = now
                logger.warning(
                    "Lago rate limit reached: waiting %.1f s (X-RateLimit-Reset); %d so far (more within %.0f s are "
                    "logged at DEBUG)",
                    reset,
                    self.stats.rate_limited,
                    self.WARN_EVERY,
                )
            else:
                logger.debug("Lago rate limit reached: waiting %.1f s (X-RateLimit-Reset)", reset)
            if self.on_rate_limit is not None:
                self.on_rate_limit(reset)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _int(raw: Any) -> int | None:
    try:
        return int(raw) if raw is not None and not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- journal


def _lago_of(entry: Mapping[str, Any]) -> str | None:
    """The Lago organization a journal entry was written for (see :meth:`Journal.use_lago`), None when not said."""
    lago = entry.get("lago")
    return lago if isinstance(lago, str) else None


class Journal:
    """An append-only JSON-lines log of every step. An org recorded ``done`` with the same fingerprint
    (mapping rows and options) is skipped by the next run; a torn last line (killed process) is ignored."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        #: org id -> (fingerprint, ``lago`` of the entry: None in a journal of an earlier version)
        self._done: dict[str, tuple[str, str | None]] = {}
        self._prepared: set[str] = set()
        self._donors: dict[str, tuple[str, str]] = {}
        self._subscribed: set[tuple[str, str, str, str | None]] = set()
        #: The Lago organization of this run (:meth:`use_lago`): written in each entry, and an entry of another's
        #: never matches.
        self.lago: str | None = None
        self._file: IO[str] | None = None
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        """Read the journal a line at a time (a long migration's, resumed a few times, is tens of MB: read whole, it
        was held twice, as bytes and as a list of lines)."""
        read_one = False
        with self.path.open("rb") as file:
            for raw in file:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    # (the last line cut by a kill or a full disk, inside a UTF-8 character: skipped as any torn line;
                    # not UTF-8 elsewhere, or nothing read before it: not a journal, said by the caller)
                    if not raw.endswith(b"\n") and read_one:
                        continue  # (a line without its newline is the file's last)
                    raise
                try:
                    entry = json.loads(text)
                except (ValueError, RecursionError):
                    continue
                read_one = read_one or isinstance(entry, dict)
                if isinstance(entry, dict) and self._subscribing(entry):
                    self._subscribed.add(
                        (
                            str(entry.get("org_id")),
                            str(entry.get("target")),
                            str(entry.get("fingerprint")),
                            _lago_of(entry),
                        )
                    )
                if not isinstance(entry, dict) or entry.get("type") != "org":
                    continue
                if entry.get("status") == "done":
                    self._done[str(entry.get("org_id"))] = (str(entry.get("fingerprint")), _lago_of(entry))
                    self._phase_done(entry)
                else:
                    self._done.pop(str(entry.get("org_id")), None)

    def use_lago(self, settings: BillingSettings) -> None:
        """Set the Lago organization this run migrates: its entries say it (``lago``), and those of another never match
        (not skipped as done, not taken as having made the org's subscription). Lago Cloud serves every organization
        (staging, production) at one URL, told apart by the API key: a hash of URL and key, no secret written. A
        journal of an earlier version, whose entries say none, matches as before; a key rotated plans the orgs done
        again (a few reads each, nothing written twice)."""
        text = f"lago-org-billing journal\n{settings.api_url}\n{settings.api_key}"
        self.lago = hashlib.sha256(text.encode()).hexdigest()[:16]

    def _same_lago(self, lago: str | None) -> bool:
        return lago is None or self.lago is None or lago == self.lago

    def is_done(self, org_id: str, fingerprint: str) -> bool:
        found = self._done.get(org_id)
        return found is not None and found[0] == fingerprint and self._same_lago(found[1])

    @property
    def prepared(self) -> frozenset[str]:
        """The orgs a first phase (``prepare_only``: ``--prepare``) of this journal was done for."""
        return frozenset(org_id for org_id in self._prepared if self._prepared_here(org_id))

    def _prepared_here(self, org_id: str) -> bool:
        """Whether a first phase for this run's Lago organization prepared the org (see :meth:`use_lago`)."""
        return org_id in self._prepared and self._same_lago(self._done.get(org_id, ("", None))[1])

    def prepared_donor(self, org_id: str) -> tuple[str, str] | None:
        """The user and subscription id whose entitlement overrides the first phase gave the org (its donor)."""
        # (one org's look: not the whole prepared set built again for each org)
        return self._donors.get(org_id) if self._prepared_here(org_id) else None

    def _phase_done(self, entry: Mapping[str, Any]) -> None:
        """An org recorded done: by a first phase (its donor kept for the second), or finished."""
        org_id = str(entry.get("org_id"))
        donor = entry.get("donor")
        if entry.get("phase") != "prepare":
            self._prepared.discard(org_id)
            self._donors.pop(org_id, None)
            return
        self._prepared.add(org_id)
        if isinstance(donor, list) and len(donor) == 2 and all(isinstance(part, str) for part in donor):
            self._donors[org_id] = (donor[0], donor[1])
        else:
            self._donors.pop(org_id, None)

    def was_done(self, org_id: str) -> bool:
        """Whether the org was last recorded done, with whatever fingerprint."""
        return org_id in self._done

    @staticmethod
    def _subscribing(entry: Mapping[str, Any]) -> bool:
        """The entry a run writes before it asks Lago to make the org subscription (see :func:`apply_org`)."""
        return (
            entry.get("type") == "step"
            and entry.get("step") == "create_subscription"
            and entry.get("outcome") == "started"
            and entry.get("fingerprint") is not None
        )

    def made_subscription(self, org_id: str, subscription_id: str, fingerprint: str) -> bool:
        """Whether a run of this migration (same mapping rows and options: ``fingerprint``) set out to make the org
        subscription ``subscription_id`` (recorded before it asked Lago), i.e. the org had none before it."""
        return any((org_id, subscription_id, fingerprint, lago) in self._subscribed for lago in {None, self.lago})

    @property
    def done_count(self) -> int:
        return len(self._done)

    def record(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            if self._torn():  # (a line cut by a crash: this record on a line of its own, not glued to it and lost)
                self._file.write("\n")
        if self.lago is not None:
            fields = {**fields, "lago": self.lago}
        entry = {"type": kind, "at": _now_iso(), **fields}
        self._file.write(json.dumps(entry, default=str, separators=(",", ":")) + "\n")
        self._file.flush()
        if kind == "org" and fields.get("status") == "done":
            self._done[str(fields["org_id"])] = (str(fields.get("fingerprint")), self.lago)
            self._phase_done(fields)
        if self._subscribing({"type": kind, **fields}):
            self._subscribed.add((str(fields["org_id"]), str(fields["target"]), str(fields["fingerprint"]), self.lago))

    def _torn(self) -> bool:
        """Whether the journal ends inside a line (its last write cut by a kill or a full disk)."""
        try:
            with self.path.open("rb") as file:
                if file.seek(0, os.SEEK_END) == 0:
                    return False
                file.seek(-1, os.SEEK_END)
                return file.read(1) != b"\n"
        except OSError:
            return False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class JournalLockedError(LagoIntegrationError):
    """Another run holds the journal's lock (:class:`JournalLock`); nothing was done."""


class JournalLock:
    """An exclusive lock on ``<journal>.lock`` held for a whole ``migrate --execute --journal`` run, so that a second
    run on the same journal (re-run in another terminal, by a scheduler...) stops at once (:class:`JournalLockedError`)
    rather than migrating the same orgs at the same time.

    It is an OS lock, taken without waiting: ``fcntl.flock`` (``msvcrt.locking`` on Windows). The OS drops it when
    the process ends, killed or crashed as well, so a lock is never stale: the ``.lock`` file stays behind and its
    presence means nothing (it names the last holder, for the message). On a platform with neither (WASI...) no lock
    is taken and a warning is logged. Two runs with *different* journals are not prevented from overlapping.
    :func:`run_migration` does not take it (it is given a journal already read): hold it around ``Journal(path)``
    and the run, as the CLI does.
    """

    def __init__(self, journal: str | Path) -> None:
        self.journal = Path(journal)
        resolved = self.journal.resolve()  # (the same file through a symlink or a relative path: the same lock)
        self.path = resolved.with_name(resolved.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`JournalLockedError` (another process holds it) or ``OSError``."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, holder = take_file_lock(self.path, f"pid {os.getpid()} on {socket.gethostname()}, started {_now_iso()}")
        if fd is None:
            raise JournalLockedError(
                f"another migration holds the journal {self.journal} (lock {self.path}"
                f"{': ' + holder if holder else ''}); nothing was done. Two --execute runs on one journal would "
                "migrate the same orgs at once: wait for that run to finish (or stop it), then run the same command "
                "again, it resumes from the journal"
            )
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (nothing when not held)."""
        fd, self._fd = self._fd, None
        drop_file_lock(fd)

    def __enter__(self) -> JournalLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def take_file_lock(path: str | Path, holder: str) -> tuple[int | None, str]:
    """Open ``path`` (made if missing) and lock it exclusively without waiting: ``(fd, "")`` when taken, ``holder``
    written in it for the next one's message; ``(None, what the holder wrote)`` when another process holds it. The
    OS drops the lock when the process ends (killed too): the file left behind means nothing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _lock_file(fd)
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, holder.encode())
    except BaseException:
        os.close(fd)
        raise
    if locked:
        return fd, ""
    held_by = _read_holder(fd)
    os.close(fd)
    return None, held_by


def drop_file_lock(fd: int | None) -> None:
    """Release a lock :func:`take_file_lock` took (nothing for ``None``), emptying its file and closing it."""
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
        _unlock_file(fd)
    except OSError:  # (closing the file drops the lock anyway)
        pass
    finally:
        os.close(fd)


def _lock_file(fd: int) -> bool:
    """Lock ``fd`` exclusively without waiting; ``False`` when another process holds the lock."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        import fcntl
    except ImportError:  # pragma: no cover - (WASI, Emscripten)
        logger.warning("No file locking on this platform: a second run on the same journal is not prevented")
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock_file(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _read_holder(fd: int) -> str:
    """What the lock's holder wrote about itself (best effort: empty when unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 300).decode("utf-8", "replace").strip()
    except OSError:  # (Windows: the locked byte cannot be read)
        return ""


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------- plans


class PlanCatalog:
    """``GET /plans/{code}``, once per code per run."""

    def __init__(self, client: LagoClient) -> None:
        self._client = client
        self._plans: dict[str, JSON | None] = {}
        self._features: bool | None = None
        self._lock = anyio.Lock()
        #: Lago's 403 on ``GET /features``: the API key may not read entitlements (see :meth:`uses_entitlements`).
        self.entitlements_refused: LagoAuthenticationError | None = None

    async def uses_entitlements(self) -> bool:
        """Whether Lago has any feature (``GET /features``, once per run): without one no subscription can have
        entitlement overrides, and the migration reads none (no extra call per subscription). ``False`` too when Lago
        answers 403 (an API key without read access to features): ``entitlements_refused`` then holds the error, and
        overrides are neither carried nor verified. A 401 (a wrong key) is raised."""
        if self._features is None:
            async with self._lock:
                if self._features is None:
                    try:  # (one page of one is all this needs)
                        self._features = bool((await self._client.list_features(per_page=1)).items)
                    except LagoNotFoundError:  # a Lago from before entitlements
                        self._features = False
                    except LagoAuthenticationError as exc:
                        if exc.status != 403:
                            raise
                        self.entitlements_refused = exc
                        self._features = False
        return self._features

    def known_uses_entitlements(self) -> bool | None:
        """What :meth:`uses_entitlements` answered, without asking Lago (``None``: not asked yet, or it failed)."""
        return self._features

    async def get(self, code: str) -> JSON | None:
        if code not in self._plans:
            async with self._lock:
                if code not in self._plans:
                    try:
                        self._plans[code] = await self._client.get_plan(code)
                    except LagoNotFoundError:
                        self._plans[code] = None
        return self._plans[code]

    async def yearly_amount(self, code: str, fallback: int = 0, *, amount_cents: Any = None) -> int:
        """The plan's amount a year; ``amount_cents``: the subscription's own (``plan_amount_cents``: a price override
        of the plan, Lago's ``plan_overrides``, shows there), else the plan's."""
        plan = await self.get(code)
        if plan is None:
            return fallback
        own = _int(amount_cents)
        amount = own if own is not None else int(plan.get("amount_cents") or 0)
        return amount * _PERIODS_PER_YEAR.get(str(plan.get("interval")), 12)

    async def own_price(self, subscription: JSON, *, look: bool = True) -> str | None:
        """What a subscription pays other than its plan (Lago's ``plan_overrides`` give it a plan of its own, with the
        plan's code): its amount or currency as listed, else (``look``: ``GET /subscriptions/{id}``, one call) the
        ``lago_id`` of the plan it embeds (charges overridden). ``None`` when it pays the plan's prices."""
        code = str(subscription.get("plan_code"))
        plan = await self.get(code)
        if plan is None:
            return None
        amount = _int(subscription.get("plan_amount_cents"))
        if amount is not None and amount != _int(plan.get("amount_cents")):
            return f"amount_cents {amount} where plan {code!r} has {plan.get('amount_cents')}"
        currency = subscription.get("plan_amount_currency")
        if currency and plan.get("amount_currency") and currency != plan.get("amount_currency"):
            return f"amount_currency {currency} where plan {code!r} has {plan.get('amount_currency')}"
        if not look or not plan.get("lago_id"):
            return None
        status = subscription.get("status")
        external_id = str(subscription.get("external_id"))
        full = await _or_none(
            self._client.get_subscription(external_id, status=None if status in (None, "active") else str(status))
        )
        if full is not None and isinstance(full.get("entitlements"), list) and "entitlements" not in subscription:
            # (GET /subscriptions/{id} embeds them: _entitlements_of then needs no GET /subscriptions/{id}/entitlements)
            subscription["entitlements"] = full["entitlements"]
        own = full.get("plan") if full is not None else None
        if isinstance(own, Mapping) and own.get("lago_id") and own.get("lago_id") != plan.get("lago_id"):
            return f"a plan of its own (lago_id {own.get('lago_id')}, not plan {code!r}'s: its charges overridden)"
        return None

    async def check(self, orgs: Sequence[OrgMapping], options: MigrationOptions) -> list[str]:
        """Problems for plan codes (``plan_code`` column, ``--default-plan``) that Lago does not have."""
        wanted: dict[str, list[str]] = {}
        for org in orgs:
            if org.plan_code is not None:
                wanted.setdefault(org.plan_code, []).append(org.org_id)
        problems = []
        for code, org_ids in wanted.items():
            if await self.get(code) is None:
                shown = ", ".join(map(repr, org_ids[:5])) + (
                    f" and {len(org_ids) - 5} more" if len(org_ids) > 5 else ""
                )
                problems.append(f"plan_code {code!r} (org {shown}) is not a plan in Lago")
        if options.default_plan is not None and await self.get(options.default_plan) is None:
            problems.append(f"--default-plan {options.default_plan!r} is not a plan in Lago")
        return problems


# -------------------------------------------------------------------------------------- per-org work


@dataclasses.dataclass
class Step:
    """One write the migration makes (or would make) for an org."""

    kind: Literal[
        "upsert_customer",
        "create_subscription",
        "set_entitlements",
        "remove_entitlements",
        "terminate_subscription",
        "cancel_subscription",
        "mark_user",
    ]
    target: str
    description: str
    payload: JSON = dataclasses.field(default_factory=dict)
    outcome: str = "planned"
    detail: JSON = dataclasses.field(default_factory=dict)

    def to_json(self) -> JSON:
        data: JSON = {"step": self.kind, "target": self.target, "description": self.description}
        data["outcome"] = self.outcome
        if self.detail:
            data["detail"] = self.detail
        return data


@dataclasses.dataclass
class OrgResult:
    """What happened to one org: ``status`` is ``planned``/``up-to-date`` (dry run), ``migrated``/``prepared``
    (the first phase: ``prepare_only``)/``up-to-date``/``journal`` (execute), ``verified``/``unverified`` (verify),
    ``failed`` or ``not-run``. ``phase``: what the run does, or found, for it: ``prepare`` (the first phase: the org
    subscribed, its users' subscriptions left running), ``finish`` (the second: the org subscribed already, its users'
    ended and marked), ``both`` (both at once: the org subscribed and its users' ended in one run), ``prepared``
    (verify: the first phase done, the second pending)."""

    org_id: str
    status: str = "not-run"
    plan_code: str | None = None
    plan_source: str | None = None
    billing_time: str | None = None
    users: tuple[str, ...] = ()
    steps: list[Step] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    calls: CallStats = dataclasses.field(default_factory=CallStats)
    customer: JSON | None = None
    subscription: JSON | None = None
    #: The entitlement overrides the org subscription takes (or, verified, should have), and whose they are; the
    #: plan's features and privileges it goes without (``feature`` or ``feature.privilege`` in the report).
    entitlement_overrides: Overrides | None = None
    entitlements_from: str | None = None
    entitlements_removed: list[Removal] = dataclasses.field(default_factory=list)
    phase: str | None = None
    #: What the users' customers hold besides subscriptions that the migration leaves on them (see :class:`Unmoved`).
    unmoved: list[Unmoved] = dataclasses.field(default_factory=list)
    #: The user and subscription id the plan policy picks, whose entitlement overrides the org takes (the donor).
    donor: tuple[str, str] | None = dataclasses.field(default=None, repr=False)
    exception: LagoIntegrationError | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> JSON:
        data = self._to_json()
        if self.unmoved:  # (only then: the report of an account without any is as it was)
            data["unmoved"] = [item.to_json() for item in self.unmoved]
        return data

    def _to_json(self) -> JSON:
        overrides: JSON | None = None
        if self.entitlement_overrides is not None:
            overrides = {"from": self.entitlements_from, "values": self.entitlement_overrides}
            if self.entitlements_removed:
                overrides["removed"] = [_removal_name(removal) for removal in self.entitlements_removed]
        return {
            "org_id": self.org_id,
            "status": self.status,
            "phase": self.phase,
            "users": list(self.users),
            "plan_code": self.plan_code,
            "plan_source": self.plan_source,
            "billing_time": self.billing_time,
            "entitlement_overrides": overrides,
            "steps": [step.to_json() for step in self.steps],
            "warnings": self.warnings,
            "errors": self.errors,
            "calls": self.calls.calls,
            "writes": self.calls.writes,
        }


async def _or_none(call: Any) -> JSON | None:
    try:
        result: JSON = await call
    except LagoNotFoundError:
        return None
    return result


def _user_list(users: Iterable[str], limit: int = 100) -> str:
    """Comma-separated user ids within ``limit`` characters; the rest counted as ``+N``."""
    users = list(dict.fromkeys(users))
    for shown in range(len(users), 0, -1):
        text = ",".join(users[:shown]) + (f",+{len(users) - shown}" if shown < len(users) else "")
        if len(text) <= limit:
            return text
    return f"+{len(users)}"


def _started(subscription: JSON) -> str:
    return str(subscription.get("started_at") or subscription.get("subscription_at") or "")


def _trial_days(plan: JSON | None) -> float:
    """The days of free trial a plan gives each new subscription (Lago's ``trial_period``, a number of days), 0 for
    none or unknown."""
    try:
        days = float((plan or {}).get("trial_period") or 0)
    except (TypeError, ValueError):
        return 0.0
    return days if math.isfinite(days) and days > 0 else 0.0


async def _amounts_comparable(
    org: OrgMapping, policy: str, candidates: list[tuple[str, JSON]], plans: PlanCatalog
) -> None:
    """Raise unless the plan ``policy`` picks for ``org`` among its users' subscriptions can be told by their amounts:
    ``highest`` and ``lowest`` compare amounts in the currency's subunits, meaningless across currencies (6,000 JPY
    is more than 50.00 USD there), and an org customer has one currency."""
    if policy not in ("highest", "lowest") or len(candidates) < 2:
        return
    found: dict[str, list[str]] = {}
    for user_id, subscription in candidates:
        code = str(subscription.get("plan_code"))
        found.setdefault(await _currency_of(subscription, plans) or "?", []).append(f"{user_id}'s {code!r}")
    if len(found) > 1:
        paid = "; ".join(f"{currency}: {', '.join(who)}" for currency, who in sorted(found.items()))
        raise InvalidRequestError(
            f"org {org.org_id!r}'s users pay in different currencies ({paid}): --plan-policy {policy} cannot compare "
            "their amounts (no exchange rates), and an org customer has one currency. Nothing was done for this org: "
            "name its plan in the mapping's plan_code column, or run with --plan-policy oldest or newest"
        )


async def _yearly_paid(subscription: JSON, plans: PlanCatalog) -> int:
    """What ``subscription`` pays a year (a price override of its plan shows in ``plan_amount_cents``)."""
    own = subscription.get("plan_amount_cents")
    return await plans.yearly_amount(str(subscription.get("plan_code")), _int(own) or 0, amount_cents=own)


async def _currency_of(subscription: JSON, plans: PlanCatalog) -> str | None:
    """The currency ``subscription`` is billed in: its own (``plan_amount_currency``), else its plan's."""
    plan = await plans.get(str(subscription.get("plan_code")))
    currency = subscription.get("plan_amount_currency") or (plan or {}).get("amount_currency")
    return str(currency) if currency else None


def _named(customer: JSON) -> str:
    """`` (its name)`` of a Lago customer, to follow its id in a message; nothing when it has none."""
    return f" ({customer.get('name')})" if customer.get("name") else ""


async def _pick(policy: str, active: list[tuple[str, JSON]], plans: PlanCatalog) -> tuple[str, JSON]:
    keyed = []
    for user_id, subscription in active:
        own = subscription.get("plan_amount_cents")  # (what it pays: a price override of its plan shows there)
        yearly = await plans.yearly_amount(str(subscription["plan_code"]), _int(own) or 0, amount_cents=own)
        keyed.append((yearly, _started(subscription), str(subscription["plan_code"]), user_id, subscription))
    if policy == "highest":
        best = min(keyed, key=lambda k: (-k[0], k[1], k[2]))
    elif policy == "lowest":
        best = min(keyed, key=lambda k: (k[0], k[1], k[2]))
    elif policy == "oldest":
        best = min(keyed, key=lambda k: (k[1], -k[0], k[2]))
    else:
        best = max(keyed, key=lambda k: (k[1], k[0], k[2]))
    return best[3], best[4]


# ------------------------------------------------------------------------------------ entitlement overrides


def _override_values(entitlements: Iterable[Any]) -> Overrides:
    """The per-subscription override values of Lago's subscription entitlements (``overrides``, else each
    privilege's ``override_value``): never the plan's values."""
    result: Overrides = {}
    for feature in entitlements:
        if not isinstance(feature, Mapping) or not feature.get("code"):
            continue
        values: dict[str, Any] = {}
        overrides = feature.get("overrides")
        if isinstance(overrides, Mapping):
            values.update({str(code): value for code, value in overrides.items() if value is not None})
        for privilege in privileges_of(feature):
            if privilege.get("code") and privilege.get("override_value") is not None:
                values.setdefault(str(privilege["code"]), privilege["override_value"])
        if values:
            result[str(feature["code"])] = values
    return result


def _privilege_codes(feature: Mapping[str, Any]) -> set[str]:
    return {str(privilege["code"]) for privilege in privileges_of(feature) if privilege.get("code")}


def _plan_features(plan: JSON | None) -> dict[str, set[str]] | None:
    """``{feature_code: {privilege_code, ...}}`` of a plan's entitlements (``GET /plans/{code}`` lists them); ``None``
    when not known (no such plan, a Lago whose plans do not list entitlements)."""
    entitlements = plan.get("entitlements") if plan is not None else None
    if not isinstance(entitlements, list):
        return None
    return {
        str(feature["code"]): _privilege_codes(feature)
        for feature in entitlements
        if isinstance(feature, Mapping) and feature.get("code")
    }


@dataclasses.dataclass
class SubscriptionEntitlements:
    """What a subscription has of its own beyond its plan's entitlements: ``overrides`` (values, and ``{feature: {}}``
    for a feature given to the subscription only) and ``removed`` (plan features, or privileges of one, it lacks)."""

    overrides: Overrides = dataclasses.field(default_factory=dict)
    removed: list[Removal] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.overrides or self.removed)

    def has_removed(self, removal: Removal) -> bool:
        """Whether the subscription lacks this feature or privilege (a privilege also when its feature is removed)."""
        return removal in self.removed or (removal[1] is not None and (removal[0], None) in self.removed)

    def owns(self, removal: Removal) -> bool:
        """Whether the subscription has override values of its own on this feature or privilege."""
        feature, privilege = removal
        values = self.overrides.get(feature)
        return values is not None and (privilege is None or privilege in values)


def _subscription_entitlements(
    entitlements: Iterable[Any], plan: dict[str, set[str]] | None
) -> SubscriptionEntitlements:
    """Lago's entitlements of a subscription against those of its plan (``None``: not known, only the values are
    read). A feature the plan lacks is the subscription's own even without values (``PATCH {"sso": {}}``); a plan
    feature or privilege it does not list was removed for it (``DELETE .../entitlements/{feature_code}``)."""
    listed = [feature for feature in entitlements if isinstance(feature, Mapping) and feature.get("code")]
    result = SubscriptionEntitlements(_override_values(listed))
    if plan is None:
        return result
    present = {str(feature["code"]): _privilege_codes(feature) for feature in listed}
    for code in present:
        if code not in plan:
            result.overrides.setdefault(code, {})
    for code, privileges in sorted(plan.items()):
        if code not in present:
            result.removed.append((code, None))
        else:
            result.removed.extend((code, privilege) for privilege in sorted(privileges - present[code]))
    return result


async def _entitlements_of(client: LagoClient, subscription: JSON, plans: PlanCatalog) -> SubscriptionEntitlements:
    """The entitlements of a Lago subscription object of its own: those it embeds, else ``GET
    /subscriptions/{id}/entitlements`` for its status (a subscription listed by ``GET /subscriptions``), against its
    plan's (``GET /plans/{code}``, once per run)."""
    entitlements = subscription.get("entitlements")
    if not isinstance(entitlements, list):
        external_id = str(subscription.get("external_id"))
        status = subscription.get("status")
        try:
            entitlements = await client.get_subscription_entitlements(
                external_id, status=None if status in (None, "active") else str(status)
            )
        except LagoNotFoundError:  # (a Lago without entitlements; nothing known: not "every plan feature removed")
            return SubscriptionEntitlements()
    plan_code = subscription.get("plan_code")
    plan = await plans.get(str(plan_code)) if isinstance(plan_code, str) and plan_code else None
    return _subscription_entitlements(entitlements, _plan_features(plan))


def _status_query(status: str | None) -> str:
    """Lago addresses a subscription that is not active (one starting later) with ``subscription_status``."""
    return f"?subscription_status={status}" if status not in (None, "active") else ""


def _entitlements_path(sub_id: str, status: str | None, removal: Removal | None = None) -> str:
    """``/subscriptions/{id}/entitlements[/{feature}[/privileges/{privilege}]][?subscription_status=...]``."""
    path = f"/subscriptions/{sub_id}/entitlements"
    if removal is not None:
        path += f"/{removal[0]}" + (f"/privileges/{removal[1]}" if removal[1] is not None else "")
    return path + _status_query(status)


async def _set_overrides(client: LagoClient, external_id: str, overrides: Overrides, status: str) -> None:
    """``PATCH /subscriptions/{id}/entitlements`` (partial: other overrides are left as they are)."""
    await client.update_subscription_entitlements(external_id, overrides, status=None if status == "active" else status)


async def _remove_entitlement(client: LagoClient, external_id: str, removal: Removal, status: str) -> None:
    """The plan's feature (or privilege) removed for this subscription only."""
    feature, privilege = removal
    await client.remove_subscription_entitlement(
        external_id, feature, privilege, status=None if status == "active" else status
    )


def format_overrides(overrides: Overrides) -> str:
    """``feature.privilege=value, ...`` (values as JSON); ``feature={}`` for a feature given without values."""
    parts: list[str] = []
    for feature, values in sorted(overrides.items()):
        if not values:
            parts.append(f"{feature}={{}}")
        parts.extend(f"{feature}.{privilege}={json.dumps(value)}" for privilege, value in sorted(values.items()))
    return ", ".join(parts)


def _removal_name(removal: Removal) -> str:
    return removal[0] if removal[1] is None else f"{removal[0]}.{removal[1]}"


def format_entitlements(overrides: Overrides, removed: Sequence[Removal] = ()) -> str:
    """:func:`format_overrides`, then ``removed: feature, feature.privilege`` (what the plan has and it lacks)."""
    parts = [text for text in (format_overrides(overrides),) if text]
    if removed:
        parts.append("removed: " + ", ".join(_removal_name(removal) for removal in removed))
    return "; ".join(parts)


def _compare(wanted: Overrides, current: Overrides) -> tuple[Overrides, Overrides]:
    """``(missing, other)``: the entries of ``wanted`` that ``current`` lacks, and those it has another value for (a
    feature of ``wanted`` without values is missing when ``current`` does not have that feature)."""
    missing: Overrides = {}
    other: Overrides = {}
    for feature, values in wanted.items():
        if not values and feature not in current:
            missing[feature] = {}
        for privilege, value in values.items():
            have = current.get(feature, {}).get(privilege)
            if have is None:
                missing.setdefault(feature, {})[privilege] = value
            elif have != value:
                other.setdefault(feature, {})[privilege] = value
    return missing, other


def _removals_to_make(
    wanted: SubscriptionEntitlements, current: SubscriptionEntitlements
) -> tuple[list[Removal], list[Removal]]:
    """``(to_remove, kept)``: the removals of ``wanted`` that ``current`` lacks, but for those where ``current`` has
    values of its own (``kept``: never overwritten)."""
    to_remove: list[Removal] = []
    kept: list[Removal] = []
    for removal in wanted.removed:
        if not current.has_removed(removal):
            (kept if current.owns(removal) else to_remove).append(removal)
    return to_remove, kept


async def _plan_overrides(
    client: LagoClient,
    org: OrgMapping,
    sub_id: str,
    candidates: Sequence[tuple[str, JSON]],
    donor: tuple[str, JSON],
    org_subscription: JSON | None,
    org_status: str,
    plans: PlanCatalog,
    result: OrgResult,
    org_subscription_made: bool = False,
    given_policy: str | None = None,
) -> list[Step]:
    """The steps that give the org subscription (of status ``org_status``, made or to be made) the donor's
    entitlements of its own (none when it has them or they are not carried), and the warnings on those left behind
    (see the module's docstring). Plan features the donor went without are removed only from an org subscription
    this migration makes or made (``org_subscription`` is ``None``, or ``org_subscription_made``): one the org had
    before keeps them for all its users (a warning names them). ``given_policy`` (the plan policy that picked
    ``donor`` for an org subscription an earlier run made, the journal naming no donor): when the org subscription
    lacks the donor's entitlements of its own but has all of another candidate's, that one is the donor an earlier
    run gave it (see :func:`_donor_given`)."""
    read = [
        (user_id, subscription, await _entitlements_of(client, subscription, plans))
        for user_id, subscription in candidates
    ]
    current: SubscriptionEntitlements | None = None
    if given_policy is not None and org_subscription is not None:
        current = await _entitlements_of(client, org_subscription, plans)
        given = await _donor_given(donor, read, current, result.plan_code, given_policy, plans)
        if given is not None:
            result.warnings.append(
                f"org {org.org_id!r}: its subscription {sub_id!r} has the entitlement overrides of {given[0]}'s "
                f"subscription {given[1].get('external_id')} (an earlier run took them: the first phase, or a run "
                f"stopped), not those of {donor[0]}'s subscription {donor[1].get('external_id')} that --plan-policy "
                f"{given_policy} picks: kept as they are (give the second phase the --plan-policy, or the --journal, "
                "of the first)"
            )
            donor = given
            result.donor = (given[0], str(given[1].get("external_id")))
    donor_user, donor_sub = donor
    donor_id = str(donor_sub.get("external_id"))
    origin = f"{donor_user}'s subscription {donor_id}"
    wanted = SubscriptionEntitlements()
    others: list[tuple[str, SubscriptionEntitlements]] = []
    for user_id, subscription, entitlements in read:
        if user_id == donor_user and subscription.get("external_id") == donor_id:
            wanted = entitlements
        else:
            others.append((f"{user_id}'s {subscription.get('external_id')}", entitlements))
    differing = []
    for name, entitlements in others:
        missing, other = _compare(entitlements.overrides, wanted.overrides)
        for feature, values in other.items():
            missing.setdefault(feature, {}).update(values)
        removed = [removal for removal in entitlements.removed if not wanted.has_removed(removal)]
        if missing or removed:
            differing.append(f"{name} ({format_entitlements(missing, removed)})")
    if differing:
        taken = format_entitlements(wanted.overrides, wanted.removed) or "none"
        result.warnings.append(
            f"org {org.org_id!r}: its users' subscriptions have different entitlement overrides; the org subscription "
            f"takes only those of {origin}, whose plan the plan policy picks ({taken}), not those of "
            + "; ".join(differing)
        )
    if not wanted:
        return []
    if result.plan_code != donor_sub.get("plan_code"):
        where = f"is on plan {result.plan_code!r}" if result.plan_code else "is not made (no plan)"
        how = f"set them with PATCH {_entitlements_path(sub_id, org_status)}"
        if wanted.removed:
            removal = _entitlements_path(sub_id, org_status, ("{feature_code}", None))
            how += f" (and DELETE {removal} for a feature its plan has and it went without)"
        result.warnings.append(
            f"org {org.org_id!r}: the entitlement overrides of {origin} "
            f"({format_entitlements(wanted.overrides, wanted.removed)}) are not carried: the org subscription {where}, "
            f"not on its plan {donor_sub.get('plan_code')!r}; if they still apply, {how}"
        )
        return []
    if current is None:
        current = SubscriptionEntitlements()  # (a subscription made now has its plan's)
        if org_subscription is not None:
            current = await _entitlements_of(client, org_subscription, plans)
    missing, other = _compare(wanted.overrides, current.overrides)
    to_remove, kept_removals = _removals_to_make(wanted, current)
    left = [] if org_subscription is None or org_subscription_made else to_remove
    if left:  # (the org's other users have them: one user's restriction is not the org's)
        calls = ", ".join(f"DELETE {_entitlements_path(sub_id, org_status, removal)}" for removal in left)
        result.warnings.append(
            f"org subscription {sub_id!r} existed before this migration: it keeps "
            f"{', '.join(map(_removal_name, left))} of its plan's entitlements, which {origin} had removed (not "
            f"taken from the whole org for one user); if the org should go without them: {calls}"
        )
        to_remove = []
    result.entitlement_overrides, result.entitlements_from = wanted.overrides, origin
    result.entitlements_removed = [removal for removal in wanted.removed if removal not in left]
    if other or kept_removals:
        kept = {feature: {p: current.overrides[feature][p] for p in values} for feature, values in other.items()}
        for feature, privilege in kept_removals:
            own = current.overrides[feature]
            kept.setdefault(feature, {}).update(own if privilege is None else {privilege: own[privilege]})
        theirs = format_entitlements(other, kept_removals)
        result.warnings.append(
            f"org subscription {sub_id!r} keeps its own entitlement overrides {format_overrides(kept)} ({origin} has "
            f"{theirs})"
        )
    steps = []
    if missing:
        steps.append(
            Step(
                "set_entitlements",
                sub_id,
                f"set entitlement overrides of org subscription {sub_id} to those of {origin}: "
                f"{format_overrides(missing)}",
                {"entitlements": missing},
            )
        )
    if to_remove:
        steps.append(
            Step(
                "remove_entitlements",
                sub_id,
                f"remove from org subscription {sub_id} what {origin} had removed of its plan's entitlements: "
                + ", ".join(_removal_name(removal) for removal in to_remove),
                {"removals": [list(removal) for removal in to_remove]},
            )
        )
    return steps


def _has_all(entitlements: SubscriptionEntitlements, current: SubscriptionEntitlements) -> bool:
    """Whether a subscription (``current``) has every entitlement of its own of another (values, features given,
    plan features or privileges removed)."""
    missing, other = _compare(entitlements.overrides, current.overrides)
    to_remove, kept = _removals_to_make(entitlements, current)
    return not (missing or other or to_remove or kept)


async def _donor_given(
    donor: tuple[str, JSON],
    read: Sequence[tuple[str, JSON, SubscriptionEntitlements]],
    current: SubscriptionEntitlements,
    plan_code: str | None,
    policy: str,
    plans: PlanCatalog,
) -> tuple[str, JSON] | None:
    """The candidate whose entitlements of its own the org subscription (``current``, on ``plan_code``) was given by
    an earlier run, when that is not ``donor`` (the one the plan policy picks now: a second phase, or a run resumed,
    with another ``--plan-policy`` than the first and without its journal): a candidate on the org subscription's
    plan with entitlements of its own, all of which the org subscription has, while it lacks some of the donor's
    (or the donor is on another plan). A subscription made by the migration has only its plan's, so it matches no
    one until its donor's are set. ``None`` when the donor's are there, or no other candidate's are."""
    by_id = {id(subscription): entitlements for _, subscription, entitlements in read}
    wanted = by_id.get(id(donor[1]))
    if donor[1].get("plan_code") == plan_code and (wanted is None or _has_all(wanted, current)):
        return None
    given = [
        (user_id, subscription)
        for user_id, subscription, entitlements in read
        if subscription is not donor[1]
        and subscription.get("plan_code") == plan_code
        and entitlements
        and _has_all(entitlements, current)
    ]
    return await _pick(policy, given, plans) if given else None


#: Lago customer fields a user customer's org inherits when it has none (its invoices' billing identity).
_CARRIED_FIELDS = (
    "email",
    "currency",
    "timezone",
    "country",
    "address_line1",
    "address_line2",
    "city",
    "state",
    "zipcode",
    "phone",
    "legal_name",
    "legal_number",
    "tax_identification_number",
    "net_payment_term",
)


# ------------------------------------------------------------- what user customers hold besides subscriptions


class UnmovedHoldingsError(InvalidRequestError):
    """An org was not migrated: its users' customers hold what the migration does not move (wallets, coupons, a
    payment provider link or integrations the org customer lacks), which ending their subscriptions would leave on
    customers nobody bills. ``unmoved`` lists them; move them in Lago, or accept them
    (``MigrationOptions.accept_unmoved``), and run again."""

    def __init__(self, message: str, unmoved: Sequence[Unmoved]) -> None:
        super().__init__(message)
        self.unmoved = list(unmoved)


@dataclasses.dataclass(frozen=True)
class Unmoved:
    """One thing a user customer holds that the migration leaves on it: ``kind`` (one of :data:`UNMOVED_KINDS`, or
    ``unpaid_invoices``/``credit_notes``), ``what`` (with amounts), ``todo`` (how to move it in Lago), and its
    amount in the currency's subunits (``amount_cents``, ``currency``) when it has one."""

    kind: str
    user_id: str
    what: str
    todo: str
    amount_cents: int | None = None
    currency: str | None = None
    lago_id: str | None = None

    def to_json(self) -> JSON:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _amount(cents: Any, currency: Any) -> str:
    """``cents`` (Lago's ``*_cents``: the currency's subunits) in the currency's units: ``25.00 USD``."""
    subunits = subunits_per_unit(currency)
    value = Decimal(_int(cents) or 0) / subunits
    return f"{value:,.{_DECIMALS[subunits]}f} {currency or ''}".strip()  # (5 subunits, MRU's khoums: 1 decimal)


def _totals(items: Iterable[tuple[int, str]]) -> str:
    """Amounts summed per currency: ``120.00 USD + 30.00 EUR``."""
    sums: dict[str, int] = {}
    for cents, currency in items:
        sums[currency] = sums.get(currency, 0) + cents
    return " + ".join(_amount(cents, currency) for currency, cents in sums.items())


async def _listed(items: AsyncIterator[JSON]) -> list[JSON]:
    """Every item of a Lago list (``client.iter_wallets(...)``...); none when Lago does not know the customer
    (deleted since it was read)."""
    try:
        return [item async for item in items]
    except LagoNotFoundError:
        return []


def _payment_link(customer: JSON | None) -> str | None:
    """The customer's payment provider link (``billing_configuration.payment_provider``...), as said in a report."""
    config = (customer or {}).get("billing_configuration") or {}
    provider = config.get("payment_provider") if isinstance(config, Mapping) else None
    if not provider:
        return None
    parts = [str(provider)]
    for field in ("payment_provider_code", "provider_customer_id"):
        if config.get(field):
            parts.append(f"{field} {config[field]}")
    return ", ".join(parts)


def _integrations(customer: JSON | None) -> dict[str, JSON]:
    """The customer's integration customers (accounting, tax, CRM syncs) by type."""
    items = (customer or {}).get("integration_customers") or []
    return {str(i.get("type")): dict(i) for i in items if isinstance(i, Mapping) and i.get("type")}


async def _holdings(
    client: LagoClient, org_id: str, user_id: str, customer: JSON, org_customer: JSON | None, accepted: Collection[str]
) -> tuple[list[Unmoved], list[str]]:
    """What user ``user_id``'s ``customer`` holds that the migration does not move to org ``org_id``: active wallets
    with a balance or recurring top-ups, active applied coupons, a payment provider link and integration customers
    the org customer lacks (:data:`UNMOVED_KINDS`), unpaid invoices and credit notes with credit left (reported only).
    Four reads (wallets, applied coupons, invoices, credit notes). Returns them, and warnings: a list Lago does not
    let the API key read (403) is a warning when its kind is ``accepted`` (or only reported), else an error."""
    found: list[Unmoved] = []
    warnings: list[str] = []

    async def read(kind: str, path: str, items: AsyncIterator[JSON]) -> list[JSON]:
        try:
            return await _listed(items)
        except LagoAuthenticationError as exc:
            if exc.status != 403:  # (a 401: the key itself refused, which stops the run as anywhere else)
                raise
            what = (
                f"Lago refused GET {path} (403{f' {exc.code}' if exc.code else ''}): this API key may not read "
                f"them, so whether user {user_id!r} holds {kind.replace('_', ' ')} could not be checked"
            )
            if kind in accepted or kind in _REPORTED_KINDS:
                warnings.append(f"org {org_id!r}: {what}")
                return []
            raise InvalidRequestError(
                f"{what}. Nothing was done for org {org_id!r}: give the API key read access to them (its permissions "
                f"in Lago's API key settings) and run again, or accept leaving them on the users' customers "
                f"(--accept-unmoved {kind}; accept_unmoved={{{kind!r}}} from Python)"
            ) from exc

    for wallet in await read("wallets", "/wallets", client.iter_wallets(external_customer_id=user_id)):
        if wallet.get("status") != "active":
            continue
        balance, currency = _int(wallet.get("balance_cents")) or 0, str(wallet.get("currency") or "")
        rules = [
            r
            for r in wallet.get("recurring_transaction_rules") or []
            if isinstance(r, Mapping) and r.get("status", "active") == "active"
        ]
        if balance <= 0 and not rules:
            continue
        name = wallet.get("code") or wallet.get("name") or wallet.get("lago_id")
        what = (
            f"wallet {name} ({wallet.get('lago_id')}): {wallet.get('credits_balance')} credits, "
            f"{_amount(balance, currency)}"
        )
        for rule in rules:
            when = (
                rule.get("interval") if rule.get("trigger") == "interval" else f"below {rule.get('threshold_credits')}"
            )
            what += (
                f", recurring top-up ({rule.get('trigger')} {when}: {rule.get('paid_credits')} paid and "
                f"{rule.get('granted_credits')} granted credits) that goes on invoicing {user_id}"
            )
        todo = (
            f"give org customer {org_id} a wallet with these credits (POST /wallets {{external_customer_id: {org_id}, "
            f"currency: {currency}, rate_amount: {wallet.get('rate_amount')}, granted_credits: "
            f"{wallet.get('credits_balance')}}}, or in Lago's UI), then terminate {user_id}'s (DELETE /wallets/"
            f"{wallet.get('lago_id')}), which also stops its recurring top-ups"
        )
        found.append(Unmoved("wallets", user_id, what, todo, balance, currency, wallet.get("lago_id")))
    coupons = client.iter_applied_coupons(external_customer_id=user_id, status="active")
    for coupon in await read("coupons", "/applied_coupons", coupons):
        if coupon.get("status") != "active":
            continue
        code, coupon_currency = coupon.get("coupon_code"), coupon.get("amount_currency")
        remaining = _int(coupon.get("amount_cents_remaining"))
        amount = remaining if remaining is not None else _int(coupon.get("amount_cents"))
        if amount is not None:
            value = _amount(amount, coupon_currency) + (" left" if remaining is not None else "")
        else:
            value = f"{coupon.get('percentage_rate')}% off"
        frequency = str(coupon.get("frequency") or "")
        if frequency == "recurring":
            frequency += f", {coupon.get('frequency_duration_remaining')} billing period(s) left"
        what = f"coupon {code} ({coupon.get('lago_id')}): {value}, {frequency}"
        todo = (
            f"apply coupon {code} to org customer {org_id} with what is left of it (POST /applied_coupons "
            f"{{external_customer_id: {org_id}, coupon_code: {code}, amount_cents / percentage_rate, frequency_duration"
            f"}}), then remove {user_id}'s (DELETE /customers/{user_id}/applied_coupons/{coupon.get('lago_id')})"
        )
        found.append(
            Unmoved(
                "coupons",
                user_id,
                what,
                todo,
                amount,
                str(coupon_currency) if amount is not None else None,
                coupon.get("lago_id"),
            )
        )
    link = _payment_link(customer)
    if link is not None and _payment_link(org_customer) is None:
        what = f"payment provider link ({link}): org customer {org_id} has none, so its invoices would not be collected"
        todo = (
            f"give org customer {org_id} a payment provider of its own (Lago's UI: the customer's settings; or POST "
            f"/customers {{external_id: {org_id}, billing_configuration: {{payment_provider, payment_provider_code, "
            "provider_customer_id}}); for an org customer this run would create, run migrate --execute --prepare "
            "first (it creates the org customer and subscription and leaves the users' running), set it, then run "
            "--execute again"
        )
        found.append(Unmoved("payment_provider", user_id, what, todo))
    lacking = {kind: item for kind, item in _integrations(customer).items() if kind not in _integrations(org_customer)}
    for kind, item in lacking.items():
        what = (
            f"{kind} integration customer ({item.get('integration_code')}, external id "
            f"{item.get('external_customer_id')}): org customer {org_id} has none, so its invoices are not synced to "
            f"{kind}"
        )
        todo = (
            f"give org customer {org_id} its {kind} integration (POST /customers {{external_id: {org_id}, "
            f"integration_customers: [{{integration_type: {kind}, integration_code: {item.get('integration_code')}, "
            "external_customer_id or sync_with_provider: true}]})"
        )
        found.append(Unmoved("integrations", user_id, what, todo, lago_id=item.get("lago_id")))
    invoices = client.iter_invoices(
        external_customer_id=user_id, statuses=["finalized"], payment_statuses=["pending", "failed"]
    )
    unpaid = await read("unpaid_invoices", "/invoices", invoices)
    due = [
        (_int(i.get("total_due_amount_cents", i.get("total_amount_cents"))) or 0, str(i.get("currency") or ""))
        for i in unpaid
    ]
    if any(cents > 0 for cents, _ in due):
        numbers = ", ".join(str(i.get("number")) for i in unpaid[:5]) + (", ..." if len(unpaid) > 5 else "")
        failed = sum(1 for i in unpaid if i.get("payment_status") == "failed")
        what = (
            f"{len(unpaid)} unpaid invoice(s) ({numbers}; {failed} with a failed payment): {_totals(due)} due; they "
            f"stay {user_id}'s, collected through its payment method"
        )
        todo = (
            f"collect them from {user_id} as before (retry their payment in Lago: POST /invoices/{{id}}/retry_payment)"
        )
        only = due[0][1] if len({c for _, c in due}) == 1 else None
        found.append(Unmoved("unpaid_invoices", user_id, what, todo, sum(c for c, _ in due) if only else None, only))
    available = client.iter_credit_notes(external_customer_id=user_id, credit_status="available")
    notes = await read("credit_notes", "/credit_notes", available)
    credit_left = [(_int(n.get("balance_amount_cents")) or 0, str(n.get("currency") or "")) for n in notes]
    if any(cents > 0 for cents, _ in credit_left):
        numbers = ", ".join(str(n.get("number")) for n in notes[:5]) + (", ..." if len(notes) > 5 else "")
        what = (
            f"{len(notes)} credit note(s) with credit left ({numbers}): {_totals(credit_left)}, which only {user_id}'s "
            "invoices can use (its last ones, when its subscriptions end)"
        )
        todo = (
            f"refund what is left to {user_id}, or void it (PUT /credit_notes/{{id}}/void) and credit org customer "
            f"{org_id} as much (a coupon or wallet credits)"
        )
        only = credit_left[0][1] if len({c for _, c in credit_left}) == 1 else None
        total = sum(c for c, _ in credit_left) if only else None
        found.append(Unmoved("credit_notes", user_id, what, todo, total, only))
    return found, warnings


def _unmoved_lines(unmoved: Sequence[Unmoved], *, todo: bool) -> str:
    return "; ".join(f"{u.user_id}: {u.what}" + (f" (to move it: {u.todo})" if todo else "") for u in unmoved)


def _unmoved_refused(org: OrgMapping, blocking: Sequence[Unmoved]) -> str:
    """Why ``org`` is not migrated and what to do (see :class:`UnmovedHoldingsError`)."""
    kinds = sorted({u.kind for u in blocking}, key=UNMOVED_KINDS.index)
    return (
        f"its users' customers hold what the migration does not move, which ending their subscriptions would leave "
        "on customers nobody bills (the org would pay full price, without them): "
        f"{_unmoved_lines(blocking, todo=True)}. "
        f"Nothing was done for org {org.org_id!r}, its users stay billed as before. Move them in Lago (the migration "
        f"never moves money) and run again, or, to migrate and leave them where they are, run again with "
        f"--accept-unmoved {','.join(kinds)} (accept_unmoved={','.join(kinds)!r} from Python)"
    )


async def plan_org(
    client: LagoClient,
    org: OrgMapping,
    options: MigrationOptions,
    plans: PlanCatalog,
    result: OrgResult,
    *,
    org_subscription_made: bool = False,
    donor_hint: tuple[str, str] | None = None,
) -> None:
    """Read the org's and its users' Lago state and fill ``result.steps`` with the writes still needed.
    ``org_subscription_made``: an org subscription found was made by this migration (its journal says so: a run
    resumed), not one the org had before. ``donor_hint``: the user and subscription id a first phase took the
    entitlement overrides from (its journal says so), kept as the donor while it can be found."""
    settings = client.settings
    sub_id = settings.subscription_id_for(org.org_id)
    org_customer = await _or_none(client.get_customer(org.org_id))
    moved = customer_metadata(org_customer).get(METADATA_MIGRATED_TO)
    if moved:  # (a mapping typo: made an org customer, that user's customer would be subscribed and billed again)
        raise InvalidRequestError(
            f"org_id {org.org_id!r} is the Lago customer of a user migrated to org {moved!r} (its metadata "
            f"{METADATA_MIGRATED_TO}={moved}), not an org's: nothing was done for this org. Check the org_id of its "
            "rows in the mapping (Lago keys customers by external_id only: an org cannot share a user's id)"
        )
    # (one that starts later counts: made from a user's pending one by an earlier run)
    org_subscription = await client.get_current_subscription(sub_id)
    marked = customer_metadata(org_customer).get(METADATA_BILLING_TYPE) == ORGANIZATION
    if org_customer is not None and not marked:
        # (ids of users and orgs from two sequences: customer org_id may be a user's, one in no org so not in the
        # mapping, with its subscriptions, ended or not, and its card on file. Taken for the org's, the org would be
        # billed in that user's name and on its card. An org customer is marked billing_type=organization by this
        # package; one that is not and has subscriptions other than the org's is not taken for the org's.)
        statuses = ["active", "pending", "incomplete", "terminated", "canceled"]
        every = client.iter_subscriptions(external_customer_id=org.org_id, statuses=statuses)
        mine = [s async for s in every if s.get("external_id") != sub_id]
        if mine:
            its_own = ", ".join(f"{s.get('external_id')!r} ({s.get('plan_code')}, {s.get('status')})" for s in mine[:5])
            name = _named(org_customer)
            raise InvalidRequestError(
                f"org_id {org.org_id!r} is an existing Lago customer{name} not marked {METADATA_BILLING_TYPE}="
                f"{ORGANIZATION} (as org customers are) with subscriptions of its own: {its_own}"
                f"{', ...' if len(mine) > 5 else ''}. It may be a user's (ids of users and orgs from two sequences), "
                "and the org would then be billed in that user's name and on its payment method: nothing was done "
                f"for org {org.org_id!r}. Bill the org under another id (e.g. 'org_{org.org_id}': its org_id in the "
                "mapping and the org id the app's middleware resolves), or, if customer "
                f"{org.org_id!r} really is the org's, mark it {METADATA_BILLING_TYPE}={ORGANIZATION} in Lago (its "
                "metadata) and run again"
            )
    if org_subscription is None and org_customer is not None and marked:  # (an unmarked one with any: refused above)
        # an active subscription of the org under another id (made in Lago's UI...) is the org's subscription
        others = [s async for s in client.iter_subscriptions(external_customer_id=org.org_id, statuses=["active"])]
        if others:  # neither a second subscription (billed twice) nor this one (the middleware bills sub_id)
            raise InvalidRequestError(
                f"org {org.org_id!r} already has the active subscription {others[0].get('external_id')!r}, but the "
                f"middleware bills {sub_id!r} (LAGO_SUBSCRIPTION_ID_TEMPLATE): terminate that subscription (the "
                "migration then creates its own), or set LAGO_SUBSCRIPTION_ID_TEMPLATE so that it gives its id"
            )
    # (an org subscription an earlier run made: _donor_kept reads the users' terminated subscriptions too, listed here
    # with their active and pending ones, one listing per user rather than two)
    made_for = customer_metadata(org_customer).get(METADATA_MIGRATED_FROM, "").split(",")
    began = _migration_began(org_customer)
    with_ended = _earlier_run(org, org_subscription, made_for, donor_hint, began) is not None
    ended_statuses = ("terminated",) if with_ended else ()
    users: list[tuple[str, JSON | None, list[JSON]]] = []
    terminated: dict[str, list[JSON]] = {}
    for user_id in org.users:
        customer = await _or_none(client.get_customer(user_id))
        if customer_metadata(customer).get(METADATA_BILLING_TYPE) == ORGANIZATION:
            # (ids of users and orgs from one sequence, an earlier batch made org user_id: its subscription would be
            # ended as this "user's", and the org it bills left unbilled)
            raise InvalidRequestError(
                f"user_id {user_id!r} (org {org.org_id!r}) is the Lago customer of an org (its metadata "
                f"{METADATA_BILLING_TYPE}={ORGANIZATION}), not a user's: nothing was done for org {org.org_id!r}, "
                f"and org {user_id!r} keeps its subscription. Check the user_id of its rows in the mapping (Lago keys "
                "customers by external_id only: a user cannot share an org's id)"
            )
        subscriptions: list[JSON] = []
        if customer is None:
            result.warnings.append(
                f"user {user_id!r} (org {org.org_id!r}) has no Lago customer: nothing of it to migrate (ids are "
                "case-sensitive: a typo?)"
            )
        else:
            subscriptions, terminated[user_id], incomplete = await _user_subscriptions(client, user_id, ended_statuses)
            if incomplete:
                result.warnings.append(_incomplete_said(user_id, org.org_id, incomplete))
        for subscription in subscriptions:  # every write it needs must be possible before the first one is made
            path_segment(subscription.get("external_id"), f"user {user_id!r}'s subscription id")
        users.append((user_id, customer, subscriptions))
    result.customer, result.subscription = org_customer, org_subscription
    # what the users' customers hold besides subscriptions (not for a user an earlier run ended and marked: reported
    # then, and by --verify)
    for user_id, customer, subscriptions in users:
        if customer is None or (not subscriptions and customer_metadata(customer).get(METADATA_MIGRATED_TO)):
            continue
        holding, warned = await _holdings(client, org.org_id, user_id, customer, org_customer, options.accept_unmoved)
        result.unmoved.extend(holding)
        result.warnings.extend(warned)
    # users an earlier run moved to another org (the mapping changed since): their subscriptions were ended then, and
    # that org keeps the subscription it got, maybe on the plan it took from them; this run moves their mark only
    elsewhere = {
        user_id: moved_to
        for user_id, customer, _ in users
        if (moved_to := customer_metadata(customer).get(METADATA_MIGRATED_TO)) and moved_to != org.org_id
    }
    for user_id, moved_to in elsewhere.items():
        result.warnings.append(
            f"user {user_id!r} was migrated to org {moved_to!r} by an earlier run (its customer's "
            f"{METADATA_MIGRATED_TO}), and is now mapped to org {org.org_id!r}: the subscriptions that run ended stay "
            f"ended, so it brings org {org.org_id!r} no plan, and org {moved_to!r} keeps the subscription it got then "
            f"(its plan may be the one taken from {user_id!r}: check it, change it with OrgBilling.change_plan, or "
            f"terminate it if no user of {moved_to!r} is left); this run marks it {METADATA_MIGRATED_TO}={org.org_id}"
        )
    active = [(user_id, s) for user_id, _, subs in users for s in subs if s.get("status") == "active"]
    # subscriptions that start later (not a downgrade waiting for its date): the plan when none is active
    starting = [
        (user_id, s)
        for user_id, _, subs in users
        for s in subs
        if s.get("status") == "pending" and not s.get("previous_plan_code")
    ]

    if org.plan_code is None and org_subscription is None:
        await _amounts_comparable(org, options.plan_policy, active or starting, plans)
    source: tuple[str, JSON] | None = await _pick(options.plan_policy, active, plans) if active else None
    starts_at: str | None = None
    if not active and starting:  # users who bought a plan starting later: the org starts when the first would have
        starts_at = min(str(s.get("subscription_at") or "") for _, s in starting) or None
        if org.plan_code is None:
            source = await _pick(options.plan_policy, starting, plans)
    if org_subscription is not None and org_subscription.get("status") == "pending" and active:
        raise InvalidRequestError(
            f"org {org.org_id!r} has a subscription starting later ({org_subscription.get('subscription_at')}) while "
            f"{active[0][0]!r} has an active one: ending the users' subscriptions would leave the org unbilled until "
            "then. Start the org's subscription now (or cancel it: the migration then makes one), and run again"
        )

    # 1. The org customer.
    steps: list[Step] = []
    wanted = {METADATA_BILLING_TYPE: ORGANIZATION}
    existing_meta = customer_metadata(org_customer)
    previous = existing_meta.get(METADATA_MIGRATED_FROM, "").split(",")
    previous_users = [u for u in previous if u and not u.startswith("+")]
    wanted[METADATA_MIGRATED_FROM] = _user_list([*previous_users, *org.users])
    dropped = [user_id for user_id in dict.fromkeys(previous_users) if user_id not in org.users and org.every_user]
    if dropped and org_subscription is not None:  # (the mapping changed since a run prepared or migrated the org)
        names = ", ".join(map(repr, dropped))
        result.warnings.append(
            f"org {org.org_id!r} was prepared or migrated by an earlier run with {names} (its customer's "
            f"{METADATA_MIGRATED_FROM}), no longer mapped to it: it keeps its subscription {sub_id!r} (plan "
            f"{org_subscription.get('plan_code')!r}), whose plan and entitlement overrides may be those taken from "
            f"{names}: check it, change it with OrgBilling.change_plan, or terminate it if none of its users is left; "
            f"the subscriptions of {names} are ended by the org each is mapped to now (if any)"
        )
    if METADATA_CREATED_BY in existing_meta:
        pass  # (who created it stays who created it)
    elif len(org.users[0]) <= MAX_METADATA_VALUE:
        wanted[METADATA_CREATED_BY] = org.users[0]
    else:  # (Lago would refuse the whole customer: 422 value_is_too_long, and the org could never be migrated)
        result.warnings.append(
            f"org customer {org.org_id!r}: {METADATA_CREATED_BY} not written: its first user's id is "
            f"{len(org.users[0])} characters, longer than Lago's {MAX_METADATA_VALUE}-character metadata values"
        )
    changes = {key: value for key, value in wanted.items() if existing_meta.get(key) != value}
    room = MAX_METADATA_ITEMS - len(existing_meta)
    for key in [key for key in changes if key not in existing_meta]:
        if room > 0:
            room -= 1
        else:
            changes.pop(key)
            result.warnings.append(
                f"org customer {org.org_id!r} already has 5 metadata items (Lago's limit): {key} not written"
            )
    customer_payload: JSON = {"external_id": org.org_id}
    if org_customer is None or not org_customer.get("name"):
        customer_payload["name"] = org.org_name
    if org.email is not None and (org_customer is None or not org_customer.get("email")):
        customer_payload["email"] = org.email
    # A new org customer takes the billing identity (currency, address, legal name, tax id...) of the user whose
    # plan it takes, else of the first with a customer (its currency only with its plan: Lago refuses a customer
    # subscribed in another currency). An existing one is left as it is: never mixed with another's details.
    donors = [c for user_id, c, _ in users if c is not None and (source is None or user_id == source[0])]
    takes_its_plan = source is not None and org.plan_code is None
    for field in _CARRIED_FIELDS if donors and org_customer is None else ():
        value = donors[0].get(field)
        if field == "currency" and not takes_its_plan:
            continue
        if value is not None and (not isinstance(value, str) or value.strip()) and field not in customer_payload:
            customer_payload[field] = value
    if changes or org_customer is None:
        customer_payload["metadata"] = metadata_update_items(
            org_customer, {**customer_metadata(org_customer), **changes}
        )
    if len(customer_payload) > 1:
        what = "create" if org_customer is None else "update"
        fields = ", ".join(sorted(k for k in customer_payload if k != "external_id"))
        steps.append(
            Step("upsert_customer", org.org_id, f"{what} org customer {org.org_id} ({fields})", customer_payload)
        )

    # 2. The org subscription.
    if org_subscription is not None and org_subscription.get("external_customer_id") != org.org_id:
        owner = org_subscription.get("external_customer_id")
        raise InvalidRequestError(
            f"subscription id {sub_id!r} is already used by the active subscription of customer {owner!r}; "
            "Lago cannot move it. Terminate it first or set LAGO_SUBSCRIPTION_ID_TEMPLATE (e.g. 'org_{org_id}')."
        )
    if org_subscription is not None:
        result.plan_code = str(org_subscription.get("plan_code"))
        result.plan_source = "existing org subscription"
        result.billing_time = org_subscription.get("billing_time")
        if org_customer is not None and not marked and not org_subscription_made:
            # (its id is the org's subscription id: a user's made with create_subscription(user_id, ...) under the
            # default template has it too, and ids of users and orgs may come from two sequences: said, not refused)
            name = _named(org_customer)
            result.warnings.append(
                f"org {org.org_id!r} keeps the subscription {sub_id!r} of customer {org.org_id!r}{name}, which is not "
                f"marked {METADATA_BILLING_TYPE}={ORGANIZATION}: if that customer is a user's (ids of users and orgs "
                "from two sequences), the org would be billed in that user's name and on its payment method; then "
                "bill the org under another id. It is marked as the org's customer by --execute"
            )
        if org.plan_code is not None and org.plan_code != result.plan_code:
            result.warnings.append(
                f"org {org.org_id!r} already subscribed to {result.plan_code!r}; mapping plan_code "
                f"{org.plan_code!r} not applied (change plans with OrgBilling.change_plan)"
            )
        elif org.plan_code is None and source is not None and not org_subscription_made:
            # (kept as documented; but the org would pay less than the user plan it ends: said, not done silently.
            # Not for one this migration made: its plan is the policy's pick already)
            user_id, picked = source
            theirs = await _yearly_paid(picked, plans)
            kept = await _yearly_paid(org_subscription, plans)
            currency = await _currency_of(picked, plans)
            if theirs > kept and currency == await _currency_of(org_subscription, plans):
                result.warnings.append(
                    f"org {org.org_id!r} keeps its subscription {sub_id!r} on plan {result.plan_code!r} "
                    f"({_amount(kept, currency)} a year), while {user_id}'s subscription "
                    f"{picked.get('external_id')} on plan {picked.get('plan_code')!r} ({_amount(theirs, currency)} a "
                    f"year) is ended: the org pays less than its user did. Change the org's plan with "
                    f"OrgBilling.change_plan if it should pay {picked.get('plan_code')!r}"
                )
    else:
        if org.plan_code is not None:
            result.plan_code, result.plan_source = org.plan_code, "mapping plan_code"
        elif source is not None:
            result.plan_code = str(source[1]["plan_code"])
            result.plan_source = f"{options.plan_policy} plan: {source[0]}'s subscription {source[1]['external_id']}"
            if starts_at is not None:
                result.plan_source += f", starting {starts_at}"
            own = await plans.own_price(source[1])
            if own is not None:  # (made from its plan code, the org subscription would be billed the plan's prices)
                raise InvalidRequestError(_own_price_problem(org, sub_id, source, own))
        elif options.default_plan is not None:
            result.plan_code, result.plan_source = options.default_plan, "--default-plan"
        if result.plan_code is None:
            moved = "; ".join(
                f"{user_id!r} was migrated to org {to!r} by an earlier run" for user_id, to in elsewhere.items()
            )
            result.warnings.append(
                f"org {org.org_id!r}: no user has an active subscription and no plan_code/--default-plan: "
                f"the org gets a customer but no subscription{f' ({moved})' if moved else ''}"
            )
        else:
            billed = org_customer.get("currency") if org_customer is not None else None
            if billed:  # (Lago refuses the subscription, after the customer's write: 422 currencies_does_not_match)
                paid = source[1] if source is not None and takes_its_plan else {"plan_code": result.plan_code}
                currency = await _currency_of(paid, plans)
                if currency and currency != billed:
                    raise InvalidRequestError(
                        f"org customer {org.org_id!r} exists in {billed} (its currency in Lago), and its subscription "
                        f"would be billed in {currency} (plan {result.plan_code!r}; {result.plan_source}): Lago "
                        "refuses a subscription in another currency than its customer's. Nothing was done for this "
                        f"org: name a plan in {billed} in the mapping's plan_code column, or change org customer "
                        f"{org.org_id!r}'s currency to {currency} in Lago, and run again"
                    )
            result.billing_time = str(source[1].get("billing_time") or "calendar") if source else "calendar"
            payload: JSON = {"plan_code": result.plan_code, "billing_time": result.billing_time}
            if starts_at is not None:
                payload["subscription_at"] = starts_at
            # (a fixed-term subscription, a contract: the org's ends with it)
            ending = source[1].get("ending_at") if source is not None and org.plan_code is None else None
            if isinstance(ending, str) and ending:
                payload["ending_at"] = ending
                last_day = parse_time(ending)  # (Lago reads its date as written, in its own offset)
                if last_day is not None and last_day.date() <= dt.datetime.now(dt.timezone.utc).date():
                    result.warnings.append(
                        f"org {org.org_id!r}: the subscription it takes its plan from ({result.plan_source}) ends "
                        f"{ending} (ending_at), today or before by this host's clock: Lago refuses an ending_at "
                        "that is not on a later day than today, so the org subscription cannot end with it and "
                        "this org would fail at it (see the error then)"
                    )
            trial = _trial_days(await plans.get(result.plan_code))
            if trial and active:  # (a subscription starting later would have had that trial all the same)
                result.warnings.append(
                    f"org {org.org_id!r}: plan {result.plan_code!r} has a {trial:g}-day trial, which Lago gives every "
                    f"new subscription: the org subscription starts one, and is not billed the plan's fee for "
                    f"{trial:g} days although its users' subscriptions had theirs. To bill it from the cut-over, "
                    f"subscribe the org yourself first (POST /subscriptions, external_id {sub_id!r}, plan_overrides "
                    '{"trial_period": 0}), then run again: the migration keeps the org subscription it finds'
                )
            until = f"; ending {payload['ending_at']}" if "ending_at" in payload else ""
            steps.append(
                Step(
                    "create_subscription",
                    sub_id,
                    f"subscribe org {org.org_id} to {result.plan_code} ({result.billing_time}; {result.plan_source}"
                    f"{until})",
                    payload,
                )
            )
    # Prices of their own that the org subscription does not take (read as listed: no call).
    made = source is not None and org_subscription is None and org.plan_code is None
    taken = source[1].get("external_id") if source is not None and made else None
    for user_id, subscription in (*active, *starting):
        if subscription.get("external_id") == taken:
            continue
        own = await plans.own_price(subscription, look=False)
        if own is not None:
            result.warnings.append(
                f"org {org.org_id!r}: {user_id}'s subscription {subscription.get('external_id')} has a price of its "
                f"own ({own}: Lago's plan_overrides), not carried: the org subscription {sub_id} (plan "
                f"{result.plan_code!r}) does not take it"
            )

    # 2b. The entitlement overrides of the subscription the plan policy picks, the donor (see the module docstring).
    candidates = active or starting
    donor: tuple[str, JSON] | None = None
    kept_donor = await _donor_kept(
        client,
        org,
        sub_id,
        org_subscription,
        users,
        active,
        previous_users,
        options,
        plans,
        result,
        donor_hint,
        terminated if with_ended else None,
        began,
    )
    if kept_donor is not None:  # (the org subscription an earlier run made: its donor, whatever changed since)
        donor, candidates = kept_donor
    elif candidates:
        donor = source if source is not None else await _pick(options.plan_policy, candidates, plans)
    if donor is not None:
        result.donor = (donor[0], str(donor[1].get("external_id")))
        if await plans.uses_entitlements():
            if org_subscription is not None:
                org_status = str(org_subscription.get("status") or "active")
            else:  # (made starting later: Lago makes it pending)
                org_status = "pending" if starts_at is not None else "active"
            steps.extend(
                await _plan_overrides(
                    client,
                    org,
                    sub_id,
                    candidates,
                    donor,
                    org_subscription,
                    org_status,
                    plans,
                    result,
                    org_subscription_made,
                    # (an earlier run's org subscription, its donor not known from the journal: see _donor_given)
                    options.plan_policy if kept_donor is not None and result.donor != donor_hint else None,
                )
            )

    # A user with several active subscriptions at once (a plan and an add-on): the org gets one; the others end (by the
    # second phase) with nothing to follow them.
    taken_id = result.donor[1] if result.donor is not None else None
    for user_id, _, subscriptions in users:
        held = [s for s in subscriptions if s.get("status") == "active"]
        others = [s for s in held if s.get("external_id") != taken_id]
        if len(held) > 1 and others:
            ending = "the second phase ends" if options.prepare_only else "this migration ends"
            listed = ", ".join(f"{s.get('external_id')} (plan {s.get('plan_code')!r})" for s in others)
            result.warnings.append(
                f"org {org.org_id!r}: {user_id} has {len(held)} active subscriptions at once (an add-on?); the org "
                f"gets one, {sub_id!r} on plan {result.plan_code!r}, and {ending} {listed} with no subscription "
                "to follow: its billing stops. If the org should keep paying for it, subscribe the org customer to "
                "that plan yourself (POST /subscriptions with another external_id)"
            )
    _warn_scheduled(org, sub_id, users, source, options, result)
    if options.prepare_only:  # the first phase: the users' subscriptions go on billing the old integration's events
        result.phase = "prepare"
        await _warn_overlap(org, sub_id, active, plans, result)
        _settle_unmoved(org, options, result, steps)
        result.steps = steps
        return
    result.phase = "both" if any(step.kind == "create_subscription" for step in steps) else "finish"

    # 3. The users' subscriptions (the donor's last), then 4. the marks on the user customers.
    ends: list[Step] = []
    for user_id, _, subscriptions in users:
        active_ids = {s["external_id"] for s in subscriptions if s.get("status") == "active"}
        for subscription in subscriptions:
            external_id = str(subscription["external_id"])
            if subscription.get("status") == "active":
                ends.append(
                    Step(
                        "terminate_subscription",
                        external_id,
                        f"terminate {user_id}'s subscription {external_id} ({subscription.get('plan_code')})",
                        {"user_id": user_id, "plan_code": subscription.get("plan_code")},
                    )
                )
            elif external_id not in active_ids and not subscription.get("previous_plan_code"):
                ends.append(
                    Step(
                        "cancel_subscription",
                        external_id,
                        f"cancel {user_id}'s pending subscription {external_id}",
                        {"user_id": user_id},
                    )
                )
    if options.on_termination_credit_note in (None, "credit"):
        upfront = []
        for step in ends:
            plan = await plans.get(str(step.payload["plan_code"])) if step.kind == "terminate_subscription" else None
            if plan is not None and plan.get("pay_in_advance") and _int(plan.get("amount_cents")):
                upfront.append(step.target)
        if upfront:  # (the org pays the rest of the period again on its own subscription)
            result.warnings.append(
                f"org {org.org_id!r}: {', '.join(upfront)} paid in advance: terminated with a credit note as credit "
                f"(Lago's default), the unused part of the period stays a credit of the user customer, which gets no "
                "more invoices to use it on, while the org pays that part again; choose with "
                "--on-termination-credit-note refund (or offset, or skip)"
            )
    # (a run stopped half-way then still finds the donor when resumed: the same overrides, whatever was ended)
    donor_id = donor[1].get("external_id") if donor is not None else None
    steps.extend(sorted(ends, key=lambda step: step.target == donor_id))
    for user_id, customer, _ in users:
        if customer is None:
            continue
        meta = customer_metadata(customer)
        if meta.get(METADATA_MIGRATED_TO) == org.org_id:
            continue
        if len(org.org_id) > MAX_METADATA_VALUE:
            result.warnings.append(f"user {user_id!r} not marked: org id longer than Lago's 100-character values")
        elif METADATA_MIGRATED_TO not in meta and len(meta) >= MAX_METADATA_ITEMS:
            result.warnings.append(f"user {user_id!r} not marked: its customer already has 5 metadata items")
        else:
            payload = {
                "external_id": user_id,
                "metadata": metadata_update_items(
                    customer, {**customer_metadata(customer), METADATA_MIGRATED_TO: org.org_id}
                ),
            }
            steps.append(
                Step("mark_user", user_id, f"mark user customer {user_id} migrated_to_org={org.org_id}", payload)
            )
    _settle_unmoved(org, options, result, steps)
    result.steps = steps


def _settle_unmoved(org: OrgMapping, options: MigrationOptions, result: OrgResult, steps: Sequence[Step]) -> None:
    """Refuse the org (:class:`UnmovedHoldingsError`, before any write) when ``steps`` end its users' subscriptions
    while their customers hold what is not moved and not accepted (``options.accept_unmoved``); else say in a
    warning what stays on them. Read from Lago's state each run, so a resumed run decides as the first did."""
    if not result.unmoved:
        return
    ending = any(step.kind in ("terminate_subscription", "cancel_subscription") for step in steps)
    blocking = [u for u in result.unmoved if u.kind in UNMOVED_KINDS and u.kind not in options.accept_unmoved]
    if ending and blocking:
        raise UnmovedHoldingsError(
            f"org {org.org_id!r} not migrated: {_unmoved_refused(org, blocking)}", result.unmoved
        )
    accepted = [u for u in result.unmoved if u not in blocking]
    if accepted:
        result.warnings.append(
            f"org {org.org_id!r}: left on its users' customers (the migration never moves money; what the users' last "
            f"invoices take aside): {_unmoved_lines(accepted, todo=True)}"
        )
    if blocking:  # (a first phase, or nothing of theirs left to end)
        later = (
            "the second phase (migrate --execute without --prepare) refuses this org until they are moved or accepted "
            f"(--accept-unmoved {','.join(sorted({u.kind for u in blocking}, key=UNMOVED_KINDS.index))})"
            if options.prepare_only
            else "they stay there"
        )
        result.warnings.append(
            f"org {org.org_id!r}: its users' customers hold what the migration does not move: "
            f"{_unmoved_lines(blocking, todo=True)}; {later}"
        )


async def _donor_kept(
    client: LagoClient,
    org: OrgMapping,
    sub_id: str,
    org_subscription: JSON | None,
    users: Sequence[tuple[str, JSON | None, Sequence[JSON]]],
    active: Sequence[tuple[str, JSON]],
    previous_users: Sequence[str],
    options: MigrationOptions,
    plans: PlanCatalog,
    result: OrgResult,
    donor_hint: tuple[str, str] | None,
    terminated: Mapping[str, Sequence[JSON]] | None = None,
    began: dt.datetime | None = None,
) -> tuple[tuple[str, JSON], list[tuple[str, JSON]]] | None:
    """The donor and the candidates of an org subscription an earlier run of this migration made while its users'
    are still active (a second phase, a first phase again, a run resumed; the org customer's ``migrated_from_user``
    or the journal says so): the users' subscriptions there when it was made, still active or ended since (the
    donor's may end by itself in the window between the phases), as ``verify`` picks it, not one begun since (an
    upgrade, a plan bought in the window: a warning names those, which the second phase ends); the first phase's
    donor (``donor_hint``, from the journal) when found. ``None`` otherwise: the donor is picked among ``active``.
    ``terminated``: the users' terminated subscriptions, by user, when :func:`plan_org` listed them with their others
    (else read here: one more listing per user). ``began``: when the migration first wrote to the org customer (see
    :func:`_migration_began`)."""
    since = _earlier_run(org, org_subscription, previous_users, donor_hint, began)
    if org_subscription is None or not active or since is None:
        return None

    def begun_since(subscription: JSON) -> bool:
        return _begun_after(subscription, since)

    there = [(user_id, s) for user_id, s in active if not begun_since(s)]
    ended: list[tuple[str, JSON]] = []
    for user_id, customer, _ in users:
        if customer is None:
            continue
        olds = await _listed_or_read(client, terminated, user_id, ("terminated",))
        for old in olds:
            at = parse_time(old.get("terminated_at"))
            if at is not None and at >= since and not begun_since(old):
                ended.append((user_id, old))
    pool = [*there, *ended]
    if not pool:
        return None
    plan = org_subscription.get("plan_code")
    ending = "the second phase ends it" if options.prepare_only else "it is ended"
    for user_id, subscription in active:
        if begun_since(subscription) and subscription.get("plan_code") != plan:
            result.warnings.append(
                f"org {org.org_id!r}: {user_id}'s subscription {subscription.get('external_id')} (plan "
                f"{subscription.get('plan_code')!r}) began after the org subscription {sub_id!r} was made (a plan "
                f"bought or changed since, e.g. between the two phases): {ending} with the others and the org stays "
                f"on {plan!r}, neither taking its plan nor its entitlement overrides; if the org should have "
                f"{subscription.get('plan_code')!r}, change it with OrgBilling.change_plan"
            )
    donor = await _pick(options.plan_policy, pool, plans)
    if donor_hint is not None and (donor[0], donor[1].get("external_id")) != donor_hint:
        hinted = next(((u, s) for u, s in pool if (u, s.get("external_id")) == donor_hint), None)
        if hinted is not None:
            result.warnings.append(
                f"org {org.org_id!r}: the first phase took the entitlement overrides of {hinted[0]}'s subscription "
                f"{donor_hint[1]} (its journal says so): kept, not those of {donor[0]}'s subscription "
                f"{donor[1].get('external_id')} (--plan-policy {options.plan_policy}); give --verify the plan policy "
                "of the first phase"
            )
            donor = hinted
    return donor, pool


async def _user_subscriptions(
    client: LagoClient, user_id: str, ended: Sequence[str] = ()
) -> tuple[list[JSON], list[JSON], list[JSON]]:
    """A user's active and pending subscriptions (every page), those of the ``ended`` statuses and its incomplete ones
    (waiting for a payment: see :func:`_incomplete_said`), listed in the same request (one listing per user)."""
    statuses = ["active", "pending", "incomplete", *ended]
    items = [s async for s in client.iter_subscriptions(external_customer_id=user_id, statuses=statuses)]
    live = [s for s in items if s.get("status") in ("active", "pending")]
    incomplete = [s for s in items if s.get("status") == "incomplete"]
    return live, [s for s in items if s.get("status") in ended], incomplete


def _incomplete_said(user_id: str, org_id: str, incomplete: Sequence[JSON]) -> str:
    """A user's subscriptions waiting for a payment (Lago's ``incomplete``, ``activation_rules`` of type ``payment``):
    once paid they start and bill the user; Lago refuses to end one meanwhile (``422 subscription_incomplete``)."""
    ids = ", ".join(str(s.get("external_id")) for s in incomplete)
    return (
        f"user {user_id!r} (org {org_id!r}) has incomplete subscription(s) {ids} (waiting for a payment): once paid, "
        "it starts and bills the user; Lago refuses to end it while incomplete. Run the migration again once it is "
        "paid (it is then ended like the others) or canceled (payment failed, or timed out)"
    )


async def _listed_or_read(
    client: LagoClient, listed: Mapping[str, Sequence[JSON]] | None, user_id: str, statuses: Sequence[str]
) -> Sequence[JSON]:
    """A user's subscriptions of ``statuses``: as :func:`_user_subscriptions` listed them (``listed``, by user), else
    read now."""
    if listed is not None:
        return listed.get(user_id, ())
    return [s async for s in client.iter_subscriptions(external_customer_id=user_id, statuses=list(statuses))]


def _earlier_run(
    org: OrgMapping,
    org_subscription: JSON | None,
    previous_users: Iterable[str],
    donor_hint: tuple[str, str] | None,
    began: dt.datetime | None = None,
) -> dt.datetime | None:
    """When an earlier run of this migration found the org subscription (the org customer's ``migrated_from_user``
    names one of the org's users, or the journal names its donor: ``donor_hint``): when it made it, or, for one the org
    had before, when that run first wrote to the org customer (``began``, see :func:`_migration_began`). The users'
    subscriptions begun after that were not there for it to pick (see :func:`_donor_kept`); those the org subscription
    had before were (the first run picked among them all: a run resumed picks as it did). ``None`` when no earlier run
    found it."""
    since = parse_time((org_subscription or {}).get("created_at"))
    users = {user_id for user_id in previous_users if user_id and not user_id.startswith("+")}
    earlier = bool(users & set(org.users)) or donor_hint is not None
    if org_subscription is None or not earlier:
        return None
    return max(since, began) if since is not None and began is not None else since


def _migration_began(org_customer: JSON | None) -> dt.datetime | None:
    """When this migration first wrote to the org customer: the ``created_at`` of its ``migrated_from_user`` metadata
    item (written by the first write of every run, before the org subscription is made, and kept, with its id, when a
    later run changes its value); ``None`` when it has none. An org subscription made before it (``created_at``) is
    one the org had before the migration."""
    for item in (org_customer or {}).get("metadata") or ():
        if isinstance(item, Mapping) and item.get("key") == METADATA_MIGRATED_FROM:
            return parse_time(item.get("created_at"))
    return None


def _warn_scheduled(
    org: OrgMapping,
    sub_id: str,
    users: Sequence[tuple[str, JSON | None, Sequence[JSON]]],
    source: tuple[str, JSON] | None,
    options: MigrationOptions,
    result: OrgResult,
) -> None:
    """Plan changes the users had scheduled in Lago that the org subscription does not take (they end with the users'
    subscriptions): a plan bought to start later, canceled, and the donor's downgrade at the end of its period."""
    plan = result.plan_code
    if plan is None:
        return
    taken_id = result.donor[1] if result.donor is not None else None
    source_id = source[1].get("external_id") if source is not None else None
    ends = "the second phase cancels it" if options.prepare_only else "it is canceled"
    for user_id, _, subscriptions in users:
        for subscription in subscriptions:
            code, external_id = subscription.get("plan_code"), subscription.get("external_id")
            if subscription.get("status") != "pending" or code == plan:
                continue
            if not subscription.get("previous_plan_code") and external_id != source_id:
                result.warnings.append(
                    f"org {org.org_id!r}: {user_id}'s subscription {external_id} to plan {code!r}, starting "
                    f"{subscription.get('subscription_at')}, is not taken by the org subscription {sub_id!r} (plan "
                    f"{plan!r}): {ends}, and the org does not move to {code!r} then. If it should, change its plan "
                    f"on that date (OrgBilling.change_plan({org.org_id!r}, {code!r})), or give the org plan_code "
                    f"{code!r} in the mapping"
                )
            elif subscription.get("previous_plan_code") and external_id == taken_id:
                current = next(
                    (s for s in subscriptions if s.get("external_id") == external_id and s.get("status") == "active"),
                    {},
                )
                when = current.get("downgrade_plan_date") or "the end of its period"
                result.warnings.append(
                    f"org {org.org_id!r}: {user_id}'s subscription {external_id}, whose plan {plan!r} the org takes, "
                    f"was to change to plan {code!r} on {when} (a downgrade scheduled in Lago): the org subscription "
                    f"{sub_id!r} does not take that change and stays on {plan!r}. If the org should move to {code!r}, "
                    f"once it is migrated: OrgBilling.change_plan({org.org_id!r}, {code!r}) (Lago applies a downgrade "
                    "at the end of the org's period)"
                )


async def _warn_overlap(
    org: OrgMapping, sub_id: str, active: Sequence[tuple[str, JSON]], plans: PlanCatalog, result: OrgResult
) -> None:
    """The first phase: the users' active subscriptions with a fixed fee run next to the org's until the second."""
    if result.plan_code is None:
        return
    paying = []
    for _, subscription in active:
        code = str(subscription.get("plan_code"))
        plan = await plans.get(code)
        amount = _int(subscription.get("plan_amount_cents"))
        if amount is None and plan is not None:
            amount = _int(plan.get("amount_cents"))
        if amount:
            paying.append(str(subscription.get("external_id")))
    if paying:
        result.warnings.append(
            f"org {org.org_id!r}: until the second phase (migrate --execute without --prepare, once the middleware is "
            f"deployed) its users' subscriptions {', '.join(paying)} stay active next to the org subscription "
            f"{sub_id!r}: each event is billed once, on the subscription it names (the old integration's on the "
            "users', the middleware's on the org's), but the fixed fee of each is billed for that window (the "
            "users' up to their termination, the org's from its start): keep the window short"
        )


def _own_price_problem(org: OrgMapping, sub_id: str, donor: tuple[str, JSON], own: str) -> str:
    """The org cannot take its donor's plan: the donor pays a price of its own (see :meth:`PlanCatalog.own_price`)."""
    user_id, subscription = donor
    code, billing_time = subscription.get("plan_code"), subscription.get("billing_time") or "calendar"
    return (
        f"{user_id}'s subscription {subscription.get('external_id')}, whose plan {code!r} the org takes, has a price "
        f"of its own ({own}: Lago's plan_overrides). The migration cannot copy plan overrides: made from plan "
        f"{code!r}, the org subscription would be billed the plan's prices. Nothing was done for this org, "
        f"{user_id} stays billed as before. Make the org's subscription yourself with the same plan_overrides (POST "
        f"/subscriptions {{external_customer_id: {org.org_id}, external_id: {sub_id}, plan_code: {code}, "
        f"billing_time: {billing_time}, plan_overrides: ...}}; the org customer first, with {user_id}'s billing "
        "details, if it has none), then run again: an org subscription that exists is kept and the users' are ended"
    )


def _ending_refused(org: OrgMapping, step: Step, result: OrgResult) -> str:
    """Lago refused the ``ending_at`` copied from the donor (one not on a later day than today: a fixed term ending
    today, or ended and not yet terminated by Lago's hourly job)."""
    return (
        f"the org subscription {step.target} cannot end when the subscription it takes its plan from does "
        f"({result.plan_source}; ending_at {step.payload['ending_at']}): Lago refuses an ending_at that is not on a "
        "later day than today (invalid_date), and that fixed term ends today or has ended (Lago terminates it "
        f"within the hour after). Nothing more was done for org {org.org_id!r} (its customer aside): the users' "
        "subscriptions go on as before. Run again once Lago has terminated it (the org then takes the plan of "
        "another active subscription, if any), or give the org a plan_code in the mapping (an org subscription "
        "without an end date)"
    )


async def apply_org(
    client: LagoClient,
    org: OrgMapping,
    options: MigrationOptions,
    result: OrgResult,
    journal: Journal | None,
    fingerprint: str | None = None,
) -> None:
    """Make the writes ``plan_org`` planned, in order, logging and journaling each outcome (and, before the org
    subscription is made, that this migration, of ``fingerprint``, makes it: see :meth:`Journal.made_subscription`).

    The org subscription and its entitlement writes are made together, shielded from cancellation (Ctrl-C, SIGTERM,
    the run stopped by another org's failure), which takes effect once they are made: stopped between them, a run
    again without the journal took that subscription for one the org had before, and left it the plan features its
    donor went without (a second Ctrl-C still stops at once)."""
    steps = result.steps
    index = 0
    while index < len(steps):
        if steps[index].kind != "create_subscription":
            await _apply_step(client, org, options, result, journal, fingerprint, steps[index])
            index += 1
            continue
        end = index + 1
        while end < len(steps) and steps[end].kind in ("set_entitlements", "remove_entitlements"):
            end += 1
        with anyio.CancelScope(shield=True):
            for step in steps[index:end]:
                await _apply_step(client, org, options, result, journal, fingerprint, step)
        index = end


async def _apply_step(
    client: LagoClient,
    org: OrgMapping,
    options: MigrationOptions,
    result: OrgResult,
    journal: Journal | None,
    fingerprint: str | None,
    step: Step,
) -> None:
    """Make one write of :func:`apply_org`, logging and journaling its outcome."""
    try:
        if step.kind == "upsert_customer":
            result.customer = await _upsert_customer(client, step.payload, result.warnings)
            step.outcome = "done"
        elif step.kind == "create_subscription":
            if journal is not None and fingerprint is not None:  # (before: its answer may be lost in a crash)
                journal.record(
                    "step",
                    org_id=org.org_id,
                    step=step.kind,
                    target=step.target,
                    outcome="started",
                    fingerprint=fingerprint,
                )
            try:
                subscription = await client.create_subscription(
                    external_customer_id=org.org_id,
                    plan_code=step.payload["plan_code"],
                    external_id=step.target,
                    billing_time=step.payload["billing_time"],
                    subscription_at=step.payload.get("subscription_at"),
                    ending_at=step.payload.get("ending_at"),
                )
            except LagoValidationError as exc:
                if "ending_at" not in step.payload or "ending_at" not in exc.details:
                    raise
                raise InvalidRequestError(_ending_refused(org, step, result)) from exc
            if subscription.get("plan_code") != step.payload["plan_code"]:  # (made since the plan: a downgrade)
                raise InvalidRequestError(await _undo_downgrade(client, org, step, subscription))
            if subscription.get("previous_plan_code"):  # (made since the plan on another plan: upgraded at once)
                result.warnings.append(
                    f"org subscription {step.target!r} was made on plan {subscription['previous_plan_code']!r} "
                    f"since this run read it (another run at the same time?): this run changed it to "
                    f"{step.payload['plan_code']!r}"
                )
            result.subscription = subscription
            step.outcome = "done"
            step.detail = {"started_at": subscription.get("started_at"), "status": subscription.get("status")}
        elif step.kind == "set_entitlements":
            status = str((result.subscription or {}).get("status") or "active")
            await _set_overrides(client, step.target, step.payload["entitlements"], status)
            step.outcome = "done"
            step.detail = {"entitlements": step.payload["entitlements"]}
        elif step.kind == "remove_entitlements":
            status = str((result.subscription or {}).get("status") or "active")
            removals: list[Removal] = [(str(f), None if p is None else str(p)) for f, p in step.payload["removals"]]
            for removal in removals:  # (idempotent, so retried after a 5xx or a lost answer: see below)
                await _again_if_unavailable(client, _remove_entitlement, step.target, removal, status)
            step.outcome = "done"
            step.detail = {"removed": [_removal_name(removal) for removal in removals]}
        elif step.kind in ("terminate_subscription", "cancel_subscription"):
            try:
                ended = await _end_subscription(client, step, options)
            except LagoNotFoundError:
                step.outcome = "already ended"
                if step.kind == "cancel_subscription":  # no longer pending: it may have started meanwhile
                    started = await _or_none(client.get_subscription(step.target))
                    if started is not None and started.get("external_customer_id") == step.payload["user_id"]:
                        ended = await client.terminate_subscription(
                            step.target,
                            on_termination_invoice=options.on_termination_invoice,
                            on_termination_credit_note=options.on_termination_credit_note,
                        )
                        step.outcome = "done"
                        step.detail = {"terminated_at": ended.get("terminated_at"), "started_meanwhile": True}
            else:
                step.outcome = "done"
                step.detail = {"terminated_at": ended.get("terminated_at") or ended.get("canceled_at")}
        else:
            await _upsert_customer(client, step.payload, result.warnings)
            step.outcome = "done"
    except LagoIntegrationError as exc:
        step.outcome = "failed"
        step.detail = {"error": str(exc)}
        _log_step(org, step, journal)
        raise
    _log_step(org, step, journal)


async def _undo_downgrade(client: LagoClient, org: OrgMapping, step: Step, subscription: JSON) -> str:
    """The org subscription ``step`` was to make exists since the plan (another run at the same time, with others of
    the org's users), on a more expensive plan: Lago took the POST as a downgrade at the period's end. It is canceled
    (the pending subscription of the new plan), as a run after the other keeps the org's subscription; the org then
    fails, so that a run again plans from that subscription (the steps planned without it would carry the overrides
    of a user on another plan). Returns the error."""
    what = f"the org subscription {step.target!r} on plan {subscription.get('plan_code')!r}"
    try:
        await _again_if_unavailable(client, _cancel_pending, step.target)
    except LagoIntegrationError as exc:
        return (
            f"{what} was made since this run read it (another run at the same time?), and Lago took this run's "
            f"{step.payload['plan_code']!r} as a downgrade at the end of its period, which could not be canceled "
            f"({exc}): cancel it (DELETE /subscriptions/{step.target}?status=pending) unless wanted, then run again"
        )
    return (
        f"{what} was made since this run read it (another run at the same time?): this run's change to "
        f"{step.payload['plan_code']!r} (a downgrade at the end of its period) was canceled; run again to migrate "
        "the org from that subscription"
    )


async def _cancel_pending(client: LagoClient, external_id: str) -> None:
    try:
        await client.terminate_subscription(external_id, status="pending")
    except LagoNotFoundError:  # (canceled by an attempt whose answer was lost, or by someone else)
        pass


async def _again_if_unavailable(client: LagoClient, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``call(client, *args)`` (an idempotent write the client does not retry: a ``DELETE``), made again after a 5xx
    or a network error as the client retries other calls: one lost answer would otherwise fail the org and stop the
    run."""
    attempts = 1 + client.settings.max_retries
    for attempt in range(1, attempts + 1):
        try:
            return await call(client, *args)
        except LagoUnavailableError:
            if attempt == attempts:
                raise
            await anyio.sleep(min(30.0, client.settings.retry_backoff * 2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


async def _upsert_customer(client: LagoClient, payload: JSON, warnings: list[str]) -> JSON:
    """``POST /customers``. Lago answering that a metadata key exists already (``value_already_exist``) is a resend,
    by the client's retry, of a POST it made behind a lost answer, or a write made by someone else since the plan (the
    app making the org's customer, another batch of the migration, a key added in Lago's UI): the new items, sent
    without the ids Lago has since given them, collide. The customer is read again and the migration's own changes
    made to what it has now (one more call), as the plan would have made them: its other items, name and email kept,
    users added to ``migrated_from_user``, an existing ``created_by_user_id`` kept, within Lago's 5 items (a warning
    in ``warnings`` names a key left out), rather than failing the org, or overwriting what it has."""
    try:
        return await client.upsert_customer(payload)
    except LagoValidationError as exc:
        if "metadata" not in payload or "value_already_exist" not in json.dumps(exc.details, default=str):
            raise
        external_id = str(payload["external_id"])
        current = await client.get_customer(external_id)
    have = customer_metadata(current)
    merged = dict(have)
    for item in payload["metadata"]:
        key, value = str(item["key"]), str(item["value"])
        if key == METADATA_MIGRATED_FROM and key in have:  # (the users of both, as a run after the other makes it)
            users = [u for u in f"{have[key]},{value}".split(",") if u and not u.startswith("+")]
            merged[key] = have[key] if have[key] == value else _user_list(users)
        elif key in (METADATA_BILLING_TYPE, METADATA_MIGRATED_FROM, METADATA_MIGRATED_TO) or (
            key == METADATA_CREATED_BY and key not in have
        ):
            merged[key] = value
        # (another key is an item the customer had, sent to keep it: kept as it is now, or gone if deleted since)
    added = [key for key in merged if key not in have]
    for key in added[max(MAX_METADATA_ITEMS - len(have), 0) :]:
        merged.pop(key)
        warnings.append(f"customer {external_id!r} already has 5 metadata items (Lago's limit): {key} not written")
    update: JSON = {"external_id": external_id}
    update.update({field: payload[field] for field in ("name", "email") if field in payload and not current.get(field)})
    if merged != have:
        update["metadata"] = metadata_update_items(current, merged)
    return await client.upsert_customer(update) if len(update) > 1 else current


async def _end_subscription(client: LagoClient, step: Step, options: MigrationOptions) -> JSON:
    """Terminate (or cancel) the step's user subscription. The client does not retry a DELETE Lago may have done
    behind a lost answer; here a 404 on a retry means it was, so transient failures are retried."""
    attempts = 1 + client.settings.max_retries
    for attempt in range(1, attempts + 1):
        try:
            return await client.terminate_subscription(
                step.target,
                status="pending" if step.kind == "cancel_subscription" else None,
                on_termination_invoice=options.on_termination_invoice,
                on_termination_credit_note=options.on_termination_credit_note,
            )
        except LagoUnavailableError:
            if attempt == attempts:
                raise
            await anyio.sleep(min(30.0, client.settings.retry_backoff * 2**attempt))
        except LagoNotFoundError:
            if attempt == 1 or step.kind == "cancel_subscription":
                raise  # (a pending one may have started meanwhile: the caller looks)
            return {}  # ended by the attempt whose answer was lost
    raise AssertionError("unreachable")  # pragma: no cover


def _log_step(org: OrgMapping, step: Step, journal: Journal | None) -> None:
    level = logging.WARNING if step.outcome == "failed" else logging.INFO
    logger.log(level, "org %s: %s %s: %s", org.org_id, step.kind, step.target, step.outcome)
    if journal is not None:
        journal.record(
            "step", org_id=org.org_id, step=step.kind, target=step.target, outcome=step.outcome, **step.detail
        )


async def verify_org(
    client: LagoClient,
    org: OrgMapping,
    result: OrgResult,
    plans: PlanCatalog | None = None,
    options: MigrationOptions | None = None,
) -> None:
    """``result.errors`` gets every way the org is not migrated: no customer, or one not marked
    ``billing_type=organization``, no active subscription (or one on another customer), a mapped user still holding an
    active subscription, or whose subscriptions are ended but whose customer is not marked ``migrated_to_org`` (a run
    stopped before step 4), an entitlement override of the donor
    (the subscription the plan policy picks among those the migration ended: the policy ``execute`` used must be
    given) missing from the org subscription, or a plan entitlement the donor went without still on it."""
    sub_id = client.settings.subscription_id_for(org.org_id)
    result.customer = await _or_none(client.get_customer(org.org_id))
    if result.customer is None:
        result.errors.append(f"org {org.org_id!r} has no Lago customer")
    else:
        meta = customer_metadata(result.customer)
        if meta.get(METADATA_BILLING_TYPE) != ORGANIZATION:
            if METADATA_BILLING_TYPE in meta or len(meta) < MAX_METADATA_ITEMS:
                result.errors.append(
                    f"org customer {org.org_id!r} is not marked {METADATA_BILLING_TYPE}={ORGANIZATION} (its metadata "
                    f"has {METADATA_BILLING_TYPE}={meta.get(METADATA_BILLING_TYPE)!r}: OrgBilling.is_org_customer "
                    "reads it); run migrate --execute again to mark it"
                )
            else:  # (--execute could not write it either, and warned)
                result.warnings.append(
                    f"org customer {org.org_id!r} is not marked {METADATA_BILLING_TYPE}={ORGANIZATION}: its metadata "
                    "has 5 items already (Lago's limit); free one and run migrate --execute again to mark it"
                )
    # (one that starts later counts: a user's plan bought for a later date)
    result.subscription = await client.get_current_subscription(sub_id)
    # (when the donor's entitlement overrides will be checked, the users' ended subscriptions they are picked among
    # are listed with their active and pending ones: one listing per user rather than two; see _verify_overrides)
    with_ended = (
        plans is not None
        and plans.known_uses_entitlements() is True
        and result.subscription is not None
        and result.subscription.get("external_customer_id") == org.org_id
        and parse_time(result.subscription.get("created_at")) is not None
    )
    ended_statuses = ("terminated", "canceled") if with_ended else ()
    pages: list[tuple[str, list[JSON]]] = []
    ended_by_user: dict[str, list[JSON]] = {}
    user_customers: list[tuple[str, JSON | None]] = []
    for user_id in org.users:
        # (every page: a user left with more than one page of subscriptions is reported with all of them)
        live, ended_by_user[user_id], incomplete = await _user_subscriptions(client, user_id, ended_statuses)
        pages.append((user_id, live))
        if incomplete:  # (as a pending one: it would bill the user once paid)
            result.errors.append(_incomplete_said(user_id, org.org_id, incomplete))
        user_customers.append((user_id, await _or_none(client.get_customer(user_id))))
    accepted = (options or MigrationOptions()).accept_unmoved
    for user_id, customer in user_customers:  # (what they hold that was not moved: see _settle_unmoved)
        if customer is None:
            continue
        held, warned = await _holdings(client, org.org_id, user_id, customer, result.customer, accepted)
        result.unmoved.extend(held)
        result.warnings.extend(warned)
        for item in held:
            if item.kind in UNMOVED_KINDS and item.kind not in accepted:
                result.errors.append(
                    f"user {user_id!r} (org {org.org_id!r}) still holds {item.what}: to move it, {item.todo}; or "
                    f"accept leaving it there (--accept-unmoved {item.kind}, as given to --execute)"
                )
            else:
                result.warnings.append(f"user {user_id!r} (org {org.org_id!r}) still holds {item.what} (not moved)")
    if result.subscription is None:
        result.errors.append(f"org {org.org_id!r} has no active subscription {sub_id!r}")
    else:
        result.plan_code = result.subscription.get("plan_code")
        owner = result.subscription.get("external_customer_id")
        if owner != org.org_id:
            result.errors.append(
                f"active subscription {sub_id!r} belongs to customer {owner!r}, not org {org.org_id!r}"
            )
        elif plans is not None and await plans.uses_entitlements():
            # (the users' still active: the first phase done, the second not yet, or a run stopped half-way)
            active = [(user_id, s) for user_id, items in pages for s in items if s.get("status") == "active"]
            await _verify_overrides(
                client,
                org,
                result.subscription,
                options or MigrationOptions(),
                plans,
                result,
                active,
                ended_by_user if with_ended else None,
                _migration_began(result.customer),
            )
    for user_id, items in pages:
        for status in ("active", "pending"):  # (a pending one would start billing the user later)
            ids = ", ".join(
                str(s.get("external_id")) for s in items if (s.get("status") == "active") == (status == "active")
            )
            if ids:
                result.errors.append(f"user {user_id!r} (org {org.org_id!r}) still has {status} subscription(s) {ids}")
    subscribed = result.subscription is not None and result.subscription.get("external_customer_id") == org.org_id
    if subscribed and any(s.get("status") == "active" for _, items in pages for s in items):
        result.phase = "prepared"
        result.errors.append(
            f"org {org.org_id!r} is subscribed ({sub_id!r}) but its users' active subscriptions above are not "
            "ended: the second phase is pending (after migrate --execute --prepare, or a run stopped half-way). "
            "Once the middleware is deployed, run migrate --execute without --prepare to end them and mark the "
            "users (until then the fixed fees of both are billed)"
        )
    else:  # (step 4, as --execute makes it: a run stopped after ending the users' subscriptions left it to do; a user
        # whose subscriptions are not ended yet is reported above)
        ended = {user_id for user_id, items in pages if not items}
        for user_id, customer in user_customers:
            if user_id not in ended:
                continue
            meta = customer_metadata(customer)
            moved_to = meta.get(METADATA_MIGRATED_TO)
            markable = len(org.org_id) <= MAX_METADATA_VALUE and (
                METADATA_MIGRATED_TO in meta or len(meta) < MAX_METADATA_ITEMS
            )
            if customer is not None and moved_to != org.org_id and markable:
                marked = f" (it is marked {METADATA_MIGRATED_TO}={moved_to})" if moved_to else ""
                result.errors.append(
                    f"user {user_id!r} (org {org.org_id!r}) is not marked {METADATA_MIGRATED_TO}={org.org_id}{marked}: "
                    "a run stopped before marking it; run migrate --execute again to mark it"
                )
    result.status = "unverified" if result.errors else "verified"


async def _verify_overrides(
    client: LagoClient,
    org: OrgMapping,
    subscription: JSON,
    options: MigrationOptions,
    plans: PlanCatalog,
    result: OrgResult,
    active: Sequence[tuple[str, JSON]] = (),
    listed: Mapping[str, Sequence[JSON]] | None = None,
    began: dt.datetime | None = None,
) -> None:
    """Pick the donor again, as ``--execute`` did: among the users' subscriptions ended since the org subscription
    was made (terminated ones, an upgraded one too) and those still ``active`` (the first phase done, the second not
    yet: ``--prepare``), else canceled ones that would have started later (not a downgrade waiting for its date), by
    the plan policy. When it is on the org subscription's plan, the org subscription must
    have each of its overrides and go without what it had removed of the plan's entitlements (but for an org
    subscription --execute did not make, one the org had before the migration or older than the donor's: a warning).
    ``listed``: the users' terminated and canceled subscriptions, by user, when :func:`verify_org` listed them with
    their others (else read here). ``began``: when the migration first wrote to the org customer
    (:func:`_migration_began`): an org subscription made before it is one the org had, whose donor --execute picked
    among the users' subscriptions there then, those begun after the org subscription too."""
    sub_id = str(subscription.get("external_id"))
    status = str(subscription.get("status") or "active")
    made = parse_time(subscription.get("created_at"))
    if made is None:
        return
    had_before = began is not None and made < began
    since = max(made, began) if began is not None else made
    ended: list[tuple[str, JSON]] = []
    for user_id in org.users:
        olds = await _listed_or_read(client, listed, user_id, ("terminated", "canceled"))
        for old in olds:
            at = parse_time(old.get("terminated_at") or old.get("canceled_at"))
            # (a canceled downgrade was never a donor; a terminated subscription with a previous plan is an upgrade)
            downgrade = old.get("status") == "canceled" and old.get("previous_plan_code")
            if at is not None and at >= since and not downgrade:
                ended.append((user_id, old))
    pool = [*((user_id, old) for user_id, old in ended if old.get("status") == "terminated"), *active] or ended
    # (not one begun after the org subscription was made, as --execute keeps its donor: a plan bought or upgraded
    # between the two phases, or while a run was stopped; see _donor_kept)
    pool = [(user_id, s) for user_id, s in pool if not _begun_after(s, since)] or pool
    if not pool:
        return
    donor_user, donor = await _pick(options.plan_policy, pool, plans)
    if donor.get("plan_code") != subscription.get("plan_code"):
        return  # (not carried: --execute warned)
    wanted = await _entitlements_of(client, donor, plans)
    if not wanted:
        return
    origin = f"{donor_user}'s subscription {donor.get('external_id')}"
    result.entitlement_overrides, result.entitlements_from = wanted.overrides, origin
    result.entitlements_removed = list(wanted.removed)
    current = await _entitlements_of(client, subscription, plans)
    missing, other = _compare(wanted.overrides, current.overrides)
    to_remove, kept = _removals_to_make(wanted, current)
    if missing or to_remove:  # (--execute with another --plan-policy may have given it another's: see _donor_given)
        read = [(user_id, s, await _entitlements_of(client, s, plans)) for user_id, s in pool if s is not donor]
        given = await _donor_given(
            (donor_user, donor),
            [*read, (donor_user, donor, wanted)],
            current,
            subscription.get("plan_code"),
            options.plan_policy,
            plans,
        )
        if given is not None:
            theirs = f"{given[0]}'s subscription {given[1].get('external_id')}"
            entitlements = next(e for _, s, e in read if s is given[1])
            result.entitlement_overrides, result.entitlements_from = entitlements.overrides, theirs
            result.entitlements_removed = list(entitlements.removed)
            result.warnings.append(
                f"org subscription {sub_id!r} has the entitlement overrides of {theirs}, not those of {origin} that "
                f"--plan-policy {options.plan_policy} picks: verified against {theirs} (an earlier --execute, or its "
                "first phase, took them with another --plan-policy; give --verify that one)"
            )
            return
    if missing:
        body = json.dumps({"entitlements": missing}, separators=(",", ":"))
        result.errors.append(
            f"org subscription {sub_id!r} lacks the entitlement overrides of {origin}: {format_overrides(missing)} (it "
            f"gets the plan's values); set them: PATCH {_entitlements_path(sub_id, status)} {body}"
        )
    donor_made = parse_time(donor.get("created_at"))
    older = donor_made is not None and made < donor_made
    if to_remove and (had_before or older):  # (so not made by its migration: see plan_org)
        result.entitlements_removed = [removal for removal in wanted.removed if removal not in to_remove]
        names = ", ".join(_removal_name(removal) for removal in to_remove)
        calls = ", ".join(f"DELETE {_entitlements_path(sub_id, status, removal)}" for removal in to_remove)
        before = origin if older else "this migration"
        result.warnings.append(
            f"org subscription {sub_id!r} existed before {before}: it keeps {names} of its plan's entitlements, "
            f"which {origin} had removed (--execute does not take them from the whole org for one user); if the org "
            f"should go without them: {calls}"
        )
    elif to_remove:
        names = ", ".join(_removal_name(removal) for removal in to_remove)
        calls = ", ".join(f"DELETE {_entitlements_path(sub_id, status, removal)}" for removal in to_remove)
        result.errors.append(
            f"org subscription {sub_id!r} still has {names} of its plan's entitlements, which {origin} had removed; "
            f"remove them: {calls} (unless the org subscription was there before this migration: --execute then left "
            "them to the org, with a warning)"
        )
    if other:
        result.warnings.append(
            f"org subscription {sub_id!r} has other values than {origin} for the entitlement overrides "
            + format_overrides(other)
        )
    if kept:
        result.warnings.append(
            f"org subscription {sub_id!r} has overrides of its own on {', '.join(map(_removal_name, kept))}, which "
            f"{origin} had removed of its plan's entitlements"
        )


def _begun_after(subscription: JSON, since: dt.datetime) -> bool:
    """Whether the subscription was made after ``since`` (its ``created_at``; an upgrade is a new record)."""
    made = parse_time(subscription.get("created_at"))
    return made is not None and made > since


# ------------------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class MigrationRun:
    """The outcome of one run (the JSON report is :meth:`to_json`)."""

    mode: Mode
    options: MigrationOptions
    orgs: list[OrgResult]
    started_at: str
    duration_s: float = 0.0
    calls: CallStats = dataclasses.field(default_factory=CallStats)
    warnings: list[str] = dataclasses.field(default_factory=list)
    aborted: str | None = None
    #: What stopped the run before its first org (an org's own is in its :class:`OrgResult`).
    exception: LagoIntegrationError | None = dataclasses.field(default=None, repr=False)

    @property
    def counts(self) -> Counter[str]:
        return Counter(result.status for result in self.orgs)

    @property
    def ok(self) -> bool:
        """True when nothing failed (and, for ``verify``, every org verified)."""
        if self.aborted:
            return False
        bad = {"failed", "not-run", "unverified"}
        return not any(result.status in bad for result in self.orgs)

    def step_counts(self) -> Counter[str]:
        counter: Counter[str] = Counter()
        for result in self.orgs:
            for step in result.steps:
                counter[f"{step.kind}:{step.outcome}"] += 1
        return counter

    def to_json(self) -> JSON:
        migrated = self.counts.get("migrated", 0) + self.counts.get("prepared", 0)  # (a first phase: prepared)
        return {
            "mode": self.mode,
            "ok": self.ok,
            "aborted": self.aborted,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "options": dataclasses.asdict(self.options),
            "totals": {
                "orgs": len(self.orgs),
                "users": sum(len(r.users) for r in self.orgs),
                "by_status": dict(sorted(self.counts.items())),
                "steps": dict(sorted(self.step_counts().items())),
                "calls_per_org": round(self.calls.calls / len(self.orgs), 2) if self.orgs else 0,
                "calls_per_migrated_org": round(self.calls.calls / migrated, 2) if migrated else None,
            },
            "lago": self.calls.to_json(),
            "warnings": self.warnings,
            "orgs": [result.to_json() for result in self.orgs],
        }


async def run_migration(
    client: LagoClient,
    orgs: Sequence[OrgMapping],
    *,
    mode: Mode = "dry-run",
    options: MigrationOptions | None = None,
    concurrency: int = 8,
    journal: Journal | None = None,
    counter: CallCounter | None = None,
    on_org_done: Callable[[OrgResult, int, int], None] | None = None,
    allow_unreadable_entitlements: bool = False,
) -> MigrationRun:
    """Plan (``dry-run``), migrate (``execute``) or check (``verify``) every org, ``concurrency`` orgs at a time.

    Before anything is written, plan codes named by the mapping or ``default_plan`` are checked in Lago
    (:class:`MappingError` otherwise), and so is whether the API key may read entitlements: when Lago answers 403
    to ``GET /features``, the users' entitlement overrides can be neither carried nor verified, so ``execute`` raises
    :class:`EntitlementsUnreadableError` unless ``allow_unreadable_entitlements`` (the run then goes on with a
    warning in ``run.warnings``, as a dry run or a verification does); so does ``execute`` when ``GET /features``
    fails otherwise (a 429 after the client's retries): whether they can be read is then not known. An org
    subscription the org had before keeps the plan features its donor went without (a warning names them); one this
    migration made goes without them, also when resumed (``journal`` records that it made it). An org that fails is
    reported and the others go on; an authentication error or Lago being unavailable (after the client's retries)
    stops the run (``aborted``): run it again to resume. ``counter`` is the :class:`CallCounter` transport of
    ``client``, for call statistics.

    ``journal`` is not locked here (the lock must be taken before the journal is read, which ``Journal(path)``
    does): to keep two runs off one journal, as the CLI does, hold a :class:`JournalLock` around both::

        with JournalLock(path):
            journal = Journal(path)
            try:
                run = await run_migration(client, orgs, mode="execute", journal=journal)
            finally:
                journal.close()
    """
    options = options or MigrationOptions()
    if concurrency < 1:
        raise InvalidRequestError("concurrency must be at least 1.")
    started = time.perf_counter()
    run = MigrationRun(mode=mode, options=options, orgs=[], started_at=_now_iso())
    plans = PlanCatalog(client)
    if mode != "verify":
        problems = await plans.check(orgs, options)
        if problems:
            raise MappingError(problems)
    results = [OrgResult(org_id=org.org_id, users=org.users) for org in orgs]
    run.orgs = results
    if journal is not None:
        journal.use_lago(client.settings)
    fingerprints = [org.fingerprint(options, client.settings) for org in orgs]
    # (which run made an org subscription, whatever the phase: a first phase stopped and a second resuming it)
    both_phases = dataclasses.replace(options, prepare_only=False)
    made_by = {org.org_id: org.fingerprint(both_phases, client.settings) for org in orgs}
    prepared = journal.prepared if journal is not None and not options.prepare_only else frozenset()

    # (a dry run given the journal plans what ``execute`` would do with it: done orgs skipped, subscriptions it made)
    def journal_done(org: OrgMapping, fingerprint: str) -> bool:
        return mode != "verify" and journal is not None and journal.is_done(org.org_id, fingerprint)

    refuse = mode == "execute" and not allow_unreadable_entitlements
    if not all(journal_done(org, fingerprint) for org, fingerprint in zip(orgs, fingerprints, strict=True)):
        try:  # before any write: whether the users' entitlement overrides can be read at all
            await plans.uses_entitlements()
        except (LagoAuthenticationError, LagoUnavailableError) as exc:
            run.aborted, run.exception = f"stopped before the first org: {exc}", exc
        except LagoIntegrationError as exc:  # (a 429 after the client's retries...): not known, so not assumed
            if refuse:
                raise EntitlementsUnreadableError(_entitlements_unchecked(exc)) from exc
            # (asked again by each org that needs it, which then fails with it)
    warned = plans.entitlements_refused is not None
    if plans.entitlements_refused is not None:
        message = _entitlements_refused(plans.entitlements_refused, mode, refused=refuse)
        if refuse:
            raise EntitlementsUnreadableError(message)
        run.warnings.append(message)
    if journal is not None and mode == "execute":
        journal.record("run", mode=mode, orgs=len(orgs), options=dataclasses.asdict(options))
    limiter = anyio.CapacityLimiter(concurrency)
    done = 0

    async def one(org: OrgMapping, result: OrgResult, fingerprint: str, scope: anyio.CancelScope) -> None:
        nonlocal done
        async with limiter:
            token = _org_stats.set(result.calls)
            try:
                if journal_done(org, fingerprint):
                    result.status = "journal"
                elif mode == "verify":
                    await verify_org(client, org, result, plans, options)
                else:
                    sub_id = client.settings.subscription_id_for(org.org_id)
                    base = made_by[org.org_id]
                    made = journal is not None and journal.made_subscription(org.org_id, sub_id, base)
                    hint = journal.prepared_donor(org.org_id) if journal is not None else None
                    await plan_org(client, org, options, plans, result, org_subscription_made=made, donor_hint=hint)
                    if prepared and org.org_id not in prepared and result.phase == "both":
                        result.warnings.append(
                            f"org {org.org_id!r} was not prepared by the first phase of this journal (migrate "
                            "--execute --prepare): its subscription is made only now, so what the middleware sent "
                            "for it before now was not billed (Lago takes events of a subscription that does not "
                            "exist yet and never bills them); prepare an org added to the mapping before deploying"
                        )
                    if mode == "dry-run" or not result.steps:
                        result.status = "planned" if result.steps else "up-to-date"
                    else:
                        await apply_org(client, org, options, result, journal, base)
                        result.status = "prepared" if options.prepare_only else "migrated"
                    if mode == "execute" and journal is not None:
                        # (with whose entitlement overrides: --verify picks that donor again by the plan policy)
                        donor: dict[str, Any] = (
                            {"entitlements_from": result.entitlements_from} if result.entitlements_from else {}
                        )
                        if options.prepare_only:
                            donor["phase"] = "prepare"
                            if result.donor is not None:  # (the second phase keeps it: see plan_org)
                                donor["donor"] = list(result.donor)
                        journal.record("org", org_id=org.org_id, status="done", fingerprint=fingerprint, **donor)
            except LagoIntegrationError as exc:
                result.status = "failed"
                result.errors.append(str(exc))
                result.exception = exc
                logger.warning("org %s failed: %s", org.org_id, exc)
                if journal is not None and mode == "execute":
                    journal.record("org", org_id=org.org_id, status="failed", error=str(exc))
                if isinstance(exc, (LagoAuthenticationError, LagoUnavailableError)) and run.aborted is None:
                    run.aborted = f"stopped at org {org.org_id!r}: {exc}"
                    scope.cancel()
            finally:
                _org_stats.reset(token)
        done += 1
        if on_org_done is not None:
            on_org_done(result, done, len(results))

    if run.aborted is None:
        async with anyio.create_task_group() as group:
            for org, result, fingerprint in zip(orgs, results, fingerprints, strict=True):
                group.start_soon(one, org, result, fingerprint, group.cancel_scope)
    if plans.entitlements_refused is not None and not warned:  # (refused to an org's own GET /features)
        run.warnings.append(_entitlements_refused(plans.entitlements_refused, mode, refused=False))
    run.duration_s = time.perf_counter() - started
    if counter is not None:
        run.calls = counter.stats
    else:
        for result in results:
            run.calls.calls += result.calls.calls
            run.calls.writes += result.calls.writes
            run.calls.by_method.update(result.calls.by_method)
    if journal is not None and mode == "execute":
        journal.record("end", ok=run.ok, counts=dict(run.counts), aborted=run.aborted)
    return run


# ---------------------------------------------------------------------------------------- single user


async def migrate_user(
    billing: OrgBilling,
    *,
    user_id: str,
    org_id: str,
    org_name: str,
    email: str | None = None,
    plan_code: str | None = None,
    on_termination_invoice: str = "generate",
    on_termination_credit_note: str | None = None,
    allow_unreadable_entitlements: bool = False,
    prepare_only: bool = False,
    accept_unmoved: Collection[str] = (),
) -> JSON:
    """Migrate one user to its org with the CLI's code path; returns what was done (``changed`` is False on a
    no-op re-run). The org keeps the plan of the user's most expensive active subscription unless
    ``plan_code`` is given; an org already subscribed keeps its subscription. When the API key may not read
    entitlements, :class:`EntitlementsUnreadableError` unless ``allow_unreadable_entitlements`` (the user's
    entitlement overrides are then not carried; ``warnings`` says so). ``prepare_only``: the first phase only
    (:class:`MigrationOptions`), the user's subscriptions left active and unmarked; ``phase`` says which was made.
    A user whose customer holds wallets, coupons, a payment provider link or integrations the org customer lacks is
    refused (:class:`UnmovedHoldingsError`) unless ``accept_unmoved`` names them (:class:`MigrationOptions`)."""
    record = {"user_id": user_id, "org_id": org_id, "org_name": org_name, "email": email, "plan_code": plan_code}
    mapped, _ = build_mapping([("migrate_user_to_org", record)], billing.settings)
    orgs = [_OneUserMapping(**dataclasses.asdict(org)) for org in mapped]
    options = MigrationOptions(
        on_termination_invoice=on_termination_invoice,
        on_termination_credit_note=on_termination_credit_note,
        prepare_only=prepare_only,
        accept_unmoved=accept_unmoved,
    )
    run = await run_migration(
        billing.client,
        orgs,
        mode="execute",
        options=options,
        concurrency=1,
        allow_unreadable_entitlements=allow_unreadable_entitlements,
    )
    result = run.orgs[0]
    if result.exception is not None:
        raise result.exception
    if run.exception is not None:
        raise run.exception
    terminated = [s.target for s in result.steps if s.kind == "terminate_subscription" and s.outcome == "done"]
    return {
        "user_id": user_id,
        "org_id": org_id,
        "plan_code": result.plan_code,
        "customer": result.customer,
        "subscription": result.subscription,
        "terminated_subscriptions": terminated,
        "changed": bool(result.steps),
        "phase": result.phase,
        "steps": [step.to_json() for step in result.steps],
        "warnings": [*run.warnings, *result.warnings],
    }
